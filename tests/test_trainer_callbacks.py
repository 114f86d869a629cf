"""TrainerCallback: on_log sees exactly the records written to metrics.jsonl, on_checkpoint every
checkpoint as it lands (a complete directory). Run in a fresh subprocess, like every trainer test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import TINY, _env

SCRIPT = """
import json, sys
from pathlib import Path
from ddpo.config import load_config
from ddpo.trainer import Trainer, TrainerCallback

out = Path(sys.argv[1])

class Recorder(TrainerCallback):
    def __init__(self):
        self.logged, self.checkpoints = [], []
    def on_log(self, trainer, record):
        self.logged.append(dict(record, trainer_step=trainer.step))
    def on_checkpoint(self, trainer, path):
        files = sorted(p.name for p in path.iterdir())
        self.checkpoints.append({"path": str(path), "step": trainer.step, "files": files})

overrides = ["--train.output_dir", str(out), "--train.max_steps", "5", "--train.save_steps", "2",
             "--train.logging_steps", "2", "--train.num_threads", "1", "--logging.progress_bar", "false"]
cfg = load_config(sys.argv[2], overrides)
recorder = Recorder()
trainer = Trainer(cfg, callbacks=[recorder]).setup()
trainer.train()
(out / "callbacks.json").write_text(json.dumps({"logged": recorder.logged, "checkpoints": recorder.checkpoints}))
"""


@pytest.mark.slow
def test_callbacks_see_every_logged_record_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), TINY], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads((out / "callbacks.json").read_text())
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # logging every 2 steps of 5: steps 2, 4 and the last one
    assert [r["step"] for r in written] == [2, 4, 5]
    assert [{k: v for k, v in r.items() if k != "trainer_step"} for r in seen["logged"]] == written
    assert [r["trainer_step"] for r in seen["logged"]] == [2, 4, 5]
    # checkpoints every 2 steps before the end, then the final one; each complete when the hook runs
    # (older ones may be pruned later by train.save_total_limit; the last one stays)
    assert [c["step"] for c in seen["checkpoints"]] == [2, 4, 5]
    for c in seen["checkpoints"]:
        assert {"trainer_state.json", "mp_rank_00_model_states.pt"} <= set(c["files"]), c
    assert Path(seen["checkpoints"][-1]["path"]).is_dir()
