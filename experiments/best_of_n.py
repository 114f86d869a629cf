"""Best-of-N with the implicit reward on the synthetic benchmark: does a DPO-trained model rank samples?

v2 world (default; experiments/results/best_of_n_v2/README.md):

    python experiments/best_of_n.py --lab-dir runs/v2lab --seeds 0 1 3 --split test --images 300 \
        --ns 1 4 16 64 --primary ddpo_mean_g5/sum --results experiments/results/best_of_n_v2

Per seed, the lab's models (LAB/seed<S>: `sft/`, `runs/dpo_mean/final`, `runs/ddpo_mean_g5/final`, the v2
ablation's primary runs; made by `python experiments/synthetic_v2.py ablation --parts primary` or the
demo's stages, which run when they are missing). Candidates are max(N) samples of the **SFT model**
(the base policy) at temperature 0.7 per image; the rows for N are the first N of them (nested). Every
implicit reward r = beta * (log pi - log pi_sft) is computed for both trained policies (DPO gamma 1 and
DDPO gamma 5, Eq. 5 mean, beta 0.5) in three variants (ddpo.online.scoring): `sum`, per-token `mean`, and
`segment` (sum with gamma 5 on the tokens where a candidate differs from the SFT model's greedy answer to
that image: no oracle, no human segment exists on fresh samples). Rows, on the split's first --images:

  greedy:<model>      the SFT / DPO / DDPO model's greedy answer
  random-of-N         a uniformly drawn sample: reported as its expectation, the metrics of all first N
                      samples pooled (lower variance than one seeded draw; identical in expectation)
  best-of-N:<reward>  the candidate with the highest reward among the first N
  oracle-of-N         the candidate with the fewest oracle errors (the ceiling for any reward)

and each reward's agreement with the oracle on pairs of samples of one image with different oracle
scores (ddpo.online.best_of_n.pair_agreement). Per-seed numbers are cached under LAB/seed<S>/best_of_n/;
the aggregate (mean ± std over seeds, paired differences with 95% t-intervals, Holm over the secondary
comparisons) goes to RESULTS/{results|validation}.{md,json} and plot.png.

v1 world (`--world v1`, the negative control; its committed results in experiments/results/best_of_n):

    python experiments/best_of_n.py --world v1 --demo-dir runs/best_of_n/seed0 --seed 0 \
        --results experiments/results/best_of_n

one demo directory, one policy (--method) both sampling and scoring, rows greedy / random-of-N (one
seeded draw) / best-of-N / oracle-of-N for N in --ns (default 1 4 16), samples at temperature 1.0.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddpo.data.synthetic.metrics import evaluate
from ddpo.lab.evaluation import evaluate_model
from ddpo.lab.recipes import PRIMARY_POLICIES
from ddpo.lab.report import format_interval, format_mean_std, pyplot, save_figure, table_head
from ddpo.lab.settings import DemoSettings, base_config, generation_options
from ddpo.lab.stages import run
from ddpo.lab.stats import holm, interval, mean_std, paired_differences, paired_test
from ddpo.lab.world import split, synthetic_config
from ddpo.models.base import GenerationOptions, answer_token_logps
from ddpo.models.build import load_model
from ddpo.online.best_of_n import pair_agreement, pick_best, sample_candidates, score_candidates
from ddpo.online.feedback import OracleFeedback, Query
from ddpo.online.scoring import RewardSettings, rewards_from_logps, segment_weights

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def sampling(settings: DemoSettings, template: str, temperature: float, seed: int) -> GenerationOptions:
    """Samples at the lab's answer length and generation batch."""
    return replace(generation_options(settings, template), do_sample=True, temperature=temperature, seed=seed)


# ------------------------------------------------------------------------------------------------
# v1 world (the negative control): one demo directory, the policy samples and scores
# ------------------------------------------------------------------------------------------------
def demo_settings(args: argparse.Namespace) -> DemoSettings:
    overrides = {"output_dir": str(args.demo_dir), "seed": args.seed, "num_threads": args.num_threads}
    overrides["max_unparsed"] = args.max_unparsed
    if args.train_config:
        overrides["train_config"] = args.train_config
    # built on the v1 world (its committed results); the v2 world is the demo's default
    return DemoSettings.quick(world_version="v1", **overrides) if args.quick else DemoSettings.v1(**overrides)


