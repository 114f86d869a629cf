"""Progress bars that read well both in a terminal and in a log file."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_FILE_INTERVAL_S = 30.0


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar; when stderr is not a terminal (a SLURM, CI or `> log` file) every redraw becomes
    text in the file, so it redraws at most every 30 s there instead of ten times a second.
    Update postfixes with `set_postfix(..., refresh=False)` so they wait for the next redraw."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_FILE_INTERVAL_S)
    return tqdm(**kwargs)
