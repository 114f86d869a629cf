"""The two data types everything else agrees on: one preference pair, and a collated batch of pairs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from PIL import Image

IGNORE_INDEX = -100  # the label of a token that is not scored (prompt, image tokens, padding)


@dataclass
class PreferenceRecord:
    """One preference pair, whatever file format it came from.

    `chosen` is the corrected answer, `rejected` the original one. Reference log-probs, when cached,
    hold one value per *answer token*, so they do not depend on padding side or batch composition.
    """

    images: list[Image.Image]
    prompt: str
    chosen: str
    rejected: str
    row_index: int
    source: str = ""
    idx: str | None = None
    chosen_spans: list[tuple[int, int]] | None = None
    rejected_spans: list[tuple[int, int]] | None = None
    ref_chosen_logps: list[float] | None = None
    ref_rejected_logps: list[float] | None = None
    # severity annotations (HSA-DPO / OPA-DPO style): [start, end, weight] character spans of each answer
    chosen_severity: list[tuple[int, int, float]] | None = None
    rejected_severity: list[tuple[int, int, float]] | None = None
    # cached reference log-probs of the answers given the corrupted image (mDPO's conditional term)
    ref_corrupted_chosen_logps: list[float] | None = None
    ref_corrupted_rejected_logps: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def where(self) -> str:
        """'row 12 of FILE' for error messages."""
        return f"row {self.row_index}" + (f" of {self.source}" if self.source else "")


@dataclass
class PairBatch:
    """B preference pairs, collated. Chosen sequences are rows 0..B-1, rejected rows B..2B-1.

    `corrected` and `ref_token_logps` are aligned with `labels[:, 1:]` (the next-token log-probs):
    `corrected` is True on answer tokens inside corrected segments (False elsewhere, prompt and padding
    included); `answer_mask` (labels[:, 1:] != -100) marks the answer tokens. The loss turns the two
    into weights with `loss.gamma` (ddpo/loss.py): the data carries no gamma.
    """

    pixel_values: torch.Tensor | None  # [B, C, H, W], each pair's image once
    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long
    labels: torch.Tensor  # [2B, T] long, IGNORE_INDEX (-100) outside answers
    corrected: torch.Tensor  # [2B, T-1] bool
    ref_token_logps: torch.Tensor | None = None  # [2B, T-1] float
    row_indices: list[int] = field(default_factory=list)  # [B]
    # Optional extras of the dense methods (docs/DENSE_METHODS.md); None unless the data or a corruption sets them.
    severity: torch.Tensor | None = None  # [2B, T-1] float: annotated severity weight per answer token, 0 = none
    ref_corrupted_token_logps: torch.Tensor | None = None  # [2B, T-1] float: cached reference, corrupted images
    image_keep: torch.Tensor | None = None  # [B, N] float: 0 = this image token's features are masked

    @property
    def answer_mask(self) -> torch.Tensor:
        """[2B, T-1] bool: the answer tokens, aligned with the next-token log-probs."""
        return self.labels[:, 1:] != IGNORE_INDEX

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PairBatch:
        """Move tensors to `device`; `dtype` applies to pixel values only (ids and masks keep theirs)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if f.name == "pixel_values" and dtype else None)
            moved[f.name] = value
        return PairBatch(**moved)
