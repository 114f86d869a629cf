"""Sweep launcher: a grid over config keys -> one run directory per point -> one results table and plot.

A grid spec (YAML; experiments/sweeps/ has the paper's ablations):

    base: configs/rlhfv/paper.yaml          # the config every point starts from (paths relative to the cwd)
    output_dir: runs/sweeps/gamma           # one sub-directory per point
    grid:                                   # config key -> values; points = the Cartesian product x seeds
      loss.gamma: [1.0, 2.0, 5.0]
    seeds: [1, 2, 3]                        # train.seed of each point (default: the base config's seed)
    overrides:                              # fixed for every point (optional)
      train.max_steps: 100
    eval_files: [objhal.json, mmhal.json]   # evaluation JSONs a run may hold (`ddpo eval --output <run>/objhal.json`;
                                            # optional, default [results.json]); columns eval/<file stem>/<key>
    plot_metrics: [loss, rewards/accuracies] # what the plot shows (optional; default loss, accuracies + eval)

    python -m ddpo.sweep SPEC                                    run the points here, one after another
    python -m ddpo.sweep SPEC --launcher inline                  the same in this one process (small CPU runs)
    python -m ddpo.sweep SPEC --launcher deepspeed --hostfile H  one `deepspeed --hostfile H` job per point
    python -m ddpo.sweep SPEC --dry-run                          print the commands and run plans only
    python -m ddpo.sweep SPEC --aggregate-only                   rebuild the tables and the plot
    python -m ddpo.sweep SPEC --export-wandb sweep.yaml          the grid as a wandb sweep (`wandb sweep`)

Run it from the repository root (configs name files relative to it). Each point gets
`<output_dir>/<name>/config.yaml`, its fully resolved config with `train.resume: auto`, so launching
again skips finished points (`final/` exists, trained with this config), resumes interrupted ones from their
latest checkpoint and starts the others. A point whose directory holds a run of another config (the spec or
its base changed since) is an error naming the point and the fields, before anything runs, never a skip
(ddpo/run_identity.py; `train.overwrite_output_dir: true` in the overrides moves such runs aside).
Afterwards every point's last metrics.jsonl row and its evaluation JSONs (flattened, prefixed
`eval/<file stem>/`) are gathered into `results.csv` (one row per run), `summary.csv` (mean and standard
deviation over seeds) and `results.md` (both), and `plot.png` draws the metrics against the first grid key.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpo import checkpoint, run_identity
from ddpo.config import Config, ConfigError, load_config, parse_overrides, save_config
from ddpo.plan import nominal_num_pairs, run_plan
from ddpo.trainer import Trainer

SPEC_KEYS = {"base", "output_dir", "grid", "seeds", "overrides", "eval_files", "plot_metrics"}
DEFAULT_PLOT_METRICS = ["loss", "rewards/accuracies"]
TABLE_TRAIN_METRICS = ["step", "loss", "rewards/accuracies", "rewards/margins"]
LAUNCHERS = ("local", "inline", "deepspeed")


@dataclass(frozen=True)
class Point:
    """One run of the grid: its values (config key -> value, train.seed included) and directory."""

    name: str
    values: dict[str, Any]
    run_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"


@dataclass
class SweepSpec:
    base: str
    output_dir: Path
    grid: dict[str, list]
    seeds: list[int] | None
    overrides: dict[str, Any]
    eval_files: list[str]
    plot_metrics: list[str]
    source: str = "<spec>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepSpec:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep spec not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<spec>") -> SweepSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a sweep spec is a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
        unknown = set(data) - SPEC_KEYS
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                f"a sweep spec has {', '.join(sorted(SPEC_KEYS))}"
            )
        for key in ("base", "output_dir", "grid"):
            if key not in data:
                raise ConfigError(f"{source}: '{key}' is required (see ddpo/sweep.py for the format)")
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{source}: 'grid' must map config keys (section.field) to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: grid key '{key}' must have a non-empty list of values, got {values!r}")
            if key == "train.seed":
                raise ConfigError(f"{source}: put seeds under 'seeds', not in the grid")
        eval_files = data.get("eval_files", ["results.json"])
        if not isinstance(eval_files, list) or not all(isinstance(f, str) for f in eval_files):
            raise ConfigError(f"{source}: 'eval_files' must be a list of file names, got {eval_files!r}")
        seeds = data.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds
        ):
            raise ConfigError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
        return cls(
            base=str(data["base"]),
            output_dir=Path(data["output_dir"]),
            grid=dict(grid),
            seeds=seeds,
            overrides=dict(data.get("overrides") or {}),
            eval_files=eval_files,
            plot_metrics=list(data.get("plot_metrics") or DEFAULT_PLOT_METRICS),
            source=source,
        )


# ----------------------------------------------------------------------------------------------
# Points and their resolved configs
# ----------------------------------------------------------------------------------------------
def short_names(keys: list[str]) -> dict[str, str]:
    """'loss.gamma' -> 'gamma' where the field name alone is unambiguous among `keys`."""
    fields = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: f if fields.count(f) == 1 else k for k, f in zip(keys, fields)}


def _format_value(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def expand(spec: SweepSpec) -> list[Point]:
    """Every grid point x seed, in a stable order (grid keys as written, seeds innermost)."""
    keys = list(spec.grid)
    names = short_names(keys + (["train.seed"] if spec.seeds else []))
    points = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for seed in spec.seeds or [None]:
            values = dict(zip(keys, combo))
            if seed is not None:
                values["train.seed"] = seed
            name = "_".join(f"{names[k]}={_format_value(v)}" for k, v in values.items())
            points.append(Point(name, values, spec.output_dir / name))
    return points


def _as_override(value: Any) -> str:
    return "null" if value is None else str(value)


def resolve_point_config(spec: SweepSpec, point: Point):
    """The point's full config: base <- fixed overrides <- grid values, in the point's own directory."""
    overrides: list[str] = []
    for key, value in {**spec.overrides, **point.values}.items():
        overrides += [f"--{key}", _as_override(value)]
    overrides += ["--train.output_dir", str(point.run_dir), "--train.resume", "auto"]
    cfg = load_config(spec.base, overrides)
    if cfg.logging.run_name is None:
        cfg.logging.run_name = f"{spec.output_dir.name}/{point.name}"
    return cfg


def write_configs(spec: SweepSpec, points: list[Point], dry_run: bool = False) -> None:
    """Resolve (and so validate) every point and compare it with the run its directory holds, then write each
    point's config.yaml. A directory holding a run of another config (the spec changed) is an error naming every
    such point before anything is written; with train.overwrite_output_dir true the old run is moved aside
    first (a dry run only says so and leaves the point's directory as it is)."""
    configs = [resolve_point_config(spec, point) for point in points]
    starts = [run_identity.assess(point.run_dir, cfg) for point, cfg in zip(points, configs)]
    refused = [c for c, cfg in zip(starts, configs) if c.conflict and not cfg.train.overwrite_output_dir]
    if refused:
        raise ConfigError(_conflicts_message(spec, refused))
    for point, cfg, start in zip(points, configs, starts):
        if start.conflict:
            if dry_run:
                print(f"{point.name}: {start.conflict}; the run would move it aside (train.overwrite_output_dir)")
                continue
            moved = run_identity.move_aside(point.run_dir)
            print(f"{point.name}: {start.conflict}; moved it aside to {moved} (train.overwrite_output_dir)")
        point.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, point.config_path)


