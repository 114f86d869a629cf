"""The DDPO objective: token-weighted sequence log-probs plugged into a DPO-family preference loss.

DDPO (RLHF-V, Eq. 5) scores a response by a weighted mean of its token log-probs, where tokens inside
human-corrected segments weigh gamma > 1 and unchanged tokens weigh 1:

    log pi(y|x) = (1/N) [ sum_{unchanged} log p(y_i) + gamma * sum_{corrected} log p(y_i) ],
    N = |unchanged| + gamma * |corrected|.

The released RLHF-V code drops the 1/N (a weighted sum). Both are `weighted_logps(..., normalize)`.
The data says which answer tokens were corrected (a bool mask from the segment finder, data/segments.py);
`DDPOLoss` turns it into weights with `loss.gamma` (`token_weights`), so changing gamma needs no
re-encoding and no new reference cache. Reference sequence log-probs are rebuilt from per-token
reference log-probs with the same weights and normalisation, as RLHF-V does.

The other dense methods are settings of the same loss, each off by default and each computing its
original's formula (docs/DENSE_METHODS.md gives the formula, the source file and line, and the values):
other weight sources (annotated severity, LD-DPO's tail weight; ddpo/token_weights.py), TPO's visual
scores added to each token log-prob, HSA-DPO's per-answer severity on the log-ratios, TDPO's sequential
KL (TDPO1 or TDPO2) in the margin, the image-conditional comparison with a corrupted image either as
mDPO's separate term or inside the margin as CHiP's cross-modal term, and mDPO's reward anchor.

The settings are one object, `LossConfig` (the `loss:` section of the config, which lives here with the
code that reads it; ddpo/config.py composes it). They are checked once, where they are set
(`LossConfig.validate`: by the config at start-up and by `DDPOLoss.__init__`); the per-batch functions
check only the tensors they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpo.corruption import CORRUPTION_DRAWS, CORRUPTIONS, DIFFUSION_SPACES, DIFFUSION_STEPS
from ddpo.models.config import config_field
from ddpo.token_weights import (
    TOKEN_WEIGHT_SOURCES,
    answer_scores,
    length_weights,
    severity_weights,
    token_weights,
    visual_scores,
)

NORMALIZATIONS = ("mean", "sum")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
SFT_FORMS = ("token_mean", "released")
ANSWER_SEVERITY = ("off", "chosen", "rejected", "both")
TDPO_VARIANTS = ("tdpo1", "tdpo2")


@dataclass
class LossConfig:
    beta: float = config_field(0.5, "DPO temperature beta (RLHF-V paper 0.5, released command 0.1).")
    gamma: float = config_field(
        5.0, "Weight of tokens inside corrected segments; unchanged tokens weigh 1; gamma 1 = vanilla DPO."
    )
    normalize: Literal["mean", "sum"] = config_field(
        "mean", "Sequence log-prob: 'mean' = weighted mean (paper Eq. 5), 'sum' = weighted sum (released RLHF-V code)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = config_field(
        "sigmoid", "Preference loss: sigmoid (DPO), ipo, hinge."
    )
    label_smoothing: float = config_field(0.0, "Conservative DPO epsilon in [0, 0.5) (sigmoid only).")
    reference_free: bool = config_field(
        False, "Ignore the reference model: its log-probs count as 0 in every term, and it is not run."
    )
    sft_weight: float = config_field(
        0.0, "Weight alpha of an SFT term: mean negative token log-prob of the chosen answer (RPO-style mixing)."
    )
    sft_form: Literal["token_mean", "released"] = config_field(
        "token_mean",
        "SFT term: 'token_mean' = unweighted mean NLL per chosen answer token in the batch; 'released' = minus "
        "the chosen answer's weighted sequence log-prob (gamma weights, loss.normalize), averaged over pairs, "
        "as the released RLHF-V code (SFT_weight env).",
    )
    # The dense methods (docs/DENSE_METHODS.md): one weight source, and extra terms that are off by default.
    token_weights: Literal["segments", "severity", "length"] = config_field(
        "segments",
        "Where token weights come from: 'segments' = gamma on corrected segments (DDPO); 'severity' = the "
        "data's annotated severity weight on each annotated token (OPA-DPO style; loss.gamma must be 1); "
        "'length' = LD-DPO: the longer answer's tail weighs loss.ld_alpha.",
    )
    ld_alpha: float = config_field(
        1.0, "LD-DPO: weight in [0, 1] of the answer tokens past the shorter answer's length (token_weights 'length')."
    )
    ld_alpha_reference: bool = config_field(
        False,
        "LD-DPO: also weigh the reference's tail by loss.ld_alpha; false = the policy's only, as TRL's ld_alpha "
        "(the one public implementation).",
    )
    answer_severity: Literal["off", "chosen", "rejected", "both"] = config_field(
        "off",
        "HSA-DPO: which answers' log-ratios are multiplied by their severity score (the largest annotated "
        "severity on the answer, 1 if none); HSA-DPO's default is 'rejected'.",
    )
    tpo_score: bool = config_field(
        False,
        "TPO: add log s_t to each answer token's log-prob, s_t = sigmoid(z - z') + 0.5 (chosen) or "
        "1.5 - sigmoid(z - z') (rejected), z / z' the token's raw logit given the real / the corrupted image "
        "(loss.corruption); policy and reference each use their own; with gradient. Needs train.reference live.",
    )
    image_conditional_weight: float = config_field(
        0.0,
        "Weight of the image-conditional comparison D(y_w|I) - D(y_w|I'), the chosen answer given the real "
        "image against the corrupted one (loss.corruption); 0 = off. One extra policy forward per step.",
    )
    image_conditional_in_margin: bool = config_field(
        False,
        "Where the image-conditional comparison goes: false = mDPO's separate term -log sigmoid(beta [...]); "
        "true = CHiP's cross-modal term, added inside the main DPO margin.",
    )
    chip_released_reference: bool = config_field(
        False,
        "CHiP's released code: the reference's log-prob of the chosen answer given the corrupted image is its "
        "unweighted sum times the sum of the answer's token weights (a broadcasting slip at batch size 1); "
        "false = token-weighted like every other log-prob (the paper's formula).",
    )
    anchor_weight: float = config_field(
        0.0, "mDPO's reward anchor -log sigmoid(beta * chosen log-ratio); its weight, 0 = off."
    )
    tdpo_alpha: float = config_field(
        0.0,
        "TDPO's sequential-KL weight inside the margin; 0 = off. Needs train.reference live (the full "
        "reference distribution at each answer position).",
    )
    tdpo_variant: Literal["tdpo1", "tdpo2"] = config_field(
        "tdpo1",
        "TDPO1: margin - (KL_rejected - KL_chosen), both with gradient, loss.tdpo_alpha 1 (TDPO's default "
        "config); TDPO2: margin - alpha (KL_rejected - sg(KL_chosen)) (TDPO's README, CHiP).",
    )
    corruption: Literal["mask_tokens", "mask_patches", "noise", "diffusion", "crop"] = config_field(
        "noise",
        "Corrupted image of the image-conditional comparison and TPO's scores (ddpo/corruption.py): "
        "mask_tokens / mask_patches (a share loss.corruption_strength masked), noise (sqrt(1-s) x + sqrt(s) "
        "eps), diffusion (CHiP / TPO: step loss.diffusion_step of their 1000-step schedule), crop (mDPO).",
    )
    corruption_strength: float = config_field(
        0.5, "mask_tokens / mask_patches: share masked; noise: the noise level s. In (0, 1]."
    )
    diffusion_step: int = config_field(
        500, "corruption 'diffusion': the step t in [0, 999] of the schedule (CHiP and TPO use 500)."
    )
    diffusion_space: Literal["normalized", "pixels"] = config_field(
        "normalized",
        "corruption 'diffusion': noise the normalised image (CHiP) or the [0, 1] pixels, clamped (TPO).",
    )
    crop_min_area: float = config_field(0.01, "corruption 'crop': smallest share of the image kept (mDPO 0.01).")
    crop_max_area: float = config_field(0.2, "corruption 'crop': largest share of the image kept (mDPO 0.2).")
    corruption_draw: Literal["pair", "step", "forward"] = config_field(
        "pair",
        "How often a pair's corrupted image is redrawn: 'pair' = once (cacheable reference), 'step' = every "
        "optimizer step, policy and reference sharing it (CHiP, TPO), 'forward' = every forward, policy and "
        "reference drawing their own (mDPO). 'step' / 'forward' need train.reference live.",
    )
    corruption_seed: int = config_field(
        0,
        "Seed of the corruptions (each pair: this seed, its source row and the draw), so a pair's corrupted "
        "views are the same on a rerun and after a resume.",
    )

    def validate(self) -> None:
        """The one check of the loss settings: a ValueError whose message names the `loss.<key>` and the fix."""
        for ok, message in self._objective_checks() + self._method_checks():
            if not ok:
                raise ValueError(message)

    def _objective_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.beta > 0, f"loss.beta must be > 0, got {self.beta}"),
            (
                self.gamma >= 1,
                f"loss.gamma must be >= 1 (1 = vanilla DPO; corrected tokens weigh gamma), got {self.gamma}",
            ),
            (
                self.normalize in NORMALIZATIONS,
                f"loss.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}",
            ),
            (self.loss_type in LOSS_TYPES, f"loss.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"),
            (
                0 <= self.label_smoothing < 0.5,
                f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
            ),
            (
                self.label_smoothing == 0 or self.loss_type == "sigmoid",
                f"loss.label_smoothing is only defined for loss.loss_type 'sigmoid', got {self.loss_type!r}",
            ),
            (self.sft_weight >= 0, f"loss.sft_weight must be >= 0, got {self.sft_weight}"),
            (self.sft_form in SFT_FORMS, f"loss.sft_form must be one of {SFT_FORMS}, got {self.sft_form!r}"),
            (
                self.token_weights in TOKEN_WEIGHT_SOURCES,
                f"loss.token_weights must be one of {TOKEN_WEIGHT_SOURCES}, got {self.token_weights!r}",
            ),
            (
                self.gamma == 1 or self.token_weights == "segments",
                f"loss.gamma {self.gamma} weighs corrected segments, but loss.token_weights is "
                f"{self.token_weights!r}: set loss.gamma 1 or loss.token_weights segments "
                "(one weight source at a time)",
            ),
            (
                0 <= self.ld_alpha <= 1,
                f"loss.ld_alpha must be in [0, 1] (LD-DPO's weight of the longer answer's tail), got {self.ld_alpha}",
            ),
            (
                (self.ld_alpha == 1 and not self.ld_alpha_reference) or self.token_weights == "length",
                f"loss.ld_alpha {self.ld_alpha} / loss.ld_alpha_reference {self.ld_alpha_reference} only act with "
                f"loss.token_weights 'length' (it is {self.token_weights!r}): set one or drop the other",
            ),
            (
                self.answer_severity in ANSWER_SEVERITY,
                f"loss.answer_severity must be one of {ANSWER_SEVERITY}, got {self.answer_severity!r}",
            ),
        ]

    def _method_checks(self) -> list[tuple[bool, str]]:
        return [
            (
                self.image_conditional_weight >= 0,
                f"loss.image_conditional_weight must be >= 0 (0 = off), got {self.image_conditional_weight}",
            ),
            (
                self.image_conditional_weight > 0 or not self.image_conditional_in_margin,
                "loss.image_conditional_in_margin places the image-conditional comparison, which is off "
                "(loss.image_conditional_weight 0): set loss.image_conditional_weight > 0 (CHiP: 1) or drop it",
            ),
            (
                not self.chip_released_reference or (self.image_conditional_in_margin and self.normalize == "sum"),
                "loss.chip_released_reference reproduces CHiP's summed cross-modal term: set "
                "loss.image_conditional_in_margin true and loss.normalize sum, or drop it",
            ),
            (self.anchor_weight >= 0, f"loss.anchor_weight must be >= 0 (0 = off), got {self.anchor_weight}"),
            (self.tdpo_alpha >= 0, f"loss.tdpo_alpha must be >= 0 (0 = off), got {self.tdpo_alpha}"),
            (
                self.tdpo_variant in TDPO_VARIANTS,
                f"loss.tdpo_variant must be one of {TDPO_VARIANTS}, got {self.tdpo_variant!r}",
            ),
            (
                self.tdpo_variant == "tdpo2" or self.tdpo_alpha in (0, 1),
                f"loss.tdpo_alpha {self.tdpo_alpha} with loss.tdpo_variant tdpo1: TDPO1 has no alpha (its KL "
                "difference weighs 1): set loss.tdpo_alpha 1 (or 0 = off), or loss.tdpo_variant tdpo2",
            ),
            (
                self.corruption in CORRUPTIONS,
                f"loss.corruption must be one of {CORRUPTIONS}, got {self.corruption!r}",
            ),
            (
                0 < self.corruption_strength <= 1,
                f"loss.corruption_strength must be in (0, 1], got {self.corruption_strength}",
            ),
            (
                0 <= self.diffusion_step < DIFFUSION_STEPS,
                f"loss.diffusion_step must be in [0, {DIFFUSION_STEPS - 1}], got {self.diffusion_step}",
            ),
            (
                self.diffusion_space in DIFFUSION_SPACES,
                f"loss.diffusion_space must be one of {DIFFUSION_SPACES}, got {self.diffusion_space!r}",
            ),
            (
                0 < self.crop_min_area <= self.crop_max_area <= 1,
                f"loss.crop_min_area and loss.crop_max_area must satisfy 0 < min <= max <= 1, got "
                f"{self.crop_min_area} and {self.crop_max_area}",
            ),
            (
                self.corruption_draw in CORRUPTION_DRAWS,
                f"loss.corruption_draw must be one of {CORRUPTION_DRAWS}, got {self.corruption_draw!r}",
            ),
        ]


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


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    settings: LossConfig,
    margin_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probs, all [B] -> (losses, chosen_rewards, rejected_rewards).

    Reads settings.beta, loss_type, label_smoothing (eps) and reference_free.
    h = (pi_c - pi_r) - (ref_c - ref_r) - margin_offset, with the reference part 0 when `reference_free`
    (then the ref arguments may be None) and margin_offset [B] 0 when None (TDPO puts its KL term there).
      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps = label_smoothing; DPO at 0)
      ipo:     (h - 1 / (2 beta))^2
      hinge:   max(0, 1 - beta h)
    Rewards are beta * (policy - ref), detached, with ref taken as 0 when reference_free, so that
    "chosen reward > rejected reward" means the same thing the loss optimises. The settings are
    checked once by `LossConfig.validate` (config load, `DDPOLoss`), not on every call.
    """
    beta, loss_type, label_smoothing = settings.beta, settings.loss_type, settings.label_smoothing
    if settings.reference_free:
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


