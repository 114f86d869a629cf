"""The v2 synthetic lab's experiments: the learning-rate grid (validation only) and the seed ablation.

    # 1. the lr grid on seed 0's validation split (no test number is computed)
    python experiments/synthetic_v2.py lr-grid --output-dir runs/synthetic_v2 \
        --results experiments/results/synthetic_v2
    # 2. the ablation: seeds x runs (test and validation), paired DDPO - DPO intervals
    python experiments/synthetic_v2.py ablation --seeds 0 1 2 3 4 --parts primary sum tuned \
        --output-dir runs/synthetic_v2 --results experiments/results/synthetic_v2

Per seed: one SFT model (it must pass the perception gate) and one set of on-policy pairs (the lab's
stages, ddpo/lab/stages.py), then every run from that model on those pairs. The paper protocol (RLHF-V
Eq. 5): weighted mean, beta 0.5 fixed, DDPO gamma 5 vs DPO gamma 1, the same lr and epochs for both; the
lr is the grid's choice (`lr_choice.json`, ddpo/lab/selection.py). Parts of the ablation (`--parts`,
ddpo/lab/recipes.py `ablation_runs`):
    primary   dpo_mean, ddpo_mean_g5                         the pre-registered comparison
    gamma     ddpo_mean_g2, ddpo_mean_g10
    sum       dpo_sum, ddpo_sum_g5 (released-code normalisation, its own lr from the grid)
    sumgamma  ddpo_sum_g2, ddpo_sum_g10
    pairs     dpo_mean_p{200,800}, ddpo_mean_g5_p{200,800}  (the first 200 / 800 pairs)
    sumpairs  dpo_sum_p{200,800}, ddpo_sum_g5_p{200,800}
    matched   DPO at every grid lr above the shared one up to DDPO's validation-best lr (mean and sum:
              dpo_{mean,sum}_lr<lr>) and DDPO (sum) at its own lr, so DPO's metrics can be read at
              DDPO's drift (piecewise linear in drift over DPO's runs: the matched-drift comparison)
    tuned     dpo_mean_tuned, ddpo_mean_g5_tuned             each method at its own validation-best lr
                                                             (gamma as weighting vs gamma as a larger step)
Finished stages and runs are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ddpo.lab.evaluation import CLAIM_ERRORS
from ddpo.lab.gate import GateError
from ddpo.lab.pairs import answer_tokens
from ddpo.lab.recipes import ABLATION_PARTS, MEAN_GRID, SUM_GRID, ablation_runs, grid_run_name, lr_grid_runs
from ddpo.lab.report import format_interval, mean_sd, metric_digits, pyplot, save_figure, seed_dots, table_head
from ddpo.lab.selection import PRIMARY, choose_lrs
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run
from ddpo.lab.stats import holm, matched_drift_gaps, paired_differences, paired_test

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "synthetic_v2"
TABLE_KEYS = (
    PRIMARY,
    "response_hallucination_rate",
    "companion_rate",
    "nontarget_mention_rate",
    "object_recall",
    "mean_response_words",
    *CLAIM_ERRORS[:3],
)
DIFF_KEYS = TABLE_KEYS[:6]
PRIMARY_COMPARISON = ("ddpo_mean_g5", "dpo_mean")  # pre-registered: not Holm-adjusted
SECONDARY_COMPARISONS = (
    ("dpo_mean", "sft"),
    ("ddpo_mean_g5", "sft"),
    ("ddpo_mean_g2", "dpo_mean"),
    ("ddpo_mean_g10", "dpo_mean"),
    ("ddpo_sum_g5", "dpo_sum"),
    ("dpo_sum", "sft"),
    ("ddpo_sum_g5", "sft"),
    ("ddpo_sum_g2", "dpo_sum"),
    ("ddpo_sum_g10", "dpo_sum"),
    ("ddpo_mean_g5_p200", "dpo_mean_p200"),
    ("ddpo_mean_g5_p800", "dpo_mean_p800"),
    ("ddpo_sum_g5_p200", "dpo_sum_p200"),
    ("ddpo_sum_g5_p800", "dpo_sum_p800"),
    ("ddpo_mean_g5_tuned", "dpo_mean_lr1e-05"),
    ("ddpo_sum_g5_tuned", "dpo_sum"),
    ("ddpo_mean_g5_tuned", "dpo_mean_tuned"),
    ("ddpo_mean_g5_tuned", "dpo_mean"),
    ("dpo_mean_tuned", "ddpo_mean_g5"),
)


# ------------------------------------------------------------------------------------------------
# lr grid
# ------------------------------------------------------------------------------------------------
def lr_grid(args) -> int:
    norm = args.normalize
    seed_dir = Path(args.output_dir) / "seed0"
    run(
        DemoSettings(
            output_dir=str(seed_dir),
            seed=0,
            methods=lr_grid_runs(norm),
            validation_only=True,
            num_threads=args.num_threads,
        )
    )
    results = json.loads((seed_dir / "results.json").read_text())
    validation, out = results["validation"], Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    choice_file = out / "lr_choice.json"
    if norm == "mean":
        lrs = {
            "mean": choose_lrs(validation, "mean", MEAN_GRID),
            "answer_tokens": answer_tokens(seed_dir / "pairs" / "train.jsonl"),
        }
        lrs["sum"] = dict(lrs["mean"])  # until the sum's own grid has run (lr-grid --normalize sum)
    else:
        lrs = json.loads(choice_file.read_text())
        lrs["sum"] = choose_lrs(validation, "sum", SUM_GRID)
    stem = "lr_grid" if norm == "mean" else "lr_grid_sum"
    lines = [
        f"lr grid ({norm}), seed 0, validation split (greedy); drift = mean per-token log-ratio to SFT on SFT's "
        "validation answers",
        "",
        *table_head(
            "run", "mention hallucination", "response hallucination", "companion rate", "recall", "words", "drift"
        ),
    ]
    for name, m in validation.items():
        lines.append(
            f"| {name} | {m[PRIMARY]:.3f} | {m['response_hallucination_rate']:.3f} | {m['companion_rate']:.3f} | "
            f"{m['object_recall']:.3f} | {m['mean_response_words']:.1f} | {results['drift'][name]:+.3f} |"
        )
    lines += [
        "",
        f"choice: {json.dumps(lrs)}",
        "command: python experiments/synthetic_v2.py lr-grid --normalize "
        f"{norm} --output-dir {args.output_dir} --results {args.results}",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot_grid(validation, results["drift"], out / f"{stem}.png", norm)
    choice_file.write_text(json.dumps(lrs, indent=2))
    print("\n".join(lines))
    return 0


def plot_grid(validation: dict, drift: dict, path: Path, norm: str = "mean") -> None:
    """Validation hallucination and recall against drift, one line per method over the lr grid: DPO and
    DDPO compared at matched drift (gamma as weighting) rather than at matched lr (gamma as a step size)."""
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        (PRIMARY, "companion_rate", "object_recall"),
        ("mention-level object hallucination", "companion rate", "object recall"),
    ):
        for prefix, name in ((f"dpo_{norm}_lr", "DPO (γ 1)"), (f"ddpo_{norm}_g5_lr", "DDPO (γ 5)")):
            runs = sorted((r for r in validation if r.startswith(prefix)), key=lambda r: -drift[r])
            ax.plot([-drift[r] for r in runs], [validation[r][key] for r in runs], marker="o", label=name)
            for r in runs:
                ax.annotate(r[len(prefix) :], (-drift[r], validation[r][key]), fontsize=6)
        ax.axhline(validation["sft"][key], color="gray", ls="--", label="SFT")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set(
            xlabel="drift from SFT: -(mean per-token log-ratio) on validation answers",
            ylabel=f"{label}\n(validation, greedy, seed 0)",
        )
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(8)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def grid_plot_from_table(results: Path) -> int:
    """lr_grid.png again from the committed lr_grid.md (no model run)."""
    validation, drift = {}, {}
    for line in (results / "lr_grid.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("run", "---"):
            keys = (PRIMARY, "response_hallucination_rate", "companion_rate", "object_recall")
            validation[cells[0]] = {k: float(c) for k, c in zip(keys, cells[1:5])}
            drift[cells[0]] = float(cells[6])
    plot_grid(validation, drift, results / "lr_grid.png")
    return 0


# ------------------------------------------------------------------------------------------------
# ablation
# ------------------------------------------------------------------------------------------------
def seed_settings(args, seed: int, methods: dict | None = None) -> DemoSettings:
    return DemoSettings(
        output_dir=str(Path(args.output_dir) / f"seed{seed}"), seed=seed, methods=methods, num_threads=args.num_threads
    )


def link_grid_twins(runs: Path, methods: dict) -> None:
    """The lr grid's identical runs (seed 0) are linked, not retrained."""
    for name, overrides in methods.items():
        if set(overrides) != {"loss.gamma", "loss.normalize", "train.learning_rate"}:
            continue
        twin = runs / grid_run_name(overrides)
        if (twin / "final").is_dir() and not (runs / name).exists():
            (runs / name).symlink_to(twin.name, target_is_directory=True)


