"""Answers longer than the room max_length leaves: cut the same way in the reference cache and in training."""

import pytest
from test_trainer import THREADS, TINY, logp_noise, metrics, paired, run_ddpo

# The tiny config's prompts (system prompt, question, 16 image tokens) take ~65 tokens: at 80 most
# synthetic answers are cut.
SHORT = ("--data.max_length", "80", "--train.max_steps", "3", "--train.learning_rate", "1e-3")


def _train(out, *overrides, expect_ok=True):
    return run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
        *SHORT,
        *overrides,
        expect_ok=expect_ok,
    )


@pytest.mark.slow
def test_cut_answers_train_with_a_cached_reference_as_with_a_live_one(tmp_path):
    cached = _train(tmp_path / "cached", "--train.reference", "cached")
    live = _train(tmp_path / "live", "--train.reference", "live")
    for proc in (cached, live):
        assert "pairs have an answer longer than the room data.max_length 80 leaves after the prompt" in proc.stderr
    assert "cached reference" not in cached.stderr
    for mc, ml in paired(metrics(tmp_path / "cached"), metrics(tmp_path / "live")):
        for key in ("logps/ref_chosen", "logps/ref_rejected"):
            assert mc[key] == pytest.approx(ml[key], rel=1e-6), key
        for key in ("loss", "rewards/margins"):
            assert mc[key] == pytest.approx(ml[key], abs=logp_noise(mc)), key


@pytest.mark.slow
def test_long_answers_error_stops_naming_the_row(tmp_path):
    proc = _train(tmp_path / "run", "--data.long_answers", "error", expect_ok=False)
    assert proc.returncode != 0
    assert "fields 'chosen'/'rejected': prompt" in proc.stderr and "exceed data.max_length 80" in proc.stderr
    assert "data.long_answers truncate" in proc.stderr
