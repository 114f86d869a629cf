"""`deepspeed -m ddpo.train CONFIG [--section.field VALUE ...]`: the entry point of each launched
process (the launcher adds --local_rank, which the environment already carries)."""

from __future__ import annotations

import sys

from ddpo import distributed as dist
from ddpo.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    try:
        return cli_main(["train", *argv])
    finally:
        dist.shutdown()  # a launched process ends here: its process group goes first


if __name__ == "__main__":
    sys.exit(main())
