"""Readers of the four formats on fixtures in the exact schemas, and one test per bad-input case."""

import io
import json
import logging
import re
import time

import datasets
import numpy as np
import pytest
from fixtures import (
    COLORS,
    PAIRS,
    png_bytes,
    rlaifv_rows,
    rlhfv_rows,
    trl_rows,
    write_jsonl,
    write_rlaifv,
    write_rlhfv,
    write_trl_parquet,
)
from PIL import Image

from ddpo.config import DataConfig
from ddpo.data.formats import DataError, load_records
from ddpo.data.images import ArrowImage, EncodedImage, as_pil


def load(fmt, path, **kw):
    return load_records(DataConfig(format=fmt, path=str(path), **kw))


def pixel(image):
    return tuple(int(v) for v in np.asarray(image)[0, 0])


def check_all_rows(records, source):
    assert len(records) == len(PAIRS) and records.skipped == []
    for i, (record, (q, c, r)) in enumerate(zip(records, PAIRS)):
        assert (record.prompt, record.chosen, record.rejected, record.row_index) == (q, c, r, i)
        assert record.images[0].mode == "RGB" and record.images[0].size == (8, 6)
        # Kept compressed (PNG bytes, not 8x6x3 pixels: a row of the memory-mapped dataset, or the bytes
        # of a JSONL image file) and decoded on use to the original pixels.
        assert isinstance(record.images[0], (EncodedImage, ArrowImage)) and record.images[0].data[:4] == b"\x89PNG"
        assert pixel(as_pil(record.images[0])) == COLORS[i]
        assert source in record.source


# --- the four formats ----------------------------------------------------------------------------


def test_rlhfv_parquet(tmp_path):
    path = write_rlhfv(tmp_path / "RLHF-V-Dataset.parquet")
    records = load("rlhf-v", path)
    check_all_rows(records, "RLHF-V-Dataset.parquet")
    assert records[2].idx == "2"  # int idx, kept as its string
    assert records[0].meta["ds_name"] == "RLHF-V" and json.loads(records[0].meta["origin_split"])["model"] == "muffin"


def test_rlaifv_sharded_parquet_folder(tmp_path):
    folder = write_rlaifv(tmp_path / "RLAIF-V-Dataset", shards=3)
    records = load("rlaif-v", folder)
    check_all_rows(records, "RLAIF-V-Dataset")
    assert [r.idx for r in records] == [f"fixture_{i:05d}" for i in range(6)]


def test_trl_parquet_and_save_to_disk(tmp_path):
    check_all_rows(load("trl", write_trl_parquet(tmp_path / "trl.parquet")), "trl.parquet")
    ds = datasets.Dataset.from_list(trl_rows()).cast_column("images", datasets.List(datasets.Image()))
    datasets.DatasetDict({"train": ds.select(range(4)), "test": ds.select(range(4, 6))}).save_to_disk(
        str(tmp_path / "dd")
    )
    test = load("trl", tmp_path / "dd", split="test")
    assert [r.chosen for r in test] == [PAIRS[4][1], PAIRS[5][1]]
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        load("trl", tmp_path / "dd", split="validation")


def test_jsonl_with_image_folder_and_spans(tmp_path):
    rows = [{"image": f"images/{i}.png", "prompt": q, "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(PAIRS)]
    rows[0]["chosen_spans"], rows[0]["rejected_spans"] = [[11, 14]], [[11, 15]]  # "red" / "blue"
    path = write_jsonl(tmp_path / "j", rows)
    records = load("jsonl", path)
    check_all_rows(records, "data.jsonl")
    assert records[0].chosen[11:14] == "red" and records[0].chosen_spans == [(11, 14)]
    assert records[0].rejected_spans == [(11, 15)] and records[1].chosen_spans is None
    # image_dir: paths relative to another folder
    moved = tmp_path / "elsewhere"
    (tmp_path / "j" / "images").rename(moved)
    rows = [dict(row, image=f"{i}.png") for i, row in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load("jsonl", path, image_dir=str(moved))) == 6


def test_max_samples_and_image_tag_removed(tmp_path):
    rows = rlaifv_rows()
    rows[0]["question"] = "<image>\nDescribe the image in detail ."
    records = load("rlaif-v", write_rlaifv(tmp_path / "r", rows), max_samples=2)
    assert len(records) == 2 and records[0].prompt == "Describe the image in detail ."


# --- sources that cannot be opened ---------------------------------------------------------------


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.time()
    with pytest.raises(DataError, match="could not reach hub dataset 'openbmb/RLAIF-V-Dataset'.*pass a local path"):
        load("rlaif-v", "openbmb/RLAIF-V-Dataset")
    assert time.time() - start < 10


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load("rlhf-v", tmp_path / "nope.parquet")


def test_synthetic_dispatches_to_the_synthetic_world():
    records = load_records(DataConfig(format="synthetic", synthetic_pairs=3), seed=1)
    assert len(records) == 3 and all(r.images[0].mode == "RGB" and r.chosen != r.rejected for r in records)
    again = load_records(DataConfig(format="synthetic", synthetic_pairs=3), seed=1)
    assert [r.chosen for r in again] == [r.chosen for r in records]


# --- bad input: one test per case ----------------------------------------------------------------


def test_missing_field_in_a_row(tmp_path):
    path = write_jsonl(tmp_path / "j")
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["rejected"]
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\) of .*data.jsonl, field 'rejected': missing"):
        load("jsonl", path)


def test_missing_column(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "rejected"} for row in rlaifv_rows()]
    folder = tmp_path / "r"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "RLAIF-V-Dataset_000.parquet"))
    with pytest.raises(DataError, match="column\\(s\\) rejected missing"):
        load("rlaif-v", folder)


