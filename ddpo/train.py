"""`deepspeed -m ddpo.train CONFIG [--section.field VALUE ...]` (the launcher adds --local_rank)."""
import sys

from ddpo.trainer import main

if __name__ == "__main__":
    sys.exit(main())
