import io
import time

from ddpo.progress import progress_bar


def test_a_log_file_gets_the_first_and_last_redraw_not_one_per_step(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)  # StringIO.isatty() is False, like a SLURM log
    bar = progress_bar(total=500, desc="train", file=log)
    for step in range(500):
        bar.set_postfix(loss=f"{step:.1f}", refresh=False)
        bar.update(1)
        time.sleep(0.001)  # 0.5 s in all: tqdm's default (every 0.1 s) would redraw ~5 times
    bar.close()
    redraws = [line for line in log.getvalue().split("\r") if line.strip()]
    assert len(redraws) == 2, redraws  # the opening 0/500 and the closing 500/500
    assert "500/500" in redraws[-1] and "loss=499.0" in redraws[-1]


def test_a_terminal_keeps_tqdm_defaults(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress_bar(total=1, file=terminal)
    assert bar.mininterval == 0.1
    bar.close()
