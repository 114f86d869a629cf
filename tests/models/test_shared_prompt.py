"""Shared-prompt forward: one packed [prompt | chosen | rejected] row per pair gives the two-row log-probs and
gradients."""

import pytest
import torch

from ddpo.models.shared_prompt import CHOSEN, PAD, PROMPT, REJECTED, shared_prompt_layout
from tests.models.helpers import pair_batch, tiny_model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _logps_and_grads(model, batch, weights, shared: bool):
    model.zero_grad(set_to_none=True)
    logps = torch.cat(model.pair_token_logps(batch, shared_prompt=shared))
    (logps * weights).sum().backward()
    return logps.detach(), _grads(model)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_shared_prompt_equals_two_rows_values_and_grads(arch, word_tokenizer, padding_side):
    model = tiny_model(arch, word_tokenizer)
    # Prompts of different lengths, chosen longer / shorter than rejected, a 1-token answer.
    batch = pair_batch(
        model,
        word_tokenizer,
        prompt_lengths=[3, 6, 1],
        answer_lengths=[4, 7, 1, 6, 2, 5],
        padding_side=padding_side,
        seed=2,
    )
    weights = torch.rand(batch.answer_mask.shape, generator=torch.Generator().manual_seed(1))

    two_rows, two_row_grads = _logps_and_grads(model, batch, weights, shared=False)
    shared, shared_grads = _logps_and_grads(model, batch, weights, shared=True)

    assert shared.shape == two_rows.shape == batch.answer_mask.shape
    answer = batch.labels[:, 1:] != -100
    assert (shared[~answer] == 0).all() and (shared[answer] < 0).all()
    torch.testing.assert_close(shared, two_rows, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == two_row_grads.keys()
    assert any("vision_tower" in n for n in shared_grads) and any("embed_tokens" in n for n in shared_grads)
    for name in two_row_grads:
        torch.testing.assert_close(shared_grads[name], two_row_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rejected_tokens_do_not_see_the_chosen_answer(word_tokenizer):
    """Changing the chosen answer must leave every rejected log-prob unchanged (and vice versa)."""
    model = tiny_model("llava", word_tokenizer)
    batch = pair_batch(model, word_tokenizer, [2, 4], [5, 3, 4, 6], seed=5)
    altered = pair_batch(model, word_tokenizer, [2, 4], [5, 3, 4, 6], seed=5)
    chosen_answer = altered.labels[:2] != -100
    altered.input_ids[:2][chosen_answer] = torch.flip(altered.input_ids[:2][chosen_answer], [0])
    altered.labels[:2][chosen_answer] = altered.input_ids[:2][chosen_answer]
    with torch.no_grad():
        chosen, rejected = model.pair_token_logps(batch, shared_prompt=True)
        chosen2, rejected2 = model.pair_token_logps(altered, shared_prompt=True)
    assert not torch.allclose(chosen, chosen2)
    torch.testing.assert_close(rejected, rejected2, atol=0, rtol=0)


def test_layout_positions_mask_and_source_by_hand():
    # One pair, right padding: chosen row = [p0 p1 c0 c1 c2], rejected row = [p0 p1 r0 pad pad].
    ids = torch.tensor([[10, 11, 20, 21, 22], [10, 11, 30, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 20, 21, 22], [-100, -100, 30, -100, -100]])
    layout = shared_prompt_layout(ids, mask, labels, pad_token_id=0)
    assert layout.input_ids.tolist() == [[10, 11, 20, 21, 22, 30]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    assert layout.segments.tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED]]
    assert layout.source.tolist() == [[0, 1, 2, 3, 4], [0, 1, 5, 0, 0]]
    allowed = (layout.attention_bias(torch.float32)[0, 0] == 0).int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],  # r0 sees the prompt and itself, not c0..c2
    ]


def test_layout_left_padding_and_padded_packed_rows():
    # Two pairs, left padding; pair 1 packs shorter than pair 0, so its packed row is padded.
    ids = torch.tensor([[5, 6, 7, 8], [0, 5, 9, 1], [5, 6, 2, 3], [0, 0, 5, 4]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 9, 1], [-100, -100, 2, 3], [-100, -100, -100, 4]])
    layout = shared_prompt_layout(ids, mask, labels, pad_token_id=0)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 2, 3], [5, 9, 1, 4, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2, 3], [0, 1, 2, 1, 0, 0]]
    assert layout.segments[1].tolist() == [PROMPT, CHOSEN, CHOSEN, REJECTED, PAD, PAD]
    flat = layout.input_ids.reshape(-1)
    # Every real token of the two-row batch maps to a packed position holding the same id.
    assert torch.equal(flat[layout.source][mask.bool()], ids[mask.bool()])
    bias = layout.attention_bias(torch.float32)
    assert torch.isfinite(torch.softmax(bias[:, 0], dim=-1)).all()  # no all-masked query row