# ------------------------------------------------------------------------------------------------
# The dense methods' pieces (docs/DENSE_METHODS.md). D(y|I) = weighted policy log-prob minus weighted
# reference log-prob of answer y given image I, [B] (reference part 0 when reference_free).
# ------------------------------------------------------------------------------------------------
def sequence_kl(kl: tuple[Tensor, Tensor], answer_mask: Tensor) -> tuple[Tensor, Tensor]:
    """TDPO's sequential KL of each answer: per-token KL(ref || policy) of the (chosen, rejected) rows
    [B, T] each, summed over the answer tokens of `answer_mask` [2B, T] -> ([B], [B])."""
    b = kl[0].shape[0]
    kl_chosen = torch.where(answer_mask[:b], kl[0], torch.zeros_like(kl[0])).sum(dim=1)
    kl_rejected = torch.where(answer_mask[b:], kl[1], torch.zeros_like(kl[1])).sum(dim=1)
    return kl_chosen, kl_rejected


def tdpo_offset(kl_chosen: Tensor, kl_rejected: Tensor, alpha: float, variant: str = "tdpo2") -> Tensor:
    """TDPO's margin offset [B] (subtracted from the margin): TDPO2 alpha (KL_rejected - sg(KL_chosen)), the
    chosen answer's KL carrying no gradient; TDPO1 (KL_rejected - KL_chosen), both with gradient (alpha is
    1 there; `LossConfig.validate` allows no other)."""
    if variant == "tdpo1":
        return alpha * (kl_rejected - kl_chosen)
    return alpha * (kl_rejected - kl_chosen.detach())


