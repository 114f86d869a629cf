"""Atomic, resumable checkpoints.

Layout under `<output_dir>/checkpoints/`:

    step-000040/            one complete checkpoint: DeepSpeed engine state, rng_rank*.pt, trainer_state.json
    latest                  text file naming the newest complete checkpoint

A LoRA run's checkpoint (`trainable_only`, model.lora_r > 0) holds the trainable parameters (the
adapters), their optimizer state, the scheduler and the RNG, not the frozen base: the base is rebuilt from
the config when the run resumes (model.name_or_path, or the seed of a random-init base, which
ddpo/export.py also keeps in the run directory and checks), so a resume is as exact as a full checkpoint's.
At 7B with r 64 (160 M adapter parameters: bf16 weights, fp32 master copy and Adam moments) that is about
2 GB per checkpoint, against ~27 GB with the base.

A checkpoint is written into a temporary directory and renamed into place only when every rank has
finished writing, then `latest` is replaced atomically. A crash mid-save leaves a `.tmp-*` directory
that is ignored and cleaned up, and the previous checkpoint stays usable.

`trainer_state.json` is written last and lists every file of the checkpoint with its size, so a
checkpoint is *complete* when that file exists and every listed file has its recorded size. Resume
(`find`) never silently loses work: under `train.resume auto`, a `latest` that names a missing or
incomplete checkpoint is reported and the newest complete checkpoint is used instead; a checkpoints
folder with no complete checkpoint is an error, not a fresh start. A file that is present but cannot
be read is a `CheckpointError` naming the file and what to do.

Loading unpickles nothing arbitrary: every file, DeepSpeed's included, is read with
`torch.load(weights_only=True)`, with only the few DeepSpeed classes its optimizer states hold
(`DEEPSPEED_SAFE_GLOBALS`) allowed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpo import distributed as dist

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINABLE_ONLY = "trainable_only"  # trainer_state.json key: the checkpoint holds no frozen parameter
STEP_DIR = re.compile(r"step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint or file and what to do."""


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


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save(
    engine, output_dir: str | os.PathLike, step: int, trainer_state: dict, keep: int, trainable_only: bool = False
) -> Path:
    """Write step `step` atomically on every rank; returns the final directory. `trainable_only`: leave the
    frozen parameters out (LoRA: the base), as trainer_state.json then records for `load`."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:06d}"
    tmp_tag = f".tmp-{name}"
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    if trainable_only:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
    else:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    # Per-rank RNG: dropout and sampling streams differ between ranks.
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    final = root / name
    if dist.rank() == 0:
        files = {
            str(f.relative_to(root / tmp_tag)): f.stat().st_size
            for f in sorted((root / tmp_tag).rglob("*"))
            if f.is_file()
        }
        state = {**trainer_state, **({TRAINABLE_ONLY: True} if trainable_only else {}), "files": files}
        # written last: its presence means every file above is complete
        (root / tmp_tag / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / tmp_tag, final)
        write_text_atomic(root / "latest", name)
        _prune(root, keep, step)
    dist.barrier()
    return final


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the `keep` newest checkpoints of this run (0 = all). Checkpoints past `step`, the one just saved, are
    an earlier attempt's (this run restarted before them, under the same config: ddpo/run_identity.py refuses another):
    they go first, so pruning never deletes this run's checkpoint to keep an older run's."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        steps = _step_dirs(root)
        ahead = [p for p in steps if _step_of(p) > step]
        own = [p for p in steps if _step_of(p) <= step]
        for old in ahead + own[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint to resume from
# ----------------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[Path]:
    """step-* directories, oldest first (by step number)."""
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def has_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a run's checkpoints (complete or not): a step-* folder or a `latest` file."""
    root = checkpoint_root(output_dir)
    return root.is_dir() and (bool(_step_dirs(root)) or (root / "latest").is_file())


