"""Released checkpoint layouts, loaded through the code a user runs (structural replicas, models/replicas.py).

RLHF-V / Muffin: sharded .bin + index + a pickled training_args.bin + SentencePiece-only tokenizer +
the released config keys; llava-hf: what save_pretrained of the model and its processor write.
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ddpo.models.muffin as muffin
from ddpo.data.templates import encode_answer, encode_prompt
from ddpo.eval.generation import generate_answers
from ddpo.models.base import GenerationOptions
from ddpo.models.build import build_model, load_model
from ddpo.models.config import ConfigError, ModelConfig
from ddpo.models.muffin import (
    VISION_POSITIONS_KEY,
    checkpoint_shards,
    interpolate_vision_positions,
    map_muffin_key,
    read_shard,
)
from ddpo.models.replicas import muffin_vision_sizes_for_tests, write_llava_hf_checkpoint, write_muffin_checkpoint
from ddpo.reference import image_transform_fingerprint


@pytest.fixture
def tiny_beit3(monkeypatch):
    """'beit3_large' made tiny, so the replicas keep the released tower names."""
    monkeypatch.setattr(muffin, "BEIT3_SIZES", muffin_vision_sizes_for_tests())


def original_weights(directory) -> dict[str, torch.Tensor]:
    state = {}
    for file in checkpoint_shards(directory):
        state.update(read_shard(file))
    return state


def load_muffin(directory, **overrides):
    return build_model(ModelConfig(arch="muffin", muffin_checkpoint=str(directory), **overrides))


def test_muffin_layout_loads_with_its_sentencepiece_tokenizer(tiny_beit3, tmp_path):
    ckpt = write_muffin_checkpoint(tmp_path / "rlhfv", num_shards=3)
    assert (ckpt / "training_args.bin").is_file() and (ckpt / "tokenizer.model").is_file()
    assert not (ckpt / "tokenizer.json").exists()  # SentencePiece only: needs the sentencepiece package
    # the index names the shards; training_args.bin (a pickled object) is never read as weights
    assert [f.name for f in checkpoint_shards(ckpt)] == [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(ckpt / "training_args.bin", weights_only=True)
    model = load_muffin(ckpt, dtype="float32")
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token) == (1, 2, "[PAD]")
    assert tok.convert_tokens_to_ids(["[PAD]", "<im_patch>", "<im_start>", "<im_end>"]) == [400, 401, 402, 403]
    # the released config's bos 0 / eos 1 / pad -1 are not taken over (pad -1 would freeze <im_end>'s row)
    assert model.hf_model.config.text_config.pad_token_id is None
    assert model.hf_model.model.language_model.embed_tokens.padding_idx is None
    # every parameter equals the released tensor under its original name; none is left on the meta device
    ours = model.hf_model.state_dict()
    loaded = {map_muffin_key(k): v for k, v in original_weights(ckpt).items() if map_muffin_key(k) is not None}
    assert set(loaded) == set(ours)
    assert all(torch.equal(ours[k], v) for k, v in loaded.items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # and it runs: the RLHF-V eval prompt tokenizes with SentencePiece and the model answers with what the
    # HF model's own beam search gives on those ids and pixels
    ids = encode_prompt("rlhfv_eval", tok, "Describe the image in detail.", model.image_placeholder)
    assert ids[0] == 1 and ids.count(401) == model.num_image_tokens and tok.unk_token_id not in ids
    image = Image.new("RGB", (64, 48), (9, 99, 199))
    beams = dict(max_new_tokens=4, num_beams=3, repetition_penalty=1.1)
    answer = model.generate(
        [image],
        ["Describe the image in detail."],
        GenerationOptions(template="rlhfv_eval", stop_strings=["###"], **beams),
    )
    out = model.hf_model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=model.preprocess_images([image]),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **beams,
    )
    assert answer == [tok.decode(out[0, len(ids) :], skip_special_tokens=True).split("###")[0].strip()]


def test_muffin_shards_stream_in_bfloat16(tiny_beit3, tmp_path):
    ckpt = write_muffin_checkpoint(tmp_path / "rlhfv", num_shards=2)
    model = load_muffin(ckpt, dtype="bfloat16")
    ours = model.hf_model.state_dict()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, tensor in original_weights(ckpt).items():
        if map_muffin_key(name) is not None:
            assert torch.equal(ours[map_muffin_key(name)], tensor.to(torch.bfloat16)), name


def test_bad_checkpoint_directories_are_named(tiny_beit3, tmp_path):
    ckpt = write_muffin_checkpoint(tmp_path / "rlhfv", num_shards=2)
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not there.*00002-of-00002"):
        checkpoint_shards(ckpt)
    only_args = tmp_path / "args_only"
    only_args.mkdir()
    (only_args / "training_args.bin").write_bytes((ckpt / "training_args.bin").read_bytes())
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.index.json"):
        checkpoint_shards(only_args)


def test_image_size_mismatch_is_an_error_or_an_interpolation(tiny_beit3, tmp_path):
    ckpt = write_muffin_checkpoint(tmp_path / "muffin13b", num_shards=2, tower="beit3_large_patch16_672")
    assert load_muffin(ckpt, dtype="float32").image_transform.size == 672  # null image_size: the checkpoint's
    with pytest.raises(ConfigError, match="672-px checkpoint.*interpolate_positions"):
        load_muffin(ckpt, dtype="float32", image_size=448)
    model = load_muffin(ckpt, dtype="float32", image_size=448, interpolate_positions=True)
    assert model.image_transform.size == 448
    original = original_weights(ckpt)[VISION_POSITIONS_KEY]  # [2 + 1 + 42*42, D]
    ours = model.hf_model.state_dict()[map_muffin_key(VISION_POSITIONS_KEY)]
    assert original.shape[0] == 3 + 42 * 42 and ours.shape[0] == 3 + 28 * 28
    assert torch.equal(ours, interpolate_vision_positions(original, 28))
    assert torch.equal(ours[:3], original[:3])  # the two unused rows and CLS are kept


def test_position_interpolation_by_hand():
    table = torch.cat([torch.randn(3, 2), torch.full((16, 2), 0.25)])  # a constant 4x4 grid
    assert torch.equal(interpolate_vision_positions(table, 4), table)  # same size: untouched
    resized = interpolate_vision_positions(table, 6)
    assert resized.shape == (3 + 36, 2) and torch.equal(resized[:3], table[:3])
    assert torch.allclose(resized[3:], torch.full((36, 2), 0.25), atol=1e-6)  # bicubic keeps a constant
    # a grid whose value is its column, upsampled 2x (align_corners=False): output column 7 samples source
    # column (7 + 0.5) / 2 - 0.5 = 3.25, taps 2..5 at distances 1.25, 0.25, 0.75, 1.75. PyTorch's cubic
    # kernel (a = -0.75) weighs them -0.10546875, 0.87890625, 0.26171875, -0.03515625, so the value is
    # 2 w0 + 3 w1 + 4 w2 + 5 w3 = 3.296875 (and 3.703125 at 3.75, by symmetry); rows stay constant.
    grid = torch.arange(8.0).repeat(8)  # [64]: row-major 8x8, value = column
    up = interpolate_vision_positions(torch.cat([torch.zeros(3, 1), grid[:, None]]), 16)[3:, 0].reshape(16, 16)
    assert up[8, 7:9].tolist() == pytest.approx([3.296875, 3.703125], abs=1e-5)
    assert torch.allclose(up, up[:1].expand(16, 16), atol=1e-5)


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((64, 48), (48, 64), (101, 37), (40, 40))
    ]


@pytest.mark.parametrize("hub_layout", [True, False])
def test_llava_hf_crop_equals_its_processor(tmp_path, hub_layout):
    from transformers import AutoProcessor

    ckpt = write_llava_hf_checkpoint(tmp_path / "llava-hf", image_size=32, hub_layout=hub_layout)
    model = load_model(ckpt)
    assert (model.image_transform.mode, model.image_transform.size, model.template) == ("crop", 32, "llava_v1")
    processor = AutoProcessor.from_pretrained(ckpt)
    images = _images()
    expected = processor(images=images, text=["USER: <image>\nhi ASSISTANT:"] * len(images), return_tensors="pt")[
        "pixel_values"
    ]
    assert torch.allclose(model.preprocess_images(images), expected, rtol=0, atol=1e-6)


def test_pad_mode_by_hand_and_in_the_fingerprint(word_tokenizer):
    from ddpo.models.base import ImageTransform

    mean, std = (0.25, 0.5, 0.75), (0.5, 0.5, 0.5)
    image = Image.new("RGB", (4, 2), (255, 255, 255))  # white, wider than tall
    pixels = ImageTransform(4, mean, std, "pad")([image])[0]  # 4x4: a mean-colour row above and below
    fill = torch.tensor([int(255 * m) / 255 for m in mean])
    expected_fill = (fill - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(pixels[:, 0, :], expected_fill[:, None].expand(3, 4), atol=1e-6)
    assert torch.allclose(pixels[:, 3, :], expected_fill[:, None].expand(3, 4), atol=1e-6)
    white = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(pixels[:, 1:3, :], white[:, None, None].expand(3, 2, 4), atol=1e-6)
    # squashing (resize) would make it all white; a square image is the same in every mode
    assert torch.allclose(
        ImageTransform(4, mean, std, "resize")([image])[0], white[:, None, None].expand(3, 4, 4), atol=1e-6
    )
    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 9, 3), dtype=np.uint8))
    outs = [ImageTransform(6, mean, std, m)([square]) for m in ("pad", "crop", "resize")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    # the mode is part of the reference-cache fingerprint
    from tests.models.helpers import tiny_model

    model = tiny_model("llava", word_tokenizer)
    assert model.image_transform.mode == "pad"  # LLaVA-1.5's default
    before = image_transform_fingerprint(model)
    model.image_transform = ImageTransform(
        model.image_transform.size, model.image_transform.mean, model.image_transform.std, "crop"
    )
    assert image_transform_fingerprint(model) != before
    assert tiny_model("llava", word_tokenizer, image_mode="crop").image_transform.mode == "crop"  # model.image_mode


def test_llava_hf_chat_template_gets_bos_and_eos(tmp_path):
    ckpt = write_llava_hf_checkpoint(tmp_path / "llava-hf")
    tok = load_model(ckpt).tokenizer
    assert tok.chat_template and "{{ bos_token }}" not in tok.chat_template  # llava-hf renders neither BOS nor EOS
    prompt = encode_prompt("chat_template", tok, "What is it?", "<image>" * 16)
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    answer = encode_answer("chat_template", tok, "A dog.")
    assert answer[-1] == tok.eos_token_id and answer.count(tok.eos_token_id) == 1
    assert tok.decode(answer[:-1]).strip() == "A dog."  # the template's trailing space is not labelled
    assert tok.convert_ids_to_tokens(answer[-2:-1]) != ["▁"]


@pytest.mark.slow
def test_shards_are_read_one_at_a_time(tiny_beit3, tmp_path, monkeypatch):
    """Streaming: when a shard is opened, no earlier shard is still referenced (host memory ~ one shard;
    experiments/muffin_load_memory.py measures it)."""
    import gc
    import weakref

    ckpt = write_muffin_checkpoint(tmp_path / "rlhfv", num_shards=4)
    read, alive_at_open = muffin.read_shard, []
    opened = []

    class Shard(dict):  # a dict that can be weakly referenced
        pass

    def tracked_read(file):
        gc.collect()
        alive_at_open.append(sum(ref() is not None for ref in opened))
        shard = Shard(read(file))
        opened.append(weakref.ref(shard))
        return shard

    monkeypatch.setattr(muffin, "read_shard", tracked_read)
    model = load_muffin(ckpt, dtype="bfloat16")
    assert alive_at_open == [0, 0, 0, 0]
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_ddpo_eval_on_a_released_muffin_checkpoint_with_the_rlhfv_protocol(tiny_beit3, tmp_path, monkeypatch, capsys):
    """What a newcomer runs: `ddpo eval --model RLHF-V_DIR --protocol rlhfv` on the released layout. The tiny
    random model answers no yes/no, so the run ends in the unparsed-answer error, with its answers kept."""
    import ddpo.eval.cli as eval_cli

    seen = {}

    def recording(model, images, prompts, options, on_batch=None, decode_batch_size=8):
        seen.update(options=options, decode_batch_size=decode_batch_size, image_mode=model.image_transform.mode)
        return generate_answers(model, images, prompts, options, on_batch, decode_batch_size)

    monkeypatch.setattr(eval_cli, "generate_answers", recording)
    ckpt = write_muffin_checkpoint(tmp_path / "RLHF-V", num_shards=2)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "a.png")
    questions = tmp_path / "pope.jsonl"
    questions.write_text(
        json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "no"}) + "\n"
    )
    out = tmp_path / "pope.json"
    argv = ["--benchmark", "pope", "--model", str(ckpt), "--questions", str(questions), "--image-dir", str(tmp_path)]
    argv += ["--output", str(out), "--protocol", "rlhfv", "--max-new-tokens", "3", "--device", "cpu"]
    assert eval_cli.main(argv) == 1
    assert "1 of 1 answers (100.0%) are unparsed" in capsys.readouterr().err
    assert len((tmp_path / "pope.answers.jsonl").read_text().splitlines()) == 1 and not out.exists()
    options = seen["options"]
    assert (options.template, options.num_beams, options.max_new_tokens) == ("rlhfv_eval", 3, 3)
    assert (options.repetition_penalty, list(options.stop_strings)) == (1.1, ["###"])
    assert seen["decode_batch_size"] == 1  # one question at a time, as muffin_vqa.py decodes
    assert seen["image_mode"] == "resize"  # Muffin's eval transform