def severity_offset(chosen_margin: Tensor, rejected_margin: Tensor, scores: Tensor, which: str) -> Tensor:
    """HSA-DPO's severity scaling as a margin offset [B]: its logit s_c D_c - s_r D_r equals the DPO margin
    D_c - D_r minus (1 - s_c) D_c - (1 - s_r) D_r, with s = `scores` [2B] (chosen rows first) on the answers
    `which` names ('chosen', 'rejected', 'both') and 1 on the others. Kept as an offset so that the logged
    rewards stay beta (pi - ref), as HSA-DPO logs them."""
    b = chosen_margin.shape[0]
    ones = torch.ones_like(chosen_margin)
    s_chosen = scores[:b].to(chosen_margin.dtype) if which in ("chosen", "both") else ones
    s_rejected = scores[b:].to(rejected_margin.dtype) if which in ("rejected", "both") else ones
    return (1 - s_chosen) * chosen_margin - (1 - s_rejected) * rejected_margin


def conditional_term(chosen_margin: Tensor, corrupted_margin: Tensor, beta: float) -> Tensor:
    """mDPO's conditional preference, the chosen answer given the real image over the same answer given a
    corrupted one: mean of -log sigma(beta [D(y_w|I) - D(y_w|I')]), from D(y_w|I), D(y_w|I') [B]."""
    return -F.logsigmoid(beta * (chosen_margin - corrupted_margin)).mean()


