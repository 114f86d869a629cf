"""The caption grammar: scene -> description plan -> text, and text -> parsed claims.

A description is first a *plan*, a list of sentence items (`Overview`, `Group`, `Instance`,
`Relation`, `Filler`, `ObjectList`), then text (`realize`). Noise (noise.py) edits plan items, so a
hallucination is always a well-formed sentence that states one wrong fact, like an MLLM's.

Two answer styles:
  short     one sentence listing the objects:
            "there is a small red circle at the top left and a large blue square at the center."
  detailed  an overview, one count sentence per kind of object, one sentence per object, relations,
            then neutral sentences up to `target_words`:
            "the image shows three objects. there are two red circles. a small red circle is at the
            top left. a large red circle is at the center. there is one blue square. a large blue
            square is at the bottom right. the large red circle is above the blue square. ..."

`parse` reads any text (model output included) back into noun phrases ("mentions") with their claims
and char spans; sentences that fit no rule are reported in `Parse.unparsed`, never raised.
Everything is lower case, and punctuation attaches to the previous word exactly as the word-level
tokenizer's decoder writes it, so `decode(encode(caption)) == caption`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ddpo.data.synthetic.world import (
    ALL_SHAPES,
    COL_NAMES,
    COLOR_RGB,
    GRID,
    ROW_NAMES,
    SIZES,
    Scene,
    WorldConfig,
    WorldObject,
)

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS: dict[tuple[int, int], str] = {
    (r, c): "center" if (r, c) == (1, 1) else f"{ROW_NAMES[r]} {COL_NAMES[c]}" for r in range(GRID) for c in range(GRID)
}
CELLS: dict[str, tuple[int, int]] = {name: cell for cell, name in POSITIONS.items()}
RELATIONS = ("above", "below", "to the left of", "to the right of", "next to")
OPPOSITE = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
# Sentences that are true of every image: they give detailed answers their length without adding facts,
# like the "the image depicts a simple scene" parts of a real MLLM's description.
FILLERS = (
    "the background is dark gray.",
    "the shapes are drawn in flat colors.",
    "each shape sits in its own cell of a three by three grid.",
    "no two shapes overlap.",
    "the edges of the shapes are sharp.",
    "nothing else is visible.",
    "the picture is simple and clean.",
    "all shapes are seen from the front.",
)
PROMPTS: dict[str, tuple[str, ...]] = {
    "detailed": (
        "describe the image in detail.",
        "give a detailed description of the picture.",
        "what do you see in this image? describe it in detail.",
    ),
    "short": ("what is in the image?", "list the objects in the picture."),
}


def relation_holds(relation: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the object at cell `a` is `relation` the object at cell `b` (cells are (row, col))."""
    if relation == "above":
        return a[0] < b[0]
    if relation == "below":
        return a[0] > b[0]
    if relation == "to the left of":
        return a[1] < b[1]
    if relation == "to the right of":
        return a[1] > b[1]
    if relation == "next to":
        return a != b and max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1
    raise ValueError(f"unknown relation '{relation}'; known: {RELATIONS}")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


# ----------------------------------------------------------------------------------------------
# Plan items: one sentence each (ObjectList: the short style's single sentence)
# ----------------------------------------------------------------------------------------------
@dataclass
class Ref:
    """A definite reference ("the small red circle"); size is given only where needed to be unique."""

    shape: str
    color: str
    size: str | None = None

    def words(self) -> str:
        return " ".join(w for w in ("the", self.size, self.color, self.shape) if w)


@dataclass
class Overview:
    total: int

    def text(self) -> str:
        return f"the image shows {NUMBERS[self.total]} {'object' if self.total == 1 else 'objects'}."


@dataclass
class Group:
    shape: str
    color: str
    count: int

    def text(self) -> str:
        verb, noun = ("is", self.shape) if self.count == 1 else ("are", plural(self.shape))
        return f"there {verb} {NUMBERS[self.count]} {self.color} {noun}."


