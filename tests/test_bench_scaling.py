"""experiments/bench_scaling.py end to end on its smoke grid (tiny widths and token counts, one timing process):
results.json has every point with both systems' timings and memory, the fits reproduce the points they were fit
on, and the table and the plot are written. Needs TRL (requirements-bench.txt), as the script does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("image_tokens", "answer_tokens", "batch", "width")
STEPS = 2  # the smoke run's timed steps per (system, point)
EXACT = 1e-6  # relative error: a fit with as many coefficients as points passes through them


def polyval(coefficients: list[float], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coefficients))


@pytest.mark.slow
def test_smoke_grid_writes_every_point_and_exact_fits(tmp_path):
    pytest.importorskip("trl")
    command = [sys.executable, str(REPO / "experiments" / "bench_scaling.py"), "--smoke", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    # Every axis value of the smoke grid, plus the real shape; each with both systems measured.
    axes = {
        axis: sorted(p[field] for p in results["points"] if p["axis"] == axis)
        for axis, field in zip(("image", "answer", "batch", "width"), FIELDS)
    }
    assert axes == {"image": [4, 16, 36], "answer": [8, 16], "batch": [1, 2], "width": [64, 128]}
    assert [p["image_tokens"] for p in results["points"] if p["axis"] == "real"] == [36]
    for p in results["points"]:
        assert p["row_tokens"] == p["prompt_tokens"] + p["answer_tokens"]
        assert p["prompt_tokens"] == p["image_tokens"] + 46  # llava_v1 prompt around the image tokens
        for system in ("ours", "trl"):
            s = p[system]
            assert s["repetitions"] == STEPS and s["ms_q1"] <= s["ms_median"] <= s["ms_q3"] and s["ms_median"] > 0
            assert s["peak_mb"] > 0 and s["gflop"] > 0
        assert p["ratio"] == pytest.approx(p["ours"]["ms_median"] / p["trl"]["ms_median"])
        assert 0 < p["flop_ratio"] < 1  # no reference forward, no second prompt, no logits for prompt tokens
        assert len(p["process"]["loadavg_start"]) == 3
    assert results["real_shape"]["ratio"] > 0 and set(results["ratio_by_image_tokens"]) == {"4", "16", "36"}

    # Fits: the stored predictions are the stored coefficients' values, and with as many points as coefficients
    # (three image-token points, a quadratic; two on the others, a line) they reproduce the measured points.
    for system in ("ours", "trl"):
        fits = results["fits"][system]
        assert len(fits["image"]["coefficients"]) == 3 and len(fits["batch"]["coefficients"]) == 2
        for axis in ("image", "answer", "batch"):
            f = fits[axis]
            for x, measured, predicted in zip(f["x"], f["measured"], f["predicted"]):
                assert predicted == pytest.approx(polyval(f["coefficients"], x), rel=1e-9)
                assert abs(predicted - measured) <= EXACT * measured
            assert f["r2"] == pytest.approx(1.0, abs=EXACT) and f["max_rel_error"] <= EXACT
        assert fits["width"]["ratio_last_to_first"] == pytest.approx(
            fits["width"]["measured"][1] / fits["width"]["measured"][0]
        )

    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") >= len(results["points"]) and "c0 + c1 L + c2 L²" in table
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_quadratic_fit_recovers_known_coefficients():
    """The fit on exact data with more points than coefficients: the least squares solution is the truth."""
    from experiments.bench_scaling import fit  # stdlib-only at import; numpy inside

    x = [110.0, 190.0, 302.0, 622.0]
    f = fit(x, [5.0 + 0.3 * v + 0.002 * v * v for v in x], 2)
    assert f["coefficients"] == pytest.approx([5.0, 0.3, 0.002], rel=1e-6)
    assert f["r2"] == pytest.approx(1.0) and f["max_rel_error"] < 1e-9
