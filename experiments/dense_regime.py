"""When does dense weighting beat vanilla DPO? A map over answer length, corrected segments,
normalisation and gamma, on the synthetic world.

    python experiments/dense_regime.py                  # default grid: 2 lengths x 2 segment levels, ~30 min
    python experiments/dense_regime.py --grid full      # 4 lengths x 3 segment levels x 4 gammas, ~2 h
    python experiments/dense_regime.py --grid corners --sft-from runs/dense_regime/full
                                                        # the full grid's corners at 1.4k pairs, 30 min
    python experiments/dense_regime.py --aggregate-only # tables and plots from the finished points (or, without
                                                        # run directories, from the committed results.json)

Design (one seed = one independent replicate; nothing is chosen per seed):
  per (seed, answer length)       one SFT model: the demo's SFT stage in the study world, whose captions
                                  carry the world's systematic biases (noise.py);
  per (.., segments per answer)   one set of preference pairs: captions with that many errors per answer
                                  on average in RLHF-V's correction-type mix (the types a length cannot
                                  hold, e.g. relations in short answers, spread over the others), chosen
                                  = the oracle's minimal correction (renames, rewrites, deleted clauses);
  per (.., normalisation, gamma)  one `ddpo train` run from that SFT model on those pairs (gamma 1 =
                                  vanilla DPO), launched by the sweep launcher (ddpo/sweep.py; its
                                  resolved config.yaml in runs/<method>/; `--launcher local|deepspeed` for a
                                  process per run) and evaluated greedily on the seed's validation and test images.

Every run uses the same fixed budget (configs/synthetic/demo.yaml: 2 epochs, lr 1e-5, beta 0.5 with
summed log-probs), fixed before any test metric was looked at. With the mean, beta is 0.5 x the
point's mean answer length in tokens: a mean log-prob is that many times smaller than the sum and
the DPO gradient scales with beta, so both normalisations start at the same step size. Results: RESULTS/results.md (per point: each run's metrics as
mean ± std over seeds, and the DDPO - DPO difference with a 95% t-interval over seeds), results.json,
and gap_vs_length.png / gap_vs_segments.png / gap_vs_corrected_share.png.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import statistics
import sys
import time
from pathlib import Path

from ddpo import sweep
from ddpo.config import save_config
from ddpo.lab.demo import DemoSettings, run, train_config

REPO = Path(__file__).resolve().parents[1]

# The study world: up to 5 objects and biases on every shape, more colours and every non-centre cell,
# so that long answers have room for several corrected segments of every type.
WORLD = {"max_objects": 5, "partners": {"circle": "square", "square": "circle", "triangle": "diamond", "diamond": "triangle"}}
NOISE = {
    "color_confusions": {"pink": "red", "purple": "blue", "yellow": "green", "green": "yellow"},
    "position_bias": {"top center": "center", "middle left": "center", "middle right": "center", "bottom center": "center",
                      "top left": "top center", "top right": "top center", "bottom left": "bottom center", "bottom right": "bottom center"},
}
BETA = 0.5
GRIDS = {
    "default": dict(lengths=[15, 60], segments=[1.0, 4.0], gammas=[1.0, 5.0], seeds=[0, 1, 2], max_pairs=600),
    "full": dict(lengths=[15, 30, 60, 120], segments=[1.0, 2.5, 5.0], gammas=[1.0, 2.0, 5.0, 10.0], seeds=[0, 1, 2], max_pairs=600),
    # The full grid's corners at the paper's 1.4k pairs (86 steps), the budget at which the synthetic
    # ablation separates DPO and DDPO; the full grid's 600 pairs keep it under 3 hours, this one tests
    # whether a gap there is only too small to see. Fixed before the full grid's test numbers were read.
    "corners": dict(lengths=[15, 120], segments=[1.0, 5.0], gammas=[1.0, 5.0], seeds=[0, 1, 2], max_pairs=1400),
}
NORMALIZATIONS = ("sum", "mean")
# Sizes per point: smaller than the demo's so that the full grid fits in ~2 hours on 2 CPU cores.
SIZES = dict(sft_examples=6000, sft_steps=1200, val_images=200, test_images=400)
REPORTED = ("mention_hallucination_rate", "response_hallucination_rate", "object_recall")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # two-sided t quantiles


def method_name(norm: str, gamma: float) -> str:
    return f"{norm}_g{gamma:g}"


def methods(gammas: list[float], answer_tokens: float) -> dict[str, dict]:
    out = {}
    for norm in NORMALIZATIONS:
        for gamma in gammas:
            beta = BETA if norm == "sum" else round(BETA * answer_tokens, 1)
            out[method_name(norm, gamma)] = {"loss.gamma": gamma, "loss.normalize": norm, "loss.beta": beta}
    return out


def point_dir(root: Path, seed: int, length: int, segments: float) -> Path:
    return root / f"seed{seed}" / f"words{length}" / f"segments{segments:g}"


def run_point(root: Path, seed: int, length: int, segments: float, gammas: list[float], max_pairs: int,
              sft_from: Path | None = None, launcher: str = "inline") -> dict:
    """Train and evaluate every (normalisation, gamma) of one point; the SFT model is shared by all
    segment levels of a (seed, length) through a symlink to the first one's, or to `sft_from`'s (another
    grid's output directory: the SFT model depends only on the seed and the length)."""
    out = point_dir(root, seed, length, segments)
    sft_home = root / f"seed{seed}" / f"words{length}" / "sft"
    settings = DemoSettings.v1(output_dir=str(out), seed=seed, answer_words=length, world=WORLD, noise=NOISE,
                            pair_errors=segments, max_pairs=max_pairs, **SIZES)
    shared = sft_from / sft_home.relative_to(root) if sft_from else None
    if not (sft_home / "ddpo_model.json").is_file() and shared and (shared / "ddpo_model.json").is_file():
        sft_home.parent.mkdir(parents=True, exist_ok=True)
        sft_home.symlink_to(shared.resolve(), target_is_directory=True)
    if not (sft_home / "ddpo_model.json").is_file():
        run(DemoSettings(**{**settings.__dict__, "output_dir": str(sft_home.parent)}), ["sft"])
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "sft").exists():
        (out / "sft").symlink_to(sft_home.resolve(), target_is_directory=True)
    run(settings, ["annotate"])
    stats = json.loads((out / "pairs" / "stats.json").read_text())
    answer_tokens = 1.2 * stats["rejected_words"]  # + punctuation: ~1.2 tokens per word in this grammar
    settings.methods = methods(gammas, answer_tokens)
    train_runs(settings, out, launcher)
    return run(settings, ["eval"])


