"""Hallucination metrics of answers about scenes, computed exactly by the oracle's grounding.

Object hallucination (a mention of a shape the scene does not hold) is reported per response and per
mention, next to object recall and answer length, so that saying less cannot pass for hallucinating
less; the other claim types get their own error rates. Sentences the parser cannot read contribute no
claims; `unparsed_rate` reports how many responses had any, and above `max_unparsed` (default 5%)
`evaluate` gives no score at all but raises `UnparsedError`, naming the count and a few examples: an
unread sentence can hide a hallucination, and a run of unread answers would score 0.0 hallucination.

`UnparsedError` and `check_unparsed` are the one unparsed-answer rule of every evaluation (the benchmarks
of ddpo/eval use them too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ddpo.data.synthetic.annotator import ground
from ddpo.data.synthetic.language import NUMBERS, POSITIONS, n_words, parse
from ddpo.data.synthetic.world import Scene, partner_cell

DEFAULT_MAX_UNPARSED = 0.05  # share of unparsed answers above which no score is given
EXAMPLES_SHOWN = 3  # unparsed answers quoted in the error; the rest are counted
EXAMPLE_CHARS = 80  # an example is cut to this many characters, so the message stays a few lines

CLAIM_GROUPS = {
    "attribute": ("color", "size"),
    "position": ("position",),
    "count": ("count",),
    "relation": ("relation",),
    "empty": ("empty",),
}
# RLHF-V Table 3 (MHumanEval): the share of responses with at least one hallucination of a kind. Claim kinds
# per Table-3 kind: an invented object is a hallucinated mention, and a false "at the <cell> is nothing." denies
# an object that is there (both are what the annotator corrects as "object"); relations are positions (the paper's
# position category covers where things are relative to each other); "number" is the paper's word for counts.
TABLE3_KINDS = {
    "object": ("empty",),
    "position": ("position", "relation"),
    "number": ("count",),
    "attribute": ("color", "size"),
}
TABLE3_COLUMNS = (*TABLE3_KINDS, "all")


def companion_context(scene: Scene, partners: dict[str, str]) -> set[str]:
    """The partner shapes a co-occurrence prior would invent in `scene`: those of present anchors whose
    partner shape is absent and whose `partner_cell` is empty."""
    present = scene.shapes()
    return {
        partners[o.shape]
        for o in scene.objects
        if o.shape in partners and partners[o.shape] not in present and scene.at(partner_cell(o.cell)) is None
    }


class UnparsedError(ValueError):
    """Too many answers could not be parsed for a score to mean anything. `count` of `total` answers;
    `examples`: (which answer, the text that failed) for the first few."""

    def __init__(self, message: str, count: int, total: int, examples: list[tuple[str, str]]):
        super().__init__(message)
        self.count, self.total, self.examples = count, total, examples


def check_max_unparsed(max_unparsed: float) -> float:
    """`max_unparsed` itself, if it is a share in [0, 1); 1 is refused so that a run whose every answer is
    unparsed can never be scored."""
    if not 0 <= max_unparsed < 1:
        raise ValueError(
            f"max_unparsed (--max-unparsed) must be a share in [0, 1), got {max_unparsed!r}: "
            "e.g. 0.05 gives no score when more than 5% of the answers are unparsed"
        )
    return max_unparsed


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "...")


def check_unparsed(
    what: str, how: str, unparsed: Sequence[tuple[str, str]], total: int, max_unparsed: float, fix: str
) -> None:
    """Raise UnparsedError when more than `max_unparsed` of `total` answers are unparsed. `what`: the
    evaluation; `how`: what unparsed means there; `unparsed`: (which answer, the text that failed) per
    unparsed answer; `fix`: what to do about it."""
    check_max_unparsed(max_unparsed)
    count = len(unparsed)
    if not count or count / total <= max_unparsed:
        return
    examples = list(unparsed[:EXAMPLES_SHOWN])
    shown = "; ".join(f"{where}: {_quote(text)}" for where, text in examples)
    raise UnparsedError(
        f"{what}: {count} of {total} answers ({count / total:.1%}) are unparsed ({how}), more than max_unparsed "
        f"{max_unparsed:g} allows (--max-unparsed), so no score is given. First {len(examples)}: {shown}. "
        f"Fix: {fix}; to score the parsed answers anyway, raise max_unparsed (below 1).",
        count,
        total,
        examples,
    )


def evaluate(
    scenes: Sequence[Scene],
    answers: Sequence[str],
    partners: dict[str, str] | None = None,
    empty_cells: bool = False,
    max_unparsed: float = DEFAULT_MAX_UNPARSED,
) -> dict[str, float]:
    """Metrics over paired `scenes` and `answers`:

    response_hallucination_rate  responses with >= 1 hallucinated object mention / responses with >= 1 object mention
    mention_hallucination_rate   hallucinated object mentions / all object mentions
    object_recall                scene objects described by a correct instance mention / all scene objects (pooled)
    mean_response_words          words per answer, punctuation excluded
    <kind>_response_rate         RLHF-V Table 3's endpoint: responses with >= 1 hallucination of that kind / all
                                 responses, for object, position, number, attribute (`TABLE3_KINDS`) and all
                                 (any wrong claim or hallucinated mention)
    <type>_error_rate            wrong claims / claims, for attribute (colour, size), position, count, relation
                                 (claims about a hallucinated object are counted in the object rates only)
    unparsed_rate                responses with a sentence that fits no grammar rule / all responses
    num_unparsed                 those responses
    With `partners` (the world's anchor -> partner map), the co-occurrence prior's share:
    companion_rate               scenes with a companion context (`companion_context`) whose answer names
                                 one of those absent partners / scenes with a context
    target_mention_rate          hallucinated mentions of a context's partner / all object mentions
    nontarget_mention_rate       the other hallucinated mentions / all object mentions (displacement)
    `empty_cells`: the v2 world's language (see annotator.ground).

    Mentions and claims exist only in parsed sentences, so the mention, claim and response rates are over
    parsed text; recall, length and the companion rate count an unread sentence as naming nothing, which
    `max_unparsed` bounds: above that share of unparsed responses, UnparsedError instead of a score.
    """
    check_max_unparsed(max_unparsed)
    out, unparsed = _metrics(scenes, answers, partners, empty_cells)
    check_unparsed(
        "synthetic evaluation",
        "a sentence fits no rule of the world's grammar",
        unparsed,
        len(answers),
        max_unparsed,
        "score answers of a model trained on this world, generated with its template and enough new tokens to "
        "finish the last sentence (ddpo eval: --template, --max-new-tokens)",
    )
    return out


def _metrics(
    scenes: Sequence[Scene], answers: Sequence[str], partners: dict[str, str] | None, empty_cells: bool
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """`evaluate`'s metrics, and (answer k, its first unparsed sentence) per unparsed answer, unchecked."""
    if len(scenes) != len(answers):
        raise ValueError(f"evaluate: {len(scenes)} scenes but {len(answers)} answers; pass one answer per scene")
    mentioning = hallucinating = mentions = hallucinated = recalled = objects = words = 0
    contexts = companions = targeted = 0
    table3 = dict.fromkeys(TABLE3_COLUMNS, 0)
    unparsed: list[tuple[str, str]] = []
    wrong = {g: 0 for g in CLAIM_GROUPS}
    total = {g: 0 for g in CLAIM_GROUPS}
    for k, (scene, answer) in enumerate(zip(scenes, answers)):
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
        if g.parse.unparsed:
            start, end = g.parse.unparsed[0]
            unparsed.append((f"answer {k}", answer[start:end]))
        for kind in response_kinds(g):
            table3[kind] += 1
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
    out.update({f"{kind}_response_rate": table3[kind] / n for kind in TABLE3_COLUMNS})
    if partners is not None:
        out["companion_rate"] = companions / max(contexts, 1)
        out["target_mention_rate"] = targeted / max(mentions, 1)
        out["nontarget_mention_rate"] = (hallucinated - targeted) / max(mentions, 1)
    out["unparsed_rate"] = len(unparsed) / n
    out["num_responses"] = float(len(answers))
    out["num_unparsed"] = float(len(unparsed))
    return out, unparsed


def response_kinds(g) -> set[str]:
    """The Table-3 kinds (`TABLE3_COLUMNS`) of which a grounded response holds at least one hallucination."""
    wrong = {v.claim.kind for v in g.errors}
    kinds = {kind for kind, claims in TABLE3_KINDS.items() if wrong & set(claims)}
    if any(g.hallucinated):
        kinds.add("object")
    return kinds | ({"all"} if kinds or wrong else set())


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
    unparsed_rate           answers (one-object and `scenes`) with a sentence that fits no grammar rule / answers
    No unparsed limit: an unread answer names nothing, so it can only lower the gate's figures (a model that
    writes unreadable text misses the gate); `unparsed_rate` tells that cause apart.
    """
    if any(len(s.objects) != 1 for s in single_scenes):
        raise ValueError("gate_figures: single_scenes must each hold exactly one object")
    single, single_unparsed = _metrics(single_scenes, single_answers, None, empty_cells)
    plain = [k for k, s in enumerate(scenes) if not s.shapes() & set(partners)]
    plain_metrics, _ = _metrics([scenes[k] for k in plain], [answers[k] for k in plain], None, empty_cells)
    every, every_unparsed = _metrics(scenes, answers, partners, empty_cells)
    return {
        "single_object_accuracy": single["object_recall"],
        "recall_without_anchor": plain_metrics["object_recall"],
        "companion_rate": every["companion_rate"],
        "single_object_images": float(len(single_scenes)),
        "scenes_without_anchor": float(len(plain)),
        "scenes_with_companion_context": float(sum(bool(companion_context(s, partners)) for s in scenes)),
        "unparsed_rate": (len(single_unparsed) + len(every_unparsed)) / max(len(single_answers) + len(answers), 1),
    }


PERCEPTION_KINDS = ("shape", "color", "position", "count")


def kind_accuracy(
    scenes: Sequence[Scene],
    answers: Sequence[str],
    color_confusions: dict[str, str],
    drift_cells: Sequence[tuple[int, int]],
    partners: dict[str, str],
    empty_cells: bool = False,
    confusion_shapes: Sequence[str] = (),
) -> dict[str, float]:
    """Per kind, how often an answer names right what it describes, outside the captions' prior contexts
    (a model that sees names what is there; inside a context a caption prior may override it).

    shape_accuracy     scene objects named with their shape / scene objects (recall)
    color_accuracy     described objects (mentions of a present shape) whose colour is right / described
                       objects, those of a colour the captions confuse (a key of `color_confusions`, on one of
                       the `confusion_shapes` if any are given) left out
    position_accuracy  described objects whose position is right / described objects, those in a `drift_cells`
                       cell while the centre is empty (the captions' centre drift) left out
    count_accuracy     overviews whose total is right / overviews ("the image shows N objects."), those of scenes
                       with a companion context left out (a caption that invents the companion counts it)
    Inside the contexts, the prior's rate: `color_prior_rate` (confused colours said as the mapped colour),
    `position_prior_rate` (drift-cell objects said at the centre) and `count_prior_rate` (overviews one above the
    truth: the invented companion counted); each figure comes with its `_n`.
    """
    hits: Counter = Counter()
    seen: Counter = Counter()
    for scene, answer in zip(scenes, answers):
        g = ground(scene, parse(answer), empty_cells)
        seen["shape"] += len(scene.objects)
        hits["shape"] += len(g.mentioned_objects())
        centre_empty = scene.at((1, 1)) is None
        context = bool(companion_context(scene, partners))
        for k, m in enumerate(g.parse.mentions):
            o = g.referents[k]
            if o is None or g.hallucinated[k] or not m.is_instance:
                continue
            if m.color is not None:
                confused = o.color in color_confusions and (o.shape in confusion_shapes or not confusion_shapes)
                kind = "color_prior" if confused else "color"
                truth = color_confusions.get(o.color) if kind == "color_prior" else o.color
                seen[kind] += 1
                hits[kind] += m.color.text == truth
            if m.position:
                kind = "position_prior" if o.cell in drift_cells and centre_empty else "position"
                truth = POSITIONS[(1, 1)] if kind == "position_prior" else POSITIONS[o.cell]
                seen[kind] += 1
                hits[kind] += m.position_name == truth
        for s in g.parse.sentences:
            if s.kind == "overview":
                kind = "count_prior" if context else "count"
                seen[kind] += 1
                hits[kind] += s.total.text == NUMBERS[len(scene.objects) + (kind == "count_prior")]
    out = {}
    for kind in (*PERCEPTION_KINDS, "color_prior", "position_prior", "count_prior"):
        name = f"{kind}_rate" if kind.endswith("prior") else f"{kind}_accuracy"
        out[name] = hits[kind] / seen[kind] if seen[kind] else float("nan")
        out[f"{name}_n"] = float(seen[kind])
    return out
