"""The two data types everything else agrees on: one preference pair, and a collated batch of pairs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from PIL import Image

from ddpo.data.images import DataError

IGNORE_INDEX = -100  # the label of a token that is not scored (prompt, image tokens, padding)


@dataclass
class PreferenceRecord:
    """One preference pair, whatever file format it came from.

    `chosen` is the corrected answer, `rejected` the original one. Reference log-probs, when cached,
    hold one value per *answer token*, so they do not depend on padding side or batch composition.

    `prompt` is the final user turn's text, the one `chosen` and `rejected` answer. A multi-turn row
    keeps its earlier turns in `history` (see `check_history`): an optional system message, then
    user/assistant turns; the templates render them all, and only the final answer is labelled. The
    image sits in the user turn whose `image` is True, or in the final turn when no earlier one has it.
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
    # earlier turns of a multi-turn prompt: [{"role", "content": str, "image": True on the image's turn}]
    history: list[dict] | None = None

    def where(self) -> str:
        """'row 12 of FILE' for error messages."""
        return f"row {self.row_index}" + (f" of {self.source}" if self.source else "")

    def texts(self) -> list[str]:
        """Every text of the row: earlier turns, the final user turn, the two answers."""
        return [*(turn["content"] for turn in self.history or ()), self.prompt, self.chosen, self.rejected]


ROLES = ("system", "user", "assistant")
_TURN_ORDER = "; turns must alternate user/assistant: an optional system message, then user, assistant, ..., user"


def check_history(history: list[dict]) -> None:
    """Raise DataError unless `history` (the turns before the final user turn) is an optional system
    message, then user/assistant pairs, with non-empty string contents and at most one image, on a
    user turn. Messages are numbered as in the row's prompt (its final user turn comes after them);
    callers add the row and field."""
    previous = "assistant"  # the first non-system turn must be a user turn
    for k, turn in enumerate(history):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise DataError(
                f"message {k} has role {role!r}; roles are {', '.join(map(repr, ROLES))}: rewrite or drop the message"
            )
        if role == "system" and k:
            raise DataError(f"message {k} is a 'system' message; only the first message may be one")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"message {k} ('{role}') has no text; every turn needs a non-empty text")
        if turn.get("image") and role != "user":
            raise DataError(f"message {k} ('{role}') holds the image; an image belongs in a user message")
        if role != "system" and role == previous:
            started = any(t.get("role") == "user" for t in history[:k])
            where = f"follows another '{role}' message" if started else "comes before any user message"
            raise DataError(f"message {k} ('{role}') {where}{_TURN_ORDER}")
        previous = role if role != "system" else previous
    if previous == "user":  # the final user turn follows
        raise DataError(f"message {len(history)} ('user') follows another 'user' message{_TURN_ORDER}")
    if sum(bool(turn.get("image")) for turn in history) > 1:
        raise DataError("the conversation holds more than one image; a pair has exactly one")


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
