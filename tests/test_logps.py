"""models.logps against the naive `F.linear -> log_softmax -> gather` path, written independently here."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddpo.models.logps import HiddenAndHead, chunked_token_kl, chunked_token_logps, token_logps

IGNORE = -100


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook formula, in the logits' own dtype: a full log_softmax, then gather."""
    logp = logits[:, :-1].log_softmax(dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.masked_fill(~mask, 0)[..., None]).squeeze(-1)
    return picked * mask


def ragged_labels(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Each row: an ignored prompt of its own length, an answer, then ignored right padding; row 1 all ignored."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for row in range(batch):
        start = 1 + (3 * row) % (length // 2)
        stop = length - (2 * row) % (length // 3)
        labels[row, :start] = IGNORE
        labels[row, stop:] = IGNORE
    labels[1] = IGNORE
    return labels


def random_lm(batch=3, length=13, width=6, vocab=17, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=g, dtype=dtype)
    weight = torch.randn(vocab, width, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    return hidden, weight, b, ragged_labels(batch, length, vocab, seed)


# ------------------------------------------------------------------------------------------------
# token_logps (from logits)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_logps_matches_naive_values_and_gradient(dtype):
    hidden, weight, bias, labels = random_lm(dtype=dtype)
    logits = F.linear(hidden, weight, bias).detach().requires_grad_()
    grad_out = torch.randn(labels.shape[0], labels.shape[1] - 1, dtype=dtype)

    ours = token_logps(logits, labels)
    (g_ours,) = torch.autograd.grad(ours, logits, grad_out)
    ref = naive_token_logps(logits.double(), labels)
    (g_ref,) = torch.autograd.grad(ref, logits, grad_out)

    assert ours.dtype == dtype and ours.shape == (3, 12)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_ours.double(), g_ref.double(), atol=1e-5, rtol=0)
    # the prediction of the last position scores nothing, so its gradient is exactly zero
    assert torch.all(g_ours[:, -1] == 0)


def test_token_logps_hand_computed():
    """Uniform logits over V=4 give log(1/4) at each labelled position, 0 elsewhere."""
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE, 2, IGNORE]])
    out = token_logps(logits, labels)
    torch.testing.assert_close(out, torch.tensor([[-torch.log(torch.tensor(4.0)).item(), 0.0]]))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_token_logps_accepts_half_precision_and_computes_in_float32(half):
    hidden, weight, bias, labels = random_lm(dtype=torch.float32, vocab=300)
    logits = (4 * F.linear(hidden, weight, bias)).to(half).requires_grad_()
    out = token_logps(logits, labels)
    # float32 result equal to the naive formula on the (exactly representable) upcast bf16 values;
    # a bf16 log_softmax is off by ~0.1 here.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_token_logps(logits.float(), labels), atol=1e-5, rtol=0)
    out.sum().backward()
    assert logits.grad.dtype == half
    upcast = logits.detach().float().requires_grad_()
    naive_token_logps(upcast, labels).sum().backward()
    torch.testing.assert_close(logits.grad.float(), upcast.grad, atol=1e-2, rtol=1e-2)


def test_token_logps_errors_name_the_problem():
    logits, labels = torch.zeros(2, 5, 7), torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and labels \(2, 6\)"):
        token_logps(logits, labels)
    with pytest.raises(ValueError, match="labels integer"):
        token_logps(logits, torch.zeros(2, 5))
    bad = torch.zeros(2, 5, 7)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite log-probs at output positions \[1, 2\]"):
        token_logps(bad, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels\[0, 3\] = 7 is not a token id in \[0, 7\)"):
        token_logps(logits, torch.tensor([[0, 0, 0, 7, 0], [0] * 5]))


def test_token_logps_non_finite_logit_at_ignored_position_is_harmless():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = float("inf")  # predicts labels[0, 1], which is ignored
    out = token_logps(logits, torch.tensor([[0, IGNORE, 1]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, -torch.log(torch.tensor(4.0)).item()]]))


