"""The lab's synthetic world and its data splits: which world a run's settings describe, the seeded
split of each use, every one-object scene, and the per-cell labels of perception pretraining."""

from __future__ import annotations

import torch

from ddpo.lab.settings import DemoSettings, base_config

V2_SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "bar", "moon")
V2_PARTNERS = {"square": "circle", "triangle": "star", "cross": "ring"}  # anchor -> companion; bar and moon: controls
SPLIT_OFFSETS = {"sft": 1, "preference": 2, "val": 3, "test": 4, "gate": 5}


def _tuples(overrides: dict) -> dict:
    """YAML and JSON give lists where the world's configs hold tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def synthetic_config(settings: DemoSettings):
    """The lab's world.

    v2: 8 shapes with distinct silhouettes in one size and 6 independent colours, 1-4 objects; three
    directed anchor -> companion pairs (square -> circle, triangle -> star, cross -> ring) whose
    companion really stands at the anchor's partner cell in 30% of the scenes that allow it; bar and
    moon are controls without a partner. Captions: data/synthetic/priors.py.

    v1: 4 shapes in one size, at most 3 objects, each shape the frequent partner of the next (circle ->
    square -> triangle -> diamond -> circle); captions: data/synthetic/noise.py (renames visible objects).
    Both are rendered at the model's input size.
    """
    from ddpo.data.synthetic import SyntheticConfig
    from ddpo.data.synthetic.language import LanguageConfig
    from ddpo.data.synthetic.noise import NoiseConfig
    from ddpo.data.synthetic.priors import PriorConfig
    from ddpo.data.synthetic.world import WorldConfig

    language = LanguageConfig(style="detailed", target_words=settings.answer_words)
    image_size = base_config(settings).model.image_size
    if settings.world_version == "v2":
        world = dict(
            image_size=image_size,
            shapes=V2_SHAPES,
            sizes=("large",),
            max_objects=4,
            partners=dict(V2_PARTNERS),
            cooccurrence_prob=0.3,
            repeat_prob=0.1,
            adjacent_partners=True,
        )
        world.update(_tuples(settings.world))
        priors = {"position_bias": ("middle right",), **settings.priors}
        return SyntheticConfig(world=WorldConfig(**world), language=language, priors=PriorConfig(**_tuples(priors)))
    world = dict(
        image_size=image_size,
        shapes=("circle", "square", "triangle", "diamond"),
        sizes=("large",),
        max_objects=3,
        partners={"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "circle"},
    )
    world.update(_tuples(settings.world))
    return SyntheticConfig(world=WorldConfig(**world), language=language, noise=NoiseConfig(**settings.noise))


def split(settings: DemoSettings, name: str, n: int):
    """(scenes, images, prompts, captions) of a split; each split draws from its own seed, so adding
    images to one split never changes another."""
    from ddpo.data.synthetic import sft_examples

    examples = sft_examples(n, settings.seed * 100 + SPLIT_OFFSETS[name], synthetic_config(settings))
    return (
        [e.scene for e in examples],
        [e.image for e in examples],
        [e.prompt for e in examples],
        [e.caption for e in examples],
    )


def single_object_scenes(world):
    """Every one-object scene of the world: each shape x colour x cell, one size, no jitter."""
    from ddpo.data.synthetic.language import POSITIONS
    from ddpo.data.synthetic.world import Scene, WorldObject

    return [
        Scene((WorldObject(shape, color, world.sizes[-1], cell),))
        for shape in world.shapes
        for color in world.colors
        for cell in POSITIONS
    ]


def cell_targets(scenes, world, image_tokens: int, positions: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Per image token (one per grid cell, row-major: needs patch = cell, 9 tokens), the shape and the
    colour of the object in its cell (0 = empty) and, with `positions`, the cell itself (0-8): [n, 9, 2 or 3]
    and the class counts.

    Why the cell: the LLM reads image tokens by content (its RoPE positions rotate queries and keys but add
    nothing to the values it reads), so a caption can name a token's cell only if the token's features say
    which cell it is; pretrained on shape and colour alone, the tower's features kept too little of that and
    the SFT model named the wrong cell for objects it saw (experiments/results/lab_v3/NOTES.md)."""
    from ddpo.data.synthetic.world import GRID

    if image_tokens != GRID * GRID:
        raise ValueError(
            f"perception pretraining labels one image token per grid cell, so it needs {GRID * GRID} image "
            f"tokens (model.patch_size = image_size / 3); this model has {image_tokens}; "
            f"set perception_steps 0 or the patch size"
        )
    labels = 3 if positions else 2
    targets = torch.zeros(len(scenes), GRID * GRID, labels, dtype=torch.long)
    if positions:
        targets[:, :, 2] = torch.arange(GRID * GRID)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            targets[i, o.cell[0] * GRID + o.cell[1], :2] = torch.tensor(
                [world.shapes.index(o.shape) + 1, world.colors.index(o.color) + 1]
            )
    classes = [len(world.shapes) + 1, len(world.colors) + 1]
    return targets, (classes + [GRID * GRID]) if positions else classes