def experiment(args: argparse.Namespace) -> dict:
    """The v1 study (module doc)."""
    settings = demo_settings(args)
    run(settings, ("sft", "sample", "annotate", "train"))
    template = base_config(settings).data.template
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
    options = sampling(settings, template, args.temperature, args.seed)
    candidates = sample_candidates(policy, images, prompts, max(ns), options)
    timings["sample"] = time.perf_counter() - started
    started = time.perf_counter()
    reward = RewardSettings(args.beta, template, args.variant, batch_size=args.batch_size)
    rewards = score_candidates(policy, reference, images, prompts, candidates, reward)
    timings["score"] = time.perf_counter() - started
    oracle = OracleFeedback()
    oracle_scores = [
        oracle.score(Query(image, prompt, {"scene": scene}), group)
        for scene, image, prompt, group in zip(scenes, images, prompts, candidates)
    ]

    methods: dict[str, dict] = {"greedy": greedy}
    for n in ns:
        rng = random.Random(args.seed * 1000 + n)
        limit = args.max_unparsed
        methods[f"random-of-{n}"] = evaluate(
            scenes, [group[rng.randrange(n)] for group in candidates], max_unparsed=limit
        )
        methods[f"best-of-{n}"] = evaluate(scenes, pick_best(candidates, rewards, first_n=n), max_unparsed=limit)
        methods[f"oracle-of-{n}"] = evaluate(
            scenes, pick_best(candidates, oracle_scores, first_n=n), max_unparsed=limit
        )
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
        "methods": methods,
        "ns": ns,
        "images": n_images,
        "split": args.split,
        "reward_oracle_pair_agreement": agree / max(total, 1),
        "pairs_compared": total,
        "settings": {
            "demo_dir": str(demo),
            "seed": args.seed,
            "quick": args.quick,
            "policy": args.method,
            "beta": args.beta,
            "variant": args.variant,
            "temperature": args.temperature,
            "template": template,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples": {"prompt": prompts[0], "candidates": candidates[0][:4], "rewards": rewards[0][:4]},
    }


