"""Where does dense weighting act? DDPO vs DPO over answer length and normalisation, on the v2 world.

    # every (seed, length) point: its SFT model, on-policy pairs, the runs of the chosen parts, eval
    python -m experiments.dense_regime run --seeds 0 1 3 4 5 --lengths 120 15 55 \
        --parts primary matched --reuse-middle runs/synthetic_v2     # then: sum sumtuned / gamma rescaled / segments
    # tables and plots from the finished points (or, without run directories, from the committed json)
    python -m experiments.dense_regime aggregate

Design (pre-registered in experiments/results/dense_regime/README.md before any test number was read):
  per (seed, length)   one SFT model. The 55-word one is the v2 lab's (experiments/synthetic_v2.py;
                       `--reuse-middle` links its SFT model, pairs and identical runs instead of
                       retraining them); the 15- and 120-word ones continue its supervised fine-tuning
                       for SFT_STEPS steps on captions of that length (its perception kept), and must pass
                       the same perception gate. Pairs are on-policy: the model's own sampled answers,
                       minimally corrected by the oracle (the demo's sample and annotate stages).
  per run              one `ddpo train` from that SFT model on those pairs, through the sweep launcher
                       (ddpo/sweep.py), evaluated greedily on the seed's validation and test images.
Runs (parts): every lr is the v2 lab's validation choice at 55 words, never re-tuned here.
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

from ddpo import sweep
from ddpo.config import save_config
from ddpo.lab.demo import DemoSettings, GateError, run, train_config
from experiments.synthetic_v2 import (
    CLAIM_ERRORS,
    PRIMARY,
    answer_tokens,
    fmt,
    holm,
    interval,
    matched_differences,
    p_value,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "dense_regime"
MIDDLE = 55  # the v2 lab's answer length (target words)
SFT_STEPS = 300  # continued SFT at another length, from the 55-word model
BETA, LR, LR_HIGH, LR_SUM_DDPO = 0.5, 3e-6, 1e-5, 3e-5  # LR_SUM_DDPO: DDPO-sum's own validation lr at 55 words
PARTS = ("primary", "matched", "gamma", "sum", "rescaled", "sumtuned", "segments")
PRIMARY_LENGTH = 120  # the pre-registered endpoint: ddpo_mean_g5 - dpo_mean at the longest answers
# run -> (gamma, normalisation, lr, beta rescaled by length?)
RUNS = {
    "primary": {"dpo_mean": (1.0, "mean", LR, False), "ddpo_mean_g5": (5.0, "mean", LR, False)},
    "matched": {"dpo_mean_lr1e-05": (1.0, "mean", LR_HIGH, False)},
    "gamma": {"ddpo_mean_g2": (2.0, "mean", LR, False), "ddpo_mean_g10": (10.0, "mean", LR, False)},
    "sum": {
        "dpo_sum": (1.0, "sum", LR, False),
        "ddpo_sum_g5": (5.0, "sum", LR, False),
        "dpo_sum_lr1e-05": (1.0, "sum", LR_HIGH, False),
    },
    "rescaled": {"dpo_rescaled": (1.0, "mean", LR, True), "ddpo_rescaled_g5": (5.0, "mean", LR, True)},
    "sumtuned": {
        "ddpo_sum_g5_lr3e-05": (5.0, "sum", LR_SUM_DDPO, False),
        "dpo_sum_lr3e-05": (1.0, "sum", LR_SUM_DDPO, False),
    },
}
LAB_NAMES = {"ddpo_sum_g5_lr3e-05": "ddpo_sum_g5_tuned"}  # the lab's name for the same run, where it differs
# Corrected segments per pair, controlled by selection (55 words only: the most pairs): the first
# SEGMENT_PAIRS pairs of the point with exactly one segment, and the first with two or more, as the
# trainer's diff counts them (data/synthetic/pairs.py diff_segments). 430: the fewest one-segment pairs
# of any seed is 433.
SEGMENT_SUBSETS = {"one": (1, 1), "multi": (2, 10**6)}
SEGMENT_PAIRS = 430
SEGMENT_RUNS = ("dpo_mean", "ddpo_mean_g5", "ddpo_sum_g5_lr3e-05", "dpo_sum_lr1e-05", "dpo_sum_lr3e-05")
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


def point_dir(root: Path, seed: int, length: int) -> Path:
    return root / f"seed{seed}" / f"words{length}"


def methods(parts: list[str], tokens: float, segment_files: dict[str, Path] | None = None) -> dict[str, dict]:
    """Each part's runs as `ddpo train` overrides; `segments` trains SEGMENT_RUNS on each subset file."""
    runs = {name: spec for part in parts if part != "segments" for name, spec in RUNS[part].items()}
    out = {name: override(*spec, tokens) for name, spec in runs.items()}
    if "segments" in parts and segment_files:
        all_runs = {name: spec for part in RUNS.values() for name, spec in part.items()}
        for subset, path in segment_files.items():
            for name in SEGMENT_RUNS:
                out[f"{name}_seg{subset}"] = {
                    **override(*all_runs[name], tokens),
                    "data.path": str(path),
                    "train.reference_cache": str(path.parent / f"reference_cache_{subset}"),
                }
    return out


