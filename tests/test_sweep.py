"""Sweep launcher (ddpo/sweep.py): grid -> run directories -> commands -> one table and plot."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpo import sweep
from ddpo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path, **changes) -> sweep.SweepSpec:
    data = yaml.safe_load((REPO / "experiments" / "sweeps" / "tiny.yaml").read_text())
    data.update(output_dir=str(tmp_path / "sweep"), **changes)
    return sweep.SweepSpec.from_dict(data, "tiny.yaml")


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    return env


def test_grid_expands_to_named_points_with_seeds_innermost(tmp_path):
    spec = _spec(tmp_path, seeds=[0, 1])
    points = sweep.expand(spec)
    assert [p.name for p in points] == [
        "gamma=1.0_normalize=mean_seed=0",
        "gamma=1.0_normalize=mean_seed=1",
        "gamma=1.0_normalize=sum_seed=0",
        "gamma=1.0_normalize=sum_seed=1",
        "gamma=5.0_normalize=mean_seed=0",
        "gamma=5.0_normalize=mean_seed=1",
        "gamma=5.0_normalize=sum_seed=0",
        "gamma=5.0_normalize=sum_seed=1",
    ]
    assert points[5].values == {"loss.gamma": 5.0, "loss.normalize": "mean", "train.seed": 1}
    assert points[5].run_dir == tmp_path / "sweep" / points[5].name
    # Field names that collide across sections keep their section.
    assert sweep.short_names(["loss.beta", "train.adam_beta1", "model.lora_r"]) == {
        "loss.beta": "beta",
        "train.adam_beta1": "adam_beta1",
        "model.lora_r": "lora_r",
    }
    assert sweep.short_names(["a.seed", "b.seed"]) == {"a.seed": "a.seed", "b.seed": "b.seed"}


def test_resolved_config_is_base_then_overrides_then_point(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _spec(tmp_path, overrides={"train.max_steps": 3, "loss.gamma": 2.0, "train.learning_rate": "5e-7"})
    point = sweep.expand(spec)[3]  # gamma 5, sum, seed 0
    cfg = sweep.resolve_point_config(spec, point)
    base = load_config(REPO / "configs" / "tiny.yaml")
    assert (cfg.loss.gamma, cfg.loss.normalize, cfg.train.seed) == (5.0, "sum", 0)  # the grid wins over overrides
    assert cfg.train.max_steps == 3 and cfg.train.learning_rate == 5e-7
    assert cfg.loss.beta == base.loss.beta and cfg.model == base.model  # the rest is the base config
    assert cfg.train.output_dir == str(point.run_dir) and cfg.train.resume == "auto"
    assert cfg.logging.run_name == "sweep/gamma=5.0_normalize=sum_seed=0"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": {"loss.gamma": []}}, "grid key 'loss.gamma' must have a non-empty list"),
        ({"grid": {"train.seed": [1, 2]}}, "put seeds under 'seeds'"),
        ({"seeds": [1.5]}, "'seeds' must be a non-empty list of integers"),
        ({"epochs": 3}, "unknown key(s) epochs"),
    ],
)
def test_bad_specs_name_the_file_and_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as info:
        _spec(tmp_path, **change)
    assert message in str(info.value) and "tiny.yaml" in str(info.value)


def test_a_bad_grid_value_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _spec(tmp_path, grid={"loss.gamma": [5.0, 0.5]})
    with pytest.raises(ConfigError, match="loss.gamma must be >= 1"):
        sweep.write_configs(spec, sweep.expand(spec))
    assert not (tmp_path / "sweep" / "gamma=5.0_seed=0").exists()


def test_point_status_done_resume_new(tmp_path):
    run = tmp_path / "run"
    assert sweep.point_status(run) == "new"
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-000002")
    assert sweep.point_status(run) == "damaged"  # no trainer_state.json: an incomplete checkpoint, the only one
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    assert sweep.point_status(run) == "resume"
    (run / "final").mkdir()
    assert sweep.point_status(run) == "done"


def test_deepspeed_dry_run_writes_configs_and_hostfile_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "base": "configs/tiny.yaml",
                "output_dir": str(tmp_path / "sweep"),
                "grid": {"loss.gamma": [1.0, 5.0]},
                "seeds": [3],
            }
        )
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    assert sweep.hostfile_slots(str(hostfile)) == 16
    assert sweep.main([str(spec_file), "--launcher", "deepspeed", "--hostfile", str(hostfile), "--dry-run"]) == 0
    out = capsys.readouterr().out
    configs = [tmp_path / "sweep" / name / "config.yaml" for name in ("gamma=1.0_seed=3", "gamma=5.0_seed=3")]
    expected = [f"deepspeed --hostfile {hostfile} --module ddpo.train {c}" for c in configs]
    assert (tmp_path / "sweep" / "commands.sh").read_text().splitlines()[3:] == expected
    assert all(line in out for line in expected)
    # 64 synthetic pairs over 16 processes x 4 pairs: one step per epoch.
    assert "global batch 64; 1 steps/epoch, 8 steps" in out
    assert load_config(configs[1]).loss.gamma == 5.0
    assert not (configs[0].parent / "metrics.jsonl").exists()  # nothing ran


def test_aggregation_takes_the_last_metrics_row_and_the_eval_json(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _spec(tmp_path, seeds=[0, 1], grid={"loss.gamma": [1.0, 5.0]})
    points = sweep.expand(spec)
    losses = {0: (0.7, 0.5), 1: (0.7, 0.3), 2: (0.6, 0.2), 3: (0.6, 0.4)}  # point -> (first, last) loss
    for i, point in enumerate(points):
        point.run_dir.mkdir(parents=True)
        rows = [{"step": 1, "loss": losses[i][0], "lr": 1e-4}, {"step": 2, "loss": losses[i][1], "lr": 5e-5}]
        (point.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (point.run_dir / "final").mkdir()
    (points[3].run_dir / "results.json").write_text(json.dumps({"objhal": {"chair_s": 12.5, "model": "x"}, "n": 300}))
    written = sweep.aggregate(spec, points)
    rows = list(csv.DictReader(open(written["csv"])))
    assert [float(r["loss"]) for r in rows] == [0.5, 0.3, 0.2, 0.4]
    assert (
        rows[3]["eval/results/objhal/chair_s"] == "12.5"
        and rows[3]["eval/results/n"] == "300.0"
        and rows[0]["eval/results/n"] == ""
    )
    summary = list(csv.DictReader(open(written["summary_csv"])))
    assert [float(s["loss mean"]) for s in summary] == pytest.approx([0.4, 0.3])
    assert [float(s["loss std"]) for s in summary] == pytest.approx([0.1414214, 0.1414214])  # sample std of 2 values
    assert float(summary[1]["eval/results/objhal/chair_s mean"]) == 12.5
    markdown = written["markdown"].read_text()
    assert "| 1 | 2/2 done | 2 ± 0 | 0.4 ± 0.14 |" in markdown
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_export_and_point_lookup(tmp_path):
    spec = _spec(tmp_path)
    exported = sweep.wandb_sweep(spec, "experiments/sweeps/tiny.yaml")
    assert exported["method"] == "grid"
    assert exported["parameters"] == {
        "loss.gamma": {"values": [1.0, 5.0]},
        "loss.normalize": {"values": ["mean", "sum"]},
        "train.seed": {"values": [0]},
    }
    assert exported["command"][2:] == ["-m", "ddpo.sweep", "experiments/sweeps/tiny.yaml", "--wandb-point", "${args}"]
    # wandb passes the point as --key=value
    point = sweep.point_from_args(spec, ["--loss.gamma=5.0", "--loss.normalize=sum", "--train.seed=0"])
    assert point.name == "gamma=5.0_normalize=sum_seed=0"
    with pytest.raises(ConfigError, match="is not a point of tiny.yaml's grid"):
        sweep.point_from_args(spec, ["--loss.gamma=2.0", "--loss.normalize=sum", "--train.seed=0"])


@pytest.mark.slow
def test_four_tiny_points_run_locally_from_one_command(tmp_path):
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "tiny.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "sweep")
    spec["overrides"].update({"train.max_steps": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = subprocess.run(
        [sys.executable, "-m", "ddpo.sweep", str(tmp_path / "spec.yaml")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = tmp_path / "sweep"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["loss.gamma"], r["loss.normalize"], r["status"], r["step"]) for r in rows] == [
        ("1.0", "mean", "done", "2.0"),
        ("1.0", "sum", "done", "2.0"),
        ("5.0", "mean", "done", "2.0"),
        ("5.0", "sum", "done", "2.0"),
    ]
    for row in rows:  # the table holds each run's own last logged loss
        last = json.loads((out / row["run"] / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["loss"]) == pytest.approx(last["loss"])
        assert (out / row["run"] / "final" / "config.json").is_file()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text().count("| done |") == 4
    # Launching again skips every finished point without starting a process.
    logs = {r["run"]: (out / r["run"] / "train.log").read_text() for r in rows}
    again = subprocess.run(
        [sys.executable, "-m", "ddpo.sweep", str(tmp_path / "spec.yaml")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and again.stdout.count(": done") == 4
    assert logs == {r["run"]: (out / r["run"] / "train.log").read_text() for r in rows}


@pytest.mark.slow
def test_inline_launcher_trains_bit_for_bit_like_a_local_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "tiny.yaml").read_text())
    spec["grid"] = {"loss.gamma": [5.0]}
    spec["overrides"].update({"train.max_steps": 2, "loss.normalize": "mean"})
    losses = {}
    for launcher in ("local", "inline"):
        spec["output_dir"] = str(tmp_path / launcher)
        (tmp_path / f"{launcher}.yaml").write_text(yaml.safe_dump(spec))
        if launcher == "local":
            run = subprocess.run(
                [sys.executable, "-m", "ddpo.sweep", str(tmp_path / "local.yaml")],
                cwd=REPO,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        else:
            assert sweep.main([str(tmp_path / "inline.yaml"), "--launcher", "inline"]) == 0
        rows = [
            json.loads(line)
            for line in (tmp_path / launcher / "gamma=5.0_seed=0" / "metrics.jsonl").read_text().splitlines()
        ]
        losses[launcher] = [(r["step"], r["loss"], r["grad_norm"], r["rewards/margins"]) for r in rows]
    assert len(losses["inline"]) == 2 and losses["inline"] == losses["local"]
    assert "run plan: 16 pairs" in (tmp_path / "inline" / "gamma=5.0_seed=0" / "train.log").read_text()


def test_an_inline_point_that_fails_is_logged_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _spec(tmp_path, grid={"loss.gamma": [1.0, 5.0]})
    points = sweep.expand(spec)
    sweep.write_configs(spec, points)
    (points[0].config_path).write_text("loss: {gamma: -1}\n")  # broken after validation: fails inside the run
    trained = []
    monkeypatch.setattr(
        sweep, "Trainer", lambda cfg: type("T", (), {"train": lambda self: trained.append(cfg.loss.gamma)})()
    )
    assert sweep.launch(spec, points, lambda p: sweep.command(p, "inline"), False, 1, inline=True) == [points[0].name]
    assert trained == [5.0]
    assert "gamma=1.0_seed=0 failed" in (points[0].run_dir / "train.log").read_text()
    assert "gamma" in (points[0].run_dir / "train.log").read_text().split("failed", 1)[1]  # the error's message


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_specs_resolve_every_point(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sweep.SweepSpec.load(path)
    points = sweep.expand(spec)
    assert len(points) == math.prod(len(v) for v in spec.grid.values()) * len(spec.seeds or [None])
    for point in points:
        cfg = sweep.resolve_point_config(spec, point)
        for key, value in point.values.items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value, (point.name, key)
