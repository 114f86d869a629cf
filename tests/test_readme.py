"""The README is for users: short, and everything it shows works. Its example rows load through the readers
a run uses, its commands exist, and the files it links are there."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from ddpo.config import DataConfig
from ddpo.data.formats import load_records

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_under_1500_words():
    assert len(README.split()) < 1500


@pytest.mark.parametrize("fmt", ["jsonl", "trl"])
def test_the_example_row_of_each_format_loads(tmp_path, fmt):
    """The row shown for `fmt` (the `{...}` in backticks after "- `fmt` —"), written as a one-row file with its
    image, reads into one pair with the texts the row gives."""
    section = README.split(f"- `{fmt}` —", 1)[1].split("\n- ", 1)[0]
    row = json.loads(re.search(r"`(\{.*?\})`", section.replace("\n  ", " "), re.S).group(1))
    image = row["image"] if fmt == "jsonl" else row["images"][0]
    (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(tmp_path / image)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    records = load_records(DataConfig(format=fmt, path=str(tmp_path / "pairs.jsonl")))
    assert len(records) == 1
    chosen = row["chosen"] if fmt == "jsonl" else row["chosen"][0]["content"][0]["text"]
    rejected = row["rejected"] if fmt == "jsonl" else row["rejected"][0]["content"][0]["text"]
    assert (records[0].chosen, records[0].rejected) == (chosen, rejected)


def test_every_command_the_readme_shows_exists():
    from ddpo.commands import COMMANDS

    code = re.findall(r"```.*?```|`[^`\n]+`", README, re.S)  # code blocks and spans: what a user types
    shown = {name for text in code for name in re.findall(r"(?<![\w./-])ddpo ([a-z][a-z-]*)", text)}
    assert {"train", "eval", "convert", "estimate", "push", "export"} <= shown
    assert shown <= set(COMMANDS), shown - set(COMMANDS)


def test_every_file_the_readme_links_exists():
    linked = re.findall(r"\]\(((?:docs|configs|experiments)/[^)#]+)", README)
    assert linked and [p for p in linked if not (REPO / p).exists()] == []
