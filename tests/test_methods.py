"""The dense methods (docs/DENSE_METHODS.md): each weight source and extra term against hand-derived values or a
naive computation (values and gradients), reductions to DPO, the seeded corruptions, TDPO's KL, severity through
the data path, and the recipes: their values against the doc's table, and each one training through `ddpo train`.

L(x) = -log sigma(x): L(1.5) = 0.2014133, L(1) = 0.3132617, L(0.5) = 0.4740770, L(0) = log 2.
"""

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpo.config import ConfigError, load_config
from ddpo.corruption import corrupt_batch
from ddpo.data.collator import EncodingSettings, PairCollator, PairEncoder
from ddpo.data.records import PairBatch, PreferenceRecord
from ddpo.loss import DDPOLoss, LossConfig, LossExtras, dpo_loss, weighted_logps
from ddpo.models.logps import HiddenAndHead, chunked_token_kl
from ddpo.token_weights import length_weights, severity_weights, visual_weights

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.yaml"))
LOG2 = math.log(2)


def L(x: float) -> float:
    return math.log1p(math.exp(-x))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# weight sources, by hand
# ------------------------------------------------------------------------------------------------
def test_length_weights_by_hand():
    # pair 0: chosen 3 answer tokens, rejected 5 -> shared 3; pair 1: chosen 2, rejected 1 -> shared 1
    answer = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool
    )
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0.5, 0, 0, 0, 0], [1, 1, 1, 0.5, 0.5, 0], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(length_weights(answer, 0.5), expected)
    assert torch.equal(length_weights(answer, 1.0), answer.float())  # alpha 1: plain DPO


def test_severity_weights_by_hand():
    answer = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    severity = torch.tensor([[0, 3, 0, 7], [0, 0, 1.5, 0]])  # the 7 sits outside the answer: never used
    assert torch.equal(severity_weights(answer, severity), torch.tensor([[1, 3, 1, 0], [0, 1, 1.5, 1]]))
    with pytest.raises(ValueError, match=">= 0"):
        severity_weights(answer, -severity)


def test_visual_weights_by_hand():
    answer = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # B = 1: chosen row, rejected row
    real = torch.tensor([[-1.0, -2.0, float("nan")], [-1.0, -3.0, -2.0]])
    corrupted = torch.tensor([[-3.0, -2.0, 0.0], [-1.0, -1.0, -2.5]])
    s = torch.sigmoid
    expected = torch.tensor(
        [[s(torch.tensor(2.0)) + 0.5, 1.0, 0.0], [1.0, 1.5 - s(torch.tensor(-2.0)), 1.5 - s(torch.tensor(0.5))]]
    )
    torch.testing.assert_close(visual_weights(answer, real, corrupted), expected)
    real.requires_grad_(True)
    assert not visual_weights(answer, real, corrupted).requires_grad  # computed without gradient (TPO)


# ------------------------------------------------------------------------------------------------
# the loss: weights built in the loss equal weights built by hand; extras by hand and against naive formulas
# ------------------------------------------------------------------------------------------------
def random_batch(b=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -torch.rand(b, T, generator=g, dtype=torch.float64) * 3  # noqa: E731
    answer = torch.rand(2 * b, T, generator=g) > 0.3
    answer[:, 0] = True
    corrected = (torch.rand(2 * b, T, generator=g) > 0.6) & answer
    severity = torch.where(torch.rand(2 * b, T, generator=g) > 0.7, 2.5 * torch.ones(2 * b, T), torch.zeros(2 * b, T))
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
    )


def naive_total(x, beta, normalize, weights, cond=0.0, anchor=0.0, alpha=0.0) -> torch.Tensor:
    """The loss written out in one place with plain tensor ops (float64), from hand-built weights."""
    b = x["pc"].shape[0]
    answer = x["answer"]

    def seq(lp, w):
        total = (torch.where(w > 0, lp, torch.zeros_like(lp)) * w).sum(1)
        return total if normalize == "sum" else total / w.sum(1)

    wc, wr = weights[:b].double(), weights[b:].double()
    d_w, d_l = seq(x["pc"], wc) - seq(x["rc"], wc), seq(x["pr"], wr) - seq(x["rr"], wr)
    kl_c = (x["klc"] * answer[:b]).sum(1)
    kl_r = (x["klr"] * answer[b:]).sum(1)
    h = d_w - d_l - alpha * (kl_r - kl_c.detach())
    loss = -F.logsigmoid(beta * h).mean()
    if cond:
        loss = loss + cond * -F.logsigmoid(beta * (d_w - (seq(x["cc"], wc) - seq(x["rcc"], wc)))).mean()
    if anchor:
        loss = loss + anchor * -F.logsigmoid(beta * d_w).mean()
    return loss


