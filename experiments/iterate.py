"""Iterative online DDPO (RLAIF-V's recipe) on the synthetic world: K rounds of sample -> label -> train.

    # v2 world (default; experiments/results/iterate_v2/README.md): 3 rounds against one round with the
    # same prompts (the union of the rounds') from the SFT model, the lab's SFT models copied in
    python experiments/iterate.py --seeds 0 1 3 --rounds 3 --one-round --sft-from runs/v2lab \
        --output-dir runs/iterate_v2 --num-threads 1 --results experiments/results/iterate_v2
    # v1 world (the negative control; its committed results in experiments/results/iterate)
    python experiments/iterate.py --world v1 --seeds 0 1 --rounds 4 --output-dir runs/iterate \
        --results experiments/results/iterate

Per seed, round 0 is the demo's SFT model (`ddpo demo` stage sft, trained if missing; v2: copied from
--sft-from DIR/seed<S> when given, and it must pass the perception gate). Round k = 1..K:

  1. sample  the current policy answers P fresh prompts (slice k of the demo's "preference" images),
             N samples each at temperature 0.7                                  (ddpo.online.best_of_n)
  2. label   a feedback source scores every sample: the oracle (with the world's reading of "at X is
             nothing."), or RLAIF-V's divide-and-conquer labeler with a model given by --labeler
                                                                                 (ddpo.online.feedback)
  3. pairs   score gap >= 1, 2 pairs per prompt, length balancing -> ROUND/pairs/ (JSONL + images)
                                                                                 (ddpo.online.pairs)
  4. train   `ddpo train` (the demo's config: v2 Eq. 5 mean, beta 0.5, lr 3e-6, 2 epochs) from the current
             policy; the reference is the current policy too: each round has its own cache directory,
             which the trainer fills from the model it starts from. Exports every 1/4 epoch (and at the end).
  5. select  every export answers the validation images greedily; the best becomes the next round's
             policy (ddpo/lab/selection.py `select_checkpoint`): v2, the lab's rule: the lowest mention-level
             hallucination among exports whose recall is within 0.02 of the SFT model's; v1, object recall
             minus response hallucination rate. Its test metrics are the round's row in the results.

--one-round: the same pipeline once from the SFT model on all K slices' prompts at once (about the same
pairs and optimizer steps as the K rounds together): is it the rounds or the data? After the rounds, the
checkpoint to ship is picked among rounds 0..K by the same rule on validation ("picked"). The test split
is only ever evaluated for models already chosen. Per round: test metrics (greedy), pairs, drift from the
SFT model (mean per-token log-ratio on the SFT model's greedy validation answers). A finished round
(ROUND/selected.json) is skipped when the command is rerun. Results: RESULTS/results.{md,json}, plot.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddpo.lab.evaluation import LOGPS_BATCH, drift, evaluate_model
from ddpo.lab.pairs import write_pairs
from ddpo.lab.report import format_interval, format_mean_std, metric_digits, pyplot, save_figure, table_head
from ddpo.lab.selection import select_checkpoint
from ddpo.lab.settings import DemoSettings, base_config, generation_options
from ddpo.lab.stages import run
from ddpo.lab.stats import holm, mean_std, paired_differences, paired_test
from ddpo.lab.world import split, synthetic_config
from ddpo.models.base import answer_token_logps
from ddpo.models.build import load_model
from ddpo.online.best_of_n import sample_candidates
from ddpo.online.feedback import (
    DivideAndConquerFeedback,
    ModelYesNoLabeler,
    OracleFeedback,
    Query,
    SyntheticClaimSplitter,
)
from ddpo.online.pairs import build_pairs
from ddpo.plan import run_plan
from ddpo.trainer import Trainer, TrainerCallback

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"

logger = logging.getLogger("iterate")
SHOWN = (
    "response_hallucination_rate",
    "mention_hallucination_rate",
    "object_recall",
    "mean_response_words",
    "attribute_error_rate",
    "position_error_rate",
    "count_error_rate",
)
SHOWN_V2 = (
    "mention_hallucination_rate",
    "response_hallucination_rate",
    "companion_rate",
    "object_recall",
    "mean_response_words",
    "attribute_error_rate",
    "position_error_rate",
    "count_error_rate",
    "empty_error_rate",
)
DIFFERENCE_METRICS = (
    "mention_hallucination_rate",
    "response_hallucination_rate",
    "companion_rate",
    "object_recall",
    "position_error_rate",
    "attribute_error_rate",
    "mean_response_words",
)


class ExportAtCheckpoints(TrainerCallback):
    """Export the policy (HF format, `load_model`-able) at every checkpoint, so each can be evaluated:
    DeepSpeed states alone cannot be loaded by evaluation."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        trainer.save(trainer.output_dir / "exports" / f"step-{trainer.step:06d}")


