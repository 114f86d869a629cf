"""Relative image paths, in every format, are looked up in data.image_dir (by default the folder of data.path,
whatever the current directory), and a missing image names the row, the path tried and that setting."""

import re
import shutil
from pathlib import Path

import datasets
import pytest
from fixtures import (
    COLORS,
    PAIRS,
    rlaifv_rows,
    rlhfv_rows,
    trl_rows,
    write_images,
    write_jsonl,
    write_rlaifv,
    write_rlhfv,
    write_trl_jsonl,
    write_trl_parquet,
)

from ddpo.config import Config, DataConfig
from ddpo.data.convert import main as convert_main
from ddpo.data.formats import DataError, load_records
from ddpo.data.images import ImageDir, as_pil


def load(fmt, path, **kw):
    return load_records(DataConfig(format=fmt, path=str(path), **kw))


def colors(records) -> list[tuple]:
    return [as_pil(r.images[0]).getpixel((0, 0)) for r in records]


def trl_with_paths(paths: list[str]) -> list[dict]:
    rows = trl_rows()
    for row, path in zip(rows, paths):
        row["images"] = [path]
    return rows


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder that holds no images: relative paths must not depend on the current directory."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "elsewhere"


def move_images(data: Path, to: Path) -> None:
    shutil.move(str(data / "images"), str(to / "images"))


def test_trl_paths_are_relative_to_the_data_file_by_default(tmp_path, elsewhere):
    path = write_trl_jsonl(tmp_path / "d" / "t.jsonl", trl_with_paths(write_images(tmp_path / "d")))
    assert colors(load("trl", path)) == COLORS[: len(PAIRS)]


def test_trl_paths_follow_data_image_dir(tmp_path, elsewhere):
    paths = write_images(tmp_path / "d")
    path = write_trl_jsonl(tmp_path / "d" / "t.jsonl", trl_with_paths(paths))
    move_images(tmp_path / "d", tmp_path)  # the images now live in tmp_path/images
    assert colors(load("trl", path, image_dir=str(tmp_path))) == COLORS[: len(PAIRS)]
    message = re.escape(
        f"row 0 of {path}, field 'images': image file not found: {tmp_path / 'd' / 'images' / '0.png'} (the row's "
        f"'images/0.png' relative to {tmp_path / 'd'}, the folder of data.path, as data.image_dir is unset); fix the "
        "row's path, or set data.image_dir to the folder its image paths are relative to"
    )
    with pytest.raises(DataError, match=message):
        load("trl", path)


def test_trl_parquet_with_path_only_images(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    paths = write_images(folder)
    monkeypatch.chdir(folder)  # datasets reads each file's size when writing: from where the paths hold
    rows = trl_rows()
    for row, p in zip(rows, paths):
        row["images"] = [{"bytes": None, "path": p}]
    path = write_trl_parquet(folder / "t.parquet", rows)
    monkeypatch.chdir(tmp_path)
    assert colors(load("trl", path)) == COLORS[: len(PAIRS)]
    move_images(folder, tmp_path / "elsewhere")
    assert colors(load("trl", path, image_dir=str(tmp_path / "elsewhere"))) == COLORS[: len(PAIRS)]
    with pytest.raises(DataError, match=r"row 0 of .*, field 'images': image file not found: .*set data.image_dir"):
        load("trl", path, image_dir=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("fmt", ["rlhf-v", "rlaif-v"])
def test_rlhfv_and_rlaifv_path_only_images(tmp_path, monkeypatch, fmt):
    folder = tmp_path / "d"
    paths = write_images(folder)
    monkeypatch.chdir(folder)
    rows = rlhfv_rows() if fmt == "rlhf-v" else rlaifv_rows()
    for row, p in zip(rows, paths):
        row["image"] = {"bytes": None, "path": p}
    path = write_rlhfv(folder / "d.parquet", rows) if fmt == "rlhf-v" else write_rlaifv(folder / "shards", rows)
    monkeypatch.chdir(tmp_path)
    image_dir = None if fmt == "rlhf-v" else str(folder)  # a folder of shards: its own folder is the default
    assert colors(load(fmt, path, image_dir=image_dir)) == COLORS[: len(PAIRS)]
    if fmt == "rlaif-v":
        with pytest.raises(DataError, match=r"relative to .*shards, data.path itself, as data.image_dir is unset"):
            load(fmt, path)


def test_jsonl_missing_image_names_the_row_the_path_tried_and_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "j")
    (tmp_path / "j" / "images" / "4.png").unlink()
    tried = tmp_path / "j" / "images" / "4.png"
    with pytest.raises(
        DataError, match=re.escape(f"row 4 (line 5) of {path}, field 'image': image file not found: {tried}")
    ):
        load("jsonl", path)
    with pytest.raises(DataError, match=r"relative to .*/j, set by data.image_dir\); .*set data.image_dir"):
        load("jsonl", path, image_dir=str(tmp_path / "j"))


def test_an_absolute_path_says_the_setting_does_not_apply(tmp_path):
    rows = trl_with_paths([str(tmp_path / "gone.png")] * len(PAIRS))
    path = write_trl_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"gone.png \(an absolute path: data.image_dir applies to relative paths only"):
        load("trl", path, image_dir=str(tmp_path))


