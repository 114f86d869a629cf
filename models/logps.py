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
  computes their logits a chunk at a time, so no `[B, T, V]` tensor ever exists. With a frozen LM head
  (LoRA) the forward also computes each token's gradient with respect to its hidden state (`[N, H]`,
  kept for the backward, which then does no matmul); with a trainable head the backward recomputes the
  logits a block of vocabulary columns at a time (the weight gradient needs the upstream gradient, known
  only then), unless every labelled token fits in one chunk: then the forward's softmax is kept.
  `_ChunkedTokenLogps` says what that costs.

Matmuls run in the inputs' dtype (bf16 stays bf16, as in the naive head; no float32 copy of the LM
head); logsumexp, softmax and the gradient sums over the vocabulary run in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ddpo.data.records import IGNORE_INDEX


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


def _logsumexp_and_pick_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logsumexp over the vocabulary [C], logit of each target [C], sum of exp [C]) of `logits` [C, V].

    Leaves exp(logits - max) in `logits` (in place, so a chunk needs one [C, V] buffer, not three):
    divided by the returned sums, that is the softmax.
    """
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(dim=1)
    return sums.log().add_(peak.squeeze(1)), picked, sums


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
            lse[part], picked[part], _ = _logsumexp_and_pick_(_gather_rows(flat, src[part], buffer), targets[part])
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
        raise ValueError(
            f"token_logps: logits must be floating point and labels integer, got {logits.dtype} and {labels.dtype}"
        )
    if logits.shape[1] < 2:
        return logits.new_zeros(logits.shape[0], 0, dtype=_compute_dtype(logits))
    return _TokenLogps.apply(logits, labels, ignore_index)


# ------------------------------------------------------------------------------------------------
# From hidden states and the LM head
# ------------------------------------------------------------------------------------------------
class _ChunkedTokenLogps(torch.autograd.Function):
    """log-probs of labelled tokens from hidden @ weight.T (+ bias), [N, V] logits never held whole.

    Matmuls run in the inputs' dtype (bf16 stays bf16: no float32 copy of the LM head); logsumexp,
    softmax and the gradient sums over the vocabulary run in the compute dtype (float32).

    Frozen LM head (LoRA, `freeze_llm` with a trainable vision side): the forward computes, chunk by
    chunk, d logp_t / d h_t = W[y_t] - softmax_t @ W ([N, H], the size of the hidden states), so the
    backward only scales it by the upstream gradient: 2 matmuls in all, as the naive head's forward +
    input-gradient. Trainable LM head: the weight gradient sum_t g_t (onehot_t - softmax_t)^T h_t needs
    the upstream gradient g, which exists only in the backward, so the backward recomputes the logits,
    in blocks of vocabulary columns (every token at once, so each weight-gradient block is written once,
    never accumulated): 4 matmuls in all against the naive head's 3. When every labelled token fits in
    one chunk (N <= chunk_size) the forward keeps that chunk's softmax instead: 3 matmuls, and no more
    memory, since the recomputing backward would allocate the same [N, V] block at the same moment.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int, chunk_size: int
    ) -> Tensor:
        batch, length, width = hidden.shape
        vocab = weight.shape[0]
        flat = hidden.reshape(batch * length, width)
        src, out, targets = _labelled_positions(labels, ignore_index)
        _check_targets(targets, out, vocab, length - 1, "chunked_token_logps")
        dtype = _compute_dtype(hidden)  # statistics: float32 (float64 for float64 inputs)
        matmul = torch.promote_types(hidden.dtype, weight.dtype)  # matmuls: bf16 stays bf16
        weight_m = weight.to(matmul)  # no copy when already in that dtype
        # The gradient in the forward pays off only when the LM head needs none (see the class docstring).
        fused = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        keep_softmax = not fused and any(ctx.needs_input_grad[:3]) and len(src) <= chunk_size
        softmax = None
        lse = torch.empty(len(src), dtype=dtype, device=hidden.device)
        picked = torch.empty_like(lse)
        d_hidden = flat.new_empty(len(src), width, dtype=matmul) if fused else None  # d logp / d h per token
        size = min(chunk_size, len(src))
        logits_buffer = flat.new_empty(size, vocab, dtype=dtype)
        for i in range(0, len(src), chunk_size):
            part = slice(i, i + chunk_size)
            h = flat.index_select(0, src[part]).to(matmul)  # [C, H]
            logits = _chunk_logits(h, weight_m, bias, logits_buffer)
            lse[part], picked[part], sums = _logsumexp_and_pick_(logits, targets[part])
            if fused:  # d logp / d h = (onehot - softmax) @ W = W[y] - softmax @ W; the softmax in float32
                d = logits.div_(-sums[:, None])
                d[torch.arange(len(h), device=d.device), targets[part]] += 1
                torch.mm(d.to(matmul), weight_m, out=d_hidden[part])
            elif keep_softmax:  # the only chunk: its softmax serves the backward, nothing is recomputed
                softmax = logits.div_(sums[:, None])
        values = picked - lse
        _raise_if_not_finite(values, out, length - 1, "chunked_token_logps", "the hidden states or LM head")
        result = torch.zeros(batch * (length - 1), dtype=dtype, device=hidden.device)
        result[out] = values
        if fused:
            ctx.save_for_backward(d_hidden, src, out)
        else:
            ctx.save_for_backward(hidden, weight, bias, src, out, targets, lse)
            ctx.kept_softmax = softmax  # an attribute, not saved: the backward overwrites it (see _head_gradients)
        ctx.fused, ctx.chunk_size, ctx.hidden_shape, ctx.hidden_dtype = fused, chunk_size, hidden.shape, hidden.dtype
        return result.view(batch, length - 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.fused:
            d_hidden, src, out = ctx.saved_tensors
            batch, length, width = ctx.hidden_shape
            grad = grad_output.reshape(-1)[out]
            grad_hidden = torch.zeros(batch * length, width, dtype=ctx.hidden_dtype, device=grad_output.device)
            grad_hidden.index_copy_(
                0, src, (d_hidden.to(grad.dtype) * grad[:, None]).to(ctx.hidden_dtype)
            )  # one rounding
            return grad_hidden.view(batch, length, width), None, None, None, None, None
        return _head_gradients(ctx, grad_output)


def _head_gradients(ctx, grad_output: Tensor):
    """Backward of the trainable-LM-head case, a block of vocabulary columns at a time.

    A block holds every labelled token ([N, block], block = chunk_size * V / N columns: the same memory as
    a chunk of chunk_size tokens), so d_logits = g * (onehot - softmax) of the block is complete and
    grad_weight[block] = d_logits.T @ h is written once; grad_hidden ([N, H]) sums over the blocks in float32.
    The softmax is the forward's when it kept one (a single block; it becomes d_logits in place, so it is
    used once: a second backward through a retained graph recomputes), else recomputed from the logits.
    """
    hidden, weight, bias, src, out, targets, lse = ctx.saved_tensors
    kept, ctx.kept_softmax = ctx.kept_softmax, None
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    batch, length, width = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    matmul = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.reshape(batch * length, width).index_select(0, src).to(matmul)  # [N, H]
    grad = grad_output.reshape(-1)[out].to(dtype)
    grad_h = torch.zeros(len(src), width, dtype=dtype, device=h.device) if need_hidden else None
    grad_weight = None
    if need_weight:  # every row is written below (unless no token is scored)
        grad_weight = torch.empty_like(weight) if len(src) else torch.zeros_like(weight)
    grad_bias = torch.zeros_like(bias) if need_bias else None
    block = vocab if kept is not None else max(1, ctx.chunk_size * vocab // max(1, len(src)))
    rows = torch.arange(len(src), device=h.device)
    buffer = None if kept is not None else h.new_empty(len(src) * min(block, vocab), dtype=dtype)  # reused per block
    for v0 in range(0, vocab if len(src) else 0, block):
        cols = slice(v0, min(v0 + block, vocab))
        w = weight[cols].to(matmul)
        if kept is not None:
            softmax = kept
        else:
            logits = _chunk_logits(
                h, w, None if bias is None else bias[cols], buffer[: len(src) * len(w)].view(len(src), len(w))
            )
            softmax = logits.sub_(lse[:, None]).exp_()
        d_logits = softmax.mul_(-grad[:, None])  # -g * softmax, this block's columns
        inside = (targets >= cols.start) & (targets < cols.stop)
        d_logits[rows[inside], targets[inside] - cols.start] += grad[inside]
        d_m = d_logits.to(matmul)
        if need_weight:  # rows of the weight gradient: written once, straight into place when dtypes match
            if grad_weight.dtype == matmul:
                torch.mm(d_m.t(), h, out=grad_weight[cols])
            else:
                grad_weight[cols] = torch.mm(d_m.t(), h)
        if need_hidden:
            if matmul == dtype:
                grad_h.addmm_(d_m, w)
            else:
                grad_h += torch.mm(d_m, w)
        if need_bias:
            grad_bias[cols] = d_logits.sum(0)
    grad_hidden = None
    if need_hidden:  # each position occurs once, so a copy (not a sum) is enough
        grad_hidden = torch.zeros_like(hidden).view(batch * length, width)
        grad_hidden.index_copy_(0, src, grad_h.to(hidden.dtype))
        grad_hidden = grad_hidden.view(batch, length, width)
    return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor) -> Tensor:
    """[C, H] @ [V, H].T (+ [V]) in the inputs' dtype -> [C, V] written into the first C rows of `buffer`
    (compute dtype)."""
    out = buffer[: len(hidden)]
    if hidden.dtype == buffer.dtype:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def chunked_token_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """`token_logps(F.linear(hidden, lm_head_weight, lm_head_bias), labels)` without the [B, T, V] logits.

    hidden [B, T, H] (final hidden states, after the last norm), lm_head_weight [V, H], lm_head_bias [V]
    or None, labels [B, T] -> [B, T-1] float32 (float64 for float64 inputs). Only positions whose next
    label is not `ignore_index` are computed, `chunk_size` of them at a time (the backward of a trainable
    head: blocks of `chunk_size * V / N` vocabulary columns, the same memory); gradients flow to hidden,
    weight and bias (whichever require them). Matmuls in the inputs' dtype, statistics in float32.
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
            f"chunked_token_logps: lm_head_bias must be [V] = [{lm_head_weight.shape[0]}], "
            f"got {tuple(lm_head_bias.shape)}"
        )
    if not hidden.is_floating_point() or labels.is_floating_point():
        raise ValueError(
            f"chunked_token_logps: hidden must be floating point and labels integer, "
            f"got {hidden.dtype} and {labels.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunked_token_logps: chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[1] < 2:
        return hidden.new_zeros(hidden.shape[0], 0, dtype=_compute_dtype(hidden))
    return _ChunkedTokenLogps.apply(hidden, lm_head_weight, lm_head_bias, labels, ignore_index, chunk_size)


@dataclass(frozen=True)
class HiddenAndHead:
    """One model's side of `chunked_token_kl`: final hidden states [B, T, H] (after the last norm) and
    its LM head, weight [V, H] and bias [V] or None (`HiddenAndHead(hidden, head.weight, head.bias)`)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


def chunked_token_kl(
    policy: HiddenAndHead,
    reference: HiddenAndHead,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
) -> Tensor:
    """Per-position KL(reference || policy) of the next-token distributions, [B, T-1] float32 aligned with
    labels[:, 1:], 0 where the next label is `ignore_index` (TDPO's sequential KL sums it over an answer).

    Each side's logits are its hidden states through its LM head. Only the labelled positions are computed,
    `chunk_size` at a time, so no [B, T, V] logits exist at once; the gradient flows to the policy's hidden
    states and head through plain autograd (each chunk's [chunk, V] softmax is kept for the backward pass:
    memory grows with answer tokens x vocabulary)."""
    if policy.hidden.shape != reference.hidden.shape or policy.hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"chunked_token_kl: policy and reference hidden states must be [B, T, H] with labels [B, T]; got "
            f"{tuple(policy.hidden.shape)}, {tuple(reference.hidden.shape)} and {tuple(labels.shape)}"
        )
    out = policy.hidden.new_zeros(labels.shape[0], max(labels.shape[1] - 1, 0), dtype=torch.float32)
    if labels.shape[1] < 2:
        return out
    rows, cols = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)
    # float32 views of the heads made once (a no-op for float32 weights), not once per chunk
    policy_head, reference_head = policy.weight.float(), reference.weight.float()
    policy_bias = None if policy.bias is None else policy.bias.float()
    reference_bias = None if reference.bias is None else reference.bias.float()
    values = []
    for start in range(0, len(rows), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        policy_logits = F.linear(policy.hidden[r, c].float(), policy_head, policy_bias)
        reference_logits = F.linear(reference.hidden[r, c].float(), reference_head, reference_bias)
        reference_logp = reference_logits.log_softmax(-1)
        values.append((reference_logp.exp() * (reference_logp - policy_logits.log_softmax(-1))).sum(-1))
    if values:
        out = out.index_put((rows, cols), torch.cat(values))
    return out
