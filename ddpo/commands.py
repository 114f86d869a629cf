"""The `ddpo` command: the core's subcommands (ddpo/cli.py) and the wings'.

    ddpo train | precompute-ref | convert ...         the core (ddpo/cli.py)
    ddpo eval --benchmark ...                         hallucination benchmarks (ddpo/eval)
    ddpo demo [--output-dir DIR]                      the synthetic reproduction of RLHF-V's claims (ddpo/lab)
    ddpo score ...                                    implicit-reward scoring of answers (ddpo/online)
    ddpo sweep SPEC ...                               a grid of training runs (ddpo/sweep.py)
    ddpo estimate CONFIG [--gpus N --gpu-memory GiB]  memory per GPU and time per epoch, no GPU (ddpo/estimate.py)
    ddpo export RUN_DIR --merge [--output DIR]        a LoRA run's adapters merged into its base (ddpo/export.py)
    ddpo push RUN_DIR REPO_ID [--dry-run]             a run's final model + model card to the Hub (ddpo/hub.py)

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


def _estimate(argv: list[str]) -> int:
    from ddpo import estimate

    return estimate.main(argv)


def _export(argv: list[str]) -> int:
    from ddpo import export

    return export.main(argv)


def _push(argv: list[str]) -> int:
    from ddpo import hub

    return hub.main(argv)


COMMANDS: dict[str, tuple[str, cli.Command]] = {
    **cli.COMMANDS,
    "eval": ("hallucination benchmarks", _eval),
    "demo": ("synthetic reproduction of RLHF-V's claims on a CPU", _demo),
    "score": ("implicit-reward scores of answers", _score),
    "sweep": ("a grid of training runs: run directories, one table and plot", _sweep),
    "estimate": ("memory per GPU of every ZeRO setting and time per epoch of a config", _estimate),
    "export": ("a LoRA run's adapters merged into its base: a plain checkpoint", _export),
    "push": ("upload a run's final model with a model card to the Hugging Face Hub", _push),
}


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
