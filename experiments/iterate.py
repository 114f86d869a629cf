"""Iterative online DDPO (RLAIF-V's recipe) on the synthetic world: K rounds of sample -> label -> train.

    python experiments/iterate.py --seeds 0 1 --rounds 4 --output-dir runs/iterate \
        --results experiments/results/iterate

Per seed, round 0 is the demo's SFT model (`ddpo demo` stage sft, trained if missing). Round k = 1..K:

  1. sample  the current policy answers P fresh prompts (slice k of the demo's "preference" images),
             N samples each at temperature 0.7                                  (ddpo.online.best_of_n)
  2. label   a feedback source scores every sample: the oracle, or RLAIF-V's divide-and-conquer
             labeler with a model given by --labeler                            (ddpo.online.feedback)
  3. pairs   score gap >= 1, 2 pairs per prompt, length balancing -> ROUND/pairs/ (JSONL + images)
                                                                                 (ddpo.online.pairs)
  4. train   `ddpo train` (the demo's config) from the current policy; the reference is the current
             policy too: each round has its own cache directory, which the trainer fills from the
             model it starts from. The policy is exported every 1/4 epoch (and at the end).
  5. select  every export answers the validation images greedily; the best by object recall minus
             response hallucination rate (hallucination alone would reward saying less) becomes the
             next round's policy. Its test metrics are the round's row in the results.

RLAIF-V selects every 1/4 epoch on Object HalBench + MMHal-Bench; here the validation split plays
that role (the test split is never used for a decision). A finished round (ROUND/selected.json) is
skipped when the command is rerun. Results: mean ± std over seeds per round, RESULTS/results.{md,json}
and plot.png.
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
from pathlib import Path

import torch

from ddpo.config import load_config
from ddpo.lab.demo import DemoSettings, evaluate_model, generation_options, run, split
from ddpo.online.best_of_n import sample_candidates
from ddpo.online.feedback import DivideAndConquerFeedback, ModelYesNoLabeler, OracleFeedback, Query, SyntheticClaimSplitter
from ddpo.online.pairs import build_pairs
from ddpo.plan import run_plan
from ddpo.trainer import Trainer, TrainerCallback
from models.build import load_model

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("iterate")
SHOWN = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall", "mean_response_words",
         "attribute_error_rate", "position_error_rate", "count_error_rate")


class ExportAtCheckpoints(TrainerCallback):
    """Export the policy (HF format, `load_model`-able) at every checkpoint, so each can be evaluated:
    DeepSpeed states alone cannot be loaded by evaluation."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        trainer.save(trainer.output_dir / "exports" / f"step-{trainer.step:06d}")


def selection_score(metrics: dict) -> float:
    return metrics["object_recall"] - metrics["response_hallucination_rate"]


def make_feedback(args: argparse.Namespace, template: str):
    if args.feedback == "oracle":
        return OracleFeedback()
    if not args.labeler:
        raise SystemExit("--feedback divide-and-conquer needs --labeler DIR (a model directory that load_model reads)")

    return DivideAndConquerFeedback(SyntheticClaimSplitter(), ModelYesNoLabeler(load_model(args.labeler), template))


def write_pairs(pairs, images, prompts, directory: Path) -> Path:
    """Pairs as `data.format: jsonl` (+ an image folder); images named by prompt index."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(pairs):
            name = f"{p.prompt_index:05d}.png"
            if not (directory / "images" / name).is_file():
                images[p.prompt_index].save(directory / "images" / name)
            f.write(json.dumps({"idx": f"r-{i}", "image": name, "question": prompts[p.prompt_index],
                                "chosen": p.chosen, "rejected": p.rejected, "chosen_score": p.chosen_score,
                                "rejected_score": p.rejected_score}) + "\n")
    return directory / "train.jsonl"


def train_round(args, settings: DemoSettings, base: Path, train_file: Path, num_pairs: int, out: Path) -> list[Path]:
    """`ddpo train` from `base` on the round's pairs with exports every 1/4 epoch; the exports, in step order."""
    overrides = [
        "--model.name_or_path", str(base), "--data.format", "jsonl", "--data.path", str(train_file),
        "--data.image_dir", str(train_file.parent / "images"), "--train.output_dir", str(out),
        "--train.seed", str(settings.seed), "--train.reference_cache", str(out / "reference_cache"),
        "--train.num_threads", str(settings.num_threads), "--train.epochs", str(args.epochs),
        "--train.max_steps", str(args.max_steps), "--train.save_total_limit", "1",
        "--loss.gamma", str(args.gamma), "--logging.progress_bar", "false", *settings.train_overrides,
    ]
    cfg = load_config(settings.train_config, overrides)
    plan = run_plan(cfg, num_pairs)
    shutil.rmtree(out, ignore_errors=True)  # an interrupted round restarts clean (no stale exports)
    cfg.train.save_steps = max(1, round(plan.steps_per_epoch / 4))
    Trainer(cfg, callbacks=[ExportAtCheckpoints()]).train()
    return sorted((out / "exports").iterdir())


