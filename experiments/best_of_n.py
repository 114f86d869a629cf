"""Best-of-N with the implicit reward on the synthetic benchmark: best-of-N vs greedy vs a random pick.

    python experiments/best_of_n.py --demo-dir runs/best_of_n/seed0 --seed 0 \
        --results experiments/results/best_of_n

The demo's stages sft/sample/annotate/train are run first when their outputs are missing (an existing
`ddpo demo` output directory with the same --seed/--quick is reused as is). Then, on the test images:

  greedy        the policy's greedy answer (the demo's evaluation)
  random-of-N   one of the N samples, drawn uniformly (seeded): what sampling alone gives
  best-of-N     the sample with the highest implicit reward beta*(log pi - log pi_ref)
                (policy runs/<method>/final, reference: the SFT model it started from)
  oracle-of-N   the sample with the fewest oracle errors (an upper bound for any reward model)

for N in --ns (default 1 4 16). The N candidates are the first N of one set of max(N) samples per
image, so the rows for different N are nested and differ only in N. Writes RESULTS/results.{md,json}
and plot.png (hallucination and recall vs N).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from data.synthetic.metrics import evaluate
from ddpo.config import load_config
from ddpo.lab.demo import DemoSettings, evaluate_model, generation_options, run, split
from ddpo.online.best_of_n import pick_best, sample_candidates, score_candidates
from ddpo.online.feedback import OracleFeedback, Query
from models.build import load_model

REPO = Path(__file__).resolve().parents[1]


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    overrides = {"output_dir": str(args.demo_dir), "seed": args.seed, "num_threads": args.num_threads}
    if args.train_config:
        overrides["train_config"] = args.train_config
    # built on the v1 world (its committed results); the v2 world is the demo's default
    return DemoSettings.quick(world_version="v1", **overrides) if args.quick else DemoSettings.v1(**overrides)


def experiment(args: argparse.Namespace) -> dict:
    settings = demo_settings(args)
    run(settings, ("sft", "sample", "annotate", "train"))
    template = load_config(settings.train_config).data.template
    n_images = args.images or settings.test_images
    ns = sorted(set(args.ns))
    demo = Path(settings.output_dir)
    policy = load_model(demo / "runs" / args.method / "final")
    reference = load_model(demo / "sft")
    timings = {}

    started = time.perf_counter()
    greedy, _ = evaluate_model(policy, settings, args.split, n_images, template)
    timings["greedy"] = time.perf_counter() - started

    scenes, images, prompts, _ = split(settings, args.split, n_images)
    started = time.perf_counter()
    options = generation_options(settings, template)
    candidates = sample_candidates(policy, images, prompts, max(ns), template, temperature=args.temperature,
                                   seed=args.seed, max_new_tokens=options["max_new_tokens"], batch_size=options["batch_size"])
    timings["sample"] = time.perf_counter() - started
    started = time.perf_counter()
    rewards = score_candidates(policy, reference, images, prompts, candidates, args.beta, template, args.variant, args.batch_size)
    timings["score"] = time.perf_counter() - started
    oracle = OracleFeedback()
    oracle_scores = [oracle.score(Query(image, prompt, {"scene": scene}), group)
                     for scene, image, prompt, group in zip(scenes, images, prompts, candidates)]

    methods: dict[str, dict] = {"greedy": greedy}
    for n in ns:
        rng = random.Random(args.seed * 1000 + n)
        methods[f"random-of-{n}"] = evaluate(scenes, [group[rng.randrange(n)] for group in candidates])
        methods[f"best-of-{n}"] = evaluate(scenes, pick_best(candidates, rewards, first_n=n))
        methods[f"oracle-of-{n}"] = evaluate(scenes, pick_best(candidates, oracle_scores, first_n=n))
    # How well the implicit reward ranks a prompt's samples: agreement with the oracle on sample pairs
    # whose oracle scores differ (0.5 = chance).
    agree = total = 0
    for values, truth in zip(rewards, oracle_scores):
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                if truth[i] != truth[j]:
                    total += 1
                    agree += (values[i] - values[j]) * (truth[i] - truth[j]) > 0
    return {
        "methods": methods, "ns": ns, "images": n_images, "split": args.split,
        "reward_oracle_pair_agreement": agree / max(total, 1), "pairs_compared": total,
        "settings": {"demo_dir": str(demo), "seed": args.seed, "quick": args.quick, "policy": args.method,
                     "beta": args.beta, "variant": args.variant, "temperature": args.temperature, "template": template},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples": {"prompt": prompts[0], "candidates": candidates[0][:4], "rewards": rewards[0][:4]},
    }


def results_table(results: dict, command: str) -> str:
    s = results["settings"]
    lines = [
        f"Best-of-N with the implicit reward (variant {s['variant']}, beta {s['beta']}) on the synthetic benchmark: "
        f"{results['images']} {results['split']} images, policy runs/{s['policy']}/final, reference sft, "
        f"samples at temperature {s['temperature']}, seed {s['seed']}.",
        "", "Command:", "", f"    {command}", "",
        "| method | response hallucination | mention hallucination | object recall | words / answer | attribute err. | position err. | count err. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {m['response_hallucination_rate']:.3f} | {m['mention_hallucination_rate']:.3f} | "
                     f"{m['object_recall']:.3f} | {m['mean_response_words']:.1f} | {m['attribute_error_rate']:.3f} | "
                     f"{m['position_error_rate']:.3f} | {m['count_error_rate']:.3f} |")
    lines += ["", f"Implicit reward vs oracle on pairs of samples of one image with different oracle scores: "
                  f"{results['reward_oracle_pair_agreement']:.3f} agreement over {results['pairs_compared']} pairs (0.5 = chance).",
              f"Timings (s): {results['timings_s']}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns, methods = results["ns"], results["methods"]
    names = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, metric in zip(axes, names):
        for kind, style in (("best", "o-"), ("random", "s--"), ("oracle", "^:")):
            ax.plot(ns, [methods[f"{kind}-of-{n}"][metric] for n in ns], style, label=f"{kind}-of-N")
        ax.axhline(methods["greedy"][metric], color="gray", lw=1, label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N")
        ax.set_title(metric.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/best_of_n/seed0"), help="a `ddpo demo` output directory (made if missing)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (and the sampling seed)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (smoke run)")
    parser.add_argument("--train-config", default=None, help="the demo's ddpo train YAML (default configs/synthetic/demo.yaml)")
    parser.add_argument("--method", default="ddpo", help="which demo run is the policy: runs/<method>/final")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--images", type=int, default=None, help="images of the split (default: the demo's test_images)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1, help="any beta > 0 ranks the same; 0.1 = the demo's")
    parser.add_argument("--variant", choices=("sum", "mean", "segment"), default="sum")
    parser.add_argument("--batch-size", type=int, default=64, help="scoring batch")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "best_of_n")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    results = experiment(args)
    command = "python experiments/best_of_n.py " + " ".join(shlex.quote(a) for a in argv)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps({**results, "command": command}, indent=2))
    table = results_table(results, command)
    (args.results / "results.md").write_text(table)
    plot(results, args.results / "plot.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
