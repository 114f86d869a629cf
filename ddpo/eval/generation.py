"""Batched answer generation through the model interface.

Works with any object that has `generate(images: list[PIL.Image], prompts: list[str], options:
GenerationOptions) -> list[str]` (`models.build.load_model(path)` returns one). Images are opened one
batch at a time and each batch is one `generate` call. Batch k is generated with seed `options.seed + k`,
so a run is reproducible for a fixed seed and batch size, and batches do not share one random stream.
Answers are cut at the first stop string (in case the model keeps it) and stripped.

The model decodes `decode_batch_size` sequences per forward pass, left-padded to the longest prompt. Padding
changes the shapes of the attention and matmul reductions, so in bfloat16 a padded row's logits differ from
its unpadded ones by rounding; where two tokens are nearly tied, greedy and beam search then pick differently
(tests/eval/test_eval_generation.py shows such a case on a tiny random model). The released RLHF-V and RLAIF-V
evaluations decode one question at a time, so their protocols (`ddpo.eval.protocols`) set
`decode_batch_size` 1: no padding at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ddpo.models.base import GenerationOptions

# Sequences per forward pass of the model's `generate`, whatever `options.batch_size` (answers read and
# written per step) says. The model pads and seeds each of its own batches, so sampled and beam-search
# answers depend on this split: it stays the one `ddpo eval`'s reported numbers were generated with.
DECODE_BATCH_SIZE = 8


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the earliest stop string, stripped."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"cannot open image {path}: {e}; check --image-dir") from e


def generate_answers(
    model: Any,
    image_paths: Sequence[str | Path],
    prompts: Sequence[str],
    options: GenerationOptions,
    on_batch: Callable[[int, list[str]], None] | None = None,
    decode_batch_size: int = DECODE_BATCH_SIZE,
) -> list[str]:
    """One answer per (image, prompt), `options.batch_size` images opened, generated and handed to
    `on_batch(start_index, answers)` at a time (so answers can be written as they come); the model
    decodes `decode_batch_size` of them per forward pass (1 = one question at a time, unpadded)."""
    if len(image_paths) != len(prompts):
        raise ValueError(f"{len(image_paths)} images for {len(prompts)} prompts")
    if decode_batch_size < 1:
        raise ValueError(
            f"decode_batch_size is {decode_batch_size}; it must be >= 1 (1 = one question at a time, as the papers)"
        )
    answers: list[str] = []
    for batch_index, start in enumerate(range(0, len(prompts), options.batch_size)):
        batch_prompts = list(prompts[start : start + options.batch_size])
        images = [load_image(p) for p in image_paths[start : start + options.batch_size]]
        seed = None if options.seed is None else options.seed + batch_index
        outputs = model.generate(images, batch_prompts, replace(options, seed=seed, batch_size=decode_batch_size))
        if len(outputs) != len(batch_prompts):
            raise RuntimeError(f"model.generate returned {len(outputs)} answers for a batch of {len(batch_prompts)}")
        batch_answers = [truncate_at_stop(o, options.stop_strings) for o in outputs]
        answers.extend(batch_answers)
        if on_batch is not None:
            on_batch(start, batch_answers)
    return answers