def train_runs(settings: DemoSettings, out: Path, launcher: str) -> None:
    """The point's (normalisation, gamma) runs through the sweep launcher: one resolved config.yaml per
    run under out/runs/<method> (where the eval stage looks), finished runs skipped, interrupted ones
    resumed; `launcher` as in ddpo/sweep.py (inline by default: no start-up cost per run)."""
    base = out / "runs" / "base.yaml"
    base.parent.mkdir(parents=True, exist_ok=True)
    save_config(train_config(settings, out, out / "runs", {}), base)
    spec = sweep.SweepSpec(base=str(base), output_dir=out / "runs", grid={}, seeds=None, overrides={},
                           eval_files=[], plot_metrics=[])
    points = [sweep.Point(m, dict(overrides), out / "runs" / m) for m, overrides in settings.methods.items()]
    sweep.write_configs(spec, points)
    failed = sweep.launch(spec, points, lambda p: sweep.command(p, launcher), dry_run=False, world_size=None,
                          inline=launcher == "inline")
    if failed:
        raise RuntimeError(f"{out}: run(s) {', '.join(failed)} failed (see their train.log); rerun the same command to resume")


def word_edits(pairs_file: Path) -> tuple[float, dict[str, int]]:
    """How the chosen answers differ from the rejected ones by a word diff: the mean share of the
    rejected answer's words changed (what dense weighting up-weights; the trainer diffs tokens, words
    are close here) and the number of edits of each kind (replace, delete, insert)."""
    shares, kinds = [], {"replace": 0, "delete": 0, "insert": 0}
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        rejected, chosen = row["rejected"].split(), row["chosen"].split()
        edits = [(op, i2 - i1) for op, i1, i2, _, _ in difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes()
                 if op != "equal"]
        shares.append(sum(n for _, n in edits) / max(len(rejected), 1))
        for op, _ in edits:
            kinds[op] += 1
    return statistics.fmean(shares), kinds


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, low, high, std): the mean, its 95% t-interval and the standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean, 0.0
    std = statistics.stdev(values)
    half = T95.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half, std


