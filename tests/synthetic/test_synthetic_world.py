import numpy as np
import pytest

from ddpo.data.synthetic.world import COLOR_RGB, GRID, Scene, WorldConfig, WorldObject, render, sample_scenes


def test_scenes_are_deterministic_per_seed():
    cfg = WorldConfig()
    assert sample_scenes(200, 7, cfg) == sample_scenes(200, 7, cfg)
    assert sample_scenes(200, 7, cfg) != sample_scenes(200, 8, cfg)


def test_scenes_respect_the_config():
    cfg = WorldConfig()
    scenes = sample_scenes(2000, 0, cfg)
    for scene in scenes:
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)  # one object per cell, reading order
    # repeats make counts > 1 common, and partners co-occur more often than chance
    assert np.mean([any(s.count(o.shape, o.color) > 1 for o in s.objects) for s in scenes]) > 0.15
    with_circle = [s for s in scenes if "circle" in s.shapes()]
    without = [s for s in scenes if "circle" not in s.shapes()]
    assert (
        np.mean(["square" in s.shapes() for s in with_circle])
        > np.mean(["square" in s.shapes() for s in without]) + 0.05
    )


def test_render_is_deterministic_and_draws_each_object_in_its_cell():
    cfg = WorldConfig(jitter=0)
    scene = Scene((WorldObject("circle", "red", "large", (0, 0)), WorldObject("square", "blue", "small", (2, 1))))
    image = render(scene, cfg)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.tobytes() == render(scene, cfg).tobytes()
    cell = 64 / GRID
    px = np.asarray(image)

    def center(r, c):
        return px[int((r + 0.5) * cell), int((c + 0.5) * cell)]

    assert tuple(center(0, 0)) == COLOR_RGB["red"]
    assert tuple(center(2, 1)) == COLOR_RGB["blue"]
    assert tuple(center(1, 1)) == cfg.background
    # a large object covers more pixels than a small one
    big = (np.abs(px.astype(int) - COLOR_RGB["red"]).sum(-1) == 0).sum()
    small = (np.abs(px.astype(int) - COLOR_RGB["blue"]).sum(-1) == 0).sum()
    assert big > 2 * small


def test_bad_config_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="colors"):
        WorldConfig(colors=("red", "teal"))
    with pytest.raises(ValueError, match="partners"):
        WorldConfig(partners={"circle": "hexagon"})
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=10)