def run_seeds(args, methods: dict) -> dict:
    per_seed = {}
    for seed in args.seeds:
        settings = seed_settings(args, seed, methods)
        link_grid_twins(Path(settings.output_dir) / "runs", methods)
        if not args.aggregate_only:
            run(settings)
        per_seed[seed] = json.loads((Path(settings.output_dir) / args.results_file).read_text())
    return per_seed


def differences(per_seed: dict, seeds: list, names: list[str]) -> dict:
    """{"a - b": {metric: (mean, low, high, p)}} of every comparison whose two runs exist (test, greedy)."""
    table = {}
    for a, b in (PRIMARY_COMPARISON, *SECONDARY_COMPARISONS):
        if a in names and b in names:
            table[f"{a} - {b}"] = {
                key: paired_test(
                    paired_differences(
                        [per_seed[s]["methods"][a][key] for s in seeds], [per_seed[s]["methods"][b][key] for s in seeds]
                    )
                )
                for key in DIFF_KEYS
            }
    return table


def matched_drift(per_seed: dict, seeds: list, names: list[str]) -> dict:
    """DDPO - DPO at equal drift instead of equal lr: per seed, DPO's metric at a DDPO run's drift, read
    off DPO's runs at several lrs (same normalisation, all pairs). It separates gamma as weighting from
    gamma as a larger step: if the gap vanishes here, gamma only moved the model further (or less)."""
    keys = (PRIMARY, "companion_rate", "object_recall")
    test = {n: {k: [per_seed[s]["methods"][n][k] for s in seeds] for k in keys} for n in names}
    drift = {n: [per_seed[s]["drift"][n] for s in seeds] for n in names}
    out = {}
    for norm in ("mean", "sum"):
        curve = [n for n in names if n == f"dpo_{norm}" or n.startswith(f"dpo_{norm}_lr")]
        ladders = {name: curve for name in (f"ddpo_{norm}_g5", f"ddpo_{norm}_g5_tuned")}
        for name, g in matched_drift_gaps(test, drift, ladders, keys).items():
            out[name] = {"drift": g["drift"], "extrapolated": g["extrapolated"], "dpo_runs": curve}
            out[name].update({"dpo_drift": g["dpo_drift"], PRIMARY: g[PRIMARY][:3], "p": g[PRIMARY][3]})
            out[name].update({k: g[k][:3] for k in keys[1:]})
    return out