# ------------------------------------------------------------------------------------------------
# chunked_token_logps (from hidden states + LM head)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_matches_naive_values_and_gradients(chunk_size, with_bias):
    hidden, weight, bias, labels = random_lm(bias=with_bias)
    inputs = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    grad_out = torch.randn(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)

    ours = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size, lm_head_bias=bias)
    grads_ours = torch.autograd.grad(ours, inputs, grad_out)
    ref = naive_token_logps(F.linear(hidden, weight, bias), labels)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)

    assert ours.dtype == torch.float64 and ours.shape == (3, 12)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for mine, theirs in zip(grads_ours, grads_ref):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=0)


def test_chunked_float32_matches_float64_naive():
    hidden, weight, bias, labels = random_lm(dtype=torch.float32, length=40, vocab=50)
    inputs = [t.requires_grad_() for t in (hidden, weight, bias)]
    ours = chunked_token_logps(hidden, weight, labels, chunk_size=7, lm_head_bias=bias)
    grads_ours = torch.autograd.grad(ours.sum(), inputs)
    doubles = [t.detach().double().requires_grad_() for t in inputs]
    ref = naive_token_logps(F.linear(*doubles), labels)
    grads_ref = torch.autograd.grad(ref.sum(), doubles)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    for mine, theirs in zip(grads_ours, grads_ref):
        torch.testing.assert_close(mine.double(), theirs, atol=1e-5, rtol=0)


def test_chunked_frozen_weight_or_frozen_hidden():
    hidden, weight, bias, labels = random_lm()
    ref_inputs = [t.clone().requires_grad_() for t in (hidden, weight)]
    grads_ref = torch.autograd.grad(naive_token_logps(F.linear(*ref_inputs), labels).sum(), ref_inputs)

    h = hidden.clone().requires_grad_()  # frozen LM head: weight.requires_grad is False
    chunked_token_logps(h, weight, labels, chunk_size=5).sum().backward()
    torch.testing.assert_close(h.grad, grads_ref[0], atol=1e-10, rtol=0)

    w = weight.clone().requires_grad_()  # hidden states without gradient
    chunked_token_logps(hidden, w, labels, chunk_size=5).sum().backward()
    torch.testing.assert_close(w.grad, grads_ref[1], atol=1e-10, rtol=0)

    assert not chunked_token_logps(hidden, weight, labels).requires_grad


def test_chunked_ignored_positions_are_zero_with_zero_gradient():
    hidden, weight, bias, labels = random_lm()
    hidden.requires_grad_()
    out = chunked_token_logps(hidden, weight, labels, chunk_size=4, lm_head_bias=bias)
    out.sum().backward()
    ignored = labels[:, 1:] == IGNORE
    assert torch.all(out[ignored] == 0) and torch.all(out[~ignored] < 0)
    assert torch.all(out[1] == 0)  # the all-ignored row
    # hidden[b, t] gets gradient iff labels[b, t+1] is scored
    has_grad = hidden.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad[:, :-1], ~ignored) and not has_grad[:, -1].any()

    everything_ignored = torch.full_like(labels, IGNORE)
    h, w = hidden.detach().requires_grad_(), weight.detach().clone().requires_grad_()
    out = chunked_token_logps(h, w, everything_ignored)
    out.sum().backward()
    assert (
        torch.equal(out, torch.zeros(3, 12, dtype=torch.float64)) and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    )


