"""model.attn_implementation 'flex_attention': the shared-prompt row as a FlexAttention block mask.

PyTorch (2.13) refuses FlexAttention's backward on CPU, and transformers compiles the kernel (minutes on
CPU). The exactness tests therefore run PyTorch's own eager FlexAttention (its reference implementation,
which the compiled kernels must reproduce; it has a backward) with the CPU refusal lifted for the test,
through transformers' real flex_attention path: the block mask, positions and gather are the code under
test. The compiled kernel itself is exercised by experiments/gpu_check.py on a GPU.
"""

import pytest
import torch

from ddpo.models.config import ConfigError
from ddpo.models.shared_prompt import shared_prompt_layout
from tests.models.helpers import pair_batch, tiny_model


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled and with a backward on CPU (PyTorch's reference implementation)."""
    import torch.nn.attention.flex_attention as flex
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


def _logps_and_grads(model, batch, weights, shared: bool):
    model.zero_grad(set_to_none=True)
    logps = torch.cat(model.pair_token_logps(batch, shared_prompt=shared))
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.slow
def test_flex_shared_prompt_equals_two_rows_values_and_grads(arch, word_tokenizer, padding_side, eager_flex):
    model = tiny_model(arch, word_tokenizer, attn_implementation="flex_attention")
    assert model.decoder_attention == "flex_attention"
    assert model.hf_model.config._attn_implementation == "sdpa"  # the vision side keeps sdpa
    batch = pair_batch(
        model,
        word_tokenizer,
        prompt_lengths=[3, 6, 1],
        answer_lengths=[4, 7, 1, 6, 2, 5],
        padding_side=padding_side,
        seed=2,
    )
    weights = torch.rand(batch.answer_mask.shape, generator=torch.Generator().manual_seed(1))

    flex, flex_grads = _logps_and_grads(model, batch, weights, shared=True)
    model.set_decoder_attention("sdpa")
    two_rows, two_row_grads = _logps_and_grads(model, batch, weights, shared=False)

    answer = batch.labels[:, 1:] != -100
    assert (flex[~answer] == 0).all() and (flex[answer] < 0).all()
    torch.testing.assert_close(flex, two_rows, atol=1e-5, rtol=1e-5)
    assert flex_grads.keys() == two_row_grads.keys()
    assert any("embed_tokens" in n for n in flex_grads)
    for name in two_row_grads:
        torch.testing.assert_close(flex_grads[name], two_row_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.slow
def test_flex_two_rows_equals_sdpa(word_tokenizer, eager_flex):
    """Without the shared prompt, transformers builds its own block mask from the 2-D padding mask."""
    model = tiny_model("llava", word_tokenizer, attn_implementation="flex_attention")
    batch = pair_batch(model, word_tokenizer, [2, 5], [3, 6, 4, 2], padding_side="left", seed=7)
    with torch.no_grad():
        flex = torch.cat(model.pair_token_logps(batch, shared_prompt=False))
        model.set_decoder_attention("sdpa")
        sdpa = torch.cat(model.pair_token_logps(batch, shared_prompt=False))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_block_mask_is_the_dense_mask(word_tokenizer):
    """Position by position, the block mask's rule allows exactly what the sdpa bias allows."""
    model = tiny_model("llava", word_tokenizer)
    batch = pair_batch(model, word_tokenizer, [3, 1], [5, 2, 1, 6], padding_side="right", seed=3)
    layout = shared_prompt_layout(batch.input_ids, batch.attention_mask, batch.labels, word_tokenizer.pad_token_id)
    block_mask = layout.block_mask()
    rows, length = layout.segments.shape
    index = torch.arange(length)
    allowed = block_mask.mask_mod(torch.arange(rows)[:, None, None], 0, index[None, :, None], index[None, None, :])
    assert torch.equal(allowed, layout.attention_bias(torch.float32)[:, 0] == 0)
    assert block_mask.shape == (rows, 1, length, length)
    # By hand for pair 0 (answer lengths: rows 0, 1 chosen 5, 2; rows 2, 3 rejected 1, 6): no rejected query
    # sees a chosen key.
    seg = layout.segments[0]
    rejected_q, chosen_k = (seg == 2).nonzero()[:, 0], (seg == 1).nonzero()[:, 0]
    assert len(rejected_q) == 1 and len(chosen_k) == 5
    assert not allowed[0][rejected_q][:, chosen_k].any()


def test_flex_training_on_cpu_raises_with_the_fix(word_tokenizer):
    model = tiny_model("llava", word_tokenizer, attn_implementation="flex_attention")
    batch = pair_batch(model, word_tokenizer, [2], [3, 4], seed=1)
    with pytest.raises(ConfigError, match="no backward pass on CPU.*model.attn_implementation: sdpa"):
        model.pair_token_logps(batch)
