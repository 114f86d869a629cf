"""Shared test set-up: offline, deterministic, CPU-only, small thread count."""

import os

# Before any HF import: never touch the network (an accidental hub id would retry for ~26 s).
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)  # tiny random models hit denormals: ~9x slower without this
torch.set_num_threads(int(os.environ.get("DDPO_TEST_THREADS", "1")))  # 2: a second float order (tests/test_trainer.py)


@pytest.fixture
def word_tokenizer():
    """A real word-level tokenizer with the template words, image tokens and a small vocabulary."""
    from ddpo.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(
        [
            "there is a red circle at the top left and a blue square in the center .",
            "Describe the image in detail . What is in the picture ? How many objects are there ?",
            "one two three four green yellow small large triangle cat dog frisbee bottom right",
            "no yes",
        ]
    )
