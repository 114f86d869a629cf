"""Generation through the shared interface: strings, seeded sampling, left-padded batches = one by one."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ddpo.models.base import GenerationOptions
from tests.models.helpers import tiny_model

PROMPTS = ["What is in the picture ?", "How many objects are there ?", "Describe the image in detail ."]


@pytest.fixture
def images():
    return [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("RGB", (20, 50), (0, 0, 255)),
        Image.fromarray(torch.randint(0, 255, (24, 24, 3), generator=torch.Generator().manual_seed(0)).byte().numpy()),
    ]


def test_greedy_left_padded_batch_equals_one_by_one(arch, word_tokenizer, images):
    model = tiny_model(arch, word_tokenizer, seed=2)
    template = "vicuna_v0" if arch == "muffin" else "llava_v1"
    batched = model.generate(images, PROMPTS, GenerationOptions(template=template, max_new_tokens=6, batch_size=3))
    one = GenerationOptions(template=template, max_new_tokens=6)
    single = [model.generate([im], [p], one)[0] for im, p in zip(images, PROMPTS)]
    assert all(isinstance(a, str) for a in batched)
    assert batched == single
    assert any(batched)  # a random model still says something
    assert not any("<image>" in a or "<im_patch>" in a or "</s>" in a for a in batched)


def test_sampling_is_deterministic_under_a_seed(arch, word_tokenizer, images):
    model = tiny_model(arch, word_tokenizer, seed=2)

    def run(seed: int) -> list[str]:
        return model.generate(
            images, PROMPTS, GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed)
        )

    state = torch.get_rng_state()
    first = run(3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert run(3) == first
    assert any(run(s) != first for s in (4, 5, 6))


def test_generation_stops_at_a_stop_string_and_keeps_training_mode(word_tokenizer, images):
    model = tiny_model("llava", word_tokenizer, seed=2)
    model.train()
    sampled = GenerationOptions(max_new_tokens=8, do_sample=True, seed=0)
    full = model.generate(images[:1], PROMPTS[:1], sampled)[0]
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = model.generate(images[:1], PROMPTS[:1], dataclasses.replace(sampled, stop_strings=[stop]))[0]
    assert cut == full.split(stop, 1)[0].strip()
    assert model.training


def test_one_image_per_prompt_is_required(word_tokenizer, images):
    model = tiny_model("llava", word_tokenizer)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        model.generate(images[:2], PROMPTS)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens is 0; it must be >= 1"),
        (dict(batch_size=0), "batch_size is 0; it must be >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty is 0.0; it must be > 0"),
        (dict(do_sample=True, temperature=0.0), "sampling needs temperature > 0"),
        (dict(do_sample=True, top_p=1.5), "top_p in \\(0, 1\\]"),
    ],
)
def test_generation_options_name_a_bad_setting(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**options)


def test_generation_options_take_stop_strings_as_a_list_and_greedy_ignores_temperature():
    with pytest.raises(TypeError, match="stop_strings is the string '###'; give a list of strings"):
        GenerationOptions(stop_strings="###")
    assert GenerationOptions(temperature=0.0, stop_strings=["###"]).stop_strings == ["###"]


def test_preprocess_images_is_a_deterministic_bicubic_resize_and_normalisation(word_tokenizer, images):
    model = tiny_model("muffin", word_tokenizer)  # mean = std = 0.5: pixel p -> (p / 255 - 0.5) / 0.5
    pixels = model.preprocess_images(images)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, 0], torch.ones(32, 32))  # red channel of a pure-red image
    torch.testing.assert_close(pixels[0, 2], -torch.ones(32, 32))
    expected = torch.from_numpy(np.array(images[2].resize((32, 32), Image.Resampling.BICUBIC))).float()
    torch.testing.assert_close(pixels[2], (expected.permute(2, 0, 1) / 255 - 0.5) / 0.5)
    assert torch.equal(pixels, model.preprocess_images(images))
