"""What a finished run says about itself: summary.json, summary.md and summary.png in its output directory.

`Trainer.train` calls `write_run_summary` on rank 0 at the end of every run with the rows of metrics.jsonl (the
whole run's, a resumed run's earlier sessions included) and the facts only the trainer knows (`RunFacts`):

    summary.json   steps, epochs, wall time, pairs, tokens/s, the final train row, the final eval row (if any),
                   the model's folder (final/), the config hash of run.json (ddpo/run_identity.py), the plot
    summary.md     the same as a short Markdown report (also printed)
    summary.png    loss, rewards/accuracies and rewards/margins against the optimizer step, train and eval lines

Train rows are the metrics.jsonl rows without `eval/` keys; eval rows (`Trainer.evaluate`) hold `step` and
`eval/<name>` only, so each figure's eval line reads `eval/<name>` where its train line reads `<name>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
SUMMARY_JSON, SUMMARY_MD, SUMMARY_PNG = "summary.json", "summary.md", "summary.png"
# (metric, y-axis label): what each panel of summary.png measured
PLOTTED = (
    ("loss", "preference loss (mean over pairs)"),
    ("rewards/accuracies", "share of pairs with\nchosen reward > rejected reward"),
    ("rewards/margins", "reward margin, chosen - rejected\n(beta x log-ratio to the reference)"),
)
# Shown in summary.md's metric table, in this order, when a row holds them (every key stays in summary.json).
TABLE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/margins_corrected",
    "rewards/margins_unchanged",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class RunFacts:
    """What the trainer knows of the run beyond metrics.jsonl. `wall_time_s` and `tokens_per_s` are this
    session's (a resumed run counts from its resume); `pairs_trained` = optimizer steps x global batch, the whole
    run's; `train_pairs` / `eval_pairs` = the sizes of the training and the held-out sets."""

    steps: int
    epochs: float
    wall_time_s: float
    pairs_trained: int
    train_pairs: int
    eval_pairs: int
    tokens_per_s: float
    model_dir: str


def read_metrics_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON object (cut by a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def is_eval_row(row: dict) -> bool:
    return any(key.startswith(EVAL_PREFIX) for key in row)


def summary_record(
    rows: list[dict], facts: RunFacts, config_hash: str | None = None, plot: str | None = SUMMARY_PNG
) -> dict[str, Any]:
    """summary.json's content: the facts, the last train row and the last eval row (None without one), the
    plot's file name (None when none was drawn)."""
    train = [r for r in rows if not is_eval_row(r)]
    evals = [r for r in rows if is_eval_row(r)]
    return {
        **dataclasses.asdict(facts),
        "config_hash": config_hash,
        "final_train": train[-1] if train else None,
        "final_eval": evals[-1] if evals else None,
        "plot": plot,
    }


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the run in a few lines, then the final train and eval metrics side by side."""
    train, evals = summary["final_train"] or {}, summary["final_eval"] or {}
    lines = [
        "# Run summary",
        "",
        f"- steps: {summary['steps']} ({summary['epochs']:.4g} epochs, {summary['pairs_trained']} pairs trained)",
        f"- pairs: {summary['train_pairs']} train, {summary['eval_pairs']} held out for evaluation",
        f"- wall time: {summary['wall_time_s']:.1f} s, {summary['tokens_per_s']:.1f} tokens/s",
        f"- model: {summary['model_dir']}",
        f"- config hash: {summary['config_hash'] or '—'}",
        f"- plot: {summary['plot'] or '— (matplotlib is not installed: pip install matplotlib)'}",
        "",
        f"| metric | train (step {train.get('step', '—')}) | eval (step {evals.get('step', '—')}) |",
        "|---|---|---|",
    ]
    for name in TABLE_METRICS:
        if name in train or f"{EVAL_PREFIX}{name}" in evals:
            lines.append(f"| {name} | {_number(train.get(name))} | {_number(evals.get(EVAL_PREFIX + name))} |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a finite number under `key`."""
    points = [
        (r["step"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(rows: list[dict], path: str | Path) -> Path:
    """summary.png: one panel per PLOTTED metric against the optimizer step, the train line and the eval line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    train = [r for r in rows if not is_eval_row(r)]
    evals = [r for r in rows if is_eval_row(r)]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.8 * len(PLOTTED), 3.6), squeeze=False)
    for ax, (name, label) in zip(axes[0], PLOTTED):
        for source, key, style in ((train, name, "-"), (evals, EVAL_PREFIX + name, "o--")):
            steps, values = _series(source, key)
            if steps:
                ax.plot(steps, values, style, label=key, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_config_hash(output_dir: str | Path) -> str | None:
    """The config hash run.json records (ddpo/run_identity.py); None where there is no readable one."""
    try:
        run = json.loads((Path(output_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = run.get("config_hash") if isinstance(run, dict) else None
    return value if isinstance(value, str) else None


def write_run_summary(rows: list[dict], facts: RunFacts, output_dir: str | Path) -> dict[str, Any]:
    """Write summary.json, summary.md and summary.png into `output_dir`; returns summary.json's content."""
    output_dir = Path(output_dir)
    plot: str | None = SUMMARY_PNG
    try:
        plot_run(rows, output_dir / SUMMARY_PNG)
    except ImportError as e:  # matplotlib is an extra (setup.py): a run without it still ends with its summary
        logger.warning("no %s: %s (pip install matplotlib)", SUMMARY_PNG, e)
        plot = None
    summary = summary_record(rows, facts, run_config_hash(output_dir), plot)
    (output_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output_dir / SUMMARY_MD).write_text(summary_markdown(summary), encoding="utf-8")
    return summary