def hand_weights(x, source, gamma=1.0, alpha=1.0):
    """Weights built by hand, position by position (no call into ddpo.token_weights)."""
    answer, b = x["answer"], x["pc"].shape[0]
    w = torch.zeros(answer.shape, dtype=torch.float64)
    real, corrupted = torch.cat([x["pc"], x["pr"]]), torch.cat([x["cc"], x["cr"]])
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
            elif source == "length":
                shared = min(lengths[r % b], lengths[r % b + b])
                w[r, c] = 1.0 if k < shared else alpha
            else:
                s = 1 / (1 + math.exp(-(real[r, c] - corrupted[r, c]).item()))
                w[r, c] = s + 0.5 if r < b else 1.5 - s
            k += 1
    return w


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize(
    "source, gamma, alpha", [("segments", 5.0, 1.0), ("severity", 1.0, 1.0), ("length", 1.0, 0.3), ("visual", 1.0, 1.0)]
)
def test_each_weight_source_equals_the_naive_loss_value_and_gradient(source, gamma, alpha, normalize):
    x = random_batch()
    for k in ("pc", "pr", "cc"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(LossConfig(beta=0.7, gamma=gamma, normalize=normalize, token_weights=source, ld_alpha=alpha))
    loss, _ = loss_fn(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        x["answer"],
        x["corrected"],
        LossExtras(severity=x["severity"], corrupted=(x["cc"], x["cr"])),
    )
    naive = naive_total(x, 0.7, normalize, hand_weights(x, source, gamma, alpha))
    torch.testing.assert_close(loss, naive)
    grads = torch.autograd.grad(loss, [x["pc"], x["pr"]])
    naive_grads = torch.autograd.grad(naive, [x["pc"], x["pr"]])
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n)
    # the weights the loss builds are the hand-built ones
    real, corrupted = torch.cat([x["pc"], x["pr"]]), torch.cat([x["cc"], x["cr"]])
    built = loss_fn.weights(x["answer"], x["corrected"], x["severity"], real, corrupted)
    torch.testing.assert_close(built.double(), hand_weights(x, source, gamma, alpha), atol=1e-6, rtol=0)


