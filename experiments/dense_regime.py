"""Where does dense weighting act? DDPO vs DPO over answer length and normalisation, on the v2 world.

    # every (seed, length) point: its SFT model, on-policy pairs, the runs of the chosen parts, eval
    python experiments/dense_regime.py run --seeds 0 1 3 4 5 --lengths 120 15 55 \
        --parts primary matched --reuse-middle runs/synthetic_v2     # then: sum sumtuned / gamma rescaled / segments
    # tables and plots from the finished points (or, without run directories, from the committed json)
    python experiments/dense_regime.py aggregate

Design (pre-registered in experiments/results/dense_regime/README.md before any test number was read):
  per (seed, length)   one SFT model (ddpo/lab/regime.py). The 55-word one is the v2 lab's
                       (experiments/synthetic_v2.py; `--reuse-middle` links its SFT model, pairs and
                       identical runs instead of retraining them); the 15- and 120-word ones continue its
                       supervised fine-tuning on captions of that length (its perception kept), and must
                       pass the same perception gate. Pairs are on-policy: the model's own sampled answers,
                       minimally corrected by the oracle (the lab's sample and annotate stages).
  per run              one `ddpo train` from that SFT model on those pairs, through the sweep launcher,
                       evaluated greedily on the seed's validation and test images.
Runs (parts; ddpo/lab/recipes.py REGIME_RUNS): every lr is the v2 lab's validation choice at 55 words.
    primary   dpo_mean, ddpo_mean_g5            Eq. 5 weighted mean at fixed beta 0.5 (the paper's regime)
    matched   dpo_mean_lr1e-05                  DPO's drift ladder: gammas are compared at matched drift too
    gamma     ddpo_mean_g2, ddpo_mean_g10
    sum       dpo_sum, ddpo_sum_g5, dpo_sum_lr1e-05   the released code's weighted sum, beta 0.5
    rescaled  dpo_rescaled, ddpo_rescaled_g5    the mean with beta = 0.5 x the point's mean answer tokens:
                                                the sum's step size for DPO, but gamma no longer enlarges it
    sumtuned  ddpo_sum_g5_lr3e-05, dpo_sum_lr3e-05   DDPO-sum at its own validation lr (55 words), DPO's ladder
                                                extended to it; compared at matched drift
    segments  (55 words) SEGMENT_RUNS on pairs with one corrected segment and on pairs with two or more
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ddpo.lab.evaluation import CLAIM_ERRORS
from ddpo.lab.gate import GateError
from ddpo.lab.recipes import REGIME_PARTS
from ddpo.lab.regime import MIDDLE, SEGMENT_PAIRS, SEGMENT_SUBSETS, collect_points, run_point
from ddpo.lab.report import format_interval, mean_sd, pyplot, save_figure, table_head
from ddpo.lab.selection import PRIMARY
from ddpo.lab.stats import holm, interval, matched_drift_gaps, paired_differences, paired_gaps, weighted_share

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "dense_regime"
PRIMARY_LENGTH = 120  # the pre-registered endpoint: ddpo_mean_g5 - dpo_mean at the longest answers
# DDPO run -> the DPO run it is compared with at equal lr (same normalisation and pairs)
GAPS = {
    "ddpo_mean_g5": "dpo_mean",
    "ddpo_mean_g2": "dpo_mean",
    "ddpo_mean_g10": "dpo_mean",
    "ddpo_sum_g5": "dpo_sum",
    "ddpo_rescaled_g5": "dpo_rescaled",
    **{f"ddpo_mean_g5_seg{k}": f"dpo_mean_seg{k}" for k in SEGMENT_SUBSETS},
}
# DDPO run -> DPO's lr ladder (same normalisation and pairs) for the matched-drift read
MEAN_LADDER, SUM_LADDER = ("dpo_mean", "dpo_mean_lr1e-05"), ("dpo_sum", "dpo_sum_lr1e-05", "dpo_sum_lr3e-05")
MATCHED = {
    "ddpo_mean_g2": MEAN_LADDER,
    "ddpo_mean_g5": MEAN_LADDER,
    "ddpo_mean_g10": MEAN_LADDER,
    "ddpo_sum_g5": SUM_LADDER,
    "ddpo_sum_g5_lr3e-05": SUM_LADDER,
    **{f"ddpo_sum_g5_lr3e-05_seg{k}": (f"dpo_sum_lr1e-05_seg{k}", f"dpo_sum_lr3e-05_seg{k}") for k in SEGMENT_SUBSETS},
}
REPORTED = (PRIMARY, "response_hallucination_rate", "companion_rate", "object_recall", *CLAIM_ERRORS)


def gaps(point: dict, split: str) -> dict:
    """DDPO - DPO per seed (same normalisation, same lr) for every metric: {run: {metric: (mean, lo, hi, p)}}."""
    return paired_gaps(point[split], GAPS)


def matched(point: dict) -> dict:
    """DDPO - DPO with DPO read at DDPO's drift (piecewise linear over DPO's lr ladder, per seed)."""
    return matched_drift_gaps(point["test"], point["drift"], MATCHED, (PRIMARY, "object_recall"))


def axis_lines(table: dict) -> list[str]:
    """The answer-length axis as measured: answer words, pairs, corrected share, gate per point."""
    lines = table_head(
        "target words",
        "seeds",
        "SFT answer words (test)",
        "rejected words (pairs)",
        "pairs",
        "segments / pair",
        "corrected words",
        "weight on corrected, gamma 5",
        "gate: single-object / recall w/o anchor / companion",
    )
    for length, p in table.items():
        share = statistics.fmean(x["corrected_word_share"] for x in p["pairs"])
        gate = " / ".join(
            mean_sd([g[k] for g in p["gate"] if g])
            for k in ("single_object_accuracy", "recall_without_anchor", "companion_rate")
        )
        lines.append(
            f"| {length} | {len(p['seeds'])} | {mean_sd(p['test']['sft']['mean_response_words'], 1)} | "
            f"{mean_sd([x['rejected_words'] for x in p['pairs']], 1)} | "
            f"{statistics.fmean(x['pairs_used'] for x in p['pairs']):.0f} | "
            f"{mean_sd([x['segments_per_pair'] for x in p['pairs']], 2)} | {share:.1%} | "
            f"{weighted_share(share, 5):.1%} | {gate} |"
        )
    return lines


def family(all_gaps: dict, all_matched: dict) -> dict[str, float]:
    """Every secondary DDPO - DPO comparison of the map (equal lr and matched drift) -> its unadjusted p."""
    primary = (str(PRIMARY_LENGTH), "ddpo_mean_g5")
    out = {
        f"{length} words: {r} - {GAPS[r]}": g[PRIMARY][3]
        for length, rows in all_gaps.items()
        for r, g in rows.items()
        if (length, r) != primary
    }
    out.update(
        {
            f"{length} words: {r} at matched drift": row[PRIMARY][3]
            for length, rows in all_matched.items()
            for r, row in rows.items()
        }
    )
    return out


def map_lines(all_gaps: dict, all_matched: dict, adjusted: dict) -> list[str]:
    lines = ["", "## The map: DDPO - DPO at equal lr", ""]
    lines += table_head(
        "target words",
        "comparison",
        "mention hall.",
        "p (Holm)",
        "companion rate",
        "recall",
        "attribute err",
        "position err",
        "count err",
    )
    for length, rows in all_gaps.items():
        for r, g in rows.items():
            label = f"{length} words: {r} - {GAPS[r]}"
            is_primary = (length, r) == (str(PRIMARY_LENGTH), "ddpo_mean_g5")
            p = f"{g[PRIMARY][3]:.3f} (primary)" if is_primary else f"{adjusted[label]:.3f}"
            cells = [
                format_interval(*g[k][:3]) for k in (PRIMARY, "companion_rate", "object_recall", *CLAIM_ERRORS[:3])
            ]
            lines.append(f"| {length} | {r} - {GAPS[r]} | {cells[0]} | {p} | " + " | ".join(cells[1:]) + " |")
    lines += [
        "",
        "## At matched drift: DDPO minus DPO read at DDPO's drift (DPO's lr ladder: mean 3e-6, 1e-5; sum 3e-6, "
        "1e-5, 3e-5; piecewise linear per seed, extrapolated beyond the ladder where counted)",
        "",
        *table_head(
            "target words",
            "run",
            "drift (DDPO)",
            "DPO ladder drift",
            "mention hall.",
            "p (Holm)",
            "recall",
            "extrapolated seeds",
        ),
    ]
    for length, rows in all_matched.items():
        for r, row in rows.items():
            lines.append(
                f"| {length} | {r} | {row['drift']:+.3f} | {', '.join(f'{d:+.3f}' for d in row['dpo_drift'])} | "
                f"{format_interval(*row[PRIMARY][:3])} | {adjusted[f'{length} words: {r} at matched drift']:.3f} | "
                f"{format_interval(*row['object_recall'][:3])} | {row['extrapolated']} |"
            )
    return lines


def run_lines(table: dict) -> list[str]:
    """Validation gaps, then every run's test metrics per length."""
    lines = ["", "## Validation: DDPO - DPO at equal lr", ""]
    lines += table_head("target words", "comparison", "mention hall.", "recall")
    for length, p in table.items():
        for r, g in gaps(p, "validation").items():
            lines.append(
                f"| {length} | {r} - {GAPS[r]} | {format_interval(*g[PRIMARY][:3])} | "
                f"{format_interval(*g['object_recall'][:3])} |"
            )
    lines += ["", "## Every run (test, greedy): mean ± std over seeds", ""]
    for length, p in table.items():
        words = statistics.fmean(p["test"]["sft"]["mean_response_words"])
        lines += [f"### {length} target words ({words:.1f} measured; seeds {p['seeds']})", ""]
        lines += table_head("run", "mention hall.", "response hall.", "companion rate", "recall", "words", "drift")
        for r, m in p["test"].items():
            lines.append(
                f"| {r} | {mean_sd(m[PRIMARY])} | {mean_sd(m['response_hallucination_rate'])} | "
                f"{mean_sd(m['companion_rate'])} | {mean_sd(m['object_recall'])} | "
                f"{mean_sd(m['mean_response_words'], 1)} | {statistics.fmean(p['drift'][r]):+.3f} |"
            )
        lines.append("")
    return lines


