"""Feedback sources for online preference learning: score sampled answers, higher = better.

Every source implements `FeedbackSource.score(query, answers) -> list[float]`, so the iterative loop
(`experiments/iterate.py`) never depends on which one labels its samples:

  OracleFeedback            the synthetic world's oracle (data.synthetic.annotator): score =
                            -(wrong claims + unreadable sentences), i.e. minus the number of
                            corrections the annotator makes (counted per claim), an unreadable
                            sentence counting as one error so that it never looks clean.
  DivideAndConquerFeedback  RLAIF-V's labeler (docs/PAPER_FACTS.md §3.3): split an answer into atomic claims
                            (`ClaimSplitter`), turn each claim into a yes/no question, ask a labeler
                            (`YesNoLabeler`); a claim holds when log P(yes) > log P(no); score =
                            -(number of rejected claims).

Any causal LM / MLLM plugs in as a labeler through `YesNoLabeler.yes_no_logprobs(image, question)`;
`ModelYesNoLabeler` implements it for every `PreferenceModel` by scoring the answers "yes" and "no".
RLAIF-V's splitter is a fine-tuned Llama-3-8B that also writes the questions; here splitting and
question writing are two small interfaces with rule-based defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ddpo.data.synthetic.annotator import ground
from ddpo.data.synthetic.language import parse
from ddpo.data.templates import encode_answer_with_offsets
from ddpo.models.base import answer_token_logps


@dataclass
class Query:
    """One prompt of a round: its image, its question and whatever a feedback source may need
    (`meta["scene"]`: the synthetic world's ground truth, for the oracle)."""

    image: Image.Image
    prompt: str
    meta: dict = field(default_factory=dict)


class FeedbackSource(Protocol):
    def score(self, query: Query, answers: Sequence[str]) -> list[float]:
        """One score per answer; higher is better; pairs need a gap >= 1 (ddpo.online.pairs)."""
        ...


# ------------------------------------------------------------------------------------------------
# (a) the synthetic oracle
# ------------------------------------------------------------------------------------------------
class OracleFeedback:
    """Exact feedback in the synthetic world: -(wrong claims + unreadable sentences) of each answer.

    `empty_cells`: whether the world's language may say "at <cell> is nothing." (`SyntheticConfig.empty_cells`);
    it changes which object a phrase is matched to (data.synthetic.annotator.ground), so it must be the
    world's setting, as in the metrics."""

    def __init__(self, empty_cells: bool = False):
        self.empty_cells = empty_cells

    def score(self, query: Query, answers: Sequence[str]) -> list[float]:
        scene = query.meta.get("scene")
        if scene is None:
            raise ValueError("OracleFeedback needs the synthetic scene of each prompt in query.meta['scene']")
        scores = []
        for answer in answers:
            g = ground(scene, parse(answer), self.empty_cells)
            scores.append(-float(len(g.errors) + len(g.parse.unparsed)))
        return scores


# ------------------------------------------------------------------------------------------------
# (b) divide and conquer: claims -> yes/no questions -> a labeler model
# ------------------------------------------------------------------------------------------------
class ClaimSplitter(Protocol):
    def split(self, answer: str) -> list[str]:
        """The atomic claims of an answer, as statements."""
        ...


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class SentenceSplitter:
    """Generic splitter: one claim per sentence (split after . ! ? followed by whitespace)."""

    def split(self, answer: str) -> list[str]:
        return [s.strip() for s in _SENTENCE_END.split(answer.strip()) if s.strip(" .!?")]


class SyntheticClaimSplitter:
    """The synthetic grammar's sentences (data.synthetic.language.parse): each states one object, one
    count, one relation or a filler. Sentences the parser cannot read are claims too: the labeler
    judges them."""

    def split(self, answer: str) -> list[str]:
        parsed = parse(answer)
        spans = sorted([(s.start, s.end) for s in parsed.sentences] + list(parsed.unparsed))
        return [answer[a:b] for a, b in spans]


def claim_question(claim: str) -> str:
    """A claim turned into a yes/no question (RLAIF-V asks an LLM to rephrase; this is the rule-based default)."""
    return f"is it true that {claim.strip().rstrip('.!?').strip()}?"


class YesNoLabeler(Protocol):
    def yes_no_logprobs(self, image: Image.Image, question: str) -> tuple[float, float]:
        """(log P(yes), log P(no)) of the labeler's answer to `question` about `image`."""
        ...


class ModelYesNoLabeler:
    """`YesNoLabeler` for any `PreferenceModel`: log P of the answer words through `sequence_token_logps`.

    log P(yes) is the log-prob of the tokens of the word "yes" as the whole answer (the template's end
    marker excluded); with several spellings (`yes_words=("yes", "Yes")`, as RLAIF-V sums P(yes) + P(Yes))
    their probabilities add. Spellings the tokenizer cannot represent (its unknown token) are skipped.
    """

    def __init__(
        self,
        model,
        template: str,
        yes_words: Sequence[str] = ("yes",),
        no_words: Sequence[str] = ("no",),
        batch_size: int = 32,
    ):
        self.model, self.template, self.batch_size = model, template, batch_size
        self.yes = self._spellings(yes_words)
        self.no = self._spellings(no_words)

    def _spellings(self, words: Sequence[str]) -> list[tuple[str, int]]:
        """(word, number of its tokens at the start of the answer) for each representable spelling."""
        tokenizer = self.model.tokenizer
        out = []
        for word in words:
            ids, offsets = encode_answer_with_offsets(self.template, tokenizer, word)
            n = sum(1 for start, end in offsets if end > start)  # the word's own tokens, not the end marker
            if n and tokenizer.unk_token_id not in ids[:n]:
                out.append((word, n))
        if not out:
            raise ValueError(
                f"the labeler's tokenizer cannot write any of {list(words)} (unknown token): give spellings it knows"
            )
        return out

    def _word_logps(self, images: Sequence[Image.Image], questions: Sequence[str], spellings) -> list[float]:
        per_spelling = []
        for word, n in spellings:
            logps = answer_token_logps(
                self.model, images, questions, [word] * len(questions), self.template, self.batch_size
            )
            per_spelling.append([float(t[:n].sum()) for t in logps])
        return [_logsumexp(values) for values in zip(*per_spelling)]

    def batch_yes_no_logprobs(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> list[tuple[float, float]]:
        if not questions:
            return []
        return list(zip(self._word_logps(images, questions, self.yes), self._word_logps(images, questions, self.no)))

    def yes_no_logprobs(self, image: Image.Image, question: str) -> tuple[float, float]:
        return self.batch_yes_no_logprobs([image], [question])[0]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


class DivideAndConquerFeedback:
    """RLAIF-V's divide-and-conquer feedback: score = -(claims the labeler rejects)."""

    def __init__(
        self, splitter: ClaimSplitter, labeler: YesNoLabeler, to_question: Callable[[str], str] = claim_question
    ):
        self.splitter, self.labeler, self.to_question = splitter, labeler, to_question

    def judge(self, query: Query, answers: Sequence[str]) -> list[list[tuple[str, bool]]]:
        """Per answer: (claim, holds) for each of its claims. All claims of all answers go to the labeler
        in one batch when it offers `batch_yes_no_logprobs`."""
        claims = [self.splitter.split(answer) for answer in answers]
        questions = [self.to_question(c) for group in claims for c in group]
        batch: Callable | None = getattr(self.labeler, "batch_yes_no_logprobs", None)
        if batch is not None:
            logps = batch([query.image] * len(questions), questions)
        else:
            logps = [self.labeler.yes_no_logprobs(query.image, q) for q in questions]
        verdicts, k = [], 0
        for group in claims:
            verdicts.append([(c, yes > no) for c, (yes, no) in zip(group, logps[k : k + len(group)])])
            k += len(group)
        return verdicts

    def score(self, query: Query, answers: Sequence[str]) -> list[float]:
        return [-float(sum(not holds for _, holds in verdict)) for verdict in self.judge(query, answers)]
