"""`ddpo convert` -> TRL conversational preference format, and the round trip back into batches."""

import json

import datasets
import pytest
from fixtures import PAIRS, all_texts, png_bytes, rlhfv_rows, write_rlaifv, write_rlhfv

from ddpo.cli import main as ddpo_main
from ddpo.config import DataConfig
from ddpo.data.collator import EncodingSettings, PairCollator, PairDataset, PairEncoder
from ddpo.data.convert import main
from ddpo.data.formats import load_records
from ddpo.data.tokenizer import build_word_tokenizer


def test_rlaifv_round_trip_convert_load_encode_collate(tmp_path):
    out = tmp_path / "trl"
    assert (
        ddpo_main(
            [
                "convert",
                "--format",
                "rlaif-v",
                "--input",
                str(write_rlaifv(tmp_path / "src")),
                "--output",
                str(out),
                "--test-size",
                "2",
            ]
        )
        == 0
    )
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "test"} and (len(dd["train"]), len(dd["test"])) == (4, 2)
    assert set(dd["train"].column_names) == {"prompt", "chosen", "rejected", "images"}
    assert dd["train"].features["images"] == datasets.List(datasets.Image())
    row = dd["train"][0]
    q = row["prompt"][0]["content"][1]["text"]
    pair = next(p for p in PAIRS if p[0] == q and p[1] == row["chosen"][0]["content"][0]["text"])
    assert row["prompt"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": pair[0]}]}
    ]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pair[1]}]}]
    assert row["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": pair[2]}]}]
    assert row["images"][0].size == (8, 6)
    assert "TRL" in (out / "README.md").read_text() and "train: 4 rows" in (out / "README.md").read_text()

    records = load_records(DataConfig(format="trl", path=str(out), split="train"))
    sources = {p[1]: p for p in PAIRS}
    assert len(records) == 4
    assert all((r.prompt, r.chosen, r.rejected) == sources[r.chosen] for r in records)
    tokenizer = build_word_tokenizer(all_texts())
    encoder = PairEncoder(tokenizer, "<image>" * 4, EncodingSettings("llava_v1", max_length=96))
    batch = PairCollator(tokenizer.pad_token_id)([item for item in PairDataset(records, encoder)])
    assert batch.input_ids.shape[0] == 8 and batch.corrected.shape == (8, batch.input_ids.shape[1] - 1)
    assert batch.corrected.any() and not (batch.corrected & (batch.labels[:, 1:] == -100)).any()


def test_split_is_seeded(tmp_path):
    src = write_rlhfv(tmp_path / "RLHF-V-Dataset.parquet")
    chosen = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        assert (
            main(
                [
                    "--format",
                    "rlhf-v",
                    "--input",
                    str(src),
                    "--output",
                    str(tmp_path / name),
                    "--test-size",
                    "0.5",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
        chosen.append(
            [r["chosen"][0]["content"][0]["text"] for r in datasets.load_from_disk(str(tmp_path / name))["test"]]
        )
    assert chosen[0] == chosen[1] and chosen[0] != chosen[2] and len(chosen[0]) == 3


def test_bad_row_stops_the_conversion_naming_it(tmp_path, capsys):
    rows = rlhfv_rows()
    rows[2]["text"] = json.dumps({"question": "q ?", "chosen": "same .", "rejected": "same ."})
    src = write_rlhfv(tmp_path / "d.parquet", rows)
    assert main(["--format", "rlhf-v", "--input", str(src), "--output", str(tmp_path / "out")]) == 2
    assert "row 2 of" in capsys.readouterr().err.split("ddpo convert: ")[-1]
    assert not (tmp_path / "out").exists()


def test_missing_input_and_push_offline_fail_clearly(tmp_path, capsys, monkeypatch):
    assert main(["--format", "rlaif-v", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "rlaif-v", "--input", "x", "--output", "y", "--push-to-hub"])  # no --repo-id
    assert "--push-to-hub needs --repo-id" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = write_rlaifv(tmp_path / "src")
    assert (
        main(
            [
                "--format",
                "rlaif-v",
                "--input",
                str(src),
                "--output",
                str(tmp_path / "o"),
                "--push-to-hub",
                "--repo-id",
                "me/x",
            ]
        )
        == 2
    )
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert datasets.load_from_disk(str(tmp_path / "o"))["train"].num_rows == 5  # the local copy is still written


def _write_with_bad_images(path, corrupt_row_1: bool = True):
    """Row 1: a truncated PNG; row 3: a path to an image file that is gone by conversion time."""
    rows = rlhfv_rows()
    if corrupt_row_1:
        rows[1]["image"] = {"bytes": png_bytes()[:40], "path": None}
    gone = path.parent / "gone.png"
    gone.write_bytes(png_bytes())  # datasets reads the file's size when writing the parquet
    rows[3]["image"] = {"bytes": None, "path": str(gone)}
    write_rlhfv(path, rows)
    gone.unlink()
    return path


def test_corrupt_or_missing_image_stops_the_conversion_naming_the_row(tmp_path, capsys):
    src = _write_with_bad_images(tmp_path / "d.parquet")
    assert main(["--format", "rlhf-v", "--input", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"row 1 of {src}, field 'image': image could not be decoded" in err and "data.skip_bad_rows" in err
    assert not (tmp_path / "out").exists()
    src = _write_with_bad_images(tmp_path / "e.parquet", corrupt_row_1=False)
    assert main(["--format", "rlhf-v", "--input", str(src), "--output", str(tmp_path / "out")]) == 2
    assert f"row 3 of {src}, field 'image': image file not found: {tmp_path / 'gone.png'}" in capsys.readouterr().err


def test_skip_bad_rows_drops_and_counts_bad_images(tmp_path, caplog):
    src = _write_with_bad_images(tmp_path / "d.parquet")
    with caplog.at_level("WARNING"):
        assert (
            main(
                [
                    "--format",
                    "rlhf-v",
                    "--input",
                    str(src),
                    "--output",
                    str(tmp_path / "out"),
                    "--test-size",
                    "1",
                    "--skip-bad-rows",
                ]
            )
            == 0
        )
    assert (
        "skipped 2 of 6 rows (--skip-bad-rows)" in caplog.text
        and "row 1 of" in caplog.text
        and "row 3 of" in caplog.text
    )
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(dd["train"]) + len(dd["test"]) == 4 and set(dd["train"].column_names) == {
        "prompt",
        "chosen",
        "rejected",
        "images",
    }
    kept = {r["chosen"][0]["content"][0]["text"] for split in dd.values() for r in split}
    assert kept == {PAIRS[i][1] for i in (0, 2, 4, 5)}
    # What convert writes, training loads: every kept image decodes.
    assert len(load_records(DataConfig(format="trl", path=str(tmp_path / "out"), split="train"))) == len(dd["train"])
