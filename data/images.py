"""Decode one dataset image (inline bytes or a file) into a checked RGB PIL image.

Every reader goes through `decode_image`, so a corrupt, missing or degenerate image fails the same way
in every format, with the row and field in the message. Non-RGB images (grayscale, palette, RGBA,
CMYK) are converted to RGB: the vision towers expect three channels, and converting is what the
original RLHF-V code did (`.convert("RGB")`). Transparency is dropped, not composited.

Readers check every image fully at load time (`load_checked_image`: a truncated file fails there, with
its row, not in the middle of training) but keep no pixels: decoded, the 83k-pair RLAIF-V set would
need ~30 GB per rank. Images of a parquet / hub dataset stay in its memory-mapped Arrow file
(`ArrowImage`: a row reference, the bytes read when a batch is built), so each rank holds ~0.3 KB per
row and the operating system's page cache, shared by all ranks, holds the bytes; other images (JSONL
image folders, image paths in any format) are kept compressed (`EncodedImage`).
`experiments/dataset_image_memory.py` measures both. An image is decoded again when a batch is built
(`as_pil`), which costs far less than the model's forward pass.

Relative image paths, in every format, are looked up in one folder (`ImageDir`): `data.image_dir`, by
default the folder of `data.path`; a missing file's message names the row, the path tried and that setting.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

MIN_IMAGE_SIDE = 2  # a 0- or 1-pixel-wide image is a broken crop/export, not a picture


class DataError(ValueError):
    """A dataset row, field or file is malformed; the message names where and what to do."""


def decode_image(
    data: bytes | None = None, path: str | Path | None = None, *, where: str, field: str = "image"
) -> Image.Image:
    """Decode inline `data` (preferred) or the file at `path` into an RGB image.

    `where` ("row 3 of x.parquet") and `field` name the location in error messages.
    """
    if data is None and path is None:
        raise DataError(f"{where}, field '{field}': no image (neither bytes nor a path); every pair needs one image")
    if data is None:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{where}, field '{field}': image file not found: {path}; check the path or the image folder "
                "(data.image_dir)"
            )
        data = path.read_bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"{where}, field '{field}': image bytes must be bytes, got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated or corrupt file fails here, with the row in the message
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{where}, field '{field}': image could not be decoded ({type(e).__name__}: {e}); re-export the image or "
            "drop the row (data.skip_bad_rows)"
        ) from None
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{where}, field '{field}': image is {width}x{height} pixels, each side must be >= {MIN_IMAGE_SIDE}; "
            "fix or drop the row (data.skip_bad_rows)"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageDir:
    """Where a dataset's relative image paths are looked up, and how the user changes that: `setting` (the
    config key or command-line option) and `origin` (why `folder` is the one used) go into the message
    for a missing image, so it names the path tried and what to change."""

    folder: Path
    setting: str = "data.image_dir"
    origin: str = "data.image_dir"

    @classmethod
    def of(
        cls,
        data_path: str | None,
        image_dir: str | None,
        setting: str = "data.image_dir",
        path_setting: str = "data.path",
    ) -> ImageDir:
        """`image_dir` when set, else the folder of the data file `data_path` (the folder itself when it is one;
        the current directory for a hub id). `setting` / `path_setting` name the two options in messages."""
        if image_dir:
            return cls(Path(image_dir).expanduser(), setting, f"set by {setting}")
        local = Path(data_path or ".").expanduser()
        if local.is_file():
            return cls(local.parent, setting, f"the folder of {path_setting}, as {setting} is unset")
        if local.is_dir():
            return cls(local, setting, f"{path_setting} itself, as {setting} is unset")
        return cls(Path.cwd(), setting, f"the current directory, as {setting} is unset and {path_setting} is a hub id")

    def resolve(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.folder / path

    def missing(self, path: str | Path, where: str, field: str) -> DataError:
        """The error for a row whose image file is not at `path` (as the row gives it)."""
        tried = self.resolve(path).absolute()  # the current directory matters too: say it
        if Path(path).expanduser().is_absolute():
            return DataError(
                f"{where}, field '{field}': image file not found: {tried} (an absolute path: {self.setting} applies "
                "to relative paths only); fix the row's path"
            )
        return DataError(
            f"{where}, field '{field}': image file not found: {tried} (the row's '{path}' relative to "
            f"{self.folder.absolute()}, {self.origin}); fix the row's path, or set {self.setting} to the folder its "
            "image paths are relative to"
        )


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """A checked image kept in its compressed form; `decode()` returns the RGB PIL image."""

    data: bytes
    size: tuple[int, int]  # (width, height), as PIL reports it
    where: str
    field: str = "image"
    inline: bool = True  # the bytes came with the row (not read from a file path)
    mode = "RGB"  # what decode() returns

    def decode(self) -> Image.Image:
        return decode_image(self.data, where=self.where, field=self.field)


def load_checked_image(
    data: bytes | None = None,
    path: str | Path | None = None,
    *,
    where: str,
    field: str = "image",
    image_dir: ImageDir | None = None,
) -> EncodedImage:
    """Check an image completely now (same errors as `decode_image`) and keep its compressed bytes. A relative
    `path` is looked up in `image_dir` (when given), whose missing-file message names the setting to change."""
    inline = data is not None
    if data is None and path is not None and image_dir is not None:
        if not image_dir.resolve(path).is_file():
            raise image_dir.missing(path, where, field)
        path = image_dir.resolve(path)
    if data is None and path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
    image = decode_image(data, path, where=where, field=field)
    return EncodedImage(bytes(data), image.size, where, field, inline)


class ArrowImage:
    """A checked image left in a `datasets.Dataset` (memory-mapped Arrow): row `row`, column `column`
    (item `item` of a list column), an undecoded `{bytes, path}` value. `data` reads its bytes."""

    mode = "RGB"  # what decode() returns

    def __init__(
        self,
        table: Any,
        row: int,
        column: str,
        item: int | None,
        size: tuple[int, int],
        where: str,
        field: str = "image",
    ):
        self.table, self.row, self.column, self.item = table, row, column, item
        self.size, self.where, self.field = size, where, field

    @property
    def data(self) -> bytes:
        value = self.table[self.row][self.column]
        value = value if self.item is None else value[self.item]
        return value["bytes"]

    def decode(self) -> Image.Image:
        return decode_image(self.data, where=self.where, field=self.field)


StoredImage = EncodedImage | ArrowImage  # what records hold: checked, compressed, decoded on use


def as_pil(image: Image.Image | StoredImage) -> Image.Image:
    """The RGB PIL image of a record's image, whichever form the record holds."""
    return image.decode() if isinstance(image, (EncodedImage, ArrowImage)) else image
