"""The core's subcommands: thin wrappers over the library.

    ddpo train CONFIG [--section.field VALUE ...]      train (DeepSpeed, or one plain process)
    ddpo precompute-ref CONFIG [--section.field ...]    cache the reference model's per-token log-probs
    ddpo convert --format {rlaif-v,rlhf-v} ...          convert a dataset to TRL's preference format

The `ddpo` command (ddpo/commands.py) adds the wings' subcommands (eval, demo, score, sweep); this
module imports no wing, so the core stands alone (`deepspeed -m ddpo.train` enters here).

A command line that cannot be used (no command, no CONFIG) prints the usage on stderr and exits 2;
`--help` prints it on stdout and exits 0 (`ddpo train CONFIG --help`: every field with CONFIG's value).
A config error exits 2. A data, checkpoint, reference-cache or model-load error, an out-of-memory (and
a non-finite loss) ends `train` and `precompute-ref` with one message on stderr and exit code 1, on
each rank that hit it, and every other command the same way (`dispatch`: `ddpo eval --model` naming no
checkpoint, say); `--debug` anywhere on the command line, or DDPO_DEBUG=1, shows the traceback
instead.

Heavy libraries (torch, transformers, datasets, deepspeed) are imported when a command runs, never when
this module is imported: `ddpo --help` and a usage error answer at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

Command = Callable[[list[str]], int]
USAGE_ERROR = 2  # the exit code of a command line that cannot be used (argparse's)
HELP = ("-h", "--help")

OUT_OF_MEMORY_IN_TRAINING = (
    "lower train.micro_batch_size (raise train.gradient_accumulation_steps to keep the batch) or data.max_length, "
    "set model.gradient_checkpointing true or model.dtype bfloat16, train fewer weights (model.lora_r > 0), or "
    "shard with deepspeed.zero_stage 2 or 3 (and deepspeed.offload_optimizer true)"
)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix from the message alone: no traceback unless asked for. A function, not a
    constant, because these classes live in modules that import torch."""
    from ddpo.checkpoint import CheckpointError
    from ddpo.config import ConfigError
    from ddpo.data.images import DataError
    from ddpo.models.build import ModelLoadError
    from ddpo.reference import ReferenceCacheError

    return (DataError, ConfigError, CheckpointError, ReferenceCacheError, ModelLoadError, FloatingPointError)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DDPO_DEBUG", "0").lower() not in ("", "0", "false", "no")


def config_command(name: str, summary: str, run: Callable) -> Command:
    """A subcommand of the form `ddpo NAME CONFIG [--section.field VALUE ...]`; `run` takes the Config."""
    usage = f"usage: ddpo {name} CONFIG.yaml [--<section>.<field> VALUE ...] [--debug] [--help]"

    def main(argv: list[str]) -> int:
        from ddpo.config import ConfigError, fields_help, load_config

        debug, wants_help = debug_requested(argv), any(a in HELP for a in argv)
        argv = [a for a in argv if a != "--debug" and a not in HELP]
        if not argv or argv[0].startswith("-"):
            if wants_help and not argv:
                print(f"{usage}\n\n{summary}\n\nFields (set in the YAML, or on the command line):{fields_help()}")
                return 0
            got = f"; got '{argv[0]}' first" if argv else ""
            print(f"{usage}\nddpo {name}: the first argument is the config YAML{got}", file=sys.stderr)
            return USAGE_ERROR
        try:  # --help shows a config whose inputs do not exist yet; a run needs them
            cfg = load_config(argv[0], argv[1:], check_paths=not wants_help)
        except ConfigError as e:
            print(f"ddpo {name}: config error: {e}", file=sys.stderr)
            return USAGE_ERROR
        if wants_help:
            print(f"{usage}\n\n{summary}\n\nFields, with their values in {' '.join(argv)}:{fields_help(cfg)}")
            return 0
        return run_reporting_errors(name, run, cfg, debug)

    return main


def run_reporting_errors(name: str, run: Callable, cfg, debug: bool) -> int:
    """`run(cfg)`; a user error or an out-of-memory becomes one message on stderr and exit code 1."""
    try:
        run(cfg)
    except Exception as e:
        message = _user_message(e)
        if message is None or debug:
            raise
        from ddpo import distributed as dist

        where = f" (rank {dist.rank()} of {dist.world_size()})" if dist.world_size() > 1 else ""
        print(f"ddpo {name}: error{where}: {message}\n(--debug or DDPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _user_message(e: Exception) -> str | None:
    """The one-message form of `e`, or None for what deserves a traceback (a bug)."""
    if isinstance(e, user_errors()):
        return str(e)
    import torch  # imported already: the command ran

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return f"out of memory ({reason}): {OUT_OF_MEMORY_IN_TRAINING}"
    return None


def _train(cfg) -> None:
    from ddpo.trainer import Trainer

    Trainer(cfg).train()


def _precompute_ref(cfg) -> None:
    from ddpo.trainer import precompute_reference

    precompute_reference(cfg)


def _convert(argv: list[str]) -> int:
    from ddpo.data import convert

    return convert.main(argv)


COMMANDS: dict[str, tuple[str, Command]] = {
    "train": ("train a policy with (dense) DPO", config_command("train", "Train a policy with dense DPO.", _train)),
    "precompute-ref": (
        "cache reference per-token log-probs",
        config_command(
            "precompute-ref",
            "Run the reference model once over the data and cache per-token log-probs.",
            _precompute_ref,
        ),
    ),
    "convert": ("convert RLHF-V / RLAIF-V data to TRL's preference format", _convert),
}


def dispatch(commands: dict[str, tuple[str, Command]], argv: list[str]) -> int:
    """Run `argv[0]` of `commands` on the rest of argv; the usage on --help (stdout, 0) or no command
    (stderr, 2)."""
    usage = (
        "usage: ddpo COMMAND [ARGS ...]\n\nDense Direct Preference Optimization for multimodal LLMs.\n\ncommands:\n"
        + "\n".join(f"  {k:<16}{v[0]}" for k, v in commands.items())
        + "\n\n`ddpo COMMAND --help` describes one."
    )
    if argv and argv[0] in HELP:
        print(usage)
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"ddpo: unknown command '{command}'; commands are {', '.join(commands)}", file=sys.stderr)
        return USAGE_ERROR
    if "--debug" in rest:  # every command accepts it; the environment carries it to the command and its ranks
        os.environ["DDPO_DEBUG"] = "1"
        rest = [a for a in rest if a != "--debug"]
    try:
        return commands[command][1](rest) or 0
    except Exception as e:  # what a command let through: a user error is one message here too
        message = _user_message(e)
        if message is None or debug_requested(rest):
            raise
        print(f"ddpo {command}: error: {message}\n(--debug or DDPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """The core's commands only (the `ddpo` command is ddpo/commands.py)."""
    return dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
