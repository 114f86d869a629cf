"""Encoding and collation: labels, corrected-token masks and reference log-probs at exactly the answer positions."""

import logging

import numpy as np
import pytest
import torch
from fixtures import COLORS, PAIRS, all_texts
from PIL import Image

from ddpo.data.collator import EncodingSettings, PairCollator, PairDataset, PairEncoder
from ddpo.data.images import DataError
from ddpo.data.records import PreferenceRecord
from ddpo.data.segments import corrected_word_spans
from ddpo.data.templates import check_image_tokens
from ddpo.data.tokenizer import build_word_tokenizer

PLACEHOLDER = "<image>" * 4


def resize_normalize(images: list[Image.Image]) -> torch.Tensor:
    """A model-like image transform: 4x4 resize, [0, 1] scaling, CHW."""
    arrays = [np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(all_texts())


def make_records() -> list[PreferenceRecord]:
    return [
        PreferenceRecord(images=[Image.new("RGB", (8, 6), COLORS[i])], prompt=q, chosen=c, rejected=r, row_index=10 + i)
        for i, (q, c, r) in enumerate(PAIRS)
    ]


def encoder(tokenizer, **settings) -> PairEncoder:
    return PairEncoder(tokenizer, PLACEHOLDER, EncodingSettings(**{"max_length": 128, **settings}))


def add_ref(record: PreferenceRecord, enc: PairEncoder) -> PreferenceRecord:
    """Distinct made-up reference log-probs, one per answer token: -(k+1)/100 chosen, -(k+1)/10 rejected."""
    pair = enc.encode(record)
    record.ref_chosen_logps = [-(k + 1) / 100 for k in range(len(pair.chosen_ids))]
    record.ref_rejected_logps = [-(k + 1) / 10 for k in range(len(pair.rejected_ids))]
    return record


def naive_rows(pair, T, side, pad_id):
    """Reference layout built token by token: per-position label and corrected flag, then shifted by one."""
    out = []
    for answer, w, ref in [
        (pair.chosen_ids, pair.chosen_corrected, pair.ref_chosen_logps),
        (pair.rejected_ids, pair.rejected_corrected, pair.ref_rejected_logps),
    ]:
        ids = pair.prompt_ids + answer
        labels = [-100] * len(pair.prompt_ids) + answer
        weight_at = [False] * len(pair.prompt_ids) + w  # corrected flag of the token at each position
        ref_at = [0.0] * len(pair.prompt_ids) + (ref or [0.0] * len(answer))
        pad = T - len(ids)
        if side == "right":
            ids, labels, weight_at, ref_at = (
                ids + [pad_id] * pad,
                labels + [-100] * pad,
                weight_at + [False] * pad,
                ref_at + [0.0] * pad,
            )
        else:
            ids, labels, weight_at, ref_at = (
                [pad_id] * pad + ids,
                [-100] * pad + labels,
                [False] * pad + weight_at,
                [0.0] * pad + ref_at,
            )
        out.append((ids, labels, weight_at[1:], ref_at[1:]))  # the mask aligns with labels[:, 1:]
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_matches_a_naive_token_by_token_layout(tokenizer, side):
    enc = encoder(tokenizer)
    pairs = [enc.encode(add_ref(r, enc)) for r in make_records()[:3]]
    batch = PairCollator(tokenizer.pad_token_id, side, resize_normalize)(pairs)
    B, T = 3, batch.input_ids.shape[1]
    assert T == max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert (
        batch.corrected.shape == batch.ref_token_logps.shape == (2 * B, T - 1) and batch.corrected.dtype == torch.bool
    )
    for b, pair in enumerate(pairs):
        for row, (ids, labels, corrected, ref) in zip((b, B + b), naive_rows(pair, T, side, tokenizer.pad_token_id)):
            assert batch.input_ids[row].tolist() == ids
            assert batch.labels[row].tolist() == labels
            assert batch.corrected[row].tolist() == corrected
            assert batch.answer_mask[row].tolist() == [label != -100 for label in labels[1:]]
            assert torch.allclose(batch.ref_token_logps[row], torch.tensor(ref))
            assert batch.attention_mask[row].sum() == len(pair.prompt_ids) + (
                len(pair.chosen_ids) if row < B else len(pair.rejected_ids)
            )
    assert batch.row_indices == [10, 11, 12]
    assert batch.pixel_values.shape == (3, 3, 4, 4)
    assert torch.allclose(batch.pixel_values[1, :, 0, 0], torch.tensor(COLORS[1], dtype=torch.float32) / 255)


def test_the_corrected_mask_sits_on_the_corrected_words(tokenizer):
    # pair 0: "there is a red circle ..." (chosen) vs "there is a blue circle ..." (rejected)
    batch = PairCollator(tokenizer.pad_token_id)([encoder(tokenizer).encode(make_records()[0])])
    for row, word in [(0, "red"), (1, "blue")]:
        corrected = batch.corrected[row].nonzero().flatten().tolist()
        assert [batch.labels[row, t + 1].item() for t in corrected] == [tokenizer.convert_tokens_to_ids(word)]
        assert not (batch.corrected[row] & ~batch.answer_mask[row]).any()  # only answer tokens are corrected


def test_left_and_right_padding_hold_the_same_rows(tokenizer):
    enc = encoder(tokenizer)
    pairs = [enc.encode(add_ref(r, enc)) for r in make_records()]
    right = PairCollator(tokenizer.pad_token_id, "right")(pairs)
    left = PairCollator(tokenizer.pad_token_id, "left")(pairs)
    for r in range(right.input_ids.shape[0]):
        keep_r, keep_l = right.attention_mask[r].bool(), left.attention_mask[r].bool()
        assert torch.equal(right.input_ids[r][keep_r], left.input_ids[r][keep_l])
        assert torch.equal(right.labels[r][keep_r], left.labels[r][keep_l])
        # corrected[t] belongs to the token at t+1: compare where both t and t+1 are real tokens
        pairs_r, pairs_l = keep_r[1:] & keep_r[:-1], keep_l[1:] & keep_l[:-1]
        assert torch.equal(right.corrected[r][pairs_r], left.corrected[r][pairs_l])
        assert torch.equal(right.ref_token_logps[r][pairs_r], left.ref_token_logps[r][pairs_l])
    assert right.corrected.sum() == left.corrected.sum() and right.ref_token_logps.sum() == left.ref_token_logps.sum()


def test_ref_logps_follow_the_answer_tokens(tokenizer):
    enc = encoder(tokenizer)
    record = add_ref(make_records()[1], enc)
    batch = PairCollator(tokenizer.pad_token_id, "left")([enc.encode(record)])
    for row, expected in [(0, record.ref_chosen_logps), (1, record.ref_rejected_logps)]:
        positions = (batch.labels[row, 1:] != -100).nonzero().flatten()
        assert torch.allclose(batch.ref_token_logps[row, positions], torch.tensor(expected))
        assert batch.ref_token_logps[row].count_nonzero() == len(expected)


def test_no_cache_gives_none_and_a_mixed_batch_is_an_error(tokenizer):
    enc = encoder(tokenizer)
    records = make_records()
    assert PairCollator(0)([enc.encode(r) for r in records[:2]]).ref_token_logps is None
    mixed = [enc.encode(add_ref(records[0], enc)), enc.encode(records[1])]
    with pytest.raises(ValueError, match="rows \\[11\\] have no cached reference"):
        PairCollator(0)(mixed)


def test_ref_logps_of_the_wrong_length_are_a_data_error(tokenizer):
    record = make_records()[0]
    record.ref_chosen_logps, record.ref_rejected_logps = [-0.1] * 3, [-0.1] * 3
    with pytest.raises(
        DataError,
        match="row 10, field 'ref_chosen_logps': the reference cache holds 3 log-probs for this answer's 11 tokens; "
        "the cache does not match",
    ):
        encoder(tokenizer).encode(record)


def test_long_answers_are_cut_from_the_end_never_the_image_tokens(tokenizer, caplog):
    full = encoder(tokenizer)
    record = make_records()[2]
    whole = full.encode(record)
    enc = encoder(tokenizer, max_length=len(whole.prompt_ids) + 4)
    add_ref(record, enc)  # as the reference cache stores them: one log-prob per kept token
    with caplog.at_level(logging.WARNING, logger="ddpo.data.collator"):
        dataset = PairDataset([record], enc)
    assert dataset.truncated == [(12, len(whole.prompt_ids), len(whole.chosen_ids), len(whole.rejected_ids))]
    assert (
        f"1 of 1 pairs have an answer longer than the room data.max_length {enc.settings.max_length} leaves"
        in caplog.text
    )
    assert (
        f"row 12, prompt {len(whole.prompt_ids)} + answers {len(whole.chosen_ids)}/{len(whole.rejected_ids)} tokens"
        in caplog.text
    )
    before = enc.num_truncated
    cut = dataset[0]
    assert enc.num_truncated == before + 1
    assert cut.truncated_tokens == len(whole.chosen_ids) - 4 + len(whole.rejected_ids) - 4
    assert cut.prompt_ids == whole.prompt_ids
    for name in ["chosen_ids", "rejected_ids", "chosen_corrected", "rejected_corrected"]:
        assert getattr(cut, name) == getattr(whole, name)[:4]
    assert cut.ref_chosen_logps == [-0.01, -0.02, -0.03, -0.04] and cut.ref_rejected_logps == [-0.1, -0.2, -0.3, -0.4]
    batch = PairCollator(tokenizer.pad_token_id)([cut])
    assert batch.input_ids.shape[1] == enc.settings.max_length
    check_image_tokens(batch.input_ids[0].tolist(), enc.placeholder_ids)
    # Segments come from the whole answers "there are two objects : a red square ..." vs "... three ...":
    # the long match after "objects" anchors the edit, and the 2-token match "there are" at the start
    # is shorter than min_match, so it joins the edit. Diffing the 4 kept tokens alone would mark all 4.
    assert cut.chosen_corrected == [True, True, True, False]
    # A cache that does not cover the kept tokens is blamed, naming both lengths.
    record.ref_chosen_logps = [-0.1] * len(whole.chosen_ids)
    with pytest.raises(
        DataError,
        match=f"holds {len(whole.chosen_ids)} log-probs for this answer's 4 tokens \\({len(whole.chosen_ids)} before "
        f"cutting to data.max_length {enc.settings.max_length}\\)",
    ):
        enc.encode(record)


def test_long_answers_error_names_the_row_and_its_lengths(tokenizer):
    record = make_records()[2]
    whole = encoder(tokenizer).encode(record)
    enc = encoder(tokenizer, max_length=len(whole.prompt_ids) + 4, long_answers="error")
    message = (
        f"row 12, fields 'chosen'/'rejected': prompt {len(whole.prompt_ids)} \\+ answers "
        f"{len(whole.chosen_ids)}/{len(whole.rejected_ids)} tokens exceed data.max_length {enc.settings.max_length}"
    )
    with pytest.raises(DataError, match=message):
        PairDataset([record], enc)
    dataset = PairDataset(make_records(), enc, skip_bad_rows=True)  # every answer is longer than 4 tokens
    assert len(dataset) == 0 and dataset.truncated == []
    assert [m.split(",")[0] for m in dataset.skipped] == [f"row {10 + i}" for i in range(len(PAIRS))]


def test_prompt_that_cannot_fit_is_an_error_or_a_counted_skip(tokenizer, caplog):
    records = make_records()
    long_question = " ".join(["what"] * 60) + " ?"
    records[3].prompt = long_question
    enc = encoder(tokenizer, max_length=64)
    with pytest.raises(
        DataError, match="row 13, field 'prompt': prompt \\+ image tokens take \\d+ tokens.*max_length 64"
    ):
        PairDataset(records, enc)
    with caplog.at_level(logging.WARNING, logger="ddpo.data.collator"):
        dataset = PairDataset(records, enc, skip_bad_rows=True)
    assert len(dataset) == 5 and len(dataset.skipped) == 1 and "skipped 1 of 6" in caplog.text
    assert [dataset[i].row_index for i in range(len(dataset))] == [10, 11, 12, 14, 15]


def test_dataset_is_lazy_and_deterministic_and_batches_through_a_dataloader(tokenizer):
    dataset = PairDataset(make_records(), encoder(tokenizer))
    assert dataset[2] == dataset[2]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, collate_fn=PairCollator(tokenizer.pad_token_id, image_transform=resize_normalize)
    )
    batches = list(loader)
    assert [b.num_pairs for b in batches] == [4, 2] and batches[1].row_indices == [14, 15]
    # both rows of a pair start with the same prompt
    b = batches[0]
    n = len(dataset[0].prompt_ids)
    assert torch.equal(b.input_ids[0, :n], b.input_ids[4, :n])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(long_answers="drop"), "data.long_answers must be one of truncate, error, got 'drop'"),
        (dict(segments="lines"), "data.segments must be one of token_diff, word_diff, spans, none"),
        (dict(label_span="both"), "data.segment_diff and data.label_span must be 'answer' or 'muffin'"),
    ],
)
def test_encoding_settings_name_a_bad_value(settings, message):
    with pytest.raises(ValueError, match=message):
        EncodingSettings(**settings)


