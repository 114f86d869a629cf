"""Run identity (ddpo/run_identity.py) without training: which fields make a run, what a start in a directory
holding a run decides, moving a run aside, pruning next to an earlier attempt's checkpoints, reference caches
that are never replaced by another, and sweep points that hold another config. The end-to-end runs are in
tests/test_faults.py."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from ddpo import checkpoint, reference, run_identity, sweep
from ddpo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _cfg(out: Path, *overrides: str):
    return load_config(TINY, ["--train.output_dir", str(out), *overrides])


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256): a refused start must leave each byte as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _finished_run(out: Path, *overrides: str, step: int = 8):
    """A directory as a finished run leaves it: run.json + config.yaml, one complete checkpoint, final/."""
    cfg = _cfg(out, *overrides)
    run_identity.record(cfg, run_identity.check(out, cfg))
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "micro_batches_done": step}))
    (out / "checkpoints" / "latest").write_text(ckpt.name)
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_bytes(b"weights")
    return cfg


# ----------------------------------------------------------------------------------------------
# Which fields make a run
# ----------------------------------------------------------------------------------------------
def test_identity_is_what_changes_the_numbers(tmp_path):
    base = _cfg(tmp_path / "a")
    same = _cfg(
        tmp_path / "b",
        *("--train.save_steps", "3", "--train.save_total_limit", "0", "--train.num_threads", "7"),
        *("--train.resume", "auto", "--train.logging_steps", "5", "--logging.wandb", "offline"),
        *(
            "--model.gradient_checkpointing",
            "true",
            "--train.reference",
            "live",
            "--train.overwrite_output_dir",
            "true",
        ),
    )
    assert run_identity.differences(base, same) == ()
    assert run_identity.config_hash(base) == run_identity.config_hash(same)
    other = _cfg(tmp_path / "a", "--loss.gamma", "1", "--train.seed", "3")
    assert [str(d) for d in run_identity.differences(base, other)] == ["loss.gamma 5.0 -> 1.0", "train.seed 42 -> 3"]
    assert run_identity.config_hash(base) != run_identity.config_hash(other)
    for key in ("loss.gamma", "train.max_steps", "data.max_length", "model.preset", "deepspeed.bf16"):
        assert run_identity.is_identity(key), key


def test_a_field_missing_from_an_older_record_compares_as_its_default(tmp_path):
    cfg = _cfg(tmp_path)
    old = cfg.to_dict()
    del old["loss"]["label_smoothing"]  # a field added after the run was recorded
    old["loss"]["retired_field"] = 1  # one removed since: nothing to compare it with
    assert run_identity.differences(old, cfg) == ()
    assert [d.key for d in run_identity.differences(old, _cfg(tmp_path, "--loss.label_smoothing", "0.1"))] == [
        "loss.label_smoothing"
    ]


# ----------------------------------------------------------------------------------------------
# Starting a run in a directory
# ----------------------------------------------------------------------------------------------
def test_a_new_or_unrelated_directory_is_taken_and_its_files_kept(tmp_path):
    assert run_identity.check(tmp_path / "new", _cfg(tmp_path / "new")).differences == ()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = _cfg(out)
    run_identity.record(cfg, run_identity.check(out, cfg))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["config_hash"] == run_identity.config_hash(cfg) and run["config"] == cfg.to_dict()
    assert load_config(out / "config.yaml") == cfg


def test_the_same_config_resumes_and_another_is_refused_naming_fields_and_ways_on(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    before = _snapshot(out)
    assert run_identity.check(out, _cfg(out, "--train.resume", "auto", "--train.save_steps", "2")).conflict is None
    with pytest.raises(run_identity.RunDirectoryError) as info:
        run_identity.check(out, _cfg(out, "--loss.gamma", "1", "--train.resume", "auto"))
    message = str(info.value)
    assert message.startswith(f"{out} holds a run of another config (its run.json): loss.gamma 5.0 -> 1.0.\n")
    for way in ("train.resume auto", "another train.output_dir", "train.overwrite_output_dir true", "replaced-<time>"):
        assert way in message
    assert len(message.splitlines()) == 2
    assert _snapshot(out) == before


def test_a_longer_run_continues_only_when_it_resumes_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    longer = ("--train.max_steps", "16")
    start = run_identity.check(out, _cfg(out, *longer, "--train.resume", "auto"))
    assert [str(d) for d in start.differences] == ["train.max_steps 8 -> 16"] and start.conflict is None
    with pytest.raises(
        run_identity.RunDirectoryError, match="to continue that run to the new length, set train.resume"
    ):
        run_identity.check(out, _cfg(out, *longer))  # train.resume none: a new 16-step run over the 8-step one
    # Resuming a checkpoint of another directory is no continuation of this one.
    elsewhere = tmp_path / "elsewhere"
    _finished_run(elsewhere, step=4)
    with pytest.raises(run_identity.RunDirectoryError, match="train.max_steps 8 -> 16"):
        run_identity.check(out, _cfg(out, *longer, "--train.resume", str(elsewhere / "checkpoints" / "step-000004")))


def test_a_run_that_saved_nothing_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _cfg(out)
    run_identity.record(cfg, run_identity.check(out, cfg))  # then stopped before its first checkpoint
    other = _cfg(out, "--loss.gamma", "1")
    start = run_identity.check(out, other)
    assert start.conflict is None and [d.key for d in start.differences] == ["loss.gamma"]
    with caplog.at_level("INFO", logger="ddpo"):
        run_identity.record(other, start)
    assert "saved nothing" in caplog.text and "loss.gamma 5.0 -> 1.0" in caplog.text
    assert json.loads((out / "run.json").read_text())["config"]["loss"]["gamma"] == 1.0


def test_an_older_run_is_identified_by_its_config_yaml_or_refused(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    (out / "run.json").unlink()  # a run written before run.json
    assert run_identity.check(out, _cfg(out, "--train.resume", "auto")).conflict is None
    with pytest.raises(run_identity.RunDirectoryError, match=r"its config.yaml\): loss.gamma 5.0 -> 1.0"):
        run_identity.check(out, _cfg(out, "--loss.gamma", "1"))
    (out / "config.yaml").unlink()
    with pytest.raises(run_identity.RunDirectoryError) as info:
        run_identity.check(out, _cfg(out))
    assert f"{out} holds a run (checkpoints/, final/) with no record of its config" in str(info.value)
    assert f"restore its config as {out / 'config.yaml'}" in str(info.value)


def test_an_unreadable_record_is_named(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    (out / "run.json").write_text("{cut sh")
    with pytest.raises(run_identity.RunDirectoryError) as info:
        run_identity.check(out, _cfg(out))
    assert str(info.value).startswith(f"{out / 'run.json'} cannot be read (JSONDecodeError")
    assert f"restore {out / 'run.json'}" in str(info.value)


def test_overwrite_moves_the_old_run_aside_whole_and_byte_identical(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    (out / "objhal.json").write_text("{}")  # an evaluation of the old model moves with it
    before = _snapshot(out)
    cfg = _cfg(out, "--loss.gamma", "1", "--train.overwrite_output_dir", "true")
    start = run_identity.check(out, cfg)
    assert start.replace
    run_identity.record(cfg, start)
    (moved,) = tmp_path.glob("run.replaced-*")
    assert _snapshot(moved) == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "run.json"]
    assert json.loads((out / "run.json").read_text())["config"]["loss"]["gamma"] == 1.0
    # A second replacement within the same second gets its own name.
    assert run_identity.move_aside(out) != moved


def test_the_working_directory_is_not_moved_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(run_identity.RunDirectoryError, match="is the working directory"):
        run_identity.move_aside(tmp_path)


# ----------------------------------------------------------------------------------------------
# Pruning next to an earlier attempt's checkpoints
# ----------------------------------------------------------------------------------------------
class _Engine:
    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "model.pt").write_bytes(b"x")


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("keep, left", [(1, ["step-000002"]), (2, ["step-000002"]), (0, None)])
def test_pruning_never_deletes_this_runs_checkpoint_to_keep_an_older_runs(tmp_path, keep, left):
    out = tmp_path / "run"
    for step in (6, 8):  # an earlier attempt, same config, further along
        checkpoint.save(_Engine(), out, step, {"step": step}, keep=0)
    checkpoint.save(_Engine(), out, 2, {"step": 2}, keep=keep)  # this run, restarted from scratch
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert _steps(out) == (left or ["step-000002", "step-000006", "step-000008"])
    checkpoint.save(_Engine(), out, 4, {"step": 4}, keep=1)
    assert _steps(out) == ["step-000004"]


# ----------------------------------------------------------------------------------------------
# Reference caches
# ----------------------------------------------------------------------------------------------
FP = {"model": "aaa", "dataset": "ddd"}
LOGPS = {0: ([-1.0, -2.0], [-3.0])}


def test_a_cache_is_written_over_nothing_or_itself_only(tmp_path):
    cache = reference.write_cache(tmp_path / "cache", FP, LOGPS)
    reference.write_cache(cache, FP, LOGPS)  # the same fingerprint: recomputed in place
    before = _snapshot(cache)
    with pytest.raises(reference.ReferenceCacheError) as info:
        reference.write_cache(cache, {**FP, "dataset": "eee"}, LOGPS)
    assert str(info.value).startswith(f"reference cache {cache} holds the log-probs of another model or data (dataset")
    assert "'ddd' vs now 'eee'" in str(info.value) and "train.reference_cache" in str(info.value)
    assert _snapshot(cache) == before
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(reference.ReferenceCacheError, match=f"{folder} is not a reference cache"):
        reference.write_cache(folder, FP, LOGPS)
    assert (folder / "cat.jpg").read_bytes() == b"jpeg" and len(list(folder.iterdir())) == 1
    (cache / "fingerprint.json").write_text("{")
    with pytest.raises(reference.ReferenceCacheError, match="fingerprint.json cannot be read"):
        reference.read_cache(cache, FP)


# ----------------------------------------------------------------------------------------------
# Sweep points
# ----------------------------------------------------------------------------------------------
def _sweep(tmp_path, **overrides) -> sweep.SweepSpec:
    data = yaml.safe_load((REPO / "experiments" / "sweeps" / "tiny.yaml").read_text())
    data.update(output_dir=str(tmp_path / "sweep"), grid={"loss.gamma": [1.0, 5.0]})
    data["overrides"].update(overrides)
    return sweep.SweepSpec.from_dict(data, "tiny.yaml")


def test_a_point_holding_another_config_is_an_error_not_a_skip(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    first = _sweep(tmp_path)
    points = sweep.expand(first)
    sweep.write_configs(first, points)
    for point in points:
        cfg = load_config(point.config_path)
        run_identity.record(cfg, run_identity.check(point.run_dir, cfg))
        (point.run_dir / "final").mkdir()
        assert sweep.point_status(point.run_dir, cfg) == "done"
    changed = _sweep(tmp_path, **{"train.learning_rate": 1e-3})  # the spec changed after its runs finished
    before = _snapshot(tmp_path / "sweep")
    with pytest.raises(ConfigError) as info:
        sweep.write_configs(changed, points)
    message = str(info.value)
    assert message.startswith("tiny.yaml: 2 point(s) of the grid hold a run of another config")
    assert f"{points[0].run_dir} holds a run of another config (its run.json): train.learning_rate 0.0001 -> 0.001" in (
        message
    )
    assert "train.overwrite_output_dir: true" in message
    assert _snapshot(tmp_path / "sweep") == before  # no config.yaml rewritten
    assert sweep.point_status(points[0].run_dir, sweep.resolve_point_config(changed, points[0])) == "other config"
    # Overwrite: a dry run says so and moves nothing; a real one moves each old run aside.
    replacing = _sweep(tmp_path, **{"train.learning_rate": 1e-3, "train.overwrite_output_dir": True})
    sweep.write_configs(replacing, points, dry_run=True)
    assert _snapshot(tmp_path / "sweep") == before
    sweep.write_configs(replacing, points)
    assert len(list((tmp_path / "sweep").glob("*.replaced-*"))) == 2
    assert sweep.point_status(points[0].run_dir, load_config(points[0].config_path)) == "new"


def test_a_longer_sweep_resumes_its_finished_points(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _sweep(tmp_path)
    point = sweep.expand(spec)[0]
    cfg = sweep.resolve_point_config(spec, point)
    run_identity.record(cfg, run_identity.check(point.run_dir, cfg))
    ckpt = point.run_dir / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 3}')
    (point.run_dir / "final").mkdir()
    assert sweep.point_status(point.run_dir, cfg) == "done"
    longer = sweep.resolve_point_config(_sweep(tmp_path, **{"train.max_steps": 6}), point)
    assert sweep.point_status(point.run_dir, longer) == "resume"  # not 'done': final/ is the 3-step model
