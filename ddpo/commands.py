"""The `ddpo` command: the core's subcommands (ddpo/cli.py) and the wings'.

    ddpo train | precompute-ref | convert ...         the core (ddpo/cli.py)
    ddpo eval --benchmark ...                         hallucination benchmarks (ddpo/eval)
    ddpo demo [--output-dir DIR]                      the synthetic reproduction of RLHF-V's claims (ddpo/lab)
    ddpo score ...                                    implicit-reward scoring of answers (ddpo/online)
    ddpo sweep SPEC ...                               a grid of training runs (ddpo/sweep.py)

`python -m ddpo ...` is the same command. This is the top of the package: it imports the wings, and
nothing in the package imports it. Each wing is imported when its command runs, not before: the wings
import torch and transformers (seconds), which `ddpo --help` or a usage error must not wait for.
"""

from __future__ import annotations

import sys

from ddpo import cli


def _eval(argv: list[str]) -> int:
    from ddpo.eval import cli as eval_cli

    return eval_cli.main(argv)


def _demo(argv: list[str]) -> int:
    from ddpo.lab import demo

    return demo.main(argv)


def _score(argv: list[str]) -> int:
    from ddpo.online import scoring

    return scoring.main(argv)


def _sweep(argv: list[str]) -> int:
    from ddpo import sweep

    return sweep.main(argv)


COMMANDS: dict[str, tuple[str, cli.Command]] = {
    **cli.COMMANDS,
    "eval": ("hallucination benchmarks", _eval),
    "demo": ("synthetic reproduction of RLHF-V's claims on a CPU", _demo),
    "score": ("implicit-reward scores of answers", _score),
    "sweep": ("a grid of training runs: run directories, one table and plot", _sweep),
}


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
