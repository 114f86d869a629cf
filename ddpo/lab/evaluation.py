"""Measuring a lab model against the world's ground truth: its metrics on a split (greedy or sampled),
its drift from the SFT model, and that drift probed during training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ddpo.lab.settings import DemoSettings, generation_options
from ddpo.lab.world import split, synthetic_config
from ddpo.models.base import answer_token_logps
from ddpo.trainer import TrainerCallback

METRICS = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall", "mean_response_words")
PRIOR_METRICS = ("companion_rate", "target_mention_rate", "nontarget_mention_rate")
CLAIM_ERRORS = ("attribute_error_rate", "position_error_rate", "count_error_rate", "empty_error_rate")
LOGPS_BATCH = 64  # answers per forward when the drift is measured (the models are tiny)


def evaluate_model(
    model,
    settings: DemoSettings,
    split_name: str,
    n: int,
    template: str,
    temperature: float | None = None,
    max_unparsed: float | None = None,
) -> tuple[dict, list[str]]:
    """Metrics of `model`'s answers on a split: greedy, or sampled at `temperature` (seeded). Above
    `max_unparsed` (default `settings.max_unparsed`) unparsed answers, UnparsedError names the split, the
    count and examples instead of a score."""
    from ddpo.data.synthetic.metrics import UnparsedError, check_max_unparsed, evaluate

    limit = check_max_unparsed(settings.max_unparsed if max_unparsed is None else max_unparsed)  # before generating
    cfg = synthetic_config(settings)
    scenes, images, prompts, _ = split(settings, split_name, n)
    options = generation_options(settings, template)
    if temperature is not None:
        options = replace(options, do_sample=True, temperature=temperature, seed=settings.seed + 7)
    answers = model.generate(images, prompts, options)
    try:
        return evaluate(scenes, answers, cfg.world.partners, cfg.empty_cells, limit), answers
    except UnparsedError as e:
        decoding = "greedy" if temperature is None else f"sampled at T {temperature}"
        raise UnparsedError(
            f"{split_name} split, {decoding}: {e} In the lab that limit is DemoSettings.max_unparsed.",
            e.count,
            e.total,
            e.examples,
        ) from None


def drift(policy_logps: Sequence[torch.Tensor], reference_logps: Sequence[torch.Tensor]) -> float:
    """Mean per-token log-ratio log pi(y_t) - log pi_ref(y_t), pooled over all answer tokens."""
    diff = torch.cat([p - r for p, r in zip(policy_logps, reference_logps)])
    return float(diff.mean())


class DriftProbe(TrainerCallback):
    """Logs the policy's drift from the SFT model during training: the mean per-token log-ratio
    log pi - log pi_sft on the SFT model's greedy answers to the first validation images, at the
    first step and then every `every` steps (and the last) -> `path` (JSONL)."""

    def __init__(self, probe: dict, reference_logps: Sequence[torch.Tensor], every: int, path: Path):
        """`probe`: the SFT model's answers and what they answer ("images", "prompts", "answers",
        "template")."""
        self.probe, self.reference_logps, self.every, self.path = probe, reference_logps, every, path

    def on_log(self, trainer, record: dict) -> None:
        if trainer.step != 1 and trainer.step % self.every and trainer.step != trainer.total_steps:
            return
        p = self.probe
        logps = answer_token_logps(
            trainer.model, p["images"], p["prompts"], p["answers"], p["template"], batch_size=LOGPS_BATCH
        )
        value = drift(logps, self.reference_logps)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.step, "drift": value}) + "\n")
