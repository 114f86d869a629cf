"""Reference log-probs, computed once and cached per answer token.

`ddpo precompute-ref CONFIG` runs the reference (initial) model over the dataset, sharded across
ranks, and stores the per-token log-probs of every chosen and rejected answer — not only their sums,
so gamma and the normalisation can change without recomputing. The cache is keyed by a fingerprint of
everything that changes those numbers: model weights, dataset, template, tokenizer, max length and
image transform. Training refuses a cache whose fingerprint differs and says which part differs, and
neither training nor `precompute-ref` writes over a directory that holds another fingerprint's cache or
files that are not a cache (`check_replaceable`): a cache is only ever recomputed in place as itself.

Layout of a cache directory:

    fingerprint.json    {"model": sha256, "dataset": ..., "template": ..., ...}
    logps.parquet       row_index:int64, chosen_logps:list<float32>, rejected_logps:list<float32>
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ddpo import distributed as dist
from ddpo.data.images import ArrowImage, EncodedImage
from ddpo.progress import progress_bar

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
LOGPS_FILE = "logps.parquet"


class ReferenceCacheError(RuntimeError):
    """The cache is missing, incomplete, or was computed under different settings."""


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------
def _sha(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, shape, dtype, values)."""

    def chunks():
        for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
            yield f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode()
            yield _tensor_bytes(tensor)

    return _sha(chunks())


def dataset_fingerprint(records) -> str:
    def chunks():
        for r in records:
            # earlier turns change the encoded prompt; single-turn rows keep the fingerprint they always had
            yield json.dumps(
                [r.row_index, r.prompt, r.chosen, r.rejected, *([r.history] if r.history else [])]
            ).encode()
            for image in r.images:  # compressed bytes when the record keeps them, else the pixels
                yield f"{image.size}{image.mode}".encode()
                yield image.data if isinstance(image, (EncodedImage, ArrowImage)) else image.tobytes()

    return _sha(chunks())


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha([text.encode(), json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode()])


def image_transform_fingerprint(model) -> str:
    """Hash of the model's transform applied to a fixed probe image: any change in size, crop,
    interpolation or normalisation changes it, whatever the code that implements it."""
    probe = Image.fromarray((np.arange(37 * 53 * 3) % 251).astype(np.uint8).reshape(37, 53, 3), "RGB")
    return _sha([_tensor_bytes(model.preprocess_images([probe]).float())])


def fingerprint(model, records, cfg) -> dict[str, str]:
    return {
        "model": model_fingerprint(model),
        "dataset": dataset_fingerprint(records),
        "template": cfg.data.template,
        "tokenizer": tokenizer_fingerprint(model.tokenizer),
        "max_length": str(cfg.data.max_length),
        # 'muffin' labels the role prefix too (more cached tokens); absent when default, so older caches match
        **({"label_span": cfg.data.label_span} if cfg.data.label_span != "answer" else {}),
        "image_transform": image_transform_fingerprint(model),
    }


# ----------------------------------------------------------------------------------------------
# Computing and storing
# ----------------------------------------------------------------------------------------------
def answer_logps(token_logps: torch.Tensor, answer_mask: torch.Tensor) -> list[list[float]]:
    """Per-row log-probs at answer positions only ([N, T-1] + [N, T-1] bool answer mask -> N lists)."""
    return [row[m].float().tolist() for row, m in zip(token_logps, answer_mask)]


def corrupted_cache_dir(directory: str | os.PathLike, loss_cfg) -> Path:
    """Where the reference log-probs given corrupted images live: a sibling of the plain cache, named by
    the corruption (mDPO's conditional term; ddpo/corruption.py)."""
    directory = Path(directory)
    tag = f"{loss_cfg.corruption}-{loss_cfg.corruption_strength:g}-seed{loss_cfg.corruption_seed}"
    return directory.with_name(f"{directory.name}-corrupted-{tag}")


def corruption_fingerprint(loss_cfg) -> dict[str, str]:
    return {"corruption": f"{loss_cfg.corruption}:{loss_cfg.corruption_strength!r}:{loss_cfg.corruption_seed}"}


