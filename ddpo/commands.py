"""The `ddpo` command: the core's subcommands (ddpo/cli.py) and the wings'.

    ddpo train | precompute-ref | convert ...         the core (ddpo/cli.py)
    ddpo eval --benchmark ...                         hallucination benchmarks (ddpo/eval)
    ddpo demo [--output-dir DIR]                      the synthetic reproduction of RLHF-V's claims (ddpo/lab)
    ddpo score ...                                    implicit-reward scoring of answers (ddpo/online)
    ddpo sweep SPEC ...                               a grid of training runs (ddpo/sweep.py)

`python -m ddpo ...` is the same command. This is the top of the package: it imports the wings, and
nothing in the package imports it.
"""

from __future__ import annotations

import sys

from ddpo import cli, sweep
from ddpo.eval import cli as eval_cli
from ddpo.lab import demo
from ddpo.online import scoring

COMMANDS: dict[str, tuple[str, cli.Command]] = {
    **cli.COMMANDS,
    "eval": ("hallucination benchmarks", eval_cli.main),
    "demo": ("synthetic reproduction of RLHF-V's claims on a CPU", demo.main),
    "score": ("implicit-reward scores of answers", scoring.main),
    "sweep": ("a grid of training runs: run directories, one table and plot", sweep.main),
}


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