def test_encoder_from_the_data_config_takes_its_fields(tokenizer):
    from ddpo.config import DataConfig

    data = DataConfig(template="llava_v1", max_length=77, segments="word_diff", min_match=2, long_answers="error")
    enc = PairEncoder.from_config(data, tokenizer, PLACEHOLDER)
    assert enc.settings == EncodingSettings("llava_v1", 77, "word_diff", 2, long_answers="error")
    assert EncodingSettings() == PairEncoder.from_config(DataConfig(), tokenizer, PLACEHOLDER).settings


def test_segment_modes(tokenizer):
    record = make_records()[0]
    token = encoder(tokenizer, segments="token_diff").encode(record)
    # the word tokenizer's tokens are words: the word-level diff must find the same segments
    word = encoder(tokenizer, segments="word_diff").encode(record)
    assert (word.chosen_corrected, word.rejected_corrected) == (token.chosen_corrected, token.rejected_corrected)
    assert any(token.chosen_corrected)
    assert not any(encoder(tokenizer, segments="none").encode(record).chosen_corrected)
    # Character spans of exactly the corrected words give the word diff's mask.
    record.chosen_spans, record.rejected_spans = corrected_word_spans(record.chosen, record.rejected)
    from_spans = encoder(tokenizer, segments="spans").encode(record)
    assert (from_spans.chosen_corrected, from_spans.rejected_corrected) == (
        word.chosen_corrected,
        word.rejected_corrected,
    )
    record.chosen_spans, record.rejected_spans = [(0, 5)], []  # "there"
    spans = encoder(tokenizer, segments="spans").encode(record)
    assert spans.chosen_corrected == [True] + [False] * (len(spans.chosen_ids) - 1)
    assert not any(spans.rejected_corrected)
    record.chosen_spans = None
    with pytest.raises(DataError, match="row 10.*no span annotations"):
        encoder(tokenizer, segments="spans").encode(record)


