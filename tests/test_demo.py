"""`ddpo demo --quick`: the whole synthetic pipeline runs and writes well-formed results (numbers at this
size are meaningless; the full demo's are in docs/LAB.md and experiments/results)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpo.lab import demo, stages
from ddpo.lab.gate import GateError
from ddpo.lab.settings import DemoSettings
from ddpo.models.build import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_writes_results(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpo", "demo", "--quick", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(results["sampled"]) == set(results["drift"]) == {"sft", "dpo", "ddpo"}
    for metrics in [*results["methods"].values(), *results["sampled"].values()]:
        for key in (
            "response_hallucination_rate",
            "mention_hallucination_rate",
            "object_recall",
            "companion_rate",
            "nontarget_mention_rate",
        ):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["mean_response_words"] > 0
    assert results["drift"]["sft"] == 0.0  # the SFT model against itself
    # the gate is computed and stored (the quick run reports it without enforcing it)
    gate = results["gate"]
    assert {"single_object_accuracy", "recall_without_anchor", "companion_rate", "passed"} <= set(gate)
    assert gate["single_object_images"] == 48 and "Perception gate" in proc.stdout
    # drift probed during training, first and last step included
    steps = [r["step"] for r in results["drift_during_training"]["ddpo"]]
    assert steps[0] == 1 and steps[-1] == results["train_steps"]["ddpo"] and len(steps) >= 8
    assert results["pairs"]["pairs_used"] > 0 and results["pairs"]["segments_per_pair"] > 0
    assert (out / "results.md").read_text().startswith("Synthetic hallucination benchmark")
    assert "| ddpo |" in proc.stdout
    # Both runs trained from the same SFT model on the same pairs, with one reference cache.
    assert (out / "runs" / "dpo" / "final").is_dir() and (out / "runs" / "ddpo" / "final").is_dir()
    assert [p.name for p in (out / "reference_cache").iterdir()] == ["pairs-all"]
    check_eval_is_cached_and_sft_continues(out)


def check_eval_is_cached_and_sft_continues(out):
    """A second eval reuses each model's eval.json (no answer is generated again) and gives the same
    tables; an SFT stage with `sft_init` continues that model with its tower frozen."""
    before = json.loads((out / "results.json").read_text())
    settings = DemoSettings.quick(output_dir=str(out))
    original = stages.evaluate_model
    stages.evaluate_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated again"))
    try:
        again = stages.run(settings, ["eval"])
    finally:
        stages.evaluate_model = original
    for table in ("methods", "validation", "sampled", "drift"):
        assert again[table] == before[table]

    longer = DemoSettings.quick(
        output_dir=str(out / "longer"),
        answer_words=45,
        sft_init=str(out / "sft"),
        sft_steps=3,
        sft_examples=24,
        sft_batch_size=8,
    )
    stages.run(longer, ["sft"])
    start, after = load_model(out / "sft"), load_model(out / "longer" / "sft")
    tower = [k for k in start.state_dict() if "vision_tower" in k]
    assert tower and all(torch.equal(start.state_dict()[k], after.state_dict()[k]) for k in tower)
    assert any(not torch.equal(v, after.state_dict()[k]) for k, v in start.state_dict().items() if k not in tower)


def test_demo_fails_loudly_when_the_sft_model_misses_the_gate(tmp_path, monkeypatch):
    """A gate miss names the figure and stops the demo before any preference pair is made."""
    out = tmp_path / "demo"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "sft_losses.json").write_text("[1.0, 0.5]")
    figures = {
        "single_object_accuracy": 0.79,
        "recall_without_anchor": 0.99,
        "companion_rate": 0.6,
        "passed": False,
        "failed": ["single_object_accuracy 0.790 < 0.98"],
    }
    monkeypatch.setattr(stages, "load_model", lambda path: None)
    monkeypatch.setattr(stages, "perception_gate", lambda model, settings, template: dict(figures))
    settings = DemoSettings(output_dir=str(out))
    with pytest.raises(GateError, match="single_object_accuracy 0.790 < 0.98"):
        stages.stage_gate(settings, out)
    assert json.loads((out / "gate.json").read_text())["passed"] is False
    # a model that sees but names too few absent companions is told apart from one that cannot see
    figures.update(single_object_accuracy=0.99, companion_rate=0.2, failed=["companion_rate 0.200 < 0.3"])
    with pytest.raises(GateError, match="It sees, but names too few absent companions"):
        stages.stage_gate(settings, out)
    assert demo.main(["--output-dir", str(out), "--stages", "gate"]) == 2  # the CLI: one clear message, exit 2
