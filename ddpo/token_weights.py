"""Where per-token weights come from: one function per source, each returning weights [2B, T] float32
in `PairBatch` row order (chosen rows 0..B-1, rejected rows B..2B-1), 0 outside the answer.

`DDPOLoss` picks one source by `loss.token_weights`, then feeds the weights to `weighted_logps` (sum or
Eq. 5 mean), for the policy and the reference alike. Sources (docs/DENSE_METHODS.md):

    segments   DDPO (RLHF-V): gamma on tokens of corrected segments, 1 on the other answer tokens
    severity   HSA-DPO / OPA-DPO style: an annotated severity weight on the tokens it covers, 1 elsewhere
    visual     TPO style: s_t = sigmoid(logp_t(image) - logp_t(corrupted image)) + 0.5 on chosen tokens,
               1.5 - sigmoid(...) on rejected ones; from the policy, without gradient, no annotation
    length     LD-DPO style: 1 on the first min(|chosen|, |rejected|) answer tokens of both answers of a
               pair, alpha on the longer answer's tail
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_WEIGHT_SOURCES = ("segments", "severity", "visual", "length")


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


def visual_weights(answer_mask: Tensor, real_logps: Tensor, corrupted_logps: Tensor) -> Tensor:
    """TPO's self-calibrated visual weights from the policy's token log-probs given the real image and a
    corrupted one (both [2B, T], chosen rows first; detached here): a chosen token the image makes more
    likely weighs up to 1.5, a rejected one down to 0.5, and the other way round; 1 when the image does
    not matter."""
    _check_same_shape("visual_weights", answer_mask, real_logps)
    _check_same_shape("visual_weights", answer_mask, corrupted_logps)
    b = answer_mask.shape[0] // 2
    # where(): log-probs outside the answer may be anything (they are never read)
    gap = torch.where(
        answer_mask,
        real_logps.detach().float() - corrupted_logps.detach().float(),
        torch.zeros_like(real_logps, dtype=torch.float32),
    )
    s = torch.sigmoid(gap)
    weights = torch.cat([s[:b] + 0.5, 1.5 - s[b:]])
    return torch.where(answer_mask, weights, torch.zeros_like(weights))


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
