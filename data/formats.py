"""Readers: RLHF-V, RLAIF-V, TRL conversational preference data and JSONL + images -> PreferenceRecord.

    load_records(cfg.data) -> LoadedRecords (a list of PreferenceRecord with a `.skipped` list)

Schemas (docs/PAPER_FACTS.md §2):
  rlhf-v   parquet; `text` = JSON string {"question", "chosen", "rejected"}; `image` = {bytes, path};
           int `idx`; meta columns ds_name, origin_dataset, origin_split, image_path.
  rlaif-v  parquet shards; `question`, `chosen`, `rejected` columns; `image` = {bytes, path}; string
           `idx`; meta columns as above.
  trl      TRL conversational preference: `prompt` = the conversation up to the answered user turn (an
           optional system message, then user/assistant turns ending with a user turn; one image part,
           in any user turn), `chosen` / `rejected` = [assistant message], `images` = [image]. Every
           turn is kept (PreferenceRecord.history) and rendered by the template. A parquet/JSON file,
           a hub id, or a `save_to_disk` directory (as written by `ddpo convert`).
  jsonl    one JSON object per line: `image` (a path), `question` (or `prompt`: one question; multi-turn
           rows need the trl format), `chosen`, `rejected`, optional `chosen_spans` /
           `rejected_spans` ([[start, end], ...] character spans of corrected segments), optional
           `chosen_severity` / `rejected_severity` ([[start, end, weight], ...]: severity weights of
           annotated spans, for loss.token_weights 'severity'), optional `idx`.
           `row_index` is the 0-based line number.

Image paths (jsonl `image`; a path string or a {bytes: null, path} value in the image column of the
others) that are relative are looked up in `data.image_dir`, by default the folder of `data.path`
(the file's folder, or the folder itself); a missing image names the row, the path tried and that setting.

`data.path` is a local file or folder, or a hub id read through `datasets.load_dataset` (it cannot be
reached offline; the error says to pass a local path). Image columns are read undecoded
(`Image(decode=False)`) and decoded here with PIL, so every bad image is reported with its row.
Every row is validated: a bad one raises `DataError` naming the row, the field and the fix, or, with
`data.skip_bad_rows`, is skipped, counted in `.skipped` and summarised in one log warning.
A literal "<image>" in a question (LLaVA-style data) is removed: the template inserts the image.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Image as ImageFeature

from ddpo.data.images import ArrowImage, DataError, EncodedImage, ImageDir, load_checked_image
from ddpo.data.jsonl import jsonl_lines, parse_json_object
from ddpo.data.records import PreferenceRecord, check_history

__all__ = [
    "DataError",
    "LoadedRecords",
    "load_records",
    "open_dataset",
    "parse_pair_texts",
    "row_texts",
    "FORMATS",
    "REQUIRED_COLUMNS",
]

logger = logging.getLogger(__name__)

FORMATS = ("rlhf-v", "rlaif-v", "trl", "jsonl", "synthetic")
META_COLUMNS = ("ds_name", "origin_dataset", "origin_split", "image_path")
REQUIRED_COLUMNS = {
    "rlhf-v": ("text", "image"),
    "rlaif-v": ("question", "chosen", "rejected", "image"),
    "trl": ("prompt", "chosen", "rejected", "images"),
}
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


class IdenticalAnswers(DataError):
    """A pair whose chosen and rejected answers are the same: always a counted, logged skip. (The released
    RLHF-V code trains on such rows; their DPO gradient is zero, so skipping changes only batch make-up.)"""


class LoadedRecords(list):
    """`list[PreferenceRecord]` plus `skipped`: one message per row dropped by `data.skip_bad_rows`."""

    def __init__(self, records: tuple = (), skipped: list[str] | None = None):
        super().__init__(records)
        self.skipped: list[str] = skipped or []


# ---------------------------------------------------------------------------------------------------
# Field checks shared by every format


def _text(value: Any, where: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}, field '{field}': missing; every row needs a non-empty '{field}' string")
    if not isinstance(value, str):
        raise DataError(
            f"{where}, field '{field}': expected a string, got {type(value).__name__} ({str(value)[:40]!r}); "
            "fix the row's type"
        )
    if not value.strip():
        raise DataError(f"{where}, field '{field}': empty; fill it in or drop the row (data.skip_bad_rows)")
    return value


def parse_pair_texts(
    question: Any, chosen: Any, rejected: Any, where: str, question_field: str = "question"
) -> tuple[str, str, str]:
    """Checked (question, chosen, rejected); a literal '<image>' tag is removed from the question."""
    question = _IMAGE_TAG.sub(" ", _text(question, where, question_field)).strip()
    if not question:
        raise DataError(f"{where}, field '{question_field}': holds only an image tag; add the question text")
    chosen, rejected = _text(chosen, where, "chosen"), _text(rejected, where, "rejected")
    if chosen.strip() == rejected.strip():
        raise IdenticalAnswers(
            f"{where}, fields 'chosen'/'rejected': identical answers carry no preference signal (skipped)"
        )
    return question, chosen, rejected


def _spans(value: Any, text: str, where: str, field: str) -> list[tuple[int, int]] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        for s in value
    )
    if not ok:
        raise DataError(
            f"{where}, field '{field}': expected a list of [start, end] integer pairs, got {str(value)[:60]}"
        )
    spans = [(int(s), int(e)) for s, e in value]
    for s, e in spans:
        if not 0 <= s < e <= len(text):
            raise DataError(
                f"{where}, field '{field}': span [{s}, {e}] is not inside the {len(text)}-character answer "
                "(need 0 <= start < end <= length)"
            )
    return spans


def _severity(value: Any, text: str, where: str, field: str) -> list[tuple[int, int, float]] | None:
    """Severity annotations: [[start, end, weight], ...] character spans with a weight > 0 each."""
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(s, (list, tuple))
        and len(s) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) for x in s[:2])
        and isinstance(s[2], (int, float))
        and not isinstance(s[2], bool)
        for s in value
    )
    if not ok:
        raise DataError(
            f"{where}, field '{field}': expected a list of [start, end, weight] (two integers and a number), got "
            f"{str(value)[:60]}"
        )
    spans = [(int(s), int(e), float(w)) for s, e, w in value]
    for s, e, w in spans:
        if not 0 <= s < e <= len(text):
            raise DataError(
                f"{where}, field '{field}': span [{s}, {e}] is not inside the {len(text)}-character answer "
                "(need 0 <= start < end <= length)"
            )
        if not w > 0 or w != w or w == float("inf"):
            raise DataError(
                f"{where}, field '{field}': span [{s}, {e}] has weight {w}; severity weights must be finite and > 0"
            )
    return spans


def row_image(value: Any, where: str, field: str, image_dir: ImageDir | None = None):
    """Decode an undecoded `datasets.Image` value ({bytes, path}), raw bytes, or a path string; a relative
    path is looked up in `image_dir` (None: the current directory)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        path = None if data is not None else path
        return load_checked_image(data, path, where=where, field=field, image_dir=image_dir)
    if isinstance(value, (bytes, bytearray)):
        return load_checked_image(value, where=where, field=field)
    if isinstance(value, str):
        return load_checked_image(path=value, where=where, field=field, image_dir=image_dir)
    if value is None:
        raise DataError(f"{where}, field '{field}': missing; every pair needs one image")
    raise DataError(f"{where}, field '{field}': expected image bytes or {{bytes, path}}, got {type(value).__name__}")


