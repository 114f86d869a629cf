"""Run identity: a run directory belongs to the run that wrote it, and a run of another config never resumes,
prunes or overwrites it.

`<output_dir>/run.json` records the run that owns the directory: its resolved config and `config_hash`, a hash
of its *identity*. The identity is every config field that changes what the run computes, that is all of them
except `NOT_IDENTITY`: where and how often it writes, logs and evaluates (train.output_dir, resume, save_steps,
save_total_limit, logging_steps, overwrite_output_dir, eval_steps, the logging section), and how the same numbers
are computed (train.num_threads, where the reference log-probs come from, the attention kernel, activation
recomputation, the log-prob chunking, the packed-pair layout, ZeRO sharding and offload): those change memory,
speed and float rounding only, so a run may resume with another value of them (a run that ran out of memory resumes
with model.gradient_checkpointing on). The run's length (`CONTINUATION`: train.max_steps, train.epochs) may change
when the run resumes from its own checkpoint: a continuation, whose learning-rate schedule is re-planned from the
resumed step with a warning (`Trainer._continue_schedule`).

Starting a run (`check` on every rank, reading only, before anything is written; then `record` on rank 0, which
writes config.yaml and run.json; `ddpo precompute-ref` writes neither, only its fingerprinted cache):

    no directory, or one without a run's results       the run starts there (other files are left alone)
    a run of the same identity                         it resumes as train.resume says (auto: exactly; none:
                                                       it starts over, its checkpoints replacing the earlier
                                                       attempt's, ddpo/checkpoint.py)
    another identity, the old run saved nothing yet    the run takes the directory over (logged)
    only the length differs, resuming its checkpoint   the continuation above
    anything else                                      `RunDirectoryError`, before anything is written: the
                                                       directory, the fields (old -> new) and the ways on
    train.overwrite_output_dir true                    the old run's directory is moved aside, whole, to
                                                       <output_dir>.replaced-<time>; nothing is deleted

A run's results are its checkpoints (checkpoints/step-* or checkpoints/latest) and final/. A directory with
results but no run.json (written by a ddpo from before run.json) is identified by its config.yaml; with neither,
or with a record that cannot be read, its config is unknown and a start there is refused too. Two runs started
in one directory at the same time are not guarded against (no lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpo import checkpoint
from ddpo.config import Config, ConfigError, save_config

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"

NOT_IDENTITY = frozenset(
    {
        "train.output_dir",
        "train.resume",
        "train.overwrite_output_dir",
        "train.save_steps",
        "train.save_total_limit",
        "train.logging_steps",
        "train.eval_steps",  # the held-out pass reads the policy, never trains it
        "train.num_threads",
        "train.reference",  # cached and live give the same log-probs (tests/test_trainer.py checks it)
        "train.reference_cache",  # the cache's own fingerprint guards what it holds
        "model.gradient_checkpointing",
        "model.logps_chunk_size",
        "model.attn_implementation",
        "model.shared_prompt",
        "model.trust_remote_code",
        "deepspeed.config",
        "deepspeed.zero_stage",
        "deepspeed.offload_optimizer",
    }
)
NOT_IDENTITY_SECTIONS = frozenset({"logging"})
CONTINUATION = frozenset({"train.max_steps", "train.epochs"})
SHOWN_DIFFERENCES = 6  # a changed base config can differ in dozens of fields: the message names the first few


class RunDirectoryError(ConfigError):
    """train.output_dir holds a run of another config (or of an unknown one); the message names the directory,
    the fields that differ and the ways on."""


@dataclass(frozen=True)
class Difference:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {json.dumps(self.old, default=str)} -> {json.dumps(self.new, default=str)}"


@dataclass(frozen=True)
class RunStart:
    """What starting a run in `directory` means: the identity fields that differ from its owner's (empty when it
    has none or the same), and `conflict`, why the start is refused (None when it may go ahead)."""

    directory: Path
    differences: tuple[Difference, ...] = ()
    conflict: str | None = None
    source: str = ""  # the file the owner's config was read from (run.json or config.yaml)
    replace: bool = False  # train.overwrite_output_dir: the conflicting run is moved aside first


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------
def flatten(sections: dict) -> dict[str, Any]:
    """{'loss': {'gamma': 5.0}} -> {'loss.gamma': 5.0}."""
    return {
        f"{name}.{key}": value
        for name, fields in sections.items()
        if isinstance(fields, dict)
        for key, value in fields.items()
    }


def _sections(cfg: Config | dict) -> dict:
    return cfg.to_dict() if isinstance(cfg, Config) else cfg


DEFAULTS = flatten(Config().to_dict())


def is_identity(key: str) -> bool:
    return key in DEFAULTS and key not in NOT_IDENTITY and key.split(".", 1)[0] not in NOT_IDENTITY_SECTIONS


def identity(cfg: Config | dict) -> dict[str, Any]:
    """The identity fields of a config (a `Config` or its sections as saved), missing ones at their default: a
    field added after a run was recorded compares as the default, which reproduces what that run did."""
    values = {**DEFAULTS, **flatten(_sections(cfg))}
    return {key: values[key] for key in DEFAULTS if is_identity(key)}


def config_hash(cfg: Config | dict) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: Config | dict, new: Config | dict) -> tuple[Difference, ...]:
    """The identity fields whose values differ, in the config's order."""
    before, after = identity(old), identity(new)
    return tuple(Difference(key, before[key], after[key]) for key in after if before[key] != after[key])


