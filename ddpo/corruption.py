"""Corrupted views of a batch's images, for the image-conditional terms (mDPO, CHiP) and TPO's visual scores.

    view = Corruption.from_loss(cfg.loss, pixel_mean, pixel_std)
    corrupted = corrupt_batch(batch, view, num_image_tokens, draw)

Kinds (`loss.corruption`; docs/DENSE_METHODS.md says which method uses which):
    mask_tokens    round(s * N) of the N image tokens' features are zeroed (the model reads
                   `PairBatch.image_keep`), s = loss.corruption_strength
    mask_patches   round(s * G^2) cells of a G x G grid over the pixels (G = sqrt(N), the model's patch
                   grid for LLaVA) are set to 0 in normalised space, i.e. the normalisation mean colour
    noise          sqrt(1 - s) * x + sqrt(s) * eps, eps ~ N(0, 1) per value of the normalised image
    diffusion      the forward diffusion q(x_t | x_0) at step t = loss.diffusion_step of the 1000-step
                   sigmoid schedule CHiP and TPO both use: sqrt(abar_t) x + sqrt(1 - abar_t) eps, on the
                   normalised image (CHiP) or on the [0, 1] pixels, clamped and re-normalised (TPO)
    crop           mDPO: a random crop covering a share in [loss.crop_min_area, loss.crop_max_area] of the
                   image (aspect ratio in [3/4, 4/3], log-uniform), resized back to full size (bilinear)

Every random draw comes from a generator seeded by (seed, the pair's source row, `draw`), never from the
global generator: a pair's view does not depend on batch make-up, process count or what ran before, so
a resumed run sees the same views. `draw` = () gives one fixed view per pair (cacheable: the reference
log-probs of that view can be computed once, ddpo/reference.py); the trainer passes (step,) to redraw
at every optimizer step (CHiP and TPO draw a fresh noisy image each time a sample is loaded) or
(step, stream) to give the policy and the reference their own draws (mDPO crops inside each forward).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddpo.data.records import PairBatch

CORRUPTIONS = ("mask_tokens", "mask_patches", "noise", "diffusion", "crop")
DIFFUSION_SPACES = ("normalized", "pixels")
CORRUPTION_DRAWS = ("pair", "step", "forward")
DIFFUSION_STEPS = 1000
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which mDPO's crop keeps


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One corruption, fully specified (`from_loss` reads it from the `loss:` settings).
    pixel_mean / pixel_std: the model's image normalisation, needed by diffusion in 'pixels' space only."""

    kind: str
    strength: float = 0.5
    seed: int = 0
    diffusion_step: int = 500
    diffusion_space: str = "normalized"
    crop_area: tuple[float, float] = (0.01, 0.2)
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    @classmethod
    def from_loss(
        cls, loss_cfg, pixel_mean: Sequence[float] | None = None, pixel_std: Sequence[float] | None = None
    ) -> Corruption:
        return cls(
            kind=loss_cfg.corruption,
            strength=loss_cfg.corruption_strength,
            seed=loss_cfg.corruption_seed,
            diffusion_step=loss_cfg.diffusion_step,
            diffusion_space=loss_cfg.diffusion_space,
            crop_area=(loss_cfg.crop_min_area, loss_cfg.crop_max_area),
            pixel_mean=None if pixel_mean is None else tuple(pixel_mean),
            pixel_std=None if pixel_std is None else tuple(pixel_std),
        )

    def describe(self) -> str:
        """The parameters this kind reads, as a stable string (a reference-cache fingerprint entry)."""
        if self.kind == "diffusion":
            return f"diffusion:t{self.diffusion_step}:{self.diffusion_space}:seed{self.seed}"
        if self.kind == "crop":
            return f"crop:{self.crop_area[0]!r}-{self.crop_area[1]!r}:seed{self.seed}"
        return f"{self.kind}:{self.strength!r}:seed{self.seed}"


def diffusion_alpha_bar(step: int) -> float:
    """abar_t = prod_{i <= t} (1 - beta_i) of the schedule in CHiP's and TPO's `add_diffusion_noise`:
    beta_i = 1e-5 + (5e-3 - 1e-5) * sigmoid(-6 + 12 i / 999), i = 0..999 (not the linear 1e-4..0.02 DDPM
    schedule). Step 500 keeps abar = 0.7448: noise std 0.505 against signal 0.863."""
    if not 0 <= step < DIFFUSION_STEPS:
        raise ValueError(
            f"diffusion_alpha_bar: step must be in [0, {DIFFUSION_STEPS - 1}] (loss.diffusion_step), got {step}"
        )
    grid = torch.linspace(-6.0, 6.0, DIFFUSION_STEPS, dtype=torch.float64)
    betas = torch.sigmoid(grid) * (5e-3 - 1e-5) + 1e-5
    return float(torch.prod(1 - betas[: step + 1]))