def _meta(row: dict) -> dict:
    return {k: row[k] for k in META_COLUMNS if row.get(k) is not None}


# ---------------------------------------------------------------------------------------------------
# Row parsers


def _rlhfv_texts(row: dict, where: str) -> tuple[str, str, str]:
    raw = row.get("text")
    if not isinstance(raw, str):
        raise DataError(
            f"{where}, field 'text': expected a JSON string with question/chosen/rejected, got {type(raw).__name__}"
        )
    try:
        text = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}, field 'text': not valid JSON ({e}); it must be a JSON object with question, chosen, rejected"
        ) from None
    if not isinstance(text, dict):
        raise DataError(
            f"{where}, field 'text': expected a JSON object with question/chosen/rejected, got a JSON "
            f"{type(text).__name__}"
        )
    return parse_pair_texts(text.get("question"), text.get("chosen"), text.get("rejected"), where + " (in 'text')")


def _rlaifv_texts(row: dict, where: str) -> tuple[str, str, str]:
    return parse_pair_texts(row.get("question"), row.get("chosen"), row.get("rejected"), where)


def row_texts(fmt: str, row: dict, where: str) -> tuple[str, str, str]:
    """Checked (question, chosen, rejected) of an RLHF-V or RLAIF-V row (images untouched)."""
    return {"rlhf-v": _rlhfv_texts, "rlaif-v": _rlaifv_texts}[fmt](row, where)