@dataclass
class Instance:
    size: str | None  # None: the v2 world has one size and never says it
    color: str
    shape: str
    cell: tuple[int, int]
    # v2: the place first ("at the top left is a red cross."): a small model looks up what stands at a
    # named cell far more easily than it tracks which object comes next in reading order
    position_first: bool = False

    def phrase(self) -> str:
        return " ".join(w for w in ("a", self.size, self.color, self.shape) if w)

    def text(self) -> str:
        if self.position_first:
            return f"at the {POSITIONS[self.cell]} is {self.phrase()}."
        return f"{self.phrase()} is at the {POSITIONS[self.cell]}."


@dataclass
class Empty:
    """v2: a cell said to hold nothing ("at the top right is nothing."): what a truthful caption says
    where a prior would put an object, and what the oracle writes over an invented one."""

    cell: tuple[int, int]

    def text(self) -> str:
        return f"at the {POSITIONS[self.cell]} is nothing."


@dataclass
class Relation:
    subject: Ref
    relation: str
    target: Ref

    def text(self) -> str:
        return f"{self.subject.words()} is {self.relation} {self.target.words()}."


@dataclass
class Filler:
    sentence: str

    def text(self) -> str:
        return self.sentence


@dataclass
class ObjectList:
    instances: list[Instance]

    def text(self) -> str:
        return "there is " + " and ".join(f"{i.phrase()} at the {POSITIONS[i.cell]}" for i in self.instances) + "."


Item = Overview | Group | Instance | Empty | Relation | Filler | ObjectList


def realize(plan: list[Item]) -> str:
    """Plan -> text: the sentences joined by single spaces."""
    return " ".join(item.text() for item in plan)


def n_words(text: str) -> int:
    """Words of a text, punctuation excluded (the unit of `target_words` and `mean_response_words`)."""
    return len(re.findall(r"\w+", text))


@dataclass
class LanguageConfig:
    """How scenes are described."""

    style: Literal["short", "detailed"] = "detailed"  # one listing sentence, or a long RLHF-V-like description
    target_words: int = (
        60  # detailed style: optional sentences are added while the answer stays within this many words (15-120)
    )

    def __post_init__(self) -> None:
        if self.style not in ("short", "detailed"):
            raise ValueError(f"LanguageConfig.style must be 'short' or 'detailed', got '{self.style}'")
        if not 5 <= self.target_words <= 400:
            raise ValueError(f"LanguageConfig.target_words must be in [5, 400], got {self.target_words}")


def unique_ref(obj: WorldObject, scene: Scene) -> Ref | None:
    """The shortest definite reference that picks out `obj` alone, or None if none does."""
    if scene.count(obj.shape, obj.color) == 1:
        return Ref(obj.shape, obj.color)
    if scene.count(obj.shape, obj.color, obj.size) == 1:
        return Ref(obj.shape, obj.color, obj.size)
    return None


def plan_description(scene: Scene, rng: np.random.Generator, cfg: LanguageConfig) -> list[Item]:
    """The sentences describing `scene` truthfully (deterministic given the rng state).

    Detailed style: every object gets its own sentence (so recall can be perfect at any length); the
    overview, count sentences, relations and fillers are added in that priority while the total stays
    within `cfg.target_words`.
    """
    instances = [Instance(o.size, o.color, o.shape, o.cell) for o in scene.objects]
    if cfg.style == "short":
        return [ObjectList(instances)]

    kinds = list(dict.fromkeys((o.shape, o.color) for o in scene.objects))  # first-appearance order
    groups = [Group(s, c, scene.count(s, c)) for s, c in kinds]
    relations = []
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1 :]]  # each pair once
    for i in rng.permutation(len(pairs)):
        a, b = pairs[i] if rng.random() < 0.5 else pairs[i][::-1]
        ref_a, ref_b = unique_ref(a, scene), unique_ref(b, scene)
        true = [r for r in RELATIONS if relation_holds(r, a.cell, b.cell)]
        if ref_a and ref_b and true:
            relations.append(Relation(ref_a, true[int(rng.integers(len(true)))], ref_b))
    fillers = [Filler(FILLERS[i]) for i in rng.permutation(len(FILLERS))]

    overview = Overview(len(scene.objects))
    words = sum(n_words(i.text()) for i in instances)
    chosen: set[int] = set()  # ids of the optional items that fit the word budget
    for item in [overview, *groups, *relations, *fillers]:
        w = n_words(item.text())
        if words + w <= cfg.target_words:
            chosen.add(id(item))
            words += w

    plan: list[Item] = [overview] if id(overview) in chosen else []
    for group in groups:
        if id(group) in chosen:
            plan.append(group)
        plan += [i for i in instances if (i.shape, i.color) == (group.shape, group.color)]
    plan += [r for r in relations if id(r) in chosen]
    plan += [f for f in fillers if id(f) in chosen]
    return plan


