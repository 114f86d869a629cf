"""Per-token log-probabilities of the next token, from logits or straight from final hidden states.

Both functions return `[B, T-1]` float32 (float64 for float64 inputs): entry `[b, t]` is
log p(labels[b, t+1] | prefix up to t), the prediction of `logits[:, t]`, and 0 where
`labels[:, t+1] == ignore_index`.

Memory is the point of this module. A DPO step only needs log-probs of answer tokens, but the naive path
(`lm_head -> [B, T, V] logits -> log_softmax -> gather`) holds the logits, their log-softmax and, in the
backward pass, a gradient of the same size. Here:

* `token_logps` (logits already exist) keeps only the logits and one float32 log-normaliser per token;
  the backward writes `softmax - onehot` straight into the logits' gradient, chunk by chunk.
* `chunked_token_logps` (hidden states + LM-head weight) selects the labelled positions first and
  computes their logits a chunk at a time, in the forward and again in the backward pass (recomputation),
  so no `[B, T, V]` tensor ever exists. What stays alive between the passes is `[N]` floats for the N
  labelled tokens.

Inputs in bf16/fp16 are computed in float32 inside each chunk (logits, logsumexp, softmax, gradient sums).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from data.records import IGNORE_INDEX


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (so float64 tests stay exact)."""
    return torch.promote_types(tensor.dtype, torch.float32)


# `token_logps` works on at most this many float32 elements of logits at once (64 MB).
_TOKEN_LOGPS_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
def _labelled_positions(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where next-token log-probs are needed.

    Returns (src [N], out [N], targets [N]): `src` indexes the flattened `[B*T]` positions whose
    prediction is needed (t in 0..T-2), `out` the matching flattened `[B*(T-1)]` output slots, and
    `targets` the token ids to score there (`labels[b, t+1]`).
    """
    batch, length = labels.shape
    next_tokens = labels[:, 1:]
    out = (next_tokens != ignore_index).reshape(-1).nonzero().squeeze(1)
    rows, cols = out // (length - 1), out % (length - 1)
    src = rows * length + cols
    return src, out, next_tokens.reshape(-1)[out]


def _check_targets(targets: Tensor, out: Tensor, vocab: int, steps: int, fn: str) -> None:
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        bad = ((targets < 0) | (targets >= vocab)).nonzero()[0, 0]
        row, col = divmod(int(out[bad]), steps)
        raise ValueError(
            f"{fn}: labels[{row}, {col + 1}] = {int(targets[bad])} is not a token id in [0, {vocab}) "
            f"nor ignore_index; mask non-answer positions with ignore_index"
        )


def _gather_rows(source: Tensor, index: Tensor, buffer: Tensor) -> Tensor:
    """`source[index]` [n, D] written into the first n rows of `buffer` [C, D] (and cast to its dtype).

    Every chunk reuses one buffer: allocating and freeing a fresh [C, V] block per chunk fragments the
    CPU heap (glibc keeps the freed blocks), which measured ~+180 MB of peak RSS in the benchmark.
    """
    rows = buffer[: len(index)]
    if source.dtype == buffer.dtype:
        return torch.index_select(source, 0, index, out=rows)
    return rows.copy_(source.index_select(0, index))


def _logsumexp_and_pick_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(logsumexp over the vocabulary [C], logit of each target [C]) of `logits` [C, V] (compute dtype).

    Destroys `logits` (exponentiates it in place) so a chunk needs one [C, V] buffer, not three.
    """
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    lse = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))
    return lse, picked


def _softmax_minus_onehot_(logits: Tensor, lse: Tensor, targets: Tensor, grad: Tensor) -> Tensor:
    """In place: d(grad * logp(target))/d logits = grad * (onehot(target) - softmax), [C, V].

    Written as -(softmax * grad) + grad at the target, which is exactly that.
    """
    logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
    logits[torch.arange(len(targets), device=logits.device), targets] += grad
    return logits


