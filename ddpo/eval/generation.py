"""Batched answer generation through the model interface.

Works with any object that has
`generate(images: list[PIL.Image], prompts: list[str], template=..., max_new_tokens=..., do_sample=...,
temperature=..., top_p=..., num_beams=..., seed=..., stop_strings=..., repetition_penalty=...) -> list[str]`
(`models.build.load_model(path)` returns one). Images are opened one batch at a time. Batch k is
generated with seed `seed + k`, so a run is reproducible for a fixed seed and batch size, and batches do
not share one random stream. Answers are cut at the first stop string (in case the model keeps it) and
stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_strings: list[str] = field(default_factory=list)
    template: str | None = None  # None: the model's default conversation template
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens, batch_size and num_beams must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1.0 = none)")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and top_p in (0, 1]")

    def model_kwargs(self, batch_index: int) -> dict[str, Any]:
        kwargs = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "template", "seed")}
        kwargs["seed"] = self.seed + batch_index
        if self.template is not None:
            kwargs["template"] = self.template
        return kwargs


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
    config: GenerationConfig,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """One answer per (image, prompt). `on_batch(start_index, answers)` is called after each batch
    (used to write answers as they come)."""
    if len(image_paths) != len(prompts):
        raise ValueError(f"{len(image_paths)} images for {len(prompts)} prompts")
    answers: list[str] = []
    for batch_index, start in enumerate(range(0, len(prompts), config.batch_size)):
        batch_prompts = list(prompts[start : start + config.batch_size])
        images = [load_image(p) for p in image_paths[start : start + config.batch_size]]
        outputs = model.generate(images, batch_prompts, **config.model_kwargs(batch_index))
        if len(outputs) != len(batch_prompts):
            raise RuntimeError(f"model.generate returned {len(outputs)} answers for a batch of {len(batch_prompts)}")
        batch_answers = [truncate_at_stop(o, config.stop_strings) for o in outputs]
        answers.extend(batch_answers)
        if on_batch is not None:
            on_batch(start, batch_answers)
    return answers
