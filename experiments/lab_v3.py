"""Lab v3: DDPO vs vanilla DPO on RLHF-V Table 3's endpoints, under the pre-registration
(experiments/results/lab_v3/PREREGISTRATION.md; experiments/results/lab_v3/README.md has the results).

    # 1. validation seeds: SFT model, gate, pairs, the primary lr grid, the β grid (validation split only)
    python experiments/lab_v3.py tune --seeds 0 1 2 3
    python experiments/lab_v3.py tune-beta --seeds 0 1
    python experiments/lab_v3.py tune-methods --seeds 0 1 2 3
    python experiments/lab_v3.py choose --seeds 0 1 2 3        # -> experiments/results/lab_v3/tuning.json
    # 2. test seeds (after PREREGISTRATION.md is committed): every stage, the primary and β-control arms,
    #    then the pairs-vs-steps arms and the methods family (a later pass reuses the finished runs)
    python experiments/lab_v3.py test --seeds 100 101 102 103
    python experiments/lab_v3.py test --with-pairs --seeds 100 101 102 103
    python experiments/lab_v3.py test --with-pairs --with-methods --seeds 100 101 102 103   # + the recipes
    # 3. the pre-registered analysis of the first 8 seeds that passed the gate -> results.json, RESULTS.md
    python experiments/lab_v3.py analyse --seeds 100 101 102 103 104 105 106 107 108 109 110 111

Runs go under --output-dir (runs/lab_v3/seed<N>). Two processes on different seeds share a 2-core machine well
(`--num-threads 1` each; never two on one seed). A seed whose SFT model misses the per-kind gate is recorded in
its folder (`excluded.json`) and gets no arm; `analyse` names it, and the pre-registration's rule replaces it
with the next seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ddpo.data.synthetic.metrics import TABLE3_COLUMNS
from ddpo.lab.gate import GateError
from ddpo.lab.recipes import recipe_overrides, recipe_run_name, run_overrides
from ddpo.lab.report import format_interval, table_head
from ddpo.lab.selection import RECALL_SLACK
from ddpo.lab.settings import DemoSettings, base_config
from ddpo.lab.stages import run
from ddpo.lab.stats import (
    holm,
    one_sided_p,
    p_value,
    paired_differences,
    paired_test,
    permutation_p,
    sign_test_p,
    tost_p,
)

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "lab_v3"
LR_GRID = (3e-6, 1e-5, 3e-5)  # the v2 grid's useful range (from 3e-5 up v2's policies said "nothing" at objects)
ENDPOINTS = [f"{kind}_response_rate" for kind in TABLE3_COLUMNS]  # object, position, number, attribute, all
# the β control (pre-registration section 3): DPO over β wide enough to cover DDPO-sum's effective β, and the
# DDPO arms tuned alike (16 points each). The sum's grid first ran 1e-6 .. 1e-5 (v2's recall fell from 3e-5 up),
# then 3e-6 .. 3e-5: both times both sum arms chose the top edge, so the grid grew to 1e-4 for every arm before
# the test seeds (the 1e-6 runs, which left every policy at the SFT model's rates: lab_v3/NOTES.md)
BETA_GRID = (0.5, 1.25, 2.5, 5.0)
BETA_LR_GRID = (3e-6, 1e-5, 3e-5, 1e-4)
TUNED_ARMS = {"dpo_sum_tuned": (1.0, "sum"), "ddpo_sum_tuned": (5.0, "sum"), "ddpo_mean_tuned": (5.0, "mean")}
PAIR_COUNTS = (200, 800)  # Figure 2's 200 and 800 (of 1,400); each seed's full set is the primary arm itself
SCHEDULES = ("epochs", "steps")  # the primary arms' epochs, or their number of optimiser steps
SELECTION = "all_response_rate"  # the validation rule's figure (within RECALL_SLACK of the SFT model's recall)
REPORTED = [*ENDPOINTS, "mention_hallucination_rate", "object_recall", "mean_response_words"]
EQUIVALENCE_MARGIN = 0.03  # δ_obj of the pre-registration: ±3 percentage points of the object response rate
ALPHA = 0.05
# the primary family (Holm over 3): (name, endpoint, test); d = ddpo_mean - dpo_mean per seed
PRIMARY_FAMILY = (
    ("H1_objects_equivalent", "object_response_rate", "tost"),
    ("H2_positions_lower", "position_response_rate", "below"),
    ("H3_all_lower", "all_response_rate", "below"),
)
SECONDARY_NUMBERS = (("numbers", "number_response_rate"), ("attributes", "attribute_response_rate"))
# the methods family (pre-registration section 4 and its addendum of 2026-12-07): each faithful recipe of
# configs/methods/ (its `loss:` section and reference mode; the lab's data and schedule) at its own validation
# lr, against `dpo_mean` on the position and "all" rates, two-sided, Holm over the 16 tests. The recipes' own
# DPO (configs/methods/dpo.yaml: sum, β 0.1) is tuned alike and described: recipe - dpo is what its parts add
METHOD_RECIPES = ("ddpo_released", "chip", "mdpo", "hsa_dpo", "tpo", "tdpo1", "tdpo2", "ld_dpo")
RECIPE_BASELINE = "dpo"
METHOD_ENDPOINTS = ("position_response_rate", "all_response_rate")


def primary_arms(lr: float) -> dict[str, dict]:
    """The paper's protocol (RLHF-V Eq. 5): weighted mean, β 0.5, one lr for both; DDPO γ 5, DPO γ 1."""
    return {"dpo_mean": run_overrides(1.0, "mean", lr), "ddpo_mean": run_overrides(5.0, "mean", lr)}


