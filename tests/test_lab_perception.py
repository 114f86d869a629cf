"""The v2 lab's perception pretraining and the lab's pieces around the SFT model: per-cell labels,
the loss plateau, the drift measure."""

import pytest
import torch

from ddpo.config import ModelConfig
from ddpo.data.synthetic.language import build_tokenizer
from ddpo.data.synthetic.world import Scene, WorldObject, render
from ddpo.lab.evaluation import drift
from ddpo.lab.gate import loss_plateau
from ddpo.lab.settings import DemoSettings
from ddpo.lab.sft import PerceptionSettings, pretrain_perception, reset_position_embeddings
from ddpo.lab.world import cell_targets, synthetic_config
from ddpo.models.build import build_model


def test_cell_targets_label_each_cell_token_row_major():
    world = synthetic_config(DemoSettings()).world
    scene = Scene((WorldObject("star", "blue", "large", (0, 2)), WorldObject("bar", "red", "large", (2, 1))))
    targets, classes = cell_targets([scene], world, 9, positions=False)
    assert classes == [len(world.shapes) + 1, len(world.colors) + 1]
    assert targets[0, 2].tolist() == [world.shapes.index("star") + 1, world.colors.index("blue") + 1]
    assert targets[0, 7].tolist() == [world.shapes.index("bar") + 1, world.colors.index("red") + 1]
    assert targets[0].sum() == targets[0, 2].sum() + targets[0, 7].sum()  # every other cell is empty (0)
    # lab v3 (the default): a third label, each token's own cell, on empty cells too
    with_cells, classes = cell_targets([scene], world, 9)
    assert classes == [len(world.shapes) + 1, len(world.colors) + 1, 9]
    assert with_cells[0, :, 2].tolist() == list(range(9))
    assert torch.equal(with_cells[0, :, :2], targets[0])
    with pytest.raises(ValueError, match="one image token per grid cell"):
        cell_targets([scene], world, 36)


def test_pretrain_perception_trains_the_vision_side_only_and_learns():
    torch.manual_seed(0)
    settings = DemoSettings()
    world = synthetic_config(settings).world
    cfg = ModelConfig(arch="llava", preset="tiny", image_size=48, patch_size=16, vision_feature_layer=-1)
    model = build_model(cfg, tokenizer=build_tokenizer(world))
    scenes = [
        Scene((WorldObject(shape, color, "large", (k % 3, (k // 3) % 3)),))
        for k, (shape, color) in enumerate((s, c) for s in world.shapes[:4] for c in world.colors[:2])
    ]
    images = [render(s, world) for s in scenes]
    targets, classes = cell_targets(scenes, world, model.num_image_tokens, positions=False)
    llm_before = [p.detach().clone() for p in model.parameter_parts()["llm"]]
    vision_before = [p.detach().clone() for p in model.parameter_parts()["vision_tower"]]
    losses = pretrain_perception(
        model, images, targets, classes, PerceptionSettings(steps=60, batch_size=8, learning_rate=3e-3)
    )
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert all(torch.equal(a, b) for a, b in zip(llm_before, model.parameter_parts()["llm"]))
    assert any(not torch.equal(a, b) for a, b in zip(vision_before, model.parameter_parts()["vision_tower"]))
    with pytest.raises(ValueError, match="targets must be"):
        pretrain_perception(model, images, targets[:, :4], classes, PerceptionSettings(steps=1))


def test_loss_plateau_and_drift():
    plateau = loss_plateau([2.0] * 10 + [1.0] * 80 + [0.5] * 10)
    assert plateau["loss_by_tenth"] == [2.0] + [1.0] * 8 + [0.5] and plateau["last_tenth_change"] == -0.5
    policy = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    reference = [torch.tensor([-1.5, -2.0]), torch.tensor([-1.0])]
    assert drift(policy, reference) == pytest.approx((0.5 + 0.0 + 0.5) / 3)  # pooled over tokens, not answers


def test_reset_position_embeddings_redraws_the_towers_tables_only():
    world = synthetic_config(DemoSettings()).world
    cfg = ModelConfig(arch="llava", preset="tiny", image_size=48, patch_size=16, vision_feature_layer=-1)
    model = build_model(cfg, tokenizer=build_tokenizer(world))
    llm = [p.detach().clone() for p in model.parameter_parts()["llm"]]
    assert reset_position_embeddings(model, 1.0, torch.Generator().manual_seed(0)) == 1
    table = model.hf_model.model.vision_tower.embeddings.position_embedding.weight
    assert 0.8 < float(table.std()) < 1.2
    assert all(torch.equal(a, b) for a, b in zip(llm, model.parameter_parts()["llm"]))  # the LLM's RoPE has no table


def test_the_cell_label_is_learned_only_from_large_position_embeddings():
    """Lab v3's finding: at the tower's own init the features carry no cell identity and the per-token cell label
    stays at chance (ln 9 = 2.20) however shape and colour are learned; at std 1 it is learned."""
    from ddpo.lab.world import split

    settings = DemoSettings()
    world = synthetic_config(settings).world
    scenes, images, _, _ = split(settings, "sft", 200)
    final = {}
    for std in (None, 1.0):
        torch.manual_seed(0)
        cfg = ModelConfig(arch="llava", preset="small", image_size=48, patch_size=16, vision_feature_layer=-1)
        model = build_model(cfg, tokenizer=build_tokenizer(world))
        targets, classes = cell_targets(scenes, world, model.num_image_tokens)
        losses = pretrain_perception(
            model, images, targets, classes, PerceptionSettings(steps=60, batch_size=32, position_std=std)
        )
        final[std] = sum(losses[-10:]) / 10
    assert final[None] > 2.0  # the cell label's chance loss alone is 2.20
    assert final[1.0] < 1.0
