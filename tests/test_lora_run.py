"""A LoRA run end to end (model.lora_r > 0, ddpo/export.py): step checkpoints hold the adapters and their
optimizer state but no base, a resume from one is exact, final/ is a PEFT adapter that peft and ddpo open
with the trained policy's log-probs, and `ddpo export --merge` writes them merged into a plain checkpoint.

Two runs of the tiny config: one on a base saved locally first (model.name_or_path set), trained in a fresh
process that also writes the trained policy's per-token log-probs on a fixed batch; one on a random-init
base (name_or_path null, whose base the run keeps in RUN_DIR/base), run straight and split by a resume.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_trainer import THREADS, TINY, _env, metrics, run_ddpo

from ddpo import checkpoint, commands, export
from ddpo.models.build import load_model
from tests.models.helpers import naive_token_logps, pair_batch, tiny_model

LORA = ("--model.lora_r", "4", "--model.lora_alpha", "16")
COMMON = (
    "--train.num_threads",
    THREADS,
    "--logging.progress_bar",
    "false",
    "--data.synthetic_pairs",
    "16",
    "--train.learning_rate",
    "1e-2",  # large, so 4 steps move the adapters far from B = 0
    "--train.max_steps",
    "4",
    "--train.save_total_limit",
    "0",
)

# Trains on a base it saves first, then writes the trained policy's log-probs on the first 3 pairs.
SCRIPT = """
import dataclasses
import sys
from pathlib import Path
import torch
from ddpo.config import load_config
from ddpo.data.formats import load_records
from ddpo.data.tokenizer import build_word_tokenizer
from ddpo.models.build import build_model
from ddpo.trainer import Trainer

out, base_dir, config, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
cfg = load_config(config, args)
records = load_records(cfg.data, seed=cfg.train.seed)
torch.manual_seed(cfg.train.seed)
tokenizer = build_word_tokenizer(t for r in records for t in r.texts())
base = build_model(dataclasses.replace(cfg.model, lora_r=0), tokenizer=tokenizer)
base.save_pretrained(base_dir)
overrides = [*args, "--model.name_or_path", str(base_dir), "--train.output_dir", str(out), "--train.save_steps", "2"]
trainer = Trainer(load_config(config, overrides)).setup()
trainer.train()
model = trainer.model.eval()
batch = trainer.collate([trainer.dataset[i] for i in range(3)])
with torch.no_grad():
    logps = torch.cat(model.pair_token_logps(batch))
fields = ("pixel_values", "input_ids", "attention_mask", "labels")
torch.save(
    {
        **{name: getattr(batch, name) for name in fields},
        "logps": logps,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    },
    out / "policy.pt",
)
"""


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> SimpleNamespace:
    """A 4-step LoRA run (checkpoints at steps 2 and 4) on a base saved to a local directory."""
    root = tmp_path_factory.mktemp("lora")
    out, base = root / "run", root / "base"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(base), TINY, *COMMON, *LORA],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    policy = torch.load(out / "policy.pt", weights_only=True)
    batch = SimpleNamespace(**{k: policy[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")})
    return SimpleNamespace(out=out, base=base, policy=policy, batch=batch)


def _peft_logps(base: Path, adapter: Path, batch) -> torch.Tensor:
    """Per-token log-probs of transformers' LLaVA on `base` with peft's adapter from `adapter` (no ddpo code)."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    hf = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return naive_token_logps(SimpleNamespace(hf_model=hf), batch)


def _ddpo_logps(directory: Path, batch) -> torch.Tensor:
    model = load_model(directory).eval()
    with torch.no_grad():
        return naive_token_logps(model, batch)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# Per-token log-probs (|logp| ~ 5) of one fp32 model computed two ways: ddpo's chunked head over the pair