def pairs_arms(lr: float, num_pairs: int, batch_size: int, epochs: float) -> dict[str, dict]:
    """Figure 2's question at equal epochs and at equal optimiser steps: the primary arms on the first
    PAIR_COUNTS pairs, once for the primary arms' epochs and once for their number of steps (that of all pairs)."""
    full_steps = int(num_pairs // batch_size * epochs)  # the trainer's plan: whole batches per epoch
    runs = {}
    for name, gamma in (("dpo_mean", 1.0), ("ddpo_mean", 5.0)):
        for n in PAIR_COUNTS:
            runs[f"{name}_p{n}_{SCHEDULES[0]}"] = run_overrides(gamma, "mean", lr, **{"data.max_samples": n})
            runs[f"{name}_p{n}_{SCHEDULES[1]}"] = run_overrides(
                gamma, "mean", lr, **{"data.max_samples": n, "train.max_steps": full_steps}
            )
    return runs


def grid_arms() -> dict[str, dict]:
    runs = {}
    for lr in LR_GRID:
        runs[f"dpo_mean_lr{lr:g}"] = run_overrides(1.0, "mean", lr)
        runs[f"ddpo_mean_lr{lr:g}"] = run_overrides(5.0, "mean", lr)
    return runs


def beta_run_name(arm: str, beta: float, lr: float) -> str:
    return f"{arm}_b{beta:g}_lr{lr:g}"


def beta_grid_arms() -> dict[str, dict]:
    runs = {}
    for arm, (gamma, norm) in TUNED_ARMS.items():
        for beta in BETA_GRID:
            for lr in BETA_LR_GRID:
                runs[beta_run_name(arm, beta, lr)] = run_overrides(gamma, norm, lr, **{"loss.beta": beta})
    return runs


def method_arms(lrs: dict[str, float] | None = None) -> dict[str, dict]:
    """The methods family's recipes (and their DPO) at every lr of LR_GRID, or each at its chosen lr `lrs`
    (then the arm is named after the recipe)."""
    recipes = (*METHOD_RECIPES, RECIPE_BASELINE)
    if lrs is not None:
        return {r: {**recipe_overrides(r), "train.learning_rate": lrs[r]} for r in recipes}
    return {
        recipe_run_name(r, lr): {**recipe_overrides(r), "train.learning_rate": lr} for r in recipes for lr in LR_GRID
    }


def seed_settings(args, seed: int, **overrides) -> DemoSettings:
    settings = DemoSettings(
        output_dir=str(Path(args.output_dir) / f"seed{seed}"), seed=seed, num_threads=args.num_threads, **overrides
    )
    settings.train_overrides = [*settings.train_overrides, "--train.num_threads", str(args.num_threads)]
    return settings


def run_seed(settings: DemoSettings) -> dict | None:
    """Every stage of one seed; None (and `excluded.json`) when its SFT model misses the gate."""
    out = Path(settings.output_dir)
    try:
        return run(settings)
    except GateError as error:
        gate = json.loads((out / "gate.json").read_text())
        (out / "excluded.json").write_text(json.dumps({"reason": str(error), "failed": gate["failed"]}, indent=2))
        print(f"seed {settings.seed}: excluded, {error}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------
# validation: the shared lr
# ------------------------------------------------------------------------------------------------
def tune(args) -> int:
    arms = {"tune": grid_arms, "tune-beta": beta_grid_arms, "tune-methods": method_arms}[args.command]()
    for seed in args.seeds:
        run_seed(seed_settings(args, seed, methods=arms, validation_only=True))
    return 0


def validation_runs(args, names: list[str]) -> tuple[list[int], list[dict]]:
    """Per tuning seed that has every run of `names` trained: {name: validation metrics} (from each model's
    eval.json; a run that wrote unreadable text has none and is left out, so it cannot be chosen)."""
    used, per_seed = [], []
    for seed in args.seeds:
        folder = Path(args.output_dir) / f"seed{seed}"
        finals = {n: folder / "runs" / n / "final" for n in names}
        if not (folder / "sft" / "eval.json").is_file() or not all(p.is_dir() for p in finals.values()):
            continue
        metrics = {"sft": json.loads((folder / "sft" / "eval.json").read_text())["validation"]}
        for name, final in finals.items():
            if (final / "eval.json").is_file():
                metrics[name] = json.loads((final / "eval.json").read_text())["validation"]
        used.append(seed)
        per_seed.append(metrics)
    if not per_seed:
        raise SystemExit(f"no seed of {args.seeds} under {args.output_dir} has these runs: run `tune` first")
    return used, per_seed


def seed_means(per_seed: list[dict], name: str) -> dict | None:
    """A run's validation metrics averaged over seeds; None if it was unscorable on any of them."""
    if not all(name in v for v in per_seed):
        return None
    return {k: statistics.fmean(v[name][k] for v in per_seed) for k in REPORTED}


def validation_grid(args, names: list[str]) -> tuple[list[int], dict, float] | None:
    """(tuning seeds that trained every run of `names`, each run's seed-mean validation metrics, the recall bar:
    the SFT model's seed-mean recall - RECALL_SLACK); None when no seed has them."""
    try:
        seeds, per_seed = validation_runs(args, names)
    except SystemExit:
        return None
    return (
        seeds,
        {name: seed_means(per_seed, name) for name in names},
        seed_means(per_seed, "sft")["object_recall"] - RECALL_SLACK,
    )


def choose(args) -> int:
    """The pre-registered validation rule. Primary arms: the one lr with the lowest sum of DPO's and DDPO's
    seed-mean "all" rate among those where both keep seed-mean recall >= the SFT model's - RECALL_SLACK
    (ties: the smaller lr). β-control arms: per arm, the (β, lr) with the lowest seed-mean "all" rate under the
    same recall bar (ties: the smaller lr, then the smaller β)."""
    seeds, per_seed = validation_runs(args, list(grid_arms()))
    sft = seed_means(per_seed, "sft")
    bar = sft["object_recall"] - RECALL_SLACK
    rows = {name: seed_means(per_seed, name) for name in grid_arms()}
    keep = [
        lr
        for lr in LR_GRID
        if all(rows[n] and rows[n]["object_recall"] >= bar for n in (f"dpo_mean_lr{lr:g}", f"ddpo_mean_lr{lr:g}"))
    ]
    if not keep:
        raise SystemExit(f"no lr keeps both arms' recall within {RECALL_SLACK} of SFT's: widen the grid")
    lr = min(keep, key=lambda x: (rows[f"dpo_mean_lr{x:g}"][SELECTION] + rows[f"ddpo_mean_lr{x:g}"][SELECTION], x))
    # the seed-to-seed SD of the paired differences at the chosen lr (what the seed count rests on)
    ddpo, dpo = f"ddpo_mean_lr{lr:g}", f"dpo_mean_lr{lr:g}"
    sd = {
        k: statistics.stdev(paired_differences([v[ddpo][k] for v in per_seed], [v[dpo][k] for v in per_seed]))
        for k in ENDPOINTS
        if len(per_seed) > 1
    }
    choice = {
        "rule": f"lowest seed-mean {SELECTION} (primary: DPO + DDPO) with recall >= SFT's - {RECALL_SLACK}",
        "primary": {"seeds": seeds, "sft": sft, "grid": rows, "lr": lr, "paired_difference_sd": sd},
    }
    if beta := validation_grid(args, list(beta_grid_arms())):
        beta_seeds, grid, bar = beta
        chosen = {}
        for arm in TUNED_ARMS:
            candidates = {(lr, b): grid[beta_run_name(arm, b, lr)] for lr in BETA_LR_GRID for b in BETA_GRID}
            fine = [p for p, m in candidates.items() if m and m["object_recall"] >= bar]
            if not fine:
                raise SystemExit(f"no (β, lr) keeps {arm}'s recall within {RECALL_SLACK} of SFT's: widen the grid")
            best = min(fine, key=lambda p: (candidates[p][SELECTION], p))
            chosen[arm] = {"lr": best[0], "beta": best[1]}
        choice["beta_control"] = {"seeds": beta_seeds, "grid": grid, "chosen": chosen}
    if methods := validation_grid(args, list(method_arms())):
        method_seeds, grid, bar = methods
        chosen, no_point = {}, {}
        for recipe in (*METHOD_RECIPES, RECIPE_BASELINE):
            fine = [lr for lr in LR_GRID if (m := grid[recipe_run_name(recipe, lr)]) and m["object_recall"] >= bar]
            if fine:  # the grid is fixed (the addendum): a recipe with no admissible lr is reported, not tested
                chosen[recipe] = min(fine, key=lambda lr: (grid[recipe_run_name(recipe, lr)][SELECTION], lr))
            else:
                no_point[recipe] = f"no lr of {list(LR_GRID)} keeps recall within {RECALL_SLACK} of SFT's"
        choice["methods"] = {"seeds": method_seeds, "grid": grid, "chosen": chosen, "no_admissible_lr": no_point}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "tuning.json").write_text(json.dumps(choice, indent=2))
    print(
        json.dumps(
            {
                "lr": lr,
                "seeds": seeds,
                "sd": sd,
                "beta_control": choice.get("beta_control", {}).get("chosen"),
                "methods": choice.get("methods", {}).get("chosen"),
            },
            indent=2,
        )
    )
    return 0


# ------------------------------------------------------------------------------------------------
# test seeds and the analysis
# ------------------------------------------------------------------------------------------------
def test_arms(results: Path, with_methods: bool = False) -> dict[str, dict]:
    """The arms of every test seed, at the points tuning.json chose: the primary pair and the β control
    (`with_methods`: and the methods family's recipes)."""
    path = results / "tuning.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `choose` on the validation seeds first")
    choice = json.loads(path.read_text())
    arms = primary_arms(choice["primary"]["lr"])
    for arm, point in choice.get("beta_control", {}).get("chosen", {}).items():
        gamma, norm = TUNED_ARMS[arm]
        arms[arm] = run_overrides(gamma, norm, point["lr"], **{"loss.beta": point["beta"]})
    if with_methods:
        if "methods" not in choice:
            raise SystemExit(f"{path} has no methods choice: run `tune-methods` and `choose` first")
        arms |= method_arms(choice["methods"]["chosen"])
    return arms


