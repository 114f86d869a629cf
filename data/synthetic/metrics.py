"""Hallucination metrics of answers about scenes, computed exactly by the oracle's grounding.

Object hallucination (a mention of a shape the scene does not hold) is reported per response and per
mention, next to object recall and answer length, so that saying less cannot pass for hallucinating
less; the other claim types get their own error rates. Sentences the parser cannot read contribute no
claims; `unparsed_rate` reports how many responses had any.
"""
from __future__ import annotations

from typing import Sequence

from data.synthetic.annotator import ground
from data.synthetic.language import n_words, parse
from data.synthetic.world import Scene

CLAIM_GROUPS = {"attribute": ("color", "size"), "position": ("position",), "count": ("count",), "relation": ("relation",)}


def evaluate(scenes: Sequence[Scene], answers: Sequence[str]) -> dict[str, float]:
    """Metrics over paired `scenes` and `answers`:

    response_hallucination_rate  responses with >= 1 hallucinated object mention / responses with >= 1 object mention
    mention_hallucination_rate   hallucinated object mentions / all object mentions
    object_recall                scene objects described by a correct instance mention / all scene objects (pooled)
    mean_response_words          words per answer, punctuation excluded
    <type>_error_rate            wrong claims / claims, for attribute (colour, size), position, count, relation
                                 (claims about a hallucinated object are counted in the object rates only)
    unparsed_rate                responses with a sentence that fits no grammar rule / all responses
    """
    if len(scenes) != len(answers):
        raise ValueError(f"evaluate: {len(scenes)} scenes but {len(answers)} answers; pass one answer per scene")
    mentioning = hallucinating = mentions = hallucinated = recalled = objects = words = unparsed = 0
    wrong = {g: 0 for g in CLAIM_GROUPS}
    total = {g: 0 for g in CLAIM_GROUPS}
    for scene, answer in zip(scenes, answers):
        g = ground(scene, parse(answer))
        n_hallucinated = sum(g.hallucinated)
        mentioning += bool(g.hallucinated)
        hallucinating += n_hallucinated > 0
        mentions += len(g.hallucinated)
        hallucinated += n_hallucinated
        recalled += len(g.mentioned_objects())
        objects += len(scene.objects)
        words += n_words(answer)
        unparsed += bool(g.parse.unparsed)
        for v in g.verdicts:
            for group, kinds in CLAIM_GROUPS.items():
                if v.claim.kind in kinds:
                    total[group] += 1
                    wrong[group] += not v.correct
    n = max(len(answers), 1)
    out = {
        "response_hallucination_rate": hallucinating / max(mentioning, 1),
        "mention_hallucination_rate": hallucinated / max(mentions, 1),
        "object_recall": recalled / max(objects, 1),
        "mean_response_words": words / n,
    }
    out.update({f"{group}_error_rate": wrong[group] / max(total[group], 1) for group in CLAIM_GROUPS})
    out["unparsed_rate"] = unparsed / n
    out["num_responses"] = float(len(answers))
    return out