def test_conditional_and_anchor_terms_by_hand():
    one = torch.tensor([[True, True]])
    answer = torch.cat([one, one])
    pc, pr = t([-1.0, -2.0]), t([-2.0, -2.0])  # pi_c = -3, pi_r = -4
    rc, rr = t([-1.5, -2.0]), t([-1.0, -2.0])  # ref_c = -3.5, ref_r = -3: D_w = 0.5, D_l = -1 -> h = 1.5
    cc, rcc = t([-1.0, -1.5]), t([-1.0, -1.0])  # D(y_w | I') = -2.5 + 2 = -0.5 -> conditional margin 1
    loss_fn = DDPOLoss(
        LossConfig(beta=1.0, gamma=1.0, normalize="sum", image_conditional_weight=1.0, anchor_weight=1.0)
    )
    loss, metrics = loss_fn(
        pc,
        pr,
        rc,
        rr,
        answer,
        torch.zeros_like(answer),
        LossExtras(corrupted=(cc, cc), ref_corrupted_chosen_token_logps=rcc),
    )
    assert loss.item() == pytest.approx(L(1.5) + L(1.0) + L(0.5), abs=1e-12)
    assert metrics["loss/conditional"].item() == pytest.approx(L(1.0), abs=1e-12)
    assert metrics["loss/anchor"].item() == pytest.approx(L(0.5), abs=1e-12)
    weighted = DDPOLoss(
        LossConfig(beta=1.0, gamma=1.0, normalize="sum", image_conditional_weight=0.2, anchor_weight=3.0)
    )
    value, _ = weighted(
        pc,
        pr,
        rc,
        rr,
        answer,
        torch.zeros_like(answer),
        LossExtras(corrupted=(cc, cc), ref_corrupted_chosen_token_logps=rcc),
    )
    assert value.item() == pytest.approx(L(1.5) + 0.2 * L(1.0) + 3.0 * L(0.5), abs=1e-12)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_conditional_anchor_and_tdpo_value_and_gradient_against_the_naive_formula(normalize):
    x = random_batch(seed=3)
    for k in ("pc", "pr", "cc", "klc", "klr"):
        x[k].requires_grad_(True)
    loss_fn = DDPOLoss(
        LossConfig(
            beta=0.4, gamma=3.0, normalize=normalize, image_conditional_weight=0.5, anchor_weight=2.0, tdpo_alpha=0.3
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
    inputs = [x["pc"], x["pr"], x["cc"], x["klc"], x["klr"]]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    naive_grads = torch.autograd.grad(naive, inputs, allow_unused=True)
    assert grads[3] is None and naive_grads[3] is None  # the chosen answer's KL carries no gradient (TDPO's sg)
    for g, n in zip(grads[:3] + grads[4:], naive_grads[:3] + naive_grads[4:]):
        torch.testing.assert_close(g, n)
    assert metrics["kl/chosen"].item() == pytest.approx((x["klc"] * x["answer"][:3]).sum(1).mean().item())


def test_tdpo_gradient_in_closed_form():
    # h' = h - alpha (KL_r - sg KL_c): dL/dKL_r,t = alpha beta sigma(-beta h') per answer token; dL/dKL_c = 0
    answer = torch.tensor([[True, True, False], [True, False, False]])
    z = torch.zeros(1, 3, dtype=torch.float64)
    klc, klr = t([0.2, 0.1, 9.0]).requires_grad_(True), t([0.4, 9.0, 9.0]).requires_grad_(True)
    loss, _ = DDPOLoss(LossConfig(beta=2.0, gamma=1.0, normalize="sum", tdpo_alpha=0.5))(
        z, z, z, z, answer, torch.zeros_like(answer), LossExtras(kl=(klc, klr))
    )
    h = -0.5 * (0.4 - 0.3)  # h = 0 from the log-probs; the offset uses answer tokens only
    assert loss.item() == pytest.approx(L(2.0 * h), abs=1e-12)
    gc, gr = torch.autograd.grad(loss, [klc, klr], allow_unused=True)
    assert gc is None
    sigma = 1 / (1 + math.exp(2.0 * h))
    torch.testing.assert_close(gr, t([0.5 * 2.0 * sigma, 0.0, 0.0]))


def test_every_extra_off_or_neutral_reduces_to_dpo():
    x = random_batch(seed=5)
    for normalize in ("sum", "mean"):
        plain, _ = DDPOLoss(LossConfig(beta=0.3, gamma=1.0, normalize=normalize))(
            x["pc"], x["pr"], x["rc"], x["rr"], x["answer"], x["corrected"]
        )
        b = x["pc"].shape[0]
        w = x["answer"].double()
        dpo, _, _ = dpo_loss(
            weighted_logps(x["pc"], w[:b], normalize),
            weighted_logps(x["pr"], w[b:], normalize),
            weighted_logps(x["rc"], w[:b], normalize),
            weighted_logps(x["rr"], w[b:], normalize),
            LossConfig(beta=0.3),
        )
        torch.testing.assert_close(plain, dpo.mean())
        neutral = {  # each source / term at its neutral input gives the same loss
            "severity": dict(token_weights="severity"),
            "length": dict(token_weights="length", ld_alpha=1.0),
            "visual": dict(token_weights="visual"),
            "tdpo": dict(tdpo_alpha=0.7),
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
                    corrupted=(x["pc"], x["pr"]),
                    kl=(torch.zeros_like(x["klc"]), torch.zeros_like(x["klr"])),
                ),
            )
            torch.testing.assert_close(loss, plain, msg=name)
    # the conditional term with the corrupted view equal to the real one is log 2 and pushes nothing
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
    with pytest.raises(ValueError, match="corrupted images"):
        DDPOLoss(LossConfig(gamma=1.0, image_conditional_weight=1.0))(*args)
    with pytest.raises(ValueError, match="needs the per-token KL"):
        DDPOLoss(LossConfig(gamma=1.0, tdpo_alpha=1.0))(*args)
    with pytest.raises(ValueError, match="loss.gamma 5.0 weighs corrected segments"):
        DDPOLoss(LossConfig(gamma=5.0, token_weights="visual"))
    with pytest.raises(ValueError, match="loss.ld_alpha 0.5 only acts"):
        DDPOLoss(LossConfig(gamma=1.0, ld_alpha=0.5))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--loss.tdpo_alpha", "0.5"], "loss.tdpo_alpha 0.5 .* set train.reference live"),
        (["--loss.tdpo_alpha", "0.5", "--train.reference", "live", "--deepspeed.zero_stage", "3"], "ZeRO-3"),
        (["--loss.corruption", "blur"], "loss.corruption: expected one of"),
        (["--loss.corruption_strength", "0"], r"loss.corruption_strength must be in \(0, 1\]"),
        (["--loss.token_weights", "severity"], "set loss.gamma 1"),
        (["--loss.anchor_weight", "-1"], "loss.anchor_weight must be >= 0"),
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
# corruptions: exact, seeded per pair
# ------------------------------------------------------------------------------------------------
def image_batch(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    ids = torch.ones(2 * b, 4, dtype=torch.long)
    return PairBatch(
        pixel_values=torch.randn(b, 3, 12, 12, generator=g),
        input_ids=ids,
        attention_mask=ids.clone(),
        labels=ids.clone(),
        corrected=torch.zeros(2 * b, 3, dtype=torch.bool),
        row_indices=list(rows),
    )


def test_noise_is_the_diffusion_step_and_depends_only_on_seed_and_row():
    batch = image_batch([7, 3])
    out = corrupt_batch(batch, "noise", 0.36, seed=1, num_image_tokens=9)
    eps = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(1 * 1_000_003 + 3))
    torch.testing.assert_close(out.pixel_values[1], 0.8 * batch.pixel_values[1] + 0.6 * eps)
    alone = corrupt_batch(
        replace(batch, pixel_values=batch.pixel_values[1:], row_indices=[3]), "noise", 0.36, seed=1, num_image_tokens=9
    )
    assert torch.equal(alone.pixel_values[0], out.pixel_values[1])  # batch make-up does not matter
    assert not torch.equal(
        corrupt_batch(batch, "noise", 0.36, seed=2, num_image_tokens=9).pixel_values, out.pixel_values
    )
    assert torch.equal(batch.pixel_values, image_batch([7, 3]).pixel_values)  # the input is not modified


def test_masks_hide_the_stated_share():
    batch = image_batch([0, 1])
    tokens = corrupt_batch(batch, "mask_tokens", 0.5, seed=0, num_image_tokens=16)
    assert tokens.pixel_values is batch.pixel_values and tokens.image_keep.shape == (2, 16)
    assert (tokens.image_keep == 0).sum(1).tolist() == [8, 8]
    patches = corrupt_batch(batch, "mask_patches", 4 / 9, seed=0, num_image_tokens=9)  # 3 x 3 grid of 4-px cells
    cells = (patches.pixel_values == 0).all(1).reshape(2, 3, 4, 3, 4).all(4).all(2)
    assert cells.sum((1, 2)).tolist() == [4, 4]
    kept = ~cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(
        patches.pixel_values.permute(1, 0, 2, 3)[:, kept], batch.pixel_values.permute(1, 0, 2, 3)[:, kept]
    )


# ------------------------------------------------------------------------------------------------
# the model reads image_keep; severity flows from the record to the batch
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
    with torch.no_grad():
        plain = tiny(batch)
        kept = tiny(replace(batch, image_keep=torch.ones(1, tiny.num_image_tokens)))
        masked = corrupt_batch(batch, "mask_tokens", 1.0, 0, tiny.num_image_tokens)
        shared, rows = tiny(masked, shared_prompt=True), tiny(masked, shared_prompt=False)
        # every image token masked: another image gives the same log-probs
        other = corrupt_batch(
            replace(batch, pixel_values=batch.pixel_values * 0 + 5), "mask_tokens", 1.0, 0, tiny.num_image_tokens
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


# ------------------------------------------------------------------------------------------------
# recipes: the doc's table, and each one trains through `ddpo train`
# ------------------------------------------------------------------------------------------------
def doc_recipes() -> dict[str, dict[str, str]]:
    text = (REPO / "docs" / "DENSE_METHODS.md").read_text()
    block = re.search(r"<!-- recipes:begin -->\n(.*?)<!-- recipes:end -->", text, re.S).group(1).strip().splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block[2:]]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def test_every_recipe_is_in_the_doc_table():
    assert (
        set(doc_recipes()) == set(RECIPES) == {"ddpo_paper", "ddpo_released", "dpo", "chip", "mdpo", "hsa_dpo", "tpo"}
    )


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_values_match_the_doc(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "methods" / f"{name}.yaml")
    defaults = load_config(None, ["--data.format", "synthetic"]).loss
    for key, want in doc_recipes()[name].items():
        got = cfg.train.reference if key == "reference" else getattr(cfg.loss, key)
        expected = getattr(defaults, key) if want == "-" else (want if isinstance(got, str) else float(want))
        assert got == expected, (name, key)
    header = (REPO / "configs" / "methods" / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith("# ") and ("(" in header)  # names its paper or code


# Sigmoid terms at step 1, where the policy is the reference: each is exactly log 2.
TERMS_AT_START = {"chip": 2, "mdpo": 3}


@pytest.mark.slow
def test_every_recipe_trains_through_ddpo_train(tmp_path):
    """`ddpo train configs/methods/NAME.yaml` for every recipe, in one fresh process (the CLI's own entry,
    called once per recipe: one interpreter start instead of seven)."""
    import json
    import subprocess
    import sys

    from test_trainer import THREADS, _env, metrics

    common = [
        "--train.max_steps",
        "2",
        "--train.micro_batch_size",
        "2",
        "--data.synthetic_pairs",
        "8",
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
    ]
    runs = [
        [
            "train",
            str(REPO / "configs" / "methods" / f"{name}.yaml"),
            "--train.output_dir",
            str(tmp_path / name),
            *common,
        ]
        for name in RECIPES
    ]
    # mDPO's conditional term with a live reference: the corrupted view's reference computed on the fly
    runs.append(
        [
            "train",
            str(REPO / "configs" / "methods" / "mdpo.yaml"),
            "--train.output_dir",
            str(tmp_path / "mdpo_live"),
            "--train.reference",
            "live",
            *common,
        ]
    )
    script = (
        "import json, sys; from ddpo.cli import main; sys.exit(max(main(argv) for argv in json.loads(sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in RECIPES:
        out = tmp_path / name
        logged = metrics(out)
        assert [m["step"] for m in logged] == [1, 2] and all(math.isfinite(m["loss"]) for m in logged), name
        assert logged[0]["loss"] == pytest.approx(TERMS_AT_START.get(name, 1) * LOG2, abs=1e-4), name
        assert (out / "final").is_dir(), name
    chip, mdpo = metrics(tmp_path / "chip"), metrics(tmp_path / "mdpo")
    assert chip[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-5) and chip[1]["kl/rejected"] > 0  # KL 0 at the reference
    assert mdpo[0]["loss/conditional"] == pytest.approx(LOG2, abs=1e-4)
    assert (tmp_path / "mdpo" / "reference_cache-corrupted-mask_tokens-0.5-seed0" / "fingerprint.json").is_file()
    # cached and live references of the corrupted view give the same run (float noise of ~300-nat sums x beta 0.1)
    for cached, live in zip(mdpo, metrics(tmp_path / "mdpo_live"), strict=True):
        for key in ("loss", "loss/conditional", "loss/anchor", "rewards/margins"):
            assert cached[key] == pytest.approx(live[key], abs=2e-4), key
