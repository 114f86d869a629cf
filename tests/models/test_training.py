"""Training through the shared interface: a DPO step, freezing, RLHF-V's lr-0 vision experts, checkpointing,
save/load."""

import json

import pytest
import torch

from ddpo.models.build import build_model, load_model
from ddpo.models.config import ConfigError, ModelConfig
from tests.models.helpers import naive_token_logps, pair_batch, tiny_model


def _dpo_step(model, batch, zero_lr_names=()) -> float:
    """One AdamW step on a sigmoid DPO loss (reference log-probs 0), lr 0 on `zero_lr_names`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in zero_lr_names], "lr": 1e-2},
        {"params": [p for n, p in named if n in zero_lr_names], "lr": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    chosen, rejected = model.pair_token_logps(batch)
    margin = (chosen * batch.answer_mask[:2]).sum(-1) - (rejected * batch.answer_mask[2:]).sum(-1)
    loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reached(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_both_architectures_train_a_step_through_the_same_interface(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer)
    batch = pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2])
    with torch.no_grad():
        naive = naive_token_logps(model, batch).sum(-1)
    expected = -torch.nn.functional.logsigmoid(0.1 * (naive[:2] - naive[2:])).mean().item()
    before = _snapshot(model)
    loss = _dpo_step(model, batch)
    assert loss == pytest.approx(expected, rel=1e-5)
    # Every parameter that the loss reaches moved. Unreached: LLaVA's last CLIP layer (features come from
    # layer -2); in Muffin's last BEiT-3 layer, the vision-expert parts that only shape patch outputs.
    reached = _reached(model)
    assert _changed(before, model) == reached
    for part in ("vision_tower", "projector", "llm"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameter_parts()[part]), part


@pytest.mark.parametrize("frozen", ["freeze_vision_tower", "freeze_projector", "freeze_llm"])
def test_frozen_parts_stay_unchanged_and_the_rest_trains(arch, frozen, word_tokenizer):
    model = tiny_model(arch, word_tokenizer, **{frozen: True})
    part = {"freeze_vision_tower": "vision_tower", "freeze_projector": "projector", "freeze_llm": "llm"}[frozen]
    frozen_names = {n for n, p in model.named_parameters() if any(p is q for q in model.parameter_parts()[part])}
    assert frozen_names and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen_names)
    before = _snapshot(model)
    _dpo_step(model, pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2]))
    reached = _reached(model)
    assert not reached & frozen_names
    assert _changed(before, model) == reached and reached


def test_muffin_freeze_vision_experts_is_lr_zero_on_experts_a_and_patch_embedding(word_tokenizer):
    model = tiny_model("muffin", word_tokenizer, freeze_vision_experts=True)
    names = set(model.zero_lr_parameter_names())
    beit3 = "hf_model.model.vision_tower.beit3."
    # Per layer: q/k/v/out_proj (weight, bias), inner_attn_ln, self_attn_layer_norm, final_layer_norm
    # (weight, bias) and ffn fc1/fc2/ffn_layernorm (weight, bias) of expert A = 8 + 6 + 6 = 20; plus the
    # vision position embedding, the final layer_norm.A (2) and the patch embedding (proj w/b, cls) = 6.
    assert len(names) == 2 * 20 + 6
    assert f"{beit3}encoder.layers.1.ffn.A.fc2.weight" in names and f"{beit3}vision_embed.cls_token" in names
    assert f"{beit3}encoder.embed_positions.A.weight" in names
    assert not any(".B." in n for n in names)
    # RLHF-V keeps them requires_grad (their gradients count in the clipping norm); only the update is 0.
    assert all(p.requires_grad for n, p in model.named_parameters() if n in names)
    before = _snapshot(model)
    _dpo_step(model, pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2]), zero_lr_names=names)
    changed = _changed(before, model)
    assert changed == set(before) - names
    assert "hf_model.model.query" in changed and f"{beit3}encoder.layers.0.self_attn.q_proj.B.weight" in changed
    assert tiny_model("muffin", word_tokenizer).zero_lr_parameter_names() == []


def test_gradient_checkpointing_gives_the_same_gradients(arch, word_tokenizer):
    plain = tiny_model(arch, word_tokenizer)
    checkpointed = tiny_model(arch, word_tokenizer, gradient_checkpointing=True)
    batch = pair_batch(plain, word_tokenizer, [2, 3], [3, 4, 4, 2])
    for model in (plain, checkpointed):
        model.train()
        sum(x.sum() for x in model.pair_token_logps(batch)).backward()
    assert checkpointed.hf_model.is_activation_checkpointing
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_save_pretrained_then_load_model_gives_identical_logps(arch, word_tokenizer, tmp_path):
    model = tiny_model(arch, word_tokenizer, seed=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "ddpo_model.json").read_text())["arch"] == arch
    reloaded = load_model(tmp_path)
    assert type(reloaded) is type(model) and reloaded.image_placeholder == model.image_placeholder
    assert reloaded.image_transform == model.image_transform
    batch = pair_batch(model, word_tokenizer, [2, 5], [3, 4, 6, 2])
    with torch.no_grad():
        assert torch.equal(torch.cat(model.pair_token_logps(batch)), torch.cat(reloaded.pair_token_logps(batch)))
    # The config path does the same (name_or_path = the saved directory, no tokenizer passed).
    again = build_model(ModelConfig(arch=arch, name_or_path=str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(torch.cat(model.pair_token_logps(batch)), torch.cat(again.pair_token_logps(batch)))


def test_random_init_without_tokenizer_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_model(ModelConfig(arch="llava"))


def test_wrong_arch_for_a_checkpoint_is_an_error(word_tokenizer, tmp_path):
    tiny_model("llava", word_tokenizer).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a 'llava' model"):
        build_model(ModelConfig(arch="muffin", name_or_path=str(tmp_path)))


def test_bfloat16_weights_give_float32_logps(word_tokenizer):
    model = tiny_model("llava", word_tokenizer, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    batch = pair_batch(model, word_tokenizer, [2], [3, 4])
    chosen, rejected = model.pair_token_logps(batch)
    assert chosen.dtype == torch.float32 and torch.isfinite(chosen).all()