def test_muffin_label_span_labels_the_role_prefix(tokenizer):
    """data.label_span 'muffin': the '### Assistant:' tokens end the prompt no more but start both labelled
    answers (the released code labels them); the full sequences are unchanged."""
    record = make_records()[0]
    plain = encoder(tokenizer).encode(record)
    muffin = encoder(tokenizer, label_span="muffin").encode(record)
    role = tokenizer.convert_tokens_to_ids(["###", "Assistant", ":"])
    assert plain.prompt_ids[-3:] == role and muffin.prompt_ids == plain.prompt_ids[:-3]
    assert muffin.chosen_ids == role + plain.chosen_ids and muffin.rejected_ids == role + plain.rejected_ids
    assert muffin.chosen_corrected == [False] * 3 + plain.chosen_corrected  # the role is never a corrected segment
    batch = PairCollator(tokenizer.pad_token_id, image_transform=resize_normalize)([muffin])
    assert int((batch.labels != -100).sum()) == len(muffin.chosen_ids) + len(muffin.rejected_ids)
    with pytest.raises(ValueError, match="role prefix of vicuna_v0"):
        encoder(tokenizer, template="llava_v1", label_span="muffin").encode(record)


def test_muffin_segment_diff_runs_over_prompt_and_answer(tokenizer):
    """data.segment_diff 'muffin' = token_corrections(context = prompt minus BOS, autojunk on)."""
    from ddpo.data.segments import token_corrections

    record = make_records()[1]
    pair = encoder(tokenizer, segment_diff="muffin").encode(record)
    plain = encoder(tokenizer).encode(record)
    expected = token_corrections(plain.chosen_ids, plain.rejected_ids, 3, context=plain.prompt_ids[1:], autojunk=True)
    assert (pair.chosen_corrected, pair.rejected_corrected) == expected
    assert pair.prompt_ids == plain.prompt_ids and pair.chosen_ids == plain.chosen_ids
