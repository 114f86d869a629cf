"""CHAIR word pipeline and metrics (Rohrbach et al., 2018) as the RLHF-V Object HalBench computes them.

The rules follow RLHF-V's evaluator, `eval/eval_gpt_obj_halbench.py` of RLHF-V/RLHF-V (commit 8daac8a):

Free text (COCO reference captions; answers under `--extractor rules`), its `caption_to_words`:
  lowercase -> word tokens -> noun lemmas -> merge known bigrams ("hot dog", "baby cat" -> cat, ...)
  -> drop "seat" when "toilet" is present -> keep words of the synonym vocabulary -> map to the class.
  Every occurrence is a mention, so "coffee cup" counts as a cup here.

Object names extracted by a chat model, its `get_pred_objs_match`: each name is read as "a {name}";
  if it holds known bigrams, those alone are its objects; otherwise each run of consecutive nouns is
  one object, the nouns' lemmas joined by spaces ("cup of coffee" -> "cup", "coffee"; "coffee cup" ->
  "coffee cup"). Objects are de-duplicated per answer, then the "seat"/"toilet" rule and the vocabulary
  filter apply to the whole object: a noun compound outside the vocabulary ("coffee cup", "baseball
  player") is no COCO mention at all.

RLHF-V uses NLTK's tokenizer and WordNet lemmatizer for free text and spaCy's `en_core_web_trf` tagger and
lemmas for names; their data and model must be downloaded at run time. Here the tokenizer is a regular
expression and lemmas come from `lemminflect`, which ships its dictionary inside the wheel (offline, ~1 MB):
  - a word lemminflect knows as a noun takes its dictionary lemma ("children" -> "child", "men" -> "man",
    "glasses" -> "glass", as WordNet and spaCy); any other word in the synonym vocabulary is kept as it is
    ("corgi" would otherwise become "corgus" through lemminflect's rules for unknown words); every other
    word goes through lemminflect's noun rules ("frisbees" -> "frisbee"); the vocabulary is lower-cased
    ("iPhone").
  - spaCy's part-of-speech tags are approximated for names (`_noun_flags`): function words, numbers and
    punctuation are not nouns; a word lemminflect does not know is a noun; the head of a phrase (the last
    word before a non-word) is a noun unless lemminflect knows it only as a verb or adverb ("parked"); a
    word before the head is a noun only when lemminflect knows it as a noun and not as an adjective ("red
    car" -> car, "wooden table" -> table, but "glass table", "coffee cup" stay compounds).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SYNONYMS_FILE = ASSETS / "coco_synonyms.txt"

# Bigrams that are not themselves COCO synonyms but decide what a word means (RLHF-V's extra rules).
_NON_OBJECT_BIGRAMS = ("home plate", "train track")  # consume "plate"/"train": not the object
_YOUNG_OR_ADULT = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
_PASSENGER = ("jet", "train")

# Hyphenated compounds stay one token and punctuation is a token of its own, like NLTK's word_tokenize: a
# comma between two words keeps them from forming a bigram ("hot, dog").
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'s\b|[^\sa-z0-9]")
# spaCy splits hyphens off inside words ("t-shirt" -> t, -, shirt); names are tokenized that way.
_NAME_TOKEN = re.compile(r"[a-z0-9]+|'s\b|[^\sa-z0-9]")
# Closed-class words spaCy never tags as nouns, which lemminflect either lacks or lists as nouns too ("his",
# "two"): determiners, pronouns, prepositions, conjunctions and number words.
_NOT_NOUNS = frozenset(
    "a an the this that these those some any each every all both either neither no other another such "
    "his her hers its their theirs my mine our ours your yours it they them he she we you i "
    "of and or but nor with without on in at by for from to into onto over under near next beside behind "
    "above below between among around across along against through inside outside off up down "
    "one two three four five six seven eight nine ten eleven twelve dozen several few many much more most".split()
)


@dataclass(frozen=True)
class CocoVocabulary:
    """The COCO synonym vocabulary and bigram rules.

    `synonym_to_class`: every synonym (and canonical name) -> canonical class name (80 classes).
    `bigrams`: two-word string -> the word it stands for (itself, a class word, or a non-object).
    """

    synonym_to_class: dict[str, str]
    bigrams: dict[str, str]

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> CocoVocabulary:
        path = Path(path) if path else SYNONYMS_FILE
        synonym_to_class: dict[str, str] = {}
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            names = [n.strip().lower() for n in line.split(",") if n.strip()]
            if not names:
                continue
            for name in names:
                if synonym_to_class.setdefault(name, names[0]) != names[0]:
                    raise ValueError(
                        f"{path}:{line_no}: synonym '{name}' already belongs to class "
                        f"'{synonym_to_class[name]}'; each synonym may name one class only"
                    )
        bigrams = {w: w for w in synonym_to_class if len(w.split()) >= 2}
        bigrams.update({w: w for w in _NON_OBJECT_BIGRAMS})
        for animal in _YOUNG_OR_ADULT:
            bigrams[f"baby {animal}"] = animal
            bigrams[f"adult {animal}"] = animal
        for vehicle in _PASSENGER:
            bigrams[f"passenger {vehicle}"] = vehicle
        bigrams.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        return cls(synonym_to_class, bigrams)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.synonym_to_class.values()))


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> CocoVocabulary:
    return CocoVocabulary.from_file()


@functools.lru_cache(maxsize=65536)
def _readings(word: str) -> frozenset[str]:
    """The parts of speech lemminflect's dictionary lists for `word` (empty: a word it does not know)."""
    from lemminflect import getAllLemmas  # noqa: PLC0415 (import cost only when used)

    return frozenset(getAllLemmas(word))


