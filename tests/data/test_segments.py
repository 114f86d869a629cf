"""Corrected segments on hand-worked diffs (ids are small ints).

The expectations are written as DDPO weights, G (gamma) on a corrected token and 1 elsewhere, which is
what the loss makes of the masks (ddpo.loss.token_weights); `weighted` maps a mask to that form.
"""

import pytest

from ddpo.data.segments import (
    corrected_positions,
    corrected_word_spans,
    span_corrections,
    token_corrections,
    word_diff_corrections,
)

G = 5.0


def weighted(mask: list[bool], gamma: float = G) -> list[float]:
    assert all(isinstance(m, bool) for m in mask)
    return [gamma if m else 1.0 for m in mask]


def token_weights(chosen, rejected, gamma, **kw):
    c, r = token_corrections(chosen, rejected, **kw)
    return weighted(c, gamma), weighted(r, gamma)


def span_weights(offsets, spans, gamma):
    return weighted(span_corrections(offsets, spans), gamma)


def word_diff_weights(chosen, rejected, chosen_offsets, rejected_offsets, gamma, **kw):
    c, r = word_diff_corrections(chosen, rejected, chosen_offsets, rejected_offsets, **kw)
    return weighted(c, gamma), weighted(r, gamma)


def test_replaced_word_weighs_gamma_on_both_sides():
    rejected = [1, 2, 3, 4, 5, 6, 7]
    chosen = [1, 2, 3, 9, 5, 6, 7]
    c, r = token_weights(chosen, rejected, G)
    assert c == [1, 1, 1, G, 1, 1, 1]
    assert r == [1, 1, 1, G, 1, 1, 1]


def test_replacement_of_different_lengths():
    # "a red circle" -> "two small red squares": gap of 1 rejected token vs 3 chosen tokens
    rejected = [1, 2, 3, 4, 5, 6, 7]
    chosen = [1, 2, 3, 8, 9, 10, 5, 6, 7]
    c, r = token_weights(chosen, rejected, G)
    assert c == [1, 1, 1, G, G, G, 1, 1, 1]
    assert r == [1, 1, 1, G, 1, 1, 1]


def test_inserted_clause_is_not_weighted_unless_asked():
    rejected = [1, 2, 3, 4, 5, 6]
    chosen = [1, 2, 3, 7, 8, 4, 5, 6]
    assert token_weights(chosen, rejected, G) == ([1.0] * 8, [1.0] * 6)
    c, r = token_weights(chosen, rejected, G, include_insertions=True)
    assert c == [1, 1, 1, G, G, 1, 1, 1]
    assert r == [1.0] * 6


def test_deleted_clause_is_not_weighted_unless_asked():
    rejected = [1, 2, 3, 7, 8, 4, 5, 6]
    chosen = [1, 2, 3, 4, 5, 6]
    assert token_weights(chosen, rejected, G) == ([1.0] * 6, [1.0] * 8)
    c, r = token_weights(chosen, rejected, G, include_insertions=True)
    assert c == [1.0] * 6
    assert r == [1, 1, 1, G, G, 1, 1, 1]


def test_short_coincidental_match_inside_an_edit_is_absorbed():
    # rejected: 1 2 3 [10 11 5 12] 7 8 9 ; chosen: 1 2 3 [20 5 21 22] 7 8 9 ; the lone "5" matches
    rejected = [1, 2, 3, 10, 11, 5, 12, 7, 8, 9]
    chosen = [1, 2, 3, 20, 5, 21, 22, 7, 8, 9]
    c, r = token_weights(chosen, rejected, G)  # min_match 3 drops the 1-token match
    assert c == [1, 1, 1, G, G, G, G, 1, 1, 1]
    assert r == [1, 1, 1, G, G, G, G, 1, 1, 1]
    c, r = token_weights(chosen, rejected, G, min_match=1)  # kept: two replacements around "5"
    assert c == [1, 1, 1, G, 1, G, G, 1, 1, 1]
    assert r == [1, 1, 1, G, G, 1, G, 1, 1, 1]


def test_min_match_decides_whether_a_two_token_match_splits_an_edit():
    rejected = [1, 2, 3, 10, 5, 6, 11, 7, 8, 9]
    chosen = [1, 2, 3, 20, 5, 6, 21, 7, 8, 9]
    assert token_weights(chosen, rejected, G, min_match=3)[0] == [1, 1, 1, G, G, G, G, 1, 1, 1]
    assert token_weights(chosen, rejected, G, min_match=2)[0] == [1, 1, 1, G, 1, 1, G, 1, 1, 1]


def test_edits_at_both_ends():
    rejected = [1, 2, 3, 4, 5, 6]
    chosen = [9, 2, 3, 4, 5, 8]
    c, r = token_weights(chosen, rejected, G)
    assert c == [G, 1, 1, 1, 1, G]
    assert r == [G, 1, 1, 1, 1, G]


def test_identical_sequences_are_all_ones_even_when_short():
    assert token_weights([1, 2, 3, 4], [1, 2, 3, 4], G) == ([1.0] * 4, [1.0] * 4)
    assert token_weights([1, 2], [1, 2], G) == ([1.0] * 2, [1.0] * 2)


def test_no_match_at_all_is_one_replacement():
    assert token_weights([1, 2], [3, 4, 5], G) == ([G, G], [G, G, G])


def test_on_real_token_ids(word_tokenizer):
    ids = lambda s: word_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    chosen = ids("there is a red circle at the top left .")
    rejected = ids("there is a blue circle at the top left .")
    c, r = token_weights(chosen, rejected, G)
    assert c == r == [1, 1, 1, G, 1, 1, 1, 1, 1, 1]


