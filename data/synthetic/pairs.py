"""Training data from the synthetic world: noisy SFT captions, and preference pairs.

Preference pairs come from two places:
  `synthetic_records`     rejected = a noisy description (>= 1 injected error), chosen = the oracle's
                          minimal correction of it; no model needed (quick tiny training runs,
                          `data.format: synthetic`);
  `records_from_answers`  rejected = a model's sampled answer, chosen = its correction (the demo
                          pipeline); clean and unreadable answers make no pair and are counted.
In both, the trainer sees only the two texts: it re-finds the corrected segments by diffing them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ddpo.data.records import PreferenceRecord
from ddpo.data.synthetic.annotator import AnnotatorStyle, correct, humanize
from ddpo.data.synthetic.language import PROMPTS, LanguageConfig, n_words
from ddpo.data.synthetic.noise import NoiseConfig, noisy_caption
from ddpo.data.synthetic.priors import PriorConfig, prior_caption
from ddpo.data.synthetic.world import Scene, WorldConfig, render, sample_scene


@dataclass
class SyntheticConfig:
    """The world, how it is described, and the caption noise: v1's `noise`, or the v2 world's language
    priors when `priors` is set (then `noise` is unused, and texts may say a cell is empty)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    priors: PriorConfig | None = None

    @property
    def empty_cells(self) -> bool:
        """Whether texts of this world may say "at the <cell> is nothing." (the oracle's v2 reading)."""
        return self.priors is not None

    def caption(self, scene: Scene, rng: np.random.Generator):
        """A biased SFT caption of `scene` (deterministic given the rng state)."""
        if self.priors is not None:
            return prior_caption(scene, rng, self.world, self.language, self.priors)
        return noisy_caption(scene, rng, self.world, self.language, self.noise)


@dataclass
class SFTExample:
    image: Image.Image
    prompt: str
    caption: str  # the noisy target answer
    scene: Scene


def _prompt(rng: np.random.Generator, style: str) -> str:
    options = PROMPTS[style]
    return options[int(rng.integers(len(options)))]


def sft_examples(n: int, seed: int, cfg: SyntheticConfig | None = None) -> list[SFTExample]:
    """`n` (image, prompt, noisy caption) triples for supervised fine-tuning; deterministic per seed."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, cfg.world)
        prompt = _prompt(rng, cfg.language.style)
        caption = cfg.caption(scene, rng).text
        out.append(SFTExample(render(scene, cfg.world), prompt, caption, scene))
    return out


# Severity weight of a correction, by its type, for the HSA-DPO-style recipe (loss.token_weights 'severity').
# The lab's own choice (docs/DENSE_METHODS.md): naming an absent object is the major error, a wrong
# attribute, position, count or relation of a real object a minor one. Only the rejected answer carries them
# (HSA-DPO scores the rejected side by default).
SEVERITY = {"object": 3.0, "attribute": 1.5, "position": 1.5, "count": 1.5, "relation": 1.5}


def severity_spans(corrections) -> list[tuple[int, int, float]]:
    """[start, end, weight] spans of the rejected answer from its corrections (`SEVERITY` by type)."""
    return [(c.span[0], c.span[1], SEVERITY.get(c.type, 1.5)) for c in corrections if c.span[0] < c.span[1]]


def synthetic_records(
    n: int, seed: int, cfg: SyntheticConfig | None = None, max_tries: int = 20
) -> list[PreferenceRecord]:
    """`n` preference pairs: rejected = a noisy description with at least one injected error (noise
    redrawn up to `max_tries` times per scene, then a new scene), chosen = its oracle correction.
    Deterministic per seed. `meta` holds the scene, the injected errors and the corrections."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(seed)
    records: list[PreferenceRecord] = []
    while len(records) < n:
        scene = sample_scene(rng, cfg.world)
        prompt = _prompt(rng, cfg.language.style)
        for _ in range(max_tries):
            noisy = noisy_caption(scene, rng, cfg.world, cfg.language, cfg.noise)
            if noisy.errors:
                break
        annotation = correct(scene, noisy.text)
        if annotation.status != "hallucinated":
            continue  # no error drawn for this scene (or none left after correction): next scene
        records.append(
            PreferenceRecord(
                images=[render(scene, cfg.world)],
                prompt=prompt,
                chosen=annotation.corrected,
                rejected=noisy.text,
                row_index=len(records),
                source=f"synthetic(seed={seed})",
                idx=f"synthetic-{seed}-{len(records)}",
                meta={"scene": scene, "errors": noisy.errors, "corrections": annotation.corrections},
                rejected_severity=severity_spans(annotation.corrections),
            )
        )
    return records