# layout against the HF model's full forward, with the adapters beside the base (peft) or folded into it
# (W + alpha/r B A rounds differently from the two products). Measured: ~1e-6 both; a few float32 ulps.
SAME_MODEL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_final_is_a_peft_adapter_with_the_trained_log_probs(named_run):
    final = named_run.out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "ddpo_model.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()  # the base is not copied
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(named_run.base)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16)
    assert json.loads((final / "ddpo_model.json").read_text())["template"] == "vicuna_v0"  # configs/tiny.yaml's
    trained, batch = named_run.policy["logps"], named_run.batch
    with_peft = _peft_logps(named_run.base, final, batch)
    print(f"peft vs trained policy: max |diff| {(with_peft - trained).abs().max():.3g}")
    torch.testing.assert_close(with_peft, trained, **SAME_MODEL)
    torch.testing.assert_close(_ddpo_logps(final, batch), trained, **SAME_MODEL)
    # The adapters did train: the base alone is far from the policy (B starts at 0, so they start equal).
    base_alone = _ddpo_logps(named_run.base, batch)
    assert (base_alone - trained).abs().max() > 1e-2


@pytest.mark.slow
def test_step_checkpoints_hold_the_adapters_and_their_optimizer_state_only(named_run):
    ckpt = named_run.out / "checkpoints" / "step-000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["trainable_only"] is True and export.BASE_DIGEST not in state  # the base is model.name_or_path
    saved = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    assert sorted(saved["module"]) == named_run.policy["trainable_names"]
    assert len(saved["optimizer"]["state"]) == len(named_run.policy["trainable_names"])
    # fp32 adapters + AdamW's two moments: 12 bytes per trainable parameter, nothing of the base. The base
    # file holds 4 bytes per parameter of the ~270 k; the 11.8 k adapter parameters of rank 4 make 12 x 11.8 k
    # = 0.14 MB, so the checkpoint (with DeepSpeed's and the RNG's few tens of kB) stays under half the base.
    trainable, base_bytes, ckpt_bytes = named_run.policy["trainable"], _bytes(named_run.base), _bytes(ckpt)
    tensor_bytes = sum(t.numel() * t.element_size() for t in saved["module"].values())
    tensor_bytes += sum(
        t.numel() * t.element_size() for s in saved["optimizer"]["state"].values() for t in s.values() if t.ndim
    )
    print(f"checkpoint {ckpt_bytes} bytes, its tensors {tensor_bytes}; base checkpoint {base_bytes} bytes")
    assert tensor_bytes == 12 * trainable
    assert ckpt_bytes < 0.5 * base_bytes


@pytest.mark.slow
def test_export_merge_writes_a_plain_checkpoint_with_the_trained_log_probs(named_run):
    run_ddpo("export", str(named_run.out), "--merge")
    merged = named_run.out / "final-merged"
    assert not (merged / "adapter_config.json").exists()
    model = load_model(merged)
    assert not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert model.template == "vicuna_v0"
    with torch.no_grad():
        logps = naive_token_logps(model.eval(), named_run.batch)
    print(f"merged vs trained policy: max |diff| {(logps - named_run.policy['logps']).abs().max():.3g}")
    torch.testing.assert_close(logps, named_run.policy["logps"], **SAME_MODEL)


@pytest.mark.slow
def test_export_errors_name_the_problem(named_run, tmp_path, capsys):
    def export_fails(*argv: str) -> str:
        assert commands.main(["export", *argv]) == 1
        return capsys.readouterr().err

    assert "does not exist: the run has not finished" in export_fails(str(tmp_path), "--merge")
    plain = tmp_path / "plain"
    load_model(named_run.base).save_pretrained(plain / "final")  # a full fine-tuning run's final/
    err = export_fails(str(plain), "--merge")
    assert f"{plain / 'final'} holds no adapter_config.json (a plain checkpoint already)" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    assert f"--output {taken} exists" in export_fails(str(named_run.out), "--merge", "--output", str(taken))
    assert "is not a directory" in export_fails(str(tmp_path / "missing"), "--merge")
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        commands.main(["export", str(named_run.out)])
    assert stop.value.code == 2 and "nothing to do: pass --merge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        commands.main(["export", "--help"])
    assert stop.value.code == 0 and "usage: ddpo export" in capsys.readouterr().out


def _straight_and_split(root: Path, *overrides: str) -> SimpleNamespace:
    """LoRA on the tiny random-init base: 4 steps straight, and 4 steps saving at 2, then resumed from step 2
    as if the run had died after that checkpoint (its later metrics rows dropped)."""
    straight, split = root / "straight", root / "split"
    run_ddpo("train", TINY, "--train.output_dir", str(straight), *COMMON, *LORA, *overrides)
    run_ddpo("train", TINY, "--train.output_dir", str(split), *COMMON, *LORA, *overrides, "--train.save_steps", "2")
    first = metrics(split)
    (split / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in first[:2]))
    resume = str(split / "checkpoints" / "step-000002")
    proc = run_ddpo(
        "train", TINY, "--train.output_dir", str(split), *COMMON, *LORA, *overrides, "--train.resume", resume
    )
    assert f"resumed from {resume} at step 2" in proc.stderr
    return SimpleNamespace(straight=straight, split=split)


