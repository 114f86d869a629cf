"""Shared-prompt layout: one packed row per pair, [prompt | chosen | rejected], instead of two rows.

A `PairBatch` holds each pair twice (row i = prompt + chosen, row B + i = prompt + rejected), so the
prompt, which in LLaVA-style DPO is mostly image tokens, goes through the decoder twice. Packed, it
goes through once:

    packed row i:   p0 p1 .. pP-1 | c0 c1 .. cA-1 | r0 r1 .. rR-1 | pad ..
    position ids:   0  1  .. P-1  | P  P+1 ..     | P  P+1 ..     | 0
    attends to:     causal        | causal        | causal, minus the chosen block

Under that mask and those positions every chosen and rejected token sees exactly the keys, values and
rotary positions it sees in its own row, so the hidden states (hence the log-probs and the gradients)
equal the two-row computation up to float rounding. The layout is derived from the two-row batch, so
everything keyed to `PairBatch` (labels, weights, cached reference log-probs, the loss) is unchanged:
`source` maps every position of the 2B rows to the packed position holding the same token, and the
packed hidden states are gathered back into the [2B, T] layout before the LM head. The first rejected
token is predicted from the last prompt token, exactly as in its own row.

Needs a decoder that takes a prepared 4-D mask and explicit position ids: transformers' Llama with sdpa or
eager attention takes the additive [B, 1, L, L] bias (`attention_bias`), with flex_attention the
`BlockMask` (`block_mask`); masking_utils passes either through unchanged. Both come from `may_attend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddpo.data.records import IGNORE_INDEX

# Segment ids of packed positions.
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass
class SharedPromptLayout:
    input_ids: Tensor  # [B, L] long, right-padded with pad ids
    position_ids: Tensor  # [B, L] long
    segments: Tensor  # [B, L] long: PROMPT, CHOSEN, REJECTED or PAD
    source: Tensor  # [2B, T] long: flat index into [B * L] of the packed token at row r, position t (pads: row start)

    def attention_bias(self, dtype: torch.dtype) -> Tensor:
        """[B, 1, L, L] additive mask (0 = may attend, dtype's minimum = may not), usable by sdpa and eager.

        Causal over the packed row, no key on padding, no rejected query on a chosen key. Every query
        keeps its own key, so padding rows have no all-masked softmax (which would give NaN).
        """
        index = torch.arange(self.segments.shape[1], device=self.segments.device)
        allowed = may_attend(
            self.segments[:, :, None], self.segments[:, None, :], index[None, :, None], index[None, None, :]
        )
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def block_mask(self):
        """The same mask as a FlexAttention `BlockMask` (transformers' `flex_attention` implementation).

        FlexAttention evaluates `may_attend` per block of 128 x 128 positions and skips blocks that are
        all masked (above the diagonal, the rejected answer's queries on the chosen answer's keys, padding),
        so no [B, L, L] tensor exists and the kernel does not compute what the mask throws away.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        segments = self.segments
        rows, length = segments.shape

        def mask_mod(b, h, q, k):
            return may_attend(segments[b, q], segments[b, k], q, k)

        return create_block_mask(mask_mod, rows, None, length, length, device=segments.device)


def may_attend(query_segment: Tensor, key_segment: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
    """Whether a packed query may attend to a key (broadcasting tensors; one rule for every kernel).

    Causal, no key on padding, no rejected query on a chosen key; every query keeps its own key.
    """
    allowed = (
        (query_index >= key_index) & (key_segment != PAD) & ~((query_segment == REJECTED) & (key_segment == CHOSEN))
    )
    return allowed | (query_index == key_index)


def shared_prompt_layout(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pad_token_id: int
) -> SharedPromptLayout:
    """Pack a two-row pair batch: input_ids / attention_mask / labels [2B, T] (rows i and B + i are pair i).

    A row's prompt is its real tokens before its first labelled token; its answer is every real token
    from there on. Each row's real tokens must be contiguous (left or right padding). Raises ValueError,
    naming the pair, when the two rows of a pair do not share the same prompt.
    """
    rows, length = input_ids.shape
    if rows % 2:
        raise ValueError(
            f"shared_prompt_layout: {rows} rows; a pair batch has 2B rows (chosen 0..B-1, rejected B..2B-1)"
        )
    pairs = rows // 2
    device = input_ids.device
    real = attention_mask.bool()
    count = real.sum(1)  # [2B] real tokens per row
    start = real.long().argmax(1)  # first real position (0 for an all-padding row)
    index = torch.arange(length, device=device)
    labelled = (labels != IGNORE_INDEX) & real
    first_label = torch.where(labelled.any(1), torch.where(labelled, index, length).amin(1), start + count)
    prompt_len = first_label - start  # [2B]
    answer_len = count - prompt_len  # [2B]

    contiguous = real.long().sum(1) == (real & (index >= start[:, None]) & (index < (start + count)[:, None])).sum(1)
    if not contiguous.all():
        row = int((~contiguous).nonzero()[0, 0])
        raise ValueError(f"shared_prompt_layout: row {row} has padding between real tokens; pad on one side only")
    P, P_rej = prompt_len[:pairs], prompt_len[pairs:]
    same = P == P_rej
    if same.all():
        # Compare the prompts token by token, each row's prompt moved to position 0.
        rel = (index[None, :] + start[:, None]).clamp(max=length - 1)
        aligned = input_ids.gather(1, rel)
        in_prompt = index[None, :] < P[:, None]
        same = ((aligned[:pairs] == aligned[pairs:]) | ~in_prompt).all(1)
    if not same.all():
        pair = int((~same).nonzero()[0, 0])
        raise ValueError(
            f"shared_prompt_layout: rows {pair} and {pair + pairs} (pair {pair}) do not share one prompt "
            f"(prompt lengths {int(P[pair])} and {int(P_rej[pair])}); build batches with data.collator.PairCollator "
            "or set model.shared_prompt false"
        )

    A_c, A_r = answer_len[:pairs], answer_len[pairs:]
    total = P + A_c + A_r  # [B] packed lengths
    L = int(total.max())
    pos = torch.arange(L, device=device)[None, :]  # [1, L]
    P_, Ac_, tot_ = P[:, None], A_c[:, None], total[:, None]
    segments = torch.where(
        pos < P_, PROMPT, torch.where(pos < P_ + Ac_, CHOSEN, torch.where(pos < tot_, REJECTED, PAD))
    )
    # Rotary positions: the rejected answer restarts where the prompt ends, as in its own row.
    position_ids = torch.where(segments == REJECTED, pos - Ac_, pos).masked_fill(segments == PAD, 0)
    # Where each packed token comes from: prompt and chosen from the chosen row, the rejected answer from its row.
    chosen_col = start[:pairs, None] + pos
    rejected_col = start[pairs:, None] + pos - Ac_
    col = torch.where(segments == REJECTED, rejected_col, chosen_col).clamp(0, length - 1)
    src_row = torch.where(
        segments == REJECTED,
        torch.arange(pairs, 2 * pairs, device=device)[:, None],
        torch.arange(pairs, device=device)[:, None],
    )
    packed_ids = input_ids[src_row, col].masked_fill(segments == PAD, pad_token_id)

    # Row r, position t -> packed position: t - start for the chosen row; the rejected row's answer sits after
    # the chosen one.
    rel = index[None, :] - start[:, None]  # [2B, T]
    shift = torch.cat([torch.zeros_like(A_c), A_c])[:, None]
    packed_pos = torch.where(rel >= prompt_len[:, None], rel + shift, rel)
    packed_pos = torch.where(real, packed_pos, 0)
    pair_of_row = torch.arange(rows, device=device) % pairs
    source = pair_of_row[:, None] * L + packed_pos
    return SharedPromptLayout(packed_ids, position_ids, segments, source)