@dataclass
class Seed:
    """What every round of one seed shares."""

    settings: DemoSettings
    template: str
    feedback: object
    sft_validation: dict


def make_feedback(args: argparse.Namespace, template: str, settings: DemoSettings):
    if args.feedback == "oracle":
        return OracleFeedback(synthetic_config(settings).empty_cells)
    if not args.labeler:
        raise SystemExit("--feedback divide-and-conquer needs --labeler DIR (a model directory that load_model reads)")
    return DivideAndConquerFeedback(SyntheticClaimSplitter(), ModelYesNoLabeler(load_model(args.labeler), template))


def train_round(args, settings: DemoSettings, base: Path, train_file: Path, num_pairs: int, out: Path) -> list[Path]:
    """`ddpo train` from `base` on the round's pairs with exports every 1/4 epoch; the exports, in step order."""
    overrides = [
        "--model.name_or_path",
        str(base),
        "--data.format",
        "jsonl",
        "--data.path",
        str(train_file),
        "--data.image_dir",
        str(train_file.parent / "images"),
        "--train.output_dir",
        str(out),
        "--train.seed",
        str(settings.seed),
        "--train.reference_cache",
        str(out / "reference_cache"),
        "--train.num_threads",
        str(settings.num_threads),
        "--train.epochs",
        str(args.epochs),
        "--train.max_steps",
        str(args.max_steps),
        "--train.save_total_limit",
        "1",
        "--loss.gamma",
        str(args.gamma),
        "--logging.progress_bar",
        "false",
        *settings.train_overrides,
    ]
    cfg = base_config(settings, *overrides)
    plan = run_plan(cfg, num_pairs)
    shutil.rmtree(out, ignore_errors=True)  # an interrupted round restarts clean (no stale exports)
    cfg.train.save_steps = max(1, round(plan.steps_per_epoch / 4))
    Trainer(cfg, callbacks=[ExportAtCheckpoints()]).train()
    return sorted((out / "exports").iterdir())


def label_and_pair(args, seed: Seed, data: tuple, candidates: list[list[str]], sample_seed: int):
    """Feedback scores of every sample -> pairs (score gap >= 1, length balanced) and their statistics."""
    scores = [
        seed.feedback.score(Query(image, prompt, {"scene": scene}), group)
        for scene, image, prompt, group in zip(*data, candidates)
    ]
    return build_pairs(candidates, scores, per_prompt=args.pairs_per_prompt, seed=sample_seed)