@functools.lru_cache(maxsize=65536)
def _noun_lemma(word: str, in_vocabulary: bool) -> str:
    from lemminflect import getAllLemmas, getLemma  # noqa: PLC0415 (import cost only when used)

    known = getAllLemmas(word).get("NOUN")
    if known:
        return known[0]
    if in_vocabulary or not word.isalpha():
        return word
    # Lemminflect's noun rules, as WordNet's lemmatizer reads every word as a noun ("frisbees" -> frisbee,
    # "sailboards" -> sailboard, and also WordNet's "has" -> "ha").
    return getLemma(word, upos="NOUN")[0]


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens: words (hyphenated ones whole), possessive 's, and each punctuation mark."""
    return _TOKEN.findall(text.lower())


def lemmatize(words: Iterable[str], vocab: CocoVocabulary) -> list[str]:
    """Noun lemma of each word ("dogs" -> "dog", "children" -> "child"); other vocabulary words stay as they are."""
    return [_noun_lemma(w, w in vocab.synonym_to_class) for w in words]


def merge_bigrams(words: Sequence[str], vocab: CocoVocabulary, keep_unmatched: bool = True) -> list[str]:
    """Replace known two-word sequences by what they stand for, left to right, without overlap.

    `keep_unmatched=False` returns only the bigram replacements (used for LLM-extracted names).
    """
    out: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in vocab.bigrams:
            out.append(vocab.bigrams[pair])
            i += 2
        else:
            if keep_unmatched:
                out.append(words[i])
            i += 1
    return out


def words_to_mentions(words: Sequence[str], vocab: CocoVocabulary) -> list[tuple[str, str]]:
    """(word, class) for each word of the vocabulary, in order; "seat" is dropped next to a toilet."""
    if "toilet" in words and "seat" in words:  # "the seat of the toilet" is not a chair
        words = [w for w in words if w != "seat"]
    return [(w, vocab.synonym_to_class[w]) for w in words if w in vocab.synonym_to_class]


def text_to_mentions(text: str, vocab: CocoVocabulary | None = None) -> list[tuple[str, str]]:
    """COCO object mentions in free text, one per occurrence: [(word, class), ...].

    >>> text_to_mentions("Two dogs chase a frisbee near a hot dog stand.")
    [('dog', 'dog'), ('frisbee', 'frisbee'), ('hot dog', 'hot dog')]
    """
    vocab = vocab or default_vocabulary()
    return words_to_mentions(merge_bigrams(lemmatize(tokenize(text), vocab), vocab), vocab)


