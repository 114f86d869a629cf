"""Resume never silently loses work: damaged, incomplete and dangling checkpoints (ddpo/checkpoint.py).

One 4-step run saves step-2 and step-4 (module fixture); each test copies it, damages it the way a
crash, a full disk or a bad copy would, and resumes with `--train.resume auto` to the same 4 steps.
Falling back to step-2 must then give steps 3 and 4 exactly as the undamaged run had them.
"""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import THREADS, TINY, metrics, run_ddpo

from ddpo import checkpoint

COMMON = (
    "--train.num_threads",
    THREADS,
    "--logging.progress_bar",
    "false",
    "--train.learning_rate",
    "1e-3",
    "--data.synthetic_pairs",
    "16",
    "--train.max_steps",
    "4",
    "--train.save_steps",
    "2",
    "--train.save_total_limit",
    "0",
)


def _train(out: Path, *overrides: str, expect_ok: bool = True):
    return run_ddpo("train", TINY, "--train.output_dir", str(out), *COMMON, *overrides, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _train(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    return out


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
    """A copy of the saved run without its export, as a run killed after step 4's checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    shutil.rmtree(out / "final")
    return out


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _resumes_from_step_2(saved_run: Path, out: Path, damaged: str) -> None:
    proc = _train(out, "--train.resume", "auto")
    assert damaged in proc.stderr and "resuming from the newest complete checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in proc.stderr
    # Steps 3 and 4 are re-run, exactly as the undamaged run ran them (timings aside), and logged once.
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [_values(m) for m in metrics(out)] == [_values(m) for m in metrics(saved_run)]


def _values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("samples_per_s", "tokens_per_s")}


@pytest.mark.slow
def test_truncated_weights_in_latest_fall_back_to_the_previous_checkpoint(saved_run, run):
    weights = run / "checkpoints" / "step-000004" / "mp_rank_00_model_states.pt"
    _truncate(weights)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # the killed run's last row, cut mid-write
    _resumes_from_step_2(saved_run, run, f"{weights} is {weights.stat().st_size} bytes but was saved with")


@pytest.mark.slow
def test_truncated_rng_file_falls_back_to_the_previous_checkpoint(saved_run, run):
    rng = run / "checkpoints" / "step-000004" / "rng_rank0.pt"
    _truncate(rng)
    _resumes_from_step_2(saved_run, run, f"{rng} is {rng.stat().st_size} bytes")


@pytest.mark.slow
def test_missing_state_file_falls_back_to_the_previous_checkpoint(saved_run, run):
    (run / "checkpoints" / "step-000004" / "trainer_state.json").unlink()
    _resumes_from_step_2(saved_run, run, "step-000004 has no trainer_state.json")


@pytest.mark.slow
def test_dangling_latest_falls_back_to_the_newest_complete_checkpoint(saved_run, run):
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest").write_text("step-000006")
    _resumes_from_step_2(saved_run, run, "latest names 'step-000006', but")


@pytest.mark.slow
def test_crash_mid_write_resumes_from_the_last_complete_checkpoint(saved_run, run):
    """Killed while writing step 4: its files sit in `.tmp-step-000004`, `latest` still names step-2."""
    root = run / "checkpoints"
    (root / "step-000004").rename(root / ".tmp-step-000004")
    (root / ".tmp-step-000004" / "trainer_state.json").unlink()
    _truncate(root / ".tmp-step-000004" / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("step-000002")
    proc = _train(run, "--train.resume", "auto")
    assert "resuming from the newest complete" not in proc.stderr  # nothing was wrong with `latest`
    assert f"resumed from {root / 'step-000002'} at step 2" in proc.stderr
    assert not (root / ".tmp-step-000004").exists()  # cleaned up by the next save
    assert metrics(run)[-1]["loss"] == metrics(saved_run)[-1]["loss"]


def test_crash_between_rename_and_latest_uses_the_newer_checkpoint(run):
    (run / "checkpoints" / "latest").write_text("step-000002")
    assert checkpoint.find(run, "auto") == run / "checkpoints" / "step-000004"


@pytest.mark.slow
def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(run):
    for step in ("step-000002", "step-000004"):
        (run / "checkpoints" / step / "trainer_state.json").unlink()
    proc = _train(run, "--train.resume", "auto", expect_ok=False)
    assert proc.returncode != 0
    assert (
        "no checkpoint in" in proc.stderr
        and "is complete" in proc.stderr
        and "step-000004 has no trainer_state.json" in proc.stderr
    )
    assert len(metrics(run)) == 4  # nothing trained, nothing logged


@pytest.mark.slow
def test_damaged_file_of_the_right_size_is_an_error_naming_it(run):
    """Corruption the size check cannot see: the load names the file and what to do."""
    weights = run / "checkpoints" / "step-000004" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = b"\0" * 4096
    data[:64] = b"\0" * 64
    weights.write_bytes(bytes(data))
    proc = _train(run, "--train.resume", "auto", expect_ok=False)
    assert proc.returncode != 0
    assert f"{weights}: cannot be read" in proc.stderr and "Delete its checkpoint folder" in proc.stderr


def test_truncated_rng_without_a_file_list_is_named(tmp_path):
    """A checkpoint from before the size list: the damaged RNG file is named, not a bare EOFError."""
    rng = tmp_path / "rng_rank0.pt"
    torch.save(checkpoint.rng_state(), rng)
    _truncate(rng, 0.3)
    with pytest.raises(checkpoint.CheckpointError, match=f"{rng}: cannot be read .*damaged"):
        checkpoint.safe_load(rng)


@pytest.mark.slow
def test_checkpoint_files_load_without_pickle(run):
    """A model-states file holding a Python object other than tensors and plain data is refused: DeepSpeed's
    files go through torch.load(weights_only=True) too."""
    weights = run / "checkpoints" / "step-000004" / "mp_rank_00_model_states.pt"
    state = torch.load(weights, weights_only=True)
    state["client_note"] = argparse.Namespace(note="a pickled object")
    torch.save(state, weights)
    state_file = weights.parent / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text())
    trainer_state["files"][weights.name] = weights.stat().st_size
    state_file.write_text(json.dumps(trainer_state))
    proc = _train(run, "--train.resume", "auto", expect_ok=False)
    assert proc.returncode != 0
    assert f"{weights}: refused by torch.load(weights_only=True): it holds argparse.Namespace" in proc.stderr


def test_explicit_resume_of_an_incomplete_checkpoint_is_refused(run):
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint.*no trainer_state.json"):
        checkpoint.find(run, str(ckpt))


@pytest.mark.slow
def test_zero_checkpoints_resume_exactly_under_weights_only_loading(tmp_path):
    """ZeRO optimizer states hold a few DeepSpeed objects (loss scaler, stage enum, fragment addresses; the
    ZeRO-2 file holds all three, ZeRO-3's a subset): the allow-list lets them load with weights_only=True,
    and the resume is exact."""
    zero = ("--deepspeed.config", str(Path(TINY).parent / "deepspeed" / "zero2.json"))
    out = tmp_path / "run"
    _train(out, *zero)
    straight = metrics(out)
    (out / "metrics.jsonl").write_text("")
    _train(out, *zero, "--train.resume", str(out / "checkpoints" / "step-000002"))
    assert [_values(m) for m in metrics(out)[-2:]] == [_values(m) for m in straight[2:]]


@pytest.mark.slow
def test_resume_with_a_longer_run_replans_the_schedule_with_a_warning(tmp_path):
    """3 steps, then resumed with train.max_steps 6: no step at the old schedule's final rate 0; steps
    4-6 use the 6-step schedule's rates, and the log says the schedule was re-planned."""
    overrides = ("--train.save_steps", "0", "--train.lr_scheduler", "linear", "--train.warmup_ratio", "0")
    straight = tmp_path / "straight"
    _train(straight, *overrides, "--train.max_steps", "6")
    out = tmp_path / "run"
    _train(out, *overrides, "--train.max_steps", "3")
    proc = _train(out, *overrides, "--train.max_steps", "6", "--train.resume", "auto")
    assert "the checkpoint's run planned 3 steps (0 warm-up) and this one plans 6 (0 warm-up)" in proc.stderr
    assert "step 4 uses 0.0005 (the saved run's schedule: 0)" in proc.stderr
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [m["lr"] for m in resumed[:3]] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rel=1e-12)  # the 3-step run
    assert [m["lr"] for m in resumed[3:]] == [m["lr"] for m in metrics(straight)[3:]]
    assert [m["lr"] for m in resumed[3:]] == pytest.approx([1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6], rel=1e-12)