def records_from_answers(
    scenes: Sequence[Scene],
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: Sequence[str],
    source: str = "sampled",
    empty_cells: bool = False,
    style: AnnotatorStyle | None = None,
    seed: int = 0,
) -> tuple[list[PreferenceRecord], dict]:
    """Model answers -> preference pairs through the oracle annotator: its minimal corrections, or with
    `style` a human-like annotator's (annotator.humanize: deletions, wider rewrites, slips; seeded by `seed`).

    Returns the records (row_index = the answer's index) and stats: counts of answers, pairs, clean,
    unparseable and empty answers, corrections per type, mean corrections per pair, mean words of the
    rejected and chosen answers, and what the human-like annotator did (`annotator`: missed, wrong_fix,
    deleted, rewritten; answers whose every error it missed count as clean).
    """
    if not len(scenes) == len(images) == len(prompts) == len(answers):
        raise ValueError(
            f"records_from_answers: got {len(scenes)} scenes, {len(images)} images, {len(prompts)} prompts "
            f"and {len(answers)} answers; pass one of each per answer"
        )
    records: list[PreferenceRecord] = []
    status: Counter = Counter()
    did: Counter = Counter()
    rng = np.random.default_rng(seed)
    for i, (scene, image, prompt, answer) in enumerate(zip(scenes, images, prompts, answers)):
        annotation = correct(scene, answer, empty_cells)
        if style is not None:
            annotation, done = humanize(answer, annotation, style, rng)
            did += done
        status[annotation.status] += 1
        if annotation.status != "hallucinated":
            continue
        records.append(
            PreferenceRecord(
                images=[image],
                prompt=prompt,
                chosen=annotation.corrected,
                rejected=answer,
                row_index=i,
                source=source,
                idx=f"{source}-{i}",
                meta={"scene": scene, "corrections": annotation.corrections},
                rejected_severity=severity_spans(annotation.corrections),
            )
        )
    stats = pair_stats(records, answers=len(answers), status=status)
    if style is not None:
        stats["annotator"] = {k: did[k] for k in ("missed", "wrong_fix", "deleted", "rewritten")}
    return records, stats


def diff_segments(rejected: str, chosen: str, min_match: int = 3) -> tuple[int, int]:
    """(corrected segments, corrected words of `rejected`) as the trainer's diff finds them: replacement
    gaps between matching blocks of >= `min_match` words (data/segments.py; the synthetic world's
    tokenizer is word-level, so words are its tokens)."""
    from ddpo.data.segments import corrected_positions, words_with_spans

    marked, _ = corrected_positions(words_with_spans(rejected)[0], words_with_spans(chosen)[0], min_match)
    runs = sum(1 for i in marked if i - 1 not in marked)
    return runs, len(marked)


def pair_stats(records: Sequence[PreferenceRecord], answers: int | None = None, status: Counter | None = None) -> dict:
    """Counts of answers, pairs, clean, unparseable and empty answers, corrections per type (from each
    record's meta) and their mix, mean corrections per pair, mean corrected segments per pair as the
    trainer's diff finds them (RLHF-V: 2.65), the share of rejected words inside them, mean words of the
    rejected and chosen answers."""
    status = status or Counter()
    types = Counter(c.type for r in records for c in r.meta["corrections"])
    pairs = max(len(records), 1)
    diffs = [diff_segments(r.rejected, r.chosen) for r in records]
    return {
        "answers": len(records) if answers is None else answers,
        "pairs": len(records),
        "clean": status["clean"],
        "unparseable": status["unparseable"],
        "empty": status["empty"],
        "corrections": dict(sorted(types.items())),
        "correction_mix": {t: n / max(sum(types.values()), 1) for t, n in sorted(types.items())},
        "corrections_per_pair": sum(types.values()) / pairs,
        "segments_per_pair": sum(d[0] for d in diffs) / pairs,
        "corrected_word_share": sum(d[1] for d in diffs) / max(sum(n_words(r.rejected) for r in records), 1),
        "rejected_words": sum(n_words(r.rejected) for r in records) / pairs,
        "chosen_words": sum(n_words(r.chosen) for r in records) / pairs,
    }