def test(args) -> int:
    """Every stage of each test seed with the primary and β-control arms; `--with-pairs` adds the pairs-vs-steps
    arms, `--with-methods` the methods family (a later pass reuses the finished runs and their evaluations; an
    arm with unparsed answers is recorded as unscorable, pre-registration section 5)."""
    for seed in args.seeds:
        arms = test_arms(Path(args.results), args.with_methods)
        if args.with_pairs:
            stats = Path(args.output_dir) / f"seed{seed}" / "pairs" / "stats.json"
            if (Path(args.output_dir) / f"seed{seed}" / "excluded.json").is_file() or not stats.is_file():
                print(f"seed {seed}: excluded or not run yet; run `test` without --with-pairs first", file=sys.stderr)
                continue
            train = base_config(DemoSettings()).train
            pairs = json.loads(stats.read_text())["pairs_used"]
            arms |= pairs_arms(arms["dpo_mean"]["train.learning_rate"], pairs, train.micro_batch_size, train.epochs)
        run_seed(seed_settings(args, seed, methods=arms, record_unscorable=args.with_methods))
    return 0


def hypothesis(diffs: list[float], test_kind: str) -> dict:
    """One test's p and its distribution-free companions (reported, not in the family)."""
    if test_kind == "tost":
        m = EQUIVALENCE_MARGIN
        return {
            "test": f"TOST, margin ±{m}",
            "p": tost_p(diffs, m),
            "sign_p": max(sign_test_p(diffs, below=False, shift=-m), sign_test_p(diffs, below=True, shift=m)),
            "permutation_p": max(
                permutation_p(diffs, below=False, shift=-m), permutation_p(diffs, below=True, shift=m)
            ),
        }
    if test_kind == "two_sided":  # the exact tests' two-sided p: twice the smaller one-sided p
        return {
            "test": "two-sided paired t",
            "p": p_value(diffs),
            "sign_p": min(1.0, 2 * min(sign_test_p(diffs, below=True), sign_test_p(diffs, below=False))),
            "permutation_p": min(1.0, 2 * min(permutation_p(diffs, below=True), permutation_p(diffs, below=False))),
        }
    below = test_kind == "below"
    return {
        "test": f"one-sided paired t, H_a: mean difference {'<' if below else '>'} 0",
        "p": one_sided_p(diffs, below=below),
        "sign_p": sign_test_p(diffs, below=below),
        "permutation_p": permutation_p(diffs, below=below),
    }


