"""Where per-token weights come from: one function per source, each returning weights [2B, T] float32
in `PairBatch` row order (chosen rows 0..B-1, rejected rows B..2B-1), 0 outside the answer.

`DDPOLoss` picks one source by `loss.token_weights`, then feeds the weights to `weighted_logps` (sum or
Eq. 5 mean), for the policy and the reference alike (LD-DPO's tail weight: the policy only unless
`loss.ld_alpha_reference`, as TRL does). Sources (docs/DENSE_METHODS.md):

    segments   DDPO (RLHF-V): gamma on tokens of corrected segments, 1 on the other answer tokens
    severity   OPA-DPO style: an annotated severity weight on the tokens it covers, 1 elsewhere
    length     LD-DPO: 1 on the first min(|chosen|, |rejected|) answer tokens of both answers of a
               pair, alpha on the longer answer's tail

Also here, the inputs of two methods that are not token weights: TPO's visual scores (`visual_scores`,
added as log s_t to each token log-prob, from `label_logits`) and HSA-DPO's per-answer severity
(`answer_scores`, which scales a whole answer's log-ratio).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpo.data.records import IGNORE_INDEX

TOKEN_WEIGHT_SOURCES = ("segments", "severity", "length")


def _check_same_shape(name: str, answer_mask: Tensor, other: Tensor) -> None:
    if answer_mask.shape != other.shape:
        raise ValueError(
            f"{name}: the answer mask and the per-token input masks differ in shape: "
            f"{tuple(answer_mask.shape)} vs {tuple(other.shape)} (both are aligned with labels[:, 1:])"
        )


def token_weights(answer_mask: Tensor, corrected_mask: Tensor, gamma: float) -> Tensor:
    """DDPO token weights [..., T] float32 from bool masks [..., T]: 0 outside the answer, gamma on
    corrected answer tokens, 1 on the others."""
    _check_same_shape("token_weights", answer_mask, corrected_mask)
    ones = torch.ones(answer_mask.shape, dtype=torch.float32, device=answer_mask.device)
    return torch.where(answer_mask, torch.where(corrected_mask, gamma * ones, ones), torch.zeros_like(ones))


def severity_weights(answer_mask: Tensor, severity: Tensor) -> Tensor:
    """Annotated severity weights: `severity` [2B, T] float holds the weight of each annotated token (0 =
    not annotated); answer tokens without one weigh 1, tokens outside the answer 0."""
    _check_same_shape("severity_weights", answer_mask, severity)
    if (severity < 0).any() or not torch.isfinite(severity).all():
        raise ValueError("severity_weights: severity weights must be finite and >= 0 (0 = not annotated)")
    severity = severity.float()
    return torch.where(
        answer_mask, torch.where(severity > 0, severity, torch.ones_like(severity)), torch.zeros_like(severity)
    )


def label_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    """The raw (pre-softmax) logit of each next label token, [R, T-1] float32 aligned with labels[:, 1:],
    0 where the label is IGNORE_INDEX: final hidden states [R, T, H] through the LM head (weight [V, H],
    bias [V] or None), at the labelled positions only (no [R, T, V] logits). Keeps the gradient (TPO's
    scores are not detached)."""
    out = hidden.new_zeros(labels.shape[0], max(labels.shape[1] - 1, 0), dtype=torch.float32)
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    if len(rows) == 0:
        return out
    targets = labels[rows, cols + 1]
    values = (hidden[rows, cols].float() * weight[targets].float()).sum(-1)
    if bias is not None:
        values = values + bias[targets].float()
    return out.index_put((rows, cols), values)


def visual_scores(answer_mask: Tensor, real_logits: Tensor, corrupted_logits: Tensor) -> Tensor:
    """TPO's self-calibrated visual scores [2B, T] from the raw logits of each answer token given the real
    image and a noised one (both [2B, T], chosen rows first, `label_logits`): chosen tokens
    sigmoid(gap) + 0.5, rejected tokens 1.5 - sigmoid(gap), gap = real - noised; 1 outside the answer.
    Not detached: TPO's gradient flows through the scores into both forwards."""
    _check_same_shape("visual_scores", answer_mask, real_logits)
    _check_same_shape("visual_scores", answer_mask, corrupted_logits)
    b = answer_mask.shape[0] // 2
    dtype = torch.promote_types(real_logits.dtype, torch.float32)  # bf16 logits: the sigmoid in float32
    # where(): logits outside the answer may be anything (they are never read)
    gap = torch.where(
        answer_mask, real_logits.to(dtype) - corrupted_logits.to(dtype), torch.zeros_like(real_logits, dtype=dtype)
    )
    s = torch.sigmoid(gap)
    scores = torch.cat([s[:b] + 0.5, 1.5 - s[b:]])
    return torch.where(answer_mask, scores, torch.ones_like(scores))


def answer_scores(answer_mask: Tensor, severity: Tensor) -> Tensor:
    """One severity score per answer [2B] (HSA-DPO's per-response score): the largest annotated severity
    on the answer's tokens, 1 when none is annotated. `severity` [2B, T] as for `severity_weights`."""
    _check_same_shape("answer_scores", answer_mask, severity)
    if (severity < 0).any() or not torch.isfinite(severity).all():
        raise ValueError("answer_scores: severity weights must be finite and >= 0 (0 = not annotated)")
    inside = torch.where(answer_mask, severity.float(), torch.zeros_like(severity, dtype=torch.float32))
    top = inside.max(dim=1).values
    return torch.where(top > 0, top, torch.ones_like(top))


def length_weights(answer_mask: Tensor, alpha: float) -> Tensor:
    """LD-DPO weights: answer token k of either answer of pair i weighs 1 while k < min(|chosen_i|,
    |rejected_i|) (the shared length) and alpha after it (the longer answer's tail)."""
    if answer_mask.shape[0] % 2:
        raise ValueError(
            f"length_weights: the answer mask holds {answer_mask.shape[0]} rows; pass [2B, T] (chosen rows, "
            "then rejected)"
        )
    b = answer_mask.shape[0] // 2
    position = answer_mask.long().cumsum(dim=1) - 1  # k of each answer token
    lengths = answer_mask.sum(dim=1)
    shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2).unsqueeze(1)
    ones = torch.ones(answer_mask.shape, dtype=torch.float32, device=answer_mask.device)
    return torch.where(answer_mask, torch.where(position < shared, ones, alpha * ones), torch.zeros_like(ones))
