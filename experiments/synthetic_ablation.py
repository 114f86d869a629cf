"""The synthetic benchmark's full ablation: seeds x {DPO, DDPO} x gamma x normalisation x pair count.

    python experiments/synthetic_ablation.py --seeds 0 1 2 --output-dir runs/synthetic_ablation \
        --results experiments/results/synthetic_ablation

Per seed: one SFT model and one set of corrected pairs (the demo's stages), then every run below from
that same model on those same pairs (a subset for the pair-count axis), evaluated greedily on the
seed's validation and test images. Aggregates mean ± std over seeds into RESULTS/results.{md,csv,json}
and plots hallucination vs gamma and vs pairs. Finished stages and runs are skipped on a re-run.

Runs (ddpo/lab/recipes.py `v1_ablation_runs`; the paper's Figure 2 axis is the pair count; gamma 1 is
vanilla DPO):
    dpo_sum, ddpo_sum_g{2,5,10}            released-code normalisation (sum), beta 0.5 (the demo's)
    dpo_mean, ddpo_mean_g{2,5,10}          paper Eq. 5 (weighted mean), beta 16: a mean log-prob is ~N
                                           times smaller than the sum (N ~ 33 answer tokens), and the
                                           DPO gradient scales with beta, so 0.5 x 33 starts both at the
                                           same step size
    dpo_sum_p{200,800}, ddpo_sum_g5_p{200,800}   fewer preference pairs
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ddpo.lab.evaluation import CLAIM_ERRORS, METRICS
from ddpo.lab.recipes import v1_ablation_runs
from ddpo.lab.report import format_mean_std, metric_digits, pyplot, save_figure, table_head
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run
from ddpo.lab.stats import mean_std

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "synthetic_ablation"
CLAIMS = CLAIM_ERRORS[:3]  # the v1 world's captions never say a cell is empty


def aggregate(per_seed: dict[int, dict], split: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {metric: (mean, std)}} over seeds (std 0 with one seed)."""
    methods = next(iter(per_seed.values()))[split].keys()
    return {
        method: {
            metric: mean_std([r[split][method][metric] for r in per_seed.values()]) for metric in (*METRICS, *CLAIMS)
        }
        for method in methods
    }


def write_tables(table: dict, seeds: list[int], pairs: dict, results_dir: Path, command: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Synthetic ablation, test split, mean ± std over seeds {seeds}. Command:",
        "",
        f"    {command}",
        "",
        f"Preference pairs per seed: {pairs}",
        "",
        *table_head("method", "response hallucination", "mention hallucination", "object recall", "words / answer"),
    ]
    for method, m in table.items():
        cells = " | ".join(format_mean_std(*m[k], metric_digits(k)) for k in METRICS)
        lines.append(f"| {method} | {cells} |")
    lines += [
        "",
        "Claim errors (wrong claims / claims of the type, about correctly named objects):",
        "",
        *table_head("method", "attribute", "position", "count"),
    ]
    for method, m in table.items():
        lines.append(f"| {method} | " + " | ".join(format_mean_std(*m[k]) for k in CLAIMS) + " |")
    (results_dir / "results.md").write_text("\n".join(lines) + "\n")
    with open(results_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *[f"{k}_{s}" for k in METRICS for s in ("mean", "std")]])
        for method, m in table.items():
            writer.writerow([method, *[f"{v:.5f}" for k in METRICS for v in m[k]]])


def plot(table: dict, results_dir: Path) -> None:
    key = "response_hallucination_rate"
    fig, (ax_gamma, ax_pairs) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for norm in ("sum", "mean"):
        names = [f"dpo_{norm}"] + [f"ddpo_{norm}_g{g}" for g in (2, 5, 10)]
        means = [table[n][key][0] for n in names]
        stds = [table[n][key][1] for n in names]
        ax_gamma.errorbar([1, 2, 5, 10], means, yerr=stds, marker="o", capsize=3, label=f"normalize={norm}")
    ax_gamma.axhline(table["sft"][key][0], color="gray", ls="--", label="SFT")
    ax_gamma.set(
        xscale="log", xlabel="gamma (1 = vanilla DPO)", ylabel="response hallucination (test)", title="vs gamma"
    )
    ax_gamma.set_xticks([1, 2, 5, 10], ["1", "2", "5", "10"])
    ax_gamma.legend(fontsize=8)
    for name, label in (("dpo_sum", "DPO"), ("ddpo_sum_g5", "DDPO gamma 5")):
        names = [f"{name}_p200", f"{name}_p800", name]
        xs = [200, 800, 1400]
        ax_pairs.errorbar(
            xs,
            [table[n][key][0] for n in names],
            yerr=[table[n][key][1] for n in names],
            marker="o",
            capsize=3,
            label=label,
        )
    ax_pairs.axhline(table["sft"][key][0], color="gray", ls="--", label="SFT")
    ax_pairs.set(xlabel="preference pairs (1400 = all, capped)", title="vs preference data (paper Fig. 2 axis)")
    ax_pairs.legend(fontsize=8)
    save_figure(fig, results_dir / "hallucination.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/synthetic_ablation")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--aggregate-only", action="store_true", help="tables and plots from the seeds' results.json")
    args = parser.parse_args(argv)
    per_seed, pairs = {}, {}
    for seed in args.seeds:
        # the v1 world (misperception): this ablation's committed results are the v2 lab's negative control
        settings = DemoSettings.v1(
            output_dir=str(Path(args.output_dir) / f"seed{seed}"), seed=seed, methods=v1_ablation_runs()
        )
        if not args.aggregate_only:
            run(settings)
        per_seed[seed] = json.loads((Path(settings.output_dir) / "results.json").read_text())
        pairs[seed] = per_seed[seed]["pairs"]["pairs_used"]
    results_dir = Path(args.results)
    command = "python experiments/synthetic_ablation.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--aggregate-only"
    )
    table = aggregate(per_seed, "methods")
    write_tables(table, args.seeds, pairs, results_dir, command)
    (results_dir / "validation.json").write_text(json.dumps(aggregate(per_seed, "validation"), indent=2))
    (results_dir / "per_seed.json").write_text(
        json.dumps(
            {s: {k: r[k] for k in ("methods", "validation", "pairs", "timings_s")} for s, r in per_seed.items()},
            indent=2,
        )
    )
    plot(table, results_dir)
    print((results_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
