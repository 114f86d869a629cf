"""The dense-regime map's pieces (ddpo/lab/regime.py, recipes.py, pairs.py, stats.py): its runs, the
55-word point's links to the lab, the arithmetic of its gaps, matched-drift reads and Holm correction,
and the aggregate command of experiments/dense_regime.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpo.lab import regime
from ddpo.lab.evaluation import CLAIM_ERRORS
from ddpo.lab.pairs import segment_subsets
from ddpo.lab.recipes import regime_runs
from ddpo.lab.selection import PRIMARY
from ddpo.lab.stats import holm, matched_drift_gaps, paired_gaps, weighted_share

REPO = Path(__file__).resolve().parents[1]
REPORTED = (PRIMARY, "response_hallucination_rate", "companion_rate", "object_recall", *CLAIM_ERRORS)


def test_runs_of_each_part_carry_their_settings():
    runs = regime_runs(["primary", "rescaled", "sumtuned"], tokens=60.0)
    assert runs["dpo_mean"] == {
        "loss.gamma": 1.0,
        "loss.normalize": "mean",
        "train.learning_rate": 3e-6,
        "loss.beta": 0.5,
    }
    assert runs["ddpo_mean_g5"]["loss.gamma"] == 5.0 and runs["ddpo_mean_g5"]["loss.beta"] == 0.5
    # the rescaled mean: beta x the point's answer tokens, the normalisation still the mean
    assert runs["ddpo_rescaled_g5"] == {
        "loss.gamma": 5.0,
        "loss.normalize": "mean",
        "train.learning_rate": 3e-6,
        "loss.beta": 30.0,
    }
    assert runs["ddpo_sum_g5_lr3e-05"] == {
        "loss.gamma": 5.0,
        "loss.normalize": "sum",
        "train.learning_rate": 3e-5,
        "loss.beta": 0.5,
    }
    assert set(runs) == {
        "dpo_mean",
        "ddpo_mean_g5",
        "dpo_rescaled",
        "ddpo_rescaled_g5",
        "ddpo_sum_g5_lr3e-05",
        "dpo_sum_lr3e-05",
    }


def test_other_lengths_continue_the_middle_sft_model(tmp_path):
    short = regime.point_settings(tmp_path, 3, 15, num_threads=1)
    assert short.sft_init == str(tmp_path / "seed3" / "words55" / "sft") and short.sft_steps == 300
    assert (
        short.answer_words == 15
        and short.sampled_eval is False
        and short.output_dir == str(tmp_path / "seed3" / "words15")
    )
    middle = regime.point_settings(tmp_path, 3, 55, num_threads=1)
    assert middle.sft_init is None


def test_the_middle_point_links_the_labs_model_pairs_and_identical_runs(tmp_path):
    lab = tmp_path / "lab" / "seed0"
    for name in (
        "sft",
        "pairs",
        "reference_cache",
        "runs/dpo_mean/final",
        "runs/ddpo_sum_g5_tuned/final",
        "runs/ddpo_mean_g2",
    ):
        (lab / name).mkdir(parents=True)
    (lab / "gate.json").write_text("{}")
    point = tmp_path / "map" / "seed0" / "words55"
    regime.link_middle(point, lab)
    assert (point / "sft").resolve() == (lab / "sft").resolve() and (point / "gate.json").is_file()
    assert (point / "runs" / "dpo_mean").resolve() == (lab / "runs" / "dpo_mean").resolve()
    # the lab calls DDPO-sum at its own lr "ddpo_sum_g5_tuned"
    assert (point / "runs" / "ddpo_sum_g5_lr3e-05").resolve() == (lab / "runs" / "ddpo_sum_g5_tuned").resolve()
    # a run the lab never finished is left for the map to train
    assert not (point / "runs" / "ddpo_mean_g2").exists() and not (point / "runs" / "ddpo_mean_g5").exists()
    regime.link_middle(point, lab)  # idempotent


def write_point(root: Path, seed: int, length: int, values: dict, drift: dict) -> None:
    out = regime.point_dir(root, seed, length)
    out.mkdir(parents=True)
    metrics = {
        r: {k: (v if k == PRIMARY else 0.5) for k in (*REPORTED, "mean_response_words")} for r, v in values.items()
    }
    pairs = {"rejected_words": 50.0, "pairs_used": 1000, "segments_per_pair": 2.0, "corrected_word_share": 0.1}
    (out / "results.json").write_text(
        json.dumps(
            {
                "methods": metrics,
                "validation": metrics,
                "drift": drift,
                "pairs": pairs,
                "gate": {"single_object_accuracy": 1.0, "recall_without_anchor": 0.97, "companion_rate": 0.4},
            }
        )
    )


# two seeds at 120 words: DPO's ladder 3e-6 (drift -0.01) and 1e-5 (drift -0.03), DDPO between them
BY_HAND = {
    0: (
        {"sft": 0.20, "dpo_mean": 0.10, "dpo_mean_lr1e-05": 0.06, "ddpo_mean_g5": 0.07, "ddpo_mean_g10": 0.09},
        {"sft": 0.0, "dpo_mean": -0.01, "dpo_mean_lr1e-05": -0.03, "ddpo_mean_g5": -0.02, "ddpo_mean_g10": -0.01},
    ),
    1: (
        {"sft": 0.30, "dpo_mean": 0.20, "dpo_mean_lr1e-05": 0.10, "ddpo_mean_g5": 0.17, "ddpo_mean_g10": 0.20},
        {"sft": 0.0, "dpo_mean": -0.02, "dpo_mean_lr1e-05": -0.04, "ddpo_mean_g5": -0.03, "ddpo_mean_g10": -0.02},
    ),
}


def test_gaps_matched_drift_and_holm_by_hand(tmp_path):
    for seed, (values, drift) in BY_HAND.items():
        write_point(tmp_path, seed, 120, values, drift)
    table = regime.collect_points(tmp_path, [0, 1, 2], [15, 120], REPORTED)
    assert list(table) == ["120"] and table["120"]["seeds"] == [0, 1]  # seed 2 and 15 words: nothing finished
    assert table["120"]["test"]["dpo_mean"][PRIMARY] == [0.10, 0.20]
    gaps = paired_gaps(table["120"]["test"], {"ddpo_mean_g5": "dpo_mean", "ddpo_mean_g10": "dpo_mean", "x": "y"})
    assert set(gaps) == {"ddpo_mean_g5", "ddpo_mean_g10"}  # a comparison whose runs are missing is skipped
    mean, low, high, _ = gaps["ddpo_mean_g5"][PRIMARY]
    assert mean == pytest.approx(-0.03)  # (0.07 - 0.10 + 0.17 - 0.20) / 2: both -0.03, no spread
    assert low == pytest.approx(-0.03) and high == pytest.approx(-0.03)
    g10 = gaps["ddpo_mean_g10"][PRIMARY]
    assert g10[0] == pytest.approx(-0.005)  # -0.01 and 0.00
    # two seeds: one degree of freedom, t 12.706; the differences' sd is 0.00707107
    assert g10[2] - g10[0] == pytest.approx(12.706 * 0.00707107 / 2**0.5, rel=1e-5)
    assert g10[3] == pytest.approx(0.5)  # t = -1 on 1 df
    # matched drift: DPO at drift -0.02 is halfway up its ladder (0.08 for seed 0, 0.15 for seed 1)
    ladder = ("dpo_mean", "dpo_mean_lr1e-05")
    rows = matched_drift_gaps(table["120"]["test"], table["120"]["drift"], {"ddpo_mean_g5": ladder}, (PRIMARY,))
    row = rows["ddpo_mean_g5"]
    assert row["per_seed"] == pytest.approx([0.07 - 0.08, 0.17 - 0.15])
    assert row[PRIMARY][0] == pytest.approx((0.07 - 0.08 + 0.17 - 0.15) / 2)
    assert row["extrapolated"] == 0 and row["drift"] == pytest.approx(-0.025)
    assert row["dpo_drift"] == pytest.approx([-0.015, -0.035])
    # past the ladder's end the read is extrapolated and flagged
    far = matched_drift_gaps(
        {"a": {"m": [1.0]}, "l1": {"m": [0.0]}, "l2": {"m": [1.0]}},
        {"a": [3.0], "l1": [0.0], "l2": [1.0]},
        {"a": ("l1", "l2")},
        ("m",),
    )
    assert far["a"]["per_seed"] == pytest.approx([1.0 - 3.0]) and far["a"]["extrapolated"] == 1
    # Holm: the smallest of three p-values times 3 (capped at 1), then running maxima
    assert holm({"a": 0.5, "b": 0.5, "c": 0.795}) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_weighted_share_is_gammas_share_of_the_token_weight():
    # 10% of the tokens corrected, gamma 5: 0.5 / (0.5 + 0.9)
    assert weighted_share(0.1, 5.0) == pytest.approx(0.5 / 1.4)
    assert weighted_share(0.1, 1.0) == pytest.approx(0.1)


def aggregate(output_dir: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [
            sys.executable,
            "experiments/dense_regime.py",
            "aggregate",
            "--output-dir",
            str(output_dir),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow
def test_aggregate_reports_the_map_and_falls_back_to_the_committed_json(tmp_path):
    for seed, (values, drift) in BY_HAND.items():
        write_point(tmp_path / "runs", seed, 120, values, drift)
    results = tmp_path / "results"
    proc = aggregate(tmp_path / "runs", results)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (results / "results.md").read_text()
    # the primary is unadjusted. The secondary family: g10 at equal lr (t = -1 on 1 df: p = 0.5), g10 at
    # matched drift (its drift is dpo_mean's: the same differences, p 0.5) and g5 at matched drift
    # (differences -0.01, +0.02: p 0.795); Holm multiplies the smallest by 3: 1.5, capped at 1
    assert "| 120 | ddpo_mean_g5 - dpo_mean | -0.030 [-0.030, -0.030] | 0.000 (primary) |" in text
    assert "| 120 | ddpo_mean_g10 - dpo_mean | -0.005 [-0.069, +0.059] | 1.000 |" in text
    assert "| 120 | ddpo_mean_g5 | -0.025 | -0.015, -0.035 | +0.005 [" in text
    assert text.startswith("# Dense-regime map") and "Command: `python experiments/dense_regime.py aggregate" in text
    # without run directories: the committed per-seed values, the same report
    proc = aggregate(tmp_path / "none", results)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (results / "results.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]  # all but the command
    proc = aggregate(tmp_path / "none", tmp_path / "empty")
    assert proc.returncode == 2 and "no finished points" in proc.stderr


def test_segment_subsets_select_by_the_trainers_segment_count(tmp_path):
    out = tmp_path / "seed0" / "words55"
    (out / "pairs").mkdir(parents=True)
    base = "at the top left is a red circle . at the center is a blue star . the background is dark gray ."
    one = base.replace("red", "green")  # one corrected segment
    two = base.replace("red", "green").replace("blue", "pink")  # two, far apart
    rows = [
        {"image": f"{i}.png", "question": "q", "chosen": base, "rejected": r}
        for i, r in enumerate([one, two, one, two, one])
    ]
    (out / "pairs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = segment_subsets(out, regime.SEGMENT_SUBSETS, 2)
    picked = {k: [json.loads(line)["image"] for line in f.read_text().splitlines()] for k, f in files.items()}
    assert picked == {"one": ["0.png", "2.png"], "multi": ["1.png", "3.png"]}  # the first two of each, in file order
    stats = json.loads((out / "segment_pairs" / "stats.json").read_text())
    assert stats["one"]["segments_per_pair"] == 1 and stats["multi"]["segments_per_pair"] == 2
    runs = regime_runs(["primary", "segments"], tokens=20.0, segment_files=files)
    assert runs["ddpo_sum_g5_lr3e-05_segmulti"]["data.path"] == str(files["multi"])
    assert runs["dpo_mean_segone"]["train.reference_cache"] == str(out / "segment_pairs" / "reference_cache_one")
    assert runs["dpo_mean_segone"]["train.learning_rate"] == 3e-6 and "dpo_mean" in runs
    with pytest.raises(ValueError, match="only 2 pairs with 2-1000000 segments, 3 needed"):
        segment_subsets(out, regime.SEGMENT_SUBSETS, 3)


def test_a_points_eval_covers_every_finished_run_not_only_this_calls_parts(tmp_path, monkeypatch):
    out = regime.point_dir(tmp_path, 0, 15)
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "train.jsonl").write_text(json.dumps({"chosen": "a b .", "rejected": "a c ."}) + "\n")
    for name in ("dpo_mean", "ddpo_sum_g5"):  # finished earlier, by another part
        (out / "runs" / name / "final").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(regime, "run", lambda settings, stages: calls.append((stages, dict(settings.methods or {}))))
    monkeypatch.setattr(
        regime, "train_with_sweep", lambda settings, out: calls.append((["train"], dict(settings.methods)))
    )
    regime.run_point(tmp_path, 0, 15, ["primary"], None, 1)
    assert [stages for stages, _ in calls] == [["sft", "gate", "sample", "annotate"], ["train"], ["eval"]]
    assert set(calls[1][1]) == {"dpo_mean", "ddpo_mean_g5"}  # trained: this call's parts
    assert set(calls[2][1]) == {"dpo_mean", "ddpo_sum_g5"}  # evaluated: every finished run