class OpRecorder(TorchDispatchMode):
    """Records every op run while active, with the dtype and size of what it produced."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else [result]
        self.ops += [(func.overloadpacket.__name__, t.dtype, t.numel()) for t in outputs if isinstance(t, torch.Tensor)]
        return result

    def count(self, *names: str) -> int:
        return sum(op in names for op, _, _ in self.ops)


@pytest.mark.parametrize("trainable_head, chunk_size", [(False, 8), (True, 8), (True, 1000)])
def test_chunked_bf16_matmuls_in_bf16_statistics_in_float32(trainable_head, chunk_size):
    """bf16 inputs: matmuls in bf16 (no float32 copy of the LM head), log-softmax statistics in float32,
    equal to the naive bf16 head (bf16 logits from F.linear, then log-softmax in float32)."""
    hidden, weight, bias, labels = random_lm(dtype=torch.float32, vocab=300, width=32)
    hidden, weight = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_(trainable_head)
    grad_out = torch.randn(labels.shape[0], labels.shape[1] - 1, generator=torch.Generator().manual_seed(3))
    with OpRecorder() as ops:
        out = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size)  # 1000: the softmax is kept
        out.backward(grad_out)
    assert out.dtype == torch.float32
    assert not any(dtype == torch.float32 and n >= weight.numel() for _, dtype, n in ops.ops)  # no float32 [V, H]
    assert all(dtype == torch.bfloat16 for op, dtype, _ in ops.ops if op in ("mm", "addmm", "addmm_"))

    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(trainable_head)
    ref = naive_token_logps(F.linear(h, w).float(), labels)  # bf16 logits, float32 log-softmax (the HF head)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert hidden.grad.dtype == torch.bfloat16 and (not trainable_head or weight.grad.dtype == torch.bfloat16)

    # Gradients: both round to bf16 at different points; against the float64 computation on the same bf16
    # values, ours is as accurate as the naive bf16 head (measured: hidden 0.022 vs 0.017, weight equal, of ~6).
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(trainable_head)
    naive_token_logps(F.linear(h64, w64), labels).backward(grad_out.double())
    pairs = [(hidden, h, h64)] + ([(weight, w, w64)] if trainable_head else [])
    for ours, naive, exact in pairs:
        error, naive_error = (
            (ours.grad.double() - exact.grad).abs().max(),
            (naive.grad.double() - exact.grad).abs().max(),
        )
        assert error <= 2 * naive_error + 1e-3, (float(error), float(naive_error))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_frozen_head_gradient_computed_in_forward(chunk_size, with_bias):
    """Frozen LM head: the forward does both matmuls per chunk, the backward none (only a scaling)."""
    hidden, weight, bias, labels = random_lm(bias=with_bias)
    hidden.requires_grad_()
    grad_out = torch.randn(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    chunks = -(-int((labels[:, 1:] != IGNORE).sum()) // chunk_size)
    with OpRecorder() as forward:
        ours = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size, lm_head_bias=bias)
    with OpRecorder() as backward:
        (grad,) = torch.autograd.grad(ours, [hidden], grad_out)
    assert forward.count("mm", "addmm", "addmm_") == 2 * chunks and backward.count("mm", "addmm", "addmm_") == 0

    h = hidden.detach().clone().requires_grad_()
    ref = naive_token_logps(F.linear(h, weight, bias), labels)
    (grad_ref,) = torch.autograd.grad(ref, [h], grad_out)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-10, rtol=0)


def test_chunked_trainable_head_backward_recomputes_by_vocabulary_block():
    """Trainable LM head: one matmul per chunk forward; per vocabulary block backward: logits, weight and
    hidden gradients (3), each weight-gradient block written once."""
    hidden, weight, _, labels = random_lm(bias=False)  # V = 17, N = 24 labelled tokens
    hidden.requires_grad_(), weight.requires_grad_()
    n = int((labels[:, 1:] != IGNORE).sum())
    with OpRecorder() as forward:
        out = chunked_token_logps(hidden, weight, labels, chunk_size=5)
    with OpRecorder() as backward:
        out.sum().backward()
    block = 5 * 17 // n
    assert forward.count("mm", "addmm", "addmm_") == -(-n // 5) and backward.count("mm", "addmm", "addmm_") == 3 * -(
        -17 // block
    )


@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_trainable_head_keeps_the_softmax_when_one_chunk_holds_every_token(with_bias):
    """N <= chunk_size: the forward's softmax serves the backward (1 matmul forward, 2 backward: the
    naive head's 3); gradients equal the naive head's, also on a second backward through a retained
    graph (the kept block is spent by the first, so the second recomputes)."""
    hidden, weight, bias, labels = random_lm(bias=with_bias)  # N = 24 labelled tokens, V = 17
    inputs = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    grad_out = torch.randn(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    ref = naive_token_logps(F.linear(hidden, weight, bias), labels)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    with OpRecorder() as forward:
        out = chunked_token_logps(hidden, weight, labels, chunk_size=24, lm_head_bias=bias)
    with OpRecorder() as backward:
        grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    assert forward.count("mm", "addmm", "addmm_") == 1 and backward.count("mm", "addmm", "addmm_") == 2
    with OpRecorder() as again:
        grads_again = torch.autograd.grad(out, inputs, grad_out)
    assert again.count("mm", "addmm", "addmm_") == 3  # recomputed
    for mine, mine_again, theirs in zip(grads, grads_again, grads_ref):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=0)
        torch.testing.assert_close(mine_again, theirs, atol=1e-10, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_chunked_never_materialises_full_logits():
    batch, length, width, vocab, chunk = 2, 32, 4, 64, 4
    hidden, weight, _, labels = random_lm(batch, length, width, vocab, dtype=torch.float32, bias=False)
    labels[:] = 1  # every position labelled: the worst case
    hidden.requires_grad_(), weight.requires_grad_()
    with LargestTensor() as probe:
        chunked_token_logps(hidden, weight, labels, chunk_size=chunk).sum().backward()
    # one chunk of logits is chunk * V = 256 = V * H (weight grad) = B * T * H (hidden grad); B*T*V = 4096
    assert probe.largest == chunk * vocab < batch * length * vocab
    with LargestTensor() as probe:
        naive_token_logps(F.linear(hidden, weight), labels).sum().backward()
    assert probe.largest >= batch * (length - 1) * vocab  # the probe does see full logits


def test_chunked_errors_name_the_problem():
    hidden, weight, bias, labels = random_lm()
    with pytest.raises(ValueError, match=r"hidden \(3, 13, 6\) and labels \(3, 12\)"):
        chunked_token_logps(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match=r"H = 6 \(hidden size\), got \(17, 5\)"):
        chunked_token_logps(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match=r"lm_head_bias must be \[V\] = \[17\], got \(16,\)"):
        chunked_token_logps(hidden, weight, labels, lm_head_bias=bias[:16])
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunked_token_logps(hidden, weight, labels, chunk_size=0)
    labels[2, 5] = 17
    with pytest.raises(ValueError, match=r"labels\[2, 5\] = 17 is not a token id in \[0, 17\)"):
        chunked_token_logps(hidden, weight, labels)
    labels[2, 5] = 0
    hidden[0, 4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite log-probs at output positions \[0, 4\]"):
        chunked_token_logps(hidden, weight, labels)


# ------------------------------------------------------------------------------------------------
# chunked_token_kl (TDPO's per-position KL, each side from hidden states + its LM head)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_kl_equals_the_full_softmax_kl_with_biases(chunk_size):
    policy_hidden, policy_weight, policy_bias, labels = random_lm(seed=0)
    reference_hidden, reference_weight, reference_bias, _ = random_lm(seed=1)
    inputs = [t.requires_grad_() for t in (policy_hidden, policy_weight, policy_bias)]
    kl = chunked_token_kl(
        HiddenAndHead(policy_hidden, policy_weight, policy_bias),
        HiddenAndHead(reference_hidden, reference_weight, reference_bias),
        labels,
        chunk_size=chunk_size,
    )
    reference_logp = F.linear(reference_hidden, reference_weight, reference_bias).log_softmax(-1)[:, :-1]
    policy_logp = F.linear(policy_hidden, policy_weight, policy_bias).log_softmax(-1)[:, :-1]
    full = (reference_logp.exp() * (reference_logp - policy_logp)).sum(-1)
    naive = torch.where(labels[:, 1:] != IGNORE, full, torch.zeros_like(full))
    assert kl.dtype == torch.float32 and kl.shape == (3, 12) and torch.all(kl[1] == 0)  # row 1: all ignored
    torch.testing.assert_close(kl.double(), naive, atol=1e-5, rtol=1e-5)  # float32 inside
    weights = torch.rand(kl.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = torch.autograd.grad((kl * weights).sum(), inputs)
    theirs = torch.autograd.grad((naive * weights).sum(), inputs)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine.double(), expected, atol=1e-5, rtol=1e-5)
    same = HiddenAndHead(reference_hidden, reference_weight, reference_bias)
    assert torch.equal(chunked_token_kl(same, same, labels), torch.zeros(3, 12))


def test_chunked_kl_names_mismatched_shapes():
    hidden, weight, _, labels = random_lm()
    with pytest.raises(ValueError, match=r"chunked_token_kl: .*got \(3, 13, 6\), \(3, 12, 6\) and \(3, 13\)"):
        chunked_token_kl(HiddenAndHead(hidden, weight), HiddenAndHead(hidden[:, :-1], weight), labels)