def aggregate(root: Path, grid: dict) -> dict:
    """{point: {pair statistics, "runs": {method: {metric: [per-seed values]}}}} from the finished
    points' results.json (a point missing for some seed is reported with the seeds it has)."""
    table: dict = {}
    for length in grid["lengths"]:
        for segments in grid["segments"]:
            key = f"words{length}_segments{segments:g}"
            done = [d for seed in grid["seeds"] if ((d := point_dir(root, seed, length, segments)) / "results.json").is_file()]
            if not done:
                continue
            results = [json.loads((d / "results.json").read_text()) for d in done]
            edits = [word_edits(d / "pairs" / "train.jsonl") for d in done if (d / "pairs" / "train.jsonl").is_file()]
            runs = {m: {k: [r["methods"][m][k] for r in results] for k in (*REPORTED, "mean_response_words")}
                    for m in results[0]["methods"]}
            validation = {m: {k: [r["validation"][m][k] for r in results] for k in REPORTED} for m in results[0]["validation"]}
            pair_stats = [r["pairs"] for r in results]
            table[key] = {
                "answer_words_target": length, "segments_target": segments, "seeds": len(results),
                "rejected_words": statistics.fmean(p["rejected_words"] for p in pair_stats),
                "corrections_per_pair": statistics.fmean(p["corrections_per_pair"] for p in pair_stats),
                "corrected_word_share": statistics.fmean(share for share, _ in edits) if edits else None,
                "edits": {k: sum(kinds[k] for _, kinds in edits) for k in ("replace", "delete", "insert")} if edits else None,
                "corrections": {t: sum(p["corrections"].get(t, 0) for p in pair_stats) for t in
                                sorted({t for p in pair_stats for t in p["corrections"]})},
                "runs": runs, "validation_runs": validation,
            }
    return table


def add_gaps(table: dict) -> dict:
    """Per point, DDPO - DPO of every gamma > 1 against gamma 1 with the same normalisation, seed by
    seed (the runs of a seed share the SFT model and the pairs): {method: {metric: interval(...)}},
    on the test split ("gaps") and, where the runs' validation metrics were kept, on validation."""
    for p in table.values():
        p["gaps"] = differences(p["runs"])
        if p.get("validation_runs"):
            p["validation_gaps"] = differences(p["validation_runs"])
    return table


def differences(runs: dict) -> dict:
    gaps = {}
    for m in runs:
        if m == "sft":  # the runs' shared starting point, not a DPO variant
            continue
        norm, gamma = m.rsplit("_g", 1)
        if float(gamma) != 1.0:
            dpo = runs[method_name(norm, 1.0)]
            gaps[m] = {k: interval([a - b for a, b in zip(runs[m][k], dpo[k])]) for k in REPORTED}
    return gaps


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def strongest_gamma(table: dict) -> float:
    return max(float(m.split("_g")[1]) for p in table.values() for m in p["gaps"])