def describe(scene: Scene, rng: np.random.Generator, cfg: LanguageConfig) -> str:
    """A truthful description of `scene` in `cfg.style`."""
    return realize(plan_description(scene, rng, cfg))


# ----------------------------------------------------------------------------------------------
# Parsing: text -> mentions, relations and claims with char spans
# ----------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\w+|[^\w\s]+")  # the word-level tokenizer's pre-tokenizer split
_SHAPE_FORMS = {form: s for s in ALL_SHAPES for form in (s, plural(s))}
_COLORS = set(COLOR_RGB)
_SIZES = set(SIZES)
_ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class Word:
    text: str  # lower-cased
    start: int  # char span in the parsed text
    end: int


@dataclass
class Mention:
    """A noun phrase naming a shape: "<det> [size] [color] <shape>", optionally "at the <position>".

    det "a"/"an"/"the" makes it an *instance* mention (one object); a number word makes it a *count*
    mention ("two red circles": there are exactly two objects of that shape and colour).
    """

    det: Word
    shape: Word
    sentence: int
    size: Word | None = None
    color: Word | None = None
    position: tuple[Word, ...] | None = None  # the words after "at the"

    @property
    def shape_name(self) -> str:
        return _SHAPE_FORMS[self.shape.text]

    @property
    def plural(self) -> bool:
        return self.shape.text != self.shape_name

    @property
    def number(self) -> int | None:
        return NUMBERS.index(self.det.text) if self.det.text in NUMBERS else None

    @property
    def is_instance(self) -> bool:
        return self.det.text in _ARTICLES

    @property
    def position_name(self) -> str | None:
        return " ".join(w.text for w in self.position) if self.position else None

    @property
    def span(self) -> tuple[int, int]:
        if self.position and self.position[0].start < self.det.start:  # v2: "at the <position> is a ..."
            return self.position[0].start, self.shape.end
        return self.det.start, (self.position[-1] if self.position else self.shape).end


@dataclass
class RelationMention:
    subject: int  # mention indices
    words: tuple[Word, ...]  # "to the left of"
    target: int
    sentence: int

    @property
    def relation(self) -> str:
        return " ".join(w.text for w in self.words)


