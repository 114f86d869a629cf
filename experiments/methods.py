"""The dense-method recipes (configs/methods/) compared on the v2 synthetic lab.

    # 1. per recipe, its learning rate on seed 0's validation split (no test number is computed)
    python experiments/methods.py lr-grid --output-dir runs/methods --results experiments/results/methods
    # 2. every recipe at its chosen lr, same SFT model and pairs per seed; table, paired differences vs DPO, plot
    python experiments/methods.py compare --seeds 0 1 3 4 5 --output-dir runs/methods \
        --results experiments/results/methods
    # a smoke run of both at the lab's --quick sizes (numbers meaningless)
    python experiments/methods.py all --quick --seeds 0 1 --output-dir /tmp/methods_quick \
        --results /tmp/methods_quick/results

Per seed: one SFT model and one set of on-policy pairs (the lab's stages, ddpo/lab/stages.py), then one
`ddpo train` run per recipe from that model on those pairs. A recipe is the `loss:` section (and
`train.reference`) of its YAML (ddpo/lab/recipes.py `recipe_overrides`), applied as overrides of the lab's
train config (configs/synthetic/demo.yaml); everything else (model, data, epochs, batch) is the lab's, the
same for all. The lr of each recipe is the lab's validation rule's choice over the grid
(ddpo/lab/selection.py `best_lr`). Finished stages and runs are skipped on a rerun; seed 0's compare runs
reuse its grid runs at the chosen lr.
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
from ddpo.lab.recipes import RECIPE_GRID, RECIPE_QUICK_GRID, RECIPES, recipe_overrides, recipe_run_name
from ddpo.lab.report import format_interval, mean_sd, metric_digits, pyplot, save_figure, seed_dots, table_head
from ddpo.lab.selection import PRIMARY, RECALL_SLACK, best_lr
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run
from ddpo.lab.stats import holm, interval, p_value, paired_differences

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "methods"
BASELINE = "dpo"
TABLE_KEYS = (PRIMARY, "object_recall", *CLAIM_ERRORS[:3], "mean_response_words")


def settings_for(args, seed: int, methods: dict, validation_only: bool = False) -> DemoSettings:
    common = dict(
        output_dir=str(Path(args.output_dir) / f"seed{seed}"),
        seed=seed,
        methods=methods,
        validation_only=validation_only,
        num_threads=args.num_threads,
    )
    return DemoSettings.quick(**common) if args.quick else DemoSettings(**common)


def lr_grid(args) -> dict:
    grid = RECIPE_QUICK_GRID if args.quick else RECIPE_GRID
    methods = {
        recipe_run_name(r, lr): {**recipe_overrides(r), "train.learning_rate": lr} for r in args.recipes for lr in grid
    }
    settings = settings_for(args, 0, methods, validation_only=True)
    run(settings)
    results = json.loads((Path(settings.output_dir) / "results.json").read_text())
    # kept apart: compare rewrites results.json
    (Path(settings.output_dir) / "grid_results.json").write_text(json.dumps(results, indent=2))
    validation, sft_recall = results["validation"], results["validation"]["sft"]["object_recall"]
    choice = {r: best_lr(validation, {lr: recipe_run_name(r, lr) for lr in grid}) for r in args.recipes}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"lr grid, seed 0, validation split (greedy); recall bar: SFT {sft_recall:.3f} - {RECALL_SLACK}",
        "",
        *table_head("run", "mention hallucination", "recall", "drift", "chosen"),
    ]
    for name, m in validation.items():
        recipe = name.rsplit("_lr", 1)[0]
        chosen = name != "sft" and recipe_run_name(recipe, choice.get(recipe, -1)) == name
        lines.append(
            f"| {name} | {m[PRIMARY]:.3f} | {m['object_recall']:.3f} | {results['drift'][name]:+.3f} | "
            f"{'yes' if chosen else ''} |"
        )
    for name, message in results.get("unscorable", {}).items():
        lines.append(f"| {name} | unscorable: {message.split(': ', 2)[-1][:90]}… | | | |")
    lines += [
        "",
        f"choice: {json.dumps(choice)}",
        "",
        "command: python experiments/methods.py " + " ".join(sys.argv[1:]),
    ]
    (out / "lr_grid.md").write_text("\n".join(lines) + "\n")
    (out / "lr_choice.json").write_text(json.dumps(choice, indent=2))
    print("\n".join(lines))
    return choice


def run_seeds(args, recipes: list[str], choice: dict) -> dict:
    """Every recipe at its chosen lr on each seed (seed 0: the grid's run at that lr is linked)."""
    methods = {r: {**recipe_overrides(r), "train.learning_rate": choice[r]} for r in recipes}
    per_seed = {}
    for seed in args.seeds:
        settings = settings_for(args, seed, methods)
        runs = Path(settings.output_dir) / "runs"
        for recipe in recipes:
            twin = runs / recipe_run_name(recipe, choice[recipe])
            if (twin / "final").is_dir() and not (runs / recipe).exists():
                (runs / recipe).symlink_to(twin.name, target_is_directory=True)
        try:
            if not args.aggregate_only:
                run(settings)
        except GateError as error:  # that seed's lab is invalid (reported); the others still count
            print(f"seed {seed}: {error}", flush=True)
            continue
        per_seed[seed] = json.loads((Path(settings.output_dir) / "results.json").read_text())
    return per_seed


def differences(per_seed: dict, seeds: list, recipes: list[str]) -> tuple[dict, dict]:
    """Each recipe minus the baseline per seed: {label: {metric: interval}} and {label: p on PRIMARY}."""

    def values(name: str, key: str) -> list[float]:
        return [per_seed[s]["drift"][name] if key == "drift" else per_seed[s]["methods"][name][key] for s in seeds]

    table, pvalues = {}, {}
    for recipe in recipes:
        if recipe == BASELINE:
            continue
        label = f"{recipe} - {BASELINE}"
        diffs = {key: paired_differences(values(recipe, key), values(BASELINE, key)) for key in (*TABLE_KEYS, "drift")}
        table[label] = {key: interval(d) for key, d in diffs.items()}
        pvalues[label] = p_value(diffs[PRIMARY])
    return table, pvalues


def compare(args) -> int:
    out = Path(args.results)
    choice = json.loads((out / "lr_choice.json").read_text())
    recipes = [r for r in args.recipes if r in choice]
    started = time.perf_counter()
    per_seed = run_seeds(args, recipes, choice)
    seeds, names = sorted(per_seed), ["sft", *recipes]
    lines = [
        "Dense-method recipes on the v2 synthetic lab, test split, greedy decoding. Command:",
        "",
        "    python experiments/methods.py " + " ".join(sys.argv[1:]),
        "",
        f"Seeds {seeds}; lr per recipe (seed 0 validation, lr_choice.json): {json.dumps(choice)}",
        "",
        "Pairs per seed: " + ", ".join(f"{s}: {per_seed[s]['pairs']['pairs_used']}" for s in seeds),
        "",
        "### Mean ± std over seeds",
        "",
        *table_head(
            "recipe", "mention hall.", "recall", "attribute err", "position err", "count err", "words", "drift"
        ),
    ]
    for name in names:
        cells = [mean_sd([per_seed[s]["methods"][name][k] for s in seeds], metric_digits(k)) for k in TABLE_KEYS]
        drift = statistics.fmean(per_seed[s]["drift"][name] for s in seeds)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {drift:+.3f} |")
    table, pvalues = differences(per_seed, seeds, recipes)
    adjusted = holm(pvalues) if pvalues else {}
    lines += [
        "",
        f"### Paired differences vs {BASELINE} (test, greedy): mean [95% t-interval over seeds]; p: paired t-test "
        f"on mention hallucination, Holm-adjusted over the {len(pvalues)} comparisons",
        "",
        *table_head(
            "comparison", "mention hall.", "p (Holm)", "recall", "attribute err", "position err", "count err", "drift"
        ),
    ]
    for label, row in table.items():
        cells = [format_interval(*row[k]) for k in ("object_recall", *CLAIM_ERRORS[:3], "drift")]
        lines.append(
            f"| {label} | {format_interval(*row[PRIMARY])} | {adjusted[label]:.3f} | " + " | ".join(cells) + " |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    kept = ("methods", "validation", "drift", "gate", "pairs", "timings_s")
    summary = {
        "seeds": seeds,
        "lr": choice,
        "recipes": {r: recipe_overrides(r) for r in recipes},
        "differences": table,
        "holm": adjusted,
        "wall_s": round(time.perf_counter() - started, 1),
        "per_seed": {s: {k: per_seed[s].get(k) for k in kept} for s in seeds},
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    plot(per_seed, seeds, names, out / "comparison.png")
    print("\n".join(lines))
    return 0


def plot(per_seed: dict, seeds: list, names: list[str], path: Path) -> None:
    panels = (
        (PRIMARY, "mention-level object hallucination"),
        ("object_recall", "object recall"),
        ("attribute_error_rate", "attribute error rate"),
    )
    fig, axes = pyplot().subplots(1, len(panels) + 1, figsize=(16, 3.8))
    for ax, (key, label) in zip(axes, panels):
        values = {n: [per_seed[s]["methods"][n][key] for s in seeds] for n in names}
        seed_dots(ax, values, f"{label}\n(test, greedy; dots = seeds)")
    seed_dots(
        axes[-1],
        {n: [per_seed[s]["drift"][n] for s in seeds] for n in names},
        "drift from SFT: mean per-token log-ratio\non SFT's validation answers (dots = seeds)",
        color="#dd8452",
    )
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("lr-grid", "compare", "all"))
    parser.add_argument("--output-dir", default="runs/methods")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 3, 4, 5],
        help="the v2 lab's seeds whose SFT model passes the gate",
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="compare: only the table, from each seed's results.json (seeds run as separate processes)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the lab's --quick sizes and a 2-point lr grid: a smoke run"
    )
    args = parser.parse_args(argv)
    if BASELINE not in args.recipes:
        parser.error(f"--recipes must include the baseline '{BASELINE}' (the differences are taken against it)")
    if args.command in ("lr-grid", "all"):
        lr_grid(args)
    if args.command in ("compare", "all"):
        return compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
