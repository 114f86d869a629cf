"""ddpo/run_summary.py (summary.json, summary.md, summary.png) and where the trainer sends each metrics row
(metrics.jsonl, wandb, TensorBoard), on hand-written rows: no training here (tests/test_eval_split.py runs one)."""

import json

import pytest
from PIL import Image

from ddpo.config import load_config
from ddpo.run_summary import (
    RunFacts,
    is_eval_row,
    plot_run,
    read_metrics_rows,
    run_config_hash,
    summary_markdown,
    summary_record,
    write_run_summary,
)
from tests.test_trainer import TINY

ROWS = [
    {"step": 1, "epoch": 0.5, "loss": 0.69, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "grad_norm": None},
    {"step": 2, "epoch": 1.0, "loss": 0.61, "rewards/accuracies": 0.75, "rewards/margins": 0.2, "grad_norm": 1.5},
    {"step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.1},
    {"step": 3, "epoch": 1.5, "loss": 0.55, "rewards/accuracies": 1.0, "rewards/margins": 0.4, "grad_norm": 1.2},
    {"step": 3, "eval/loss": 0.6, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": 0.25},
]
FACTS = RunFacts(
    steps=3,
    epochs=1.5,
    wall_time_s=12.5,
    pairs_trained=24,
    train_pairs=16,
    eval_pairs=4,
    tokens_per_s=1234.5,
    model_dir="/runs/x/final",
)


def test_rows_are_told_apart_by_their_eval_keys():
    assert [is_eval_row(r) for r in ROWS] == [False, False, True, False, True]


def test_read_metrics_rows_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"step": 4, "lo')
    assert read_metrics_rows(path) == ROWS
    assert read_metrics_rows(tmp_path / "absent.jsonl") == []


def test_summary_record_takes_the_last_train_and_eval_rows():
    summary = summary_record(ROWS, FACTS, "abc123")
    assert summary["final_train"] == ROWS[3] and summary["final_eval"] == ROWS[4]
    assert summary["steps"] == 3 and summary["tokens_per_s"] == 1234.5 and summary["config_hash"] == "abc123"
    assert summary["model_dir"] == "/runs/x/final" and summary["plot"] == "summary.png"
    without_eval = summary_record(ROWS[:2], FACTS)
    assert without_eval["final_train"] == ROWS[1] and without_eval["final_eval"] is None


def test_summary_markdown_says_what_the_run_did():
    text = summary_markdown(summary_record(ROWS, FACTS, "abc123"))
    assert "- steps: 3 (1.5 epochs, 24 pairs trained)" in text
    assert "- pairs: 16 train, 4 held out for evaluation" in text
    assert "- wall time: 12.5 s, 1234.5 tokens/s" in text
    assert "- model: /runs/x/final" in text and "- config hash: abc123" in text
    assert "| metric | train (step 3) | eval (step 3) |" in text
    assert "| loss | 0.55 | 0.6 |" in text and "| rewards/margins | 0.4 | 0.25 |" in text
    # a metric the rows do not hold gets no line; one only train rows hold shows a dash for eval
    assert "logps/chosen" not in text
    only_train = summary_markdown(summary_record(ROWS[:2], FACTS))
    assert "| rewards/accuracies | 0.75 | — |" in only_train and "- config hash: —" in only_train


def test_plot_run_writes_a_png_with_three_panels(tmp_path):
    path = plot_run(ROWS, tmp_path / "summary.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 3 * height > 0


def test_write_run_summary_writes_the_three_files_and_reads_the_config_hash(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config_hash": "feedbeef", "config": {}}))
    summary = write_run_summary(ROWS, FACTS, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["config_hash"] == "feedbeef" == run_config_hash(tmp_path)
    assert (tmp_path / "summary.md").read_text() == summary_markdown(summary)
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "run.json").write_text("{not json")
    assert run_config_hash(tmp_path) is None


def test_a_run_without_matplotlib_still_gets_its_summary(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    summary = write_run_summary(ROWS, FACTS, tmp_path)
    assert summary["plot"] is None and not (tmp_path / "summary.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["final_eval"] == ROWS[4]
    assert "- plot: — (matplotlib is not installed: pip install matplotlib)" in (tmp_path / "summary.md").read_text()


class FakeWandb:
    def __init__(self):
        self.calls = []

    def log(self, data, step):
        self.calls.append((dict(data), step))


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1


@pytest.mark.parametrize("main", [True, False])
def test_each_row_goes_to_metrics_jsonl_wandb_and_tensorboard_on_rank_0(tmp_path, main):
    from ddpo.trainer import Trainer

    trainer = Trainer(load_config(TINY, ["--train.output_dir", str(tmp_path)]))
    trainer.is_main = main
    sinks = {"wandb": FakeWandb(), "tensorboard": FakeWriter()}
    metrics_file = tmp_path / "metrics.jsonl"
    for row in ROWS[1:3]:
        trainer._write_row(row, metrics_file, sinks)
    if not main:  # every other rank writes nothing
        assert not metrics_file.exists() and not sinks["wandb"].calls and not sinks["tensorboard"].scalars
        return
    assert read_metrics_rows(metrics_file) == ROWS[1:3]
    # the train row as it always was; the eval row without its step key, at its step
    assert sinks["wandb"].calls == [(ROWS[1], 2), ({k: v for k, v in ROWS[2].items() if k != "step"}, 2)]
    assert sinks["tensorboard"].scalars == [
        ("train/epoch", 1.0, 2),
        ("train/loss", 0.61, 2),
        ("train/rewards/accuracies", 0.75, 2),
        ("train/rewards/margins", 0.2, 2),
        ("train/grad_norm", 1.5, 2),
        ("eval/loss", 0.65, 2),
        ("eval/rewards/accuracies", 0.5, 2),
        ("eval/rewards/margins", 0.1, 2),
    ]
    assert sinks["tensorboard"].flushes == 2