def _step_of(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def incomplete_reason(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is complete."""
    if not path.is_dir():
        return f"{path} does not exist"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{path} has no {STATE_FILE} (its save did not finish, or the file was removed)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{state_file} cannot be read ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{state_file} holds no training step"
    for name, size in state.get("files", {}).items():  # checkpoints from before the file list: not checked
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is {file.stat().st_size} bytes but was saved with {size} (truncated or damaged)"
    return None


def find(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """Resolve `train.resume` ('none' | 'auto' | a checkpoint directory) to a complete checkpoint or None.

    'auto': the newest complete checkpoint, normally the one `latest` names; when `latest` names a missing
    or incomplete one, or an older one than the newest complete (a save stopped before updating it), a
    warning says so. None only when there is no checkpoint at all; checkpoints that are all incomplete
    are a `CheckpointError`, never a silent fresh start.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        reason = incomplete_reason(path)
        if reason:
            raise CheckpointError(
                f"train.resume={resume}: not a complete checkpoint: {reason}. Pass another checkpoints/step-* "
                "directory or 'auto'"
            )
        return path
    root = checkpoint_root(output_dir)
    latest_file = root / "latest"
    steps = _step_dirs(root) if root.is_dir() else []
    if not steps and not latest_file.is_file():
        return None  # nothing saved yet (a `.tmp-*` folder is a save that never finished)
    newest_complete = next((p for p in reversed(steps) if incomplete_reason(p) is None), None)
    if latest_file.is_file():
        name = latest_file.read_text(encoding="utf-8").strip()
        problem = incomplete_reason(root / name) if name else f"{latest_file} is empty"
        if problem is None:
            if newest_complete is None or _step_of(newest_complete) <= _step_of(root / name):
                return root / name
            problem = (
                f"{latest_file} names '{name}', but {newest_complete.name} is newer and complete (a save stopped "
                "before updating 'latest')"
            )
        else:
            problem = f"{latest_file} names '{name}', but {problem}"
    else:
        problem = f"{root} has no 'latest' file"
    if newest_complete is not None:
        logger.warning("%s: resuming from the newest complete checkpoint, %s", problem, newest_complete)
        return newest_complete
    reasons = [incomplete_reason(p) for p in reversed(steps)]
    details = "; ".join(r for r in reasons if r)
    raise CheckpointError(
        f"train.resume auto: {problem}, and no checkpoint in {root} is complete ({details or 'none saved'}). "
        f"Nothing to resume from: move or delete {root} to start over (or set train.resume none), "
        "or point train.resume at a complete checkpoint directory"
    )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its ZeRO optimizer states pickle (found by loading ZeRO-1/2/3 checkpoints
    with weights_only=True); plain data otherwise. Nothing here runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(file: str | os.PathLike, map_location=None) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's classes allowed; any failure names the file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt: EOFError, RuntimeError from the zip reader, ...
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsupported:
            raise CheckpointError(
                f"{file}: refused by torch.load(weights_only=True): it holds {unsupported.group(1)} besides tensors "
                "and plain data, which loading it would have to run. ddpo does not unpickle such objects; resume "
                "from a checkpoint ddpo wrote"
            ) from None
        raise CheckpointError(
            f"{file}: cannot be read ({type(e).__name__}: {_first_line(e)}); the file is damaged. Delete its "
            f"checkpoint folder {Path(file).parent} to resume from the previous one (train.resume auto), or set "
            "train.resume to an older checkpoints/step-* directory"
        ) from None


def _first_line(error: Exception) -> str:
    """The informative part of a load error (torch's weights-only errors wrap it in paragraphs of advice)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def load(engine, path: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state.

    DeepSpeed reads its files through `engine.checkpoint_engine.load`, which is pointed at `safe_load`
    for the call, so no file is unpickled with weights_only=False."""
    reason = incomplete_reason(path)
    if reason:
        raise CheckpointError(f"cannot resume: {reason}")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    # The frozen parameters a trainable-only checkpoint lacks keep the values the model was built with.
    partial = {}
    if state.get(TRAINABLE_ONLY):
        partial = {"load_module_strict": False, "custom_load_fn": _trainable_loader(path)}
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = lambda file, map_location=None: safe_load(file, map_location)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, **partial)
    finally:
        del checkpoint_engine.load  # back to the class's method
    if load_path is None:  # DeepSpeed only logs a warning when the model states file is absent
        raise CheckpointError(
            f"{path}: DeepSpeed found no model states to load; delete the folder to resume from the previous checkpoint"
        )
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(safe_load(rng_file))
    else:
        logger.warning(
            "%s missing: this rank's RNG streams are not restored (the run continues, but not bit for bit)", rng_file
        )
    return state


def _trainable_loader(path: Path):
    """DeepSpeed's module loader for a trainable-only checkpoint: the frozen parameters may be absent, and
    nothing else: every trainable parameter must be there, and no key the model lacks."""

    def load(src: dict, dst: torch.nn.Module) -> None:
        frozen = {name for name, p in dst.named_parameters() if not p.requires_grad}
        result = dst.load_state_dict(src, strict=False)
        lacking = [k for k in result.missing_keys if k not in frozen]
        if lacking or result.unexpected_keys:
            problem = (
                f"lacks the trained parameter {lacking[0]}"
                if lacking
                else f"holds {result.unexpected_keys[0]}, which the model has not"
            )
            raise CheckpointError(
                f"{path}: it {problem} ({len(lacking)} missing, {len(result.unexpected_keys)} unexpected): it was "
                "saved by a run with other trainable parameters (model.lora_r, model.lora_target, model.freeze_*). "
                "Resume with that run's model settings, or start over (train.resume none)"
            )

    return load