def results_table(results: dict, command: str) -> str:
    s = results["settings"]
    lines = [
        f"Best-of-N with the implicit reward (variant {s['variant']}, beta {s['beta']}) on the synthetic benchmark: "
        f"{results['images']} {results['split']} images, policy runs/{s['policy']}/final, reference sft, "
        f"samples at temperature {s['temperature']}, seed {s['seed']}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        *table_head(
            "method",
            "response hallucination",
            "mention hallucination",
            "object recall",
            "words / answer",
            "attribute err.",
            "position err.",
            "count err.",
        ),
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {m['response_hallucination_rate']:.3f} | {m['mention_hallucination_rate']:.3f} | "
            f"{m['object_recall']:.3f} | {m['mean_response_words']:.1f} | {m['attribute_error_rate']:.3f} | "
            f"{m['position_error_rate']:.3f} | {m['count_error_rate']:.3f} |"
        )
    lines += [
        "",
        "Implicit reward vs oracle on pairs of samples of one image with different oracle scores: "
        f"{results['reward_oracle_pair_agreement']:.3f} agreement over {results['pairs_compared']} pairs "
        "(0.5 = chance).",
        f"Timings (s): {results['timings_s']}",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    ns, methods = results["ns"], results["methods"]
    names = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall")
    fig, axes = pyplot().subplots(1, 3, figsize=(11, 3.2))
    for ax, metric in zip(axes, names):
        for kind, style in (("best", "o-"), ("random", "s--"), ("oracle", "^:")):
            ax.plot(ns, [methods[f"{kind}-of-{n}"][metric] for n in ns], style, label=f"{kind}-of-N")
        ax.axhline(methods["greedy"][metric], color="gray", lw=1, label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N")
        ax.set_title(metric.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# v2 world: SFT samples, every implicit reward of both trained policies, several seeds
# ------------------------------------------------------------------------------------------------
VARIANTS = ("sum", "mean", "segment")
SEGMENT_GAMMA = 5.0  # the segment variant's weight on tokens that differ from the SFT model's greedy answer
METRICS = (
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


def reward_names() -> list[str]:
    return [f"{policy}/{variant}" for policy in PRIMARY_POLICIES for variant in VARIANTS]


def v2_rewards(sft, policies: dict, data: tuple, reward: RewardSettings) -> tuple[dict, list[torch.Tensor]]:
    """Every implicit reward variant of every policy for the candidates, shaped like them, from one
    reference pass; and the segment variant's weights (gamma on tokens that differ from the SFT model's
    greedy answer to the image). `data`: (images, prompts, candidates, greedy SFT answers)."""
    images, prompts, candidates, greedy_sft = data
    n_max, template = len(candidates[0]), reward.template
    flat_images = [image for image in images for _ in range(n_max)]
    flat_prompts = [prompt for prompt in prompts for _ in range(n_max)]
    flat = [answer for group in candidates for answer in group]
    reference = answer_token_logps(sft, flat_images, flat_prompts, flat, template, reward.batch_size)
    weights = [
        segment_weights(sft.tokenizer, template, answer, greedy_sft[i // n_max], reward.gamma)
        for i, answer in enumerate(flat)
    ]
    rewards: dict[str, list[list[float]]] = {}
    for name, model in policies.items():
        logps = answer_token_logps(model, flat_images, flat_prompts, flat, template, reward.batch_size)
        for variant in VARIANTS:
            values = rewards_from_logps(logps, reference, reward.beta, variant, weights)
            rewards[f"{name}/{variant}"] = [values[i * n_max : (i + 1) * n_max] for i in range(len(images))]
    return rewards, weights


def v2_rows(cfg, scenes, greedy: dict, candidates: list[list[str]], scores: dict, ns: list[int], limit: float) -> dict:
    """The rows' metrics (module doc); `scores`: every reward's and the oracle's ("oracle") scores."""

    def score(answers):
        return evaluate(scenes, answers, cfg.world.partners, cfg.empty_cells, max_unparsed=limit)

    rows = {f"greedy:{name}": score(answers) for name, answers in greedy.items()}
    for n in ns:
        pooled = [(scene, answer) for scene, group in zip(scenes, candidates) for answer in group[:n]]
        rows[f"random-of-{n}"] = evaluate(
            [sc for sc, _ in pooled], [a for _, a in pooled], cfg.world.partners, cfg.empty_cells, max_unparsed=limit
        )
        for name, values in scores.items():
            if name != "oracle":
                rows[f"best-of-{n}:{name}"] = score(pick_best(candidates, values, first_n=n))
        rows[f"oracle-of-{n}"] = score(pick_best(candidates, scores["oracle"], first_n=n))
    return rows


def v2_seed(args: argparse.Namespace, seed: int) -> dict:
    """One seed's rows and agreements (module doc); cached as JSON next to the seed's models."""
    settings = DemoSettings(
        output_dir=str(args.lab_dir / f"seed{seed}"),
        seed=seed,
        num_threads=args.num_threads,
        methods=dict(PRIMARY_POLICIES),
    )
    lab = Path(settings.output_dir)
    ns = sorted(set(args.ns))
    n_images = args.images or settings.test_images
    cache = lab / "best_of_n" / f"{args.split}-{n_images}img-n{max(ns)}-t{args.temperature:g}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run(settings, ("sft", "gate", "sample", "annotate", "train"))  # each stage is skipped when its outputs exist
    cfg = synthetic_config(settings)
    template = base_config(settings).data.template
    options = generation_options(settings, template)
    scenes, images, prompts, _ = split(settings, args.split, n_images)
    sft = load_model(lab / "sft")
    policies = {name: load_model(lab / "runs" / name / "final") for name in PRIMARY_POLICIES}
    timings, started = {}, time.perf_counter()
    greedy = {"sft": sft.generate(images, prompts, options)}
    greedy.update({name: model.generate(images, prompts, options) for name, model in policies.items()})
    timings["greedy"] = time.perf_counter() - started

    started = time.perf_counter()
    n_max = max(ns)
    candidates = sample_candidates(
        sft, images, prompts, n_max, sampling(settings, template, args.temperature, seed * 1000 + 7)
    )
    timings["sample"] = time.perf_counter() - started
    started = time.perf_counter()
    reward = RewardSettings(args.beta, template, batch_size=args.batch_size, gamma=SEGMENT_GAMMA)
    rewards, weights = v2_rewards(sft, policies, (images, prompts, candidates, greedy["sft"]), reward)
    timings["score"] = time.perf_counter() - started
    started = time.perf_counter()
    oracle = OracleFeedback(cfg.empty_cells)
    oracle_scores = [
        oracle.score(Query(image, prompt, {"scene": scene}), group)
        for scene, image, prompt, group in zip(scenes, images, prompts, candidates)
    ]
    rows = v2_rows(cfg, scenes, greedy, candidates, {**rewards, "oracle": oracle_scores}, ns, args.max_unparsed)
    agreement = {}
    for name, values in rewards.items():
        agree, pairs = pair_agreement(values, oracle_scores)
        agreement[name] = {"agreement": agree / max(pairs, 1), "pairs": pairs}
    timings["evaluate"] = time.perf_counter() - started
    tokens = [len(w) for w in weights]
    result = {
        "seed": seed,
        "split": args.split,
        "images": n_images,
        "ns": ns,
        "rows": rows,
        "agreement": agreement,
        "oracle_errors_per_sample": -statistics.fmean(v for group in oracle_scores for v in group),
        "segment_token_share": sum(int((w != 1).sum()) for w in weights) / sum(tokens),
        "answer_tokens": statistics.fmean(tokens),
        "settings": {
            "temperature": args.temperature,
            "beta": args.beta,
            "segment_gamma": SEGMENT_GAMMA,
            "template": template,
            "sampler": "sft",
            "policies": PRIMARY_POLICIES,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "examples": {
            "prompt": prompts[0],
            "greedy_sft": greedy["sft"][0],
            "candidates": candidates[0][:3],
            "oracle": oracle_scores[0][:3],
            "rewards": {k: v[0][:3] for k, v in rewards.items()},
        },
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(cache)
    # every sample and score, for re-analysis without resampling
    (cache.with_suffix(".samples.json")).write_text(
        json.dumps({"candidates": candidates, "oracle": oracle_scores, "rewards": rewards})
    )
    return result


def v2_comparisons(ns: list[int], primary: str) -> dict[str, tuple[str, str]]:
    """label -> (row a, row b) of the a - b differences; the first is the primary."""
    big = max(n for n in ns if n > 1) if any(n > 1 for n in ns) else ns[0]
    first = 16 if 16 in ns else big
    out = {
        f"best-of-{first}:{primary} - random-of-{first} (primary)": (f"best-of-{first}:{primary}", f"random-of-{first}")
    }
    for n in ns:
        if n == 1:
            continue
        for name in reward_names():
            label = f"best-of-{n}:{name} - random-of-{n}"
            if (f"best-of-{n}:{name}", f"random-of-{n}") not in out.values():
                out[label] = (f"best-of-{n}:{name}", f"random-of-{n}")
        out[f"oracle-of-{n} - random-of-{n}"] = (f"oracle-of-{n}", f"random-of-{n}")
    out[f"best-of-{big}:{primary} - greedy:sft"] = (f"best-of-{big}:{primary}", "greedy:sft")
    out[f"best-of-{big}:{primary} - greedy:ddpo_mean_g5"] = (f"best-of-{big}:{primary}", "greedy:ddpo_mean_g5")
    out["greedy:ddpo_mean_g5 - greedy:sft"] = ("greedy:ddpo_mean_g5", "greedy:sft")
    return out


def v2_aggregate(per_seed: dict[int, dict], primary: str) -> dict:
    seeds = sorted(per_seed)
    ns = per_seed[seeds[0]]["ns"]
    rows = list(per_seed[seeds[0]]["rows"])
    summary = {row: {m: mean_std([per_seed[s]["rows"][row][m] for s in seeds]) for m in METRICS} for row in rows}
    agreement = {
        name: interval([per_seed[s]["agreement"][name]["agreement"] for s in seeds]) for name in reward_names()
    }
    agreement_differences = {}
    for a, b in (
        ("ddpo_mean_g5/sum", "dpo_mean/sum"),
        ("ddpo_mean_g5/sum", "ddpo_mean_g5/mean"),
        ("ddpo_mean_g5/segment", "ddpo_mean_g5/sum"),
        ("dpo_mean/segment", "dpo_mean/sum"),
    ):
        agreement_differences[f"{a} - {b}"] = interval(
            [per_seed[s]["agreement"][a]["agreement"] - per_seed[s]["agreement"][b]["agreement"] for s in seeds]
        )
    differences = {}
    for label, (a, b) in v2_comparisons(ns, primary).items():
        differences[label] = {}
        for m in ("mention_hallucination_rate", "response_hallucination_rate", "object_recall", "mean_response_words"):
            differences[label][m] = paired_test(
                paired_differences(
                    [per_seed[s]["rows"][a][m] for s in seeds], [per_seed[s]["rows"][b][m] for s in seeds]
                )
            )
    primary_label = next(iter(differences))
    adjusted = holm({k: v["mention_hallucination_rate"][3] for k, v in differences.items() if k != primary_label})
    return {
        "seeds": seeds,
        "ns": ns,
        "primary": primary,
        "summary": summary,
        "agreement": agreement,
        "agreement_differences": agreement_differences,
        "differences": differences,
        "holm": adjusted,
        "primary_label": primary_label,
    }


def v2_table(agg: dict, per_seed: dict[int, dict], command: str) -> str:
    seeds, first = agg["seeds"], per_seed[agg["seeds"][0]]
    s = first["settings"]

    def mean(key: str) -> float:
        return statistics.fmean(per_seed[k][key] for k in seeds)

    lines = [
        f"Best-of-N on the v2 world: {first['images']} {first['split']} images per seed, seeds {seeds}; candidates "
        f"sampled from the SFT model at T {s['temperature']}; rewards beta {s['beta']} * (log pi - log pi_sft) of "
        f"the DPO (gamma 1) and DDPO (gamma 5) policies (Eq. 5 mean, lr 3e-6), variants sum / mean / segment "
        f"(gamma {s['segment_gamma']} on tokens that differ from the SFT model's greedy answer); greedy decoding for "
        f"the greedy rows. Primary reward: {agg['primary']}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Oracle errors per sample (mean over seeds): {mean('oracle_errors_per_sample'):.2f}; answer tokens "
        f"{mean('answer_tokens'):.1f}; share of tokens the segment variant weights by gamma: "
        f"{mean('segment_token_share'):.3f}.",
        "",
        "### Rows: mean ± std over seeds",
        "",
        *table_head(
            "row",
            "mention hall.",
            "response hall.",
            "companion rate",
            "recall",
            "words",
            "attribute err.",
            "position err.",
            "count err.",
            "empty-cell err.",
        ),
    ]
    for row, m in agg["summary"].items():
        cells = [format_mean_std(*m[k]) for k in METRICS if k != "mean_response_words"]
        cells.insert(4, f"{m['mean_response_words'][0]:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Agreement with the oracle on pairs of samples with different oracle scores (0.5 = chance)",
        "",
        "mean [95% t-interval over seeds]; pairs per seed in brackets",
        "",
        "| reward | agreement | per seed |",
        "|---|---|---|",
    ]
    for name, (mean, lo, hi) in agg["agreement"].items():
        per = ", ".join(
            f"{per_seed[k]['agreement'][name]['agreement']:.3f} ({per_seed[k]['agreement'][name]['pairs']})"
            for k in seeds
        )
        lines.append(f"| {name} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | {per} |")
    lines += [
        "",
        "Agreement differences (a - b), paired over seeds: "
        + "; ".join(
            f"{label} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for label, (mean, lo, hi) in agg["agreement_differences"].items()
        )
        + ".",
    ]
    lines += [
        "",
        "### Paired differences (a - b): mean [95% t-interval over seeds]; p: paired t-test, Holm-adjusted over the "
        "secondary comparisons (the primary is not adjusted)",
        "",
        "| comparison | mention hall. | p (Holm) | response hall. | recall | words |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in agg["differences"].items():
        p = row["mention_hallucination_rate"][3] if label == agg["primary_label"] else agg["holm"][label]
        cells = [
            format_interval(*row[m][:3], digits=1 if m == "mean_response_words" else 3)
            for m in (
                "mention_hallucination_rate",
                "response_hallucination_rate",
                "object_recall",
                "mean_response_words",
            )
        ]
        lines.append(f"| {label} | {cells[0]} | {p:.3f} | " + " | ".join(cells[1:]) + " |")
    times = {k: round(sum(per_seed[s]["timings_s"].get(k, 0) for s in seeds), 1) for k in first["timings_s"]}
    lines += [
        "",
        f"Wall time of each step (s, one thread, summed over seeds; on a shared machine it exceeds the CPU time): "
        f"{times}; total {sum(times.values()):.0f} s",
    ]
    return "\n".join(lines) + "\n"


def v2_plot(agg: dict, path: Path) -> None:
    ns, summary = agg["ns"], agg["summary"]
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(
        axes,
        ("mention_hallucination_rate", "object_recall", "mean_response_words"),
        ("mention-level object hallucination", "object recall", "words per answer"),
    ):
        ax.errorbar(
            ns,
            [summary[f"random-of-{n}"][metric][0] for n in ns],
            [summary[f"random-of-{n}"][metric][1] for n in ns],
            fmt="s--",
            color="gray",
            capsize=2,
            label="random-of-N (SFT samples)",
        )
        ax.errorbar(
            ns,
            [summary[f"oracle-of-{n}"][metric][0] for n in ns],
            [summary[f"oracle-of-{n}"][metric][1] for n in ns],
            fmt="^:",
            color="black",
            capsize=2,
            label="oracle-of-N",
        )
        for name, style in zip(reward_names(), ("o-", "o--", "o:", "d-", "d--", "d:")):
            ax.plot(
                ns, [summary[f"best-of-{n}:{name}"][metric][0] for n in ns], style, ms=4, label=f"best-of-N, {name}"
            )
        for name, color in (("sft", "tab:gray"), ("ddpo_mean_g5", "tab:red")):
            ax.axhline(summary[f"greedy:{name}"][metric][0], color=color, lw=0.8, label=f"greedy {name}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (candidates per image)")
        ax.set_ylabel(f"{label}\n(test, mean over seeds {agg['seeds']})", fontsize=8)
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


def main_v2(args: argparse.Namespace, command: str) -> int:
    if args.primary not in reward_names():
        raise SystemExit(
            f"--primary must be one of {', '.join(reward_names())} (chosen on validation), got {args.primary!r}"
        )
    per_seed = {seed: v2_seed(args, seed) for seed in args.seeds}
    agg = v2_aggregate(per_seed, args.primary)
    stem = "results" if args.split == "test" else "validation"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps({"command": command, **agg, "per_seed": per_seed}, indent=2))
    table = v2_table(agg, per_seed, command)
    (args.results / f"{stem}.md").write_text(table)
    v2_plot(agg, args.results / ("plot.png" if stem == "results" else "validation.png"))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--world", choices=("v2", "v1"), default="v2", help="v2 (default) or v1, the negative control (module doc)"
    )
    parser.add_argument(
        "--lab-dir", type=Path, default=Path("runs/v2lab"), help="v2: the lab's seed directories LAB/seed<S>"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 3], help="v2: the lab's seeds (each its own SFT model)"
    )
    parser.add_argument(
        "--primary", default="ddpo_mean_g5/sum", help="v2: the pre-registered reward, <policy>/<variant>"
    )
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=Path("runs/best_of_n/seed0"),
        help="v1: a `ddpo demo` output directory (made if missing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="v1: the demo's seed (and the sampling seed)")
    parser.add_argument("--quick", action="store_true", help="v1: the demo's --quick sizes (smoke run)")
    parser.add_argument("--train-config", default=None, help="v1: the demo's ddpo train YAML")
    parser.add_argument("--method", default="ddpo", help="v1: which demo run is the policy: runs/<method>/final")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="N values (v2 default 1 4 16 64; v1 1 4 16)")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument(
        "--images", type=int, default=None, help="first images of the split (default: the demo's test_images)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (v2 default 0.7, the lab's; v1 1.0)"
    )
    parser.add_argument(
        "--beta", type=float, default=None, help="reward beta (v2 default 0.5, the training beta; v1 0.1)"
    )
    parser.add_argument("--variant", choices=("sum", "mean", "segment"), default="sum", help="v1: the reward variant")
    parser.add_argument("--batch-size", type=int, default=64, help="scoring batch")
    parser.add_argument(
        "--max-unparsed",
        type=float,
        default=0.05,
        help="the largest share of unparsed answers a row may have and still be scored (the lab's rule; 1 = any)",
    )
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results directory (default experiments/results/best_of_n_v2; v1: experiments/results/best_of_n)",
    )
    args = parser.parse_args(argv)
    v2 = args.world == "v2"
    args.ns = args.ns or ([1, 4, 16, 64] if v2 else [1, 4, 16])
    args.temperature = args.temperature if args.temperature is not None else (0.7 if v2 else 1.0)
    args.beta = args.beta if args.beta is not None else (0.5 if v2 else 0.1)
    args.results = args.results or RESULTS / ("best_of_n_v2" if v2 else "best_of_n")
    torch.set_num_threads(args.num_threads)
    command = "python experiments/best_of_n.py " + " ".join(shlex.quote(a) for a in argv)
    if v2:
        return main_v2(args, command)
    results = experiment(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps({**results, "command": command}, indent=2))
    table = results_table(results, command)
    (args.results / "results.md").write_text(table)
    plot(results, args.results / "plot.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