def gate_cells(gate: dict) -> str:
    return " / ".join(f"{gate[k]:.3f}" for k in ("single_object_accuracy", "recall_without_anchor", "companion_rate"))


def ablation_lines(per_seed: dict, seeds: list, names: list[str], lrs: dict) -> list[str]:
    """The ablation's head and its mean ± std tables (test, greedy and sampled)."""
    lines = [
        f"v2 synthetic ablation, seeds {seeds}, test split. Command:",
        "",
        "    " + " ".join(["python experiments/synthetic_v2.py", *sys.argv[1:]]),
        "",
        f"lr (validation choice, lr_choice.json): {json.dumps(lrs)}",
        "",
        "Gate per seed (single-object accuracy / recall without anchor / companion rate): "
        + "; ".join(f"{s}: {gate_cells(per_seed[s]['gate'])}" for s in seeds),
        "",
        "Pairs per seed: "
        + ", ".join(f"{s}: {per_seed[s]['pairs']['pairs_used']}" for s in seeds)
        + "; segments per pair "
        + ", ".join(f"{per_seed[s]['pairs']['segments_per_pair']:.2f}" for s in seeds),
        "",
    ]
    head = ("run", "mention hall.", "response hall.", "companion rate", "non-target mentions", "recall", "words")
    for split, title in (("methods", "greedy"), ("sampled", "sampled, T 0.7")):
        lines += [f"### Test, {title}: mean ± std over seeds", ""]
        lines += table_head(*head, "attribute err", "position err", "count err", "drift")
        for name in names:
            cells = [mean_sd([per_seed[s][split][name][k] for s in seeds], metric_digits(k)) for k in TABLE_KEYS]
            d = statistics.fmean(per_seed[s]["drift"][name] for s in seeds)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {d:+.3f} |")
        lines.append("")
    return lines