def override(gamma: float, norm: str, lr: float, rescaled: bool, tokens: float) -> dict:
    return {
        "loss.gamma": gamma,
        "loss.normalize": norm,
        "train.learning_rate": lr,
        "loss.beta": round(BETA * tokens, 2) if rescaled else BETA,
    }


def segment_subsets(out: Path) -> dict[str, Path]:
    """The point's pairs split by corrected segments per pair -> out/segment_pairs/<subset>.jsonl
    (SEGMENT_PAIRS each, file order; images stay in the point's pairs/images)."""
    from ddpo.data.synthetic.language import n_words
    from ddpo.data.synthetic.pairs import diff_segments

    rows = [json.loads(line) for line in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    diffs = [diff_segments(r["rejected"], r["chosen"]) for r in rows]
    files, stats = {}, {}
    for subset, (low, high) in SEGMENT_SUBSETS.items():
        chosen = [i for i, (segments, _) in enumerate(diffs) if low <= segments <= high][:SEGMENT_PAIRS]
        if len(chosen) < SEGMENT_PAIRS:
            raise ValueError(f"{out}: only {len(chosen)} pairs with {low}-{high} segments, {SEGMENT_PAIRS} needed")
        files[subset] = out / "segment_pairs" / f"{subset}.jsonl"
        files[subset].parent.mkdir(exist_ok=True)
        files[subset].write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
        stats[subset] = {
            "segments_per_pair": statistics.fmean(diffs[i][0] for i in chosen),
            "corrected_word_share": sum(diffs[i][1] for i in chosen)
            / sum(n_words(rows[i]["rejected"]) for i in chosen),
        }
    (out / "segment_pairs" / "stats.json").write_text(json.dumps(stats, indent=2))
    return files


def link_middle(point: Path, lab: Path) -> None:
    """The 55-word point is the v2 lab's seed directory: link its SFT model, gate, pairs, reference cache
    and the runs whose settings are identical (same names there), so they are not retrained."""
    point.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "gate.json", "pairs", "reference_cache"):
        if not (point / name).exists() and (lab / name).exists():
            (point / name).symlink_to((lab / name).resolve())
    (point / "runs").mkdir(exist_ok=True)
    for part in ("primary", "matched", "gamma", "sum", "sumtuned"):
        for name in RUNS[part]:
            twin = lab / "runs" / LAB_NAMES.get(name, name)
            if (twin / "final").is_dir() and not (point / "runs" / name).exists():
                (point / "runs" / name).symlink_to(twin.resolve(), target_is_directory=True)


def settings_for(root: Path, seed: int, length: int, num_threads: int) -> DemoSettings:
    middle_sft = point_dir(root, seed, MIDDLE) / "sft"
    other = {} if length == MIDDLE else dict(sft_init=str(middle_sft), sft_steps=SFT_STEPS)
    return DemoSettings(
        output_dir=str(point_dir(root, seed, length)),
        seed=seed,
        answer_words=length,
        sampled_eval=False,
        num_threads=num_threads,
        **other,
    )


