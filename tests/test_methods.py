"""The dense methods (docs/DENSE_METHODS.md): each recipe's loss against a small batch whose value is derived
by hand from its original's formula (the file and line are linked at each test), a gradient check for each
(against an independent naive torch computation or a finite difference), reductions to DPO, the seeded
corruptions, TDPO's KL, severity through the data path, the trainer's extras, and the recipes: their values
against the doc's table, and each one training through `ddpo train`.

L(x) = -log sigma(x): L(1.5) = 0.2014133, L(1) = 0.3132617, L(0.5) = 0.4740770, L(0) = log 2.
"""

import copy
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpo.config import ConfigError, load_config
from ddpo.corruption import Corruption, corrupt_batch, diffusion_alpha_bar, random_resized_crop
from ddpo.data.collator import EncodingSettings, PairCollator, PairEncoder
from ddpo.data.records import PairBatch, PreferenceRecord
from ddpo.loss import DDPOLoss, LossConfig, LossExtras, dpo_loss, weighted_logps
from ddpo.models.logps import HiddenAndHead, chunked_token_kl
from ddpo.token_weights import answer_scores, label_logits, length_weights, severity_weights, visual_scores

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.yaml"))
LOG2 = math.log(2)
sigma = torch.sigmoid

# Each by-hand test links the original's file and lines at the commit read (docs/DENSE_METHODS.md lists them).


def L(x: float) -> float:
    return math.log1p(math.exp(-x))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def mask(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# weight sources and per-token inputs, by hand
# ------------------------------------------------------------------------------------------------
def test_length_weights_by_hand():
    # pair 0: chosen 3 answer tokens, rejected 5 -> shared 3; pair 1: chosen 2, rejected 1 -> shared 1
    answer = mask([0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1])
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0.5, 0, 0, 0, 0], [1, 1, 1, 0.5, 0.5, 0], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(length_weights(answer, 0.5), expected)
    assert torch.equal(length_weights(answer, 1.0), answer.float())  # alpha 1: plain DPO


def test_severity_weights_and_answer_scores_by_hand():
    answer = mask([1, 1, 1, 0], [0, 1, 1, 1])
    severity = torch.tensor([[0, 3, 0, 7], [0, 0, 1.5, 0]])  # the 7 sits outside the answer: never used
    assert torch.equal(severity_weights(answer, severity), torch.tensor([[1, 3, 1, 0], [0, 1, 1.5, 1]]))
    assert torch.equal(answer_scores(answer, severity), torch.tensor([3.0, 1.5]))
    assert torch.equal(answer_scores(answer, torch.zeros(2, 4)), torch.ones(2))  # no annotation: 1
    with pytest.raises(ValueError, match=">= 0"):
        severity_weights(answer, -severity)
    with pytest.raises(ValueError, match=">= 0"):
        answer_scores(answer, -severity)


def test_visual_scores_by_hand():
    # https://github.com/alibaba/TPO/blob/2f87f27ee84b83f49b21b8f2ed7bdbb109bf0d78/trl/trainer/tpo_trainer.py#L558
    # (chosen) and L612 (rejected): sigmoid(gap) + 0.5 and (1 - sigmoid(gap)) + 0.5
    answer = mask([1, 1, 0], [1, 1, 1])  # B = 1: chosen row, rejected row
    real = torch.tensor([[2.0, 1.0, float("nan")], [0.5, 3.0, 1.0]])
    corrupted = torch.tensor([[1.0, 1.0, 0.0], [0.5, 1.0, 1.5]])
    one = torch.tensor(1.0)
    expected = torch.tensor([[sigma(one) + 0.5, 1.0, 1.0], [1.0, 1.5 - sigma(2 * one), 1.5 - sigma(-0.5 * one)]])
    torch.testing.assert_close(visual_scores(answer, real, corrupted), expected)
    real.requires_grad_(True)
    assert visual_scores(answer, real, corrupted).requires_grad  # TPO's scores are not detached


