"""The DDPO objective: token-weighted sequence log-probs plugged into a DPO-family preference loss.

DDPO (RLHF-V, Eq. 5) scores a response by a weighted mean of its token log-probs, where tokens inside
human-corrected segments weigh gamma > 1 and unchanged tokens weigh 1:

    log pi(y|x) = (1/N) [ sum_{unchanged} log p(y_i) + gamma * sum_{corrected} log p(y_i) ],
    N = |unchanged| + gamma * |corrected|.

The released RLHF-V code drops the 1/N (a weighted sum). Both are `weighted_logps(..., normalize)`.
The data says which answer tokens were corrected (a bool mask from the segment finder, data/segments.py);
`DDPOLoss` turns it into weights with `loss.gamma` (`token_weights`), so changing gamma needs no
re-encoding and no new reference cache. Other weight sources (annotated severity, TPO's visual weights,
LD-DPO's tail weight) live in ddpo/token_weights.py; the dense methods' extra terms (mDPO's conditional
preference and anchor, TDPO's sequential KL) are switches of `DDPOLoss`, off by default
(docs/DENSE_METHODS.md). Reference sequence log-probs are rebuilt from per-token
reference log-probs with the same weights and normalisation, as RLHF-V does.

Settings are checked once, where they are set (`check_settings`: by the config at start-up and by
`DDPOLoss.__init__`); the per-batch functions check only the tensors they are given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpo.corruption import CORRUPTIONS
from ddpo.token_weights import TOKEN_WEIGHT_SOURCES, length_weights, severity_weights, token_weights, visual_weights

NORMALIZATIONS = ("mean", "sum")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _rows(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def weighted_logps(token_logps: Tensor, weights: Tensor, normalize: str) -> Tensor:
    """Sequence log-prob of each row: token_logps, weights [B, T] float -> [B].

    weights: 0 = not part of the response, 1 = unchanged token, gamma = corrected token.
    normalize="mean": sum(w * logp) / sum(w) (paper Eq. 5); "sum": sum(w * logp) (released RLHF-V code).
    Values of token_logps where the weight is 0 are never read (they may be anything, even NaN).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"weighted_logps: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if token_logps.dim() != 2 or token_logps.shape != weights.shape:
        raise ValueError(
            f"weighted_logps: token_logps and weights must both be [B, T]; got {tuple(token_logps.shape)} "
            f"and {tuple(weights.shape)} (weights are aligned with labels[:, 1:])"
        )
    inside = weights > 0
    if (weights < 0).any():
        raise ValueError(
            f"weighted_logps: negative token weights in rows {_rows((weights < 0).any(1))}; weights are 0, 1 or gamma"
        )
    broken = (inside & ~torch.isfinite(token_logps)).any(1)
    if broken.any():
        raise ValueError(
            f"weighted_logps: NaN/inf token log-probs inside the response (weight > 0) in rows {_rows(broken)}"
        )
    # `where`, not multiplication: 0 * NaN outside the response would still be NaN.
    total = torch.where(inside, weights * token_logps, torch.zeros_like(token_logps)).sum(dim=1)
    if normalize == "sum":
        return total
    norm = weights.sum(dim=1)
    if (norm == 0).any():
        raise ValueError(
            f"weighted_logps: rows {_rows(norm == 0)} have no response tokens (all weights 0), so their "
            f"mean log-prob is undefined; drop empty answers or check the label mask"
        )
    return total / norm


SFT_FORMS = ("token_mean", "released")


