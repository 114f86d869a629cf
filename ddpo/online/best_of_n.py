"""Best-of-N at inference: sample N answers per prompt, keep the one with the highest implicit reward.

    options = GenerationOptions(template="llava_v1", temperature=1.0, seed=0, batch_size=64)
    candidates = sample_candidates(policy, images, prompts, 16, options)
    answers, rewards = best_of_n(policy, reference, images, prompts, candidates, RewardSettings(0.1, "llava_v1"))

The reward is `ddpo.online.scoring.implicit_rewards` (the trained policy against its reference model), so a
DPO-trained model serves as its own reward model (RLAIF-V's inference-time scaling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from PIL import Image

from ddpo.models.base import GenerationOptions
from ddpo.online.scoring import RewardSettings, implicit_rewards


def sample_candidates(
    model, images: Sequence[Image.Image], prompts: Sequence[str], n: int, options: GenerationOptions
) -> list[list[str]]:
    """n sampled answers per prompt ([len(prompts)][n]), decoded with `options` (template, temperature,
    top_p, max_new_tokens, seed, batch size) and always sampled, whatever `options.do_sample` says:
    n greedy answers would be n copies of one. Reproducible for a given `options.seed` and batch size.

    The prompts are repeated n times in one generation call, so the N samples share batches.
    """
    if n < 1:
        raise ValueError(f"sample_candidates: n is {n}; give the number of candidates per prompt (>= 1)")
    repeated_images = [image for image in images for _ in range(n)]
    repeated_prompts = [prompt for prompt in prompts for _ in range(n)]
    flat = model.generate(repeated_images, repeated_prompts, replace(options, do_sample=True))
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def score_candidates(
    policy,
    reference,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    settings: RewardSettings,
) -> list[list[float]]:
    """Implicit rewards of every candidate, shaped like `candidates`; all are scored in shared batches."""
    flat_images = [image for image, group in zip(images, candidates) for _ in group]
    flat_prompts = [prompt for prompt, group in zip(prompts, candidates) for _ in group]
    flat_answers = [answer for group in candidates for answer in group]
    flat = implicit_rewards(policy, reference, flat_images, flat_prompts, flat_answers, settings)
    out, start = [], 0
    for group in candidates:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def pick_best(
    candidates: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]], first_n: int | None = None
) -> list[str]:
    """Per prompt, the candidate with the highest reward among the first `first_n` (all by default);
    ties go to the earliest candidate."""
    best = []
    for group, values in zip(candidates, rewards):
        k = len(group) if first_n is None else first_n
        if not 1 <= k <= len(group):
            raise ValueError(f"first_n {first_n} is outside 1..{len(group)} candidates")
        best.append(group[max(range(k), key=lambda i: (values[i], -i))])
    return best


def best_of_n(
    policy,
    reference,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    settings: RewardSettings,
) -> tuple[list[str], list[list[float]]]:
    """(the highest-reward candidate per prompt, every candidate's reward)."""
    rewards = score_candidates(policy, reference, images, prompts, candidates, settings)
    return pick_best(candidates, rewards), rewards


def pair_agreement(rewards: Sequence[Sequence[float]], truths: Sequence[Sequence[float]]) -> tuple[float, int]:
    """How often a reward orders two samples of one prompt as the ground truth does: (agreements, pairs).

    Over every unordered pair of one prompt's samples whose true scores differ (pairs the truth ties say
    nothing about a ranking); a pair the reward ties counts one half (a coin flip breaks it). agreements /
    pairs is 0.5 for a reward that knows nothing, 1 for one that orders like the truth.
    """
    agree, total = 0.0, 0
    for k, (values, truth) in enumerate(zip(rewards, truths, strict=True)):
        if len(values) != len(truth):
            raise ValueError(f"prompt {k}: {len(values)} rewards but {len(truth)} true scores")
        r, t = torch.tensor(values, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64)
        upper = torch.triu(torch.ones(len(r), len(r), dtype=torch.bool), diagonal=1)
        dr, dt = (r[:, None] - r[None, :])[upper], (t[:, None] - t[None, :])[upper]
        counted = dt != 0
        total += int(counted.sum())
        agree += float(((dr * dt > 0) & counted).sum()) + 0.5 * float(((dr == 0) & counted).sum())
    return agree, total
