"""`ddpo` command line: thin subcommands over the library.

    ddpo train CONFIG [--section.field VALUE ...]      train (DeepSpeed, or one plain process)
    ddpo precompute-ref CONFIG [--section.field ...]    cache the reference model's per-token log-probs
    ddpo convert --format {rlaif-v,rlhf-v} ...          convert a dataset to TRL's preference format
    ddpo eval --benchmark ...                           hallucination benchmarks
    ddpo demo [--output-dir DIR]                        the synthetic reproduction of RLHF-V's claims
    ddpo score ...                                      implicit-reward scoring of answers

`python -m ddpo ...` is the same command.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from ddpo.config import ConfigError, fields_help, load_config


def _config_command(name: str, summary: str, run: Callable) -> Callable[[list[str]], int]:
    """A subcommand of the form `ddpo NAME CONFIG [--section.field VALUE ...]`."""

    def main(argv: list[str]) -> int:
        if not argv or argv[0] in ("-h", "--help"):
            print(f"usage: ddpo {name} CONFIG.yaml [--<section>.<field> VALUE ...]\n\n{summary}\n\nFields (any can be set in the YAML or overridden on the command line):{fields_help()}")
            return 0
        try:
            cfg = load_config(argv[0], argv[1:])
        except ConfigError as e:
            print(f"ddpo {name}: config error: {e}", file=sys.stderr)
            return 2
        return run(cfg) or 0

    return main


def _train(cfg) -> int:
    from ddpo.trainer import Trainer

    Trainer(cfg).train()
    return 0


def _precompute_ref(cfg) -> int:
    from ddpo.reference import precompute_reference

    precompute_reference(cfg)
    return 0


def _lazy(module: str, attr: str = "main") -> Callable[[list[str]], int]:
    def main(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).__dict__[attr](argv) or 0

    return main


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train a policy with (dense) DPO", _config_command("train", "Train a policy with dense DPO.", _train)),
    "precompute-ref": ("cache reference per-token log-probs", _config_command("precompute-ref", "Run the reference model once over the data and cache per-token log-probs.", _precompute_ref)),
    "convert": ("convert RLHF-V / RLAIF-V data to TRL's preference format", _lazy("data.convert")),
    "eval": ("hallucination benchmarks", _lazy("ddpo.eval.cli")),
    "demo": ("synthetic reproduction of RLHF-V's claims on a CPU", _lazy("ddpo.lab.demo")),
    "score": ("implicit-reward scores of answers", _lazy("ddpo.online.scoring")),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="ddpo", description="Dense Direct Preference Optimization for multimodal LLMs.")
        print(parser.format_usage() + "\ncommands:\n" + "\n".join(f"  {k:<16}{v[0]}" for k, v in COMMANDS.items()))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ddpo: unknown command '{command}'; commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command][1](rest)


if __name__ == "__main__":
    sys.exit(main())
