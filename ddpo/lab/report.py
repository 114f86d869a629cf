"""How the lab's numbers are written: the demo's results table and bar plot, and the cells, table heads
and figures the study scripts build their tables and plots from."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

from ddpo.lab.gate import gate_line
from ddpo.lab.stats import mean_std

logger = logging.getLogger("ddpo.lab")


# ------------------------------------------------------------------------------------------------
# cells and tables
# ------------------------------------------------------------------------------------------------
def format_interval(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """A paired difference: 'mean [low, high]', signed."""
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def format_mean_std(mean: float, sd: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' of per-seed values."""
    return format_mean_std(*mean_std(values), digits)


def metric_digits(metric: str) -> int:
    """Rates to 3 decimals, answer lengths (words) to 1."""
    return 1 if metric == "mean_response_words" else 3


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def seed_dots(ax, values: dict[str, list[float]], ylabel: str, color: str = "#4c72b0") -> None:
    """One column per run: a dot per seed and a bar at the mean."""
    for i, vals in enumerate(values.values()):
        ax.scatter([i] * len(vals), vals, s=12, color=color, alpha=0.6)
        ax.plot([i - 0.3, i + 0.3], [statistics.fmean(vals)] * 2, color="black")
    ax.set_xticks(range(len(values)), list(values), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)


# ------------------------------------------------------------------------------------------------
# the demo's results
# ------------------------------------------------------------------------------------------------
def results_table(results: dict) -> str:
    """The demo's results.md: the gate, then per method and decoding the hallucination, recall, length and
    drift figures."""
    s = results["settings"]
    lines = [
        f"Synthetic hallucination benchmark, world {s.get('world_version', 'v1')} (seed {s['seed']}, "
        f"{s['test_images']} test images; {results['pairs']['pairs_used']} preference pairs, "
        f"DDPO gamma {s['ddpo_gamma']})",
        "",
    ]
    if "gate" in results:
        lines += [f"Perception gate (SFT, greedy): {gate_line(results['gate'])}", ""]
    lines += table_head(
        "method",
        "decoding",
        "response hallucination",
        "mention hallucination",
        "companion rate",
        "non-target mentions",
        "object recall",
        "words / answer",
        "drift",
    )
    for decoding, table in (
        ("greedy", results["methods"]),
        (f"T {s.get('sampled_eval_temperature', 0.7)}", results.get("sampled", {})),
    ):
        for method, m in table.items():
            d = results.get("drift", {}).get(method)
            lines.append(
                f"| {method} | {decoding} | {m['response_hallucination_rate']:.3f} | "
                f"{m['mention_hallucination_rate']:.3f} | {m.get('companion_rate', float('nan')):.3f} | "
                f"{m.get('nontarget_mention_rate', float('nan')):.3f} | {m['object_recall']:.3f} | "
                f"{m['mean_response_words']:.1f} | {'' if d is None else f'{d:+.3f}'} |"
            )
    lines += ["", "RLHF-V Table 3's endpoints: % of responses with >= 1 hallucination of each kind (all: any kind)", ""]
    lines += table3_lines(results)
    return "\n".join(lines) + "\n"


# RLHF-V Table 3 (MHumanEval, % of responses with a hallucination of each kind; docs/PAPER_FACTS.md 4.2): the
# endpoint the lab's Table-3 rates mirror. The paper reports no attribute column (attributes are within "all").
PAPER_TABLE3 = {
    "RLHF-V DDPO": {"object": 21.9, "position": 7.5, "number": 14.4, "all": 55.5},
    "RLHF-V vanilla DPO": {"object": 21.9, "position": 11.6, "number": 11.6, "all": 57.5},
}


def table3_lines(results: dict) -> list[str]:
    """RLHF-V Table 3's endpoints per method and decoding: % of responses with at least one hallucination of each
    kind and of any kind, then the mention-level object rate, recall and length (saying less shows there)."""
    from ddpo.data.synthetic.metrics import TABLE3_COLUMNS

    s = results["settings"]
    lines = table_head("method", "decoding", *TABLE3_COLUMNS, "mention hallucination", "object recall", "words")
    for decoding, table in (
        ("greedy", results["methods"]),
        (f"T {s.get('sampled_eval_temperature', 0.7)}", results.get("sampled", {})),
    ):
        for method, m in table.items():
            if f"{TABLE3_COLUMNS[0]}_response_rate" not in m:
                continue  # metrics of an older version of the lab
            rates = " | ".join(f"{100 * m[f'{kind}_response_rate']:.1f}" for kind in TABLE3_COLUMNS)
            lines.append(
                f"| {method} | {decoding} | {rates} | {100 * m['mention_hallucination_rate']:.1f} | "
                f"{m['object_recall']:.3f} | {m['mean_response_words']:.1f} |"
            )
    for name, paper in PAPER_TABLE3.items():
        cells = " | ".join(f"{paper[k]:.1f}" if k in paper else "–" for k in TABLE3_COLUMNS)
        lines.append(f"| {name} (paper) | MHumanEval | {cells} | – | – | – |")
    return lines


def plot_method_bars(results: dict, path: Path) -> Path | None:
    """results.png: one bar per method for response and mention hallucination and object recall (greedy,
    test). Skipped with a warning without matplotlib: the numbers are in results.json/md."""
    try:
        plt = pyplot()
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return None
    methods = list(results["methods"])
    names = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, name in zip(axes, names):
        values = [results["methods"][m][name] for m in methods]
        ax.bar(methods, values, color=["#999999", "#4c72b0", "#dd8452"][: len(methods)])
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 1)
        for i, v in enumerate(values):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    return save_figure(fig, path)
