"""Lab v3: DDPO vs vanilla DPO on RLHF-V Table 3's endpoints, under the pre-registration
(experiments/results/lab_v3/PREREGISTRATION.md).

    # 1. validation seeds: SFT model, gate, pairs, then the shared-lr grid (validation split only)
    python experiments/lab_v3.py tune --seeds 0 1 2 --output-dir runs/lab_v3
    python experiments/lab_v3.py choose --seeds 0 1 2 --output-dir runs/lab_v3   # -> results/lab_v3/tuning.json
    # 2. test seeds (after PREREGISTRATION.md is committed): every stage, the primary arms at the chosen lr
    python experiments/lab_v3.py test --seeds 100 101 102 103 --output-dir runs/lab_v3
    # 3. the pre-registered analysis of the first 8 seeds that pass the gate -> results.json, RESULTS.md
    python experiments/lab_v3.py analyse --seeds 100 101 102 103 104 105 106 107 --output-dir runs/lab_v3

Two processes on different seeds share a 2-core machine well (`--num-threads 1` each). A seed whose SFT model
misses the per-kind gate is recorded in its folder (`excluded.json`) and gets no arm; `analyse` names it, and
the pre-registration's rule replaces it with the next seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ddpo.data.synthetic.metrics import TABLE3_COLUMNS
from ddpo.lab.gate import GateError
from ddpo.lab.recipes import run_overrides
from ddpo.lab.report import format_interval, table_head
from ddpo.lab.selection import RECALL_SLACK
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run
from ddpo.lab.stats import (
    holm,
    interval,
    one_sided_p,
    p_value,
    paired_differences,
    permutation_p,
    sign_test_p,
    tost_p,
)

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "lab_v3"
LR_GRID = (3e-6, 1e-5, 3e-5)  # the v2 grid's useful range: from 1e-4 up the policies say "nothing" at real objects
ENDPOINTS = [f"{kind}_response_rate" for kind in TABLE3_COLUMNS]  # object, position, number, attribute, all
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


def primary_arms(lr: float) -> dict[str, dict]:
    """The paper's protocol (RLHF-V Eq. 5): weighted mean, β 0.5, one lr for both; DDPO γ 5, DPO γ 1."""
    return {"dpo_mean": run_overrides(1.0, "mean", lr), "ddpo_mean": run_overrides(5.0, "mean", lr)}


def grid_arms() -> dict[str, dict]:
    runs = {}
    for lr in LR_GRID:
        runs[f"dpo_mean_lr{lr:g}"] = run_overrides(1.0, "mean", lr)
        runs[f"ddpo_mean_lr{lr:g}"] = run_overrides(5.0, "mean", lr)
    return runs


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
    for seed in args.seeds:
        run_seed(seed_settings(args, seed, methods=grid_arms(), validation_only=True))
    return 0


def seed_mean(per_seed: list[dict], run_name: str, key: str) -> float:
    return statistics.fmean(v[run_name][key] for v in per_seed)