def _generator(seed: int, row_index: int, draw: tuple[int, ...] = ()) -> torch.Generator:
    if not draw:  # the fixed per-pair view keeps the seeding its reference caches were computed with
        return torch.Generator().manual_seed(seed * 1_000_003 + row_index)
    # SeedSequence mixes the integers into a well-spread 64-bit seed, the same in every NumPy version
    state = np.random.SeedSequence([seed, row_index, *draw]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def random_resized_crop(image: torch.Tensor, area: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """mDPO's crop of one image [C, H, W]: a box covering a uniform share in `area` of the image, its
    aspect ratio log-uniform in [3/4, 4/3], resized back to H x W (bilinear). Like torchvision's
    RandomResizedCrop: up to 10 tries for a box that fits, else the whole image."""
    height, width = image.shape[-2:]
    top, left, h, w = 0, 0, height, width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = height * width * (area[0] + (area[1] - area[0]) * u[0])
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= width and 0 < ch <= height:
            top, left, h, w = int(u[2] * (height - ch + 1)), int(u[3] * (width - cw + 1)), ch, cw
            break
    box = image[:, top : top + h, left : left + w].float().unsqueeze(0)
    return F.interpolate(box, size=(height, width), mode="bilinear", align_corners=False)[0].to(image.dtype)


def _diffuse(pixels: torch.Tensor, corruption: Corruption, generator: torch.Generator) -> torch.Tensor:
    """One image [C, H, W] (normalised) through q(x_t | x_0) at corruption.diffusion_step."""
    abar = diffusion_alpha_bar(corruption.diffusion_step)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    if corruption.diffusion_space == "normalized":  # CHiP: noise on the processor's output
        return (math.sqrt(abar) * pixels.float() + math.sqrt(1 - abar) * eps).to(pixels.dtype)
    if corruption.pixel_mean is None or corruption.pixel_std is None:
        raise ValueError(
            "corrupt_batch: loss.diffusion_space 'pixels' needs the model's image normalisation (mean, std); "
            "this model has none: use loss.diffusion_space normalized"
        )
    mean = torch.tensor(corruption.pixel_mean, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(corruption.pixel_std, device=pixels.device).view(-1, 1, 1)
    unit = pixels.float() * std + mean  # back to [0, 1] pixels, where TPO adds its noise
    noisy = (math.sqrt(abar) * unit + math.sqrt(1 - abar) * eps).clamp(0, 1)
    # TPO turns the noisy image into an 8-bit PIL image (x 255, truncated) before its processor runs
    noisy = torch.floor(noisy * 255) / 255
    return ((noisy - mean) / std).to(pixels.dtype)


def _check(batch: PairBatch, corruption: Corruption) -> None:
    if corruption.kind not in CORRUPTIONS:
        raise ValueError(f"corrupt_batch: kind must be one of {CORRUPTIONS} (loss.corruption), got {corruption.kind!r}")
    if corruption.kind in ("mask_tokens", "mask_patches", "noise") and not 0 < corruption.strength <= 1:
        raise ValueError(
            f"corrupt_batch: strength must be in (0, 1] (loss.corruption_strength), got {corruption.strength}"
        )
    if corruption.kind == "diffusion" and corruption.diffusion_space not in DIFFUSION_SPACES:
        raise ValueError(
            f"corrupt_batch: diffusion_space must be one of {DIFFUSION_SPACES} (loss.diffusion_space), "
            f"got {corruption.diffusion_space!r}"
        )
    if batch.pixel_values is None:
        raise ValueError(
            "corrupt_batch: the batch has no images; the image-conditional terms and visual scores need them"
        )


def corrupt_batch(
    batch: PairBatch, corruption: Corruption, num_image_tokens: int, draw: tuple[int, ...] = ()
) -> PairBatch:
    """A copy of `batch` whose images are corrupted (ids, masks and labels shared, not copied); each
    pair's randomness from (corruption.seed, its source row, `draw`)."""
    _check(batch, corruption)
    pixels, kind, strength = batch.pixel_values, corruption.kind, corruption.strength
    generators = [_generator(corruption.seed, row, draw) for row in batch.row_indices]
    if kind == "mask_tokens":
        masked = round(strength * num_image_tokens)
        keep = torch.ones(len(batch.row_indices), num_image_tokens)
        for i, generator in enumerate(generators):
            keep[i, torch.randperm(num_image_tokens, generator=generator)[:masked]] = 0
        return dataclasses.replace(batch, image_keep=keep.to(pixels.device))
    out = pixels.clone()
    if kind == "mask_patches":
        grid = max(1, math.isqrt(num_image_tokens))
        height, width = pixels.shape[-2:]
        ys = [round(k * height / grid) for k in range(grid + 1)]
        xs = [round(k * width / grid) for k in range(grid + 1)]
        masked = round(strength * grid * grid)
        for i, generator in enumerate(generators):
            for cell in torch.randperm(grid * grid, generator=generator)[:masked].tolist():
                r, c = divmod(cell, grid)
                out[i, :, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 0
    for i, generator in enumerate(generators):
        if kind == "noise":
            eps = torch.randn(pixels.shape[1:], generator=generator, dtype=torch.float32).to(pixels.device)
            out[i] = (math.sqrt(1 - strength) * pixels[i].float() + math.sqrt(strength) * eps).to(pixels.dtype)
        elif kind == "diffusion":
            out[i] = _diffuse(pixels[i], corruption, generator)
        elif kind == "crop":
            out[i] = random_resized_crop(pixels[i], corruption.crop_area, generator)
    return dataclasses.replace(batch, pixel_values=out)