def anchor_term(chosen_margin: Tensor, beta: float) -> Tensor:
    """mDPO's reward anchor: mean of -log sigma(beta D(y_w|I)), keeping the chosen reward above 0."""
    return -F.logsigmoid(beta * chosen_margin).mean()


def sft_term(chosen_logps: Tensor, chosen_token_logps: Tensor, chosen_answer: Tensor, settings: LossConfig) -> Tensor:
    """settings.sft_weight x the SFT term (settings.sft_form), the value to add to the loss.
    'token_mean': the mean negative log-prob of all chosen answer tokens (`chosen_answer` [B, T]) in the
    batch, unweighted; 'released' (the released RLHF-V code): minus the mean over pairs of the chosen
    answers' weighted sequence log-probs `chosen_logps` [B]."""
    if settings.sft_form == "released":
        return -(settings.sft_weight * chosen_logps.mean())
    nll = -torch.where(chosen_answer, chosen_token_logps, torch.zeros_like(chosen_token_logps)).sum()
    return settings.sft_weight * nll / chosen_answer.sum().clamp(min=1)


class SequenceLogps(NamedTuple):
    """Weighted sequence log-probs of a batch of pairs, [B] each; the reference ones are None when the
    loss is reference_free."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None

    def margins(self) -> tuple[Tensor, Tensor]:
        """(D(y_w), D(y_l)) [B] each: policy minus reference, the reference part 0 when it is None."""
        ref_chosen = 0 if self.ref_chosen is None else self.ref_chosen
        ref_rejected = 0 if self.ref_rejected is None else self.ref_rejected
        return self.chosen - ref_chosen, self.rejected - ref_rejected


def pair_metrics(
    loss: Tensor,
    logps: SequenceLogps,
    rewards: tuple[Tensor, Tensor],
    kl: tuple[Tensor, Tensor] | None = None,
    answer_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """The logged metrics: detached 0-d batch means, so that a trainer can all-reduce them before logging.
    `rewards` = (chosen, rejected) [B]; `kl` = TDPO's sequence KLs (chosen, rejected) [B], when on;
    `answer_weights` = the token weights of the answer tokens, when they are not DDPO's segments x gamma."""

    def mean(t: Tensor | None) -> Tensor:
        return torch.zeros((), device=loss.device) if t is None else t.detach().float().mean()

    chosen_rewards, rejected_rewards = rewards
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean(chosen_rewards > rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(logps.chosen),
        "logps/rejected": mean(logps.rejected),
        "logps/ref_chosen": mean(logps.ref_chosen),
        "logps/ref_rejected": mean(logps.ref_rejected),
    }
    if kl is not None:
        metrics["kl/chosen"], metrics["kl/rejected"] = mean(kl[0]), mean(kl[1])
    if answer_weights is not None:
        metrics["weights/mean"] = mean(answer_weights)
    return metrics