def corrected(family: dict) -> dict:
    """Holm over the family's p values, each test's outcome at ALPHA, and whether a distribution-free
    companion disagrees with a hit."""
    for name, p in holm({n: h["p"] for n, h in family.items()}).items():
        h = family[name]
        h["p_holm"], h["outcome"] = p, "hit" if p < ALPHA else "miss"
        fragile = h["outcome"] == "hit" and max(h["sign_p"], h["permutation_p"]) >= ALPHA
        h["robustness"] = "fragile (a distribution-free test misses)" if fragile else "consistent"
    return family


def paired(results: dict, a: str, b: str, keys: list[str], table: str = "methods") -> tuple[list[int], dict]:
    """a - b per endpoint of `table` (greedy "methods" or "sampled") on the seeds where both arms have a score (an
    arm with unparsed answers has none): (those seeds, {endpoint: mean, interval, per-seed values, p})"""
    seeds = [s for s, r in results.items() if a in r[table] and b in r[table]]
    out = {}
    for k in keys:
        d = paired_differences([results[s][table][a][k] for s in seeds], [results[s][table][b][k] for s in seeds])
        mean, low, high, p = paired_test(d) if d else (float("nan"),) * 4
        out[k] = {"mean": mean, "low": low, "high": high, "per_seed": d, "p_two_sided": p}
    return seeds, out