def run_round(args, seed: Seed, directory: Path, base: Path, prompt_range: tuple[int, int], sample_seed: int) -> dict:
    """One sample -> label -> pairs -> train -> select round from `base` on the preference images
    [lo, hi) -> its record (cached in DIRECTORY/selected.json)."""
    if (directory / "selected.json").is_file():
        return json.loads((directory / "selected.json").read_text())
    started = time.perf_counter()
    settings, template = seed.settings, seed.template
    lo, hi = prompt_range
    scenes, images, prompts, _ = split(settings, "preference", args.prompts * args.rounds)
    scenes, images, prompts = scenes[lo:hi], images[lo:hi], prompts[lo:hi]
    options = replace(generation_options(settings, template), temperature=args.temperature, seed=sample_seed)
    candidates = sample_candidates(load_model(base), images, prompts, args.samples, options)
    pairs, pair_stats = label_and_pair(args, seed, (scenes, images, prompts), candidates, sample_seed)
    logger.info("%s: %s", directory.name, pair_stats)
    if not pairs:
        raise SystemExit(
            f"{directory}: no pair has a score gap >= 1 among {args.samples} samples of {len(prompts)} prompts; "
            "sample more"
        )
    train_file = write_pairs(pairs, images, prompts, directory / "pairs")
    exports = train_round(args, settings, base, train_file, len(pairs), directory / "run")
    validation = {}
    for export in exports:
        validation[export.name], _ = evaluate_model(load_model(export), settings, "val", settings.val_images, template)
    # chosen on validation only: the test split is read for the chosen export alone
    best = directory / "run" / "exports" / select_checkpoint(validation, args.world, seed.sft_validation)
    test, samples = evaluate_model(load_model(best), settings, "test", settings.test_images, template)
    record = {
        "round": directory.name,
        "prompts": [lo, hi],
        "selected": str(best),
        "pairs": pair_stats,
        "validation": validation,
        "test": test,
        "sample_answers": samples[:3],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (directory / "selected.json").write_text(json.dumps(record, indent=2))
    return record


def seed_settings(args, seed: int) -> DemoSettings:
    overrides = {"output_dir": str(args.output_dir / f"seed{seed}"), "seed": seed, "num_threads": args.num_threads}
    if args.train_config:
        overrides["train_config"] = args.train_config
    if args.world == "v1":  # built on the v1 world (its committed results)
        return DemoSettings.quick(world_version="v1", **overrides) if args.quick else DemoSettings.v1(**overrides)
    return DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)


def run_seed(args, seed: int) -> dict:
    """Round 0 (SFT), rounds 1..K, and (--one-round) the one-round baseline of one seed."""
    settings = seed_settings(args, seed)
    out = Path(settings.output_dir)
    if args.sft_from and not (out / "sft" / "ddpo_model.json").is_file():
        source = args.sft_from / f"seed{seed}"
        shutil.copytree(source / "sft", out / "sft")
        if (source / "gate.json").is_file():
            shutil.copy(source / "gate.json", out / "gate.json")
    run(settings, ("sft",) if args.world == "v1" else ("sft", "gate"))
    template = base_config(settings).data.template
    sft = out / "sft"
    sft_model = load_model(sft)
    sft_validation, val_answers = evaluate_model(sft_model, settings, "val", settings.val_images, template)
    context = Seed(settings, template, make_feedback(args, template, settings), sft_validation)
    _, val_images, val_prompts, _ = split(settings, "val", settings.val_images)

    def val_logps(model) -> list[torch.Tensor]:
        return answer_token_logps(model, val_images, val_prompts, val_answers, template, batch_size=LOGPS_BATCH)

    reference_logps = val_logps(sft_model)

    def drift_of(path: str) -> float:
        return drift(val_logps(load_model(path)), reference_logps)

    test, _ = evaluate_model(sft_model, settings, "test", settings.test_images, template)
    rounds = [{"round": 0, "selected": str(sft), "test": test, "validation": {"sft": sft_validation}, "drift": 0.0}]
    base = sft
    for k in range(1, args.rounds + 1):
        prompt_range = ((k - 1) * args.prompts, k * args.prompts)
        record = run_round(args, context, out / "iterate" / f"round{k}", base, prompt_range, settings.seed * 1000 + k)
        rounds.append({**record, "round": k, "drift": drift_of(record["selected"])})
        base = Path(rounds[-1]["selected"])
    result = {"rounds": rounds}
    if args.world == "v2":
        # the checkpoint to ship: rounds 0..K, each by its selected export's validation metrics
        chosen = {str(r["round"]): r["validation"][Path(r["selected"]).name if r["round"] else "sft"] for r in rounds}
        result["picked_round"] = int(select_checkpoint(chosen, "v2", sft_validation))
    if args.one_round:
        prompt_range = (0, args.rounds * args.prompts)
        record = run_round(args, context, out / "one_round" / "round1", sft, prompt_range, settings.seed * 1000 + 101)
        result["one_round"] = {**record, "drift": drift_of(record["selected"])}
    return result


def rows_of(result: dict) -> dict[str, dict]:
    """One seed's rows: round 0..K, then (v2) the validation-picked round and the one-round baseline."""
    rows = {f"round {r['round']}": r for r in result["rounds"]}
    if "picked_round" in result:
        rows["picked on validation"] = result["rounds"][result["picked_round"]]
    if "one_round" in result:
        rows["one round, same prompts"] = result["one_round"]
    return rows


