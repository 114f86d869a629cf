"""Per-token log-probs of both architectures: equal to the naive computation, padding-invariant, image once."""

import pytest
import torch

from tests.models.helpers import naive_token_logps, pair_batch, tiny_model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pair_logps_equal_naive_duplicated_forward_values_and_grads(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer)
    batch = pair_batch(model, word_tokenizer, prompt_lengths=[3, 5], answer_lengths=[4, 6, 2, 5])
    weights = torch.rand(batch.labels.shape[0], batch.labels.shape[1] - 1, generator=torch.Generator().manual_seed(1))

    chosen, rejected = model.pair_token_logps(batch)
    ours = torch.cat([chosen, rejected])
    (ours * weights).sum().backward()
    ours_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    naive = naive_token_logps(model, batch)
    (naive * weights).sum().backward()
    naive_grads = _grads(model)

    assert ours.dtype == torch.float32 and ours.shape == batch.answer_mask.shape
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    assert (ours[batch.labels[:, 1:] == -100] == 0).all()
    assert (ours[batch.labels[:, 1:] != -100] < 0).all()
    # Every parameter that the naive path trains gets the same gradient, the vision tower included.
    assert ours_grads.keys() == naive_grads.keys()
    assert any("vision_tower" in n for n in ours_grads)
    for name in naive_grads:
        torch.testing.assert_close(ours_grads[name], naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_left_and_right_padding_give_the_same_answer_logps(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer)
    right = pair_batch(model, word_tokenizer, [2, 6], [3, 7, 5, 2], padding_side="right", seed=3)
    left = pair_batch(model, word_tokenizer, [2, 6], [3, 7, 5, 2], padding_side="left", seed=3)
    assert not torch.equal(right.input_ids, left.input_ids)  # really padded differently
    with torch.no_grad():
        from_right = torch.cat(model.pair_token_logps(right))
        from_left = torch.cat(model.pair_token_logps(left))
    for row in range(from_right.shape[0]):
        r_answer = from_right[row][right.labels[row, 1:] != -100]
        l_answer = from_left[row][left.labels[row, 1:] != -100]
        assert len(r_answer) == len(l_answer) > 0
        torch.testing.assert_close(r_answer, l_answer, atol=1e-5, rtol=1e-5)


def test_each_image_is_encoded_once_per_pair(arch, word_tokenizer, monkeypatch):
    model = tiny_model(arch, word_tokenizer)
    batch = pair_batch(model, word_tokenizer, [2, 3, 4], [2, 3, 4, 2, 3, 4])
    seen = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: seen.append(pixels.shape[0]) or encode(pixels))
    model.pair_token_logps(batch)
    assert seen == [3]  # B images for 2B = 6 rows, one call


def test_wrong_number_of_image_tokens_names_the_row(arch, word_tokenizer):
    model = tiny_model(arch, word_tokenizer)
    batch = pair_batch(model, word_tokenizer, [2, 2], [2, 2, 2, 2])
    image_positions = (batch.input_ids[3] == model.image_token_id).nonzero()
    batch.input_ids[3, image_positions[0]] = word_tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match="row 3 has"):
        model.pair_token_logps(batch)


def test_logps_chunk_size_does_not_change_results(word_tokenizer):
    big = tiny_model("llava", word_tokenizer, logps_chunk_size=256)
    small = tiny_model("llava", word_tokenizer, logps_chunk_size=3)
    batch = pair_batch(big, word_tokenizer, [2, 4], [5, 6, 7, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            torch.cat(big.pair_token_logps(batch)), torch.cat(small.pair_token_logps(batch)), atol=1e-6, rtol=1e-6
        )
