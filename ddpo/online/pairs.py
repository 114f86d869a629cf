"""Preference pairs from scored candidate answers, following RLAIF-V's pair construction.

Per prompt, N sampled answers carry a feedback score (`ddpo.online.feedback`: higher is better, e.g.
-(number of rejected claims)). Then (docs/PAPER_FACTS.md §3.3, RLAIF-V `utils/pair_construction.py`):

  1. every ordered pair (chosen, rejected) whose score gap is >= `min_gap` (1) is a candidate;
     identical texts never pair;
  2. `per_prompt` (2) of them are sampled without replacement (seeded) for each prompt;
  3. a length-balancing filter runs over the whole set (`balance_lengths`).

Step 3 is inferred, not read: RLAIF-V's `utils/get_pairs_filter_shorten.py` is only known by name. A
score that counts rejected claims favours short answers (fewer claims, fewer errors), so training on
raw pairs teaches "say less"; the filter's name says it removes pairs whose chosen answer is the
shorter one. Our rule: while the chosen answers are shorter on average than the rejected ones (in
words), drop the pair whose chosen answer is shortest relative to its rejected one (most negative
word difference, ties: the later pair). What is left has mean chosen length >= mean rejected length,
and the pairs that do not shorten are never dropped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ddpo.data.synthetic.language import n_words


@dataclass(frozen=True)
class Pair:
    prompt_index: int  # which prompt of the round
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float


def candidate_pairs(answers: Sequence[str], scores: Sequence[float], min_gap: float = 1.0) -> list[tuple[int, int]]:
    """(chosen index, rejected index) for every pair with score[chosen] - score[rejected] >= min_gap and
    different texts, in index order. Empty answers never pair: an empty answer makes no claim, so it can
    outscore every real one, and a pair with an empty side is not a usable training row."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores; give one score per answer")
    usable = [i for i, a in enumerate(answers) if a.strip()]
    return [(i, j) for i in usable for j in usable if scores[i] - scores[j] >= min_gap and answers[i] != answers[j]]


def sample_pairs(
    prompt_index: int,
    answers: Sequence[str],
    scores: Sequence[float],
    per_prompt: int,
    rng: random.Random,
    min_gap: float = 1.0,
) -> list[Pair]:
    """Up to `per_prompt` pairs of one prompt's answers, drawn without replacement from `candidate_pairs`."""
    options = candidate_pairs(answers, scores, min_gap)
    picked = rng.sample(options, min(per_prompt, len(options)))
    return [Pair(prompt_index, answers[i], answers[j], float(scores[i]), float(scores[j])) for i, j in picked]


def balance_lengths(pairs: Sequence[Pair]) -> list[Pair]:
    """Drop the most shortening pairs until mean chosen words >= mean rejected words (module doc);
    the kept pairs stay in their order."""
    kept = list(range(len(pairs)))
    diff = [n_words(p.chosen) - n_words(p.rejected) for p in pairs]
    total = sum(diff)
    # Removing the most negative differences first raises the mean difference fastest.
    for k in sorted(kept, key=lambda k: (diff[k], -k)):
        if total >= 0 or diff[k] >= 0:
            break
        kept.remove(k)
        total -= diff[k]
    return [pairs[k] for k in kept]


def build_pairs(
    answers: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    per_prompt: int = 2,
    min_gap: float = 1.0,
    seed: int = 0,
    balance: bool = True,
) -> tuple[list[Pair], dict]:
    """All prompts' pairs (steps 1-3 of the module doc) and counts for the log: prompts, prompts with
    a pair, pairs before and after the length filter, mean words of chosen and rejected answers."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} prompts of answers but {len(scores)} of scores")
    rng = random.Random(seed)
    pairs = [
        p
        for k, (group, values) in enumerate(zip(answers, scores))
        for p in sample_pairs(k, group, values, per_prompt, rng, min_gap)
    ]
    kept = balance_lengths(pairs) if balance else pairs
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    stats = {
        "prompts": len(answers),
        "prompts_with_pairs": len({p.prompt_index for p in pairs}),
        "pairs_sampled": len(pairs),
        "pairs": len(kept),
        "chosen_words": mean([n_words(p.chosen) for p in kept]),
        "rejected_words": mean([n_words(p.rejected) for p in kept]),
        "score_gap": mean([p.chosen_score - p.rejected_score for p in kept]),
    }
    return kept, stats
