"""Atomic, resumable checkpoints.

Layout under `<output_dir>/checkpoints/`:

    step-000040/            one complete checkpoint (DeepSpeed engine state + trainer_state.json + rng)
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place only when every rank has
finished writing, then `latest` is replaced atomically. A crash mid-save leaves a `.tmp-*` directory
that is ignored and cleaned up, and the previous checkpoint stays usable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ddpo import distributed as dist

STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and ints, so it reloads with torch.load(weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))
    kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, output_dir: str | os.PathLike, step: int, trainer_state: dict, keep: int) -> Path:
    """Write step `step` atomically on every rank; returns the final directory."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:06d}"
    tmp_tag = f".tmp-{name}"
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    # Per-rank RNG: dropout and sampling streams differ between ranks.
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    final = root / name
    if dist.rank() == 0:
        (root / tmp_tag / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / tmp_tag, final)
        write_text_atomic(root / "latest", name)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def find(output_dir: str | os.PathLike, resume: str) -> Optional[Path]:
    """Resolve `train.resume` ('none' | 'auto' | a checkpoint directory) to a checkpoint or None."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE}); pass a checkpoints/step-* directory or 'auto'")
        return path
    root = checkpoint_root(output_dir)
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / STATE_FILE).is_file():
        return root / latest.read_text().strip()
    return None


def load(engine, path: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state."""
    _, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