def _parquet_row(fmt: str, row: dict, i: int, source: str, image_dir: ImageDir) -> PreferenceRecord:
    """An RLHF-V or RLAIF-V row: the two differ only in where the texts are."""
    where = f"row {i} of {source}"
    question, chosen, rejected = row_texts(fmt, row, where)
    idx = row.get("idx")
    return PreferenceRecord(
        images=[row_image(row.get("image"), where, "image", image_dir)],
        prompt=question,
        chosen=chosen,
        rejected=rejected,
        row_index=i,
        source=source,
        idx=None if idx is None else str(idx),
        meta=_meta(row),
    )


def _content(content: Any, where: str, field: str) -> tuple[str, int]:
    """A TRL message's text (its text parts joined) and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise DataError(f"{where}, field '{field}': message content must be a string or a list of {{type, ...}} parts")
    texts = [p.get("text") for p in content if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}, field '{field}': a text part has no string 'text'")
    return "".join(texts), sum(p.get("type") == "image" for p in content)


def _messages(messages: Any, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(
            f"{where}, field '{field}': expected a list of {{role, content}} messages, got {type(messages).__name__}"
        )
    return messages


def _trl_answer(messages: Any, where: str, field: str) -> str:
    """The text of `chosen` / `rejected`: one assistant message, without image parts."""
    messages = _messages(messages, where, field)
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}, field '{field}': no 'assistant' message; TRL preference rows need one")
    if len(messages) != 1:
        raise DataError(
            f"{where}, field '{field}': {len(messages)} messages; it must be the one assistant message that answers "
            "the prompt (earlier turns belong at the end of 'prompt')"
        )
    text, images = _content(messages[0].get("content"), where, field)
    if images:
        raise DataError(f"{where}, field '{field}': the answer holds an image part; the image belongs in 'prompt'")
    return text


def _trl_prompt(messages: Any, where: str) -> tuple[Any, list[dict] | None]:
    """(final user turn's text, earlier turns or None) of a TRL prompt, every turn kept; one image part."""
    messages = _messages(messages, where, "prompt")
    if not any(m.get("role") == "user" for m in messages):
        raise DataError(f"{where}, field 'prompt': no 'user' message; TRL preference rows need one")
    turns, image_parts = [], 0
    for k, message in enumerate(messages):
        text, images = _content(message.get("content"), where, "prompt")
        image_parts += images
        if message.get("role") == "user" and k < len(messages) - 1:  # LLaVA-style tags: the template inserts the
            text = _IMAGE_TAG.sub(" ", text).strip()  # image (the final turn's: in parse_pair_texts)
        turns.append({"role": message.get("role"), "content": text, **({"image": True} if images else {})})
    if image_parts != 1:
        users = sum(m.get("role") == "user" for m in messages)
        holder = "the user message has" if users == 1 else f"its {len(messages)} messages have"
        raise DataError(
            f"{where}, field 'prompt': {holder} {image_parts} image parts; "
            "it needs exactly one ({'type': 'image'}) for its one image"
        )
    if turns[-1]["role"] != "user":
        raise DataError(
            f"{where}, field 'prompt': the last message is {turns[-1]['role']!r}, not 'user'; the prompt must end "
            "with the user turn that 'chosen' and 'rejected' answer"
        )
    try:
        check_history(turns[:-1])
    except DataError as e:
        raise DataError(f"{where}, field 'prompt': {e}") from None
    return turns[-1]["content"], turns[:-1] or None


def _trl_row(row: dict, i: int, source: str, image_dir: ImageDir) -> PreferenceRecord:
    where = f"row {i} of {source}"
    question, history = _trl_prompt(row.get("prompt"), where)
    chosen, rejected = (
        _trl_answer(row.get("chosen"), where, "chosen"),
        _trl_answer(row.get("rejected"), where, "rejected"),
    )
    question, chosen, rejected = parse_pair_texts(question, chosen, rejected, where, question_field="prompt")
    images = row.get("images")
    if not isinstance(images, list) or len(images) != 1:
        raise DataError(
            f"{where}, field 'images': expected a list with exactly one image, got "
            f"{len(images) if isinstance(images, list) else type(images).__name__}"
        )
    return PreferenceRecord(
        images=[row_image(images[0], where, "images", image_dir)],
        prompt=question,
        chosen=chosen,
        rejected=rejected,
        row_index=i,
        source=source,
        idx=None if row.get("idx") is None else str(row["idx"]),
        history=history,
    )


def _jsonl_row(row: dict, i: int, source: str, image_dir: ImageDir) -> PreferenceRecord:
    where = f"row {i} (line {i + 1}) of {source}"
    question_field = "question" if "question" in row else "prompt"
    if isinstance(row.get(question_field), list):  # a conversation: the jsonl format carries one question
        raise DataError(
            f"{where}, field '{question_field}': a list (a conversation?); the jsonl format holds one question "
            "string per row: write multi-turn rows in TRL's conversational format (data.format trl)"
        )
    question, chosen, rejected = parse_pair_texts(
        row.get(question_field), row.get("chosen"), row.get("rejected"), where, question_field
    )
    image = _text(row.get("image"), where, "image")
    idx = row.get("idx")
    return PreferenceRecord(
        images=[load_checked_image(path=image, where=where, field="image", image_dir=image_dir)],
        prompt=question,
        chosen=chosen,
        rejected=rejected,
        row_index=i,
        source=source,
        idx=None if idx is None else str(idx),
        chosen_spans=_spans(row.get("chosen_spans"), chosen, where, "chosen_spans"),
        rejected_spans=_spans(row.get("rejected_spans"), rejected, where, "rejected_spans"),
        chosen_severity=_severity(row.get("chosen_severity"), chosen, where, "chosen_severity"),
        rejected_severity=_severity(row.get("rejected_severity"), rejected, where, "rejected_severity"),
    )


# ---------------------------------------------------------------------------------------------------
# Opening a source


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).suffix in (".parquet", ".json", ".jsonl", ".arrow")


