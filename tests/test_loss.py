"""ddpo.loss: hand-derived values, equivalences with plain DPO, gradients, and error messages.

Notation: L(x) = -log sigma(x) = log(1 + exp(-x)). Useful values:
L(1) = 0.3132617, L(0.5) = 0.4740770, L(0) = log 2 = 0.6931472, L(-0.5) = 0.9740770,
L(-1) = 1.3132617, L(-1.5) = 1.7014133, L(-3.5) = 3.5297504, L(-10) = 10.0000454.
"""

import math

import pytest
import torch

from ddpo.loss import DDPOLoss, LossConfig, dpo_loss, token_weights, weighted_logps


def L(x: float) -> float:
    return math.log1p(math.exp(-x))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# weighted_logps
# ------------------------------------------------------------------------------------------------
def test_weighted_logps_by_hand():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -1.5, float("nan"), -4.0]])
    weights = torch.tensor([[1.0, 5.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    # row 0: -1*1 - 2*5 - 3*1 = -14, N = 7 -> mean -2
    # row 1: -1.5*2 - 4*1 = -7 (the NaN sits outside the response and is never read), N = 3
    torch.testing.assert_close(weighted_logps(token_logps, weights, "sum"), torch.tensor([-14.0, -7.0]))
    torch.testing.assert_close(weighted_logps(token_logps, weights, "mean"), torch.tensor([-2.0, -7.0 / 3]))


def test_weighted_mean_is_invariant_to_scaling_the_weights():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 5
    weights = torch.rand(4, 9, generator=g, dtype=torch.float64) * (torch.rand(4, 9, generator=g) > 0.3)
    torch.testing.assert_close(
        weighted_logps(token_logps, 7 * weights, "mean"), weighted_logps(token_logps, weights, "mean")
    )
    torch.testing.assert_close(
        weighted_logps(token_logps, 7 * weights, "sum"), 7 * weighted_logps(token_logps, weights, "sum")
    )


def test_weighted_logps_errors():
    lp, w = torch.zeros(3, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"got \(3, 4\) and \(3, 5\)"):
        weighted_logps(lp, torch.ones(3, 5), "mean")
    with pytest.raises(ValueError, match="normalize must be one of"):
        weighted_logps(lp, w, "max")
    bad = lp.clone()
    bad[0, 1], bad[2, 3] = float("nan"), float("-inf")
    with pytest.raises(
        ValueError, match=r"NaN/inf token log-probs inside the response \(weight > 0\) in rows \[0, 2\]"
    ):
        weighted_logps(bad, w, "sum")
    neg = w.clone()
    neg[1, 0] = -1
    with pytest.raises(ValueError, match=r"negative token weights in rows \[1\]"):
        weighted_logps(lp, neg, "sum")
    empty = w.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] have no response tokens"):
        weighted_logps(lp, empty, "mean")
    torch.testing.assert_close(weighted_logps(lp - 1, empty, "sum"), torch.tensor([-4.0, -4.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# dpo_loss
# ------------------------------------------------------------------------------------------------
# Three pairs; h = (pc - pr) - (rc - rr) = [2 - 0, -1 - 2, 0 - 2] = [2, -3, -2]; beta = 0.5 -> beta*h = [1, -1.5, -1]
PC, PR, RC, RR = t(-1, -4, -2), t(-3, -3, -2), t(-2, -2, -1), t(-2, -4, -3)


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, [L(1), L(-1.5), L(-1)]),  # = [0.3132617, 1.7014133, 1.3132617]
        # -(1-e) log s(x) - e log s(-x) = L(x) + e*x, since log s(-x) = log s(x) - x; e = 0.2
        ("sigmoid", 0.2, [L(1) + 0.2, L(-1.5) - 0.3, L(-1) - 0.2]),
        ("ipo", 0.0, [1.0, 16.0, 9.0]),  # (h - 1/(2*0.5))^2 = (h - 1)^2
        ("hinge", 0.0, [0.0, 2.5, 2.0]),  # max(0, 1 - beta*h) = max(0, [0, 2.5, 2])
    ],
)
def test_dpo_loss_by_hand(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(
        PC, PR, RC, RR, LossConfig(beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    )
    torch.testing.assert_close(losses, t(*expected))
    torch.testing.assert_close(chosen, t(0.5, -1.0, -0.5))  # 0.5 * (pc - rc) = 0.5 * [1, -2, -1]
    torch.testing.assert_close(rejected, t(-0.5, 0.5, 0.5))  # 0.5 * (pr - rr) = 0.5 * [-1, 1, 1]


def test_dpo_loss_smoothed_numbers_written_out():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, LossConfig(beta=0.5, label_smoothing=0.2))
    torch.testing.assert_close(losses, t(0.5132617, 1.4014133, 1.1132617), atol=1e-7, rtol=0)


def test_dpo_loss_reference_free():
    # h = pc - pr = [2, -1, 0], beta*h = [1, -0.5, 0]; rewards beta*pc, beta*pr
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, LossConfig(beta=0.5, reference_free=True))
    torch.testing.assert_close(losses, t(0.3132617, 0.9740770, math.log(2)), atol=1e-7, rtol=0)
    torch.testing.assert_close(chosen, t(-0.5, -2.0, -1.0))
    torch.testing.assert_close(rejected, t(-1.5, -1.5, -1.0))
    same, _, _ = dpo_loss(PC, PR, None, None, LossConfig(beta=0.5, reference_free=True))
    torch.testing.assert_close(same, losses)


def test_dpo_loss_rewards_are_detached():
    pc = PC.clone().requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, PR, RC, RR, LossConfig(beta=0.5))
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_settings_are_checked_in_one_place():
    with pytest.raises(ValueError, match="loss.beta must be > 0, got 0"):
        LossConfig(beta=0).validate()
    with pytest.raises(ValueError, match="loss.gamma must be >= 1"):
        LossConfig(gamma=0.5).validate()
    with pytest.raises(ValueError, match=r"loss.loss_type must be one of \('sigmoid', 'ipo', 'hinge'\), got 'kto'"):
        LossConfig(loss_type="kto").validate()
    with pytest.raises(ValueError, match=r"loss.label_smoothing must be in \[0, 0.5\), got 0.5"):
        LossConfig(label_smoothing=0.5).validate()
    with pytest.raises(ValueError, match="only defined for loss.loss_type 'sigmoid'"):
        LossConfig(loss_type="ipo", label_smoothing=0.1).validate()
    LossConfig().validate()  # the defaults are valid


def test_dpo_loss_errors():
    with pytest.raises(
        ValueError, match=r"dpo_loss: loss_type must be one of \('sigmoid', 'ipo', 'hinge'\), got 'kto'"
    ):
        dpo_loss(PC, PR, RC, RR, LossConfig(beta=0.1, loss_type="kto"))
    with pytest.raises(ValueError, match=r"must all be \[B\]; got \[\(3,\), \(2,\), \(3,\), \(3,\)\]"):
        dpo_loss(PC, PR[:2], RC, RR, LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="reference log-probs are None"):
        dpo_loss(PC, PR, None, RR, LossConfig(beta=0.1))


# ------------------------------------------------------------------------------------------------
# token_weights: the masks -> weights step, where gamma enters
# ------------------------------------------------------------------------------------------------
def test_token_weights_by_hand():
    answer = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    corrected = torch.tensor([[True, True, False, True, False], [False, True, False, True, False]])
    # corrected outside the answer (row 0 pos 0, row 1 pos 3) weighs 0: the answer mask decides
    expected = torch.tensor([[0, 5, 1, 5, 0], [1, 5, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(token_weights(answer, corrected, 5.0), expected)
    assert token_weights(answer, corrected, 5.0).dtype == torch.float32
    assert torch.equal(token_weights(answer, corrected, 1.0), answer.float())  # gamma 1: plain DPO weights
    with pytest.raises(ValueError, match="masks differ in shape"):
        token_weights(answer, corrected[:, :3], 5.0)


# ------------------------------------------------------------------------------------------------
# DDPOLoss
# ------------------------------------------------------------------------------------------------
G3 = 3.0  # gamma of two_pairs()


def masks(wc, wr, gamma: float = G3):
    """(answer_mask, corrected_mask) [2B, T] in PairBatch row order from weights written by hand
    (0 outside the answer, 1 unchanged, gamma corrected)."""
    return torch.cat([wc > 0, wr > 0]), torch.cat([wc == gamma, wr == gamma])


def two_pairs():
    """Token log-probs and weights (gamma = 3 on corrected tokens; `masks` gives the loss's inputs) for two
    pairs, T = 4.

    pair 0: chosen   [-1, -2, -3] w [1, 3, 1]: sum -10, N 5, mean -2
            rejected [-2, -4]     w [1, 3]:    sum -14, N 4, mean -3.5
            ref chosen   [-1, -1, -1]: sum -5, mean -1; ref rejected [-2, -2]: sum -8, mean -2
    pair 1: chosen   [-0.5, -0.5]   w [1, 1]:    sum -1, mean -0.5
            rejected [-1, -1, -1]   w [1, 1, 1]: sum -3, mean -1
            ref chosen [0, 0]: sum 0, mean 0;    ref rejected [-4, -4, -4]: sum -12, mean -4
    Values outside the answer (weight 0) are junk on purpose: they must not matter.
    """
    nan = float("nan")
    pc = t(nan, -1, -2, -3), t(-0.5, -0.5, 7, 7)
    pr = t(9, -2, -4, nan), t(-1, -1, -1, 0)
    rc = t(0, -1, -1, -1), t(0, 0, 5, 5)
    rr = t(0, -2, -2, 9), t(-4, -4, -4, 0)
    wc = t(0, 1, 3, 1), t(1, 1, 0, 0)
    wr = t(0, 1, 3, 0), t(1, 1, 1, 0)
    return [torch.stack(x) for x in (pc, pr, wc, wr, rc, rr)]


def test_ddpo_loss_mean_normalisation_by_hand():
    pc, pr, wc, wr, rc, rr = two_pairs()
    loss, m = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="mean"))(pc, pr, rc, rr, *masks(wc, wr))
    # h0 = (-2 + 3.5) - (-1 + 2) = 0.5; h1 = (-0.5 + 1) - (0 + 4) = -3.5
    torch.testing.assert_close(loss, torch.tensor((L(0.5) + L(-3.5)) / 2, dtype=torch.float64))
    assert loss.item() == pytest.approx(2.0019137, abs=1e-7)
    expected = {
        "loss": 2.0019137,
        "rewards/chosen": (-1 - 0.5) / 2,  # [-2 - -1, -0.5 - 0]
        "rewards/rejected": (-1.5 + 3) / 2,  # [-3.5 - -2, -1 - -4]
        "rewards/accuracies": 0.5,  # pair 0 only: -1 > -1.5
        "rewards/margins": (0.5 - 3.5) / 2,
        "logps/chosen": (-2 - 0.5) / 2,
        "logps/rejected": (-3.5 - 1) / 2,
        "logps/ref_chosen": (-1 + 0) / 2,
        "logps/ref_rejected": (-2 - 4) / 2,
        # pair 0's corrected tokens (weight 3): chosen 3(-2 - -1)/5 = -0.6, rejected 3(-4 - -2)/4 = -1.5; pair 1 none
        "rewards/margins_corrected": (-0.6 + 1.5 + 0) / 2,
        "rewards/margins_unchanged": ((0.5 - 0.9) - 3.5) / 2,  # the rest of each pair's margin [0.5, -3.5]
    }
    assert set(m) == set(expected)
    for name, value in expected.items():
        assert m[name].dim() == 0 and not m[name].requires_grad
        assert m[name].item() == pytest.approx(value, abs=1e-7), name


def test_ddpo_loss_sum_normalisation_and_sft_by_hand():
    pc, pr, wc, wr, rc, rr = two_pairs()
    # h0 = (-10 + 14) - (-5 + 8) = 1; h1 = (-1 + 3) - (0 + 12) = -10
    loss, m = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="sum"))(pc, pr, rc, rr, *masks(wc, wr))
    assert loss.item() == pytest.approx((L(1) + L(-10)) / 2, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(((-10 + 5) - (-14 + 8) + (-1 - 0) - (-3 + 12)) / 2)
    # SFT: chosen answer tokens -1, -2, -3, -0.5, -0.5 (unweighted) -> mean NLL 7/5 = 1.4; x 0.5 = 0.7
    with_sft, m_sft = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="sum", sft_weight=0.5))(
        pc, pr, rc, rr, *masks(wc, wr)
    )
    assert with_sft.item() == pytest.approx(loss.item() + 0.7, abs=1e-12)
    assert m_sft["loss"].item() == pytest.approx(with_sft.item())