def test_empty_chosen(tmp_path):
    rows = rlaifv_rows()
    rows[3]["chosen"] = "   "
    with pytest.raises(DataError, match="row 3 of .*, field 'chosen': empty"):
        load("rlaif-v", write_rlaifv(tmp_path / "r", rows))


def test_empty_rejected(tmp_path):
    rows = rlhfv_rows()
    rows[4]["text"] = json.dumps({"question": "q ?", "chosen": "a cat .", "rejected": ""})
    with pytest.raises(DataError, match="row 4 of .*, field 'rejected': empty"):
        load("rlhf-v", write_rlhfv(tmp_path / "d.parquet", rows))


def test_chosen_identical_to_rejected_is_a_counted_skip(tmp_path, caplog):
    """The released code trains on identical pairs (zero DPO gradient); here they are skipped and counted,
    without data.skip_bad_rows."""
    rows = rlhfv_rows()
    rows[1]["text"] = json.dumps({"question": "q ?", "chosen": "a cat .", "rejected": "a cat . "})
    with caplog.at_level("WARNING"):
        records = load("rlhf-v", write_rlhfv(tmp_path / "d.parquet", rows))
    assert len(records) == len(rows) - 1 and 1 not in [r.row_index for r in records]
    assert len(records.skipped) == 1 and re.search(
        r"row 1 of .*identical answers carry no preference signal", records.skipped[0]
    )
    assert f"skipped 1 of {len(rows)} rows (1 with identical answers" in caplog.text


def test_undecodable_image_bytes(tmp_path):
    rows = rlaifv_rows()
    rows[2]["image"] = {"bytes": b"this is not a png", "path": None}
    with pytest.raises(DataError, match="row 2 of .*, field 'image': image could not be decoded"):
        load("rlaif-v", write_rlaifv(tmp_path / "r", rows))