def run_point(root: Path, seed: int, length: int, parts: list[str], lab: Path | None, num_threads: int) -> None:
    out = point_dir(root, seed, length)
    if lab is not None:  # every length starts from the lab's 55-word SFT model
        link_middle(point_dir(root, seed, MIDDLE), lab / f"seed{seed}")
    settings = settings_for(root, seed, length, num_threads)
    run(settings, ["sft", "gate", "sample", "annotate"])  # raises GateError if the SFT model misses the gate
    subsets = segment_subsets(out) if "segments" in parts and length == MIDDLE else None
    tokens = answer_tokens(out / "pairs" / "train.jsonl")
    settings.methods = methods(parts, tokens, subsets)
    train_runs(settings, out)
    # results.json holds every finished run of the point, not only this call's parts; only runs
    # without an up-to-date eval.json are evaluated
    made = {k: f for k in SEGMENT_SUBSETS if (f := out / "segment_pairs" / f"{k}.jsonl").is_file()}
    settings.methods = {
        m: o for m, o in methods(list(PARTS), tokens, made).items() if (out / "runs" / m / "final").is_dir()
    }
    run(settings, ["eval"])


def train_runs(settings: DemoSettings, out: Path) -> None:
    """The point's runs through the sweep launcher (inline: one process, no start-up per run): one resolved
    config.yaml per run under out/runs/<name>; finished runs skipped, interrupted ones resumed."""
    base = out / "runs" / "base.yaml"
    base.parent.mkdir(parents=True, exist_ok=True)
    save_config(train_config(settings, out, out / "runs", {}), base)
    spec = sweep.SweepSpec(
        base=str(base), output_dir=out / "runs", grid={}, seeds=None, overrides={}, eval_files=[], plot_metrics=[]
    )
    points = [
        sweep.Point(m, dict(overrides), out / "runs" / m)
        for m, overrides in settings.methods.items()
        if not (out / "runs" / m / "final").is_dir()
    ]
    sweep.write_configs(spec, points)
    failed = sweep.launch(
        spec, points, lambda p: sweep.command(p, "inline"), dry_run=False, world_size=None, inline=True
    )
    if failed:
        raise RuntimeError(
            f"{out}: run(s) {', '.join(failed)} failed (see their train.log); rerun the same command to resume"
        )


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def collect(root: Path, seeds: list[int], lengths: list[int]) -> dict:
    """{length: {"seeds": [...], "pairs": [stats per seed], "gate": [...], "test"/"validation": {run: {metric:
    [per seed]}}, "drift": {run: [per seed]}}} over the seeds whose point has results.json."""
    table = {}
    for length in lengths:
        done = [
            (s, json.loads(f.read_text()))
            for s in seeds
            if (f := point_dir(root, s, length) / "results.json").is_file()
        ]
        if not done:
            continue
        runs = [r for r in done[0][1]["methods"] if all(r in res["methods"] for _, res in done)]
        table[str(length)] = {
            "seeds": [s for s, _ in done],
            "pairs": [res["pairs"] for _, res in done],
            "gate": [res.get("gate", {}) for _, res in done],
            "test": {
                r: {k: [res["methods"][r][k] for _, res in done] for k in (*REPORTED, "mean_response_words")}
                for r in runs
            },
            "validation": {r: {k: [res["validation"][r][k] for _, res in done] for k in REPORTED} for r in runs},
            "drift": {r: [res["drift"][r] for _, res in done] for r in runs},
            "segment_pairs": [
                json.loads(f.read_text())
                for s, _ in done
                if (f := point_dir(root, s, length) / "segment_pairs" / "stats.json").is_file()
            ],
        }
    return table


def gaps(point: dict, split: str) -> dict:
    """DDPO - DPO per seed (same normalisation, same lr) for every metric: {run: {metric: (mean, lo, hi, p)}}."""
    runs = point[split]
    out = {}
    for run_name, dpo in GAPS.items():
        if run_name in runs and dpo in runs:
            out[run_name] = {
                k: (*interval(d := [a - b for a, b in zip(runs[run_name][k], runs[dpo][k])]), p_value(d))
                for k in runs[run_name]
            }
    return out


def matched(point: dict) -> dict:
    """DDPO - DPO with DPO read at DDPO's drift (piecewise linear over DPO's lr ladder, per seed)."""
    out = {}
    for run_name, ladder in MATCHED.items():
        ladder = [n for n in ladder if n in point["test"]]
        if run_name not in point["test"] or len(ladder) < 2:
            continue
        row = {
            "drift": statistics.fmean(point["drift"][run_name]),
            "dpo_drift": [statistics.fmean(point["drift"][n]) for n in ladder],
        }
        for key in (PRIMARY, "object_recall"):
            seeds = range(len(point["seeds"]))
            diffs, outside = matched_differences(
                [[(point["drift"][n][i], point["test"][n][key][i]) for n in ladder] for i in seeds],
                point["drift"][run_name],
                point["test"][run_name][key],
            )
            row[key] = (*interval(diffs), p_value(diffs))
            if key == PRIMARY:
                row["per_seed"], row["extrapolated"] = diffs, outside
        out[run_name] = row
    return out