@dataclass
class Sentence:
    """A parsed sentence. `kind` says which rule matched; spans include the final punctuation."""

    kind: Literal["overview", "list", "instance", "relation", "filler", "empty"]
    start: int
    end: int
    mentions: list[int] = field(default_factory=list)
    verb: Word | None = None  # "is"/"are" of "there is ..." (agrees with the first item)
    total: Word | None = None  # overview: the number word
    noun: Word | None = None  # overview: "object"/"objects"
    position: tuple[Word, ...] | None = None  # empty: the words after "at the" of "at the <position> is nothing."

    @property
    def position_name(self) -> str | None:
        return " ".join(w.text for w in self.position) if self.position else None


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a text. kind: object | color | size | position | count | relation |
    empty (v2: "at the <value> is nothing."; its span is the whole sentence)."""

    kind: str
    value: str  # the claimed shape / colour / size / position name / number (digits) / relation
    span: tuple[int, int]  # char span of the words that state it
    sentence: int
    mention: int | None = None  # the noun phrase it is about (None: the overview's total count)
    target: int | None = None  # relation: the other noun phrase


@dataclass
class Parse:
    text: str
    sentences: list[Sentence]
    mentions: list[Mention]
    relations: list[RelationMention]
    unparsed: list[tuple[int, int]]  # char spans of sentences that fit no rule

    @property
    def claims(self) -> list[Claim]:
        claims = []
        for s_index, s in enumerate(self.sentences):
            if s.kind == "overview":
                claims.append(Claim("count", str(NUMBERS.index(s.total.text)), (s.total.start, s.total.end), s_index))
            if s.kind == "empty":
                claims.append(Claim("empty", s.position_name, (s.start, s.end), s_index))
        for k, m in enumerate(self.mentions):
            claims.append(Claim("object", m.shape_name, (m.shape.start, m.shape.end), m.sentence, k))
            for kind, w in (("color", m.color), ("size", m.size)):
                if w is not None:
                    claims.append(Claim(kind, w.text, (w.start, w.end), m.sentence, k))
            if m.position:
                claims.append(
                    Claim("position", m.position_name, (m.position[0].start, m.position[-1].end), m.sentence, k)
                )
            if m.number is not None:
                claims.append(Claim("count", str(m.number), (m.det.start, m.det.end), m.sentence, k))
        for r in self.relations:
            claims.append(
                Claim("relation", r.relation, (r.words[0].start, r.words[-1].end), r.sentence, r.subject, r.target)
            )
        return claims


class _Cursor:
    """Left-to-right matcher over one sentence's words; every `take_*` either consumes or leaves i."""

    def __init__(self, words: list[Word]):
        self.words, self.i = words, 0

    def done(self) -> bool:
        return self.i == len(self.words)

    def take(self, *sequence: str) -> tuple[Word, ...] | None:
        got = self.words[self.i : self.i + len(sequence)]
        if [w.text for w in got] == list(sequence):
            self.i += len(sequence)
            return tuple(got)
        return None

    def take_any(self, options: set[str] | tuple[str, ...]) -> Word | None:
        if not self.done() and self.words[self.i].text in options:
            self.i += 1
            return self.words[self.i - 1]
        return None

    def mention(self, sentence: int, with_position: bool) -> Mention | None:
        start = self.i
        det = self.take_any((*_ARTICLES, *NUMBERS))
        size = self.take_any(_SIZES)
        color = self.take_any(_COLORS)
        shape = self.take_any(set(_SHAPE_FORMS))
        if det is None or shape is None:
            self.i = start
            return None
        position = self.position() if with_position else None
        return Mention(det, shape, sentence, size, color, position)

    def position(self) -> tuple[Word, ...] | None:
        start = self.i
        if self.take("at", "the"):
            for n in (2, 1):
                got = self.words[self.i : self.i + n]
                if len(got) == n and " ".join(w.text for w in got) in CELLS:
                    self.i += n
                    return tuple(got)
        self.i = start
        return None

    def relation(self) -> tuple[Word, ...] | None:
        for r in sorted(RELATIONS, key=len, reverse=True):
            got = self.take(*r.split())
            if got:
                return got
        return None


def _sentences(text: str) -> list[list[Word]]:
    """Words of `text` grouped into sentences; a token holding . ! or ? ends a sentence (and is kept)."""
    sentences, current = [], []
    for m in _TOKEN.finditer(text):
        current.append(Word(m.group().lower(), m.start(), m.end()))
        if any(ch in m.group() for ch in ".!?"):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


_FILLER_WORDS = {tuple(m.group() for m in _TOKEN.finditer(f))[:-1] for f in FILLERS}