def choose(args) -> int:
    """The pre-registered validation rule: the lr with the lowest sum of DPO's and DDPO's seed-mean "all"
    rate among those where both keep seed-mean recall within RECALL_SLACK of the SFT model's; ties: smaller lr."""
    per_seed, used = [], []
    for seed in args.seeds:
        path = Path(args.output_dir) / f"seed{seed}" / "results.json"
        if path.is_file():
            per_seed.append(json.loads(path.read_text())["validation"])
            used.append(seed)
    if not per_seed:
        raise SystemExit(f"no tuned seed of {args.seeds} under {args.output_dir} (run `tune` first)")
    bar = seed_mean(per_seed, "sft", "object_recall") - RECALL_SLACK
    rows, keep = {}, []
    for lr in LR_GRID:
        names = (f"dpo_mean_lr{lr:g}", f"ddpo_mean_lr{lr:g}")
        rows[f"{lr:g}"] = {n: {k: seed_mean(per_seed, n, k) for k in REPORTED} for n in names}
        if all(rows[f"{lr:g}"][n]["object_recall"] >= bar for n in names):
            keep.append(lr)
    if not keep:
        raise SystemExit(f"no lr keeps both arms' recall within {RECALL_SLACK} of SFT's: widen the grid")
    lr = min(keep, key=lambda x: (sum(rows[f"{x:g}"][n][SELECTION] for n in rows[f"{x:g}"]), x))
    # the seed-to-seed SD of the paired differences at the chosen lr (what the seed count rests on)
    sd = (
        {
            k: statistics.stdev(
                paired_differences(
                    [v[f"ddpo_mean_lr{lr:g}"][k] for v in per_seed], [v[f"dpo_mean_lr{lr:g}"][k] for v in per_seed]
                )
            )
            for k in ENDPOINTS
        }
        if len(per_seed) > 1
        else {}
    )
    choice = {
        "seeds": used,
        "rule": f"lowest DPO + DDPO seed-mean {SELECTION} with both recalls >= SFT's - {RECALL_SLACK}",
        "sft": {k: seed_mean(per_seed, "sft", k) for k in REPORTED},
        "grid": rows,
        "lr": lr,
        "paired_difference_sd": sd,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tuning.json").write_text(json.dumps(choice, indent=2))
    print(json.dumps({"lr": lr, "seeds": used, "paired_difference_sd": sd}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------
# test seeds and the analysis
# ------------------------------------------------------------------------------------------------
def chosen_lr() -> float:
    path = RESULTS / "tuning.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `choose` on the validation seeds first")
    return json.loads(path.read_text())["lr"]


def test(args) -> int:
    for seed in args.seeds:
        run_seed(seed_settings(args, seed, methods=primary_arms(chosen_lr())))
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
    return {
        "test": "one-sided paired t, DDPO below DPO",
        "p": one_sided_p(diffs, below=True),
        "sign_p": sign_test_p(diffs, below=True),
        "permutation_p": permutation_p(diffs, below=True),
    }


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
    arms = ("sft", "dpo_mean", "ddpo_mean")
    values = {a: {k: [results[s]["methods"][a][k] for s in seeds] for k in REPORTED} for a in arms}
    sampled = {a: {k: [results[s]["sampled"][a][k] for s in seeds] for k in ENDPOINTS} for a in arms}

    def difference(a: str, b: str, table=values) -> dict:
        return {
            k: dict(zip(("mean", "low", "high"), interval(paired_differences(table[a][k], table[b][k]))))
            | {
                "per_seed": paired_differences(table[a][k], table[b][k]),
                "p_two_sided": p_value(paired_differences(table[a][k], table[b][k])),
            }
            for k in table[a]
        }

    diffs = difference("ddpo_mean", "dpo_mean")
    family = {name: hypothesis(diffs[endpoint]["per_seed"], kind) for name, endpoint, kind in PRIMARY_FAMILY}
    adjusted = holm({name: h["p"] for name, h in family.items()})
    for name, h in family.items():
        h["p_holm"] = adjusted[name]
        h["outcome"] = "hit" if adjusted[name] < ALPHA else "miss"
        fragile = h["outcome"] == "hit" and max(h["sign_p"], h["permutation_p"]) >= ALPHA
        h["robustness"] = "fragile (a distribution-free test misses)" if fragile else "consistent"
    secondary = {name: {"p": diffs[k]["p_two_sided"]} for name, k in SECONDARY_NUMBERS}
    for name, p in holm({n: s["p"] for n, s in secondary.items()}).items():
        secondary[name]["p_holm"] = p
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
            "ddpo_mean - dpo_mean (sampled T 0.7)": difference("ddpo_mean", "dpo_mean", sampled),
        },
        "primary_family": family,
        "secondary_numbers_attributes": secondary,
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "results.json").write_text(json.dumps(out, indent=2))
    (Path(args.results) / "RESULTS.md").write_text(report(out))
    print(report(out))
    return 0


def report(out: dict) -> str:
    """The tables of results.json: per-arm means, the paired differences with intervals, the family."""
    n = len(out["seeds"])
    lines = [
        f"# Lab v3 results: {n} test seeds {out['seeds']}, lr {out['lr']:g} (greedy, 600 test images per seed)",
        "",
        f"Excluded at the gate: {out['excluded_seeds'] or 'none'}. Rates are % of responses with at least one "
        "hallucination of the kind (RLHF-V Table 3); mean ± SD over seeds.",
        "",
        *table_head("arm", "object", "position", "number", "attribute", "all", "mention rate", "recall", "words"),
    ]
    for arm, table in out["greedy"].items():
        cells = [statistics.fmean(table[k]) for k in REPORTED]
        sds = [statistics.stdev(table[k]) if n > 1 else 0.0 for k in REPORTED]
        row = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(cells[:6], sds[:6])]
        lines.append(f"| {arm} | " + " | ".join([*row, f"{cells[6]:.3f}", f"{cells[7]:.1f}"]) + " |")
    lines += [
        "",
        "Paired differences (percentage points; mean [95% t-interval])",
        "",
        *table_head("comparison", "object", "position", "number", "attribute", "all", "recall"),
    ]
    for name, table in out["differences"].items():
        keys = [*ENDPOINTS, "object_recall"] if "object_recall" in table else ENDPOINTS
        cells = [
            format_interval(100 * table[k]["mean"], 100 * table[k]["low"], 100 * table[k]["high"], 1) for k in keys
        ]
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("tune", "choose", "test", "analyse"))
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--output-dir", default="runs/lab_v3")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--count", type=int, default=8, help="analyse: the first N seeds that passed the gate")
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    return {"tune": tune, "choose": choose, "test": test, "analyse": analyse}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