def map_table(table: dict) -> list[str]:
    """The whole grid in one table: DDPO at the strongest gamma minus vanilla DPO, per point and normalisation."""
    gamma = strongest_gamma(table)
    head = " | ".join(f"{norm}: {k} [95% CI]" for norm in NORMALIZATIONS for k in ("mention", "response"))
    lines = [f"## Map: DDPO (gamma {gamma:g}) - DPO in hallucination rate", "",
             f"| words | segments | corrections / pair | corrected words | {head} |", "|---" * 8 + "|"]
    for p in table.values():
        cells = [f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]" for norm in NORMALIZATIONS
                 for g in (p["gaps"][method_name(norm, gamma)][k] for k in REPORTED[:2])]
        lines.append(f"| {p['answer_words_target']} | {p['segments_target']:g} | {p['corrections_per_pair']:.2f} | "
                     f"{p['corrected_word_share'] or 0:.1%} | " + " | ".join(cells) + " |")
    return lines


def command_line(results_dir: Path, command: str, elapsed: float | None) -> str:
    """The results' "Command:" line; re-aggregating keeps the line of the run that made the numbers."""
    previous = results_dir / "results.md"
    if elapsed is None and previous.is_file():
        kept = [line for line in previous.read_text().splitlines() if line.startswith("Command:")]
        if kept:
            return kept[0]
    return f"Command: `{command}`" + (f" ({elapsed / 60:.0f} min on this machine)" if elapsed else "")


def write_results(table: dict, results_dir: Path, command_line: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Dense regime: DDPO vs vanilla DPO over answer length and corrected segments", "", command_line, "",
             "Per point: greedy test answers of every run (mean ± std over seeds), then DDPO - DPO with the same",
             "normalisation (mean ± std and 95% t-interval over seeds; negative hallucination = DDPO better,",
             "positive recall = DDPO better).", ""]
    lines += [*map_table(table), ""]
    for key, p in table.items():
        lines += [f"## {p['answer_words_target']} target words, {p['segments_target']:g} segments per answer "
                  f"({p['seeds']} seeds; rejected answers {p['rejected_words']:.1f} words, "
                  f"{p['corrections_per_pair']:.2f} corrections per pair: {p['corrections']}; "
                  f"{p['corrected_word_share'] or 0:.0%} of the rejected words corrected"
                  + (f"; word edits {p['edits']}" if p.get("edits") else "") + ")", "",
                  "| run | mention halluc. | response halluc. | recall | words |", "|---|---|---|---|---|"]
        for m, v in p["runs"].items():
            lines.append(f"| {m} | {fmt(v['mention_hallucination_rate'])} | {fmt(v['response_hallucination_rate'])} | "
                         f"{fmt(v['object_recall'])} | {statistics.fmean(v['mean_response_words']):.1f} |")
        for split, gaps in (("test", p["gaps"]), ("validation", p.get("validation_gaps"))):
            if not gaps:
                continue
            lines += ["", f"| DDPO - DPO ({split}) | mention halluc. ± std [95% CI] | response halluc. ± std [95% CI] | "
                          "recall ± std [95% CI] |", "|---|---|---|---|"]
            for m, g in gaps.items():
                lines.append(f"| {m} | " + " | ".join(f"{g[k][0]:+.3f} ± {g[k][3]:.3f} [{g[k][1]:+.3f}, {g[k][2]:+.3f}]"
                                                      for k in REPORTED) + " |")
        lines.append("")
    (results_dir / "results.md").write_text("\n".join(lines))
    (results_dir / "results.json").write_text(json.dumps(table, indent=2))


