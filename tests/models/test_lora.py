"""LoRA through peft (`model.lora_r > 0`): what trains, what it starts from, how it saves and reloads."""

import dataclasses

import pytest
import torch

from ddpo.models.base import DDPO_MODEL_FILE
from ddpo.models.build import load_model
from ddpo.models.config import ConfigError
from ddpo.models.lora import lora_target_modules, save_lora_adapters
from tests.models.helpers import naive_token_logps, pair_batch, tiny_model

LORA = dict(lora_r=4, lora_alpha=16, lora_dropout=0.0)


def _dpo_steps(model, batch, steps: int = 2, lr: float = 1e-2) -> None:
    """AdamW steps on a sigmoid DPO loss over the parameters that require grad (as the trainer builds it)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    B = batch.num_pairs
    for _ in range(steps):
        optimizer.zero_grad()
        chosen, rejected = model.pair_token_logps(batch)
        margin = (chosen * batch.answer_mask[:B]).sum(-1) - (rejected * batch.answer_mask[B:]).sum(-1)
        (-torch.nn.functional.logsigmoid(0.1 * margin).mean()).backward()
        optimizer.step()


def _logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(model.pair_token_logps(batch))


def test_adapters_go_on_every_llm_linear_but_the_lm_head(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer, **LORA)
    plain = tiny_model(arch, word_tokenizer)
    targets = lora_target_modules(plain)
    # tiny preset: 2 decoder layers x (q, k, v, o, gate, up, down)
    assert len(targets) == 14 and all(".language_model.layers." in t for t in targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"hf_model.{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}
    assert trainable == expected
    only_qv = lora_target_modules(plain, "q_proj, v_proj")
    assert len(only_qv) == 4 and {t.rsplit(".", 1)[-1] for t in only_qv} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="model.lora_target 'attn' matches no linear layer"):
        lora_target_modules(plain, "attn")


def test_log_probs_before_training_equal_the_base_models(arch, word_tokenizer):
    base = tiny_model(arch, word_tokenizer, seed=3)
    lora = tiny_model(arch, word_tokenizer, seed=3, **LORA)  # same base weights; LoRA's B starts at 0
    batch = pair_batch(base, word_tokenizer, [2, 3], [3, 4, 4, 2])
    expected = naive_token_logps(base, batch).detach()  # the HF model's own full forward, no LoRA
    torch.testing.assert_close(_logps(lora, batch), expected, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_change_after_an_optimizer_step(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer, gradient_checkpointing=True, **LORA)
    batch = pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logps_before = _logps(model, batch)
    model.train()
    _dpo_steps(model, batch, steps=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    # B starts at 0, so A gets no gradient on the first step: only the B matrices move.
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}
    _dpo_steps(model, batch, steps=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}  # now A too, and nothing else
    assert not torch.allclose(_logps(model, batch), logps_before)


def test_merged_save_reloads_as_a_plain_checkpoint_with_the_trained_log_probs(arch, word_tokenizer, tmp_path):
    model = tiny_model(arch, word_tokenizer, **LORA)
    batch = pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2])
    _dpo_steps(model, batch)
    model.eval()
    trained = _logps(model, batch)
    model.save_pretrained(tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged")
    assert not any("lora" in n or "base_layer" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(_logps(reloaded, batch), trained, rtol=1e-4, atol=1e-4)


def test_adapters_alone_round_trip_onto_their_base(word_tokenizer, tmp_path):
    base = tiny_model("llava", word_tokenizer, seed=1)
    base.save_pretrained(tmp_path / "base")
    model = tiny_model("llava", word_tokenizer, seed=1, **LORA)
    batch = pair_batch(model, word_tokenizer, [2, 3], [3, 4, 4, 2])
    _dpo_steps(model, batch)
    model.eval()
    model.image_transform = dataclasses.replace(model.image_transform, mode="crop")  # the base: pad, llava_v1
    save_lora_adapters(model, tmp_path / "adapters", base_model=str(tmp_path / "base"), template="vicuna_v0")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapters" / "model.safetensors").exists()  # the base is not copied
    reloaded = load_model(tmp_path / "adapters").eval()
    assert any(".lora_A." in n for n, _ in reloaded.named_parameters())
    assert (tmp_path / "adapters" / DDPO_MODEL_FILE).is_file()
    # what the adapters were trained with, not the base's
    assert (reloaded.template, reloaded.image_transform.mode) == ("vicuna_v0", "crop")
    torch.testing.assert_close(_logps(reloaded, batch), _logps(model, batch), rtol=1e-5, atol=1e-5)


def test_a_lora_model_can_start_from_another_lora_models_adapters(word_tokenizer, tmp_path):
    """model.name_or_path = a LoRA run's final/ with model.lora_r > 0 (RLAIF-V's next iteration): the first
    adapters are merged into the base, new ones go on top, and the second adapter directory reloads through
    its base's."""
    from ddpo.models.build import build_model
    from ddpo.models.config import ModelConfig

    tiny_model("llava", word_tokenizer, seed=1).save_pretrained(tmp_path / "base")
    first = tiny_model("llava", word_tokenizer, seed=1, **LORA)
    batch = pair_batch(first, word_tokenizer, [2, 3], [3, 4, 4, 2])
    _dpo_steps(first, batch)
    save_lora_adapters(first.eval(), tmp_path / "first", base_model=str(tmp_path / "base"))
    second = build_model(ModelConfig(arch="llava", name_or_path=str(tmp_path / "first"), **LORA)).eval()
    trainable = [n for n, p in second.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all(".lora_" in n and "base_layer.lora" not in n for n in trainable)
    # B starts at 0: the second model starts as the first one's policy (its adapters merged: float rounding)
    torch.testing.assert_close(_logps(second, batch), _logps(first, batch), rtol=1e-5, atol=1e-5)
    _dpo_steps(second.train(), batch)
    trained = _logps(second.eval(), batch)
    assert (trained - _logps(first, batch)).abs().max() > 1e-3
    save_lora_adapters(second, tmp_path / "second", base_model=str(tmp_path / "first"))
    torch.testing.assert_close(_logps(load_model(tmp_path / "second"), batch), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trainer_runs_lora_and_exports_the_adapters(tmp_path):
    """`ddpo train --model.lora_r 4` end to end (fresh process, as users run it)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpo",
            "train",
            "configs/tiny.yaml",
            "--train.output_dir",
            str(out),
            "--train.max_steps",
            "2",
            "--train.num_threads",
            "1",
            "--logging.progress_bar",
            "false",
            "--data.synthetic_pairs",
            "16",
            "--model.lora_r",
            "4",
            "--train.learning_rate",
            "1e-2",
            "--model.gradient_checkpointing",
            "true",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # LoRA's B starts at 0: the first step's policy is the reference, so the DPO loss is exactly log 2.
    assert logged[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert logged[1]["logps/chosen"] != logged[1]["logps/ref_chosen"]  # and the adapters did train
    assert (out / "final" / "adapter_config.json").is_file()  # the adapters alone (tests/test_lora_run.py)
    reloaded = load_model(out / "final")  # on the random-init base the run kept in out/base
    assert sum(".lora_B." in n for n, _ in reloaded.named_parameters()) == 14