def check_settings(
    beta: float = 0.5,
    gamma: float = 5.0,
    normalize: str = "mean",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    sft_form: str = "token_mean",
    token_weights: str = "segments",
    ld_alpha: float = 1.0,
    image_conditional_weight: float = 0.0,
    anchor_weight: float = 0.0,
    tdpo_alpha: float = 0.0,
    corruption: str = "noise",
    corruption_strength: float = 0.5,
) -> None:
    """The one check of the loss settings (the `loss:` config section); messages name the config key."""
    checks = [
        (beta > 0, f"loss.beta must be > 0, got {beta}"),
        (gamma >= 1, f"loss.gamma must be >= 1 (1 = vanilla DPO; corrected tokens weigh gamma), got {gamma}"),
        (normalize in NORMALIZATIONS, f"loss.normalize must be one of {NORMALIZATIONS}, got {normalize!r}"),
        (loss_type in LOSS_TYPES, f"loss.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"),
        (0 <= label_smoothing < 0.5, f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}"),
        (
            label_smoothing == 0 or loss_type == "sigmoid",
            f"loss.label_smoothing is only defined for loss.loss_type 'sigmoid', got {loss_type!r}",
        ),
        (sft_weight >= 0, f"loss.sft_weight must be >= 0, got {sft_weight}"),
        (sft_form in SFT_FORMS, f"loss.sft_form must be one of {SFT_FORMS}, got {sft_form!r}"),
        (
            token_weights in TOKEN_WEIGHT_SOURCES,
            f"loss.token_weights must be one of {TOKEN_WEIGHT_SOURCES}, got {token_weights!r}",
        ),
        (
            gamma == 1 or token_weights == "segments",
            f"loss.gamma {gamma} weighs corrected segments, but loss.token_weights is {token_weights!r}: set loss.gamma 1 "
            "or loss.token_weights segments (one weight source at a time)",
        ),
        (
            0 <= ld_alpha <= 1,
            f"loss.ld_alpha must be in [0, 1] (LD-DPO's weight of the longer answer's tail), got {ld_alpha}",
        ),
        (
            ld_alpha == 1 or token_weights == "length",
            f"loss.ld_alpha {ld_alpha} only acts with loss.token_weights 'length' (it is {token_weights!r}): set one or drop the other",
        ),
        (
            image_conditional_weight >= 0,
            f"loss.image_conditional_weight must be >= 0 (0 = off), got {image_conditional_weight}",
        ),
        (anchor_weight >= 0, f"loss.anchor_weight must be >= 0 (0 = off), got {anchor_weight}"),
        (tdpo_alpha >= 0, f"loss.tdpo_alpha must be >= 0 (0 = off), got {tdpo_alpha}"),
        (corruption in CORRUPTIONS, f"loss.corruption must be one of {CORRUPTIONS}, got {corruption!r}"),
        (0 < corruption_strength <= 1, f"loss.corruption_strength must be in (0, 1], got {corruption_strength}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    margin_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probs, all [B] -> (losses, chosen_rewards, rejected_rewards).

    h = (pi_c - pi_r) - (ref_c - ref_r) - margin_offset, with the reference part 0 when `reference_free`
    (then the ref arguments may be None) and margin_offset [B] 0 when None (TDPO puts its KL term there).
      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps = label_smoothing; DPO at 0)
      ipo:     (h - 1 / (2 beta))^2
      hinge:   max(0, 1 - beta h)
    Rewards are beta * (policy - ref), detached, with ref taken as 0 when reference_free, so that
    "chosen reward > rejected reward" means the same thing the loss optimises. The settings are
    checked once by `check_settings` (config load, `DDPOLoss`), not on every call.
    """
    if reference_free:
        ref_chosen = torch.zeros_like(policy_chosen) if ref_chosen is None else torch.zeros_like(ref_chosen)
        ref_rejected = torch.zeros_like(policy_rejected) if ref_rejected is None else torch.zeros_like(ref_rejected)
    elif ref_chosen is None or ref_rejected is None:
        raise ValueError("dpo_loss: reference log-probs are None; pass them or set reference_free=True")
    shapes = [tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(
            f"dpo_loss: policy_chosen, policy_rejected, ref_chosen, ref_rejected must all be [B]; got {shapes}"
        )
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if margin_offset is not None:
        h = h - margin_offset
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class DDPOLoss(nn.Module):
    """Token log-probs + masks of a batch of pairs -> (scalar loss, metrics), torchtune style.

    The main term: dpo_loss on weighted sequence log-probs, the weights from one source
    (`token_weights`: segments x gamma, annotated severity, TPO's visual weights, LD-DPO's tail weight;
    ddpo/token_weights.py), the same weights and normalisation for policy and reference. Extras, each off
    at 0 and costing nothing then (docs/DENSE_METHODS.md):
      tdpo_alpha                TDPO's sequential KL inside the margin: h - alpha (KL_rejected - sg(KL_chosen)),
                                KL = sum over answer tokens of KL(ref || policy) at each position
      image_conditional_weight  mDPO's conditional preference: the chosen answer given the real image over the
                                same answer given a corrupted one, -log sigma(beta [D(y_w|I) - D(y_w|I')])
      anchor_weight             mDPO's reward anchor: -log sigma(beta D(y_w|I)) (chosen reward above 0)
      sft_weight                an SFT term (`sft_form`) 'token_mean': the mean negative log-prob of all chosen
                                answer tokens in the batch, unweighted; or 'released' (the released RLHF-V code):
                                minus the mean over pairs of the chosen answers' weighted sequence log-probs
    D(y|I) = weighted policy log-prob minus weighted reference log-prob (reference part 0 when reference_free).
    Metrics are detached 0-d tensors (batch means) so that a trainer can all-reduce them before logging.
    """

    def __init__(
        self,
        beta: float = 0.5,
        gamma: float = 5.0,
        normalize: str = "mean",
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        sft_weight: float = 0.0,
        sft_form: str = "token_mean",
        token_weights: str = "segments",
        ld_alpha: float = 1.0,
        image_conditional_weight: float = 0.0,
        anchor_weight: float = 0.0,
        tdpo_alpha: float = 0.0,
    ):
        super().__init__()
        check_settings(
            beta,
            gamma,
            normalize,
            loss_type,
            label_smoothing,
            sft_weight,
            sft_form,
            token_weights,
            ld_alpha,
            image_conditional_weight,
            anchor_weight,
            tdpo_alpha,
        )
        self.beta, self.gamma, self.normalize, self.loss_type = beta, gamma, normalize, loss_type
        self.label_smoothing, self.reference_free, self.sft_weight = label_smoothing, reference_free, sft_weight
        self.sft_form, self.token_weights, self.ld_alpha = sft_form, token_weights, ld_alpha
        self.image_conditional_weight, self.anchor_weight, self.tdpo_alpha = (
            image_conditional_weight,
            anchor_weight,
            tdpo_alpha,
        )

    @classmethod
    def from_config(cls, loss_cfg: Any) -> DDPOLoss:
        """From a `ddpo.config.LossConfig` (or anything with the same attributes)."""
        return cls(
            beta=loss_cfg.beta,
            gamma=loss_cfg.gamma,
            normalize=loss_cfg.normalize,
            loss_type=loss_cfg.loss_type,
            label_smoothing=loss_cfg.label_smoothing,
            reference_free=loss_cfg.reference_free,
            sft_weight=loss_cfg.sft_weight,
            sft_form=getattr(loss_cfg, "sft_form", "token_mean"),
            token_weights=getattr(loss_cfg, "token_weights", "segments"),
            ld_alpha=getattr(loss_cfg, "ld_alpha", 1.0),
            image_conditional_weight=getattr(loss_cfg, "image_conditional_weight", 0.0),
            anchor_weight=getattr(loss_cfg, "anchor_weight", 0.0),
            tdpo_alpha=getattr(loss_cfg, "tdpo_alpha", 0.0),
        )

    # What the trainer must compute for the extras (all False for plain DDPO: no extra forward).
    @property
    def needs_corrupted_view(self) -> bool:
        """Policy log-probs given corrupted images: TPO's visual weights, mDPO's conditional term."""
        return self.token_weights == "visual" or self.image_conditional_weight > 0

    @property
    def needs_corrupted_reference(self) -> bool:
        """Reference log-probs of the chosen answers given corrupted images (mDPO's conditional term)."""
        return self.image_conditional_weight > 0 and not self.reference_free

    @property
    def needs_kl(self) -> bool:
        """Per-position KL(reference || policy) over the vocabulary (TDPO): a live reference."""
        return self.tdpo_alpha > 0

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, normalize={self.normalize!r}, loss_type={self.loss_type!r}, "
            f"label_smoothing={self.label_smoothing}, reference_free={self.reference_free}, sft_weight={self.sft_weight}, "
            f"sft_form={self.sft_form!r}, token_weights={self.token_weights!r}, ld_alpha={self.ld_alpha}, "
            f"image_conditional_weight={self.image_conditional_weight}, anchor_weight={self.anchor_weight}, "
            f"tdpo_alpha={self.tdpo_alpha}"
        )

    def weights(
        self,
        answer_mask: Tensor,
        corrected_mask: Tensor,
        severity: Tensor | None = None,
        real_logps: Tensor | None = None,
        corrupted_logps: Tensor | None = None,
    ) -> Tensor:
        """Per-token weights [2B, T] from `loss.token_weights`' source (ddpo/token_weights.py)."""
        if self.token_weights == "segments":
            return token_weights(answer_mask, corrected_mask, self.gamma)
        if self.token_weights == "length":
            return length_weights(answer_mask, self.ld_alpha)
        if self.token_weights == "severity":
            if severity is None:
                raise ValueError(
                    "DDPOLoss: loss.token_weights is 'severity' but the batch carries no severity annotations "
                    "(`chosen_severity` / `rejected_severity` in the data, docs/DENSE_METHODS.md); add them or "
                    "use loss.token_weights segments"
                )
            return severity_weights(answer_mask, severity)
        if real_logps is None or corrupted_logps is None:
            raise ValueError(
                "DDPOLoss: loss.token_weights 'visual' needs the policy's log-probs given the real and the "
                "corrupted images (`corrupted=`)"
            )
        return visual_weights(answer_mask, real_logps, corrupted_logps)

    def forward(
        self,
        policy_chosen_token_logps: Tensor,
        policy_rejected_token_logps: Tensor,
        ref_chosen_token_logps: Tensor | None,
        ref_rejected_token_logps: Tensor | None,
        answer_mask: Tensor,
        corrected_mask: Tensor,
        *,
        severity: Tensor | None = None,
        corrupted: tuple[Tensor, Tensor] | None = None,
        ref_corrupted_chosen_token_logps: Tensor | None = None,
        kl: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token log-probs [B, T] (aligned with labels[:, 1:]; reference ones may be None when
        reference_free); masks [2B, T] bool in `PairBatch` row order (chosen rows, then rejected rows):
        `answer_mask` the answer tokens, `corrected_mask` those inside corrected segments.
        Extras, needed only by the settings that use them: `severity` [2B, T] (token_weights 'severity');
        `corrupted` = the policy's (chosen, rejected) token log-probs given corrupted images [B, T] each
        (visual weights, the conditional term: keep the chosen one's graph for the latter);
        `ref_corrupted_chosen_token_logps` [B, T] (the conditional term); `kl` = per-token KL(ref || policy)
        of the (chosen, rejected) rows [B, T] each (tdpo_alpha)."""
        b = policy_chosen_token_logps.shape[0]
        if answer_mask.shape[0] != 2 * b:
            raise ValueError(
                f"DDPOLoss: the masks hold {answer_mask.shape[0]} rows for {b} pairs; pass them in PairBatch "
                "layout, [2B, T]: chosen rows, then rejected rows"
            )
        if self.needs_corrupted_view and corrupted is None:
            raise ValueError(
                "DDPOLoss: loss.token_weights 'visual' and loss.image_conditional_weight need the policy's "
                "log-probs given corrupted images (`corrupted=`)"
            )
        real = corrupted_all = None
        if self.token_weights == "visual":
            real = torch.cat([policy_chosen_token_logps, policy_rejected_token_logps])
            corrupted_all = torch.cat(corrupted)
        weights = self.weights(answer_mask, corrected_mask, severity, real, corrupted_all)
        chosen_weights, rejected_weights = weights[:b], weights[b:]
        policy_chosen = weighted_logps(policy_chosen_token_logps, chosen_weights, self.normalize)
        policy_rejected = weighted_logps(policy_rejected_token_logps, rejected_weights, self.normalize)
        if ref_chosen_token_logps is None or ref_rejected_token_logps is None:
            if not self.reference_free:
                raise ValueError("DDPOLoss: reference token log-probs are None; pass them or set reference_free=True")
            ref_chosen = ref_rejected = None
        else:  # same weights and normalisation as the policy (RLHF-V)
            ref_chosen = weighted_logps(ref_chosen_token_logps, chosen_weights, self.normalize)
            ref_rejected = weighted_logps(ref_rejected_token_logps, rejected_weights, self.normalize)

        kl_offset = kl_chosen = kl_rejected = None
        if self.tdpo_alpha > 0:  # TDPO: sequential KL of each answer, the chosen one's without gradient
            if kl is None:
                raise ValueError("DDPOLoss: loss.tdpo_alpha > 0 needs the per-token KL to the reference (`kl=`)")
            kl_chosen = torch.where(answer_mask[:b], kl[0], torch.zeros_like(kl[0])).sum(dim=1)
            kl_rejected = torch.where(answer_mask[b:], kl[1], torch.zeros_like(kl[1])).sum(dim=1)
            kl_offset = self.tdpo_alpha * (kl_rejected - kl_chosen.detach())
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            self.reference_free,
            kl_offset,
        )
        loss = losses.mean()
        extra_metrics: dict[str, Tensor] = {}

        if self.image_conditional_weight > 0 or self.anchor_weight > 0:
            chosen_margin = policy_chosen - (0 if ref_chosen is None else ref_chosen)  # D(y_w | I)
        if self.image_conditional_weight > 0:  # mDPO: y_w | I preferred to y_w | I'
            corrupted_chosen = weighted_logps(corrupted[0], chosen_weights, self.normalize)
            if self.reference_free:
                ref_corrupted = torch.zeros_like(corrupted_chosen)
            elif ref_corrupted_chosen_token_logps is None:
                raise ValueError(
                    "DDPOLoss: loss.image_conditional_weight > 0 needs the reference's log-probs of the chosen "
                    "answers given corrupted images (`ref_corrupted_chosen_token_logps=`)"
                )
            else:
                ref_corrupted = weighted_logps(ref_corrupted_chosen_token_logps, chosen_weights, self.normalize)
            conditional = -F.logsigmoid(self.beta * (chosen_margin - (corrupted_chosen - ref_corrupted))).mean()
            loss = loss + self.image_conditional_weight * conditional
            extra_metrics["loss/conditional"] = conditional.detach()
        if self.anchor_weight > 0:  # mDPO: the chosen reward above 0
            anchor = -F.logsigmoid(self.beta * chosen_margin).mean()
            loss = loss + self.anchor_weight * anchor
            extra_metrics["loss/anchor"] = anchor.detach()
        if self.sft_weight > 0 and self.sft_form == "released":
            loss = loss - self.sft_weight * policy_chosen.mean()
        elif self.sft_weight > 0:
            answer = answer_mask[:b]
            nll = -torch.where(answer, policy_chosen_token_logps, torch.zeros_like(policy_chosen_token_logps)).sum()
            loss = loss + self.sft_weight * nll / answer.sum().clamp(min=1)

        def mean(t: Tensor | None) -> Tensor:
            return torch.zeros((), device=loss.device) if t is None else t.detach().float().mean()

        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": mean(chosen_rewards),
            "rewards/rejected": mean(rejected_rewards),
            "rewards/accuracies": mean(chosen_rewards > rejected_rewards),
            "rewards/margins": mean(chosen_rewards - rejected_rewards),
            "logps/chosen": mean(policy_chosen),
            "logps/rejected": mean(policy_rejected),
            "logps/ref_chosen": mean(ref_chosen),
            "logps/ref_rejected": mean(ref_rejected),
        }
        if kl_chosen is not None:
            metrics["kl/chosen"], metrics["kl/rejected"] = mean(kl_chosen), mean(kl_rejected)
        if self.token_weights != "segments":
            metrics["weights/mean"] = mean(weights[answer_mask])
        metrics.update(extra_metrics)
        return loss, metrics
