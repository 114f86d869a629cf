"""The core's subcommands: thin wrappers over the library.

    ddpo train CONFIG [--section.field VALUE ...]      train (DeepSpeed, or one plain process)
    ddpo precompute-ref CONFIG [--section.field ...]    cache the reference model's per-token log-probs
    ddpo convert --format {rlaif-v,rlhf-v} ...          convert a dataset to TRL's preference format

The `ddpo` command (ddpo/commands.py) adds the wings' subcommands (eval, demo, score, sweep); this
module imports no wing, so the core stands alone (`deepspeed -m ddpo.train` enters here).

A data, config, checkpoint or reference-cache error (and a non-finite loss) ends `train` and
`precompute-ref` with one message on stderr and exit code 1, on each rank that hit it; `--debug`
anywhere on the command line, or DDPO_DEBUG=1, shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ddpo import distributed as dist
from ddpo.checkpoint import CheckpointError
from ddpo.config import Config, ConfigError, fields_help, load_config
from ddpo.data import convert
from ddpo.data.images import DataError
from ddpo.reference import ReferenceCacheError
from ddpo.trainer import Trainer, precompute_reference

Command = Callable[[list[str]], int]

# What a user can fix from the message alone: no traceback unless asked for.
USER_ERRORS = (DataError, ConfigError, CheckpointError, ReferenceCacheError, FloatingPointError)


def config_command(name: str, summary: str, run: Callable[[Config], None]) -> Command:
    """A subcommand of the form `ddpo NAME CONFIG [--section.field VALUE ...]`."""

    def main(argv: list[str]) -> int:
        debug = "--debug" in argv or os.environ.get("DDPO_DEBUG", "0").lower() not in ("", "0", "false", "no")
        argv = [a for a in argv if a != "--debug"]
        if not argv or argv[0] in ("-h", "--help"):
            print(
                f"usage: ddpo {name} CONFIG.yaml [--<section>.<field> VALUE ...] [--debug]\n\n{summary}\n\n"
                f"Fields (any can be set in the YAML or overridden on the command line):{fields_help()}"
            )
            return 0
        try:
            cfg = load_config(argv[0], argv[1:])
        except ConfigError as e:
            print(f"ddpo {name}: config error: {e}", file=sys.stderr)
            return 2
        try:
            run(cfg)
        except USER_ERRORS as e:
            if debug:
                raise
            where = f" (rank {dist.rank()} of {dist.world_size()})" if dist.world_size() > 1 else ""
            print(f"ddpo {name}: error{where}: {e}\n(--debug or DDPO_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
        return 0

    return main


def train(cfg: Config) -> None:
    Trainer(cfg).train()


COMMANDS: dict[str, tuple[str, Command]] = {
    "train": ("train a policy with (dense) DPO", config_command("train", "Train a policy with dense DPO.", train)),
    "precompute-ref": (
        "cache reference per-token log-probs",
        config_command(
            "precompute-ref",
            "Run the reference model once over the data and cache per-token log-probs.",
            precompute_reference,
        ),
    ),
    "convert": ("convert RLHF-V / RLAIF-V data to TRL's preference format", convert.main),
}


def dispatch(commands: dict[str, tuple[str, Command]], argv: list[str]) -> int:
    """Run `argv[0]` of `commands` on the rest of argv; usage on no command or --help."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: ddpo COMMAND [ARGS ...]\n\nDense Direct Preference Optimization for multimodal LLMs.\n\ncommands:\n"
            + "\n".join(f"  {k:<16}{v[0]}" for k, v in commands.items())
        )
        return 0
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"ddpo: unknown command '{command}'; commands are {', '.join(commands)}", file=sys.stderr)
        return 2
    return commands[command][1](rest) or 0


def main(argv: list[str] | None = None) -> int:
    """The core's commands only (the `ddpo` command is ddpo/commands.py)."""
    return dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
