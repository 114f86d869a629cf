"""CHAIR word pipeline and metrics (Rohrbach et al., 2018) as the RLHF-V Object HalBench computes them.

Text -> COCO object mentions, the rule-based way:
  lowercase -> word tokens -> noun lemmas -> merge known bigrams ("hot dog", "baby cat" -> cat, ...)
  -> drop "seat" when "toilet" is present -> keep words of the synonym vocabulary -> map to the class.

RLHF-V uses NLTK's tokenizer and WordNet lemmatizer, whose data must be downloaded at run time. Here the
tokenizer is a regular expression and noun lemmas come from `lemminflect`, which ships its dictionary
inside the wheel (offline, ~1 MB). Two deliberate differences, both so that vocabulary words survive:
a word that is itself in the synonym vocabulary is kept as it is ("corgi" would otherwise become
"corgus" through lemminflect's rules for unknown words), and the vocabulary is lower-cased ("iPhone").
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

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # hyphenated compounds stay one token, like NLTK


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
def _noun_lemma(word: str) -> str:
    from lemminflect import getLemma  # noqa: PLC0415 (import cost only when used)

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and possessive 's are separators."""
    return _TOKEN.findall(text.lower())


def lemmatize(words: Iterable[str], vocab: CocoVocabulary) -> list[str]:
    """Noun lemma of each word ("dogs" -> "dog", "children" -> "child"); vocabulary words stay as they are."""
    return [w if w in vocab.synonym_to_class else _noun_lemma(w) for w in words]


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


def names_to_mentions(names: Sequence[str], vocab: CocoVocabulary | None = None) -> list[tuple[str, str]]:
    """COCO mentions from object names extracted by an LLM (one name per object, e.g. "red car").

    RLHF-V parses "a {name}" with spaCy: a known bigram wins, else runs of nouns. Without a POS tagger we
    take, in order: known bigrams of the lemmas, else the whole lemmatized name, else its last word (the
    head noun of an English noun phrase: "red car" -> car). Raw results are de-duplicated per answer.
    """
    vocab = vocab or default_vocabulary()
    objects: list[str] = []
    for name in names:
        lemmas = lemmatize(tokenize(name), vocab)
        if not lemmas:
            continue
        found = merge_bigrams(lemmas, vocab, keep_unmatched=False)
        if not found:
            phrase = " ".join(lemmas)
            found = [phrase if phrase in vocab.synonym_to_class else lemmas[-1]]
        objects.extend(found)
    unique = list(dict.fromkeys(objects))
    return words_to_mentions(unique, vocab)


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
    - mean_response_words: whitespace-separated words per answer.
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