def corrected_share(pairs: list[dict]) -> float:
    return statistics.fmean(p["corrected_word_share"] for p in pairs)


def weighted_share(share: float, gamma: float) -> float:
    """The share of the summed token weight on corrected tokens at gamma: where the loss's gradient goes."""
    return gamma * share / (gamma * share + 1 - share)


def mean_sd(values: list[float], digits: int = 3) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.{digits}f}"


def report(table: dict, command: str) -> str:
    primary_key = (str(PRIMARY_LENGTH), "ddpo_mean_g5")
    all_gaps = {length: gaps(p, "test") for length, p in table.items()}
    all_matched = {length: matched(p) for length, p in table.items()}
    family = {
        f"{length} words: {r} - {GAPS[r]}": g[PRIMARY][3]
        for length, rows in all_gaps.items()
        for r, g in rows.items()
        if (length, r) != primary_key
    }
    family.update(
        {
            f"{length} words: {r} at matched drift": row[PRIMARY][3]
            for length, rows in all_matched.items()
            for r, row in rows.items()
        }
    )
    adjusted = holm(family)
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
        "| target words | seeds | SFT answer words (test) | rejected words (pairs) | pairs | segments / pair | corrected words | "
        "weight on corrected, gamma 5 | gate: single-object / recall w/o anchor / companion |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length, p in table.items():
        share = corrected_share(p["pairs"])
        gate = " / ".join(
            mean_sd([g[k] for g in p["gate"] if g])
            for k in ("single_object_accuracy", "recall_without_anchor", "companion_rate")
        )
        lines.append(
            f"| {length} | {len(p['seeds'])} | {mean_sd(p['test']['sft']['mean_response_words'], 1)} | "
            f"{mean_sd([x['rejected_words'] for x in p['pairs']], 1)} | {statistics.fmean(x['pairs_used'] for x in p['pairs']):.0f} | "
            f"{mean_sd([x['segments_per_pair'] for x in p['pairs']], 2)} | {share:.1%} | {weighted_share(share, 5):.1%} | {gate} |"
        )
    lines += [
        "",
        "## The map: DDPO - DPO at equal lr",
        "",
        "| target words | comparison | mention hall. | p (Holm) | companion rate | recall | attribute err | position err | count err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length, rows in all_gaps.items():
        for r, g in rows.items():
            label = f"{length} words: {r} - {GAPS[r]}"
            p = f"{g[PRIMARY][3]:.3f} (primary)" if (length, r) == primary_key else f"{adjusted[label]:.3f}"
            lines.append(
                f"| {length} | {r} - {GAPS[r]} | {fmt(*g[PRIMARY][:3])} | {p} | {fmt(*g['companion_rate'][:3])} | "
                f"{fmt(*g['object_recall'][:3])} | " + " | ".join(fmt(*g[k][:3]) for k in CLAIM_ERRORS[:3]) + " |"
            )
    lines += [
        "",
        "## At matched drift: DDPO minus DPO read at DDPO's drift (DPO's lr ladder: mean 3e-6, 1e-5; sum 3e-6, 1e-5, 3e-5; "
        "piecewise linear per seed, extrapolated beyond the ladder where counted)",
        "",
        "| target words | run | drift (DDPO) | DPO ladder drift | mention hall. | p (Holm) | recall | extrapolated seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, p in table.items():
        for r, row in all_matched[length].items():
            lines.append(
                f"| {length} | {r} | {row['drift']:+.3f} | {', '.join(f'{d:+.3f}' for d in row['dpo_drift'])} | "
                f"{fmt(*row[PRIMARY][:3])} | {adjusted[f'{length} words: {r} at matched drift']:.3f} | {fmt(*row['object_recall'][:3])} | "
                f"{row['extrapolated']} |"
            )
    lines += segment_lines(table, all_matched.get(str(MIDDLE), {}))
    lines += [
        "",
        "## Validation: DDPO - DPO at equal lr",
        "",
        "| target words | comparison | mention hall. | recall |",
        "|---|---|---|---|",
    ]
    for length, p in table.items():
        for r, g in gaps(p, "validation").items():
            lines.append(f"| {length} | {r} - {GAPS[r]} | {fmt(*g[PRIMARY][:3])} | {fmt(*g['object_recall'][:3])} |")
    lines += ["", "## Every run (test, greedy): mean ± std over seeds", ""]
    for length, p in table.items():
        lines += [
            f"### {length} target words ({statistics.fmean(p['test']['sft']['mean_response_words']):.1f} measured; seeds {p['seeds']})",
            "",
            "| run | mention hall. | response hall. | companion rate | recall | words | drift |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, m in p["test"].items():
            lines.append(
                f"| {r} | {mean_sd(m[PRIMARY])} | {mean_sd(m['response_hallucination_rate'])} | {mean_sd(m['companion_rate'])} | "
                f"{mean_sd(m['object_recall'])} | {mean_sd(m['mean_response_words'], 1)} | {statistics.fmean(p['drift'][r]):+.3f} |"
            )
        lines.append("")
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
        f"## Corrected segments per pair, controlled by selection ({MIDDLE}-word target, {SEGMENT_PAIRS} pairs per subset)",
        "",
        "Subsets (mean over seeds): "
        + "; ".join(
            f"{k}: {seg:.2f} segments per pair, {share:.1%} of rejected words corrected"
            for k, (seg, share) in stats.items()
        ),
        "",
        "| comparison | one segment | two or more | several - one |",
        "|---|---|---|---|",
    ]
    test = point["test"]
    rows = {
        "mean, equal lr: ddpo_mean_g5 - dpo_mean": {
            k: [a - b for a, b in zip(test[f"ddpo_mean_g5_seg{k}"][PRIMARY], test[f"dpo_mean_seg{k}"][PRIMARY])]
            for k in SEGMENT_SUBSETS
            if f"ddpo_mean_g5_seg{k}" in test and f"dpo_mean_seg{k}" in test
        }
    }
    rows["sum at matched drift: ddpo_sum_g5_lr3e-05 - DPO"] = {
        k: drift[f"ddpo_sum_g5_lr3e-05_seg{k}"]["per_seed"]
        for k in SEGMENT_SUBSETS
        if f"ddpo_sum_g5_lr3e-05_seg{k}" in drift
    }
    for label, per_subset in rows.items():
        if len(per_subset) == 2:
            contrast = [m - o for m, o in zip(per_subset["multi"], per_subset["one"])]
            lines.append(
                f"| {label} | {fmt(*interval(per_subset['one']))} | {fmt(*interval(per_subset['multi']))} | {fmt(*interval(contrast))} |"
            )
    return lines


def plot(table: dict, path: Path) -> None:
    """DDPO - DPO against measured answer length: at equal lr, and at matched drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    marker="o",
                    capsize=3,
                    color=colors[r],
                    label=r if title == "matched drift" else f"{r} - {GAPS[r]}",
                )
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(
            xlabel="SFT answer words (measured, greedy test)",
            ylabel="DDPO - DPO, mention-level hallucination",
            title=f"test, {title} (95% t-interval over seeds)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "aggregate"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 3, 4, 5])
    parser.add_argument("--lengths", type=int, nargs="+", default=[120, 15, MIDDLE])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--output-dir", default="runs/dense_regime")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--reuse-middle", default=None, help="the v2 lab's output directory (runs/synthetic_v2): its 55-word points"
    )
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    root, results = Path(args.output_dir), Path(args.results)
    if args.command == "run":
        started = time.perf_counter()
        for seed in args.seeds:
            for length in args.lengths:
                try:
                    run_point(
                        root,
                        seed,
                        length,
                        args.parts,
                        Path(args.reuse_middle) if args.reuse_middle else None,
                        args.num_threads,
                    )
                except GateError as error:  # that point's lab is invalid; the others still run
                    print(f"seed {seed}, {length} words: {error}", flush=True)
        print(f"done in {time.perf_counter() - started:.0f} s")
        return 0
    table = collect(root, args.seeds, sorted(args.lengths))
    if not table and (results / "results.json").is_file():  # no run directories: the committed per-seed values
        table = json.loads((results / "results.json").read_text())
    if not table:
        print(f"no finished points under {root} and no {results / 'results.json'}", file=sys.stderr)
        return 2
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(table, indent=2))
    (results / "results.md").write_text(
        report(table, "python -m experiments.dense_regime " + " ".join(sys.argv[1:] if argv is None else argv))
    )
    plot(table, results / "gap_vs_length.png")
    print((results / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
