"""Hallucination metrics of answers about scenes, computed exactly by the oracle's grounding.

Object hallucination (a mention of a shape the scene does not hold) is reported per response and per
mention, next to object recall and answer length, so that saying less cannot pass for hallucinating
less; the other claim types get their own error rates. Sentences the parser cannot read contribute no
claims; `unparsed_rate` reports how many responses had any.
"""

from __future__ import annotations

from collections.abc import Sequence

from ddpo.data.synthetic.annotator import ground
from ddpo.data.synthetic.language import n_words, parse
from ddpo.data.synthetic.world import Scene, partner_cell

CLAIM_GROUPS = {
    "attribute": ("color", "size"),
    "position": ("position",),
    "count": ("count",),
    "relation": ("relation",),
    "empty": ("empty",),
}


def companion_context(scene: Scene, partners: dict[str, str]) -> set[str]:
    """The partner shapes a co-occurrence prior would invent in `scene`: those of present anchors whose
    partner shape is absent and whose `partner_cell` is empty."""
    present = scene.shapes()
    return {
        partners[o.shape]
        for o in scene.objects
        if o.shape in partners and partners[o.shape] not in present and scene.at(partner_cell(o.cell)) is None
    }


def evaluate(
    scenes: Sequence[Scene], answers: Sequence[str], partners: dict[str, str] | None = None, empty_cells: bool = False
) -> dict[str, float]:
    """Metrics over paired `scenes` and `answers`:

    response_hallucination_rate  responses with >= 1 hallucinated object mention / responses with >= 1 object mention
    mention_hallucination_rate   hallucinated object mentions / all object mentions
    object_recall                scene objects described by a correct instance mention / all scene objects (pooled)
    mean_response_words          words per answer, punctuation excluded
    <type>_error_rate            wrong claims / claims, for attribute (colour, size), position, count, relation
                                 (claims about a hallucinated object are counted in the object rates only)
    unparsed_rate                responses with a sentence that fits no grammar rule / all responses
    With `partners` (the world's anchor -> partner map), the co-occurrence prior's share:
    companion_rate               scenes with a companion context (`companion_context`) whose answer names
                                 one of those absent partners / scenes with a context
    target_mention_rate          hallucinated mentions of a context's partner / all object mentions
    nontarget_mention_rate       the other hallucinated mentions / all object mentions (displacement)
    `empty_cells`: the v2 world's language (see annotator.ground).
    """
    if len(scenes) != len(answers):
        raise ValueError(f"evaluate: {len(scenes)} scenes but {len(answers)} answers; pass one answer per scene")
    mentioning = hallucinating = mentions = hallucinated = recalled = objects = words = unparsed = 0
    contexts = companions = targeted = 0
    wrong = {g: 0 for g in CLAIM_GROUPS}
    total = {g: 0 for g in CLAIM_GROUPS}
    for scene, answer in zip(scenes, answers):
        g = ground(scene, parse(answer), empty_cells)
        n_hallucinated = sum(g.hallucinated)
        if partners is not None:
            wanted = companion_context(scene, partners)
            named = {m.shape_name for m, h in zip(g.parse.mentions, g.hallucinated) if h}
            contexts += bool(wanted)
            companions += bool(wanted & named)
            targeted += sum(h and m.shape_name in wanted for m, h in zip(g.parse.mentions, g.hallucinated))
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
    if partners is not None:
        out["companion_rate"] = companions / max(contexts, 1)
        out["target_mention_rate"] = targeted / max(mentions, 1)
        out["nontarget_mention_rate"] = (hallucinated - targeted) / max(mentions, 1)
    out["unparsed_rate"] = unparsed / n
    out["num_responses"] = float(len(answers))
    return out


def gate_figures(
    single_scenes: Sequence[Scene],
    single_answers: Sequence[str],
    scenes: Sequence[Scene],
    answers: Sequence[str],
    partners: dict[str, str],
    empty_cells: bool = False,
) -> dict[str, float]:
    """The perception gate's figures, from greedy answers on held-out images:

    single_object_accuracy  one-object images whose object is named with its shape (recalled) / images
    recall_without_anchor   object recall on the `scenes` that hold no anchor (no key of `partners`)
    companion_rate          `scenes` with a companion context whose answer names an absent companion /
                            scenes with a context (see `evaluate`)
    """
    if any(len(s.objects) != 1 for s in single_scenes):
        raise ValueError("gate_figures: single_scenes must each hold exactly one object")
    single = evaluate(single_scenes, single_answers, empty_cells=empty_cells)["object_recall"]
    plain = [k for k, s in enumerate(scenes) if not s.shapes() & set(partners)]
    recall = evaluate([scenes[k] for k in plain], [answers[k] for k in plain], empty_cells=empty_cells)["object_recall"]
    companion = evaluate(scenes, answers, partners, empty_cells)["companion_rate"]
    return {
        "single_object_accuracy": single,
        "recall_without_anchor": recall,
        "companion_rate": companion,
        "single_object_images": float(len(single_scenes)),
        "scenes_without_anchor": float(len(plain)),
        "scenes_with_companion_context": float(sum(bool(companion_context(s, partners)) for s in scenes)),
    }
