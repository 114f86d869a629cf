"""Corrected segments of a preference pair -> per-token weights (1 unchanged, gamma corrected).

RLHF-V annotators corrected only the hallucinated parts of a model's answer; DDPO up-weights exactly
those tokens. The dataset stores no segment annotations, so they are recovered by diffing the answers.

`token_weights` is the RLHF-V algorithm on the response token ids:
  1. `difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_matching_blocks()`;
  2. blocks shorter than `min_match` tokens are dropped (a coincidental short match inside an edit,
     such as a shared "the", is absorbed into the edit);
  3. the kept blocks cut both sequences into aligned gaps: gap k of rejected pairs with gap k of chosen;
  4. a gap pair non-empty on both sides is a replacement, a corrected segment: its tokens weigh gamma
     in the chosen AND the rejected answer; every other token weighs 1. With
     `include_insertions=True` gaps present on one side only (pure insertions / deletions) weigh gamma
     too (RLHF-V does not do this).

Where this differs from the original code (thunlp/Muffin `utils/diff_lib.py`, called from
`DataCollatorForDPODataset`; see shared/reference/rlhfv.md §1.3):
  - The original diffed the whole sequences minus BOS: system prompt + image tokens + question +
    answer (+ right padding when a device batch held several pairs). We diff the answer tokens only
    (including the template's end marker). Prompt tokens get weight 0 through the label mask anyway,
    so the only observable effects are: (a) a short match at the very start of the answer (e.g. "The"
    in "The cat ..." vs "The dog ...") was kept in the original because it extended the long prompt
    match, while here it is shorter than `min_match` and becomes part of the replacement; (b) the
    padding of a batch can no longer leak into the diff.
  - The original used difflib's default `autojunk=True`: when the second sequence (chosen) has 200+
    items, every id filling more than 1% of it is "popular" and no match can start on it. With 64-576
    image tokens in the diffed sequence, image ids and common text ids were popular, so the segments
    depended on the sequence length. We pass `autojunk=False`: the plain longest-match diff of the
    two answers.
  - Sequences that are identical get all-ones weights explicitly (no signal to up-weight), even when
    shorter than `min_match` (where the algorithm alone would call the whole answer a replacement).

`span_weights` maps explicit character-span annotations to tokens via the tokenizer's offsets, and
`word_diff_weights` runs the same gap algorithm on words instead of token ids (an ablation that
makes the segments independent of the tokenizer), then maps the corrected words to tokens.
"""
from __future__ import annotations

import difflib
import re
from typing import Hashable, Sequence

Span = tuple[int, int]  # [start, end) character offsets

_WORD = re.compile(r"\w+|[^\w\s]+")  # the word split of data/tokenizer.py's Whitespace pre-tokenizer


def corrected_positions(
    rejected: Sequence[Hashable], chosen: Sequence[Hashable], min_match: int = 3, include_insertions: bool = False
) -> tuple[set[int], set[int]]:
    """Positions of corrected items: (in rejected, in chosen), by the gap algorithm of the module doc."""
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    if list(rejected) == list(chosen):
        return set(), set()
    matcher = difflib.SequenceMatcher(None, rejected, chosen, autojunk=False)
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


def token_weights(
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    gamma: float,
    min_match: int = 3,
    include_insertions: bool = False,
) -> tuple[list[float], list[float]]:
    """RLHF-V segment weights of two answers' token ids: (chosen_weights, rejected_weights), same lengths
    as the inputs; gamma on tokens of corrected segments, 1 elsewhere."""
    rejected_marked, chosen_marked = corrected_positions(rejected_ids, chosen_ids, min_match, include_insertions)
    chosen_weights = [gamma if i in chosen_marked else 1.0 for i in range(len(chosen_ids))]
    rejected_weights = [gamma if i in rejected_marked else 1.0 for i in range(len(rejected_ids))]
    return chosen_weights, rejected_weights


def span_weights(offsets: Sequence[Span], spans: Sequence[Span], gamma: float) -> list[float]:
    """Token weights from character spans: a token whose [start, end) offsets overlap any span weighs
    gamma, others 1. Zero-width offsets (special tokens, an end marker outside the text) never overlap."""
    for span in spans:
        if len(span) != 2 or not span[0] < span[1]:
            raise ValueError(f"character span {list(span)} must be [start, end] with start < end")
    return [
        gamma if any(start < span_end and span_start < end for span_start, span_end in spans) else 1.0
        for start, end in offsets
    ]


def words_with_spans(text: str) -> tuple[list[str], list[Span]]:
    """Words (\\w+ or a run of punctuation) of `text` and their character spans."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def word_diff_weights(
    chosen_text: str,
    rejected_text: str,
    chosen_offsets: Sequence[Span],
    rejected_offsets: Sequence[Span],
    gamma: float,
    min_match: int = 3,
    include_insertions: bool = False,
) -> tuple[list[float], list[float]]:
    """The gap algorithm on words (min_match counted in words), mapped to tokens through the token
    offsets into each answer text: a token overlapping a corrected word weighs gamma."""
    chosen_words, chosen_spans = words_with_spans(chosen_text)
    rejected_words, rejected_spans = words_with_spans(rejected_text)
    rejected_marked, chosen_marked = corrected_positions(rejected_words, chosen_words, min_match, include_insertions)
    return (
        span_weights(chosen_offsets, [chosen_spans[i] for i in sorted(chosen_marked)], gamma),
        span_weights(rejected_offsets, [rejected_spans[i] for i in sorted(rejected_marked)], gamma),
    )