def _parse_sentence(
    words: list[Word], index: int, n_mentions: int
) -> tuple[Sentence, list[Mention], list[RelationMention]] | None:
    """Try each sentence rule in turn; None if none matches the whole sentence."""
    start, end = words[0].start, words[-1].end
    body = words[:-1] if any(ch in words[-1].text for ch in ".!?") else words
    if tuple(w.text for w in body) in _FILLER_WORDS:
        return Sentence("filler", start, end), [], []

    cur = _Cursor(body)
    if cur.take("the", "image", "shows"):
        total, noun = cur.take_any(NUMBERS[1:]), cur.take_any(("object", "objects"))
        if total and noun and cur.done():
            return Sentence("overview", start, end, total=total, noun=noun), [], []
        return None

    cur = _Cursor(body)
    position = cur.position()
    if position and cur.take("is"):  # v2: "at the <position> is nothing." / "at the <position> is a <colour> <shape>."
        if cur.take("nothing") and cur.done():
            return Sentence("empty", start, end, position=position), [], []
        m = cur.mention(index, with_position=False)
        if m is not None and m.is_instance and m.number is None and cur.done():
            m.position = position
            return Sentence("instance", start, end, [n_mentions]), [m], []
        return None

    cur = _Cursor(body)
    if cur.take("there"):
        verb = cur.take_any(("is", "are"))
        mentions: list[Mention] = []
        while verb is not None:
            m = cur.mention(index, with_position=True)
            if m is None or (m.number is not None and m.position):
                return None  # a counted group has no single position
            mentions.append(m)
            if cur.done():
                sentence = Sentence("list", start, end, list(range(n_mentions, n_mentions + len(mentions))), verb=verb)
                return sentence, mentions, []
            if not (cur.take("and") or (cur.take(",") and (cur.take("and") or True))):
                return None
        return None

    cur = _Cursor(body)
    subject = cur.mention(index, with_position=False)
    if subject is None or not subject.is_instance or not cur.take("is"):
        return None
    subject.position = cur.position()
    if subject.position and cur.done():
        return Sentence("instance", start, end, [n_mentions]), [subject], []
    relation = None if subject.position else cur.relation()
    target = cur.mention(index, with_position=False) if relation else None
    if relation and target and target.is_instance and cur.done():
        rel = RelationMention(n_mentions, relation, n_mentions + 1, index)
        return Sentence("relation", start, end, [n_mentions, n_mentions + 1]), [subject, target], [rel]
    return None


def parse(text: str) -> Parse:
    """Read a description back into mentions, relations and claims; never raises on odd text."""
    sentences, mentions, relations, unparsed = [], [], [], []
    for words in _sentences(text):
        if all(any(ch in w.text for ch in ".!?") for w in words):
            continue  # stray punctuation
        got = _parse_sentence(words, len(sentences), len(mentions))
        if got is None:
            unparsed.append((words[0].start, words[-1].end))
            continue
        sentence, new_mentions, new_relations = got
        sentences.append(sentence)
        mentions += new_mentions
        relations += new_relations
    return Parse(text, sentences, mentions, relations, unparsed)


# ----------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# ----------------------------------------------------------------------------------------------
def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word (and punctuation token) that captions, prompts and corrections can contain, in a
    fixed order, for the given world's shapes, colours and sizes."""
    from ddpo.data.tokenizer import words_of

    texts = [
        *(["at the is nothing"] if cfg.adjacent_partners else []),  # v2 only: v1's ids stay as they were
        " ".join(NUMBERS[1:]),
        " ".join(f"{s} {plural(s)}" for s in cfg.shapes),
        " ".join(cfg.colors),
        " ".join(cfg.sizes),
        " ".join(POSITIONS.values()),
        " ".join(RELATIONS),
        "the image shows object objects . there is are a an and at ,",
        *FILLERS,
        *(p for prompts in PROMPTS.values() for p in prompts),
    ]
    return list(dict.fromkeys(words_of(texts)))


def build_tokenizer(cfg: WorldConfig):
    """The word-level HF tokenizer of this world (data/tokenizer.py's builder over `vocabulary(cfg)`)."""
    from ddpo.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary(cfg))
