"""PreferenceRecord -> EncodedPair (token ids + which answer tokens were corrected) -> PairBatch (padded tensors).

    encoder = PairEncoder(tokenizer, model.image_placeholder, EncodingSettings("vicuna_v0", max_length=2048))
    dataset = PairDataset(records, encoder)                  # encodes lazily, deterministically
    loader = DataLoader(dataset, batch_size=B, collate_fn=PairCollator(pad_id, "right", model.preprocess_images))

Layout of a PairBatch (docs/ARCHITECTURE.md): rows 0..B-1 are `prompt + chosen`, rows B..2B-1
`prompt + rejected` of the same pairs. Position t of `corrected` / `ref_token_logps` belongs to the
token at position t+1 (`labels[:, 1:]`), the token whose log-prob the logits at t give. The prompt
ids are identical in both rows of a pair (tokenized once).

Lengths: `len(prompt) + len(answer) <= max_length`. An answer that does not fit is cut from its end
(`long_answers="truncate"`, the default) with its corrected mask; the reference cache, computed from
these same cut answers, holds log-probs for the kept tokens only. `PairDataset` counts the pairs cut
before training and logs one summary. With `long_answers="error"` such a pair is a `DataError` naming
the row and its lengths (a counted skip with `skip_bad_rows`). The prompt (with its image tokens) is
never cut: if it leaves no room for an answer the pair is a `DataError`, or a counted skip in
`PairDataset(skip_bad_rows=True)`.

Multi-turn records (`PreferenceRecord.history`): every earlier turn is part of the prompt ids, so earlier
assistant turns are context (IGNORE_INDEX), and only the final answer, chosen or rejected, is labelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ddpo.data import segments as seg
from ddpo.data.images import DataError, as_pil
from ddpo.data.records import IGNORE_INDEX, PairBatch, PreferenceRecord
from ddpo.data.templates import (
    check_image_tokens,
    encode_answer,
    encode_answer_with_offsets,
    encode_prompt,
    image_token_ids,
    role_prefix_length,
)

logger = logging.getLogger(__name__)

SegmentsMode = Literal["token_diff", "word_diff", "spans", "none"]
SEGMENT_MODES = ("token_diff", "word_diff", "spans", "none")
LongAnswers = Literal["truncate", "error"]
LONG_ANSWER_MODES = ("truncate", "error")


@dataclass
class EncodedPair:
    """One pair as token ids; the corrected masks and reference log-probs have one value per answer token."""

    prompt_ids: list[int]  # BOS + system + (earlier turns +) user turn with image tokens + assistant prefix
    chosen_ids: list[int]  # labelled answer tokens, end marker included
    rejected_ids: list[int]
    chosen_corrected: list[bool]  # len(chosen_ids): True on tokens of corrected segments
    rejected_corrected: list[bool]
    images: list[Image.Image]
    row_index: int
    ref_chosen_logps: list[float] | None = None  # len(chosen_ids) when cached
    ref_rejected_logps: list[float] | None = None
    truncated_tokens: int = 0  # answer tokens cut to fit max_length (chosen + rejected)
    chosen_severity: list[float] | None = None  # len(chosen_ids): annotated severity weight per token, 0 = none
    rejected_severity: list[float] | None = None
    ref_corrupted_chosen_logps: list[float] | None = None  # len(chosen_ids) when cached (corrupted images)
    ref_corrupted_rejected_logps: list[float] | None = None


@dataclass(frozen=True)
class EncodingSettings:
    """How a record becomes token ids: the fields of the `data` config section (`ddpo.config.DataConfig`,
    same names and defaults) that the encoder reads. `segment_diff` / `label_span` 'muffin' replicate the
    released Muffin code exactly (docs/REPRODUCING.md): the diff runs over prompt (minus BOS) + answer with
    difflib's autojunk on, and the '### Assistant:' role prefix is labelled with the answer."""

    template: str = "vicuna_v0"
    max_length: int = 2048
    segments: SegmentsMode = "token_diff"
    min_match: int = 3
    include_insertions: bool = False
    segment_diff: Literal["answer", "muffin"] = "answer"
    label_span: Literal["answer", "muffin"] = "answer"
    long_answers: LongAnswers = "truncate"

    def __post_init__(self) -> None:
        if self.long_answers not in LONG_ANSWER_MODES:
            raise ValueError(
                f"data.long_answers must be one of {', '.join(LONG_ANSWER_MODES)}, got '{self.long_answers}'"
            )
        if self.segments not in SEGMENT_MODES:
            raise ValueError(f"data.segments must be one of {', '.join(SEGMENT_MODES)}, got '{self.segments}'")
        if self.segment_diff not in ("answer", "muffin") or self.label_span not in ("answer", "muffin"):
            raise ValueError(
                "data.segment_diff and data.label_span must be 'answer' or 'muffin', got "
                f"{self.segment_diff!r}, {self.label_span!r}"
            )


