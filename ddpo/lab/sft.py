"""Supervised fine-tuning on (image, prompt, answer) triples: the stage before preference learning.

A plain, single-process loop (AdamW, warm-up + cosine from ddpo/schedule.py, clipping): the synthetic
benchmark uses it to create the SFT model whose hallucinations DPO and DDPO then correct. Loss = mean
negative log-prob of the answer tokens, computed through the same `sequence_token_logps` path as
preference training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ddpo.data.collator import collate_sequences, encode_sequences
from ddpo.data.records import IGNORE_INDEX
from ddpo.schedule import lr_lambda


@dataclass
class SFTSettings:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    template: str = "vicuna_v0"
    seed: int = 0


def sft(
    model,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: Sequence[str],
    settings: SFTSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune `model` in place on the triples; returns the loss of every step.

    Batches are drawn from a seeded permutation (reshuffled each epoch); images are preprocessed once.
    """
    if not len(images) == len(prompts) == len(answers):
        raise ValueError(
            f"sft: {len(images)} images, {len(prompts)} prompts, {len(answers)} answers; pass one of each per example"
        )
    encoded = encode_sequences(model.tokenizer, settings.template, model.image_placeholder, prompts, answers)
    pixels = torch.cat([model.preprocess_images(images[i : i + 256]) for i in range(0, len(images), 256)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, math.ceil(settings.warmup_ratio * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.steps, warmup, "cosine"))
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        ids, mask, labels = collate_sequences([encoded[i] for i in batch], model.tokenizer.pad_token_id)
        logps = model.sequence_token_logps(ids, mask, labels, pixels[batch].to(model.dtype))
        loss = -logps.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return losses


@dataclass
class PerceptionSettings:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    # std of the vision tower's position embeddings before pretraining (None: the tower's own init). Why O(1)
    # (lab v3): at CLIP's init (std 0.02) the nine cell tokens of an empty image differ by < 0.005, and 150 steps
    # of pretraining on a per-token cell label left its loss at ln 9 (nothing learned); at std 1 it fell to 0.04
    # in 25 steps with shape and colour learned as fast. A pretrained CLIP tower's features do say where they are.
    # The lab uses 3 (DemoSettings.perception_position_std): at 1 the SFT model still mixed up cells on seed 0.
    position_std: float | None = None


def reset_position_embeddings(model, std: float, generator: torch.Generator) -> int:
    """Redraw every position-embedding table of the vision tower from N(0, std^2); returns how many."""
    tables = [
        m
        for name, m in model.named_modules()
        if "vision_tower" in name and name.endswith("position_embedding") and isinstance(m, torch.nn.Embedding)
    ]
    with torch.no_grad():
        for table in tables:
            table.weight.copy_(torch.randn(table.weight.shape, generator=generator) * std)
    return len(tables)


def pretrain_perception(
    model,
    images: Sequence[Image.Image],
    targets: torch.Tensor,
    num_classes: Sequence[int],
    settings: PerceptionSettings,
) -> list[float]:
    """Teach the vision side to see before captioning, as LLaVA starts from a pretrained CLIP tower.

    targets [n_images, image_tokens, K] (long): for each image token, K labels (e.g. the shape and the
    colour of the object in the cell the token covers, class 0 = empty); one linear head per label on
    the projected image features (`model.encode_images`), cross-entropy summed over labels. Trains the
    vision tower and the projector only; the heads are thrown away. Returns the loss of every step."""
    pixels = torch.cat([model.preprocess_images(images[i : i + 256]) for i in range(0, len(images), 256)])
    features = model.encode_images(pixels[:1].to(model.dtype))
    if targets.shape[:2] != (len(images), features.shape[1]) or targets.shape[2] != len(num_classes):
        raise ValueError(
            f"pretrain_perception: targets must be [{len(images)}, {features.shape[1]}, {len(num_classes)}] "
            f"(images, image tokens, labels), got {list(targets.shape)}"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.position_std is not None and not reset_position_embeddings(model, settings.position_std, generator):
        raise ValueError("pretrain_perception: position_std is set, but the vision tower has no position embedding")
    heads = torch.nn.ModuleList(torch.nn.Linear(features.shape[-1], n) for n in num_classes)
    parts = model.parameter_parts()
    params = [*parts["vision_tower"], *parts["projector"], *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps))
    )
    losses = []
    model.train()
    for _ in range(settings.steps):
        batch = torch.randint(len(images), (settings.batch_size,), generator=generator)
        feats = model.encode_images(pixels[batch].to(model.dtype)).float()
        loss = sum(
            torch.nn.functional.cross_entropy(head(feats).flatten(0, 1), targets[batch, :, k].flatten())
            for k, head in enumerate(heads)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
