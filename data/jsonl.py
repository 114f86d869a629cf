"""JSON-lines files, the one reader: training data (data/formats), evaluation answers (ddpo/eval),
answers to score (ddpo/online/scoring). Errors name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpo.data.images import DataError


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line index from 0, text) of every non-blank line, read lazily."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                yield i, line


def parse_json_object(line: str, where: str) -> dict[str, Any]:
    """One line as a JSON object; anything else raises DataError naming `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def json_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for every non-blank line of `path`; `where` is "FILE:LINE" for error messages."""
    for i, line in jsonl_lines(Path(path)):
        where = f"{path}:{i + 1}"
        yield where, parse_json_object(line, where)
