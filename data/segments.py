"""Corrected segments of a preference pair -> which answer tokens were corrected (a bool per token).

RLHF-V annotators corrected only the hallucinated parts of a model's answer; DDPO up-weights exactly
those tokens (by `loss.gamma`, in ddpo/loss.py: the data carries no gamma, so changing it needs no
re-encoding). The dataset stores no segment annotations, so they are recovered by diffing the answers.

`token_corrections` is the RLHF-V algorithm on the response token ids:
  1. `difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_matching_blocks()`;
  2. blocks shorter than `min_match` tokens are dropped (a coincidental short match inside an edit,
     such as a shared "the", is absorbed into the edit);
  3. the kept blocks cut both sequences into aligned gaps: gap k of rejected pairs with gap k of chosen;
  4. a gap pair non-empty on both sides is a replacement, a corrected segment: its tokens are marked
     corrected in the chosen AND the rejected answer; every other token is unchanged. With
     `include_insertions=True` gaps present on one side only (pure insertions / deletions) are marked
     too (RLHF-V does not do this).

Where this differs from the original code (thunlp/Muffin `utils/diff_lib.py`, called from
`DataCollatorForDPODataset`; see docs/PAPER_FACTS.md, "Segment weights"):
  - The original diffed the whole sequences minus BOS: system prompt + image tokens + question +
    answer (+ right padding when a device batch held several pairs). We diff the answer tokens only
    (including the template's end marker). Prompt tokens get weight 0 through the label mask anyway,
    so the only observable effects are: (a) a short match at the very start of the answer (e.g. "The"
    in "The cat ..." vs "The dog ...") was kept in the original because it extended the long prompt
    match, while here it is shorter than `min_match` and becomes part of the replacement; (b) the
    padding of a batch cannot leak into the diff.
  - The original used difflib's default `autojunk=True`: when the second sequence (chosen) has 200+
    items, every id filling more than 1% of it is "popular" and no match can start on it. With 64-576
    image tokens in the diffed sequence, image ids and common text ids were popular, so the segments
    depended on the sequence length. We pass `autojunk=False`: the plain longest-match diff of the
    two answers.
  - `data.segment_diff: muffin` restores both for exact replication (`token_corrections(context=prompt
    minus BOS, autojunk=True)`); right padding is still not diffed.
  - Identical sequences have no corrected token (no signal to up-weight), even when shorter than
    `min_match` (where the algorithm alone would call the whole answer a replacement).

`span_corrections` maps explicit character-span annotations to tokens via the tokenizer's offsets, and
`word_diff_corrections` runs the same gap algorithm on words instead of token ids (an ablation that
makes the segments independent of the tokenizer), then maps the corrected words to tokens as spans.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Hashable, Sequence

Span = tuple[int, int]  # [start, end) character offsets

_WORD = re.compile(r"\w+|[^\w\s]+")  # the word split of data/tokenizer.py's Whitespace pre-tokenizer


def corrected_positions(
    rejected: Sequence[Hashable],
    chosen: Sequence[Hashable],
    min_match: int = 3,
    include_insertions: bool = False,
    autojunk: bool = False,
) -> tuple[set[int], set[int]]:
    """Positions of corrected items: (in rejected, in chosen), by the gap algorithm of the module doc
    (`autojunk`: difflib's popular-item heuristic, on only to replicate the released code)."""
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    if list(rejected) == list(chosen):
        return set(), set()
    matcher = difflib.SequenceMatcher(None, rejected, chosen, autojunk=autojunk)
    # The final block is difflib's (len_a, len_b, 0) sentinel; it is kept so the trailing gap is closed.
    blocks = [b for b in matcher.get_matching_blocks() if b.size >= min_match or b.size == 0]
    rejected_marked: set[int] = set()
    chosen_marked: set[int] = set()
    r_pos = c_pos = 0
    for block in blocks:
        r_gap, c_gap = range(r_pos, block.a), range(c_pos, block.b)
        if (r_gap and c_gap) or (include_insertions and (r_gap or c_gap)):
            rejected_marked.update(r_gap)
            chosen_marked.update(c_gap)
        r_pos, c_pos = block.a + block.size, block.b + block.size
    return rejected_marked, chosen_marked


def token_corrections(
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    min_match: int = 3,
    include_insertions: bool = False,
    context: Sequence[int] = (),
    autojunk: bool = False,
) -> tuple[list[bool], list[bool]]:
    """RLHF-V segments of two answers' token ids: (chosen_corrected, rejected_corrected), same lengths as
    the inputs; True on tokens of corrected segments.

    `context` + `autojunk=True` replicate the released code exactly (`data.segment_diff: muffin`): the
    tokens before both answers (the prompt minus BOS: system, image tokens, question, role prefix) are
    diffed with them, under difflib's default autojunk; only the answers' marks are returned."""
    n = len(context)
    rejected_marked, chosen_marked = corrected_positions(
        [*context, *rejected_ids], [*context, *chosen_ids], min_match, include_insertions, autojunk
    )
    return [i + n in chosen_marked for i in range(len(chosen_ids))], [
        i + n in rejected_marked for i in range(len(rejected_ids))
    ]


def span_corrections(offsets: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """Corrected tokens from character spans: a token whose [start, end) offsets overlap any span.
    Zero-width offsets (special tokens, an end marker outside the text) never overlap."""
    for span in spans:
        if len(span) != 2 or not span[0] < span[1]:
            raise ValueError(f"character span {list(span)} must be [start, end] with start < end")
    return [any(start < span_end and span_start < end for span_start, span_end in spans) for start, end in offsets]


def words_with_spans(text: str) -> tuple[list[str], list[Span]]:
    """Words (\\w+ or a run of punctuation) of `text` and their character spans."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def corrected_word_spans(
    chosen_text: str, rejected_text: str, min_match: int = 3, include_insertions: bool = False
) -> tuple[list[Span], list[Span]]:
    """The gap algorithm on words (min_match counted in words): character spans of the corrected words
    of (chosen, rejected) -- the same form as explicit span annotations."""
    chosen_words, chosen_spans = words_with_spans(chosen_text)
    rejected_words, rejected_spans = words_with_spans(rejected_text)
    rejected_marked, chosen_marked = corrected_positions(rejected_words, chosen_words, min_match, include_insertions)
    return [chosen_spans[i] for i in sorted(chosen_marked)], [rejected_spans[i] for i in sorted(rejected_marked)]


def word_diff_corrections(
    chosen_text: str,
    rejected_text: str,
    chosen_offsets: Sequence[Span],
    rejected_offsets: Sequence[Span],
    min_match: int = 3,
    include_insertions: bool = False,
) -> tuple[list[bool], list[bool]]:
    """Corrected tokens by a word diff: a token overlapping a corrected word (`corrected_word_spans`) is
    corrected, exactly as if those words' spans had been annotated (`span_corrections`)."""
    chosen_spans, rejected_spans = corrected_word_spans(chosen_text, rejected_text, min_match, include_insertions)
    return span_corrections(chosen_offsets, chosen_spans), span_corrections(rejected_offsets, rejected_spans)
