"""Host memory that a loaded preference dataset holds for its images, per row: lazy vs in memory.

Writes an RLAIF-V-layout dataset (`RLAIF-V-Dataset_00k.parquet` shards: question / chosen / rejected /
image {bytes, path}) of --rows rows, each with its own JPEG of --side x 3/4 --side pixels (noisy
gradients, so they compress like photos rather than flat colour), then loads it with `load_records`
(data.format rlaif-v) in a fresh child process per variant and reports that child's growth in private
resident memory (RssAnon; the mapped Arrow file's pages are shared page cache, RssFile, also shown):

  arrow      what the reader does: images stay in the dataset's memory-mapped Arrow cache, records hold
             a row reference (`data.images.ArrowImage`);
  in-memory  the baseline it is measured against: every row's compressed bytes copied into its record
             (`EncodedImage`).

Then it scales the per-row numbers to RLAIF-V's 83,132 rows. Its 14 parquet shards hold ~13 GB, nearly
all image bytes (~160 KB per row), which is what the in-memory variant keeps on every rank.

    .venv/bin/python experiments/dataset_image_memory.py [--rows 2000 --side 480]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RLAIFV_ROWS = 83_132
RLAIFV_IMAGE_BYTES_PER_ROW = 13e9 / RLAIFV_ROWS  # the 14 shards' size over the rows (hub file listing)


def rss_kib(field: str = "RssAnon") -> int:
    """Resident private memory (RssAnon): what this process alone holds. Pages of a memory-mapped file
    (RssFile) are page cache, shared by every rank that maps the file, and reclaimable."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def write_dataset(folder: Path, rows: int, side: int) -> int:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records, total = [], 0
    h, w = 3 * side // 4, side
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    for i in range(rows):
        pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)) + rng.integers(0, 50, 3), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        total += len(buffer.getvalue())
        records.append(
            {
                "question": f"What is in picture {i}?",
                "chosen": "A gradient.",
                "rejected": "A cat.",
                "image": {"bytes": buffer.getvalue(), "path": None},
                "idx": str(i),
            }
        )
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "image": datasets.Image(),
            "idx": datasets.Value("string"),
        }
    )
    half = rows // 2
    for k, part in enumerate((records[:half], records[half:])):
        datasets.Dataset.from_list(part, features=features).to_parquet(str(folder / f"RLAIF-V-Dataset_{k:03d}.parquet"))
    return total


def child(variant: str, folder: str, cache: str) -> None:
    import datasets

    datasets.config.HF_DATASETS_CACHE = cache
    from ddpo.config import DataConfig
    from ddpo.data.formats import load_records, open_dataset
    from ddpo.data.images import EncodedImage

    cfg = DataConfig(format="rlaif-v", path=folder)
    open_dataset(folder, "train")  # converts the parquet files into the Arrow cache: measure a warm load
    import gc

    gc.collect()
    before, before_file = rss_kib(), rss_kib("RssFile")
    records = load_records(cfg)
    if variant == "in-memory":
        for r in records:
            r.images = [EncodedImage(r.images[0].data, r.images[0].size, r.images[0].where)]
    gc.collect()
    print(
        json.dumps(
            {
                "variant": variant,
                "rows": len(records),
                "rss_growth_kib": rss_kib() - before,
                "file_growth_kib": rss_kib("RssFile") - before_file,
                "kind": type(records[0].images[0]).__name__,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--side", type=int, default=480)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        total = write_dataset(Path(tmp) / "data", args.rows, args.side)
        print(
            f"dataset: {args.rows} rows, {total / 2**20:.0f} MB of JPEG ({total / args.rows / 1024:.0f} KB per image)"
        )
        for variant in ("arrow", "in-memory"):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", variant, str(Path(tmp) / "data"), str(Path(tmp) / "cache")],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            per_row = r["rss_growth_kib"] * 1024 / r["rows"]
            if variant == "arrow":
                at_scale = per_row * RLAIFV_ROWS
            else:  # what a row holds scales with its image bytes
                at_scale = (per_row - total / args.rows + RLAIFV_IMAGE_BYTES_PER_ROW) * RLAIFV_ROWS
            print(
                f"{variant:10s} ({r['kind']}): private memory +{r['rss_growth_kib'] / 1024:.1f} MB = "
                f"{per_row / 1024:.2f} KB per row"
                f" -> RLAIF-V's {RLAIFV_ROWS} rows: {at_scale / 2**30:.2f} GB per rank"
                f" (mapped-file pages touched: {r['file_growth_kib'] / 1024:.0f} MB, shared)"
            )


if __name__ == "__main__":
    main()
