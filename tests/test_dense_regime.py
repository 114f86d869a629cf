"""The dense-regime study's pieces: controlled caption pairs, and the aggregation's arithmetic."""
import importlib.util
import json
from pathlib import Path

import pytest

from data.synthetic.language import n_words
from ddpo.config import load_config
from ddpo.lab.demo import DemoSettings, caption_pairs

REPO = Path(__file__).resolve().parents[1]
# experiments/ holds scripts, not a package: load the study's module from its file.
_SPEC = importlib.util.spec_from_file_location("dense_regime", REPO / "experiments" / "dense_regime.py")
dense_regime = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dense_regime)


@pytest.mark.parametrize("segments", [1.0, 4.0])
def test_caption_pairs_carry_the_requested_segments(segments):
    settings = DemoSettings.v1(answer_words=60, world=dense_regime.WORLD, noise=dense_regime.NOISE, pair_errors=segments, max_pairs=150)
    records = caption_pairs(settings)
    assert len(records) == 150 and all(r.chosen != r.rejected for r in records)
    corrections = [len(r.meta["corrections"]) for r in records]
    # pairs hold >= 1 error by construction, so the mean sits a little above a small target
    assert segments * 0.75 <= sum(corrections) / len(corrections) <= max(segments * 1.25, 1.6)
    assert 45 <= sum(n_words(r.rejected) for r in records) / len(records) <= 75
    assert [r.rejected for r in caption_pairs(settings)] == [r.rejected for r in records]  # deterministic


def test_interval_is_the_t_interval_of_the_mean():
    mean, low, high, std = dense_regime.interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert high - mean == pytest.approx(4.303 * 0.1 / 3 ** 0.5) and mean - low == pytest.approx(high - mean)
    assert dense_regime.interval([0.5]) == (0.5, 0.5, 0.5, 0.0)


def test_aggregate_takes_ddpo_minus_dpo_per_seed(tmp_path):
    grid = dict(lengths=[15], segments=[1.0], gammas=[1.0, 5.0], seeds=[0, 1])
    values = {0: {"sft": 0.35, "sum_g1": 0.30, "sum_g5": 0.20, "mean_g1": 0.40, "mean_g5": 0.40},
              1: {"sft": 0.45, "sum_g1": 0.50, "sum_g5": 0.30, "mean_g1": 0.40, "mean_g5": 0.50}}
    for seed, by_method in values.items():
        point = dense_regime.point_dir(tmp_path, seed, 15, 1.0)
        point.mkdir(parents=True)
        metrics = {m: {"mention_hallucination_rate": v, "response_hallucination_rate": v, "object_recall": 1 - v,
                       "mean_response_words": 20.0} for m, v in by_method.items()}
        pairs = {"rejected_words": 20.0, "corrections_per_pair": 1.0, "corrections": {"object": 3}}
        validation = {m: {k: 2 * v for k, v in by_metric.items()} for m, by_metric in metrics.items()}  # twice the test values
        (point / "results.json").write_text(json.dumps({"methods": metrics, "validation": validation, "pairs": pairs}))
    table = dense_regime.add_gaps(dense_regime.aggregate(tmp_path, grid))
    gap = table["words15_segments1"]["gaps"]
    assert gap["sum_g5"]["mention_hallucination_rate"][0] == pytest.approx(-0.15)  # (-0.1 + -0.2) / 2
    assert gap["mean_g5"]["object_recall"][0] == pytest.approx(-0.05)
    assert table["words15_segments1"]["corrections"] == {"object": 6}
    assert table["words15_segments1"]["validation_gaps"]["sum_g5"]["mention_hallucination_rate"][0] == pytest.approx(-0.30)
    dense_regime.write_results(table, tmp_path / "results", "Command: `cmd`")
    text = (tmp_path / "results" / "results.md").read_text()
    # differences -0.1 and -0.2: std 0.0707, half-width 12.706 * 0.0707 / sqrt(2) = 0.635
    assert "| sum_g5 | -0.150 ± 0.071 [-0.785, +0.485] |" in text
    assert "| DDPO - DPO (validation) |" in text and "| sum_g5 | -0.300 ± 0.141 [-1.571, +0.971] |" in text
    # the map row: per normalisation, mention and response gaps at gamma 5
    assert ("| 15 | 1 | 1.00 | 0.0% | -0.150 [-0.785, +0.485] | -0.150 [-0.785, +0.485] | "
            "+0.050 [-0.585, +0.685] | +0.050 [-0.585, +0.685] |") in text


