"""`ddpo demo --quick`: the whole synthetic pipeline runs and writes well-formed results (numbers at this
size are meaningless; the full demo's are in README/experiments)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ddpo", "demo", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"sft", "dpo", "ddpo"}
    for metrics in results["methods"].values():
        for key in ("response_hallucination_rate", "mention_hallucination_rate", "object_recall"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["mean_response_words"] > 0
    assert results["pairs"]["pairs_used"] > 0
    assert (out / "results.md").read_text().startswith("Synthetic hallucination benchmark")
    assert "| ddpo |" in proc.stdout
    # Both runs trained from the same SFT model on the same pairs, with one reference cache.
    assert (out / "runs" / "dpo" / "final").is_dir() and (out / "runs" / "ddpo" / "final").is_dir()
    assert [p.name for p in (out / "reference_cache").iterdir()] == ["pairs-all"]
