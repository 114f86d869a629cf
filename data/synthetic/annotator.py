"""The oracle: checks every claim of a text against the scene, and corrects the wrong ones minimally.

Like RLHF-V's human annotators it edits only the hallucinated segments of an answer (which may be a
model's): a wrong colour, size, position, number or relation word is replaced; a misnamed object is
renamed (with whatever else its phrase gets wrong); a phrase about an object that is not there is
rewritten into an object nobody described, or, where every object is described already, its sentence
(or list item) is deleted. Everything else is left byte-for-byte unchanged.

Grounding (which object a noun phrase means) is the minimal-edit reading. Indefinite mentions ("a
small red circle at the top left") introduce objects, so they are matched one-to-one to the scene's
objects, best agreement first: the object satisfying most of the phrase's claims -- shape, colour,
size, position -- (ties: same shape, then same position, then reading order). "a purple triangle at
the top left" where a purple square sits at the top left and a red triangle elsewhere is the square
misnamed (one word to change), not the triangle with a wrong colour and place: correcting it the
other way would push the position and colour words *away* from what the image shows. In the v2
world's language (`empty_cells`: texts may say "at the <cell> is nothing.") a phrase is only matched to
an object that has its shape or stands at its position: "a blue star at the top center" where the top
center is empty and no star is left to describe is an invented object, replaced by "at the top center
is nothing.", not some other undescribed object renamed and moved. A mention whose object has another
shape, or that is left without one (a second "a red circle" in a scene with one circle), is a
hallucinated object. Definite mentions ("the ...") refer back to the best object of their shape and
may share it. The claims that disagree with the matched object are its errors: the minimal set of
words to change.

RLHF-V's annotators were not minimal, clean or replace-only: they deleted hallucinated clauses, rewrote
more than the wrong words, and sometimes missed an error or fixed it wrongly. `humanize` turns `correct`'s
minimal annotation into such an annotator's (`AnnotatorStyle`); the lab's (`HUMAN_LIKE`, `ddpo demo`'s
default; measured on seed 0's pairs in experiments/results/lab_v3/CORRECTIONS.md):

| departure    | rate | per                                       | what the chosen answer gets                      |
|--------------|------|-------------------------------------------|--------------------------------------------------|
| missed error | 0.05 | error (correction)                        | the error kept (no pair if every one is missed)  |
| wrong fix    | 0.03 | one-word colour / position / number fix   | another wrong value (not the truth, not the      |
|              |      |                                           | answer's)                                        |
| deletion     | 0.30 | invented object at an empty cell          | its sentence deleted, not "at the X is nothing." |
| wide rewrite | 0.30 | object sentence holding a fix             | the whole sentence said again, object first      |
|              |      |                                           | ("a pink square is at the top left.")            |

RLHF-V reports no annotator error rates; these are the lab's choices: slips rare enough that a corrected
answer stays far better than its original (on seed 0's pairs 130 slips in 1,046 pairs), and deletions and
rewrites common enough to change the segments the trainer's diff finds (RLHF-V: 2.65 per answer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from ddpo.data.synthetic.language import (
    CELLS,
    NUMBERS,
    OPPOSITE,
    POSITIONS,
    RELATIONS,
    Claim,
    Empty,
    Instance,
    Mention,
    Parse,
    Word,
    parse,
    plural,
    relation_holds,
)
from ddpo.data.synthetic.world import COLOR_RGB, Scene, WorldObject

# Claim kind -> correction type, in the paper's categories (relations are its "other").
CORRECTION_TYPE = {
    "object": "object",
    "color": "attribute",
    "size": "attribute",
    "position": "position",
    "count": "count",
    "relation": "relation",
}


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    correct: bool
    truth: str | None = None  # what to write instead when wrong; None = the claim's unit must be deleted


@dataclass
class Grounding:
    """A parsed text checked against a scene."""

    parse: Parse
    referents: list[WorldObject | None]  # per mention: the object an instance mention describes (else None)
    hallucinated: list[bool]  # per mention: names an object that is not there (see the module doc)
    retarget: dict[int, WorldObject]  # hallucinated instance mentions fixable by renaming: the object they become
    verdicts: list[Verdict]

    @property
    def errors(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.correct]

    def mentioned_objects(self) -> set[tuple[int, int]]:
        """Cells of the scene objects described by some non-hallucinated instance mention."""
        return {o.cell for k, o in enumerate(self.referents) if o is not None and not self.hallucinated[k]}


def _agreement(m: Mention, o: WorldObject) -> tuple[int, bool, bool]:
    """(how many of the mention's claims -- shape, colour, size, position -- `o` satisfies, whether its
    shape does, whether its position does)."""
    shape = m.shape_name == o.shape
    at = m.position_name == POSITIONS[o.cell]
    agree = (
        shape + (m.color is not None and m.color.text == o.color) + (m.size is not None and m.size.text == o.size) + at
    )
    return int(agree), shape, at


def _resolve(scene: Scene, mentions: list[Mention], empty_cells: bool = False) -> list[WorldObject | None]:
    """Per mention, the object it describes (None: a count mention, a definite mention of an absent
    shape, or an indefinite mention left without an object)."""
    referents: list[WorldObject | None] = [None] * len(mentions)
    order = {o.cell: i for i, o in enumerate(scene.objects)}

    def key(k: int, o: WorldObject) -> tuple:
        agree, shape, at = _agreement(mentions[k], o)
        return -agree, -shape, -at, k, order[o.cell]

    # 1. indefinite mentions introduce objects: one-to-one, best agreements first (ties: same shape,
    #    then same position, then reading order)
    indefinite = [k for k, m in enumerate(mentions) if m.is_instance and m.det.text != "the"]
    used: set[tuple[int, int]] = set()
    candidates = [
        (k, o) for k in indefinite for o in scene.objects if not empty_cells or any(_agreement(mentions[k], o)[1:])
    ]
    for _, k, o in sorted((key(k, o), k, o) for k, o in candidates):
        if referents[k] is None and o.cell not in used:
            referents[k] = o
            used.add(o.cell)
    # 2. definite mentions refer back: the best object of their shape, shared
    for k, m in enumerate(mentions):
        same_shape = [o for o in scene.objects if o.shape == m.shape_name]
        if m.is_instance and m.det.text == "the" and same_shape:
            referents[k] = min(same_shape, key=lambda o: key(k, o))
    return referents


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0]  # ties: first seen


def ground(scene: Scene, parsed: Parse, empty_cells: bool = False) -> Grounding:
    """Check every claim of `parsed` against `scene` (see the module doc for how mentions are matched;
    `empty_cells`: the v2 world's language)."""
    mentions = parsed.mentions
    referents = _resolve(scene, mentions, empty_cells)
    present = scene.shapes()
    # hallucinated: an instance mention naming a shape its object does not have (or with no object
    # left for it), a count mention of an absent shape
    hallucinated = [
        (referents[k] is None or referents[k].shape != m.shape_name) if m.is_instance else m.shape_name not in present
        for k, m in enumerate(mentions)
    ]
    retarget = {k: o for k, o in enumerate(referents) if hallucinated[k] and o is not None}

    # count mentions ("two red circles"): a colour / size no object of that shape has is the error,
    # then the number is checked for the corrected kind
    count_filter: dict[int, tuple[str | None, str | None]] = {}
    for k, m in enumerate(mentions):
        if m.number is not None and not hallucinated[k]:
            same_shape = [o for o in scene.objects if o.shape == m.shape_name]
            color = m.color.text if m.color else None
            if color is not None and color not in {o.color for o in same_shape}:
                color = _most_common([o.color for o in same_shape])
            same_kind = [o for o in same_shape if color in (None, o.color)]
            size = m.size.text if m.size else None
            if size is not None and size not in {o.size for o in same_kind}:
                size = _most_common([o.size for o in same_kind])
            count_filter[k] = (color, size)

    verdicts = []
    for c in parsed.claims:
        k = c.mention
        if c.kind == "object":
            truth = retarget[k].shape if k in retarget else None
            verdicts.append(Verdict(c, not hallucinated[k], truth))
        elif c.kind == "empty":  # "at X is nothing": wrong if an object stands there
            there = scene.at(CELLS[c.value])
            verdicts.append(Verdict(c, there is None, None if there is None else there.shape))
        elif k is None:  # the overview's total
            verdicts.append(Verdict(c, int(c.value) == len(scene.objects), str(len(scene.objects))))
        elif (hallucinated[k] and c.kind != "relation") or (
            c.kind == "relation" and None in (referents[k], referents[c.target])
        ):
            continue  # part of a hallucinated mention: corrected (renamed or deleted) as one object error
        elif c.kind == "relation" and referents[k] is referents[c.target]:
            continue  # an object related to itself ("a red circle is left of the red circle"): no direction to check
        elif c.kind == "relation":
            a, b = referents[k].cell, referents[c.target].cell
            true = [r for r in RELATIONS if relation_holds(r, a, b)]
            truth = OPPOSITE.get(c.value) if OPPOSITE.get(c.value) in true else true[0]
            verdicts.append(Verdict(c, c.value in true, truth))
        elif k in count_filter:
            color, size = count_filter[k]
            if c.kind == "count":
                truth = str(scene.count(mentions[k].shape_name, color, size))
            else:
                truth = color if c.kind == "color" else size
            verdicts.append(Verdict(c, c.value == truth, truth))
        else:
            o = referents[k]
            truth = {"color": o.color, "size": o.size, "position": POSITIONS[o.cell]}[c.kind]
            verdicts.append(Verdict(c, c.value == truth, truth))
    return Grounding(parsed, referents, hallucinated, retarget, verdicts)


# ----------------------------------------------------------------------------------------------
# Corrections
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Correction:
    type: str  # object | attribute | position | count | relation
    span: tuple[int, int]  # char span in the original text
    replacement: str  # "" = deletion
    # word-level edits (start, end, new text) inside `span`; the text between them is kept
    edits: tuple[tuple[int, int, str], ...] = field(default=(), compare=False, repr=False)


def _splice(text: str, start: int, end: int, edits) -> str:
    """text[start:end] with `edits` (sorted, disjoint) applied."""
    pieces, cursor = [], start
    for a, b, new in edits:
        pieces += [text[cursor:a], new]
        cursor = b
    return "".join(pieces) + text[cursor:end]


def _merge(text: str, outer: Correction, inner: Correction) -> Correction:
    """One correction from two overlapping replacements (e.g. a count fix "are three green squares" ->
    "is one green square" and a colour fix of "green" inside it). Where both edit the same word, the
    first one's edit stands."""
    edits: list[tuple[int, int, str]] = []
    for edit in sorted([*outer.edits, *inner.edits]):
        if not edits or edit[0] >= edits[-1][1]:
            edits.append(edit)
    start, end = min(outer.span[0], inner.span[0]), max(outer.span[1], inner.span[1])
    return Correction(outer.type, (start, end), _splice(text, start, end, edits), tuple(edits))


@dataclass
class Annotation:
    """status: 'hallucinated' (corrected is the fixed text), 'clean' (nothing to fix: no pair),
    'unparseable' (some sentence fits no rule: not corrected), 'empty' (nothing true would be left)."""

    status: Literal["hallucinated", "clean", "unparseable", "empty"]
    original: str
    corrected: str | None = None
    corrections: list[Correction] = field(default_factory=list)
    unparsed: list[tuple[int, int]] = field(default_factory=list)


def _rewrite(text: str, kind: str, changes: list[tuple[Word, str]]) -> Correction | None:
    """One correction spanning the changed words, the words between them kept as they are."""
    edits = tuple(sorted((w.start, w.end, new) for w, new in changes if w.text != new))
    if not edits:
        return None
    start, end = edits[0][0], edits[-1][1]
    return Correction(kind, (start, end), _splice(text, start, end, edits), edits)


def _count_changes(parsed: Parse, k: int | None, sentence: int, truth: int) -> list[tuple[Word, str]]:
    """The words a count correction rewrites: the number, and the noun and verb when 1 <-> many."""
    s = parsed.sentences[sentence]
    if k is None:  # overview: "the image shows two objects"
        return [(s.total, NUMBERS[truth]), (s.noun, "object" if truth == 1 else "objects")]
    m = parsed.mentions[k]
    changes = [(m.det, NUMBERS[truth]), (m.shape, m.shape_name if truth == 1 else plural(m.shape_name))]
    if s.verb is not None and s.mentions and s.mentions[0] == k:
        changes.append((s.verb, "is" if truth == 1 else "are"))
    return changes


def _deletions(text: str, parsed: Parse, doomed: set[int]) -> list[tuple[int, int]]:
    """Char spans that remove the sentences / list items of the mentions in `doomed`."""
    sentences, items_out = [], []
    for s in parsed.sentences:
        dead = [k for k in s.mentions if k in doomed]
        if not dead:
            continue
        if s.kind != "list" or len(dead) == len(s.mentions):
            sentences.append((s.start, s.end))
            continue
        items = [parsed.mentions[k].span for k in s.mentions]
        kept = [i for i, k in enumerate(s.mentions) if k not in doomed]
        if kept[0] > 0:  # leading items go with the "and" after them
            items_out.append((items[0][0], items[kept[0]][0]))
        # later items go with the "and" before them
        items_out += [(items[i - 1][1], items[i][1]) for i, k in enumerate(s.mentions) if k in doomed and i > kept[0]]
    # consecutive deleted sentences form one block, which takes the space after it (before it, at the end)
    blocks: list[list[int]] = []
    for a, b in sorted(sentences):
        if blocks and not text[blocks[-1][1] : a].strip():
            blocks[-1][1] = b
        else:
            blocks.append([a, b])
    out = items_out
    for first, b in blocks:
        a, rest = first, text[b:]
        if rest.strip():
            b += len(rest) - len(rest.lstrip())
        else:
            a = len(text[:a].rstrip())
        # one correction per sentence: cut the block at the starts of its later sentences
        cuts = [a] + [start for start, _ in sentences if first < start < b] + [b]
        out += list(zip(cuts[:-1], cuts[1:]))
    return sorted(out)


def _empty_cell_fixes(scene: Scene, text: str, g: Grounding, doomed: set[int]) -> list[Correction]:
    """v2 (`empty_cells`): an invented object's sentence whose cell is empty becomes "at <cell> is nothing."
    (its mention leaves `doomed`); a wrong "at <cell> is nothing." becomes the sentence of the object
    standing there when no mention describes it, and is deleted otherwise. Both are replacements of
    a whole sentence, so the corrected answer keeps the rejected one's shape and length."""
    fixes = []
    described = {o.cell for o in g.referents if o is not None}
    for k in sorted(doomed):
        m, s = g.parse.mentions[k], g.parse.sentences[g.parse.mentions[k].sentence]
        cell = CELLS.get(m.position_name) if m.position else None
        if s.kind == "instance" and cell is not None and scene.at(cell) is None:
            fixes.append(Correction("object", (s.start, s.end), Empty(cell).text()))
            doomed.discard(k)
    for v in g.errors:
        if v.claim.kind == "empty":
            o = scene.at(CELLS[v.claim.value])
            new = (
                Instance(None, o.color, o.shape, o.cell, position_first=True).text() if o.cell not in described else ""
            )
            fixes.append(Correction("object", v.claim.span, new))
    return fixes


def correct(scene: Scene, text: str, empty_cells: bool = False) -> Annotation:
    """Minimal correction of `text` for `scene`: chosen = `corrected`, rejected = `text`.

    empty_cells (the v2 world's language): an invented object at an empty cell is replaced by
    "at <cell> is nothing." instead of being deleted or renamed; see `_empty_cell_fixes`."""
    parsed = parse(text)
    if parsed.unparsed:
        return Annotation("unparseable", text, unparsed=parsed.unparsed)
    g = ground(scene, parsed, empty_cells)
    if not g.errors:
        return Annotation("clean", text, text)

    doomed = {v.claim.mention for v in g.errors if v.claim.kind == "object" and v.truth is None}
    corrections = _empty_cell_fixes(scene, text, g, doomed) if empty_cells else []
    corrections += [Correction("object", span, "") for span in _deletions(text, parsed, doomed)]
    for v in g.errors:
        c, k = v.claim, v.claim.mention
        if (
            c.kind == "empty"
            or (k is not None and (k in doomed or g.hallucinated[k] and k not in g.retarget))
            or (c.target is not None and c.target in doomed)
        ):
            continue  # handled above: a deletion or an empty-cell replacement
        if c.kind == "object":  # rename to the object at the claimed position, with its attributes
            m, o = parsed.mentions[k], g.retarget[k]
            changes = [(m.shape, o.shape)] + [(w, new) for w, new in ((m.color, o.color), (m.size, o.size)) if w]
            if m.position:
                changes.append((Word(m.position_name, m.position[0].start, m.position[-1].end), POSITIONS[o.cell]))
            fix = _rewrite(text, "object", changes)
        elif c.kind == "count":
            fix = _rewrite(text, "count", _count_changes(parsed, k, c.sentence, int(v.truth)))
        else:
            fix = Correction(CORRECTION_TYPE[c.kind], c.span, v.truth, ((*c.span, v.truth),))
        if fix is not None:
            corrections.append(fix)
    corrections.sort(key=lambda c: c.span)
    # a deletion swallows any replacement inside it; overlapping replacements become one correction
    kept: list[Correction] = []
    for c in corrections:
        if kept and c.span[0] < kept[-1].span[1]:
            if kept[-1].replacement == "" and c.span[1] <= kept[-1].span[1]:
                continue
            if kept[-1].replacement and c.replacement:
                kept[-1] = _merge(text, kept[-1], c)
                continue
            raise AssertionError(f"overlapping corrections {kept[-1]} and {c} in {text!r}")  # a bug, not bad input
        kept.append(c)

    pieces, cursor = [], 0
    for c in kept:
        pieces += [text[cursor : c.span[0]], c.replacement]
        cursor = c.span[1]
    corrected = "".join(pieces) + text[cursor:]
    if not corrected.strip():
        return Annotation("empty", text, None, kept)
    return Annotation("hallucinated", text, corrected, kept)


# ----------------------------------------------------------------------------------------------
# A human-like annotator: deletions, wider rewrites and slips on top of the minimal corrections
# ----------------------------------------------------------------------------------------------
@dataclass
class AnnotatorStyle:
    """How far the annotator departs from `correct`'s minimal, clean, replace-only edits; each rate per
    opportunity, drawn in a fixed order so changing one rate does not reshuffle the others (table: module
    `HUMAN_LIKE`, experiments/results/lab_v3/CORRECTIONS.md). All zero = `correct` itself."""

    miss_prob: float = 0.0  # per error: left as it is (the chosen answer keeps it)
    wrong_fix_prob: float = 0.0  # per colour / position / number fix: another wrong value written
    delete_prob: float = 0.0  # per invented object's sentence: deleted instead of "at the <cell> is nothing."
    rewrite_prob: float = 0.0  # per object sentence holding a fix: the whole sentence rewritten, object first

    def __post_init__(self) -> None:
        for name in ("miss_prob", "wrong_fix_prob", "delete_prob", "rewrite_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AnnotatorStyle.{name} must be in [0, 1], got {getattr(self, name)}")


# The lab's human-like annotator (ddpo demo). RLHF-V states no annotator error rates; these are the lab's
# choices, each small enough that a corrected answer stays far better than its original (CORRECTIONS.md).
HUMAN_LIKE = AnnotatorStyle(miss_prob=0.05, wrong_fix_prob=0.03, delete_prob=0.3, rewrite_prob=0.3)
SLIP_VALUES = {"attribute": tuple(COLOR_RGB), "position": tuple(POSITIONS.values()), "count": NUMBERS[1:6]}


def _slip(c: Correction, original: str, rng) -> Correction:
    """`c` with another wrong value written: not the truth, not what the answer said (one-word fixes only)."""
    options = [v for v in SLIP_VALUES[c.type] if v not in (c.replacement, original)]
    value = options[int(rng.integers(len(options)))]
    return Correction(c.type, c.span, value, ((*c.span, value),))


def _sentence_of(parsed: Parse, span: tuple[int, int]):
    return next((s for s in parsed.sentences if s.start <= span[0] and span[1] <= s.end), None)


def _rewrite_sentence(text: str, sentence, fixes: list[Correction]) -> Correction | None:
    """The sentence's fixes applied, then the sentence said object first ("a red cross is at the top left."),
    as one correction over the whole sentence; None when the fixed sentence is no single object's."""
    fixed = _splice(text, sentence.start, sentence.end, sorted((*c.span, c.replacement) for c in fixes))
    again = parse(fixed)
    if len(again.mentions) != 1 or not again.mentions[0].position or again.sentences[0].kind != "instance":
        return None
    m = again.mentions[0]
    sentence_text = Instance(None, m.color.text if m.color else None, m.shape_name, CELLS[m.position_name]).text()
    kinds = [c.type for c in fixes]
    kind = "object" if "object" in kinds else kinds[0]
    return Correction(
        kind, (sentence.start, sentence.end), sentence_text, ((sentence.start, sentence.end, sentence_text),)
    )


def humanize(text: str, annotation: Annotation, style: AnnotatorStyle, rng) -> tuple[Annotation, Counter]:
    """`annotation` (`correct`'s) as a human-like annotator would leave it (`AnnotatorStyle`), and what it did
    (Counter: missed, wrong_fix, deleted, rewritten). Draws four random numbers per correction whatever the rates."""
    if annotation.status != "hallucinated":
        return annotation, Counter()
    parsed = parse(text)
    did: Counter = Counter()
    kept: list[Correction] = []
    by_sentence: dict[int, list[Correction]] = {}
    rewrite: dict[int, bool] = {}
    for c in annotation.corrections:
        u_miss, u_slip, u_delete, u_rewrite = rng.random(4)
        sentence = _sentence_of(parsed, c.span)
        if u_miss < style.miss_prob:
            did["missed"] += 1
            continue
        if c.type == "object" and c.replacement.endswith("is nothing.") and u_delete < style.delete_prob:
            end = c.span[1] + (len(text[c.span[1] :]) - len(text[c.span[1] :].lstrip()))
            c = Correction("object", (c.span[0], end), "", ((c.span[0], end, ""),))
            did["deleted"] += 1
        elif c.type in SLIP_VALUES and len(c.edits) == 1 and u_slip < style.wrong_fix_prob:
            c = _slip(c, text[c.span[0] : c.span[1]], rng)
            did["wrong_fix"] += 1
        if c.replacement and sentence is not None and sentence.kind == "instance":
            # one decision per sentence (its first fix's draw): a sentence is rewritten whole or not at all
            rewrite.setdefault(sentence.start, u_rewrite < style.rewrite_prob)
            if rewrite[sentence.start]:
                by_sentence.setdefault(sentence.start, []).append(c)
                continue
        kept.append(c)
    for start, fixes in by_sentence.items():
        sentence = next(s for s in parsed.sentences if s.start == start)
        wide = _rewrite_sentence(text, sentence, fixes)
        if wide is None:
            kept += fixes
        else:
            kept.append(wide)
            did["rewritten"] += 1
    kept.sort(key=lambda c: c.span)
    if not kept:
        return Annotation("clean", text, text, [], annotation.unparsed), did
    corrected = _splice(text, 0, len(text), [(*c.span, c.replacement) for c in kept])
    if not corrected.strip():
        return Annotation("empty", text, None, kept), did
    return Annotation("hallucinated", text, corrected, kept), did
