"""A data or config error ends `ddpo train` with one message and a non-zero code, not a traceback dump."""

import pytest
from test_trainer import TINY, run_ddpo

BAD_DATA = ("--data.max_length", "80", "--data.long_answers", "error")  # every synthetic answer is too long


@pytest.mark.slow
def test_data_error_is_one_message_and_exit_code_1(tmp_path):
    proc = run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(tmp_path / "run"),
        "--logging.progress_bar",
        "false",
        *BAD_DATA,
        expect_ok=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddpo train: error: ")]
    assert len(errors) == 1 and "exceed data.max_length 80" in errors[0] and "of synthetic(seed=" in errors[0]


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    proc = run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(tmp_path / "run"),
        "--logging.progress_bar",
        "false",
        *BAD_DATA,
        "--debug",
        expect_ok=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


@pytest.mark.slow
def test_config_error_is_one_message_and_exit_code_2(tmp_path):
    proc = run_ddpo("train", TINY, "--train.output_dir", str(tmp_path / "run"), "--loss.beta", "-1", expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ddpo train: config error:" in proc.stderr