def open_dataset(path: str, split: str) -> datasets.Dataset:
    """One split of a local parquet/JSON file, a folder (parquet shards or a `save_to_disk` output),
    or a hub id. Image columns come back undecoded ({bytes, path})."""
    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds = datasets.load_from_disk(str(local))
        elif local.is_file():
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(local.suffix)
            if builder is None:
                raise DataError(
                    f"{path}: unsupported file type '{local.suffix}'; pass a .parquet/.json/.jsonl file or a folder"
                )
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")  # one file = one split
        elif local.is_dir():
            ds = datasets.load_dataset(str(local))
        elif _looks_local(path):
            raise DataError(f"{path}: no such file or folder; check data.path")
        else:
            try:
                ds = datasets.load_dataset(path, split=split)
            except DataError:
                raise
            except Exception as e:  # offline, unknown id, no access: all end the same way
                raise DataError(
                    f"{path}: could not reach hub dataset '{path}' ({type(e).__name__}: {str(e)[:200]}); download it "
                    "and pass a local path as data.path"
                ) from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: could not be read as a dataset ({type(e).__name__}: {str(e)[:300]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (splits: {', '.join(ds)}); set data.split")
        ds = ds[split]
    for name, feature in ds.features.items():  # undecoded images: we decode and check them ourselves
        if isinstance(feature, ImageFeature) and feature.decode:
            ds = ds.cast_column(name, ImageFeature(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, ImageFeature):
            ds = ds.cast_column(name, datasets.List(ImageFeature(decode=False)))
    return ds


def _dataset_rows(data_cfg: Any, fmt: str) -> tuple[Iterator[tuple[int, Any]], Callable[[Any, int], PreferenceRecord]]:
    ds = open_dataset(data_cfg.path, data_cfg.split)
    source = str(data_cfg.path)
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: column(s) {', '.join(missing)} missing (has {', '.join(ds.column_names)}); the {fmt} format "
            f"needs {', '.join(REQUIRED_COLUMNS[fmt])}"
        )
    image_dir = ImageDir.of(data_cfg.path, data_cfg.image_dir)
    if fmt == "trl":
        return enumerate(ds), lambda row, i: _in_arrow(_trl_row(row, i, source, image_dir), ds, i, "images", 0)
    return enumerate(ds), lambda row, i: _in_arrow(_parquet_row(fmt, row, i, source, image_dir), ds, i, "image", None)


def _in_arrow(
    record: PreferenceRecord, ds: datasets.Dataset, i: int, column: str, item: int | None
) -> PreferenceRecord:
    """Swap a checked image that came as inline bytes for a reference into the memory-mapped dataset
    (images given as file paths stay as they are)."""
    record.images = [
        ArrowImage(ds, i, column, item, image.size, image.where, image.field)
        if isinstance(image, EncodedImage) and image.inline
        else image
        for image in record.images
    ]
    return record


def _jsonl_rows(data_cfg: Any) -> tuple[Iterator[tuple[int, Any]], Callable[[Any, int], PreferenceRecord]]:
    # Read line by line rather than through `load_dataset("json")`: Arrow would reject a wrong-typed
    # row for the whole file without naming it; here every row gets its own message.
    path = Path(data_cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"{data_cfg.path}: JSONL file not found; check data.path")
    image_dir = ImageDir.of(data_cfg.path, data_cfg.image_dir)

    def parse(line: str, i: int) -> PreferenceRecord:
        return _jsonl_row(parse_json_object(line, f"row {i} (line {i + 1}) of {path}"), i, str(path), image_dir)

    return jsonl_lines(path), parse


def _synthetic(data_cfg: Any, seed: int) -> list[PreferenceRecord]:
    from ddpo.data.synthetic import synthetic_records  # numpy/PIL world code, only when asked for

    n = (
        data_cfg.synthetic_pairs
        if data_cfg.max_samples is None
        else min(data_cfg.synthetic_pairs, data_cfg.max_samples)
    )
    return synthetic_records(n, seed)


def load_records(data_cfg: Any, seed: int = 0) -> LoadedRecords:
    """All usable rows of `data_cfg.path` (at most `data_cfg.max_samples`) as PreferenceRecords.
    `seed` only matters for the synthetic world (pass `cfg.train.seed`)."""
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise DataError(f"data.format '{fmt}' is unknown; formats are {', '.join(FORMATS)}")
    if fmt == "synthetic":
        return LoadedRecords(_synthetic(data_cfg, seed))
    if not data_cfg.path:
        raise DataError(f"data.path is required for data.format '{fmt}' (a local path or a hub id)")
    rows, parse = _jsonl_rows(data_cfg) if fmt == "jsonl" else _dataset_rows(data_cfg, fmt)
    records = LoadedRecords()
    seen = 0
    for i, row in rows:
        seen += 1
        try:
            records.append(parse(row, i))
        except IdenticalAnswers as e:  # a documented skip, whatever data.skip_bad_rows says
            records.skipped.append(str(e))
        except DataError as e:
            if not data_cfg.skip_bad_rows:
                raise
            records.skipped.append(str(e))
        if data_cfg.max_samples is not None and len(records) >= data_cfg.max_samples:
            break
    if records.skipped:
        shown = "\n  ".join(records.skipped[:5]) + ("\n  ..." if len(records.skipped) > 5 else "")
        identical = sum("identical answers" in m for m in records.skipped)
        logger.warning(
            "%s: skipped %d of %d rows (%d with identical answers; the rest by data.skip_bad_rows):\n  %s",
            data_cfg.path,
            len(records.skipped),
            seen,
            identical,
            shown,
        )
    if not records:
        raise DataError(f"{data_cfg.path}: no usable rows ({len(records.skipped)} skipped, {seen} read)")
    return records