def margin_split(
    tokens: tuple[Tensor, Tensor],
    ref_tokens: tuple[Tensor, Tensor] | None,
    weights: tuple[Tensor, Tensor],
    corrected_mask: Tensor,
    settings: LossConfig,
) -> dict[str, Tensor]:
    """rewards/margins split into the corrected-segment tokens' share and the other answer tokens' share
    (detached batch means; `DDPOLoss` says the definition). `tokens` / `ref_tokens` = the (chosen, rejected)
    token log-probs [B, T] the loss weighed (ref None when reference_free: its share is 0), `weights` = the
    (policy, reference) weights [2B, T], `corrected_mask` [2B, T] in PairBatch row order."""
    b = tokens[0].shape[0]

    def share(token_logps: Tensor, w: Tensor, keep: Tensor) -> Tensor:
        """The part of `weighted_logps(token_logps, w)` [B] that the tokens of `keep` contribute, in float64: each
        share is exact, so corrected + unchanged differs from rewards/margins by the margin's own float32
        rounding only."""
        token_logps, w = token_logps.double(), w.double()
        inside = (w > 0) & keep
        total = torch.where(inside, w * token_logps, torch.zeros_like(token_logps)).sum(dim=1)
        return total if settings.normalize == "sum" else total / w.sum(dim=1)

    split = {}
    with torch.no_grad():
        for name, keep in (("corrected", corrected_mask), ("unchanged", ~corrected_mask)):
            chosen = share(tokens[0], weights[0][:b], keep[:b])
            rejected = share(tokens[1], weights[0][b:], keep[b:])
            if ref_tokens is not None:
                chosen = chosen - share(ref_tokens[0], weights[1][:b], keep[:b])
                rejected = rejected - share(ref_tokens[1], weights[1][b:], keep[b:])
            split[f"rewards/margins_{name}"] = (settings.beta * (chosen - rejected)).float().mean()
    return split