def _raise_if_not_finite(values: Tensor, out: Tensor, steps: int, fn: str, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        where = [divmod(int(i), steps) for i in out[bad][:5]]
        where = ", ".join(f"[{row}, {col}]" for row, col in where)
        raise ValueError(
            f"{fn}: non-finite log-probs at output positions {where} ({int(bad.sum())} in all): "
            f"{what} contain NaN/inf there (overflow in the model? fp16 logits?)"
        )


# ------------------------------------------------------------------------------------------------
# From logits
# ------------------------------------------------------------------------------------------------
class _TokenLogps(torch.autograd.Function):
    """logp[b, t] = logits[b, t, y] - logsumexp(logits[b, t]) with y = labels[b, t+1]; saves only [N] floats."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        batch, length, vocab = logits.shape
        flat = logits.reshape(batch * length, vocab)
        src, out, targets = _labelled_positions(labels, ignore_index)
        _check_targets(targets, out, vocab, length - 1, "token_logps")
        chunk = max(1, _TOKEN_LOGPS_CHUNK_ELEMENTS // vocab)
        dtype = _compute_dtype(logits)
        lse = torch.empty(len(src), dtype=dtype, device=logits.device)
        picked = torch.empty_like(lse)
        buffer = logits.new_empty(min(chunk, len(src)), vocab, dtype=dtype)
        for i in range(0, len(src), chunk):
            part = slice(i, i + chunk)
            lse[part], picked[part] = _logsumexp_and_pick_(_gather_rows(flat, src[part], buffer), targets[part])
        values = picked - lse
        _raise_if_not_finite(values, out, length - 1, "token_logps", "the logits")
        result = torch.zeros(batch * (length - 1), dtype=dtype, device=logits.device)
        result[out] = values
        ctx.save_for_backward(logits, src, out, targets, lse)
        ctx.chunk = chunk
        return result.view(batch, length - 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        logits, src, out, targets, lse = ctx.saved_tensors
        batch, length, vocab = logits.shape
        flat = logits.reshape(batch * length, vocab)
        grad_flat = torch.zeros(batch * length, vocab, dtype=logits.dtype, device=logits.device)
        grad = grad_output.reshape(-1)[out].to(lse.dtype)
        buffer = logits.new_empty(min(ctx.chunk, len(src)), vocab, dtype=lse.dtype)
        for i in range(0, len(src), ctx.chunk):
            part = slice(i, i + ctx.chunk)
            rows = _gather_rows(flat, src[part], buffer)
            d_logits = _softmax_minus_onehot_(rows, lse[part], targets[part], grad[part])
            grad_flat.index_copy_(0, src[part], d_logits.to(logits.dtype))
        return grad_flat.view(batch, length, vocab), None, None


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Log-prob of each next token: logits [B, T, V] (any float dtype), labels [B, T] -> [B, T-1] float32
    (float64 for float64 logits).

    `logits[:, :-1]` predicts `labels[:, 1:]`; positions whose label is `ignore_index` give 0 (and get
    no gradient). Equal to `log_softmax(logits.float()).gather(labels)` but computed chunk-wise with a
    logsumexp, so neither a float32 copy nor a log-softmax of the logits is kept for the backward pass.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logps: logits must be [B, T, V] and labels [B, T] with the same B, T; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if not logits.is_floating_point() or labels.is_floating_point():
        raise ValueError(f"token_logps: logits must be floating point and labels integer, got {logits.dtype} and {labels.dtype}")
    if logits.shape[1] < 2:
        return logits.new_zeros(logits.shape[0], 0, dtype=_compute_dtype(logits))
    return _TokenLogps.apply(logits, labels, ignore_index)


# ------------------------------------------------------------------------------------------------
# From hidden states and the LM head
# ------------------------------------------------------------------------------------------------
class _ChunkedTokenLogps(torch.autograd.Function):
    """log-probs of labelled tokens from hidden @ weight.T (+ bias), recomputing each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                ignore_index: int, chunk_size: int) -> Tensor:
        batch, length, width = hidden.shape
        vocab = weight.shape[0]
        flat = hidden.reshape(batch * length, width)
        src, out, targets = _labelled_positions(labels, ignore_index)
        _check_targets(targets, out, vocab, length - 1, "chunked_token_logps")
        dtype = torch.promote_types(_compute_dtype(hidden), weight.dtype)
        weight32 = weight.to(dtype)  # no copy when already in the compute dtype
        bias32 = None if bias is None else bias.to(dtype)
        lse = torch.empty(len(src), dtype=dtype, device=hidden.device)
        picked = torch.empty_like(lse)
        size = min(chunk_size, len(src))
        h_buffer, logits_buffer = flat.new_empty(size, width, dtype=dtype), flat.new_empty(size, vocab, dtype=dtype)
        for i in range(0, len(src), chunk_size):
            part = slice(i, i + chunk_size)
            logits = _chunk_logits(_gather_rows(flat, src[part], h_buffer), weight32, bias32, logits_buffer)
            lse[part], picked[part] = _logsumexp_and_pick_(logits, targets[part])
        values = picked - lse
        _raise_if_not_finite(values, out, length - 1, "chunked_token_logps", "the hidden states or LM head")
        result = torch.zeros(batch * (length - 1), dtype=dtype, device=hidden.device)
        result[out] = values
        ctx.save_for_backward(hidden, weight, bias, src, out, targets, lse)
        ctx.chunk_size = chunk_size
        return result.view(batch, length - 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        hidden, weight, bias, src, out, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        batch, length, width = hidden.shape
        flat = hidden.reshape(batch * length, width)
        dtype = lse.dtype
        weight32 = weight.to(dtype)
        bias32 = None if bias is None else bias.to(dtype)
        grad = grad_output.reshape(-1)[out].to(dtype)
        # Accumulators in the compute dtype: the weight/bias gradients are sums over all chunks.
        grad_hidden = torch.zeros_like(flat) if need_hidden else None
        grad_weight = torch.zeros_like(weight32) if need_weight else None
        grad_bias = torch.zeros_like(bias32) if need_bias else None
        size = min(ctx.chunk_size, len(src))
        h_buffer, logits_buffer = flat.new_empty(size, width, dtype=dtype), flat.new_empty(size, len(weight), dtype=dtype)
        grad_h_buffer = torch.empty_like(h_buffer)
        for i in range(0, len(src), ctx.chunk_size):
            part = slice(i, i + ctx.chunk_size)
            h = _gather_rows(flat, src[part], h_buffer)  # [C, H]
            logits = _chunk_logits(h, weight32, bias32, logits_buffer)
            d_logits = _softmax_minus_onehot_(logits, lse[part], targets[part], grad[part])
            if need_hidden:  # each position occurs once, so a copy (not a sum) is enough
                grad_h = torch.mm(d_logits, weight32, out=grad_h_buffer[: len(h)])
                grad_hidden.index_copy_(0, src[part], grad_h.to(hidden.dtype))
            if need_weight:
                grad_weight.addmm_(d_logits.t(), h)
            if need_bias:
                grad_bias += d_logits.sum(dim=0)
        return (
            None if grad_hidden is None else grad_hidden.view(batch, length, width),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None,
        )


def _chunk_logits(hidden32: Tensor, weight32: Tensor, bias32: Optional[Tensor], buffer: Tensor) -> Tensor:
    """[C, H] @ [V, H].T (+ [V]) -> [C, V] written into the first C rows of `buffer`, all in the compute dtype."""
    out = buffer[: len(hidden32)]
    if bias32 is None:
        return torch.mm(hidden32, weight32.t(), out=out)
    return torch.addmm(bias32, hidden32, weight32.t(), out=out)


def chunked_token_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    lm_head_bias: Optional[Tensor] = None,
) -> Tensor:
    """`token_logps(F.linear(hidden, lm_head_weight, lm_head_bias), labels)` without the [B, T, V] logits.

    hidden [B, T, H] (final hidden states, after the last norm), lm_head_weight [V, H], lm_head_bias [V]
    or None, labels [B, T] -> [B, T-1] float32 (float64 for float64 inputs). Only positions whose next
    label is not `ignore_index` are computed, `chunk_size` of them at a time, in the forward and again in
    the backward pass; gradients flow to hidden, weight and bias (whichever require them), accumulated
    chunk by chunk in float32 (bf16 inputs too: expect a transient float32 copy of the weight).
    """
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"chunked_token_logps: hidden must be [B, T, H] and labels [B, T] with the same B, T; got "
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"chunked_token_logps: lm_head_weight must be [V, H] with H = {hidden.shape[2]} (hidden size), "
            f"got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(
            f"chunked_token_logps: lm_head_bias must be [V] = [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}"
        )
    if not hidden.is_floating_point() or labels.is_floating_point():
        raise ValueError(
            f"chunked_token_logps: hidden must be floating point and labels integer, got {hidden.dtype} and {labels.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunked_token_logps: chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[1] < 2:
        return hidden.new_zeros(hidden.shape[0], 0, dtype=_compute_dtype(hidden))
    return _ChunkedTokenLogps.apply(hidden, lm_head_weight, lm_head_bias, labels, ignore_index, chunk_size)


def chunked_token_kl(
    policy_hidden: Tensor,
    policy_head: Tensor,
    reference_hidden: Tensor,
    reference_head: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    policy_bias: Optional[Tensor] = None,
    reference_bias: Optional[Tensor] = None,
) -> Tensor:
    """Per-position KL(reference || policy) of the next-token distributions, [B, T-1] float32 aligned with
    labels[:, 1:], 0 where the next label is `ignore_index` (TDPO's sequential KL sums it over an answer).

    hidden [B, T, H] of each model (final hidden states) with its LM head [V, H] (and bias [V]). Only the
    labelled positions are computed, `chunk_size` at a time, so no [B, T, V] logits exist at once; the
    gradient flows to the policy's hidden states and head through plain autograd (each chunk's [chunk, V]
    softmax is kept for the backward pass: memory grows with answer tokens x vocabulary)."""
    if policy_hidden.shape != reference_hidden.shape or policy_hidden.shape[:2] != labels.shape:
        raise ValueError(f"chunked_token_kl: policy and reference hidden states must be [B, T, H] with labels [B, T]; got "
                         f"{tuple(policy_hidden.shape)}, {tuple(reference_hidden.shape)} and {tuple(labels.shape)}")
    out = policy_hidden.new_zeros(labels.shape[0], max(labels.shape[1] - 1, 0), dtype=torch.float32)
    if labels.shape[1] < 2:
        return out
    rows, cols = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)
    values = []
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
        policy_logits = F.linear(policy_hidden[r, c].float(), policy_head.float(), None if policy_bias is None else policy_bias.float())
        reference_logits = F.linear(reference_hidden[r, c].float(), reference_head.float(),
                                    None if reference_bias is None else reference_bias.float())
        reference_logp = reference_logits.log_softmax(-1)
        values.append((reference_logp.exp() * (reference_logp - policy_logits.log_softmax(-1))).sum(-1))
    if values:
        out = out.index_put((rows, cols), torch.cat(values))
    return out