@pytest.fixture(scope="module")
def random_init_runs(tmp_path_factory) -> SimpleNamespace:
    return _straight_and_split(tmp_path_factory.mktemp("lora-random"))


def _values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("samples_per_s", "tokens_per_s")}


def _assert_same_run(straight: Path, split: Path) -> None:
    """Same metrics (timings aside) and bit-identical final adapters."""
    from safetensors.torch import load_file

    assert [m["step"] for m in metrics(split)] == [1, 2, 3, 4]
    assert [_values(m) for m in metrics(split)] == [_values(m) for m in metrics(straight)]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(split / "final" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 28  # 14 linear layers x (A, B)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapters differ from the uninterrupted run's"


@pytest.mark.slow
def test_lora_resume_is_exact(random_init_runs):
    _assert_same_run(random_init_runs.straight, random_init_runs.split)


@pytest.mark.slow
def test_lora_resume_is_exact_under_zero2(tmp_path):
    """ZeRO-2 (configs/rlaifv/llava15_7b_lora.yaml's): the adapters' fp32 partitions and moments live in the
    optimizer-states file, and DeepSpeed would otherwise save the frozen base's fragments there too."""
    runs = _straight_and_split(tmp_path, "--deepspeed.config", str(Path(TINY).parent / "deepspeed" / "zero2.json"))
    state = json.loads((runs.split / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["trainable_only"] is True
    _assert_same_run(runs.straight, runs.split)


@pytest.mark.slow
def test_a_random_init_base_is_kept_in_the_run_directory(random_init_runs):
    run = random_init_runs.straight
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "base").absolute())
    plain = load_model(run / "base")
    assert not any("lora" in n for n, _ in plain.named_parameters())  # the base alone, no adapters merged in
    model = load_model(run / "final").eval()  # RUN_DIR/base + adapters, frozen as in training
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    ckpt_state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert ckpt_state[export.BASE_DIGEST] == export.base_digest(model)  # the base the adapters trained on
    batch = pair_batch(model, model.tokenizer, [2, 3], [3, 4, 4, 2])
    with torch.no_grad():
        ours = naive_token_logps(model, batch)
    torch.testing.assert_close(_peft_logps(run / "base", run / "final", batch), ours, **SAME_MODEL)


@pytest.mark.slow
def test_resuming_on_another_random_base_is_refused(random_init_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(random_init_runs.split, run)
    state_file = run / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state[export.BASE_DIGEST] = "0" * 64  # as if the checkpoint's base had been another draw
    state_file.write_text(json.dumps(state))
    proc = run_ddpo(
        "train", TINY, "--train.output_dir", str(run), *COMMON, *LORA, "--train.resume", "auto", expect_ok=False
    )
    assert proc.returncode == 1
    assert "adapters were trained on a base with SHA-256 0000000000000000" in proc.stderr
    assert f"kept in {run / 'base'}" in proc.stderr


def test_a_trainable_only_checkpoint_must_match_the_trainable_parameters(word_tokenizer, tmp_path):
    model = tiny_model("llava", word_tokenizer, lora_r=4, lora_alpha=16, lora_dropout=0.0)
    trained = {n: p.detach() + 1 for n, p in model.named_parameters() if p.requires_grad}
    load = checkpoint._trainable_loader(tmp_path / "step-000002")
    load(src=trained, dst=model)  # the frozen base is absent: fine
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)
    lacking = dict(trained)
    name = sorted(lacking)[0]
    del lacking[name]
    with pytest.raises(checkpoint.CheckpointError, match=f"lacks the trained parameter {name} "):
        load(src=lacking, dst=model)
    with pytest.raises(checkpoint.CheckpointError, match="holds extra.weight, which the model has not"):
        load(src={**trained, "extra.weight": torch.zeros(1)}, dst=model)