def _conflicts_message(spec: SweepSpec, refused: list[run_identity.RunStart]) -> str:
    return (
        f"{spec.source}: {len(refused)} point(s) of the grid hold a run of another config; nothing was run or "
        "written:\n  " + "\n  ".join(c.conflict for c in refused) + "\nWays on: restore the spec to resume those "
        "runs; set another output_dir in the spec to keep them; or add `train.overwrite_output_dir: true` to its "
        "overrides to move them aside (<point>.replaced-<time>, nothing is deleted) and run them again"
    )


def point_status(run_dir: Path, config: Config | dict | None = None) -> str:
    """'done' (final/ exists), 'resume' (a complete checkpoint exists), 'damaged' (checkpoints, none
    complete: its training run stops with the reason) or 'new'. Given the point's config: 'other config' when
    the directory holds a run recorded under another one, and 'done' only when final/ was trained with this very
    config (a longer train.max_steps continues the run: 'resume')."""
    if config is not None:
        start = run_identity.assess(run_dir, config)
        if start.conflict and start.differences:
            return "other config"
        if start.differences and (run_dir / "final").is_dir():
            return "resume"  # the final/ of a shorter run, which this one continues
    if (run_dir / "final").is_dir():
        return "done"
    try:
        return "resume" if checkpoint.find(run_dir, "auto") is not None else "new"
    except checkpoint.CheckpointError:
        return "damaged"


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------
def command(
    point: Point,
    launcher: str,
    hostfile: str | None = None,
    num_gpus: int | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The command that trains one point (its config already says where to write and to resume)."""
    if launcher in ("local", "inline"):  # inline runs the same training in the sweep's own process
        return [sys.executable, "-m", "ddpo", "train", str(point.config_path)]
    cmd = ["deepspeed"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", "ddpo.train", str(point.config_path)]


def hostfile_slots(hostfile: str) -> int:
    """Total `slots=N` of a DeepSpeed hostfile (lines `host slots=N`, # comments)."""
    total = 0
    for number, line in enumerate(Path(hostfile).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
        if "slots" not in parts or not parts["slots"].isdigit():
            raise ConfigError(f"{hostfile}:{number}: expected 'HOSTNAME slots=N', got '{line}'")
        total += int(parts["slots"])
    if total == 0:
        raise ConfigError(f"{hostfile}: lists no hosts; write one line 'HOSTNAME slots=N' per node")
    return total


def describe_plan(point: Point, world_size: int | None) -> str:
    """The point's run plan (ddpo/plan.py) on the data size its config implies."""
    cfg = load_config(point.config_path)
    pairs = nominal_num_pairs(cfg)
    if pairs is None or world_size is None:
        return "run plan: unknown until the data are loaded" if pairs is None else "run plan: world size unknown"
    return "run plan: " + run_plan(cfg, pairs, world_size).describe()


def write_commands(path: Path, commands: list[list[str]]) -> None:
    lines = [
        "#!/usr/bin/env bash",
        "# Written by ddpo/sweep.py: one training job per grid point (each resumes itself).",
        "set -e",
    ]
    path.write_text("\n".join([*lines, *map(shlex.join, commands)]) + "\n", encoding="utf-8")


def train_inline(point: Point) -> int:
    """Train one point in this process (the `inline` launcher) and return an exit status. It saves the
    interpreter and import start-up of `local` (~4 s a point), which dominates small CPU runs; the runs
    share one process, so it is for single-process CPU sweeps. The project's log lines (and a failure's
    traceback) also go to the point's train.log, as with `local`."""
    log = logging.getLogger("ddpo")
    level = log.level
    handler = logging.FileHandler(point.run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # what `ddpo train` logs, whatever the host process configured
    try:
        Trainer(load_config(point.config_path)).train()
    except Exception:  # like a failed subprocess: report it, go on with the other points
        log.exception("%s failed", point.name)
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()
    return 0


def _written_config(point: Point) -> dict | None:
    """The point's config.yaml as written, unvalidated (a broken value fails inside that point's run only)."""
    try:
        data = yaml.safe_load(point.config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def launch(
    spec: SweepSpec, points: list[Point], cmd_of, dry_run: bool, world_size: int | None, inline: bool = False
) -> list[str]:
    """Run (or, dry, print) each unfinished point in turn; returns the names of points that failed."""
    failed = []
    for i, point in enumerate(points, 1):
        status = point_status(point.run_dir, _written_config(point))
        cmd = cmd_of(point)
        print(f"[{i}/{len(points)}] {point.name}: {status}", flush=True)
        if dry_run:
            print(f"    {shlex.join(cmd)}\n    {describe_plan(point, world_size)}")
            continue
        if status == "done":
            continue
        if inline:
            returncode = train_inline(point)
        else:
            with open(point.run_dir / "train.log", "a", encoding="utf-8") as log:
                returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if returncode != 0:
            print(f"    failed (exit {returncode}); see {point.run_dir / 'train.log'}", flush=True)
            failed.append(point.name)
    return failed


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str) -> dict[str, float]:
    """Numbers of a nested JSON object as {'prefix/a/b': value}; non-numbers are left out."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}/{key}"))
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {prefix: float(data)}
    return {}


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last row of metrics.jsonl (numbers only); {} if the run has logged nothing."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        return {}
    try:
        row = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: last line is not JSON ({e}); the run may have been killed mid-write: delete that line"
        ) from None
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_metrics(run_dir: Path, eval_files: list[str]) -> dict[str, float]:
    """Numbers of each evaluation JSON present in the run directory, as eval/<file stem>/<key path>."""
    metrics = {}
    for name in eval_files:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            metrics.update(_flatten(json.loads(path.read_text(encoding="utf-8")), f"eval/{Path(name).stem}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return metrics


def collect(spec: SweepSpec, points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: run name, its grid values, status, last training metrics, evaluation metrics."""
    rows = []
    for point in points:
        status = point_status(point.run_dir, resolve_point_config(spec, point))
        row: dict[str, Any] = {"run": point.name, **point.values, "status": status}
        row.update(last_metrics(point.run_dir))
        row.update(eval_metrics(point.run_dir, spec.eval_files))
        rows.append(row)
    return rows


def summarize(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of every metric over the seeds of each grid point."""
    keys = list(spec.grid)
    skip = set(keys) | {"run", "status", "train.seed"}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    summary = []
    for combo, members in groups.items():
        out: dict[str, Any] = dict(zip(keys, combo))
        out["runs"] = len(members)
        out["done"] = sum(m["status"] == "done" for m in members)
        metrics = sorted({k for m in members for k in m if k not in skip and isinstance(m[k], float)})
        for metric in metrics:
            values = [m[metric] for m in members if metric in m]
            out[f"{metric} mean"] = statistics.fmean(values)
            out[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(out)
    return summary


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(spec: SweepSpec, path: Path, rows: list[dict], summary: list[dict]) -> None:
    keys = list(spec.grid)
    eval_columns = sorted({k for row in rows for k in row if k.startswith("eval/")})
    metrics = [m for m in TABLE_TRAIN_METRICS if any(m in row for row in rows)] + eval_columns
    run_columns = ["run", *keys, *(["train.seed"] if spec.seeds else []), "status", *metrics]
    summary_rows = [
        {
            **{k: s[k] for k in keys},
            "runs": f"{s['done']}/{s['runs']} done",
            **{m: (f"{s[f'{m} mean']:.4g} ± {s[f'{m} std']:.2g}" if f"{m} mean" in s else "") for m in metrics},
        }
        for s in summary
    ]
    text = [
        f"# Sweep {spec.output_dir.name}",
        "",
        f"Base config `{spec.base}`; grid {json.dumps(spec.grid)}; seeds {spec.seeds}.",
        "Training metrics are each run's last logged step; `eval/<file>/*` come from its "
        + ", ".join(f"`{f}`" for f in spec.eval_files)
        + ".",
        "",
        "## Per grid point (mean ± std over seeds)",
        "",
        markdown_table(summary_rows, [*keys, "runs", *metrics]),
        "",
        "## Per run",
        "",
        markdown_table(rows, run_columns),
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def plot_summary(spec: SweepSpec, summary: list[dict], path: Path) -> Path | None:
    """Each metric against the first grid key, one line per combination of the other keys, error bars =
    std over seeds; None (no file) when no run has logged any of the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_metrics_ = sorted(
        {k[: -len(" mean")] for s in summary for k in s if k.startswith("eval/") and k.endswith(" mean")}
    )
    metrics = [m for m in dict.fromkeys(spec.plot_metrics + eval_metrics_) if any(f"{m} mean" in s for s in summary)]
    if not metrics:
        return None
    x_key, other = list(spec.grid)[0], list(spec.grid)[1:]
    x_values = spec.grid[x_key]
    numeric_x = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values)
    position = {v: (v if numeric_x else i) for i, v in enumerate(x_values)}
    names = short_names(list(spec.grid))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        lines: dict[tuple, list[dict]] = {}
        for s in summary:
            lines.setdefault(tuple(s[k] for k in other), []).append(s)
        for combo, members in lines.items():
            members = sorted((m for m in members if f"{metric} mean" in m), key=lambda m: position[m[x_key]])
            label = ", ".join(f"{names[k]}={v}" for k, v in zip(other, combo)) or None
            ax.errorbar(
                [position[m[x_key]] for m in members],
                [m[f"{metric} mean"] for m in members],
                yerr=[m[f"{metric} std"] for m in members],
                marker="o",
                capsize=3,
                label=label,
            )
        if not numeric_x:
            ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
        ax.set_xlabel(names[x_key])
        ax.set_title(metric)
        if other:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def aggregate(spec: SweepSpec, points: list[Point]) -> dict[str, Path]:
    rows = collect(spec, points)
    summary = summarize(spec, rows)
    out = {
        "csv": spec.output_dir / "results.csv",
        "summary_csv": spec.output_dir / "summary.csv",
        "markdown": spec.output_dir / "results.md",
    }
    write_csv(out["csv"], rows)
    write_csv(out["summary_csv"], summary)
    write_markdown(spec, out["markdown"], rows, summary)
    figure = plot_summary(spec, summary, spec.output_dir / "plot.png")
    if figure is not None:
        out["plot"] = figure
    return out


# ----------------------------------------------------------------------------------------------
# wandb
# ----------------------------------------------------------------------------------------------
def wandb_sweep(spec: SweepSpec, spec_path: str) -> dict:
    """The grid as a wandb sweep: each agent run calls this script back with `--wandb-point`, so it gets
    the same run directory (and skip/resume behaviour) as a local or DeepSpeed launch."""
    parameters = {key: {"values": values} for key, values in spec.grid.items()}
    if spec.seeds:
        parameters["train.seed"] = {"values": spec.seeds}
    return {
        "name": spec.output_dir.name,
        "method": "grid",
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "-m", "ddpo.sweep", spec_path, "--wandb-point", "${args}"],
    }


def point_from_args(spec: SweepSpec, args: list[str]) -> Point:
    """The grid point named by wandb's `--key=value` arguments."""
    given = dict(parse_overrides(args))
    for point in expand(spec):
        if all(_as_override(v) == given.get(k) for k, v in point.values.items()) and len(given) == len(point.values):
            return point
    raise ConfigError(f"{' '.join(args)} is not a point of {spec.source}'s grid")


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo sweep", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="grid spec YAML (see experiments/sweeps/)")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: `python -m ddpo train` per point, in sequence; inline: the same in this process "
        "(no start-up per point; CPU sweeps); deepspeed: a `deepspeed` job per point",
    )
    parser.add_argument("--hostfile", help="DeepSpeed hostfile (lines 'host slots=N') for a multi-node cluster")
    parser.add_argument("--num-gpus", type=int, help="GPUs per node for the deepspeed launcher (default: all)")
    parser.add_argument("--master-port", type=int, help="master port for the deepspeed launcher")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write the configs and commands.sh, print the commands and run plans; run nothing",
    )
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild results.md/csv and plot.png")
    parser.add_argument("--export-wandb", metavar="FILE", help="write the grid as a wandb sweep YAML and exit")
    parser.add_argument(
        "--wandb-point",
        action="store_true",
        help="(used by wandb agents) run the one point given by --key=value arguments",
    )
    args, rest = parser.parse_known_args(argv)
    if rest and not args.wandb_point:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        spec = SweepSpec.load(args.spec)
        points = expand(spec)
        if args.export_wandb:
            Path(args.export_wandb).write_text(
                yaml.safe_dump(wandb_sweep(spec, args.spec), sort_keys=False), encoding="utf-8"
            )
            print(f"wrote {args.export_wandb}: run `wandb sweep {args.export_wandb}` then `wandb agent ID`")
            return 0
        if args.wandb_point:
            points = [point_from_args(spec, rest)]
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        failed: list[str] = []
        if not args.aggregate_only:
            write_configs(spec, points, args.dry_run)
            world = (
                1
                if args.launcher != "deepspeed"
                else (hostfile_slots(args.hostfile) if args.hostfile else args.num_gpus)
            )
            cmd_of = lambda p: command(p, args.launcher, args.hostfile, args.num_gpus, args.master_port)  # noqa: E731
            if not args.wandb_point:
                write_commands(spec.output_dir / "commands.sh", [cmd_of(p) for p in points])
            failed = launch(spec, points, cmd_of, args.dry_run, world, inline=args.launcher == "inline")
            if failed:
                print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
            if args.dry_run or args.wandb_point:
                return 1 if failed else 0
        written = aggregate(spec, expand(spec))
        print("wrote " + ", ".join(str(p) for p in written.values()))
        return 1 if failed else 0
    except (ConfigError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