def test_gamma_one_with_sum_is_standard_dpo_on_summed_logps():
    g = torch.Generator().manual_seed(1)
    batch, steps = 5, 11
    lps = [-torch.rand(batch, steps, generator=g, dtype=torch.float64) * 4 for _ in range(4)]
    answers = [(torch.rand(batch, steps, generator=g) > 0.4).double() for _ in range(2)]
    for mask in answers:
        mask[:, 0] = 1  # every answer non-empty
    pc, pr, rc, rr = lps
    corrected = torch.rand(2 * batch, steps, generator=g) > 0.5  # any mask: gamma 1 weighs every answer token 1
    loss, _ = DDPOLoss(LossConfig(beta=0.1, gamma=1.0, normalize="sum"))(
        pc, pr, rc, rr, torch.cat(answers).bool(), corrected
    )
    # standard DPO: sequence log-prob = plain sum over answer tokens
    h = ((pc * answers[0]).sum(1) - (pr * answers[1]).sum(1)) - ((rc * answers[0]).sum(1) - (rr * answers[1]).sum(1))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-0.1 * h)).mean())


def naive_ddpo(pc, pr, wc, wr, rc, rr, beta, normalize, loss_type, eps):
    """The objective spelled out pair by pair with Python loops, sharing nothing with ddpo.loss."""
    total = 0.0
    for i in range(pc.shape[0]):
        seq = []
        for lp, w in ((pc, wc), (pr, wr), (rc, wc), (rr, wr)):
            s = sum(lp[i, j] * w[i, j] for j in range(lp.shape[1]) if w[i, j] > 0)
            seq.append(s / w[i].sum() if normalize == "mean" else s)
        h = (seq[0] - seq[1]) - (seq[2] - seq[3])
        if loss_type == "sigmoid":
            total = total - (1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h))
        elif loss_type == "ipo":
            total = total + (h - 1 / (2 * beta)) ** 2
        else:
            total = total + torch.clamp(1 - beta * h, min=0)
    return total / pc.shape[0]


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_gradients_match_naive_formula(loss_type, eps, normalize):
    g = torch.Generator().manual_seed(2)
    batch, steps = 3, 6
    pc, pr = [(-torch.rand(batch, steps, generator=g, dtype=torch.float64) * 3).requires_grad_() for _ in range(2)]
    rc, rr = [-torch.rand(batch, steps, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    wc, wr = [torch.where(torch.rand(batch, steps, generator=g) > 0.5, 5.0, 1.0).double() for _ in range(2)]
    wc[:, -2:] = 0  # outside the answer
    wr[0, :3] = 0
    beta = 0.7
    loss, _ = DDPOLoss(LossConfig(beta=beta, gamma=5.0, normalize=normalize, loss_type=loss_type, label_smoothing=eps))(
        pc, pr, rc, rr, *masks(wc, wr, 5.0)
    )
    grads = torch.autograd.grad(loss, (pc, pr))
    ref = naive_ddpo(pc, pr, wc, wr, rc, rr, beta, normalize, loss_type, eps)
    ref_grads = torch.autograd.grad(ref, (pc, pr))
    torch.testing.assert_close(loss, ref)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs)
        assert mine.abs().sum() > 0
    assert torch.all(grads[0][:, -2:] == 0) and torch.all(grads[1][0, :3] == 0)


def test_sigmoid_gradient_in_closed_form():
    """d loss / d logp[i, t] (chosen) = -beta * sigma(-beta h_i) * w[i, t] / N_i / B under 'mean'."""
    pc, pr, wc, wr, rc, rr = two_pairs()
    pc = torch.nan_to_num(pc).requires_grad_()
    loss, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="mean"))(pc, pr, rc, rr, *masks(wc, wr))
    (grad,) = torch.autograd.grad(loss, pc)
    h = t(0.5, -3.5)
    expected = -torch.sigmoid(-h)[:, None] * wc / wc.sum(1, keepdim=True) / 2
    torch.testing.assert_close(grad, expected)