def test_sft_from_links_the_other_grids_model_instead_of_training(tmp_path, monkeypatch):
    shared = tmp_path / "full" / "seed1" / "words15" / "sft"
    shared.mkdir(parents=True)
    (shared / "ddpo_model.json").write_text("{}")
    stages = []

    def fake_run(settings, names):
        stages.append(names)
        if names == ["annotate"]:
            (Path(settings.output_dir) / "pairs").mkdir(parents=True)
            (Path(settings.output_dir) / "pairs" / "stats.json").write_text(json.dumps({"rejected_words": 30.0}))
        return {"methods": settings.methods}

    monkeypatch.setattr(dense_regime, "run", fake_run)
    monkeypatch.setattr(dense_regime, "train_runs", lambda settings, out, launcher: stages.append(["train"]))
    result = dense_regime.run_point(tmp_path / "corners", 1, 15, 1.0, [1.0, 5.0], 1400, sft_from=tmp_path / "full")
    assert stages == [["annotate"], ["train"], ["eval"]]  # no SFT stage
    assert (tmp_path / "corners" / "seed1" / "words15" / "sft").resolve() == shared.resolve()
    assert result["methods"]["mean_g5"]["loss.beta"] == 18.0  # 0.5 x 1.2 tokens per word x 30 words


def test_train_runs_go_through_the_sweep_launcher_one_config_per_method(tmp_path, monkeypatch):
    launched = []

    def fake_train_inline(point):
        launched.append(point)
        (point.run_dir / "final").mkdir()
        return 0

    monkeypatch.setattr(dense_regime.sweep, "train_inline", fake_train_inline)
    settings = DemoSettings.v1(output_dir=str(tmp_path), seed=2, methods=dense_regime.methods([1.0, 5.0], answer_tokens=30.0))
    dense_regime.train_runs(settings, tmp_path, "inline")
    assert [p.name for p in launched] == ["sum_g1", "sum_g5", "mean_g1", "mean_g5"]
    configs = {p.name: load_config(p.config_path) for p in launched}
    assert {m: (c.loss.normalize, c.loss.gamma, c.loss.beta) for m, c in configs.items()} == {
        "sum_g1": ("sum", 1.0, 0.5), "sum_g5": ("sum", 5.0, 0.5), "mean_g1": ("mean", 1.0, 15.0), "mean_g5": ("mean", 5.0, 15.0)}
    for name, cfg in configs.items():
        assert cfg.train.output_dir == str(tmp_path / "runs" / name) and cfg.train.resume == "auto"
        assert cfg.train.seed == 2 and cfg.model.name_or_path == str(tmp_path / "sft")
    # one reference cache for all four: gamma and the normalisation act on cached per-token log-probs
    assert len({c.train.reference_cache for c in configs.values()}) == 1
    dense_regime.train_runs(settings, tmp_path, "inline")  # every run has final/: nothing is trained again
    assert len(launched) == 4

    monkeypatch.setattr(dense_regime.sweep, "train_inline", lambda point: 1)
    settings.methods = dense_regime.methods([2.0], answer_tokens=30.0)
    with pytest.raises(RuntimeError, match="sum_g2, mean_g2 failed"):
        dense_regime.train_runs(settings, tmp_path, "inline")


def test_aggregate_only_without_runs_recomputes_from_the_committed_json(tmp_path, capsys):
    test_aggregate_takes_ddpo_minus_dpo_per_seed(tmp_path / "made")
    results = tmp_path / "made" / "results"
    before = json.loads((results / "results.json").read_text())
    (results / "results.md").write_text("# old\n\nCommand: `the run that made them` (98 min)\n")
    assert dense_regime.main(["--grid", "default", "--output-dir", str(tmp_path / "no_runs"), "--results", str(results),
                              "--aggregate-only"]) == 0
    assert json.loads((results / "results.json").read_text()) == before
    assert "Command: `the run that made them` (98 min)" in (results / "results.md").read_text()
    assert dense_regime.main(["--output-dir", str(tmp_path / "no_runs"), "--results", str(tmp_path / "none"), "--aggregate-only"]) == 2


def test_word_edits_share_and_kinds_by_hand(tmp_path):
    rows = [("a red circle is at the top", "a pink circle is at the top"),  # 1 of 7 words replaced
            ("a b c d", "a b d"),                                            # 1 of 4 deleted
            ("x y", "x z y")]                                                # an insertion changes no rejected word
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"rejected": r, "chosen": c}) for r, c in rows))
    share, kinds = dense_regime.word_edits(tmp_path / "train.jsonl")
    assert share == pytest.approx((1 / 7 + 1 / 4 + 0) / 3)
    assert kinds == {"replace": 1, "delete": 1, "insert": 1}
