"""experiments/gpu_check.py end to end at the tiny preset on CPU: every case runs or says why not, and the
JSON and the Markdown table are written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_writes_json_and_table(tmp_path):
    command = [
        sys.executable,
        str(REPO / "experiments" / "gpu_check.py"),
        "--preset",
        "tiny",
        "--pairs",
        "2",
        "--prompt-len",
        "8",
        "--answer-len",
        "12",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
        "--head-bench",
        "--head-bench-args=--device cpu --threads 1 --batch 1 --length 64 --vocab 500 --hidden 32 --reps 1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "CPU" and report["preset"] == "tiny" and report["wall_s"] > 0
    assert report["decoder_layers"] == {"3": 2, "2": 2}  # the preset's on CPU (--layers auto trims only on a GPU)
    cases = {(r["zero_stage"], r["layout"]): r for r in report["results"]}
    assert set(cases) == {(stage, layout) for stage in (2, 3) for layout in ("two_rows", "shared", "packed_flex")}
    for stage in (2, 3):
        assert "no FlexAttention backward on CPU" in cases[stage, "packed_flex"]["skipped"]
        two_rows, shared = cases[stage, "two_rows"], cases[stage, "shared"]
        for r in (two_rows, shared):
            assert "skipped" not in r, r
            assert r["bf16"] and r["gradient_checkpointing"] and r["step_time_s"] > 0 and r["mfu"] is None
            assert len(r["losses"]) == 3 and r["peak_host_rss_gib"] > 0
        # Same batch: the same pair tokens; the shared prompt runs each prompt once.
        assert shared["pair_tokens_per_step"] == two_rows["pair_tokens_per_step"]
        assert shared["decoder_tokens_per_step"] < two_rows["decoder_tokens_per_step"]
        assert two_rows["max_abs_logp_diff_vs_two_rows"] == 0.0  # a second two-row forward: deterministic
        # ddpo/estimate.py's peak for the case (no GPU here to measure it against); the packed row saves less
        for r in (two_rows, shared):
            assert r["predicted_peak_gib"] > 0 and r["measured_over_predicted"] is None and r["estimator_mfu"] is None
            parts = r["predicted_parts_gib"]
            assert parts["weights"] > 0 and parts["optimizer"] > parts["weights"] and parts["activations"] > 0
        assert shared["predicted_parts_gib"]["activations"] < two_rows["predicted_parts_gib"]["activations"]
        assert shared["max_abs_logp_diff_vs_two_rows"] < 0.1  # bf16 rounding of a different computation order
        # the speed-up is the layout's pair tokens/s over the two-row layout's, as reported beside it
        ratio = shared["pair_tokens_per_s"] / two_rows["pair_tokens_per_s"]
        assert shared["speedup_vs_two_rows"] == pytest.approx(ratio, abs=1e-3)
    # The first step of each stage starts from the same weights and batch: equal losses.
    assert cases[2, "two_rows"]["losses"][0] == pytest.approx(cases[3, "two_rows"]["losses"][0], abs=1e-2)
    # The LM-head bench ran (here on the CPU at a toy size) and its ratios reached the report and the table.
    bench = report["head_bench"]
    assert bench["returncode"] == 0, bench["stderr_tail"]
    for head in ("frozen", "trainable"):
        assert set(bench[head]) == {"memory_ratio", "time_ratio"} and bench[head]["time_ratio"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert f"- trainable head: memory_ratio={bench['trainable']['memory_ratio']}" in table
    assert "| ZeRO | layout | decoder tokens/step |" in table and "| predicted GiB | measured / predicted |" in table
    assert table.count("| shared |") == 2 and "skipped: PyTorch" in table
