"""v2 captions: a truthful perceiver whose descriptions carry language priors, as in RLHF-V.

The SFT captions of the v2 world describe a *believed scene*: the true scene edited by a few biases,
then described by one grammar, so a caption never contradicts itself (the overview counts what the
object sentences describe; a miscoloured object is miscoloured in every sentence).

Biases (each fires per opportunity with its probability; the random numbers are drawn whatever the
probabilities, so changing one bias does not reshuffle the others):
  companion  co-occurrence prior: an anchor (a key of WorldConfig.partners) is present, its partner is
             not, and the anchor's `partner_cell` is empty -> the partner is described there, in a
             fluent object sentence in reading order (the overview counts it). When the bias does not
             fire, the caption says "at <that cell> is nothing." -- the truthful sentence in the same
             place, which is also what the oracle writes over an invented partner (a replacement).
  attribute  colour confusion: an object of a colour in `color_confusions` (and, if `confusion_shapes` is
             set, of one of those shapes) gets the mapped colour.
  position   centre bias: an object in a cell of `position_bias` is said to be at the centre when the
             believed centre is empty.
Visible objects are never renamed (v1's misperception noise is gone from this world).

Why p >= 0.6: a bias below 0.5 in a context is a minority that greedy decoding out-votes; above it the
mode of the caption distribution is the bias, so the SFT model reproduces it greedily.

Detailed captions (~55 words): an overview (with probability `overview_prob`), then one sentence per
believed object and per stated-empty cell in reading order, then true-of-every-image filler sentences
while the answer stays within `target_words`. Objects have one size, so sizes are never said.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ddpo.data.synthetic.language import (
    CELLS,
    FILLERS,
    POSITIONS,
    Empty,
    Filler,
    Instance,
    Item,
    LanguageConfig,
    Overview,
    n_words,
    realize,
)
from ddpo.data.synthetic.noise import InjectedError, NoisyCaption
from ddpo.data.synthetic.world import GRID, Scene, WorldConfig, WorldObject, partner_cell, sample_scenes

PRIOR_TYPES = ("object", "count", "attribute", "position")


@dataclass
class PriorConfig:
    """The v2 caption biases and how much a caption says besides the objects."""

    # anchor present, partner absent, partner cell empty: the partner is described there. 0.75: at 0.6 the
    # SFT model (seeing well) named the absent companion in 26% of its contexts greedily, at 0.75 in 38%
    companion_prob: float = 0.75
    attribute_prob: float = 0.6  # per object whose colour is a key of color_confusions: the mapped colour is said
    color_confusions: dict[str, str] = field(default_factory=lambda: {"pink": "red"})  # true -> said
    # the shapes whose colour the confusion touches (empty: every shape, the lab's default). Tried in lab v3 with
    # ("circle", "ring"), to bring attributes (34% of the corrections) toward RLHF-V's 10%: the SFT model then
    # blurred pink and red on every shape and missed the colour gate on seed 0 (experiments/results/lab_v3/NOTES.md)
    confusion_shapes: tuple[str, ...] = ()
    position_prob: float = 0.6  # per object in a cell of position_bias (centre empty): it is said to be at the centre
    position_bias: tuple[str, ...] = ("middle left", "middle right")  # cells whose objects drift to the centre
    overview_prob: float = 0.5  # a caption opens with "the image shows N objects." with this probability
    # each other empty cell is said to be empty ("at the ... is nothing.") with this probability. 0 by
    # default: at 0.2 the SFT model learned "an empty cell is nothing" from those sentences and named the
    # absent companion in only 13% of its contexts (greedy), though the captions do in 60%
    empty_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("companion_prob", "attribute_prob", "position_prob", "overview_prob", "empty_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PriorConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        bad = [p for p in self.position_bias if p not in CELLS or p == "center"]
        if bad:
            raise ValueError(
                f"PriorConfig.position_bias: {bad} are not non-centre positions; positions are {list(CELLS)}"
            )


@dataclass
class Belief:
    """What a caption believes: the edited scene, the cells it says are empty, what was injected."""

    scene: Scene
    stated_empty: list[tuple[int, int]]
    errors: list[InjectedError]


def believe(scene: Scene, rng: np.random.Generator, world: WorldConfig, cfg: PriorConfig) -> Belief:
    """The believed scene of one caption (deterministic given the rng state); see the module doc."""
    errors: list[InjectedError] = []
    objects = {o.cell: o for o in scene.objects}
    present = scene.shapes()
    contrast: list[tuple[int, int]] = []  # partner cells of anchors whose partner was not invented
    for anchor in scene.objects:
        partner = world.partners.get(anchor.shape)
        u, color = rng.random(), str(rng.choice(world.colors))
        cell = partner_cell(anchor.cell)
        if partner is None or partner in present or cell in objects or cell in contrast:
            continue
        if u < cfg.companion_prob:
            objects[cell] = WorldObject(partner, color, anchor.size, cell)
            present = present | {partner}
            errors.append(InjectedError("object", f"a {partner} at the {POSITIONS[cell]} next to the {anchor.shape}"))
        else:
            contrast.append(cell)
    center = CELLS["center"]
    for o in scene.objects:
        u_color, u_position = rng.random(), rng.random()
        new = o
        said = (
            cfg.color_confusions.get(o.color) if o.shape in cfg.confusion_shapes or not cfg.confusion_shapes else None
        )
        if said and u_color < cfg.attribute_prob:
            new = dataclasses.replace(new, color=said)
            errors.append(InjectedError("attribute", f"called a {o.color} {o.shape} {said}"))
        if POSITIONS[o.cell] in cfg.position_bias and center not in objects and u_position < cfg.position_prob:
            del objects[o.cell]
            new = dataclasses.replace(new, cell=center)
            errors.append(InjectedError("position", f"put the {o.shape} at the {POSITIONS[o.cell]} at the center"))
        objects[new.cell] = new
    believed = Scene(tuple(sorted(objects.values(), key=lambda o: o.cell)))
    true_cells = {o.cell for o in scene.objects}
    empty_in_both = [
        (r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in objects and (r, c) not in true_cells
    ]
    stated = [cell for cell in empty_in_both if rng.random() < cfg.empty_prob or cell in contrast]
    if len(believed.objects) != len(scene.objects):
        errors.append(InjectedError("count", f"{len(believed.objects)} objects for {len(scene.objects)}"))
    return Belief(believed, stated, errors)


def plan_believed(belief: Belief, rng: np.random.Generator, language: LanguageConfig, cfg: PriorConfig) -> list[Item]:
    """The sentences of one caption: overview?, objects and stated-empty cells in reading order, fillers."""
    overview = rng.random() < cfg.overview_prob
    cells: list[Item] = [Instance(None, o.color, o.shape, o.cell, position_first=True) for o in belief.scene.objects]
    cells += [Empty(cell) for cell in belief.stated_empty]
    plan: list[Item] = [Overview(len(belief.scene.objects))] if overview else []
    plan += sorted(cells, key=lambda item: item.cell)
    words = sum(n_words(item.text()) for item in plan)
    for i in rng.permutation(len(FILLERS)):
        w = n_words(FILLERS[i])
        if words + w <= language.target_words:
            plan.append(Filler(FILLERS[i]))
            words += w
    return plan


def prior_caption(
    scene: Scene, rng: np.random.Generator, world: WorldConfig, language: LanguageConfig, cfg: PriorConfig
) -> NoisyCaption:
    """A v2 caption of `scene`: its believed scene described (deterministic given the rng state). Count
    errors count the overview only when the caption has one."""
    belief = believe(scene, rng, world, cfg)
    plan = plan_believed(belief, rng, language, cfg)
    errors = belief.errors if isinstance(plan[0], Overview) else [e for e in belief.errors if e.type != "count"]
    return NoisyCaption(realize(plan), plan, errors)


def prior_statistics(
    world: WorldConfig, language: LanguageConfig, cfg: PriorConfig, n: int = 2000, seed: int = 0
) -> dict:
    """Measured on `n` captions: errors per caption by type, their mix, the share of captions with an
    invented object, and mean words per caption."""
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    with_object = words = 0
    for scene in sample_scenes(n, seed, world):
        caption = prior_caption(scene, rng, world, language, cfg)
        counts.update(e.type for e in caption.errors)
        with_object += any(e.type == "object" for e in caption.errors)
        words += n_words(caption.text)
    total = sum(counts.values())
    return {
        "errors_per_caption": {t: counts[t] / n for t in PRIOR_TYPES},
        "mix": {t: counts[t] / max(total, 1) for t in PRIOR_TYPES},
        "object_captions": with_object / n,
        "words": words / n,
    }