def test_autojunk_is_off():
    # 300 tokens with a frequent id: difflib's autojunk would refuse to start matches on id 7.
    rejected = [7] * 150 + [1] + [7] * 149
    chosen = [7] * 150 + [2] + [7] * 149
    c, r = token_weights(chosen, rejected, G)
    assert [i for i, w in enumerate(c) if w == G] == [150]
    assert [i for i, w in enumerate(r) if w == G] == [150]


def test_corrected_positions_rejects_bad_min_match():
    with pytest.raises(ValueError, match="min_match"):
        corrected_positions([1], [2], min_match=0)


def test_span_weights_overlap_rule():
    offsets = [(0, 3), (4, 7), (7, 10), (11, 14), (14, 14)]  # last: zero-width end marker
    assert span_weights(offsets, [(5, 6)], G) == [1, G, 1, 1, 1]
    assert span_weights(offsets, [(7, 8)], G) == [1, 1, G, 1, 1]  # touching at 7 is not overlapping token 1
    assert span_weights(offsets, [(0, 14)], G) == [G, G, G, G, 1]
    assert span_weights(offsets, [], G) == [1.0] * 5
    with pytest.raises(ValueError, match="start < end"):
        span_weights(offsets, [(3, 3)], G)


def test_word_diff_maps_corrected_words_to_subword_tokens():
    chosen, rejected = "the redish cat", "the blue cat"
    chosen_offsets = [(0, 3), (4, 7), (7, 10), (11, 14)]  # the | red ish | cat
    rejected_offsets = [(0, 3), (4, 8), (9, 12)]
    c, r = word_diff_weights(chosen, rejected, chosen_offsets, rejected_offsets, G, min_match=1)
    assert c == [1, G, G, 1]
    assert r == [1, G, 1]
    # min_match 3 words: the one-word matches are absorbed, the whole answer is the correction
    c, r = word_diff_weights(chosen, rejected, chosen_offsets, rejected_offsets, G, min_match=3)
    assert c == [G, G, G, G] and r == [G, G, G]


def test_word_diff_equals_spans_of_the_corrected_words():
    """A word diff and character spans on exactly the corrected words mark the same tokens."""
    chosen, rejected = "there is a red circle at the top left .", "there is a blue circle at the top right ."
    chosen_spans, rejected_spans = corrected_word_spans(chosen, rejected, min_match=1)
    assert [chosen[a:b] for a, b in chosen_spans] == ["red", "left"]
    assert [rejected[a:b] for a, b in rejected_spans] == ["blue", "right"]
    characters = lambda text: [(i, i + 1) for i, ch in enumerate(text) if ch != " "]  # noqa: E731  one token per letter
    by_words = word_diff_corrections(chosen, rejected, characters(chosen), characters(rejected), min_match=1)
    by_spans = (
        span_corrections(characters(chosen), chosen_spans),
        span_corrections(characters(rejected), rejected_spans),
    )
    assert by_words == by_spans
    assert sum(by_words[0]) == len("redleft") and sum(by_words[1]) == len("blueright")


def test_muffin_diff_keeps_a_short_match_that_extends_the_prompt():
    """data.segment_diff 'muffin' diffs prompt (minus BOS) + answer: a 1-token match at the answer start
    ('The') joins the prompt's match and survives min_match 3; diffing the answers alone absorbs it."""
    prompt_tail = [1, 2, 3]
    chosen, rejected = [5, 20, 30, 31, 32, 33], [5, 21, 30, 31, 32, 33]
    assert token_corrections(chosen, rejected, 3) == ([True, True, False, False, False, False],) * 2
    assert (
        token_corrections(chosen, rejected, 3, context=prompt_tail, autojunk=True)
        == ([False, True, False, False, False, False],) * 2
    )


def naive_released_marks(context, chosen, rejected, min_match=3):
    """RLHF-V's procedure spelled out: difflib with its defaults (autojunk on) on the full sequences,
    blocks < min_match dropped, a gap marked when non-empty on both sides; the answers' marks returned."""
    import difflib

    c, r = [*context, *chosen], [*context, *rejected]
    blocks = [
        b for b in difflib.SequenceMatcher(None, r, c).get_matching_blocks() if b.size >= min_match or b.size == 0
    ]
    marks_c, marks_r, i, j = set(), set(), 0, 0
    for b in blocks:
        if b.a > i and b.b > j:
            marks_r.update(range(i, b.a))
            marks_c.update(range(j, b.b))
        i, j = b.a + b.size, b.b + b.size
    n = len(context)
    return [k + n in marks_c for k in range(len(chosen))], [k + n in marks_r for k in range(len(rejected))]


def test_muffin_diff_applies_autojunk_on_long_sequences():
    """With >= 200 tokens difflib's autojunk lets no match *start* on an id filling > 1% of the chosen
    sequence (here '.', 4 of 211): a run of dots between two edits is not matched, so the whole
    answer becomes one corrected segment. The plain diff keeps the dots unchanged. 'muffin' mode equals
    the released procedure."""
    context = [1] + [7] * 64 + list(range(100, 240))  # system/question ids + 64 image-patch ids: 205 tokens
    dot = 9
    chosen, rejected = [50, dot, dot, dot, dot, 51], [60, dot, dot, dot, dot, 61]
    released = token_corrections(chosen, rejected, 3, context=context, autojunk=True)
    assert released == ([True] * 6, [True] * 6)
    assert released == naive_released_marks(context, chosen, rejected)
    plain = [True, False, False, False, False, True]
    assert token_corrections(chosen, rejected, 3, context=context, autojunk=False) == (plain, plain)
    assert token_corrections(chosen, rejected, 3) == (plain, plain)
