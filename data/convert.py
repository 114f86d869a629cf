"""`ddpo convert`: RLHF-V / RLAIF-V data -> TRL's conversational preference format.

    ddpo convert --format {rlaif-v,rlhf-v} --input PATH --output DIR [--test-size 0.01] [--seed 42]
                 [--num-proc N] [--split train] [--image-dir DIR] [--push-to-hub --repo-id ID]

Each row becomes what TRL's `examples/datasets/rlaif-v.py` produces:
    prompt   = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    chosen   = [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}]
    rejected = [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]
    images   = [image]                      (cast to a sequence of datasets.Image)
then a seeded train/test split. DIR is a `save_to_disk` DatasetDict (`datasets.load_from_disk(DIR)`)
with a short dataset card README.md. Every row is checked as `load_records` checks it for training —
texts, and the image decoded in full (a missing file, corrupt or degenerate image is named with its row
and field): a bad row stops the conversion, or with `--skip-bad-rows` (as `data.skip_bad_rows`) is
dropped and counted. Image bytes are copied, not re-encoded (an image given as a file path is embedded;
a relative path is looked up in --image-dir, by default the folder of --input).

Both input schemas hold one question per row, so each row is one user turn: nothing is cut. (Multi-turn
data is already TRL-shaped: train on it with data.format trl, which keeps every turn.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import datasets

from ddpo.data.formats import REQUIRED_COLUMNS, DataError, open_dataset, row_image, row_texts
from ddpo.data.images import ImageDir

logger = logging.getLogger(__name__)

TRL_FEATURES = datasets.Features(
    {
        "prompt": [
            {
                "role": datasets.Value("string"),
                "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
            }
        ],
        "chosen": [
            {
                "role": datasets.Value("string"),
                "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
            }
        ],
        "rejected": [
            {
                "role": datasets.Value("string"),
                "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
            }
        ],
        "images": datasets.List(datasets.Image()),
    }
)


def to_trl_row(
    row: dict, index: int, fmt: str, source: str, skip_bad_rows: bool = False, image_dir: ImageDir | None = None
) -> dict:
    """One RLHF-V / RLAIF-V row (image undecoded) -> one TRL conversational preference row, checked as
    training checks it. With `skip_bad_rows`, a bad row comes back empty with its error in `error`.
    `image_dir`: where relative image paths are looked up (None: the folder of `source`)."""
    where = f"row {index} of {source}"
    image_dir = image_dir or ImageDir.of(source, None, "--image-dir", "--input")
    try:
        question, chosen, rejected = row_texts(fmt, row, where)
        image = row_image(row.get("image"), where, "image", image_dir)
    except DataError as e:
        if not skip_bad_rows:
            raise
        return {"prompt": [], "chosen": [], "rejected": [], "images": [], "error": str(e)}
    return {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": [{"bytes": image.data, "path": None}],
        "error": None,
    }


def convert(
    fmt: str,
    input_path: str,
    split: str = "train",
    test_size: float = 0.01,
    seed: int = 42,
    num_proc: int | None = None,
    skip_bad_rows: bool = False,
    image_dir: str | None = None,
) -> datasets.DatasetDict:
    """The checked TRL rows of `input_path`, split; `image_dir`: where relative image paths are looked up
    (None: the folder of `input_path`)."""
    ds = open_dataset(input_path, split)
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{input_path}: column(s) {', '.join(missing)} missing (has {', '.join(ds.column_names)}); the {fmt} "
            f"format needs {', '.join(REQUIRED_COLUMNS[fmt])}"
        )
    trl = ds.map(
        to_trl_row,
        fn_kwargs={
            "fmt": fmt,
            "source": input_path,
            "skip_bad_rows": skip_bad_rows,
            "image_dir": ImageDir.of(input_path, image_dir, "--image-dir", "--input"),
        },
        with_indices=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        features=datasets.Features({**TRL_FEATURES, "error": datasets.Value("string")}),
        desc="to TRL format",
    )
    errors = [e for e in trl["error"] if e is not None]
    if errors:
        shown = "\n  ".join(errors[:5]) + ("\n  ..." if len(errors) > 5 else "")
        logger.warning("%s: skipped %d of %d rows (--skip-bad-rows):\n  %s", input_path, len(errors), len(trl), shown)
        trl = trl.filter(lambda error: error is None, input_columns="error")
    trl = trl.remove_columns("error")
    if len(trl) < 2:
        raise DataError(
            f"{input_path}: {len(trl)} usable row(s) ({len(errors)} skipped); a train/test split needs at least 2"
        )
    return trl.train_test_split(test_size=test_size, seed=seed)


def dataset_card(fmt: str, input_path: str, splits: datasets.DatasetDict, seed: int) -> str:
    sizes = ", ".join(f"{name}: {len(ds)} rows" for name, ds in splits.items())
    return f"""---