def methods_family(results: dict, tuning: dict) -> dict:
    """The addendum's methods family: each recipe - `dpo_mean` on METHOD_ENDPOINTS (two-sided, Holm over the
    tests that could run; a recipe scored on fewer than all seeds but one is not tested), and the described
    differences: every endpoint against `dpo_mean` and against the recipes' own DPO."""
    family, not_tested, described = {}, dict(tuning.get("no_admissible_lr", {})), {}
    for recipe in METHOD_RECIPES:
        if recipe in not_tested:
            continue
        seeds, against = paired(results, recipe, "dpo_mean", REPORTED)
        if len(seeds) < len(results) - 1:
            not_tested[recipe] = f"scored on {len(seeds)} of {len(results)} seeds"
            continue
        for endpoint in METHOD_ENDPOINTS:
            d = against[endpoint]
            family[f"{recipe} - dpo_mean: {endpoint}"] = {
                **{k: d[k] for k in ("mean", "low", "high", "per_seed")},
                "seeds": seeds,
                **hypothesis(d["per_seed"], "two_sided"),
            }
        described[f"{recipe} - dpo_mean"] = {"seeds": seeds, **against}
        seeds, own = paired(results, recipe, RECIPE_BASELINE, REPORTED)
        described[f"{recipe} - {RECIPE_BASELINE}"] = {"seeds": seeds, **own}
    return {"family": corrected(family), "not_tested": not_tested, "described": described, "lr": tuning["chosen"]}