def test_reference_free_module_ignores_reference():
    pc, pr, wc, wr, rc, rr = two_pairs()
    loss_none, m = DDPOLoss(LossConfig(beta=1.0, gamma=G3, reference_free=True))(pc, pr, None, None, *masks(wc, wr))
    loss_ref, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3, reference_free=True))(pc, pr, rc, rr, *masks(wc, wr))
    # h = pi_c - pi_r = [-2 + 3.5, -0.5 + 1] = [1.5, 0.5]
    assert loss_none.item() == pytest.approx((L(1.5) + L(0.5)) / 2, abs=1e-12)
    assert loss_ref.item() == pytest.approx(loss_none.item(), abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx((-2 - 0.5) / 2)
    with pytest.raises(ValueError, match="reference token log-probs are None"):
        DDPOLoss(LossConfig(beta=1.0))(pc, pr, None, None, *masks(wc, wr))


def test_module_errors_and_config():
    with pytest.raises(ValueError, match="normalize must be one of"):
        DDPOLoss(LossConfig(normalize="avg"))
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        DDPOLoss(LossConfig(sft_weight=-1))
    with pytest.raises(ValueError, match="beta must be > 0"):
        DDPOLoss(LossConfig(beta=-0.1))
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        DDPOLoss(LossConfig(gamma=0.5))
    settings = LossConfig(beta=0.1, gamma=2.5, normalize="sum", loss_type="ipo", sft_weight=0.2)
    module = DDPOLoss(settings)
    assert module.settings is settings  # stored whole: the config's loss section is the module's settings
    s = module.settings
    assert (s.beta, s.gamma, s.normalize, s.loss_type, s.sft_weight) == (0.1, 2.5, "sum", "ipo", 0.2)
    assert (s.label_smoothing, s.reference_free) == (0.0, False)

    pc, pr, wc, wr, rc, rr = two_pairs()
    pc[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf token log-probs inside the response \(weight > 0\) in rows \[1\]"):
        DDPOLoss(LossConfig(gamma=G3))(pc, pr, rc, rr, *masks(wc, wr))
    with pytest.raises(ValueError, match=r"got \(2, 3\) and \(2, 4\)"):
        DDPOLoss(LossConfig())(pr[:, :3], pr, rc, rr, *masks(wc, wr))
    with pytest.raises(ValueError, match=r"masks hold 2 rows for 2 pairs; pass them in PairBatch layout"):
        DDPOLoss(LossConfig())(pc, pr, rc, rr, wc > 0, wc == G3)


def test_policy_equal_to_reference_gives_log2_and_no_accuracy():
    """At initialisation (policy == reference) h = 0: sigmoid loss = log 2, rewards 0, ties are not wins."""
    pc, pr, wc, wr, _, _ = two_pairs()
    loss, m = DDPOLoss(LossConfig(beta=0.3, gamma=G3))(pc, pr, pc.clone(), pr.clone(), *masks(wc, wr))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["rewards/accuracies"].item() == 0.0
    assert m["rewards/chosen"].item() == m["rewards/rejected"].item() == m["rewards/margins"].item() == 0.0


def test_released_sft_form_by_hand():
    """sft_form 'released' (RLHF-V's SFT_weight term): minus the mean over pairs of the chosen answers'
    weighted sequence log-probs. With normalize 'sum': pair 0 -1 + 3(-2) - 3 = -10, pair 1 -1 -> mean -5.5,
    x 0.5 = 2.75, about 4x the token-mean form's 0.7 here (sum over ~2.5 tokens, gamma 3 on one)."""
    pc, pr, wc, wr, rc, rr = two_pairs()
    plain, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="sum"))(pc, pr, rc, rr, *masks(wc, wr))
    released, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3, normalize="sum", sft_weight=0.5, sft_form="released"))(
        pc, pr, rc, rr, *masks(wc, wr)
    )
    assert released.item() == pytest.approx(plain.item() + 2.75, abs=1e-12)
    # with normalize 'mean' it is the weighted mean: pair 0 -10 / 5 = -2, pair 1 -0.5 -> 0.5 x 1.25 = 0.625
    plain_mean, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3))(pc, pr, rc, rr, *masks(wc, wr))
    released_mean, _ = DDPOLoss(LossConfig(beta=1.0, gamma=G3, sft_weight=0.5, sft_form="released"))(
        pc, pr, rc, rr, *masks(wc, wr)
    )
    assert released_mean.item() == pytest.approx(plain_mean.item() + 0.625, abs=1e-12)
    with pytest.raises(ValueError, match="sft_form must be one of"):
        DDPOLoss(LossConfig(sft_form="sum"))
    assert DDPOLoss(LossConfig(sft_weight=1.0, sft_form="released")).settings.sft_form == "released"