def run_round(args, settings: DemoSettings, k: int, base: Path, template: str, feedback) -> dict:
    directory = Path(settings.output_dir) / "iterate" / f"round{k}"
    if (directory / "selected.json").is_file():
        return json.loads((directory / "selected.json").read_text())
    started = time.perf_counter()
    scenes, images, prompts, _ = split(settings, "preference", args.prompts * args.rounds)
    lo, hi = (k - 1) * args.prompts, k * args.prompts  # fresh prompts each round
    scenes, images, prompts = scenes[lo:hi], images[lo:hi], prompts[lo:hi]
    policy = load_model(base)
    options = generation_options(settings, template)
    candidates = sample_candidates(policy, images, prompts, args.samples, template, temperature=args.temperature,
                                   seed=settings.seed * 1000 + k, max_new_tokens=options["max_new_tokens"],
                                   batch_size=options["batch_size"])
    scores = [feedback.score(Query(image, prompt, {"scene": scene}), group)
              for scene, image, prompt, group in zip(scenes, images, prompts, candidates)]
    pairs, pair_stats = build_pairs(candidates, scores, per_prompt=args.pairs_per_prompt, seed=settings.seed * 1000 + k)
    logger.info("round %d: %s", k, pair_stats)
    if not pairs:
        raise SystemExit(f"round {k}: no pair has a score gap >= 1 among {args.samples} samples of {len(prompts)} prompts; sample more")
    train_file = write_pairs(pairs, images, prompts, directory / "pairs")
    exports = train_round(args, settings, base, train_file, len(pairs), directory / "run")
    validation = {}
    for export in exports:
        validation[export.name], _ = evaluate_model(load_model(export), settings, "val", settings.val_images, template)
    best = max(exports, key=lambda e: selection_score(validation[e.name]))
    test, samples = evaluate_model(load_model(best), settings, "test", settings.test_images, template)
    record = {"round": k, "selected": str(best), "pairs": pair_stats, "validation": validation, "test": test,
              "sample_answers": samples[:3], "seconds": round(time.perf_counter() - started, 1)}
    (directory / "selected.json").write_text(json.dumps(record, indent=2))
    return record


def run_seed(args, seed: int) -> list[dict]:
    overrides = {"output_dir": str(args.output_dir / f"seed{seed}"), "seed": seed, "num_threads": args.num_threads}
    if args.train_config:
        overrides["train_config"] = args.train_config
    # built on the v1 world (its committed results); the v2 world is the demo's default
    settings = DemoSettings.quick(world_version="v1", **overrides) if args.quick else DemoSettings.v1(**overrides)
    run(settings, ("sft",))
    template = load_config(settings.train_config).data.template
    feedback = make_feedback(args, template)
    sft = Path(settings.output_dir) / "sft"
    test, _ = evaluate_model(load_model(sft), settings, "test", settings.test_images, template)
    rounds = [{"round": 0, "selected": str(sft), "test": test}]
    base = sft
    for k in range(1, args.rounds + 1):
        rounds.append(run_round(args, settings, k, base, template, feedback))
        base = Path(rounds[-1]["selected"])
    return rounds


def aggregate(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Per round: {metric: (mean, std)} of the test metrics over seeds, and the mean pair count."""
    rounds = []
    for k in range(len(next(iter(per_seed.values())))):
        row = {"round": k}
        for metric in SHOWN:
            values = [seed_rounds[k]["test"][metric] for seed_rounds in per_seed.values()]
            row[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        row["pairs"] = statistics.fmean(r[k]["pairs"]["pairs"] for r in per_seed.values()) if k else 0
        rounds.append(row)
    return rounds


def results_table(table: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Iterative online DDPO on the synthetic world ({args.feedback} feedback): {args.prompts} prompts x {args.samples} "
        f"samples per round at temperature {args.temperature}, {args.pairs_per_prompt} pairs per prompt, gamma {args.gamma}, "
        f"{args.epochs if args.max_steps < 0 else args.max_steps} {'epochs' if args.max_steps < 0 else 'steps'} per round; test split, greedy, mean ± std over seeds {args.seeds}. Round 0 = SFT.",
        "", "Command:", "", f"    {command}", "",
        "| round | pairs | response hallucination | mention hallucination | object recall | words / answer | attribute err. | position err. | count err. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        cells = " | ".join(f"{row[m][0]:.3f} ± {row[m][1]:.3f}" if m != "mean_response_words" else f"{row[m][0]:.1f} ± {row[m][1]:.1f}"
                           for m in SHOWN)
        lines.append(f"| {row['round']} | {row['pairs']:.0f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    rounds = [row["round"] for row in table]
    for ax, metric in zip(axes, SHOWN[:3]):
        ax.errorbar(rounds, [row[metric][0] for row in table], yerr=[row[metric][1] for row in table], marker="o", capsize=3)
        ax.set_xticks(rounds)
        ax.set_xlabel("round (0 = SFT)")
        ax.set_title(metric.replace("_", " "), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=4, help="K (RLAIF-V: 4)")
    parser.add_argument("--prompts", type=int, default=400, help="fresh prompts per round")
    parser.add_argument("--samples", type=int, default=8, help="N samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--feedback", choices=("oracle", "divide-and-conquer"), default="oracle")
    parser.add_argument("--labeler", default=None, help="divide-and-conquer: the labeler model directory")
    parser.add_argument("--gamma", type=float, default=1.0, help="DDPO gamma (RLAIF-V trains plain DPO: 1)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs per round (RLAIF-V: 4, selecting every 1/4)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps per round instead of epochs (smoke tests)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (smoke run)")
    parser.add_argument("--train-config", default=None, help="ddpo train YAML (default: the demo's configs/synthetic/demo.yaml)")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/iterate"))
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "iterate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads)
    per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    table = aggregate(per_seed)
    command = "python experiments/iterate.py " + " ".join(shlex.quote(a) for a in argv)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps({"command": command, "rounds": table, "per_seed": per_seed}, indent=2))
    text = results_table(table, args, command)
    (args.results / "results.md").write_text(text)
    plot(table, args.results / "plot.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