def test_image_dir_defaults(tmp_path, elsewhere):
    (tmp_path / "f.jsonl").write_text("")
    assert ImageDir.of(str(tmp_path / "f.jsonl"), None).folder == tmp_path
    assert ImageDir.of(str(tmp_path), None).folder == tmp_path
    assert ImageDir.of("owner/dataset", None).folder == elsewhere
    assert ImageDir.of("owner/dataset", "imgs").resolve("a.png") == ImageDir.of(None, "imgs").folder / "a.png"


def test_config_no_longer_requires_image_dir_for_jsonl(tmp_path):
    Config(data=DataConfig(format="jsonl", path=str(write_jsonl(tmp_path / "j")))).validate()
    assert "every format" in DataConfig.__dataclass_fields__["image_dir"].metadata["help"]


def rlaifv_with_paths(tmp_path: Path, monkeypatch) -> Path:
    """d/src/RLAIF-V-Dataset_000.parquet whose images are paths relative to d (d/images/<i>.png)."""
    folder = tmp_path / "d"
    paths = write_images(folder)
    monkeypatch.chdir(folder)  # datasets reads each file's size when writing: from where the paths hold
    rows = rlaifv_rows()
    for row, p in zip(rows, paths):
        row["image"] = {"bytes": None, "path": p}
    src = write_rlaifv(folder / "src", rows, shards=1) / "RLAIF-V-Dataset_000.parquet"
    monkeypatch.chdir(tmp_path)
    return src


def test_convert_looks_up_relative_paths_in_image_dir(tmp_path, monkeypatch):
    src, folder = rlaifv_with_paths(tmp_path, monkeypatch), tmp_path / "d"
    out = tmp_path / "out"
    args = ["--format", "rlaif-v", "--input", str(src), "--output", str(out), "--test-size", "1"]
    assert convert_main(args) == 2  # the default: the input's folder, d/src, holds no images/
    assert convert_main([*args, "--image-dir", str(folder)]) == 0
    images = [image for split in datasets.load_from_disk(str(out)).values() for r in split for image in r["images"]]
    assert sorted(image.getpixel((0, 0)) for image in images) == sorted(COLORS[: len(PAIRS)])


def test_convert_names_its_own_option(tmp_path, monkeypatch, capsys):
    src = rlaifv_with_paths(tmp_path, monkeypatch)
    assert convert_main(["--format", "rlaif-v", "--input", str(src), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "row 0 of" in err and "the folder of --input, as --image-dir is unset" in err and "set --image-dir" in err