def report(table: dict, command: str) -> str:
    all_gaps = {length: gaps(p, "test") for length, p in table.items()}
    all_matched = {length: matched(p) for length, p in table.items()}
    adjusted = holm(family(all_gaps, all_matched))
    lines = [
        "# Dense-regime map on the v2 world: results",
        "",
        f"Command: `{command}`",
        "",
        "Test split, greedy; mention-level object hallucination unless named. Differences are paired by seed: mean "
        "[95% t-interval]; p: paired t-test, Holm-adjusted over every secondary DDPO - DPO comparison of the map, at "
        "equal lr and at matched drift (the pre-registered primary, 120 words ddpo_mean_g5 - dpo_mean, unadjusted).",
        "",
        "## The axis, as measured",
        "",
        *axis_lines(table),
        *map_lines(all_gaps, all_matched, adjusted),
        *segment_lines(table, all_matched.get(str(MIDDLE), {})),
        *run_lines(table),
    ]
    return "\n".join(lines) + "\n"


def segment_lines(table: dict, drift: dict) -> list[str]:
    """Corrected segments per pair, controlled by selection: DDPO - DPO on one-segment pairs, on
    several-segment pairs, and the difference of the two gaps (several - one), per seed. `drift`: the
    middle point's `matched` rows."""
    point = table.get(str(MIDDLE))
    if not point or not point.get("segment_pairs") or "ddpo_mean_g5_segmulti" not in point["test"]:
        return []
    stats = {
        k: (
            statistics.fmean(s[k]["segments_per_pair"] for s in point["segment_pairs"]),
            statistics.fmean(s[k]["corrected_word_share"] for s in point["segment_pairs"]),
        )
        for k in SEGMENT_SUBSETS
    }
    lines = [
        "",
        f"## Corrected segments per pair, controlled by selection ({MIDDLE}-word target, {SEGMENT_PAIRS} pairs "
        "per subset)",
        "",
        "Subsets (mean over seeds): "
        + "; ".join(
            f"{k}: {seg:.2f} segments per pair, {share:.1%} of rejected words corrected"
            for k, (seg, share) in stats.items()
        ),
        "",
        *table_head("comparison", "one segment", "two or more", "several - one"),
    ]
    test = point["test"]
    rows = {
        "mean, equal lr: ddpo_mean_g5 - dpo_mean": {
            k: paired_differences(test[f"ddpo_mean_g5_seg{k}"][PRIMARY], test[f"dpo_mean_seg{k}"][PRIMARY])
            for k in SEGMENT_SUBSETS
            if f"ddpo_mean_g5_seg{k}" in test and f"dpo_mean_seg{k}" in test
        },
        "sum at matched drift: ddpo_sum_g5_lr3e-05 - DPO": {
            k: drift[f"ddpo_sum_g5_lr3e-05_seg{k}"]["per_seed"]
            for k in SEGMENT_SUBSETS
            if f"ddpo_sum_g5_lr3e-05_seg{k}" in drift
        },
    }
    for label, per_subset in rows.items():
        if len(per_subset) == 2:
            contrast = paired_differences(per_subset["multi"], per_subset["one"])
            cells = [format_interval(*interval(d)) for d in (per_subset["one"], per_subset["multi"], contrast)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(table: dict, path: Path) -> None:
    """DDPO - DPO against measured answer length: at equal lr, and at matched drift."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    points = sorted(table.items(), key=lambda kv: statistics.fmean(kv[1]["test"]["sft"]["mean_response_words"]))
    words = [statistics.fmean(p["test"]["sft"]["mean_response_words"]) for _, p in points]
    panels = (
        ("equal lr", [gaps(p, "test") for _, p in points], [r for r in GAPS if "_seg" not in r]),
        ("matched drift", [matched(p) for _, p in points], [r for r in MATCHED if "_seg" not in r]),
    )
    colors = {r: f"C{k}" for k, r in enumerate(dict.fromkeys([*panels[0][2], *panels[1][2]]))}  # one colour per run
    for ax, (title, rows, runs) in zip(axes, panels):
        for k, r in enumerate(runs):
            xs, ys, err = [], [], [[], []]
            for x, row in zip(words, rows):
                if r in row:
                    m, lo, hi, _ = row[r][PRIMARY]
                    xs.append(x + 0.6 * (k - len(runs) / 2))
                    ys.append(m), err[0].append(m - lo), err[1].append(hi - m)
            if xs:
                label = r if title == "matched drift" else f"{r} - {GAPS[r]}"
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[r], label=label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(
            xlabel="SFT answer words (measured, greedy test)",
            ylabel="DDPO - DPO, mention-level hallucination",
            title=f"test, {title} (95% t-interval over seeds)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save_figure(fig, path)


def run_points(args) -> int:
    started = time.perf_counter()
    lab = Path(args.reuse_middle) if args.reuse_middle else None
    for seed in args.seeds:
        for length in args.lengths:
            try:
                run_point(Path(args.output_dir), seed, length, args.parts, lab, args.num_threads)
            except GateError as error:  # that point's lab is invalid; the others still run
                print(f"seed {seed}, {length} words: {error}", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def aggregate(args, argv: list[str]) -> int:
    root, results = Path(args.output_dir), Path(args.results)
    table = collect_points(root, args.seeds, sorted(args.lengths), REPORTED)
    if not table and (results / "results.json").is_file():  # no run directories: the committed per-seed values
        table = json.loads((results / "results.json").read_text())
    if not table:
        print(f"no finished points under {root} and no {results / 'results.json'}", file=sys.stderr)
        return 2
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(table, indent=2))
    (results / "results.md").write_text(report(table, "python experiments/dense_regime.py " + " ".join(argv)))
    plot(table, results / "gap_vs_length.png")
    print((results / "results.md").read_text())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "aggregate"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 3, 4, 5])
    parser.add_argument("--lengths", type=int, nargs="+", default=[120, 15, MIDDLE])
    parser.add_argument("--parts", nargs="+", choices=REGIME_PARTS, default=list(REGIME_PARTS))
    parser.add_argument("--output-dir", default="runs/dense_regime")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--reuse-middle", default=None, help="the v2 lab's output directory (runs/synthetic_v2): its 55-word points"
    )
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    return run_points(args) if args.command == "run" else aggregate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