def aggregate(per_seed: dict[int, dict], metrics: tuple[str, ...]) -> list[dict]:
    """Per row: {metric: (mean, std)} of the test metrics over seeds, the mean pair count and drift."""
    table = []
    per_row = {seed: rows_of(result) for seed, result in per_seed.items()}
    for name in next(iter(per_row.values())):
        records = [rows[name] for rows in per_row.values()]
        row = {"row": name}
        for metric in metrics:
            row[metric] = mean_std([r["test"][metric] for r in records])
        row["pairs"] = statistics.fmean(r["pairs"]["pairs"] if "pairs" in r else 0 for r in records)
        row["drift"] = statistics.fmean(r.get("drift", 0.0) for r in records)
        table.append(row)
    return table


def differences(per_seed: dict[int, dict], rounds: int) -> dict:
    """Paired differences over seeds (v2): the primary first (the validation-picked checkpoint of the
    loop minus the one-round baseline), then each round and the baseline against SFT, and the last round
    against the baseline; Holm over all but the primary."""
    rows = {seed: rows_of(result) for seed, result in per_seed.items()}
    pairs = {
        "picked on validation - one round (primary)": ("picked on validation", "one round, same prompts"),
        f"round {rounds} - one round": (f"round {rounds}", "one round, same prompts"),
        **{f"round {k} - SFT": (f"round {k}", "round 0") for k in range(1, rounds + 1)},
        "one round - SFT": ("one round, same prompts", "round 0"),
    }
    out = {}
    for label, (a, b) in pairs.items():
        if not all(a in r and b in r for r in rows.values()):
            continue
        out[label] = {
            metric: paired_test(
                paired_differences(
                    [r[a]["test"][metric] for r in rows.values()], [r[b]["test"][metric] for r in rows.values()]
                )
            )
            for metric in DIFFERENCE_METRICS
        }
    primary = next(iter(out), None)
    adjusted = holm({k: v["mention_hallucination_rate"][3] for k, v in out.items() if k != primary})
    return {"differences": out, "holm": adjusted, "primary": primary}


def difference_lines(diffs: dict) -> list[str]:
    lines = [
        "",
        "Paired differences (a - b), test: mean [95% t-interval over seeds]; p: paired t-test on mention-level "
        "hallucination, Holm-adjusted over the secondary comparisons (the primary is not adjusted)",
        "",
        *table_head(
            "comparison",
            "mention hall.",
            "p (Holm)",
            "response hall.",
            "companion rate",
            "recall",
            "position err.",
            "attribute err.",
            "words",
        ),
    ]
    for label, row in diffs["differences"].items():
        p = row["mention_hallucination_rate"][3] if label == diffs["primary"] else diffs["holm"][label]
        cells = [format_interval(*row[m][:3], digits=metric_digits(m)) for m in DIFFERENCE_METRICS]
        lines.append(f"| {label} | {cells[0]} | {p:.3f} | " + " | ".join(cells[1:]) + " |")
    return lines