def analyse(args) -> int:
    seeds, excluded, missing = [], {}, []
    for seed in args.seeds:
        folder = Path(args.output_dir) / f"seed{seed}"
        if (folder / "excluded.json").is_file():
            excluded[seed] = json.loads((folder / "excluded.json").read_text())["failed"]
        elif (folder / "results.json").is_file():
            seeds.append(seed)
        else:
            missing.append(seed)
    if missing:
        raise SystemExit(f"seeds {missing} have neither results.json nor excluded.json under {args.output_dir}")
    seeds = seeds[: args.count]
    results = {s: json.loads((Path(args.output_dir) / f"seed{s}" / "results.json").read_text()) for s in seeds}
    # every arm evaluated on every seed (the SFT model first)
    arms = [a for a in results[seeds[0]]["methods"] if all(a in results[s]["methods"] for s in seeds)]
    values = {a: {k: [results[s]["methods"][a][k] for s in seeds] for k in REPORTED} for a in arms}
    sampled = {a: {k: [results[s]["sampled"][a][k] for s in seeds] for k in ENDPOINTS} for a in arms}

    def difference(a: str, b: str, table: str = "methods") -> dict:  # arms scored on every seed
        return paired(results, a, b, REPORTED if table == "methods" else ENDPOINTS, table)[1]

    diffs = difference("ddpo_mean", "dpo_mean")
    family = corrected({name: hypothesis(diffs[endpoint]["per_seed"], kind) for name, endpoint, kind in PRIMARY_FAMILY})
    secondary = {name: {"p": diffs[k]["p_two_sided"]} for name, k in SECONDARY_NUMBERS}
    for name, p in holm({n: s["p"] for n, s in secondary.items()}).items():
        secondary[name]["p_holm"] = p
    beta_control = {}
    if "dpo_sum_tuned" in arms:  # each DDPO arm against DPO tuned over β and lr (one-sided: DDPO lower)
        for arm in ("ddpo_mean", "ddpo_sum_tuned", "ddpo_mean_tuned"):
            d = difference(arm, "dpo_sum_tuned")
            for endpoint in ("position_response_rate", "all_response_rate"):
                beta_control[f"{arm} - dpo_sum_tuned: {endpoint}"] = {
                    **{k: d[endpoint][k] for k in ("mean", "low", "high", "per_seed")},
                    **hypothesis(d[endpoint]["per_seed"], "below"),
                }
        corrected(beta_control)
    tuning = json.loads((Path(args.results) / "tuning.json").read_text())
    pairs_family, pairs_described = {}, {}
    if all(f"{a}_p{n}_{s}" in arms for a in ("dpo_mean", "ddpo_mean") for n in PAIR_COUNTS for s in SCHEDULES):
        for arm in ("dpo_mean", "ddpo_mean"):
            for n in PAIR_COUNTS:
                for schedule in SCHEDULES:
                    d = difference(f"{arm}_p{n}_{schedule}", arm)["all_response_rate"]
                    name = f"{arm}: all({n} pairs, fixed {schedule}) - all(every pair)"
                    if n == PAIR_COUNTS[0]:  # tested (one-sided: fewer pairs, more hallucination)
                        pairs_family[name] = {
                            **{k: d[k] for k in ("mean", "low", "high", "per_seed")},
                            **hypothesis(d["per_seed"], "above"),
                        }
                    else:
                        pairs_described[name] = {k: d[k] for k in ("mean", "low", "high", "per_seed")}
        corrected(pairs_family)
    out = {
        "preregistration": "experiments/results/lab_v3/PREREGISTRATION.md",
        "seeds": seeds,
        "excluded_seeds": excluded,
        "lr": results[seeds[0]]["train_config"]["train"]["learning_rate"] if seeds else None,
        "gate": {
            s: {
                **{k: results[s]["gate"][k] for k in ("passed", "failed")},
                "kinds": {p: results[s]["gate"]["kinds"][p] for p in ("single", "multi", "caption_errors")},
            }
            for s in seeds
        },
        "pairs": {s: results[s]["pairs"] for s in seeds},
        "greedy": values,
        "sampled_t0.7": sampled,
        "drift": {a: [results[s]["drift"][a] for s in seeds] for a in arms},
        "differences": {
            "ddpo_mean - dpo_mean": diffs,
            "dpo_mean - sft": difference("dpo_mean", "sft"),
            "ddpo_mean - sft": difference("ddpo_mean", "sft"),
            "ddpo_mean - dpo_mean (sampled T 0.7)": difference("ddpo_mean", "dpo_mean", "sampled"),
        },
        "primary_family": family,
        "secondary_numbers_attributes": secondary,
        "secondary_beta_control": beta_control,
        "secondary_pairs_vs_steps": pairs_family,
        "pairs_vs_steps_described": pairs_described,
        "tuning": tuning,
    }
    if any(r in results[s]["methods"] for s in seeds for r in METHOD_RECIPES):
        out["secondary_methods"] = methods_family(results, tuning["methods"])
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "results.json").write_text(json.dumps(out, indent=2))
    (Path(args.results) / "RESULTS.md").write_text(report(out))
    print(report(out))
    return 0