class PairEncoder:
    """Tokenizes a record with a conversation template and finds its corrected tokens (data.segments)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_placeholder: str, settings: EncodingSettings):
        self.tokenizer, self.image_placeholder, self.settings = tokenizer, image_placeholder, settings
        self.placeholder_ids = image_token_ids(tokenizer, image_placeholder)
        self.num_truncated = 0  # pairs whose answers were cut, in this process

    @classmethod
    def from_config(cls, data_cfg: Any, tokenizer: PreTrainedTokenizerBase, image_placeholder: str) -> PairEncoder:
        """From the `data` config section (`ddpo.config.DataConfig`): its fields named as `EncodingSettings`'."""
        settings = EncodingSettings(**{f.name: getattr(data_cfg, f.name) for f in fields(EncodingSettings)})
        return cls(tokenizer, image_placeholder, settings)

    def encode_prompt(self, record: PreferenceRecord) -> list[int]:
        """Prompt ids, checked: the image tokens exactly once, and room left for at least one answer token.
        A multi-turn record's earlier turns are all encoded (`record.history`); they are never cut."""
        try:
            ids = encode_prompt(
                self.settings.template, self.tokenizer, record.prompt, self.image_placeholder, record.history
            )
        except DataError as e:  # the templates' row errors carry no location
            raise DataError(f"{record.where()}, field 'prompt': {e}") from None
        check_image_tokens(ids, self.placeholder_ids, where=f"{record.where()}, field 'prompt'")
        if len(ids) >= self.settings.max_length:
            raise DataError(
                f"{record.where()}, field 'prompt': prompt + image tokens take {len(ids)} tokens, leaving no room for "
                f"an answer within data.max_length {self.settings.max_length}; raise data.max_length or shorten the "
                "question"
            )
        return ids

    def _answer(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self.settings.segments in ("word_diff", "spans"):
            return encode_answer_with_offsets(self.settings.template, self.tokenizer, text)
        return encode_answer(self.settings.template, self.tokenizer, text), []

    def _corrections(
        self, record: PreferenceRecord, chosen: tuple, rejected: tuple, prompt_ids: Sequence[int] = ()
    ) -> tuple[list[bool], list[bool]]:
        (chosen_ids, chosen_offsets), (rejected_ids, rejected_offsets) = chosen, rejected
        if self.settings.segments == "token_diff":
            if self.settings.segment_diff == "muffin":  # the released code: whole sequences minus BOS, autojunk on
                return seg.token_corrections(
                    chosen_ids,
                    rejected_ids,
                    self.settings.min_match,
                    self.settings.include_insertions,
                    context=prompt_ids[1:],
                    autojunk=True,
                )
            return seg.token_corrections(
                chosen_ids, rejected_ids, self.settings.min_match, self.settings.include_insertions
            )
        if self.settings.segments == "word_diff":
            return seg.word_diff_corrections(
                record.chosen,
                record.rejected,
                chosen_offsets,
                rejected_offsets,
                self.settings.min_match,
                self.settings.include_insertions,
            )
        if self.settings.segments == "spans":
            if record.chosen_spans is None or record.rejected_spans is None:
                raise DataError(
                    f"{record.where()}, fields 'chosen_spans'/'rejected_spans': data.segments is 'spans' but the row "
                    "has no span annotations; add them or use data.segments token_diff"
                )
            return seg.span_corrections(chosen_offsets, record.chosen_spans), seg.span_corrections(
                rejected_offsets, record.rejected_spans
            )
        return [False] * len(chosen_ids), [False] * len(rejected_ids)

    def _severity(
        self, record: PreferenceRecord, text: str, spans, role_tokens: int, length: int, field: str
    ) -> list[float] | None:
        """Per-token severity weights of an answer from [start, end, weight] character spans: the largest
        weight of the spans a token overlaps, 0 where it overlaps none (the role prefix included)."""
        if spans is None:
            return None
        _, offsets = encode_answer_with_offsets(self.settings.template, self.tokenizer, text)
        offsets = [(0, 0)] * role_tokens + list(offsets)
        if len(offsets) != length:
            raise DataError(
                f"{record.where()}, field '{field}': the answer's offsets cover {len(offsets)} tokens, its ids "
                f"{length}; this tokenizer/template cannot map character spans to tokens"
            )
        return [max((w for s, e, w in spans if s < end and start < e), default=0.0) for start, end in offsets]

    def _check_ref(
        self, record: PreferenceRecord, logps: list[float] | None, kept: int, total: int, field: str
    ) -> None:
        """Cached log-probs cover exactly the kept answer tokens: the cache was computed from these cut answers."""
        if logps is not None and len(logps) != kept:
            cut = f" ({total} before cutting to data.max_length {self.settings.max_length})" if kept != total else ""
            raise DataError(
                f"{record.where()}, field '{field}': the reference cache holds {len(logps)} log-probs for this "
                f"answer's {kept} tokens{cut}; the cache does not match this data: recompute it (`ddpo precompute-ref`)"
            )

    def check_lengths(self, record: PreferenceRecord) -> tuple[int, int, int]:
        """(prompt, chosen, rejected) token counts; a DataError when the prompt leaves no room for an answer,
        or (long_answers 'error') when an answer does not fit."""
        prompt = len(self.encode_prompt(record))
        chosen, rejected = (len(self._answer(text)[0]) for text in (record.chosen, record.rejected))
        self._check_room(record, prompt, chosen, rejected)
        return prompt, chosen, rejected

    def _check_room(self, record: PreferenceRecord, prompt: int, chosen: int, rejected: int) -> None:
        if self.settings.long_answers == "error" and prompt + max(chosen, rejected) > self.settings.max_length:
            raise DataError(
                f"{record.where()}, fields 'chosen'/'rejected': prompt {prompt} + answers {chosen}/{rejected} tokens "
                f"exceed data.max_length {self.settings.max_length}; raise data.max_length, shorten the answers, set "
                "data.long_answers truncate, or drop the row (data.skip_bad_rows)"
            )

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        if len(record.images) != 1:
            raise DataError(f"{record.where()}, field 'images': {len(record.images)} images; a pair needs exactly one")
        prompt_ids = prompt_ids_full = self.encode_prompt(record)
        chosen, rejected = self._answer(record.chosen), self._answer(record.rejected)
        if self.settings.label_span == "muffin":  # the role prefix's tokens move from the prompt into both answers
            k = role_prefix_length(
                self.settings.template, self.tokenizer, record.prompt, self.image_placeholder, record.history
            )
            prompt_ids, role = prompt_ids[:-k], prompt_ids[-k:]
            chosen = (role + chosen[0], [(0, 0)] * k + chosen[1] if chosen[1] else [])
            rejected = (role + rejected[0], [(0, 0)] * k + rejected[1] if rejected[1] else [])
        chosen_corrected, rejected_corrected = self._corrections(
            record, chosen, rejected, prompt_ids
        )  # on full answers
        chosen_ids, rejected_ids = chosen[0], rejected[0]
        self._check_room(record, len(prompt_ids), len(chosen_ids), len(rejected_ids))
        room = self.settings.max_length - len(prompt_ids)
        self._check_ref(
            record, record.ref_chosen_logps, min(len(chosen_ids), room), len(chosen_ids), "ref_chosen_logps"
        )
        self._check_ref(
            record, record.ref_rejected_logps, min(len(rejected_ids), room), len(rejected_ids), "ref_rejected_logps"
        )
        self._check_ref(
            record,
            record.ref_corrupted_chosen_logps,
            min(len(chosen_ids), room),
            len(chosen_ids),
            "ref_corrupted_chosen_logps",
        )
        self._check_ref(
            record,
            record.ref_corrupted_rejected_logps,
            min(len(rejected_ids), room),
            len(rejected_ids),
            "ref_corrupted_rejected_logps",
        )
        role = len(prompt_ids_full) - len(prompt_ids) if self.settings.label_span == "muffin" else 0
        chosen_severity = self._severity(
            record, record.chosen, record.chosen_severity, role, len(chosen_ids), "chosen_severity"
        )
        rejected_severity = self._severity(
            record, record.rejected, record.rejected_severity, role, len(rejected_ids), "rejected_severity"
        )
        cut = max(len(chosen_ids) - room, 0) + max(len(rejected_ids) - room, 0)
        if cut:  # counted for the whole dataset by PairDataset; here per pair at debug level only
            self.num_truncated += 1
            logger.debug(
                "%s: answers cut by %d tokens to fit data.max_length %d", record.where(), cut, self.settings.max_length
            )
        keep = lambda values: None if values is None else list(values[:room])  # noqa: E731
        return EncodedPair(
            prompt_ids=prompt_ids,
            chosen_ids=keep(chosen_ids),
            rejected_ids=keep(rejected_ids),
            chosen_corrected=keep(chosen_corrected),
            rejected_corrected=keep(rejected_corrected),
            images=list(record.images),
            row_index=record.row_index,
            ref_chosen_logps=record.ref_chosen_logps,
            ref_rejected_logps=record.ref_rejected_logps,
            truncated_tokens=cut,
            chosen_severity=keep(chosen_severity),
            rejected_severity=keep(rejected_severity),
            ref_corrupted_chosen_logps=record.ref_corrupted_chosen_logps,
            ref_corrupted_rejected_logps=record.ref_corrupted_rejected_logps,
        )


class PairDataset(torch.utils.data.Dataset):
    """Records + encoder; `__getitem__` encodes one pair. Lengths are checked up front (one tokenization of
    every pair): a prompt that cannot fit, or with long_answers 'error' an answer, fails (or, with
    skip_bad_rows, is skipped and counted in `.skipped`) before training; pairs whose answers will be
    cut are counted in `.truncated` and summarised in one log line."""

    def __init__(self, records: Sequence[PreferenceRecord], encoder: PairEncoder, skip_bad_rows: bool = False):
        self.encoder = encoder
        self.records: list[PreferenceRecord] = []
        self.skipped: list[str] = []
        self.truncated: list[tuple[int, int, int, int]] = []  # (row, prompt, chosen, rejected tokens) of cut pairs
        for record in records:
            try:
                prompt, chosen, rejected = encoder.check_lengths(record)
            except DataError as e:
                if not skip_bad_rows:
                    raise
                self.skipped.append(str(e))
                continue
            self.records.append(record)
            if prompt + max(chosen, rejected) > encoder.settings.max_length:
                self.truncated.append((record.row_index, prompt, chosen, rejected))
        if self.skipped:
            logger.warning(
                "skipped %d of %d pairs that cannot fit data.max_length %d (data.skip_bad_rows); first: %s",
                len(self.skipped),
                len(records),
                encoder.settings.max_length,
                self.skipped[0],
            )
        if self.truncated:
            row, prompt, chosen, rejected = max(self.truncated, key=lambda t: t[1] + max(t[2], t[3]))
            logger.warning(
                "%d of %d pairs have an answer longer than the room data.max_length %d leaves after the prompt: "
                "it is cut from its end, in training and in the reference cache alike (data.long_answers truncate). "
                "Longest: row %d, prompt %d + answers %d/%d tokens",
                len(self.truncated),
                len(self.records),
                encoder.settings.max_length,
                row,
                prompt,
                chosen,
                rejected,
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> EncodedPair:
        return self.encoder.encode(self.records[i])


class PairCollator:
    """EncodedPairs -> PairBatch. `image_transform(list of PIL images) -> [B, C, H, W]` comes from the
    model (`preprocess_images`); None leaves `pixel_values` None (text-only tests)."""

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        image_transform: Callable[[list[Image.Image]], Any] | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got '{padding_side}'")
        self.pad_token_id, self.padding_side, self.image_transform = pad_token_id, padding_side, image_transform

    def __call__(self, pairs: Sequence[EncodedPair]) -> PairBatch:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        has_ref = [p.ref_chosen_logps is not None and p.ref_rejected_logps is not None for p in pairs]
        if any(has_ref) and not all(has_ref):
            raise ValueError(
                f"rows {[p.row_index for p, h in zip(pairs, has_ref) if not h]} have no cached reference log-probs "
                "while others do; recompute the cache"
            )
        has_corrupted_ref = [
            p.ref_corrupted_chosen_logps is not None and p.ref_corrupted_rejected_logps is not None for p in pairs
        ]
        if any(has_corrupted_ref) and not all(has_corrupted_ref):
            raise ValueError(
                f"rows {[p.row_index for p, h in zip(pairs, has_corrupted_ref) if not h]} have no cached "
                "corrupted-image reference log-probs while others do; recompute the cache"
            )
        has_severity = any(p.chosen_severity is not None or p.rejected_severity is not None for p in pairs)
        # (prompt, answer, corrected, ref, corrupted-image ref, severity) per row: chosen rows first, then
        # rejected rows.
        rows = [
            (
                p.prompt_ids,
                p.chosen_ids,
                p.chosen_corrected,
                p.ref_chosen_logps,
                p.ref_corrupted_chosen_logps,
                p.chosen_severity,
            )
            for p in pairs
        ]
        rows += [
            (
                p.prompt_ids,
                p.rejected_ids,
                p.rejected_corrected,
                p.ref_rejected_logps,
                p.ref_corrupted_rejected_logps,
                p.rejected_severity,
            )
            for p in pairs
        ]
        T = max(len(row[0]) + len(row[1]) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, T), dtype=torch.long)
        labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        corrected = torch.zeros((n, T - 1), dtype=torch.bool)
        ref = torch.zeros((n, T - 1), dtype=torch.float32) if all(has_ref) else None
        corrupted_ref = torch.zeros((n, T - 1), dtype=torch.float32) if all(has_corrupted_ref) else None
        severity = torch.zeros((n, T - 1), dtype=torch.float32) if has_severity else None  # rows without: 0 (none)
        for r, (prompt, answer, marked, ref_logps, corrupted_logps, weights) in enumerate(rows):
            assert prompt, "a prompt holds at least the image tokens"
            length = len(prompt) + len(answer)
            start = 0 if self.padding_side == "right" else T - length
            a0, a1 = start + len(prompt), start + length  # answer positions in the row
            input_ids[r, start:a1] = torch.tensor(prompt + answer, dtype=torch.long)
            attention_mask[r, start:a1] = 1
            labels[r, a0:a1] = torch.tensor(answer, dtype=torch.long)
            corrected[r, a0 - 1 : a1 - 1] = torch.tensor(marked, dtype=torch.bool)  # logits at t predict token t+1
            for target, values in ((ref, ref_logps), (corrupted_ref, corrupted_logps), (severity, weights)):
                if target is not None and values is not None:
                    target[r, a0 - 1 : a1 - 1] = torch.tensor(values, dtype=torch.float32)
        pixel_values = None
        if self.image_transform is not None:
            pixel_values = torch.as_tensor(self.image_transform([as_pil(p.images[0]) for p in pairs]))
        return PairBatch(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            corrected=corrected,
            ref_token_logps=ref,
            row_indices=[p.row_index for p in pairs],
            severity=severity,
            ref_corrupted_token_logps=corrupted_ref,
        )


# ----------------------------------------------------------------------------------------------
# Single sequences (SFT, scoring): one (image, prompt, answer) per row, no pairs
# ----------------------------------------------------------------------------------------------
def encode_sequences(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    image_placeholder: str,
    prompts: Sequence[str],
    answers: Sequence[str],
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per example; the answer ids (end marker included) are the labelled tokens."""
    return [
        (encode_prompt(template, tokenizer, p, image_placeholder), encode_answer(template, tokenizer, a))
        for p, a in zip(prompts, answers)
    ]


def collate_sequences(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX outside answers), each [B, T]."""
    length = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (p, a) in enumerate(encoded):
        n = len(p) + len(a)
        ids[row, :n] = torch.tensor(p + a)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(a)
    return ids, mask, labels