def _noun_flags(tokens: Sequence[str], vocab: CocoVocabulary) -> list[bool]:
    """Which tokens of a short noun phrase spaCy would tag NN/NNS/NNP/NNPS (the approximation of the module doc)."""
    content = [t.isalpha() and t not in _NOT_NOUNS for t in tokens]
    flags = []
    for i, token in enumerate(tokens):
        readings = _readings(token) if content[i] else frozenset()
        head = i + 1 == len(tokens) or not content[i + 1]
        if not content[i]:
            flags.append(False)
        elif not readings:
            flags.append(True)  # unknown words in a noun phrase ("frisbee", "teddy") are tagged nouns
        elif head:
            flags.append(bool(readings & {"NOUN", "ADJ"}) or token in vocab.synonym_to_class)
        else:
            flags.append("NOUN" in readings and "ADJ" not in readings)
    return flags


def name_to_objects(name: str, vocab: CocoVocabulary | None = None) -> list[str]:
    """The objects RLHF-V reads in one extracted name: its known bigrams if it holds any, else its runs
    of consecutive nouns, each run's lemmas joined by spaces (not yet filtered by the vocabulary).

    >>> name_to_objects("cup of coffee"), name_to_objects("coffee cup"), name_to_objects("baby elephant")
    (['cup', 'coffee'], ['coffee cup'], ['elephant'])
    """
    vocab = vocab or default_vocabulary()
    tokens = ["a", *_NAME_TOKEN.findall(name.lower())]  # RLHF-V tags "a {name}"
    lemmas = lemmatize(tokens, vocab)
    found = merge_bigrams(lemmas, vocab, keep_unmatched=False)
    if found:
        return found
    runs: list[list[str]] = [[]]
    for lemma, noun in zip(lemmas, _noun_flags(tokens, vocab)):
        if noun:
            runs[-1].append(lemma)
        elif runs[-1]:
            runs.append([])
    return [" ".join(run) for run in runs if run]


def names_to_mentions(names: Sequence[str], vocab: CocoVocabulary | None = None) -> list[tuple[str, str]]:
    """COCO mentions from object names extracted by an LLM (one name per object, e.g. "red car"):
    `name_to_objects` of each name, de-duplicated per answer, then the "seat" rule and the vocabulary."""
    vocab = vocab or default_vocabulary()
    objects = [obj for name in names for obj in name_to_objects(name, vocab)]
    return words_to_mentions(list(dict.fromkeys(objects)), vocab)


@dataclass
class ChairSample:
    """One scored answer: its COCO mentions and which of them are not in the image's ground truth."""

    mentions: list[tuple[str, str]]  # (word, class), one per counted mention
    ground_truth: set[str]  # classes present in the image
    num_words: int

    @property
    def hallucinated(self) -> list[tuple[str, str]]:
        return [m for m in self.mentions if m[1] not in self.ground_truth]

    @property
    def correct_classes(self) -> set[str]:
        return {c for _, c in self.mentions if c in self.ground_truth}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def chair_metrics(samples: Sequence[ChairSample]) -> dict[str, float | None]:
    """Object HalBench metrics over answers; rates are fractions in [0, 1] (the paper prints ×100).

    - response_hallucination_rate: answers with >= 1 hallucinated mention / answers with >= 1 COCO mention
      (RLHF-V `CHAIRs_refine`, the paper's "Resp.").
    - mention_hallucination_rate: hallucinated mentions / all COCO mentions (`CHAIRi`, "Mention").
    - chair_s: answers with >= 1 hallucinated mention / all answers (original CHAIR_s).
    - recall: sum over answers of correctly mentioned classes / sum of ground-truth classes.
    - mean_response_words: `num_words` per answer (objhal counts pieces between single spaces, as RLHF-V).
    A rate whose denominator is 0 is null.
    """
    n = len(samples)
    hallucinated_answers = sum(1 for s in samples if s.hallucinated)
    answers_with_objects = sum(1 for s in samples if s.mentions)
    return {
        "response_hallucination_rate": _ratio(hallucinated_answers, answers_with_objects),
        "mention_hallucination_rate": _ratio(
            sum(len(s.hallucinated) for s in samples), sum(len(s.mentions) for s in samples)
        ),
        "chair_s": _ratio(hallucinated_answers, n),
        "recall": _ratio(sum(len(s.correct_classes) for s in samples), sum(len(s.ground_truth) for s in samples)),
        "mean_response_words": _ratio(sum(s.num_words for s in samples), n),
        "num_answers": n,
        "num_answers_with_objects": answers_with_objects,
    }
