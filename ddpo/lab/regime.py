"""The dense-regime map's points (experiments/dense_regime.py): one (seed, answer length) point is one
SFT model, its on-policy pairs and the runs of `recipes.REGIME_RUNS` from it, evaluated greedily.

The 55-word point is the v2 lab's seed directory (its SFT model, pairs and identical runs linked, not
retrained); the other lengths continue its supervised fine-tuning for SFT_STEPS steps on captions of
their length (its perception kept) and must pass the same perception gate."""

from __future__ import annotations

import json
from pathlib import Path

from ddpo.lab.pairs import answer_tokens, segment_subsets
from ddpo.lab.recipes import REGIME_PARTS, REGIME_RUNS, regime_runs
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run, train_with_sweep

MIDDLE = 55  # the v2 lab's answer length (target words)
SFT_STEPS = 300  # continued SFT at another length, from the 55-word model
# the lab's name for the same run, where it differs
LAB_NAMES = {"ddpo_sum_g5_lr3e-05": "ddpo_sum_g5_tuned"}
# Corrected segments per pair, controlled by selection (55 words only: the most pairs): the first
# SEGMENT_PAIRS pairs of the point with exactly one segment, and the first with two or more. 430: the
# fewest one-segment pairs of any seed is 433.
SEGMENT_SUBSETS = {"one": (1, 1), "multi": (2, 10**6)}
SEGMENT_PAIRS = 430


def point_dir(root: Path, seed: int, length: int) -> Path:
    return root / f"seed{seed}" / f"words{length}"


def point_settings(root: Path, seed: int, length: int, num_threads: int) -> DemoSettings:
    """The point's lab settings: greedy evaluation only; other lengths continue the 55-word SFT model."""
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


def link_middle(point: Path, lab: Path) -> None:
    """Link the v2 lab's seed directory into the 55-word point: its SFT model, gate, pairs, reference
    cache and the runs whose settings are identical, so they are not retrained."""
    point.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "gate.json", "pairs", "reference_cache"):
        if not (point / name).exists() and (lab / name).exists():
            (point / name).symlink_to((lab / name).resolve())
    (point / "runs").mkdir(exist_ok=True)
    for part in ("primary", "matched", "gamma", "sum", "sumtuned"):
        for name in REGIME_RUNS[part]:
            twin = lab / "runs" / LAB_NAMES.get(name, name)
            if (twin / "final").is_dir() and not (point / "runs" / name).exists():
                (point / "runs" / name).symlink_to(twin.resolve(), target_is_directory=True)


def run_point(root: Path, seed: int, length: int, parts: list[str], lab: Path | None, num_threads: int) -> None:
    """One point end to end: its lab stages up to the pairs (GateError if the SFT model misses the
    gate), the runs of `parts`, then the evaluation of every finished run of the point (not only this
    call's parts: results.json holds them all; runs with an up-to-date eval.json are not re-evaluated)."""
    out = point_dir(root, seed, length)
    if lab is not None:  # every length starts from the lab's 55-word SFT model
        link_middle(point_dir(root, seed, MIDDLE), lab / f"seed{seed}")
    settings = point_settings(root, seed, length, num_threads)
    run(settings, ["sft", "gate", "sample", "annotate"])
    subsets = None
    if "segments" in parts and length == MIDDLE:
        subsets = segment_subsets(out, SEGMENT_SUBSETS, SEGMENT_PAIRS)
    tokens = answer_tokens(out / "pairs" / "train.jsonl")
    settings.methods = regime_runs(parts, tokens, subsets)
    train_with_sweep(settings, out)
    made = {k: f for k in SEGMENT_SUBSETS if (f := out / "segment_pairs" / f"{k}.jsonl").is_file()}
    every = regime_runs(list(REGIME_PARTS), tokens, made)
    settings.methods = {m: o for m, o in every.items() if (out / "runs" / m / "final").is_dir()}
    run(settings, ["eval"])


def collect_points(root: Path, seeds: list[int], lengths: list[int], reported: tuple[str, ...]) -> dict:
    """{length: {"seeds": [...], "pairs": [stats per seed], "gate": [...], "test"/"validation": {run:
    {metric: [per seed]}}, "drift": {run: [per seed]}, "segment_pairs": [...]}} over the seeds whose
    point has results.json and the runs every one of them has; test also holds the answer length."""
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
                r: {k: [res["methods"][r][k] for _, res in done] for k in (*reported, "mean_response_words")}
                for r in runs
            },
            "validation": {r: {k: [res["validation"][r][k] for _, res in done] for k in reported} for r in runs},
            "drift": {r: [res["drift"][r] for _, res in done] for r in runs},
            "segment_pairs": [
                json.loads(f.read_text())
                for s, _ in done
                if (f := point_dir(root, s, length) / "segment_pairs" / "stats.json").is_file()
            ],
        }
    return table