def test_truncated_image_bytes(tmp_path):
    rows = rlhfv_rows()
    data = png_bytes(size=(64, 64))
    rows[0]["image"] = {"bytes": data[: len(data) // 2], "path": None}
    with pytest.raises(DataError, match="row 0 of .*, field 'image': image could not be decoded"):
        load("rlhf-v", write_rlhfv(tmp_path / "d.parquet", rows))


def test_missing_image_file(tmp_path):
    path = write_jsonl(tmp_path / "j")
    (tmp_path / "j" / "images" / "4.png").unlink()
    with pytest.raises(DataError, match=r"row 4 \(line 5\).*field 'image': image file not found: .*4.png"):
        load("jsonl", path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_image_is_converted(tmp_path, mode):
    rows = rlaifv_rows()
    if mode == "CMYK":  # PNG has no CMYK: a JPEG does
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (0, 0, 255)).convert("CMYK").save(buffer, format="JPEG", quality=100)
        data = buffer.getvalue()
    else:
        data = png_bytes((0, 0, 255), mode=mode)
    rows[0]["image"] = {"bytes": data, "path": None}
    image = as_pil(load("rlaif-v", write_rlaifv(tmp_path / "r", rows))[0].images[0])
    assert image.mode == "RGB" and image.size == (8, 6)
    expected = {"L": (29, 29, 29), "RGBA": (0, 0, 255), "P": (0, 0, 255), "CMYK": (0, 0, 255)}[mode]
    assert np.abs(np.subtract(pixel(image), expected)).max() <= 2


def test_odd_sized_image(tmp_path):
    rows = rlaifv_rows()
    rows[5]["image"] = {"bytes": png_bytes(size=(1, 8)), "path": None}
    with pytest.raises(DataError, match="row 5 of .*, field 'image': image is 1x8 pixels, each side must be >= 2"):
        load("rlaif-v", write_rlaifv(tmp_path / "r", rows))


def test_wrong_type_in_jsonl(tmp_path):
    rows = [
        {"image": f"images/{i}.png", "question": q, "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(PAIRS)
    ]
    rows[2]["chosen"] = 3
    with pytest.raises(DataError, match=r"row 2 \(line 3\).*field 'chosen': expected a string, got int"):
        load("jsonl", write_jsonl(tmp_path / "j", rows))


def test_wrong_type_inside_rlhfv_text(tmp_path):
    rows = rlhfv_rows()
    rows[0]["text"] = json.dumps({"question": ["what", "?"], "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match="row 0 of .*field 'question': expected a string, got list"):
        load("rlhf-v", write_rlhfv(tmp_path / "d.parquet", rows))


def test_wrong_type_in_trl_messages(tmp_path):
    rows = trl_rows()
    rows[3]["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": None}]}]
    with pytest.raises(DataError, match="row 3 of .*field 'chosen': a text part has no string 'text'"):
        load("trl", write_trl_parquet(tmp_path / "t.parquet", rows))


def test_trl_answer_without_assistant_turn(tmp_path):
    rows = trl_rows()
    rows[4]["rejected"][0]["role"] = "user"
    with pytest.raises(DataError, match="row 4 of .*field 'rejected': no 'assistant' message"):
        load("trl", write_trl_parquet(tmp_path / "t.parquet", rows))


def test_trl_image_part_count_must_match(tmp_path):
    rows = trl_rows()
    rows[2]["prompt"][0]["content"] = [{"type": "text", "text": "no image part"}]
    with pytest.raises(DataError, match="row 2 of .*field 'prompt': the user message has 0 image parts"):
        load("trl", write_trl_parquet(tmp_path / "t.parquet", rows))


def test_text_json_that_does_not_parse(tmp_path):
    rows = rlhfv_rows()
    rows[3]["text"] = '{"question": "q", "chosen": '
    with pytest.raises(DataError, match="row 3 of .*field 'text': not valid JSON"):
        load("rlhf-v", write_rlhfv(tmp_path / "d.parquet", rows))


def test_span_outside_the_answer(tmp_path):
    rows = [
        {"image": f"images/{i}.png", "question": q, "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(PAIRS)
    ]
    rows[0]["chosen_spans"] = [[30, 99]]
    with pytest.raises(DataError, match="row 0 .*field 'chosen_spans': span \\[30, 99\\] is not inside"):
        load("jsonl", write_jsonl(tmp_path / "j", rows))


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    rows = rlhfv_rows()
    rows[1]["text"] = "{not json"
    rows[4]["image"] = {"bytes": b"junk", "path": None}
    path = write_rlhfv(tmp_path / "d.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="ddpo.data.formats"):
        records = load("rlhf-v", path, skip_bad_rows=True)
    assert [r.row_index for r in records] == [0, 2, 3, 5]
    assert len(records.skipped) == 2 and "row 1" in records.skipped[0] and "row 4" in records.skipped[1]
    assert "skipped 2 of 6 rows" in caplog.text
    # max_samples counts usable rows, after the skips
    assert [r.row_index for r in load("rlhf-v", path, skip_bad_rows=True, max_samples=2)] == [0, 2]


def test_parquet_images_stay_in_the_memory_mapped_dataset(tmp_path):
    """RLAIF-V rows keep a reference into the Arrow cache, not their bytes (experiments/dataset_image_memory.py
    measures ~1.5 KB of private memory per row against the image size); decoding gives the same pixels."""
    import pickle

    records = load("rlaif-v", write_rlaifv(tmp_path / "r"))
    image = records[0].images[0]
    assert isinstance(image, ArrowImage) and "data" not in vars(image)
    assert image.table.cache_files  # memory-mapped from files, not an in-memory table
    assert pickle.loads(pickle.dumps(image)).data == image.data  # workers re-open the mapped files
    assert image.data not in pickle.dumps(image)  # pickles as a file reference: the bytes are not copied
    assert pixel(as_pil(image)) == COLORS[0]