def plot(table: dict, results_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gamma = strongest_gamma(table)  # the strongest weighting against vanilla DPO
    for axis, other, name in (("answer_words_target", "segments_target", "length"), ("segments_target", "answer_words_target", "segments")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, metric in zip(axes, ("mention_hallucination_rate", "object_recall")):
            for norm, style in zip(NORMALIZATIONS, ("-", "--")):
                for level in sorted({p[other] for p in table.values()}):
                    points = sorted((p[axis], p["gaps"][method_name(norm, gamma)][metric]) for p in table.values() if p[other] == level)
                    xs = [x for x, _ in points]
                    ax.errorbar(xs, [g[0] for _, g in points], yerr=[[g[0] - g[1] for _, g in points], [g[2] - g[0] for _, g in points]],
                                ls=style, marker="o", capsize=3, label=f"{norm}, {other.split('_')[0]} {level:g}")
            ax.axhline(0, color="gray", lw=0.8)
            ax.set(xlabel=axis.replace("_", " "), ylabel=f"DDPO(gamma {gamma:g}) - DPO", title=metric.replace("_", " "))
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results_dir / f"gap_vs_{name}.png", dpi=120)
        plt.close(fig)
    # The candidate explanation: how much of the answer the corrections cover.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, REPORTED[:2]):
        for norm, marker in zip(NORMALIZATIONS, ("o", "s")):
            points = sorted((p["corrected_word_share"] or 0.0, p["gaps"][method_name(norm, gamma)][metric]) for p in table.values())
            ax.errorbar([100 * x for x, _ in points], [g[0] for _, g in points], fmt=marker, capsize=3, label=norm,
                        yerr=[[g[0] - g[1] for _, g in points], [g[2] - g[0] for _, g in points]])
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="% of the rejected answer's words corrected", ylabel=f"DDPO(gamma {gamma:g}) - DPO", title=metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / "gap_vs_corrected_share.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the grid's seeds")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="override the grid's answer lengths")
    parser.add_argument("--segments", type=float, nargs="+", default=None, help="override the grid's errors per answer")
    parser.add_argument("--output-dir", default=None, help="default runs/dense_regime/<grid>")
    parser.add_argument("--results", default=None, help="default experiments/results/dense_regime/<grid>")
    parser.add_argument("--max-pairs", type=int, default=None, help="pairs per point (default: the grid's)")
    parser.add_argument("--sft-from", default=None, help="reuse the SFT models of another grid's output directory")
    parser.add_argument("--launcher", choices=sweep.LAUNCHERS, default="inline",
                        help="how the sweep launcher runs each training (ddpo/sweep.py); eval runs here")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args(argv)
    grid = dict(GRIDS[args.grid])
    for key in ("seeds", "lengths", "segments"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    root = Path(args.output_dir or f"runs/dense_regime/{args.grid}")
    results_dir = Path(args.results or REPO / "experiments" / "results" / "dense_regime" / args.grid)
    started = time.perf_counter()
    if not args.aggregate_only:
        for seed in grid["seeds"]:
            for length in grid["lengths"]:
                for segments in grid["segments"]:
                    run_point(root, seed, length, segments, grid["gammas"], args.max_pairs or grid["max_pairs"],
                              Path(args.sft_from) if args.sft_from else None, args.launcher)
    elapsed = None if args.aggregate_only else time.perf_counter() - started
    command = "python experiments/dense_regime.py " + " ".join(a for a in (sys.argv[1:] if argv is None else argv) if a != "--aggregate-only")
    table = aggregate(root, grid)
    if not table and args.aggregate_only and (results_dir / "results.json").is_file():
        # no run directories here (they are not committed): the committed results.json keeps every
        # run's per-seed values, enough to recompute the differences, tables and plots
        print(f"no finished points under {root}: re-aggregating {results_dir / 'results.json'}")
        table = json.loads((results_dir / "results.json").read_text())
    if not table:
        print(f"no finished points under {root} and no {results_dir / 'results.json'}", file=sys.stderr)
        return 2
    add_gaps(table)
    write_results(table, results_dir, command_line(results_dir, command.strip(), elapsed))
    if all(len({p[axis] for p in table.values()}) > 1 for axis in ("answer_words_target", "segments_target")):
        plot(table, results_dir)  # gaps across lengths and across segment levels: a grid needs both
    print((results_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