def points(d: dict) -> str:
    """A difference of rates as percentage points: mean [95% interval]."""
    return format_interval(100 * d["mean"], 100 * d["low"], 100 * d["high"], 1)


def tested_row(name: str, h: dict) -> str:
    """A secondary test's table row: difference, p, Holm p, outcome and the distribution-free companions."""
    return (
        f"| {name} | {points(h)} | {h['p']:.4f} | {h['p_holm']:.4f} | {h['outcome']} | {h['sign_p']:.4f} | "
        f"{h['permutation_p']:.4f} |"
    )


def report(out: dict) -> str:
    """The tables of results.json: per-arm means, the paired differences with intervals, the family."""
    n = len(out["seeds"])
    lines = [
        f"# Lab v3 results: {n} test seeds {out['seeds']}, lr {out['lr']:g} (greedy, 600 test images per seed)",
        "",
        f"Excluded at the gate: {out['excluded_seeds'] or 'none'}. Rates are % of responses with at least one "
        "hallucination of the kind (RLHF-V Table 3); mean ± SD over seeds. Drift: mean per-token log-ratio to the "
        "SFT model on its own validation answers (seed mean).",
        "",
        *table_head(
            "arm", "object", "position", "number", "attribute", "all", "mention rate (%)", "recall", "words", "drift"
        ),
    ]
    for arm, table in out["greedy"].items():
        cells = [statistics.fmean(table[k]) for k in REPORTED]
        sds = [statistics.stdev(table[k]) if n > 1 else 0.0 for k in REPORTED]
        row = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(cells[:6], sds[:6])]
        drift = f"{statistics.fmean(out['drift'][arm]):+.4f}"
        lines.append(f"| {arm} | " + " | ".join([*row, f"{cells[6]:.3f}", f"{cells[7]:.1f}", drift]) + " |")
    lines += [
        "",
        "Paired differences (percentage points; mean [95% t-interval])",
        "",
        *table_head("comparison", "object", "position", "number", "attribute", "all", "recall"),
    ]
    for name, table in out["differences"].items():
        keys = [*ENDPOINTS, "object_recall"] if "object_recall" in table else ENDPOINTS
        cells = [points(table[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells + [""] * (6 - len(cells))) + " |")
    lines += [
        "",
        "Primary family (Holm over 3, α 0.05)",
        "",
        *table_head("hypothesis", "test", "p", "p (Holm)", "outcome", "sign p", "permutation p", "robustness"),
    ]
    for name, h in out["primary_family"].items():
        lines.append(
            f"| {name} | {h['test']} | {h['p']:.4f} | {h['p_holm']:.4f} | **{h['outcome']}** | {h['sign_p']:.4f} | "
            f"{h['permutation_p']:.4f} | {h['robustness']} |"
        )
    lines += [
        "",
        "Secondary (numbers, attributes; two-sided, Holm over 2): "
        + ", ".join(
            f"{k} p {v['p']:.3f} (Holm {v['p_holm']:.3f})" for k, v in out["secondary_numbers_attributes"].items()
        ),
        "",
    ]
    if out["secondary_pairs_vs_steps"]:
        lines += [
            'Pairs vs steps (secondary family, Holm over 4; one-sided, H_a: fewer pairs -> higher "all" rate; '
            "the 800-pair rows are described, not tested)",
            "",
            *table_head("comparison", "difference (points)", "p", "p (Holm)", "outcome", "sign p", "permutation p"),
        ]
        for name, h in {**out["secondary_pairs_vs_steps"], **out["pairs_vs_steps_described"]}.items():
            cell = points(h)
            tested = [f"{h[k]:.4f}" for k in ("p", "p_holm")] + [h["outcome"]] if "p" in h else ["–"] * 3
            extra = [f"{h[k]:.4f}" for k in ("sign_p", "permutation_p")] if "p" in h else ["–"] * 2
            lines.append(f"| {name} | {cell} | " + " | ".join(tested + extra) + " |")
        lines.append("")
    if out["secondary_beta_control"]:
        chosen = out["tuning"]["beta_control"]["chosen"]
        lines += [
            "β control (secondary family, Holm over 6; one-sided, DDPO below DPO tuned over β and lr; tuned points "
            + ", ".join(f"{a} β {c['beta']:g} lr {c['lr']:g}" for a, c in chosen.items())
            + ")",
            "",
            *table_head("comparison", "difference (points)", "p", "p (Holm)", "outcome", "sign p", "permutation p"),
        ]
        lines += [tested_row(name, h) for name, h in out["secondary_beta_control"].items()]
        lines.append("")
    if "secondary_methods" in out:
        lines += methods_report(out["secondary_methods"])
    return "\n".join(lines)


def methods_report(methods: dict) -> list[str]:
    family = methods["family"]
    lines = [
        f"Methods family (secondary, Holm over {len(family)}; two-sided paired t, recipe - dpo_mean; lr per recipe "
        + ", ".join(f"{r} {lr:g}" for r, lr in methods["lr"].items())
        + ")",
        "",
        *table_head("comparison", "difference (points)", "p", "p (Holm)", "outcome", "sign p", "permutation p"),
    ]
    lines += [tested_row(name, h) for name, h in family.items()]
    lines += [f"| {r}: not tested ({why}) | | | | | | |" for r, why in methods["not_tested"].items()]
    lines += [
        "",
        "Methods, described (percentage points; mean [95% t-interval]; against `dpo`, the recipes' own summed DPO "
        "at β 0.1: what each recipe's parts add)",
        "",
        *table_head("comparison", "object", "position", "number", "attribute", "all", "recall"),
    ]
    for name, d in methods["described"].items():
        lines.append(f"| {name} | " + " | ".join(points(d[k]) for k in [*ENDPOINTS, "object_recall"]) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("tune", "tune-beta", "tune-methods", "choose", "test", "analyse"))
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--output-dir", default="runs/lab_v3")
    parser.add_argument("--results", default=str(RESULTS), help="where tuning.json is written and read")
    parser.add_argument("--count", type=int, default=8, help="analyse: the first N seeds that passed the gate")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--with-pairs", action="store_true", help="test: add the pairs-vs-steps arms")
    parser.add_argument("--with-methods", action="store_true", help="test: add the methods family's recipes")
    args = parser.parse_args(argv)
    commands = {
        "tune": tune,
        "tune-beta": tune,
        "tune-methods": tune,
        "choose": choose,
        "test": test,
        "analyse": analyse,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