def test_label_logits_are_the_raw_logit_of_each_next_label():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 6, 1], [-100, 2, 5, -100, -100]])
    full = hidden @ weight.T + bias  # [2, 5, 7]: every logit
    got = label_logits(hidden, weight, bias, labels)
    for r, c in [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:
        assert got[r, c].item() == pytest.approx(full[r, c, labels[r, c + 1]].item(), rel=1e-6)
    assert got[0, 0] == 0 and got[1, 2] == 0 and got[1, 3] == 0


# ------------------------------------------------------------------------------------------------
# each recipe's loss by hand, from its original's formula, with a gradient check
# ------------------------------------------------------------------------------------------------
def two_token_pair():
    """B = 1, two answer tokens per answer: D_w = (-1 - 2) - (-1.5 - 2) = 0.5, D_l = (-2 - 2) - (-1 - 2) = -1."""
    answer = mask([1, 1], [1, 1])
    return t([-1.0, -2.0]), t([-2.0, -2.0]), t([-1.5, -2.0]), t([-1.0, -2.0]), answer, torch.zeros_like(answer)


def test_chip_by_hand_and_the_released_reference_switch():
    # https://github.com/LVUGAI/CHiP/blob/e7f5193236e12bd565b99a6bf940e3ddc027a02f/llava/train/llava_trainer.py#L444-L459
    # (chip_loss): logits = (pi_w - pi_l) - (ref_w - ref_l)
    # + (pi_w - ref_w) - (pi_w(I') - ref_w(I')) - tok_beta (KL_l - KL_w.detach()); -logsigmoid(beta logits);
    # every log-prob a token-weighted sum (compute_weighted_logp L613-623), weights dpo_token_weight on the
    # changed tokens (get_seg_weight L596-611).
    answer = mask([1, 1], [1, 1])
    corrected = mask([0, 1], [1, 0])  # chosen weights [1, 4], rejected [4, 1]
    pc, rc = t([-1.0, -0.5]), t([-1.0, -1.0])  # pi_w = -1 - 2 = -3, ref_w = -1 - 4 = -5: D_w = 2
    pr, rr = t([-2.0, -1.0]), t([-1.5, -1.0])  # pi_l = -8 - 1 = -9, ref_l = -6 - 1 = -7: D_l = -2
    cc, rcc = t([-1.5, -0.75]), t([-1.0, -1.25])  # pi_w(I') = -1.5 - 3 = -4.5, ref_w(I') = -1 - 5 = -6: 1.5
    klc, klr = t([0.1, 0.2]), t([0.5, 0.3])  # KL_w = 0.3, KL_l = 0.8
    settings = dict(
        beta=0.1,
        gamma=4.0,
        normalize="sum",
        tdpo_alpha=0.1,
        tdpo_variant="tdpo2",
        image_conditional_weight=1.0,
        image_conditional_in_margin=True,
    )
    extras = LossExtras(corrupted=(cc, cc), ref_corrupted_chosen_token_logps=rcc, kl=(klc, klr))
    loss, metrics = DDPOLoss(LossConfig(**settings))(pc, pr, rc, rr, answer, corrected, extras)
    z = (2 - (-2)) + (2 - 1.5) - 0.1 * (0.8 - 0.3)  # = 4.45
    assert loss.item() == pytest.approx(L(0.1 * z), abs=1e-12)
    assert metrics["margin/cross_modal"].item() == pytest.approx(0.5)
    # The released code weighs the already-summed reference log-prob given I' (L543: compute_weighted_logp of a
    # [B] tensor): at batch size 1 it is sum(unweighted) x sum(weights) = (-1 - 1.25) x (1 + 4) = -11.25
    released, _ = DDPOLoss(LossConfig(**settings, chip_released_reference=True))(
        pc, pr, rc, rr, answer, corrected, extras
    )
    z_released = 4 + (2 - (-4.5 + 11.25)) - 0.05  # = -0.8
    assert released.item() == pytest.approx(L(0.1 * z_released), abs=1e-12)


def naive_chip(x, weights, beta, tok_beta, released=False):
    """CHiP's loss written as chip_loss and compute_loss do it (llava_trainer.py L444-459, L538-548)."""
    b = x["pc"].shape[0]
    wc, wr = weights[:b], weights[b:]
    pi_w, pi_l = (x["pc"] * wc).sum(1), (x["pr"] * wr).sum(1)
    ref_w, ref_l = (x["rc"] * wc).sum(1), (x["rr"] * wr).sum(1)
    pi_w_diff = (x["cc"] * wc).sum(1)
    if released:
        uncond = (x["rcc"] * (wc > 0)).sum(1) * wc.sum(1)
    else:
        uncond = (x["rcc"] * wc).sum(1)
    kl_w, kl_l = (x["klc"] * (wc > 0)).sum(1), (x["klr"] * (wr > 0)).sum(1)
    logits = (pi_w - pi_l) - (ref_w - ref_l)
    logits = logits + (pi_w - ref_w) - (pi_w_diff - uncond)
    logits = logits - tok_beta * (kl_l - kl_w.detach())
    return -F.logsigmoid(beta * logits).mean()


def random_batch(b=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -torch.rand(b, T, generator=g, dtype=torch.float64) * 3  # noqa: E731
    answer = torch.rand(2 * b, T, generator=g) > 0.3
    answer[:, 0] = True
    corrected = (torch.rand(2 * b, T, generator=g) > 0.6) & answer
    severity = torch.where(torch.rand(2 * b, T, generator=g) > 0.7, 2.5 * torch.ones(2 * b, T), torch.zeros(2 * b, T))
    severity[b, 1] = 4.0  # a second level on one rejected answer
    return dict(
        pc=lp(),
        pr=lp(),
        rc=lp(),
        rr=lp(),
        cc=lp(),
        cr=lp(),
        rcc=lp(),
        answer=answer,
        corrected=corrected,
        severity=severity,
        klc=torch.rand(b, T, generator=g, dtype=torch.float64),
        klr=torch.rand(b, T, generator=g, dtype=torch.float64),
        z=torch.randn(2 * b, T, generator=g, dtype=torch.float64) * 2,
        z_noisy=torch.randn(2 * b, T, generator=g, dtype=torch.float64) * 2,
        zr=torch.randn(2 * b, T, generator=g, dtype=torch.float64) * 2,
        zr_noisy=torch.randn(2 * b, T, generator=g, dtype=torch.float64) * 2,
    )


def segment_weights(x, gamma):
    return torch.where(x["answer"], torch.where(x["corrected"], gamma, 1.0), 0.0).double()


def grads_match(loss, naive, inputs):
    got = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(naive, inputs, allow_unused=True, retain_graph=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("released", [False, True])
def test_chip_value_and_gradient_against_its_code(released):
    x = random_batch(seed=1)
    for k in ("pc", "pr", "cc", "klc", "klr"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(
        LossConfig(
            beta=0.1,
            gamma=4.0,
            normalize="sum",
            tdpo_alpha=0.1,
            tdpo_variant="tdpo2",
            image_conditional_weight=1.0,
            image_conditional_in_margin=True,
            chip_released_reference=released,
        )
    )
    extras = LossExtras(
        corrupted=(x["cc"], x["cr"]), ref_corrupted_chosen_token_logps=x["rcc"], kl=(x["klc"], x["klr"])
    )
    loss, _ = loss_fn(x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"], extras)
    naive = naive_chip(x, segment_weights(x, 4.0), 0.1, 0.1, released)
    torch.testing.assert_close(loss, naive)
    grads_match(loss, naive, [x["pc"], x["pr"], x["cc"], x["klc"], x["klr"]])


def test_mdpo_by_hand():
    # https://github.com/luka-group/mDPO/blob/2221bb317a29dfe0f8d2c710cd8572e9d7ec101a/mdpo_trainer.py#L108-L123
    # (dpo_loss): -logsigmoid(beta h) - logsigmoid(beta [D(y_w|I) - D(y_w|I')]) - logsigmoid(beta D(y_w|I)), weights 1
    pc, pr, rc, rr, answer, corrected = two_token_pair()  # D_w = 0.5, D_l = -1: h = 1.5
    cc, rcc = t([-1.0, -1.5]), t([-1.0, -1.0])  # D(y_w | I') = -2.5 + 2 = -0.5: conditional margin 1
    loss_fn = DDPOLoss(
        LossConfig(beta=1.0, gamma=1.0, normalize="sum", image_conditional_weight=1.0, anchor_weight=1.0)
    )
    extras = LossExtras(corrupted=(cc, cc), ref_corrupted_chosen_token_logps=rcc)
    loss, metrics = loss_fn(pc, pr, rc, rr, answer, corrected, extras)
    assert loss.item() == pytest.approx(L(1.5) + L(1.0) + L(0.5), abs=1e-12)
    assert metrics["loss/conditional"].item() == pytest.approx(L(1.0), abs=1e-12)
    assert metrics["loss/anchor"].item() == pytest.approx(L(0.5), abs=1e-12)
    weighted = DDPOLoss(
        LossConfig(beta=1.0, gamma=1.0, normalize="sum", image_conditional_weight=0.2, anchor_weight=3.0)
    )
    value, _ = weighted(pc, pr, rc, rr, answer, corrected, extras)
    assert value.item() == pytest.approx(L(1.5) + 0.2 * L(1.0) + 3.0 * L(0.5), abs=1e-12)


def test_reference_free_zeroes_the_reference_in_every_term():
    # The review's bug: with reference_free the conditional term subtracted the reference from D(y_w|I) but not
    # from D(y_w|I'). Now every D is the policy's log-prob alone: h = pi_w - pi_l = -3 + 4 = 1,
    # D(y_w|I) - D(y_w|I') = -3 - (-2.5) = -0.5, anchor D(y_w|I) = -3 (mdpo_trainer.py L105-114 zero the ratios).
    pc, pr, rc, rr, answer, corrected = two_token_pair()
    cc, rcc = t([-1.0, -1.5]), t([-1.0, -1.0])
    settings = LossConfig(
        beta=1.0, gamma=1.0, normalize="sum", image_conditional_weight=1.0, anchor_weight=1.0, reference_free=True
    )
    extras = LossExtras(corrupted=(cc, cc), ref_corrupted_chosen_token_logps=rcc)
    with_ref, metrics = DDPOLoss(settings)(pc, pr, rc, rr, answer, corrected, extras)
    without, _ = DDPOLoss(settings)(pc, pr, None, None, answer, corrected, LossExtras(corrupted=(cc, cc)))
    assert with_ref.item() == pytest.approx(L(1.0) + L(-0.5) + L(-3.0), abs=1e-12)
    assert without.item() == pytest.approx(with_ref.item(), abs=1e-12)
    assert metrics["logps/ref_chosen"].item() == 0


def test_tpo_by_hand():
    # https://github.com/alibaba/TPO/blob/2f87f27ee84b83f49b21b8f2ed7bdbb109bf0d78/trl/trainer/tpo_trainer.py#L540-L561
    # (chosen) and L602-615 (rejected): per token
    # logp + log(score), score = sigmoid(z - z_noisy) + 0.5 (chosen) or (1 - sigmoid(z - z_noisy)) + 0.5
    # (rejected), z the raw logit of the label; summed; the reference with its own scores (L815); then
    # plain DPO (L445-459).
    answer = mask([1, 1], [1, 1])
    pc, pr = t([-1.0, -2.0]), t([-1.0, -1.0])
    rc, rr = pc.clone(), pr.clone()
    z = t([2.0, 1.0], [0.5, 3.0])  # policy logits given the image: chosen row, rejected row
    z_noisy = t([1.0, 1.0], [0.5, 1.0])  # gaps: chosen [1, 0], rejected [0, 2]
    zr = zr_noisy = t([0.0, 0.0], [0.0, 0.0])  # the reference's gaps 0: its scores are 1 and change nothing
    extras = LossExtras(visual_logits=(z, z_noisy), ref_visual_logits=(zr, zr_noisy))
    loss, _ = DDPOLoss(LossConfig(beta=1.0, gamma=1.0, normalize="sum", tpo_score=True))(
        pc, pr, rc, rr, answer, torch.zeros_like(answer), extras
    )
    # chosen scores sigma(1) + 0.5 and 1; rejected 1.5 - 0.5 = 1 and 1.5 - sigma(2)
    h = math.log(1 / (1 + math.exp(-1)) + 0.5) - math.log(1.5 - 1 / (1 + math.exp(-2)))
    assert loss.item() == pytest.approx(L(h), abs=1e-12)


def naive_tpo(x, beta):
    """TPO's loss as its trainer computes it (tpo_trainer.py L506-620, L445-459), sums over the answer mask."""
    b = x["pc"].shape[0]
    answer = x["answer"].double()

    def scored(logps, z, z_noisy, rows, chosen):
        gap = (z - z_noisy)[rows]
        score = torch.sigmoid(gap) + 0.5 if chosen else (1 - torch.sigmoid(gap)) + 0.5
        return ((logps + torch.log(score)) * answer[rows]).sum(1)

    pi_w = scored(x["pc"], x["z"], x["z_noisy"], slice(0, b), True)
    pi_l = scored(x["pr"], x["z"], x["z_noisy"], slice(b, 2 * b), False)
    ref_w = scored(x["rc"], x["zr"], x["zr_noisy"], slice(0, b), True)
    ref_l = scored(x["rr"], x["zr"], x["zr_noisy"], slice(b, 2 * b), False)
    return -F.logsigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l))).mean()


def test_tpo_value_and_gradient_through_the_scores():
    x = random_batch(seed=2)
    for k in ("pc", "pr", "z", "z_noisy"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(LossConfig(beta=0.1, gamma=1.0, normalize="sum", tpo_score=True))
    extras = LossExtras(visual_logits=(x["z"], x["z_noisy"]), ref_visual_logits=(x["zr"], x["zr_noisy"]))
    loss, _ = loss_fn(x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"], extras)
    naive = naive_tpo(x, 0.1)
    torch.testing.assert_close(loss, naive)
    grads_match(loss, naive, [x["pc"], x["pr"], x["z"], x["z_noisy"]])
    # and a finite difference on one noised logit of a rejected answer token (the score is not detached)
    (g,) = torch.autograd.grad(loss, [x["z_noisy"]])
    r, c = 3, int(x["answer"][3].nonzero()[0])
    eps = 1e-6
    bumped = {**x, "z_noisy": x["z_noisy"].detach().clone()}
    bumped["z_noisy"][r, c] += eps
    up = naive_tpo(bumped, 0.1)
    bumped["z_noisy"][r, c] -= 2 * eps
    down = naive_tpo(bumped, 0.1)
    assert g[r, c].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5, abs=1e-10)
    assert g[r, c].item() != 0


def test_hsa_dpo_by_hand():
    # https://github.com/Mr-Loevan/HSA-DPO/blob/dbb76cdac9ab2704c2f2a779ee1d8b22876a4eba/hsa_dpo/trainer/base_dpo_trainer.py#L310-L330
    # (dpo_loss): pi_logratios = w_c pi_c - w_r pi_r, ref likewise, logits the
    # difference; w_c = 1 (use_chosen_score False), w_r = the rejected answer's score (use_rejected_score True).
    pc, pr, rc, rr, answer, corrected = two_token_pair()  # D_w = 0.5, D_l = -1
    severity = t([2.0, 0.0], [0.0, 3.0])  # chosen score 2, rejected score 3 (the largest span severity)
    extras = LossExtras(severity=severity)
    rejected, metrics = DDPOLoss(LossConfig(beta=1.0, gamma=1.0, normalize="sum", answer_severity="rejected"))(
        pc, pr, rc, rr, answer, corrected, extras
    )
    assert rejected.item() == pytest.approx(L(0.5 - 3 * (-1)), abs=1e-12)  # h = 3.5
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)  # rewards stay beta (pi - ref), as HSA logs
    both, _ = DDPOLoss(LossConfig(beta=1.0, gamma=1.0, normalize="sum", answer_severity="both"))(
        pc, pr, rc, rr, answer, corrected, extras
    )
    assert both.item() == pytest.approx(L(2 * 0.5 - 3 * (-1)), abs=1e-12)  # h = 4


@pytest.mark.parametrize("which", ["rejected", "chosen", "both"])
def test_hsa_dpo_value_and_gradient_against_its_code(which):
    x = random_batch(seed=4)
    for k in ("pc", "pr"):
        x[k].requires_grad_(True)
    loss, _ = DDPOLoss(LossConfig(beta=0.1, gamma=1.0, normalize="sum", answer_severity=which))(
        x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"], LossExtras(severity=x["severity"])
    )
    b, answer = 3, x["answer"].double()
    scores = torch.where(x["answer"], x["severity"], 0).max(1).values
    scores = torch.where(scores > 0, scores, 1.0).double()
    w_c = scores[:b] if which in ("chosen", "both") else torch.ones(b, dtype=torch.float64)
    w_r = scores[b:] if which in ("rejected", "both") else torch.ones(b, dtype=torch.float64)
    pi_c, pi_r = (x["pc"] * answer[:b]).sum(1), (x["pr"] * answer[b:]).sum(1)
    ref_c, ref_r = (x["rc"] * answer[:b]).sum(1), (x["rr"] * answer[b:]).sum(1)
    naive = -F.logsigmoid(0.1 * ((w_c * pi_c - w_r * pi_r) - (w_c * ref_c - w_r * ref_r))).mean()
    torch.testing.assert_close(loss, naive)
    grads_match(loss, naive, [x["pc"], x["pr"]])


def test_tdpo1_and_tdpo2_by_hand_with_their_gradients():
    # https://github.com/Vance0124/Token-level-Direct-Preference-Optimization/blob/2a736ecb285394a8419b461816bce1ba3b093cc9/trainers.py#L74-L78
    # (tdpo_loss): TDPO1 logits = margin - (KL_l - KL_w); TDPO2 margin - alpha (KL_l - KL_w.detach())
    pc, pr, rc, rr, answer, corrected = two_token_pair()  # margin D_w - D_l = 1.5
    klc, klr = t([0.1, 0.2]).requires_grad_(True), t([0.5, 0.3]).requires_grad_(True)  # KL_w 0.3, KL_l 0.8
    beta = 0.5
    tdpo1, _ = DDPOLoss(LossConfig(beta=beta, gamma=1.0, normalize="sum", tdpo_alpha=1.0, tdpo_variant="tdpo1"))(
        pc, pr, rc, rr, answer, corrected, LossExtras(kl=(klc, klr))
    )
    z1 = 1.5 - (0.8 - 0.3)  # 1.0
    assert tdpo1.item() == pytest.approx(L(beta * z1), abs=1e-12)
    gc, gr = torch.autograd.grad(tdpo1, [klc, klr])
    s1 = 1 / (1 + math.exp(beta * z1))  # sigma(-beta z): dL/dz = -beta s
    torch.testing.assert_close(gc, t([-beta * s1, -beta * s1]))  # TDPO1: the chosen KL keeps its gradient
    torch.testing.assert_close(gr, t([beta * s1, beta * s1]))
    tdpo2, _ = DDPOLoss(LossConfig(beta=beta, gamma=1.0, normalize="sum", tdpo_alpha=0.5, tdpo_variant="tdpo2"))(
        pc, pr, rc, rr, answer, corrected, LossExtras(kl=(klc, klr))
    )
    z2 = 1.5 - 0.5 * (0.8 - 0.3)  # 1.25
    assert tdpo2.item() == pytest.approx(L(beta * z2), abs=1e-12)
    gc, gr = torch.autograd.grad(tdpo2, [klc, klr], allow_unused=True)
    assert gc is None  # TDPO2: stop-gradient on the chosen answer's KL
    s2 = 1 / (1 + math.exp(beta * z2))
    torch.testing.assert_close(gr, t([0.5 * beta * s2, 0.5 * beta * s2]))


def test_ld_dpo_by_hand_policy_only_and_both():
    # https://github.com/huggingface/trl/pull/3458 (trl/trainer/dpo_trainer.py concatenated_forward, ld_alpha applied
    # "not is_ref_model"): the longer answer's
    # log-prob = its first min(|y_w|, |y_l|) tokens + alpha x the rest, for the policy; TRL >= 0.29 does the
    # same for the reference (https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/
    # trl/trainer/dpo_trainer.py#L1387-L1393), our loss.ld_alpha_reference.
    answer = mask([1, 1, 0, 0], [1, 1, 1, 1])  # chosen 2 tokens, rejected 4: shared 2
    pc, pr = t([-1.0, -1.0, 0.0, 0.0]), t([-1.0, -1.0, -2.0, -2.0])
    rc, rr = t([-1.0, -1.0, 0.0, 0.0]), t([-1.0, -1.0, -3.0, -3.0])
    # policy: pi_w = -2, pi_l = -2 + 0.5 (-4) = -4; reference full: ref_w = -2, ref_l = -8 -> h = 2 - 6 = -4
    settings = dict(beta=1.0, gamma=1.0, normalize="sum", token_weights="length", ld_alpha=0.5)
    policy_only, _ = DDPOLoss(LossConfig(**settings))(pc, pr, rc, rr, answer, torch.zeros_like(answer))
    assert policy_only.item() == pytest.approx(L(-4.0), abs=1e-12)
    # reference weighted too: ref_l = -2 + 0.5 (-6) = -5 -> h = 2 - 3 = -1
    both, _ = DDPOLoss(LossConfig(**settings, ld_alpha_reference=True))(
        pc, pr, rc, rr, answer, torch.zeros_like(answer)
    )
    assert both.item() == pytest.approx(L(-1.0), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# the loss with each source / term against a naive formula on a random batch; reductions to DPO
# ------------------------------------------------------------------------------------------------
def naive_total(x, beta, normalize, weights, ref_weights=None, cond=0.0, anchor=0.0, alpha=0.0):
    """DPO + mDPO's terms + TDPO2's KL written out with plain tensor ops (float64), from hand-built weights."""
    b = x["pc"].shape[0]
    answer = x["answer"]
    ref_weights = weights if ref_weights is None else ref_weights

    def seq(lp, w):
        total = (torch.where(w > 0, lp, torch.zeros_like(lp)) * w).sum(1)
        return total if normalize == "sum" else total / w.sum(1)

    wc, wr = weights[:b].double(), weights[b:].double()
    rwc, rwr = ref_weights[:b].double(), ref_weights[b:].double()
    d_w, d_l = seq(x["pc"], wc) - seq(x["rc"], rwc), seq(x["pr"], wr) - seq(x["rr"], rwr)
    kl_c = (x["klc"] * answer[:b]).sum(1)
    kl_r = (x["klr"] * answer[b:]).sum(1)
    h = d_w - d_l - alpha * (kl_r - kl_c.detach())
    loss = -F.logsigmoid(beta * h).mean()
    if cond:
        loss = loss + cond * -F.logsigmoid(beta * (d_w - (seq(x["cc"], wc) - seq(x["rcc"], rwc)))).mean()
    if anchor:
        loss = loss + anchor * -F.logsigmoid(beta * d_w).mean()
    return loss


def hand_weights(x, source, gamma=1.0, alpha=1.0):
    """Weights built by hand, position by position (no call into ddpo.token_weights)."""
    answer, b = x["answer"], x["pc"].shape[0]
    w = torch.zeros(answer.shape, dtype=torch.float64)
    lengths = answer.sum(1).tolist()
    for r in range(answer.shape[0]):
        k = 0
        for c in range(answer.shape[1]):
            if not answer[r, c]:
                continue
            if source == "segments":
                w[r, c] = gamma if x["corrected"][r, c] else 1.0
            elif source == "severity":
                w[r, c] = x["severity"][r, c] if x["severity"][r, c] > 0 else 1.0
            else:
                shared = min(lengths[r % b], lengths[r % b + b])
                w[r, c] = 1.0 if k < shared else alpha
            k += 1
    return w


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize(
    "source, gamma, alpha, ld_reference",
    [
        ("segments", 5.0, 1.0, False),
        ("severity", 1.0, 1.0, False),
        ("length", 1.0, 0.3, False),
        ("length", 1.0, 0.3, True),
    ],
)
def test_each_weight_source_equals_the_naive_loss_value_and_gradient(source, gamma, alpha, ld_reference, normalize):
    x = random_batch()
    for k in ("pc", "pr"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(
        LossConfig(
            beta=0.7,
            gamma=gamma,
            normalize=normalize,
            token_weights=source,
            ld_alpha=alpha,
            ld_alpha_reference=ld_reference,
        )
    )
    loss, _ = loss_fn(
        x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"], LossExtras(severity=x["severity"])
    )
    weights = hand_weights(x, source, gamma, alpha)
    ref_weights = x["answer"].double() if source == "length" and not ld_reference else weights
    naive = naive_total(x, 0.7, normalize, weights, ref_weights)
    torch.testing.assert_close(loss, naive)
    grads_match(loss, naive, [x["pc"], x["pr"]])
    built = loss_fn.weights(x["answer"], x["corrected"], x["severity"])  # the weights the loss builds
    torch.testing.assert_close(built.double(), weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_conditional_anchor_and_tdpo_value_and_gradient_against_the_naive_formula(normalize):
    x = random_batch(seed=3)
    for k in ("pc", "pr", "cc", "klc", "klr"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(
        LossConfig(
            beta=0.4,
            gamma=3.0,
            normalize=normalize,
            image_conditional_weight=0.5,
            anchor_weight=2.0,
            tdpo_alpha=0.3,
            tdpo_variant="tdpo2",
        )
    )
    loss, metrics = loss_fn(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        x["answer"],
        x["corrected"],
        LossExtras(corrupted=(x["cc"], x["cr"]), ref_corrupted_chosen_token_logps=x["rcc"], kl=(x["klc"], x["klr"])),
    )
    naive = naive_total(x, 0.4, normalize, hand_weights(x, "segments", 3.0), cond=0.5, anchor=2.0, alpha=0.3)
    torch.testing.assert_close(loss, naive)
    grads_match(loss, naive, [x["pc"], x["pr"], x["cc"], x["klc"], x["klr"]])
    assert metrics["kl/chosen"].item() == pytest.approx((x["klc"] * x["answer"][:3]).sum(1).mean().item())


def test_every_method_off_or_neutral_reduces_to_dpo():
    x = random_batch(seed=5)
    b = x["pc"].shape[0]
    zeros = torch.zeros(2 * b, x["pc"].shape[1], dtype=torch.float64)
    for normalize in ("sum", "mean"):
        plain, _ = DDPOLoss(LossConfig(beta=0.3, gamma=1.0, normalize=normalize))(
            x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"]
        )
        w = x["answer"].double()
        dpo, _, _ = dpo_loss(
            weighted_logps(x["pc"], w[:b], normalize),
            weighted_logps(x["pr"], w[b:], normalize),
            weighted_logps(x["rc"], w[:b], normalize),
            weighted_logps(x["rr"], w[b:], normalize),
            LossConfig(beta=0.3),
        )
        torch.testing.assert_close(plain, dpo.mean())
        neutral = {  # each method at its neutral input gives the same loss
            "severity": dict(token_weights="severity"),
            "answer_severity": dict(answer_severity="both"),
            "length": dict(token_weights="length", ld_alpha=1.0, ld_alpha_reference=True),
            "tpo": dict(tpo_score=True),  # equal logits with and without the image: every score 1
            "tdpo1": dict(tdpo_alpha=1.0, tdpo_variant="tdpo1"),
            "tdpo2": dict(tdpo_alpha=0.7, tdpo_variant="tdpo2"),
            "chip_cross": dict(image_conditional_weight=1.0, image_conditional_in_margin=True),
        }
        for name, settings in neutral.items():
            loss, _ = DDPOLoss(LossConfig(beta=0.3, gamma=1.0, normalize=normalize, **settings))(
                x["pc"],
                x["pr"],
                x["rc"],
                x["rr"],
                x["answer"],
                x["corrected"],
                LossExtras(
                    severity=torch.zeros_like(x["severity"]),
                    corrupted=(x["pc"], x["pr"]),  # the corrupted view equal to the real one
                    ref_corrupted_chosen_token_logps=x["rc"],
                    kl=(torch.zeros_like(x["klc"]), torch.zeros_like(x["klr"])),
                    visual_logits=(zeros, zeros),
                    ref_visual_logits=(zeros, zeros),
                ),
            )
            torch.testing.assert_close(loss, plain, msg=name)
    # mDPO's conditional term with the corrupted view equal to the real one is log 2 and pushes nothing
    pc = x["pc"].clone().requires_grad_(True)
    loss_fn = DDPOLoss(LossConfig(beta=0.3, gamma=1.0, normalize="sum", image_conditional_weight=1.0))
    loss, metrics = loss_fn(
        pc,
        x["pr"],
        x["rc"],
        x["rr"],
        x["answer"],
        x["corrected"],
        LossExtras(corrupted=(pc, x["pr"]), ref_corrupted_chosen_token_logps=x["rc"]),
    )
    assert metrics["loss/conditional"].item() == pytest.approx(LOG2)
    plain_pc = x["pc"].clone().requires_grad_(True)
    plain, _ = DDPOLoss(LossConfig(beta=0.3, gamma=1.0, normalize="sum"))(
        plain_pc, x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"]
    )
    torch.testing.assert_close(torch.autograd.grad(loss, pc)[0], torch.autograd.grad(plain, plain_pc)[0])


def test_missing_inputs_and_bad_settings_are_named():
    x = random_batch()
    args = (x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"])
    with pytest.raises(ValueError, match="no severity annotations"):
        DDPOLoss(LossConfig(gamma=1.0, token_weights="severity"))(*args)
    with pytest.raises(ValueError, match="loss.answer_severity needs the batch's severity annotations"):
        DDPOLoss(LossConfig(gamma=1.0, answer_severity="rejected"))(*args)
    with pytest.raises(ValueError, match="loss.image_conditional_weight needs the policy's log-probs given corrupted"):
        DDPOLoss(LossConfig(gamma=1.0, image_conditional_weight=1.0))(*args)
    with pytest.raises(ValueError, match="loss.tdpo_alpha needs the per-token KL"):
        DDPOLoss(LossConfig(gamma=1.0, tdpo_alpha=1.0))(*args)
    with pytest.raises(ValueError, match="loss.tpo_score needs the policy's answer-token logits"):
        DDPOLoss(LossConfig(gamma=1.0, tpo_score=True))(*args)
    zeros = torch.zeros_like(x["severity"], dtype=torch.float64)
    with pytest.raises(ValueError, match="reference's answer-token logits"):
        DDPOLoss(LossConfig(gamma=1.0, tpo_score=True))(*args, LossExtras(visual_logits=(zeros, zeros)))
    bad = {
        "loss.gamma 5.0 weighs corrected segments": dict(gamma=5.0, token_weights="length"),
        "loss.ld_alpha 0.5 / loss.ld_alpha_reference False only act": dict(gamma=1.0, ld_alpha=0.5),
        "TDPO1 has no alpha": dict(tdpo_alpha=0.5),
        "loss.image_conditional_in_margin places": dict(image_conditional_in_margin=True),
        "loss.chip_released_reference reproduces": dict(image_conditional_weight=1.0, chip_released_reference=True),
        r"loss.diffusion_step must be in \[0, 999\]": dict(diffusion_step=1000),
        "loss.crop_min_area and loss.crop_max_area": dict(crop_min_area=0.3, crop_max_area=0.2),
        "loss.answer_severity must be one of": dict(answer_severity="max"),
    }
    for message, settings in bad.items():
        with pytest.raises(ValueError, match=message):
            DDPOLoss(LossConfig(**settings))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--loss.tdpo_alpha", "1"], "loss.tdpo_alpha 1.0 .* set train.reference live"),
        (["--loss.tdpo_alpha", "1", "--train.reference", "live", "--deepspeed.zero_stage", "3"], "ZeRO-3"),
        (["--loss.corruption", "blur"], "loss.corruption: expected one of"),
        (["--loss.corruption_strength", "0"], r"loss.corruption_strength must be in \(0, 1\]"),
        (["--loss.token_weights", "severity"], "set loss.gamma 1"),
        (["--loss.token_weights", "visual", "--loss.gamma", "1"], "loss.token_weights: expected one of"),
        (["--loss.anchor_weight", "-1"], "loss.anchor_weight must be >= 0"),
        (["--loss.tdpo_variant", "tdpo3"], "loss.tdpo_variant: expected one of"),
    ],
)
def test_config_refuses_bad_method_settings_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--data.format", "synthetic", *overrides])


# ------------------------------------------------------------------------------------------------
# TDPO's KL against the full softmax
# ------------------------------------------------------------------------------------------------
def test_chunked_token_kl_equals_the_full_softmax_kl_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_head = (
        torch.randn(3, 6, 5, generator=g, dtype=torch.float64),
        torch.randn(11, 5, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(11, (3, 6), generator=g)
    labels[0, :3], labels[2, 4:] = -100, -100
    kl = chunked_token_kl(HiddenAndHead(hidden, head), HiddenAndHead(ref_hidden, ref_head), labels, chunk_size=4)
    ref_logp = (ref_hidden @ ref_head.T).log_softmax(-1)[:, :-1]
    full = (ref_logp.exp() * (ref_logp - (hidden @ head.T).log_softmax(-1)[:, :-1])).sum(-1)
    naive = torch.where(labels[:, 1:] != -100, full, torch.zeros_like(full))
    torch.testing.assert_close(kl.double(), naive, atol=1e-6, rtol=1e-6)  # float32 inside
    w = torch.rand(kl.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((kl * w).sum(), [hidden, head]), torch.autograd.grad((naive * w).sum(), [hidden, head])
    ):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    same = HiddenAndHead(ref_hidden, ref_head)
    assert torch.equal(chunked_token_kl(same, same, labels), torch.zeros(3, 5))


# ------------------------------------------------------------------------------------------------
# corruptions: exact, seeded per pair and draw
# ------------------------------------------------------------------------------------------------
def image_batch(rows, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    ids = torch.ones(2 * b, 4, dtype=torch.long)
    return PairBatch(
        pixel_values=torch.randn(b, 3, size, size, generator=g),
        input_ids=ids,
        attention_mask=ids.clone(),
        labels=ids.clone(),
        corrected=torch.zeros(2 * b, 3, dtype=torch.bool),
        row_indices=list(rows),
    )


def test_noise_is_the_diffusion_step_and_depends_only_on_seed_and_row():
    batch = image_batch([7, 3])
    out = corrupt_batch(batch, Corruption("noise", 0.36, seed=1), num_image_tokens=9)
    eps = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(1 * 1_000_003 + 3))
    torch.testing.assert_close(out.pixel_values[1], 0.8 * batch.pixel_values[1] + 0.6 * eps)
    alone = corrupt_batch(
        replace(batch, pixel_values=batch.pixel_values[1:], row_indices=[3]), Corruption("noise", 0.36, seed=1), 9
    )
    assert torch.equal(alone.pixel_values[0], out.pixel_values[1])  # batch make-up does not matter
    assert not torch.equal(corrupt_batch(batch, Corruption("noise", 0.36, seed=2), 9).pixel_values, out.pixel_values)
    assert torch.equal(batch.pixel_values, image_batch([7, 3]).pixel_values)  # the input is not modified


def test_diffusion_schedule_is_chips_and_tpos_sigmoid_schedule():
    # https://github.com/LVUGAI/CHiP/blob/e7f5193236e12bd565b99a6bf940e3ddc027a02f/llava/train/train.py#L835-L860 and
    # https://github.com/alibaba/TPO/blob/2f87f27ee84b83f49b21b8f2ed7bdbb109bf0d78/llava/train/scaling_train.py#L95-L120
    # (add_diffusion_noise):
    # betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5; x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps
    betas = [1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-(-6 + 12 * i / 999))) for i in range(1000)]
    abar = math.prod(1 - b for b in betas[:501])
    assert diffusion_alpha_bar(500) == pytest.approx(abar, rel=1e-12)
    assert diffusion_alpha_bar(500) == pytest.approx(0.7447985, abs=1e-6)  # not the linear DDPM schedule's 0.078
    assert diffusion_alpha_bar(0) == pytest.approx(1 - 1e-5 - (5e-3 - 1e-5) / (1 + math.exp(6)), rel=1e-12)
    batch = image_batch([5])
    view = Corruption("diffusion", seed=4, diffusion_step=500)
    out = corrupt_batch(batch, view, num_image_tokens=9)
    eps = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(4 * 1_000_003 + 5))
    torch.testing.assert_close(out.pixel_values[0], math.sqrt(abar) * batch.pixel_values[0] + math.sqrt(1 - abar) * eps)


def test_diffusion_in_pixel_space_noises_the_unit_image_and_clamps():
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    batch = image_batch([2])
    view = Corruption("diffusion", seed=0, diffusion_step=500, diffusion_space="pixels", pixel_mean=mean, pixel_std=std)
    out = corrupt_batch(batch, view, num_image_tokens=9).pixel_values[0]
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    unit = out * s + m
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6  # clamped to [0, 1] before re-normalising
    torch.testing.assert_close(unit * 255, torch.round(unit * 255), atol=1e-3, rtol=0)  # 8-bit, as TPO's PIL image
    eps = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(2))
    abar = diffusion_alpha_bar(500)
    raw = (math.sqrt(abar) * (batch.pixel_values[0] * s + m) + math.sqrt(1 - abar) * eps).clamp(0, 1)
    torch.testing.assert_close(unit, torch.floor(raw * 255) / 255, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="loss.diffusion_space 'pixels' needs the model's image normalisation"):
        corrupt_batch(batch, Corruption("diffusion", diffusion_space="pixels"), num_image_tokens=9)


def test_crop_keeps_the_stated_share_and_is_resized_back():
    # https://github.com/luka-group/mDPO/blob/2221bb317a29dfe0f8d2c710cd8572e9d7ec101a/bunny/modeling_bunny_phi.py#L2358-L2364
    # RandomResizedCrop(size=(H, W), scale=(0.01, 0.2)) per image
    # a ramp 40 r + c: bilinear resizing keeps it linear, so the output's corners give the box it was cut from
    image = torch.arange(3 * 40 * 40, dtype=torch.float64).reshape(3, 40, 40) % 1600
    shares = []
    for seed in range(50):
        out = random_resized_crop(image, (0.01, 0.2), torch.Generator().manual_seed(seed))
        assert out.shape == image.shape
        low, high = round(out[0].min().item()), round(out[0].max().item())
        top, left, bottom, right = low // 40, low % 40, high // 40, high % 40
        h, w = bottom - top + 1, right - left + 1
        shares.append(h * w / 1600)
        assert 3 / 4 * 0.7 <= w / h <= 4 / 3 / 0.7  # aspect ratio in [3/4, 4/3] up to rounding
    assert 0.005 <= min(shares) and max(shares) <= 0.23 and max(shares) > 0.1 and min(shares) < 0.05
    batch = image_batch([0, 1], size=40)
    view = Corruption("crop", seed=3, crop_area=(0.01, 0.2))
    a, b = corrupt_batch(batch, view, 9, draw=(5,)), corrupt_batch(batch, view, 9, draw=(5,))
    assert torch.equal(a.pixel_values, b.pixel_values)  # the same (seed, row, draw): the same crop
    assert not torch.equal(a.pixel_values, corrupt_batch(batch, view, 9, draw=(6,)).pixel_values)  # redrawn per step
    assert not torch.equal(  # policy (stream 0) and reference (stream 1) draw their own, as in mDPO
        corrupt_batch(batch, view, 9, draw=(5, 0)).pixel_values, corrupt_batch(batch, view, 9, draw=(5, 1)).pixel_values
    )


def test_masks_hide_the_stated_share():
    batch = image_batch([0, 1])
    tokens = corrupt_batch(batch, Corruption("mask_tokens", 0.5), num_image_tokens=16)
    assert tokens.pixel_values is batch.pixel_values and tokens.image_keep.shape == (2, 16)
    assert (tokens.image_keep == 0).sum(1).tolist() == [8, 8]
    patches = corrupt_batch(batch, Corruption("mask_patches", 4 / 9), num_image_tokens=9)  # 3 x 3 grid of 4-px cells
    cells = (patches.pixel_values == 0).all(1).reshape(2, 3, 4, 3, 4).all(4).all(2)
    assert cells.sum((1, 2)).tolist() == [4, 4]
    kept = ~cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(
        patches.pixel_values.permute(1, 0, 2, 3)[:, kept], batch.pixel_values.permute(1, 0, 2, 3)[:, kept]
    )


# ------------------------------------------------------------------------------------------------
# the model reads image_keep; severity flows from the record to the batch; the trainer's extras
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(request):
    from ddpo.data.tokenizer import build_word_tokenizer
    from ddpo.models.build import build_model
    from ddpo.models.config import ModelConfig

    tokenizer = build_word_tokenizer(
        ["there is a red circle and a blue square in the picture .", "Describe the image ."]
    )
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="llava", preset="tiny"), tokenizer=tokenizer)


def tiny_batch(model, severity=None):
    record = PreferenceRecord(
        images=[Image.new("RGB", (20, 20), (200, 30, 30))],
        prompt="Describe the image .",
        chosen="there is a red circle .",
        rejected="there is a blue square .",
        row_index=4,
        rejected_severity=severity,
    )
    encoder = PairEncoder(model.tokenizer, model.image_placeholder, EncodingSettings("vicuna_v0", max_length=256))
    return PairCollator(model.tokenizer.pad_token_id, image_transform=model.preprocess_images)([encoder.encode(record)])


def test_model_masks_image_token_features(tiny):
    batch = tiny_batch(tiny)
    n = tiny.num_image_tokens
    with torch.no_grad():
        plain = tiny(batch)
        kept = tiny(replace(batch, image_keep=torch.ones(1, n)))
        masked = corrupt_batch(batch, Corruption("mask_tokens", 1.0), n)
        shared, rows = tiny(masked, shared_prompt=True), tiny(masked, shared_prompt=False)
        # every image token masked: another image gives the same log-probs
        other = corrupt_batch(
            replace(batch, pixel_values=batch.pixel_values * 0 + 5), Corruption("mask_tokens", 1.0), n
        )
        masked_other = tiny(other)
    assert all(torch.equal(a, b) for a, b in zip(plain, kept))
    for a, b in zip(shared, rows):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(shared[0], plain[0])
    torch.testing.assert_close(masked_other[0], shared[0], atol=1e-6, rtol=0)


def test_severity_spans_become_per_token_weights_at_the_answer_positions(tiny):
    text = "there is a blue square ."
    start = text.index("blue square")
    batch = tiny_batch(tiny, severity=[(start, start + len("blue square"), 3.0)])
    rejected = batch.severity[1][batch.answer_mask[1]].tolist()
    words = tiny.tokenizer.convert_ids_to_tokens(batch.labels[1][1:][batch.answer_mask[1]].tolist())
    assert [w for w, s in zip(words, rejected) if s == 3.0] == ["blue", "square"]
    assert set(rejected) == {0.0, 3.0} and batch.severity[0].abs().sum() == 0  # no annotation on the chosen answer
    assert batch.severity[~batch.answer_mask].abs().sum() == 0
    assert tiny_batch(tiny).severity is None


class _Engine:
    """The part of a DeepSpeed engine `Trainer._micro_step` calls."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def zero_optimization_stage(self) -> int:
        return 0


class _Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0
        self.lm_head = model.lm_head

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def bare_trainer(model, overrides, step=0):
    """A Trainer with only what `_micro_step` reads (no DeepSpeed, no data): the policy and a live reference
    that counts its forwards."""
    from ddpo.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(None, ["--data.format", "synthetic", "--train.reference", "live", *overrides])
    trainer.loss_fn = DDPOLoss(trainer.cfg.loss)
    trainer.model, trainer.engine = model, _Engine(model)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainer.ref_model, trainer.step = _Counting(reference), step
    return trainer


def test_trainer_skips_the_reference_when_reference_free(tiny):
    batch = tiny_batch(tiny)
    free = bare_trainer(tiny, ["--loss.reference_free", "true", "--loss.gamma", "1", "--loss.anchor_weight", "1"])
    loss, metrics = free._micro_step(batch, 0)
    assert free.ref_model.calls == 0 and torch.isfinite(loss)
    assert metrics["logps/ref_chosen"].item() == 0
    with_ref = bare_trainer(tiny, ["--loss.gamma", "1"])
    with_ref._micro_step(batch, 0)
    assert with_ref.ref_model.calls == 1


@pytest.mark.parametrize("recipe", ["chip", "mdpo", "tpo"])
def test_trainer_extras_of_the_image_recipes_start_at_their_neutral_value(tiny, recipe, monkeypatch):
    """At the reference (policy = reference) CHiP's and TPO's losses are log 2 (the views are shared), mDPO's
    main and anchor terms are log 2 each while its conditional term compares two different crops."""
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "methods" / f"{recipe}.yaml")
    overrides = [f"--loss.{k}={v}" for k, v in vars(cfg.loss).items()]
    trainer = bare_trainer(tiny, overrides)
    batch = tiny_batch(tiny)
    loss, metrics = trainer._micro_step(batch, 0)
    loss.backward()
    if recipe == "mdpo":
        assert trainer.ref_model.calls == 2  # the real view, and its own crop
        assert (loss - metrics["loss/conditional"]).item() == pytest.approx(2 * LOG2, abs=1e-5)
    else:
        assert trainer.ref_model.calls == 2 and loss.item() == pytest.approx(LOG2, abs=1e-5)
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny.zero_grad(set_to_none=True)
    later = bare_trainer(tiny, overrides, step=1)  # redrawn at the next step; the same again on a rerun
    assert not torch.equal(
        later._corrupt(batch, later._draw(0)).pixel_values, trainer._corrupt(batch, trainer._draw(0)).pixel_values
    )
    assert torch.equal(
        later._corrupt(batch, later._draw(0)).pixel_values, later._corrupt(batch, later._draw(0)).pixel_values
    )
    with pytest.raises(ValueError, match="cannot be cached: set train.reference live"):
        trainer._corrupt(batch)  # what a reference cache would ask for


# ------------------------------------------------------------------------------------------------
# recipes: the doc's table, and each one trains through `ddpo train`
# ------------------------------------------------------------------------------------------------
def doc_recipes() -> dict[str, dict[str, str]]:
    """Every `<!-- recipes... -->` table of the doc, merged per recipe (columns are config fields)."""
    text = (REPO / "docs" / "DENSE_METHODS.md").read_text()
    merged: dict[str, dict[str, str]] = {}
    for block in re.findall(r"<!-- recipes:begin -->\n(.*?)<!-- recipes:end -->", text, re.S):
        lines = block.strip().splitlines()
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        for line in lines[2:]:
            row = [c.strip() for c in line.strip("|").split("|")]
            merged.setdefault(row[0], {}).update(zip(header[1:], row[1:]))
    return merged


def test_every_recipe_is_in_the_doc_table():
    expected = {"ddpo_paper", "ddpo_released", "dpo", "chip", "mdpo", "hsa_dpo", "tpo", "tdpo1", "tdpo2", "ld_dpo"}
    assert set(doc_recipes()) == set(RECIPES) == expected


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_values_match_the_doc(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "methods" / f"{name}.yaml")
    defaults = load_config(None, ["--data.format", "synthetic"])
    for key, want in doc_recipes()[name].items():
        section = "train" if key in ("reference", "learning_rate") else "loss"
        got, default = getattr(getattr(cfg, section), key), getattr(getattr(defaults, section), key)
        if want == "-":
            expected = default
        elif isinstance(got, bool):
            expected = want == "true"
        else:
            expected = want if isinstance(got, str) else float(want)
        assert got == expected, (name, key)
    text = (REPO / "configs" / "methods" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "(" in text.splitlines()[0]  # names its paper or code
    for line in text.split("loss:\n", 1)[1].split("train:\n")[0].splitlines():
        assert "  # " in line, (name, line)  # every loss value says where it comes from


@pytest.mark.slow
def test_every_recipe_trains_through_ddpo_train(tmp_path):
    """`ddpo train configs/methods/NAME.yaml` for every recipe, in one fresh process (the CLI's own entry,
    called once per recipe: one interpreter start instead of ten)."""
    import json
    import subprocess
    import sys

    from test_trainer import THREADS, _env, metrics

    common = [
        "--train.max_steps",
        "2",
        "--train.micro_batch_size",
        "2",
        "--train.learning_rate",
        "1e-4",  # the recipes' own rates are for their models at scale; nothing moves at 5e-7 here
        "--data.synthetic_pairs",
        "8",
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
    ]
    method = REPO / "configs" / "methods"
    runs = [
        ["train", str(method / f"{name}.yaml"), "--train.output_dir", str(tmp_path / name), *common] for name in RECIPES
    ]
    # mDPO's crop drawn once per pair: the corrupted view's reference cached, and live
    for reference in ("cached", "live"):
        out = str(tmp_path / f"mdpo_pair_{reference}")
        runs.append(["train", str(method / "mdpo.yaml"), "--train.output_dir", out, *common])
        runs[-1] += ["--loss.corruption_draw", "pair", "--train.reference", reference]
    script = (
        "import json, sys; from ddpo.cli import main; sys.exit(max(main(argv) for argv in json.loads(sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in RECIPES:
        out = tmp_path / name
        logged = metrics(out)
        assert [m["step"] for m in logged] == [1, 2] and all(math.isfinite(m["loss"]) for m in logged), name
        assert (out / "final").is_dir(), name
        first = logged[0]
        if name == "mdpo":  # main and anchor terms log 2 each; the conditional term compares two crops
            assert first["loss"] - first["loss/conditional"] == pytest.approx(2 * LOG2, abs=1e-4)
        elif name != "ld_dpo":  # LD-DPO weighs the policy's tail only: the margin is not 0 at the reference
            assert first["loss"] == pytest.approx(LOG2, abs=1e-4), name
    chip = metrics(tmp_path / "chip")
    assert chip[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-5) and chip[1]["kl/rejected"] > 0  # KL 0 at the reference
    assert chip[0]["margin/cross_modal"] == pytest.approx(0.0, abs=1e-4)  # the shared diffused image: D(I') = D(I)
    cached_dir = tmp_path / "mdpo_pair_cached" / "reference_cache-corrupted-crop-0.5-seed0"
    assert json.loads((cached_dir / "fingerprint.json").read_text())["corruption_view"] == "crop:0.01-0.2:seed0"
    # cached and live references of the corrupted view give the same run (float noise of ~300-nat sums x beta 0.1)
    for cached, live in zip(metrics(tmp_path / "mdpo_pair_cached"), metrics(tmp_path / "mdpo_pair_live"), strict=True):
        for key in ("loss", "loss/conditional", "loss/anchor", "rewards/margins"):
            assert cached[key] == pytest.approx(live[key], abs=2e-4), key
