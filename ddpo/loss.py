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
preference and anchor, TDPO's sequential KL) are settings of the loss, off by default, each a small
function below (docs/DENSE_METHODS.md). Reference sequence log-probs are rebuilt from per-token
reference log-probs with the same weights and normalisation, as RLHF-V does.

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

from ddpo.corruption import CORRUPTIONS
from ddpo.models.config import config_field
from ddpo.token_weights import TOKEN_WEIGHT_SOURCES, length_weights, severity_weights, token_weights, visual_weights

NORMALIZATIONS = ("mean", "sum")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
SFT_FORMS = ("token_mean", "released")


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
    reference_free: bool = config_field(False, "Ignore the reference model (its log-ratio is taken as 0).")
    sft_weight: float = config_field(
        0.0, "Weight alpha of an SFT term: mean negative token log-prob of the chosen answer (RPO-style mixing)."
    )
    sft_form: Literal["token_mean", "released"] = config_field(
        "token_mean",
        "SFT term: 'token_mean' = unweighted mean NLL per chosen answer token in the batch; 'released' = minus "
        "the chosen answer's weighted sequence log-prob (gamma weights, loss.normalize), averaged over pairs, "
        "as the released RLHF-V code (SFT_weight env).",
    )
    # The dense methods (docs/DENSE_METHODS.md): one weight source, and extra terms that are off at 0.
    token_weights: Literal["segments", "severity", "visual", "length"] = config_field(
        "segments",
        "Where token weights come from: 'segments' = gamma on corrected segments (DDPO); 'severity' = the "
        "data's annotated severity weights (HSA-DPO/OPA-DPO style; loss.gamma must be 1); 'visual' = TPO's "
        "self-calibrated weights from the policy's log-prob gap between the real and the corrupted image "
        "(loss.corruption); 'length' = LD-DPO: the longer answer's tail weighs loss.ld_alpha.",
    )
    ld_alpha: float = config_field(
        1.0, "LD-DPO: weight in [0, 1] of the answer tokens past the shorter answer's length (token_weights 'length')."
    )
    image_conditional_weight: float = config_field(
        0.0,
        "mDPO's conditional preference term (chosen answer given the real image preferred to it given the "
        "corrupted image, loss.corruption); its weight, 0 = off. One extra policy forward per step.",
    )
    anchor_weight: float = config_field(
        0.0, "mDPO's reward anchor -log sigmoid(beta * chosen log-ratio); its weight, 0 = off."
    )
    tdpo_alpha: float = config_field(
        0.0,
        "TDPO's sequential-KL weight alpha inside the margin (CHiP uses it); 0 = off. Needs train.reference "
        "live (the full reference distribution at each answer position).",
    )
    corruption: Literal["mask_tokens", "mask_patches", "noise"] = config_field(
        "noise",
        "Corrupted image of the conditional term and the visual weights: mask_tokens (zero a share of the "
        "image tokens' features), mask_patches (blank a share of the pixel grid cells), noise (forward "
        "diffusion at level loss.corruption_strength). Seeded per pair.",
    )
    corruption_strength: float = config_field(
        0.5,
        "Share of image tokens / grid cells masked, or the diffusion noise level s "
        "(sqrt(1-s) x + sqrt(s) eps); in (0, 1].",
    )
    corruption_seed: int = config_field(
        0,
        "Seed of the corruptions (each pair: this seed and its source row), so a pair's corrupted view is "
        "the same in every epoch and in the reference cache.",
    )

    def validate(self) -> None:
        """The one check of the loss settings: a ValueError whose message names the `loss.<key>` and the fix."""
        checks = [
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
                self.ld_alpha == 1 or self.token_weights == "length",
                f"loss.ld_alpha {self.ld_alpha} only acts with loss.token_weights 'length' (it is "
                f"{self.token_weights!r}): set one or drop the other",
            ),
            (
                self.image_conditional_weight >= 0,
                f"loss.image_conditional_weight must be >= 0 (0 = off), got {self.image_conditional_weight}",
            ),
            (self.anchor_weight >= 0, f"loss.anchor_weight must be >= 0 (0 = off), got {self.anchor_weight}"),
            (self.tdpo_alpha >= 0, f"loss.tdpo_alpha must be >= 0 (0 = off), got {self.tdpo_alpha}"),
            (
                self.corruption in CORRUPTIONS,
                f"loss.corruption must be one of {CORRUPTIONS}, got {self.corruption!r}",
            ),
            (
                0 < self.corruption_strength <= 1,
                f"loss.corruption_strength must be in (0, 1], got {self.corruption_strength}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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
# The extra terms, each off at weight 0 (docs/DENSE_METHODS.md). D(y|I) = weighted policy log-prob minus
# weighted reference log-prob of answer y given image I, [B].
# ------------------------------------------------------------------------------------------------
def sequence_kl(kl: tuple[Tensor, Tensor], answer_mask: Tensor) -> tuple[Tensor, Tensor]:
    """TDPO's sequential KL of each answer: per-token KL(ref || policy) of the (chosen, rejected) rows
    [B, T] each, summed over the answer tokens of `answer_mask` [2B, T] -> ([B], [B])."""
    b = kl[0].shape[0]
    kl_chosen = torch.where(answer_mask[:b], kl[0], torch.zeros_like(kl[0])).sum(dim=1)
    kl_rejected = torch.where(answer_mask[b:], kl[1], torch.zeros_like(kl[1])).sum(dim=1)
    return kl_chosen, kl_rejected


def tdpo_offset(kl_chosen: Tensor, kl_rejected: Tensor, alpha: float) -> Tensor:
    """TDPO's margin offset alpha (KL_rejected - sg(KL_chosen)) [B]: the chosen answer's KL carries no
    gradient, so the term pulls only the rejected answer's distribution towards the reference's."""
    return alpha * (kl_rejected - kl_chosen.detach())


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
    loss is reference_free and no reference log-probs were given."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None


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


@dataclass
class LossExtras:
    """The dense methods' per-batch inputs, each read only by the setting that uses it (`DDPOLoss.needs_*`
    say which; the trainer computes only those), in `PairBatch` row order:
      severity                          [2B, T] annotated weight per token, 0 = none (token_weights 'severity')
      corrupted                         the policy's (chosen, rejected) token log-probs given corrupted images,
                                        [B, T] each (visual weights; the conditional term: keep the chosen
                                        one's graph for it)
      ref_corrupted_chosen_token_logps  [B, T] the reference's, chosen answers only (the conditional term)
      kl                                per-token KL(ref || policy) of the (chosen, rejected) rows, [B, T]
                                        each (tdpo_alpha)
    """

    severity: Tensor | None = None
    corrupted: tuple[Tensor, Tensor] | None = None
    ref_corrupted_chosen_token_logps: Tensor | None = None
    kl: tuple[Tensor, Tensor] | None = None


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

    def __init__(self, settings: LossConfig):
        super().__init__()
        settings.validate()
        self.settings = settings

    # What the trainer must compute for the extras (all False for plain DDPO: no extra forward).
    @property
    def needs_corrupted_view(self) -> bool:
        """Policy log-probs given corrupted images: TPO's visual weights, mDPO's conditional term."""
        return self.settings.token_weights == "visual" or self.settings.image_conditional_weight > 0

    @property
    def needs_corrupted_reference(self) -> bool:
        """Reference log-probs of the chosen answers given corrupted images (mDPO's conditional term)."""
        return self.settings.image_conditional_weight > 0 and not self.settings.reference_free

    @property
    def needs_kl(self) -> bool:
        """Per-position KL(reference || policy) over the vocabulary (TDPO): a live reference."""
        return self.settings.tdpo_alpha > 0

    def extra_repr(self) -> str:
        return repr(self.settings)

    def weights(
        self,
        answer_mask: Tensor,
        corrected_mask: Tensor,
        severity: Tensor | None = None,
        real_logps: Tensor | None = None,
        corrupted_logps: Tensor | None = None,
    ) -> Tensor:
        """Per-token weights [2B, T] from `loss.token_weights`' source (ddpo/token_weights.py)."""
        source = self.settings.token_weights
        if source == "segments":
            return token_weights(answer_mask, corrected_mask, self.settings.gamma)
        if source == "length":
            return length_weights(answer_mask, self.settings.ld_alpha)
        if source == "severity":
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
                "corrupted images (`LossExtras.corrupted`)"
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
        extras: LossExtras | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token log-probs [B, T] (aligned with labels[:, 1:]; reference ones may be None when
        reference_free); masks [2B, T] bool in `PairBatch` row order (chosen rows, then rejected rows):
        `answer_mask` the answer tokens, `corrected_mask` those inside corrected segments. `extras`: the
        inputs only some settings need (`LossExtras`)."""
        s, extras = self.settings, LossExtras() if extras is None else extras
        b = policy_chosen_token_logps.shape[0]
        self._check_inputs(b, answer_mask, extras)
        real = corrupted_all = None
        if s.token_weights == "visual":
            real = torch.cat([policy_chosen_token_logps, policy_rejected_token_logps])
            corrupted_all = torch.cat(extras.corrupted)
        weights = self.weights(answer_mask, corrected_mask, extras.severity, real, corrupted_all)
        chosen_weights, rejected_weights = weights[:b], weights[b:]
        logps = SequenceLogps(
            weighted_logps(policy_chosen_token_logps, chosen_weights, s.normalize),
            weighted_logps(policy_rejected_token_logps, rejected_weights, s.normalize),
            *self._reference_logps(ref_chosen_token_logps, ref_rejected_token_logps, chosen_weights, rejected_weights),
        )
        kl = offset = None
        if s.tdpo_alpha > 0:
            kl = sequence_kl(extras.kl, answer_mask)
            offset = tdpo_offset(*kl, s.tdpo_alpha)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, s, offset)
        loss = losses.mean()
        extra_metrics: dict[str, Tensor] = {}
        if s.image_conditional_weight > 0 or s.anchor_weight > 0:
            chosen_margin = logps.chosen - (0 if logps.ref_chosen is None else logps.ref_chosen)  # D(y_w | I)
        if s.image_conditional_weight > 0:
            conditional = conditional_term(chosen_margin, self._corrupted_margin(chosen_weights, extras), s.beta)
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
        metrics.update(extra_metrics)
        return loss, metrics

    def _check_inputs(self, b: int, answer_mask: Tensor, extras: LossExtras) -> None:
        """The batch layout, and the extras the settings need (the ones read inside a term are checked there)."""
        if answer_mask.shape[0] != 2 * b:
            raise ValueError(
                f"DDPOLoss: the masks hold {answer_mask.shape[0]} rows for {b} pairs; pass them in PairBatch "
                "layout, [2B, T]: chosen rows, then rejected rows"
            )
        if self.needs_corrupted_view and extras.corrupted is None:
            raise ValueError(
                "DDPOLoss: loss.token_weights 'visual' and loss.image_conditional_weight need the policy's "
                "log-probs given corrupted images (`LossExtras.corrupted`)"
            )
        if self.needs_kl and extras.kl is None:
            raise ValueError("DDPOLoss: loss.tdpo_alpha > 0 needs the per-token KL to the reference (`LossExtras.kl`)")

    def _reference_logps(
        self,
        ref_chosen_token_logps: Tensor | None,
        ref_rejected_token_logps: Tensor | None,
        chosen_weights: Tensor,
        rejected_weights: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Reference sequence log-probs [B] each, with the policy's weights and normalisation (RLHF-V)."""
        if ref_chosen_token_logps is None or ref_rejected_token_logps is None:
            if not self.settings.reference_free:
                raise ValueError("DDPOLoss: reference token log-probs are None; pass them or set reference_free=True")
            return None, None
        return (
            weighted_logps(ref_chosen_token_logps, chosen_weights, self.settings.normalize),
            weighted_logps(ref_rejected_token_logps, rejected_weights, self.settings.normalize),
        )

    def _corrupted_margin(self, chosen_weights: Tensor, extras: LossExtras) -> Tensor:
        """D(y_w | I') [B]: the chosen answers given the corrupted images, reference part 0 when reference_free."""
        corrupted_chosen = weighted_logps(extras.corrupted[0], chosen_weights, self.settings.normalize)
        if self.settings.reference_free:
            ref_corrupted = torch.zeros_like(corrupted_chosen)
        elif extras.ref_corrupted_chosen_token_logps is None:
            raise ValueError(
                "DDPOLoss: loss.image_conditional_weight > 0 needs the reference's log-probs of the chosen "
                "answers given corrupted images (`LossExtras.ref_corrupted_chosen_token_logps`)"
            )
        else:
            ref_corrupted = weighted_logps(
                extras.ref_corrupted_chosen_token_logps, chosen_weights, self.settings.normalize
            )
        return corrupted_chosen - ref_corrupted
