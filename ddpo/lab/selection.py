"""The lab's one rule for choosing on validation (a learning rate, a checkpoint): the lowest
mention-level hallucination among candidates that keep object recall within RECALL_SLACK of the SFT
model's, since hallucination alone would reward saying less. The test split is never read to choose."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PRIMARY = "mention_hallucination_rate"  # the pre-registered endpoint of the v2 studies (greedy, test)
RECALL_SLACK = 0.02  # a setting may not cost more recall than this vs SFT


def least_hallucination_within_recall(validation: Mapping[str, dict], names: Sequence[str], sft_recall: float) -> str:
    """Of `names` (keys of `validation`), the lowest PRIMARY among those whose recall is at least
    `sft_recall - RECALL_SLACK` (none: the highest recall); ties go to the earliest name."""
    keep = [n for n in names if validation[n]["object_recall"] >= sft_recall - RECALL_SLACK]
    if not keep:
        return max(names, key=lambda n: (validation[n]["object_recall"], -names.index(n)))
    return min(keep, key=lambda n: (validation[n][PRIMARY], names.index(n)))


def best_lr(validation: Mapping[str, dict], runs: Mapping[float, str]) -> float:
    """Of runs {lr: run name}, the lr the rule picks (`validation` holds "sft" and every scorable run: a run
    missing from it wrote unreadable text, and is not a candidate)."""
    by_name = {name: lr for lr, name in runs.items() if name in validation}
    if not by_name:
        raise ValueError(f"no run of {sorted(runs.values())} could be scored on validation (all unparsed)")
    return by_name[least_hallucination_within_recall(validation, list(by_name), validation["sft"]["object_recall"])]


def choose_lrs(validation: Mapping[str, dict], norm: str, grid: Sequence[float]) -> dict:
    """The lr choice of DPO and DDPO (gamma 5) on an lr grid with normalisation `norm`: "shared" (one lr
    for both: the lowest sum of their PRIMARY among lrs where both keep recall; if none does, the lr whose
    worse recall is highest) and each method's own ("dpo", "ddpo": `best_lr`)."""
    sft_recall = validation["sft"]["object_recall"]
    names = {lr: (f"dpo_{norm}_lr{lr:g}", f"ddpo_{norm}_g5_lr{lr:g}") for lr in grid}
    shared = [lr for lr in grid if all(validation[n]["object_recall"] >= sft_recall - RECALL_SLACK for n in names[lr])]
    if not shared:
        shared = [max(grid, key=lambda lr: min(validation[n]["object_recall"] for n in names[lr]))]
    out = {"shared": min(shared, key=lambda lr: sum(validation[n][PRIMARY] for n in names[lr]))}
    for k, label in enumerate(("dpo", "ddpo")):
        out[label] = best_lr(validation, {lr: names[lr][k] for lr in grid})
    return out


def selection_score(metrics: dict) -> float:
    """The v1 world's rule: object recall minus response hallucination."""
    return metrics["object_recall"] - metrics["response_hallucination_rate"]


def select_checkpoint(validation: Mapping[str, dict], world: str, sft_validation: dict | None = None) -> str:
    """The name of the best candidate by its validation metrics: v2, the lab's rule against
    `sft_validation`'s recall; v1, the highest `selection_score` (ties: the earliest)."""
    names = list(validation)
    if world == "v1":
        return max(names, key=lambda n: (selection_score(validation[n]), -names.index(n)))
    if sft_validation is None:
        raise ValueError("the v2 selection rule needs the SFT model's validation metrics (its recall is the bar)")
    return least_hallucination_within_recall(validation, names, sft_validation["object_recall"])
