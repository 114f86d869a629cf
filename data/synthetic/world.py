"""The procedural world: scenes of 1-4 coloured shapes on a 3x3 grid, and their rendering.

A scene is pure data (`Scene`); `render` turns it into a small RGB image deterministically, so a scene
is the complete ground truth of its image. Some shapes have a *frequent partner* that the sampler adds
with probability `cooccurrence_prob` when the shape is present: a real co-occurrence statistic that
the caption noise (noise.py) then over-generalises, the way MLLMs mention a fork next to every plate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

GRID = 3  # the position words ("top left", "center", ...) name the cells of a 3x3 grid
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")  # the v1 world's categories (WorldConfig default)
# Every shape `render` can draw: v1's and the v2 world's (ddpo/demo.py), which drops the diamond (read as a
# triangle at 16 pixels) for silhouettes that stay distinct at that size.
ALL_SHAPES = (*SHAPES, "star", "ring", "bar", "moon")
SIZES = ("small", "large")


@dataclass(frozen=True)
class WorldObject:
    """One object: what it is, what it looks like and where it is."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col), 0-based, row 0 = top
    offset: tuple[int, int] = (0, 0)  # pixel jitter (dx, dy) inside the cell; visual only, not described


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its objects in reading order (by cell), one object per cell."""

    objects: tuple[WorldObject, ...]

    def at(self, cell: tuple[int, int]) -> WorldObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def count(self, shape: str, color: str | None = None, size: str | None = None) -> int:
        return sum(o.shape == shape and color in (None, o.color) and size in (None, o.size) for o in self.objects)

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}


@dataclass
class WorldConfig:
    """Everything that decides which scenes exist and how they look. Same config + seed = same data."""

    image_size: int = 64  # side of the square RGB image in pixels (each grid cell is image_size / 3)
    min_objects: int = 1  # fewest objects in a scene
    max_objects: int = 4  # most objects in a scene (at most 9: one per cell)
    shapes: tuple[str, ...] = SHAPES  # object categories (the nouns of the captions)
    colors: tuple[str, ...] = tuple(COLOR_RGB)  # colour attribute values; each must be a key of COLOR_RGB
    sizes: tuple[str, ...] = SIZES  # size attribute values ("small" / "large")
    repeat_prob: float = (
        0.25  # chance that a new object repeats an existing object's shape and colour (makes counts > 1)
    )
    partners: dict[str, str] = field(
        default_factory=lambda: {"circle": "square", "triangle": "diamond", "cross": "circle", "diamond": "triangle"}
    )  # shape -> its frequent partner
    cooccurrence_prob: float = 0.25  # chance that a present shape's partner is added to the scene (if there is room)
    jitter: int = 2  # max pixel offset of an object inside its cell (visual variety; not part of any claim)
    background: tuple[int, int, int] = (40, 40, 40)  # dark gray background colour
    # v2: a partner is placed at its anchor's `partner_cell` (the cell to its right, see there), as a
    # saucer sits under a cup, so a caption that invents it has one place to put it. False (v1): anywhere.
    adjacent_partners: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"WorldConfig: need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}, {self.max_objects}"
            )
        unknown = [c for c in self.colors if c not in COLOR_RGB]
        if unknown:
            raise ValueError(f"WorldConfig.colors: no RGB value for {unknown}; known colours are {sorted(COLOR_RGB)}")
        for a, b in self.partners.items():
            if a not in self.shapes or b not in self.shapes or a == b:
                raise ValueError(
                    f"WorldConfig.partners: '{a}' -> '{b}' must map a shape to a different shape of {self.shapes}"
                )
        unknown = [s for s in self.shapes if s not in ALL_SHAPES]
        if unknown:
            raise ValueError(f"WorldConfig.shapes: cannot draw {unknown}; drawable shapes are {ALL_SHAPES}")
        if self.image_size < 24:
            raise ValueError(f"WorldConfig.image_size must be >= 24 pixels (8 per cell), got {self.image_size}")


def partner_cell(cell: tuple[int, int]) -> tuple[int, int]:
    """Where an anchor's partner goes (adjacent_partners): the cell to its right; in the right column the
    cell below; at the bottom right the cell to its left."""
    r, c = cell
    if c < GRID - 1:
        return r, c + 1
    if r < GRID - 1:
        return r + 1, c
    return r, c - 1


def _sample_adjacent(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """v2 scenes: objects of independent random shape and colour at random free cells; after each
    object whose shape is an anchor (a key of `partners`) its partner is added at the anchor's
    `partner_cell` with probability `cooccurrence_prob` if that cell is free, the scene has room and
    the partner shape is not present yet."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    free = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = rng.permutation(len(free))
    free = [free[i] for i in order]
    placed: dict[tuple[int, int], tuple[str, str]] = {}
    while len(placed) < n and free:
        if placed and rng.random() < cfg.repeat_prob:
            shape, color = list(placed.values())[int(rng.integers(len(placed)))]
        else:
            shape, color = str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colors))
        cell = free.pop(0)
        placed[cell] = (shape, color)
        partner, u, partner_color = cfg.partners.get(shape), rng.random(), str(rng.choice(cfg.colors))
        target = partner_cell(cell)
        present = {s for s, _ in placed.values()}
        if (
            partner
            and partner not in present
            and target in free
            and len(placed) < cfg.max_objects
            and u < cfg.cooccurrence_prob
        ):
            free.remove(target)
            placed[target] = (partner, partner_color)
    objects = []
    for cell, (shape, color) in placed.items():
        size = str(rng.choice(cfg.sizes))
        offset = tuple(int(v) for v in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
        objects.append(WorldObject(shape, color, size, cell, offset))
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)))


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draw one scene (v2, `adjacent_partners`: see `_sample_adjacent`): a number of objects, each a new
    random object, a repeat of an existing one (same shape and colour) or the partner of a present shape,
    at distinct random cells."""
    if cfg.adjacent_partners:
        return _sample_adjacent(rng, cfg)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    free = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(free)
    kinds: list[tuple[str, str]] = []  # (shape, colour) of each object, in creation order
    while len(kinds) < n:
        if kinds and rng.random() < cfg.repeat_prob:
            kinds.append(kinds[int(rng.integers(len(kinds)))])
        else:
            kinds.append((str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colors))))
        partner = cfg.partners.get(kinds[-1][0])
        present = {s for s, _ in kinds}
        if partner and partner not in present and len(kinds) < cfg.max_objects and rng.random() < cfg.cooccurrence_prob:
            kinds.append((partner, str(rng.choice(cfg.colors))))
    objects = []
    for (shape, color), cell in zip(kinds, free):
        size = str(rng.choice(cfg.sizes))
        offset = tuple(int(v) for v in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
        objects.append(WorldObject(shape, color, size, (int(cell[0]), int(cell[1])), offset))
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)))


def sample_scenes(n: int, seed: int, cfg: WorldConfig) -> list[Scene]:
    """`n` scenes from one seeded generator (scene i depends only on the seed and i)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg) for _ in range(n)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    if shape == "star":  # five points, inner radius 0.45 r
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + radii[k] * np.sin(np.pi * k / 5), cy - radii[k] * np.cos(np.pi * k / 5)) for k in range(10)]
    if shape == "bar":  # a wide, flat rectangle
        return [(cx - r, cy - 0.4 * r), (cx + r, cy - 0.4 * r), (cx + r, cy + 0.4 * r), (cx - r, cy + 0.4 * r)]
    return None


def render(scene: Scene, cfg: WorldConfig) -> Image.Image:
    """The scene as a `cfg.image_size`-pixel RGB image: flat shapes on a flat background.

    Large objects fill ~80% of their cell, small ones ~45%, so size is visible at any image size.
    """
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), cfg.background)
    draw = ImageDraw.Draw(image)
    cell = cfg.image_size / GRID
    for obj in scene.objects:
        r = cell * (0.4 if obj.size == "large" else 0.22)
        cx = (obj.cell[1] + 0.5) * cell + obj.offset[0]
        cy = (obj.cell[0] + 0.5) * cell + obj.offset[1]
        color = COLOR_RGB[obj.color]
        points = _polygon(obj.shape, cx, cy, r)
        if obj.shape == "ring":  # a disc with a hole of half its radius
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=cfg.background)
        elif obj.shape == "moon":  # a disc with a bite taken from its right side
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            draw.ellipse([cx - 0.1 * r, cy - r, cx + 1.9 * r, cy + r], fill=cfg.background)
        elif points is None:  # circle
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(points, fill=color)
    return image
