"""Reading JSONL files of objects, with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def json_objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for every non-blank line of `path`; `where` is "FILE:LINE" for error messages.
    A line that is not a JSON object raises ValueError naming it."""
    path = Path(path)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row
