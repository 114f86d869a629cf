"""Tiny datasets in the exact public schemas (RLHF-V, RLAIF-V, TRL, JSONL + images), PNG bytes inside.

Rows are plain dicts in each schema, so a test can break one field and write the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
from datasets import Features, Image, Value
from PIL import Image as PILImage

# (question, chosen = corrected, rejected = original) in words the word tokenizer knows
PAIRS = [
    (
        "Describe the image in detail .",
        "there is a red circle at the top left .",
        "there is a blue circle at the top left .",
    ),
    ("What is in the picture ?", "a cat and a dog are in the center .", "a cat and a frisbee are in the center ."),
    (
        "How many objects are there ?",
        "there are two objects : a red square and a green triangle .",
        "there are three objects : a red square and a green triangle .",
    ),
    (
        "Describe the image in detail .",
        "a small yellow cat is at the bottom right .",
        "a large yellow dog is at the bottom right .",
    ),
    (
        "What is in the picture ?",
        "a blue square is in the center .",
        "a blue square and a red circle are in the center .",
    ),
    ("How many objects are there ?", "there is one object .", "there are four objects ."),
]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]

RLHFV_FEATURES = Features(
    {
        "ds_name": Value("string"),
        "image": Image(),
        "text": Value("string"),
        "origin_dataset": Value("string"),
        "origin_split": Value("string"),
        "idx": Value("int64"),
        "image_path": Value("string"),
    }
)
RLAIFV_FEATURES = Features(
    {
        "ds_name": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "origin_dataset": Value("string"),
        "origin_split": Value("string"),
        "idx": Value("string"),
        "image_path": Value("string"),
    }
)


def all_texts() -> list[str]:
    return [text for pair in PAIRS for text in pair]


def png_bytes(color: tuple = (255, 0, 0), size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    image = PILImage.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rlhfv_rows(n: int = len(PAIRS)) -> list[dict]:
    return [
        {
            "ds_name": "RLHF-V",
            "image": {"bytes": png_bytes(COLORS[i % 6]), "path": None},
            "text": json.dumps({"question": q, "chosen": c, "rejected": r}),
            "origin_dataset": "fixture",
            "origin_split": json.dumps({"model": "muffin", "type": "detailed_description"}),
            "idx": i,
            "image_path": f"images/{i}.png",
        }
        for i, (q, c, r) in enumerate(PAIRS[:n])
    ]


def rlaifv_rows(n: int = len(PAIRS)) -> list[dict]:
    return [
        {
            "ds_name": "RLAIF-V",
            "image": {"bytes": png_bytes(COLORS[i % 6]), "path": None},
            "question": q,
            "chosen": c,
            "rejected": r,
            "origin_dataset": "fixture",
            "origin_split": json.dumps({"generator": "llava15_7b", "type": "question_answering"}),
            "idx": f"fixture_{i:05d}",
            "image_path": f"images/{i}.png",
        }
        for i, (q, c, r) in enumerate(PAIRS[:n])
    ]


def trl_rows(n: int = len(PAIRS)) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r}]}],
            "images": [{"bytes": png_bytes(COLORS[i % 6]), "path": None}],
        }
        for i, (q, c, r) in enumerate(PAIRS[:n])
    ]


def _text_message(role: str, text: str, image: bool = False) -> dict:
    return {
        "role": role,
        "content": [*([{"type": "image", "text": None}] if image else []), {"type": "text", "text": text}],
    }


def trl_conversation_rows(turns: int, n: int = len(PAIRS), system: str | None = None) -> list[dict]:
    """TRL rows whose prompts hold `turns` user turns: before row i's question, the questions and chosen
    answers of the next pairs as earlier turns; the image part in the first user turn; an optional system
    message first."""
    rows = trl_rows(n)
    for i, row in enumerate(rows):
        messages = [_text_message("system", system)] if system else []
        for k in range(turns - 1):
            earlier_question, earlier_answer, _ = PAIRS[(i + k + 1) % len(PAIRS)]
            messages += [
                _text_message("user", earlier_question, image=k == 0),
                _text_message("assistant", earlier_answer),
            ]
        row["prompt"] = [*messages, _text_message("user", PAIRS[i][0], image=turns == 1)]
    return rows


def write_images(folder: Path, n: int = len(PAIRS)) -> list[str]:
    """images/<i>.png under `folder` (pair i's color); their paths relative to `folder`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / "images" / f"{i}.png").write_bytes(png_bytes(COLORS[i % 6]))
    return [f"images/{i}.png" for i in range(n)]


def write_trl_jsonl(path: Path, rows: list[dict]) -> Path:
    """TRL rows as JSON lines (read by `datasets`' json builder): images may be plain path strings."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_rlhfv(path: Path, rows: list[dict] | None = None) -> Path:
    """RLHF-V-Dataset.parquet: one file."""
    datasets.Dataset.from_list(rows if rows is not None else rlhfv_rows(), features=RLHFV_FEATURES).to_parquet(
        str(path)
    )
    return path


def write_rlaifv(folder: Path, rows: list[dict] | None = None, shards: int = 2) -> Path:
    """RLAIF-V-Dataset_000.parquet, _001, ...: rows split over `shards` files."""
    rows = rows if rows is not None else rlaifv_rows()
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        datasets.Dataset.from_list(part, features=RLAIFV_FEATURES).to_parquet(
            str(folder / f"RLAIF-V-Dataset_{s:03d}.parquet")
        )
    return folder


def write_trl_parquet(path: Path, rows: list[dict] | None = None) -> Path:
    rows = rows if rows is not None else trl_rows()
    ds = datasets.Dataset.from_list(rows)
    ds.cast_column("images", datasets.List(Image())).to_parquet(str(path))
    return path


def write_jsonl(folder: Path, rows: list[dict] | None = None) -> Path:
    """data.jsonl + images/<i>.png; rows may carry chosen_spans / rejected_spans."""
    write_images(folder)
    if rows is None:
        rows = [
            {"image": f"images/{i}.png", "question": q, "chosen": c, "rejected": r, "idx": i}
            for i, (q, c, r) in enumerate(PAIRS)
        ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