def describe_differences(found: tuple[Difference, ...]) -> str:
    shown = "; ".join(str(d) for d in found[:SHOWN_DIFFERENCES])
    more = len(found) - SHOWN_DIFFERENCES
    return shown + (f"; and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------------------------
# The run a directory holds
# ----------------------------------------------------------------------------------------------
def results(directory: Path) -> list[str]:
    """What of a run's results `directory` holds: ['checkpoints/', 'final/'], or a part of it, or []."""
    found = []
    if checkpoint.has_checkpoints(directory):
        found.append("checkpoints/")
    if (directory / FINAL_DIR).is_dir():
        found.append(f"{FINAL_DIR}/")
    return found


def owner_config(directory: Path) -> tuple[dict | None, str, str | None]:
    """(the owner's config sections, the file they came from, why that file cannot be read): run.json, else the
    config.yaml of a run from an older ddpo; (None, '', None) when there is neither."""
    for name in (RUN_FILE, CONFIG_FILE):
        file = directory / name
        if not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
            data = json.loads(text).get("config") if name == RUN_FILE else yaml.safe_load(text)
        except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
            return None, name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return (data, name, None) if isinstance(data, dict) else (None, name, "it holds no config")
    return None, "", None


def _overwrite_hint(directory: Path) -> str:
    return (
        f"to replace it, set train.overwrite_output_dir true (the old run moves aside to {directory}.replaced-<time>; "
        "nothing is deleted)"
    )


def _resumes_its_own_checkpoint(directory: Path, resume: str) -> bool:
    """Whether train.resume picks a checkpoint of this directory (so the run continues the one it holds)."""
    if resume == "none":
        return False
    try:
        found = checkpoint.find(directory, resume)
    except checkpoint.CheckpointError:  # a damaged checkpoints folder: the resume itself stops and names it
        return True
    return found is not None and checkpoint.checkpoint_root(directory).resolve() in found.resolve().parents


def assess(directory: str | os.PathLike, cfg: Config | dict) -> RunStart:
    """Whether a run of `cfg` may start in `directory` (module docstring); reads only. A conflict is returned in
    `RunStart.conflict`, the first line of the refusal (`check` raises it)."""
    directory = Path(directory)
    found = results(directory)
    old, source, unreadable = owner_config(directory) if directory.is_dir() else (None, "", None)
    if not found:  # nothing to lose: a record left by a run that saved nothing is only compared for the log
        return RunStart(directory, differences(old, cfg) if old is not None else (), source=source)
    if unreadable:
        conflict = f"{directory / source} cannot be read ({unreadable}), so it is unknown which run {directory} holds"
        return RunStart(directory, conflict=conflict, source=source)
    if old is None:
        conflict = (
            f"{directory} holds a run ({', '.join(found)}) with no record of its config ({RUN_FILE}, or "
            f"{CONFIG_FILE} from an older ddpo), so it is unknown whether this is the same run"
        )
        return RunStart(directory, conflict=conflict)
    diff = differences(old, cfg)
    resume = {**DEFAULTS, **flatten(_sections(cfg))}["train.resume"]
    if not diff or (all(d.key in CONTINUATION for d in diff) and _resumes_its_own_checkpoint(directory, resume)):
        return RunStart(directory, diff, source=source)
    conflict = f"{directory} holds a run of another config (its {source}): {describe_differences(diff)}"
    return RunStart(directory, diff, conflict=conflict, source=source)


def refusal(start: RunStart) -> str:
    """The whole message of a refused start: what the directory holds (one line), then the ways on."""
    if not start.differences and start.source:  # its record cannot be read
        resume = f"to resume that run, restore {start.directory / start.source}"
    elif not start.differences:
        resume = f"if it is this very run, restore its config as {start.directory / CONFIG_FILE} to resume it"
    elif all(d.key in CONTINUATION for d in start.differences):
        resume = "to continue that run to the new length, set train.resume auto"
    else:
        resume = "to resume that run, start it with its own config (train.resume auto)"
    return (
        f"{start.conflict}.\nNothing in it was changed. Ways on: {resume}; to keep it, set another "
        f"train.output_dir; {_overwrite_hint(start.directory)}."
    )


def check(directory: str | os.PathLike, cfg: Config) -> RunStart:
    """`assess`, raising `RunDirectoryError` on a conflict unless train.overwrite_output_dir is set."""
    start = assess(directory, cfg)
    if start.conflict is None:
        return start
    if not cfg.train.overwrite_output_dir:
        raise RunDirectoryError(refusal(start))
    _check_movable(Path(directory))  # here, on every rank: rank 0 failing alone would leave the others waiting
    return dataclasses.replace(start, replace=True)


def _check_movable(directory: Path) -> None:
    cwd = Path.cwd().resolve()
    if cwd == directory.resolve() or directory.resolve() in cwd.parents:
        raise RunDirectoryError(
            f"train.overwrite_output_dir: {directory} is the working directory (or holds it) and cannot be moved "
            "aside; move it yourself, or set another train.output_dir"
        )


# ----------------------------------------------------------------------------------------------
# Writing (rank 0)
# ----------------------------------------------------------------------------------------------
def move_aside(directory: str | os.PathLike) -> Path:
    """Rename `directory`, whole, to a sibling `<name>.replaced-<time>` (on the same file system: instant, and
    nothing is copied or deleted); returns the new path."""
    directory = Path(directory).resolve()
    _check_movable(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory.with_name(f"{directory.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.replaced-{stamp}-{n}")
    try:
        os.rename(directory, target)
    except OSError as e:
        raise RunDirectoryError(
            f"train.overwrite_output_dir: cannot move {directory} aside to {target} ({e.strerror}); move or delete "
            "it yourself, or set another train.output_dir"
        ) from None
    return target


def record(cfg: Config, start: RunStart) -> None:
    """Take the directory: move a conflicting run aside (train.overwrite_output_dir), then write config.yaml and
    run.json. Rank 0 only, after `check` passed on every rank."""
    directory = start.directory
    if start.replace:
        moved = move_aside(directory)
        logger.warning("%s; moved it aside to %s (train.overwrite_output_dir)", start.conflict, moved)
    elif start.differences and not results(directory):
        logger.info(
            "%s held a run of another config that saved nothing (%s): this run takes the directory over",
            directory,
            describe_differences(start.differences),
        )
    directory.mkdir(parents=True, exist_ok=True)
    save_config(cfg, directory / CONFIG_FILE)
    run = {
        "config_hash": config_hash(cfg),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
    }
    checkpoint.write_text_atomic(directory / RUN_FILE, json.dumps(run, indent=2) + "\n")