def difference_lines(table: dict, adjusted: dict, matched: dict) -> list[str]:
    primary = " - ".join(PRIMARY_COMPARISON)
    lines = [
        "### Paired differences (test, greedy): mean [95% t-interval over seeds]; p: paired t-test, Holm-adjusted "
        f"over the secondary comparisons (the primary, {primary}, is not adjusted)",
        "",
        *table_head(
            "comparison",
            "mention hall.",
            "p (Holm)",
            "response hall.",
            "companion rate",
            "non-target mentions",
            "recall",
            "words",
        ),
    ]
    for label, row in table.items():
        p = row[PRIMARY][3] if label == primary else adjusted[label]
        cells = [format_interval(*row[k][:3], digits=metric_digits(k)) for k in DIFF_KEYS]
        lines.append(f"| {label} | {cells[0]} | {p:.3f} | " + " | ".join(cells[1:]) + " |")
    if matched:
        lines += [
            "",
            "### At matched drift (test, greedy): DDPO minus DPO read at DDPO's drift, DPO piecewise linear in drift "
            "over its runs at several lrs; mean [95% t-interval over seeds]",
            "",
            *table_head(
                "DDPO run",
                "its drift",
                "DPO runs (their drift)",
                "mention hall.",
                "p (unadjusted)",
                "companion rate",
                "recall",
                "extrapolated seeds",
            ),
        ]
        for name, row in matched.items():
            curve = ", ".join(f"{n} ({d:+.4f})" for n, d in zip(row["dpo_runs"], row["dpo_drift"]))
            lines.append(
                f"| {name} | {row['drift']:+.4f} | {curve} | {format_interval(*row[PRIMARY])} | {row['p']:.3f} | "
                f"{format_interval(*row['companion_rate'])} | {format_interval(*row['object_recall'])} | "
                f"{row['extrapolated']} |"
            )
    return lines


def ablation(args) -> int:
    out = Path(args.results)
    if args.stages:  # the stages before training need no lr: run them while the lr grid runs
        for seed in args.seeds:
            try:
                run(seed_settings(args, seed), args.stages)
            except GateError as error:  # that seed's lab is invalid; the others still run
                print(f"seed {seed}: {error}", flush=True)
        return 0
    lrs = json.loads((out / "lr_choice.json").read_text())
    methods = ablation_runs(lrs, args.parts)
    per_seed = run_seeds(args, methods)
    seeds = sorted(per_seed)
    names = ["sft", *[m for m in methods if all(m in per_seed[s]["methods"] for s in seeds)]]
    table = differences(per_seed, seeds, names)
    primary = " - ".join(PRIMARY_COMPARISON)
    adjusted = holm({k: v[PRIMARY][3] for k, v in table.items() if k != primary})
    matched = matched_drift(per_seed, seeds, names)
    lines = ablation_lines(per_seed, seeds, names, lrs) + difference_lines(table, adjusted, matched)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    kept = ("methods", "sampled", "validation", "drift", "gate", "pairs", "timings_s")
    summary = {
        "seeds": seeds,
        "lr": lrs,
        "differences": table,
        "holm": adjusted,
        "matched_drift": matched,
        "per_seed": {s: {k: per_seed[s].get(k) for k in kept} for s in seeds},
    }
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    plot_seeds(per_seed, seeds, names, out / f"{args.name}.png")
    print("\n".join(lines))
    return 0


def plot_seeds(per_seed: dict, seeds: list, names: list[str], out: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(
        axes,
        (PRIMARY, "companion_rate", "object_recall"),
        ("mention-level object hallucination", "companion rate (absent partner named)", "object recall"),
    ):
        values = {n: [per_seed[s]["methods"][n][key] for s in seeds] for n in names}
        seed_dots(ax, values, f"{label}\n(test, greedy; dots = seeds)")
    save_figure(fig, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lr-grid", "ablation"):
        p = sub.add_parser(name)
        p.add_argument("--output-dir", default="runs/synthetic_v2")
        p.add_argument("--results", default=str(RESULTS))
        p.add_argument("--num-threads", type=int, default=1)
    grid, abl = sub.choices["lr-grid"], sub.choices["ablation"]
    grid.add_argument("--normalize", choices=("mean", "sum"), default="mean")
    abl.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    abl.add_argument("--parts", nargs="+", default=["primary", "sum", "tuned"], choices=ABLATION_PARTS)
    abl.add_argument("--aggregate-only", action="store_true")
    abl.add_argument("--name", default="ablation", help="stem of the tables, JSON and plot written under --results")
    abl.add_argument(
        "--results-file",
        default="results.json",
        help="each seed's results file to aggregate (a copy, when later runs rewrote results.json)",
    )
    abl.add_argument(
        "--stages",
        nargs="+",
        default=None,
        choices=("sft", "gate", "sample", "annotate"),
        help="only these stages for the seeds (no training, no table)",
    )
    p = sub.add_parser("grid-plot", help="lr_grid.png from an lr_grid.md table (no model run)")
    p.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.command == "grid-plot":
        return grid_plot_from_table(Path(args.results))
    return lr_grid(args) if args.command == "lr-grid" else ablation(args)


if __name__ == "__main__":
    sys.exit(main())