@dataclass
class LossExtras:
    """The dense methods' per-batch inputs, each read only by the setting that uses it (`DDPOLoss.needs_*`
    say which; the trainer computes only those), in `PairBatch` row order:
      severity                          [2B, T] annotated weight per token, 0 = none (token_weights
                                        'severity', answer_severity)
      corrupted                         the policy's (chosen, rejected) token log-probs given corrupted images,
                                        [B, T] each, with gradient (the image-conditional comparison)
      ref_corrupted_chosen_token_logps  [B, T] the reference's, chosen answers only
      kl                                per-token KL(ref || policy) of the (chosen, rejected) rows, [B, T]
                                        each (tdpo_alpha)
      visual_logits                     the policy's raw logit of each answer token given the real and the
                                        corrupted image, ([2B, T], [2B, T]), with gradient (tpo_score)
      ref_visual_logits                 the reference's, the same layout
    """

    severity: Tensor | None = None
    corrupted: tuple[Tensor, Tensor] | None = None
    ref_corrupted_chosen_token_logps: Tensor | None = None
    kl: tuple[Tensor, Tensor] | None = None
    visual_logits: tuple[Tensor, Tensor] | None = None
    ref_visual_logits: tuple[Tensor, Tensor] | None = None


class DDPOLoss(nn.Module):
    """Token log-probs + masks of a batch of pairs -> (scalar loss, metrics), torchtune style.

    The main term: dpo_loss on weighted sequence log-probs, the weights from one source
    (`token_weights`: segments x gamma, annotated severity, LD-DPO's tail weight; ddpo/token_weights.py),
    the same weights and normalisation for policy and reference (LD-DPO: see `ld_alpha_reference`). Each
    dense method is a setting, off by default and costing nothing then (docs/DENSE_METHODS.md):
      tpo_score                 TPO: log s_t added to each token log-prob before the weighted sum
      answer_severity           HSA-DPO: h = s_c D(y_w) - s_r D(y_l) with per-answer severity scores
      tdpo_alpha, tdpo_variant  TDPO's sequential KL in the margin, KL = sum over answer tokens of
                                KL(ref || policy) at each position
      image_conditional_weight  D(y_w|I) - D(y_w|I'), the chosen answer given the real image over the same
                                answer given a corrupted one: mDPO's separate -log sigma(beta [...]) or, with
                                image_conditional_in_margin, CHiP's cross-modal term inside the margin
      anchor_weight             mDPO's reward anchor: -log sigma(beta D(y_w|I)) (chosen reward above 0)
      sft_weight                an SFT term (`sft_form`) 'token_mean': the mean negative log-prob of all chosen
                                answer tokens in the batch, unweighted; or 'released' (the released RLHF-V code):
                                minus the mean over pairs of the chosen answers' weighted sequence log-probs
    With reference_free the reference part is 0 in every term, whatever reference log-probs are passed.
    Metrics are detached 0-d tensors (batch means) so that a trainer can all-reduce them before logging.
    Beside TRL's names, `rewards/margins_corrected` and `rewards/margins_unchanged` split rewards/margins
    by token (`margin_split`): each is beta x [(pi_C(y_w) - ref_C(y_w)) - (pi_C(y_l) - ref_C(y_l))] with
    pi_C(y) = sum over the answer tokens of the set C of w_t log p(y_t) / N, the same weights w_t and the same
    N as the sequence log-prob (N = sum of all the answer's weights for 'mean', 1 for 'sum'; the reference
    with its own weights), C = the tokens inside corrected segments or the others. The two add up to
    rewards/margins (to float32 rounding): whether the policy moved the corrections or everything.
    """

    def __init__(self, settings: LossConfig):
        super().__init__()
        settings.validate()
        self.settings = settings

    # What the trainer must compute (all False for plain DDPO: no extra forward).
    @property
    def needs_reference(self) -> bool:
        """Reference log-probs at all (not with reference_free: the trainer skips the reference forward)."""
        return not self.settings.reference_free

    @property
    def needs_corrupted_view(self) -> bool:
        """A policy forward over corrupted images (with gradient): the image-conditional comparison, TPO."""
        return self.settings.tpo_score or self.settings.image_conditional_weight > 0

    @property
    def needs_corrupted_reference(self) -> bool:
        """The reference's forward over corrupted images (chosen answers' log-probs; TPO: its logits)."""
        return self.needs_corrupted_view and self.needs_reference

    @property
    def needs_kl(self) -> bool:
        """Per-position KL(reference || policy) over the vocabulary (TDPO): a live reference."""
        return self.settings.tdpo_alpha > 0

    @property
    def needs_visual_logits(self) -> bool:
        """Raw logits of the answer tokens given the real and the corrupted images (TPO), policy and reference."""
        return self.settings.tpo_score

    @property
    def needs_severity(self) -> bool:
        """The batch's severity annotations (token weights or HSA-DPO's per-answer scores)."""
        return self.settings.token_weights == "severity" or self.settings.answer_severity != "off"

    def extra_repr(self) -> str:
        return repr(self.settings)

    def weights(self, answer_mask: Tensor, corrected_mask: Tensor, severity: Tensor | None = None) -> Tensor:
        """The policy's per-token weights [2B, T] from `loss.token_weights`' source (ddpo/token_weights.py)."""
        source = self.settings.token_weights
        if source == "segments":
            return token_weights(answer_mask, corrected_mask, self.settings.gamma)
        if source == "length":
            return length_weights(answer_mask, self.settings.ld_alpha)
        if severity is None:
            raise ValueError(
                "DDPOLoss: loss.token_weights is 'severity' but the batch carries no severity annotations "
                "(`chosen_severity` / `rejected_severity` in the data, docs/DENSE_METHODS.md); add them or "
                "use loss.token_weights segments"
            )
        return severity_weights(answer_mask, severity)

    def reference_weights(self, answer_mask: Tensor, weights: Tensor) -> Tensor:
        """The reference's weights: the policy's, except LD-DPO's tail weight, which TRL applies to the
        policy only (the reference's tail weighs 1) unless `ld_alpha_reference`."""
        if self.settings.token_weights == "length" and not self.settings.ld_alpha_reference:
            return answer_mask.to(weights.dtype)
        return weights

    def forward(
        self,
        policy_chosen_token_logps: Tensor,
        policy_rejected_token_logps: Tensor,
        ref_chosen_token_logps: Tensor | None,
        ref_rejected_token_logps: Tensor | None,
        answer_mask: Tensor,
        corrected_mask: Tensor,
        extras: LossExtras | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token log-probs [B, T] (aligned with labels[:, 1:]; reference ones may be None when
        reference_free, and are ignored then); masks [2B, T] bool in `PairBatch` row order (chosen rows,
        then rejected rows): `answer_mask` the answer tokens, `corrected_mask` those inside corrected
        segments. `extras`: the inputs only some settings need (`LossExtras`)."""
        s, extras = self.settings, LossExtras() if extras is None else extras
        b = policy_chosen_token_logps.shape[0]
        self._check_inputs(b, answer_mask, extras)
        tokens = (policy_chosen_token_logps, policy_rejected_token_logps)
        ref_tokens = None if s.reference_free else (ref_chosen_token_logps, ref_rejected_token_logps)
        if ref_tokens is not None and (ref_tokens[0] is None or ref_tokens[1] is None):
            raise ValueError("DDPOLoss: reference token log-probs are None; pass them or set reference_free=True")
        if s.tpo_score:
            tokens, ref_tokens = self._visual_scored(tokens, ref_tokens, answer_mask, extras)
        weights = self.weights(answer_mask, corrected_mask, extras.severity)
        ref_weights = self.reference_weights(answer_mask, weights)
        logps = SequenceLogps(
            weighted_logps(tokens[0], weights[:b], s.normalize),
            weighted_logps(tokens[1], weights[b:], s.normalize),
            *(
                (None, None)
                if ref_tokens is None
                else (
                    weighted_logps(ref_tokens[0], ref_weights[:b], s.normalize),
                    weighted_logps(ref_tokens[1], ref_weights[b:], s.normalize),
                )
            ),
        )
        chosen_margin = logps.margins()[0]  # D(y_w | I)
        corrupted_margin = None  # D(y_w | I')
        if s.image_conditional_weight > 0:
            corrupted_margin = self._corrupted_margin(weights[:b], ref_weights[:b], answer_mask[:b], extras)
        offset, kl, extra_metrics = self._margin_offset(logps, answer_mask, extras, corrupted_margin)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, s, offset)
        loss = losses.mean()
        if s.image_conditional_weight > 0 and not s.image_conditional_in_margin:
            conditional = conditional_term(chosen_margin, corrupted_margin, s.beta)
            loss = loss + s.image_conditional_weight * conditional
            extra_metrics["loss/conditional"] = conditional.detach()
        if s.anchor_weight > 0:
            anchor = anchor_term(chosen_margin, s.beta)
            loss = loss + s.anchor_weight * anchor
            extra_metrics["loss/anchor"] = anchor.detach()
        if s.sft_weight > 0:
            loss = loss + sft_term(logps.chosen, policy_chosen_token_logps, answer_mask[:b], s)
        answer_weights = None if s.token_weights == "segments" else weights[answer_mask]
        metrics = pair_metrics(loss, logps, (chosen_rewards, rejected_rewards), kl, answer_weights)
        metrics.update(margin_split(tokens, ref_tokens, (weights, ref_weights), corrected_mask, s))
        metrics.update(extra_metrics)
        return loss, metrics

    def _check_inputs(self, b: int, answer_mask: Tensor, extras: LossExtras) -> None:
        """The batch layout, and the extras the settings need (the ones read inside a term are checked there)."""
        if answer_mask.shape[0] != 2 * b:
            raise ValueError(
                f"DDPOLoss: the masks hold {answer_mask.shape[0]} rows for {b} pairs; pass them in PairBatch "
                "layout, [2B, T]: chosen rows, then rejected rows"
            )
        missing = [
            (
                self.settings.image_conditional_weight > 0 and extras.corrupted is None,
                "loss.image_conditional_weight",
                "the policy's log-probs given corrupted images (`LossExtras.corrupted`)",
            ),
            (
                self.needs_kl and extras.kl is None,
                "loss.tdpo_alpha",
                "the per-token KL to the reference (`LossExtras.kl`)",
            ),
            (
                self.needs_visual_logits and extras.visual_logits is None,
                "loss.tpo_score",
                "the policy's answer-token logits given the real and the corrupted images (`LossExtras.visual_logits`)",
            ),
            (
                self.settings.answer_severity != "off" and extras.severity is None,
                "loss.answer_severity",
                "the batch's severity annotations (`chosen_severity` / `rejected_severity` in the data)",
            ),
        ]
        for absent, key, what in missing:
            if absent:
                raise ValueError(f"DDPOLoss: {key} needs {what}; compute it or turn {key} off")

    def _visual_scored(
        self,
        tokens: tuple[Tensor, Tensor],
        ref_tokens: tuple[Tensor, Tensor] | None,
        answer_mask: Tensor,
        extras: LossExtras,
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """TPO: each answer token's log-prob plus log s_t, the policy's with its own scores (with gradient),
        the reference's with the reference's scores."""
        b = tokens[0].shape[0]
        log_s = visual_scores(answer_mask, *extras.visual_logits).log()
        tokens = (tokens[0] + log_s[:b], tokens[1] + log_s[b:])
        if ref_tokens is None:
            return tokens, None
        if extras.ref_visual_logits is None:
            raise ValueError(
                "DDPOLoss: loss.tpo_score needs the reference's answer-token logits given the real and the "
                "corrupted images (`LossExtras.ref_visual_logits`): set train.reference live, or loss.reference_free"
            )
        ref_log_s = visual_scores(answer_mask, *extras.ref_visual_logits).detach().log()
        return tokens, (ref_tokens[0] + ref_log_s[:b], ref_tokens[1] + ref_log_s[b:])

    def _margin_offset(
        self, logps: SequenceLogps, answer_mask: Tensor, extras: LossExtras, corrupted_margin: Tensor | None
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None, dict[str, Tensor]]:
        """What the settings subtract from the DPO margin [B] (None if nothing), TDPO's sequence KLs, metrics."""
        s = self.settings
        parts, kl, metrics = [], None, {}
        chosen_margin, rejected_margin = logps.margins()
        if s.tdpo_alpha > 0:
            kl = sequence_kl(extras.kl, answer_mask)
            parts.append(tdpo_offset(*kl, s.tdpo_alpha, s.tdpo_variant))
        if s.answer_severity != "off":
            scores = answer_scores(answer_mask, extras.severity)
            parts.append(severity_offset(chosen_margin, rejected_margin, scores, s.answer_severity))
            metrics["severity/rejected"] = scores[chosen_margin.shape[0] :].detach().float().mean()
        if s.image_conditional_in_margin:  # CHiP: + w [D(y_w|I) - D(y_w|I')] inside the margin
            cross = chosen_margin - corrupted_margin
            parts.append(-s.image_conditional_weight * cross)
            metrics["margin/cross_modal"] = cross.detach().float().mean()
        return (sum(parts[1:], parts[0]) if parts else None), kl, metrics

    def _corrupted_margin(
        self, chosen_weights: Tensor, ref_chosen_weights: Tensor, chosen_answer: Tensor, extras: LossExtras
    ) -> Tensor:
        """D(y_w | I') [B]: the chosen answers given the corrupted images, reference part 0 when reference_free.
        With `chip_released_reference`, the reference's part is CHiP's released form: its unweighted sum over
        the answer times the sum of the answer's weights."""
        s = self.settings
        corrupted_chosen = weighted_logps(extras.corrupted[0], chosen_weights, s.normalize)
        if s.reference_free:
            return corrupted_chosen
        ref_tokens = extras.ref_corrupted_chosen_token_logps
        if ref_tokens is None:
            raise ValueError(
                "DDPOLoss: loss.image_conditional_weight > 0 needs the reference's log-probs of the chosen "
                "answers given corrupted images (`LossExtras.ref_corrupted_chosen_token_logps`)"
            )
        if s.chip_released_reference:
            unweighted = weighted_logps(ref_tokens, chosen_answer.to(ref_chosen_weights.dtype), "sum")
            return corrupted_chosen - unweighted * ref_chosen_weights.sum(dim=1)
        return corrupted_chosen - weighted_logps(ref_tokens, ref_chosen_weights, s.normalize)