def results_table(table: list[dict], args: argparse.Namespace, command: str, per_seed: dict[int, dict], diffs) -> str:
    per_round = f"{args.epochs} epochs" if args.max_steps < 0 else f"{args.max_steps} steps"
    lines = [
        f"Iterative online DDPO on the synthetic world {args.world} ({args.feedback} feedback): {args.prompts} "
        f"prompts x {args.samples} samples per round at temperature {args.temperature}, {args.pairs_per_prompt} "
        f"pairs per prompt, gamma {args.gamma}, {per_round} per round; test split, greedy, mean ± std over seeds "
        f"{args.seeds}. Round 0 = SFT.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
    ]
    if args.world == "v2":
        picks = ", ".join(f"seed {s}: round {r['picked_round']}" for s, r in per_seed.items() if "picked_round" in r)
        lines += [
            f"Round picked on validation (rounds 0..{args.rounds}, the lab's rule): {picks}.",
            "",
            "Drift: mean per-token log-ratio of the row's model to SFT on SFT's greedy validation answers.",
            "",
        ]
    metrics = SHOWN_V2 if args.world == "v2" else SHOWN
    names = [m.replace("_rate", "").replace("_", " ").replace("mean response words", "words") for m in metrics]
    lines += table_head("row", "pairs", *names, "drift")
    for row in table:
        cells = " | ".join(format_mean_std(*row[m], metric_digits(m)) for m in metrics)
        lines.append(f"| {row['row']} | {row['pairs']:.0f} | {cells} | {row['drift']:+.4f} |")
    if diffs and diffs["differences"]:
        lines += difference_lines(diffs)
    rows = [r for result in per_seed.values() for r in [*result["rounds"], result.get("one_round", {})]]
    lines += [
        "",
        "Wall time of the rounds (sample, label, train, validation and test evaluation; summed over seeds and rows; "
        f"on a shared machine it exceeds the CPU time): {sum(r.get('seconds', 0) for r in rows):.0f} s",
    ]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, metrics: tuple[str, ...]) -> None:
    shown = (
        ("mention_hallucination_rate", "object_recall", "position_error_rate")
        if "companion_rate" in metrics
        else SHOWN[:3]
    )
    rounds = [row for row in table if row["row"].startswith("round ")]
    extra = [row for row in table if not row["row"].startswith("round ")]
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.6))
    x = [int(row["row"].split()[1]) for row in rounds]
    for ax, metric in zip(axes, shown):
        ax.errorbar(
            x,
            [row[metric][0] for row in rounds],
            yerr=[row[metric][1] for row in rounds],
            marker="o",
            capsize=3,
            label="loop: round k's selected export",
        )
        for row, style in zip(extra, ("r*", "gs")):
            ax.errorbar(
                [x[-1] + 0.15 if "picked" in row["row"] else x[-1] + 0.3],
                [row[metric][0]],
                yerr=[row[metric][1]],
                fmt=style,
                capsize=3,
                label=row["row"],
            )
        ax.set_xticks(x)
        ax.set_xlabel("round (0 = SFT)")
        ax.set_ylabel(f"{metric.replace('_', ' ')}\n(test, greedy; mean ± std over seeds)", fontsize=8)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--world", choices=("v2", "v1"), default="v2", help="v2 (default) or v1, the negative control (module doc)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=4, help="K (RLAIF-V: 4)")
    parser.add_argument(
        "--one-round", action="store_true", help="also train once from SFT on all K rounds' prompts (module doc)"
    )
    parser.add_argument(
        "--sft-from", type=Path, default=None, help="copy SFT models (and gate.json) from DIR/seed<S> when missing"
    )
    parser.add_argument("--prompts", type=int, default=400, help="fresh prompts per round")
    parser.add_argument("--samples", type=int, default=8, help="N samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--feedback", choices=("oracle", "divide-and-conquer"), default="oracle")
    parser.add_argument("--labeler", default=None, help="divide-and-conquer: the labeler model directory")
    parser.add_argument("--gamma", type=float, default=1.0, help="DDPO gamma (RLAIF-V trains plain DPO: 1)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs per round (RLAIF-V: 4, selecting every 1/4)")
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps per round instead of epochs (smoke tests)"
    )
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (smoke run)")
    parser.add_argument(
        "--train-config", default=None, help="ddpo train YAML (default: the demo's configs/synthetic/demo.yaml)"
    )
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/iterate_v2"))
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results directory (default experiments/results/iterate_v2; v1: experiments/results/iterate)",
    )
    args = parser.parse_args(argv)
    args.results = args.results or RESULTS / ("iterate_v2" if args.world == "v2" else "iterate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads)
    per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    metrics = SHOWN_V2 if args.world == "v2" else SHOWN
    table = aggregate(per_seed, metrics)
    diffs = differences(per_seed, args.rounds) if args.world == "v2" and len(args.seeds) > 1 else None
    command = "python experiments/iterate.py " + " ".join(shlex.quote(a) for a in argv)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(
        json.dumps({"command": command, "rows": table, "differences": diffs, "per_seed": per_seed}, indent=2)
    )
    text = results_table(table, args, command, per_seed, diffs)
    (args.results / "results.md").write_text(text)
    plot(table, args.results / "plot.png", metrics)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