tags: [trl, dpo, preference, vision]
---
# {fmt} in TRL's conversational preference format

Converted from `{input_path}` ({fmt} schema) by `ddpo convert`. Splits: {sizes} (seeded split, seed {seed}).

Columns, as in TRL's `examples/datasets/rlaif-v.py`:
- `prompt`: one user message whose content is an image part, then the question as a text part
- `chosen`: one assistant message, the preferred (corrected) answer
- `rejected`: one assistant message, the original answer
- `images`: a list holding the pair's one image (`datasets.Image`)

Load with `datasets.load_from_disk(DIR)`. The license and terms of use are those of the source dataset.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo convert", description="Convert RLHF-V / RLAIF-V data to TRL's conversational preference format."
    )
    parser.add_argument("--format", required=True, choices=["rlaif-v", "rlhf-v"], help="schema of the input")
    parser.add_argument("--input", required=True, help="local parquet file, folder of shards, or hub id")
    parser.add_argument("--output", required=True, help="output folder (datasets.load_from_disk)")
    parser.add_argument("--split", default="train", help="split of the input to convert")
    parser.add_argument(
        "--test-size", type=float, default=0.01, help="fraction (or count, if >= 1) of rows in the test split"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/test split")
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes for the row conversion")
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="drop malformed rows (bad texts, missing or corrupt images) with a counted, logged summary instead of "
        "stopping at the first (as data.skip_bad_rows)",
    )
    parser.add_argument(
        "--image-dir",
        default=None,
        help="folder that relative image paths in the input are looked up in (default: the folder of --input)",
    )
    parser.add_argument("--push-to-hub", action="store_true", help="also push the result to the Hugging Face Hub")
    parser.add_argument("--repo-id", default=None, help="hub dataset repo for --push-to-hub")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.repo_id:
        parser.error("--push-to-hub needs --repo-id OWNER/NAME")
    test_size = int(args.test_size) if args.test_size >= 1 else args.test_size
    try:
        splits = convert(
            args.format, args.input, args.split, test_size, args.seed, args.num_proc, args.skip_bad_rows, args.image_dir
        )
    except DataError as e:
        print(f"ddpo convert: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    splits.save_to_disk(str(out))
    (out / "README.md").write_text(dataset_card(args.format, args.input, splits, args.seed), encoding="utf-8")
    print(f"ddpo convert: wrote {', '.join(f'{k} ({len(v)} rows)' for k, v in splits.items())} to {out}")
    if args.push_to_hub:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            print(
                "ddpo convert: --push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it (and log in with "
                "`hf auth login`), or upload DIR later",
                file=sys.stderr,
            )
            return 2
        try:
            splits.push_to_hub(args.repo_id)
        except Exception as e:  # network, auth, permissions: all mean the same to the user
            print(
                f"ddpo convert: could not push to {args.repo_id} ({type(e).__name__}: {str(e)[:200]}); check the "
                f"network and your login (`hf auth login`); the local copy in {out} is complete",
                file=sys.stderr,
            )
            return 2
        print(f"ddpo convert: pushed to https://huggingface.co/datasets/{args.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