def test_pairs_with_different_prompts_are_refused_by_name():
    ids = torch.tensor([[5, 6, 7], [5, 9, 8]])
    mask = torch.ones_like(ids)
    labels = torch.tensor([[-100, -100, 7], [-100, -100, 8]])
    with pytest.raises(ValueError, match=r"rows 0 and 1 \(pair 0\) do not share one prompt"):
        shared_prompt_layout(ids, mask, labels, pad_token_id=0)


def test_model_shared_prompt_is_on_by_default_and_decides_the_default_forward(word_tokenizer, monkeypatch):
    """model.shared_prompt reaches the built model (on unless the config turns it off), and a forward without
    an explicit `shared_prompt` takes the packed path exactly when it is on."""

    def packed_forwards(model) -> int:
        calls = []
        run_packed = model.shared_prompt_hidden_states
        monkeypatch.setattr(model, "shared_prompt_hidden_states", lambda b: calls.append(b) or run_packed(b))
        with torch.no_grad():
            model.pair_token_logps(pair_batch(model, word_tokenizer, [2], [3, 2]))
        return len(calls)

    default, off = tiny_model("llava", word_tokenizer), tiny_model("llava", word_tokenizer, shared_prompt=False)
    assert (default.shared_prompt, off.shared_prompt) == (True, False)
    assert (packed_forwards(default), packed_forwards(off)) == (1, 0)


@pytest.mark.parametrize("template,padding_side", [("vicuna_v0", "right"), ("llava_v1", "left")])
def test_shared_prompt_on_collated_batches_with_cached_reference(word_tokenizer, template, padding_side):
    """Through the real encoder and collator (templates, end markers, padding side): same log-probs both ways."""
    from PIL import Image

    from ddpo.data.collator import EncodingSettings, PairCollator, PairEncoder
    from ddpo.data.records import PreferenceRecord

    model = tiny_model("llava", word_tokenizer)
    texts = [
        ("Describe the image in detail .", "there is a red circle at the top left .", "there is a blue square ."),
        ("How many objects are there ?", "two .", "there are three objects : a cat , a dog and a frisbee ."),
    ]
    records = [
        PreferenceRecord(
            images=[Image.new("RGB", (32, 32), (40 * i, 90, 200))], prompt=q, chosen=c, rejected=r, row_index=i
        )
        for i, (q, c, r) in enumerate(texts)
    ]
    encoder = PairEncoder(word_tokenizer, model.image_placeholder, EncodingSettings(template, max_length=256))
    pairs = [encoder.encode(r) for r in records]
    for p in pairs:  # a cached reference travels in the batch unchanged
        p.ref_chosen_logps, p.ref_rejected_logps = [-1.0] * len(p.chosen_ids), [-2.0] * len(p.rejected_ids)
    batch = PairCollator(word_tokenizer.pad_token_id, padding_side, model.preprocess_images)(pairs)
    with torch.no_grad():
        two_rows = torch.cat(model.pair_token_logps(batch, shared_prompt=False))
        shared = torch.cat(model.pair_token_logps(batch, shared_prompt=True))
    torch.testing.assert_close(shared, two_rows, atol=1e-5, rtol=1e-5)
    # Log-probs sit exactly where the answer mask and the cached reference do.
    assert torch.equal(shared != 0, batch.answer_mask)
    assert torch.equal(shared != 0, batch.ref_token_logps != 0)


def test_shared_prompt_with_eager_attention(word_tokenizer):
    """The additive 4-D mask works for the eager kernel too (it adds the mask to the scores)."""
    model = tiny_model("llava", word_tokenizer, attn_implementation="eager")
    batch = pair_batch(model, word_tokenizer, [2, 5], [3, 6, 4, 2], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.cat(model.pair_token_logps(batch, shared_prompt=True)),
            torch.cat(model.pair_token_logps(batch, shared_prompt=False)),
            atol=1e-5,
            rtol=1e-5,
        )


def test_shared_prompt_with_gradient_checkpointing(word_tokenizer):
    """Recomputed decoder layers get the same packed mask and positions: same gradients as two rows."""
    model = tiny_model("muffin", word_tokenizer, gradient_checkpointing=True)
    batch = pair_batch(model, word_tokenizer, [3, 1], [2, 5, 6, 3], seed=9)
    weights = torch.rand(batch.answer_mask.shape, generator=torch.Generator().manual_seed(2))
    two_rows, two_row_grads = _logps_and_grads(model, batch, weights, shared=False)
    shared, shared_grads = _logps_and_grads(model, batch, weights, shared=True)
    torch.testing.assert_close(shared, two_rows, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == two_row_grads.keys() and any("vision_tower" in n for n in shared_grads)
    for name in two_row_grads:
        torch.testing.assert_close(shared_grads[name], two_row_grads[name], atol=1e-5, rtol=1e-4, msg=name)
