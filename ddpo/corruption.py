"""Corrupted views of a batch's images, for the image-conditional terms (mDPO, CHiP) and TPO's weights.

    corrupted = corrupt_batch(batch, kind, strength, seed, num_image_tokens)

Kinds (`loss.corruption`, amount `loss.corruption_strength` = s in (0, 1]):
    mask_tokens    round(s * N) of the N image tokens' features are zeroed (the model reads
                   `PairBatch.image_keep`); mDPO's code masks visual tokens
    mask_patches   round(s * G^2) cells of a G x G grid over the pixels (G = sqrt(N), the model's patch
                   grid for LLaVA) are set to 0 in normalised space, i.e. the normalisation mean colour
    noise          forward diffusion at noise level s: sqrt(1 - s) * x + sqrt(s) * eps, eps ~ N(0, 1) per
                   pixel of the normalised image (CHiP's diffused image, TPO's noised image)

Each pair's corruption is drawn from its own generator, seeded by (seed, the pair's source row), so a
pair is corrupted the same way in every epoch, batch make-up and process: the reference log-probs of
the corrupted view can be cached once (ddpo/reference.py) and a resumed run sees the same views.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ddpo.data.records import PairBatch

CORRUPTIONS = ("mask_tokens", "mask_patches", "noise")


def _generator(seed: int, row_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + row_index)


def corrupt_batch(batch: PairBatch, kind: str, strength: float, seed: int, num_image_tokens: int) -> PairBatch:
    """A copy of `batch` whose images are corrupted (ids, masks and labels shared, not copied)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corrupt_batch: kind must be one of {CORRUPTIONS} (loss.corruption), got {kind!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"corrupt_batch: strength must be in (0, 1] (loss.corruption_strength), got {strength}")
    if batch.pixel_values is None:
        raise ValueError(
            "corrupt_batch: the batch has no images; the image-conditional terms and visual weights need them"
        )
    pixels = batch.pixel_values
    if kind == "mask_tokens":
        masked = round(strength * num_image_tokens)
        keep = torch.ones(len(batch.row_indices), num_image_tokens)
        for i, row in enumerate(batch.row_indices):
            keep[i, torch.randperm(num_image_tokens, generator=_generator(seed, row))[:masked]] = 0
        return dataclasses.replace(batch, image_keep=keep.to(pixels.device))
    out = pixels.clone()
    if kind == "mask_patches":
        grid = max(1, math.isqrt(num_image_tokens))
        height, width = pixels.shape[-2:]
        ys = [round(k * height / grid) for k in range(grid + 1)]
        xs = [round(k * width / grid) for k in range(grid + 1)]
        masked = round(strength * grid * grid)
        for i, row in enumerate(batch.row_indices):
            for cell in torch.randperm(grid * grid, generator=_generator(seed, row))[:masked].tolist():
                r, c = divmod(cell, grid)
                out[i, :, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 0
    else:  # noise
        for i, row in enumerate(batch.row_indices):
            eps = torch.randn(pixels.shape[1:], generator=_generator(seed, row), dtype=torch.float32)
            out[i] = (math.sqrt(1 - strength) * pixels[i].float() + math.sqrt(strength) * eps.to(pixels.device)).to(
                pixels.dtype
            )
    return dataclasses.replace(batch, pixel_values=out)