@torch.no_grad()
def compute_answer_logps(
    model, dataset, collate, micro_batch_size: int, indices: list[int], progress: bool = False, transform=None
):
    """Reference log-probs for `indices` of `dataset`: {row_index: (chosen list, rejected list)}.
    `transform(batch) -> batch` (optional) changes each collated batch first (a corruption of its images)."""
    was_training = model.training
    model.eval()
    out: dict[int, tuple[list[float], list[float]]] = {}
    device = dist.device()
    batches = [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    for batch_indices in progress_bar(iterable=batches, desc="reference log-probs", disable=not progress):
        batch = collate([dataset[i] for i in batch_indices]).to(device)
        if transform is not None:
            batch = transform(batch)
        chosen, rejected = model(batch)
        b = batch.num_pairs
        chosen_lists = answer_logps(chosen, batch.answer_mask[:b])
        rejected_lists = answer_logps(rejected, batch.answer_mask[b:])
        for row, c, r in zip(batch.row_indices, chosen_lists, rejected_lists):
            out[row] = (c, r)
    model.train(was_training)
    return out


def _differing(found: dict, expected: dict[str, str]) -> str | None:
    """'max_length, model differ: max_length: cache '256' vs now '200'; ...', or None when the parts agree."""
    differing = [k for k in expected if found.get(k) != expected[k]]
    if not differing:
        return None
    details = "; ".join(f"{k}: cache {found.get(k)!r} vs now {expected[k]!r}" for k in differing)
    return f"{', '.join(differing)} differ: {details}"


def _read_fingerprint(directory: Path) -> dict:
    fp_file = directory / FINGERPRINT_FILE
    try:
        found = json.loads(fp_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        found = e
    if not isinstance(found, dict):
        raise ReferenceCacheError(
            f"{fp_file} cannot be read ({type(found).__name__}: {found}); nothing was written. Delete {directory} "
            "to recompute the cache there, or point train.reference_cache at another directory"
        )
    return found


def check_replaceable(directory: str | os.PathLike, fp: dict[str, str]) -> None:
    """Refuse to write a cache into `directory` unless it is missing, empty, or this very cache (same fingerprint,
    recomputed): a cache of another model or dataset, or a folder of other files, is never replaced."""
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return
    if not (directory / FINGERPRINT_FILE).is_file():
        raise ReferenceCacheError(
            f"{directory} is not a reference cache (it holds other files and no {FINGERPRINT_FILE}); nothing was "
            "written. Point train.reference_cache at a new or empty directory"
        )
    differing = _differing(_read_fingerprint(directory), fp)
    if differing:
        raise ReferenceCacheError(
            f"reference cache {directory} holds the log-probs of another model or data ({differing}); it was left "
            "as it is. Point train.reference_cache at another directory, or delete this one to recompute it there"
        )


def write_cache(
    directory: str | os.PathLike, fp: dict[str, str], logps: dict[int, tuple[list[float], list[float]]]
) -> Path:
    """Write atomically: a temporary directory renamed into place (only over nothing or the same cache)."""
    directory = Path(directory)
    check_replaceable(directory, fp)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = sorted(logps)
    table = pa.table(
        {
            "row_index": pa.array(rows, pa.int64()),
            "chosen_logps": pa.array([logps[r][0] for r in rows], pa.list_(pa.float32())),
            "rejected_logps": pa.array([logps[r][1] for r in rows], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp / LOGPS_FILE)
    (tmp / FINGERPRINT_FILE).write_text(json.dumps(fp, indent=2), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def read_cache(directory: str | os.PathLike, expected: dict[str, str]) -> dict[int, tuple[list[float], list[float]]]:
    directory = Path(directory)
    fp_file = directory / FINGERPRINT_FILE
    if not fp_file.is_file() or not (directory / LOGPS_FILE).is_file():
        raise ReferenceCacheError(
            f"no reference cache in {directory}: run `ddpo precompute-ref CONFIG` or set train.reference live"
        )
    differing = _differing(_read_fingerprint(directory), expected)
    if differing:
        raise ReferenceCacheError(
            f"reference cache {directory} was computed under different settings ({differing}). Point "
            "train.reference_cache at another directory, or delete this one to recompute it there (training does, "
            "or `ddpo precompute-ref`)"
        )
    table = pq.read_table(directory / LOGPS_FILE).to_pydict()
    return {r: (c, j) for r, c, j in zip(table["row_index"], table["chosen_logps"], table["rejected_logps"])}


def attach(
    records,
    cached: dict[int, tuple[list[float], list[float]]],
    directory,
    fields: tuple[str, str] = ("ref_chosen_logps", "ref_rejected_logps"),
) -> None:
    """Put cached per-token log-probs onto the records' `fields` (by source row index)."""
    missing = [r.row_index for r in records if r.row_index not in cached]
    if missing:
        raise ReferenceCacheError(
            f"reference cache {directory} lacks rows {missing[:10]}{'...' if len(missing) > 10 else ''}: recompute it"
        )
    for r in records:
        chosen, rejected = cached[r.row_index]
        setattr(r, fields[0], chosen)
        setattr(r, fields[1], rejected)


def shard(num_items: int) -> list[int]:
    """This rank's indices: contiguous shards, padded so every rank runs the same number of forwards
    (ZeRO-3 needs every rank in every forward); padding repeats the last item and is dropped on merge."""
    per_rank = -(-num_items // dist.world_size())
    start = dist.rank() * per_rank
    return [min(i, num_items - 1) for i in range(start, start + per_rank)]


def gather(local: dict) -> dict:
    if dist.world_size() == 1:
        return local
    parts: list[dict | None] = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged
