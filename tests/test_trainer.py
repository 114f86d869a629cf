"""The training recipe end to end, always in fresh subprocesses (as users run it).

Runs go through `python -m ddpo train` (one plain process) or the `deepspeed` launcher (2 processes,
gloo on CPU), each with a clean environment and its own port, so no distributed state leaks between
tests.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


# Threads per training process. 1 by default (CI machines are shared); DDPO_TEST_THREADS=2 runs the suite in
# a second float summation order, which every tolerance below must survive.
THREADS = os.environ.get("DDPO_TEST_THREADS", "1")


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=THREADS,
        PYTHONPATH=str(REPO),
    )
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddpo(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ddpo", *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"ddpo {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train(out: Path, *overrides: str, config: str = TINY) -> list[dict]:
    run_ddpo(
        "train",
        config,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
        *overrides,
    )
    return metrics(out)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def paired(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Rows of two metric logs side by side; the logs must be equally long and not empty (a bare zip
    would pass on an empty or truncated log)."""
    assert len(a) == len(b) > 0, (len(a), len(b))
    return list(zip(a, b))


LOGP_KEYS = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
FLOAT32_EPS = 2.0**-23


def logp_noise(record: dict, beta: float = 0.1, ulps: int = 8) -> float:
    """Absolute float32 noise of what a record computes from its summed log-probs (rewards, margins, the
    loss): a few units in the last place of each sum, times beta. Summation order (cached vs live
    reference, batch shape, thread count, CPU) moves the sums (~360 nats here) in their last bits; a
    margin is a difference of near-equal sums (~1e-6 at step 1), so that noise stays absolute and is
    no fraction of the margin. Measured: <= 3.1e-6 between cached/live x 1/2 threads, against ~1.4e-4."""
    return ulps * FLOAT32_EPS * beta * sum(abs(record[k]) for k in LOGP_KEYS)


METRIC_KEYS = {
    "step",
    "epoch",
    "lr",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
}


@pytest.mark.slow
def test_tiny_config_trains_logs_and_exports(tmp_path):
    out = tmp_path / "run"
    logged = train(out, "--train.max_steps", "4")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert METRIC_KEYS <= set(logged[0])
    assert all(abs(m["loss"]) < 10 for m in logged)
    # The first step sits on the reference: policy == reference, so DPO's loss is exactly log 2.
    assert logged[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert (out / "config.yaml").is_file() and (out / "reference_cache" / "fingerprint.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    # The exported model reloads with from_pretrained and gives the trained model's log-probs.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ddpo.models.build import load_model; m = load_model(sys.argv[1]); "
            "print(type(m).__name__, m.image_placeholder.count('<image>'))",
            str(out / "final"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    assert check.returncode == 0, check.stderr[-3000:]


@pytest.mark.slow
def test_loss_goes_down_on_a_learnable_set(tmp_path):
    logged = train(
        tmp_path / "run",
        "--train.max_steps",
        "30",
        "--train.learning_rate",
        "3e-3",
        "--train.warmup_ratio",
        "0",
        "--data.synthetic_pairs",
        "32",
        "--train.logging_steps",
        "1",
    )
    first, last = sum(m["loss"] for m in logged[:3]) / 3, sum(m["loss"] for m in logged[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert logged[-1]["rewards/accuracies"] == 1.0


@pytest.mark.slow
def test_batch_times_accumulation_invariance(tmp_path):
    """8 pairs x 1 micro-batch and 2 pairs x 4 micro-batches give the same optimizer step."""
    common = (
        "--train.max_steps",
        "2",
        "--train.warmup_ratio",
        "0",
        "--train.learning_rate",
        "1e-3",
        "--data.synthetic_pairs",
        "32",
    )
    a = train(tmp_path / "a", *common, "--train.micro_batch_size", "8", "--train.gradient_accumulation_steps", "1")
    b = train(tmp_path / "b", *common, "--train.micro_batch_size", "2", "--train.gradient_accumulation_steps", "4")
    for ma, mb in paired(a, b):
        for key in ("logps/chosen", "grad_norm"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-5), key
        for key in ("loss", "rewards/margins"):
            assert ma[key] == pytest.approx(mb[key], abs=logp_noise(ma)), key


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: identical metrics on CPU. Bit-for-bit equality is a
    claim for one machine and thread count: both runs execute the same kernels in the same order."""
    common = ("--train.learning_rate", "1e-3", "--data.synthetic_pairs", "24")
    straight = train(tmp_path / "straight", *common, "--train.max_steps", "6")
    # An interrupted run: same schedule (max_steps 6), then resumed from its step-3 checkpoint as if it had
    # died right after writing it.
    out = tmp_path / "split"
    run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
        *common,
        "--train.max_steps",
        "6",
        "--train.save_steps",
        "3",
        "--train.save_total_limit",
        "0",
    )
    (out / "metrics.jsonl").unlink()
    resumed = train(out, *common, "--train.max_steps", "6", "--train.resume", str(out / "checkpoints" / "step-000003"))
    assert [m["step"] for m in resumed] == [4, 5, 6]
    for ms, mr in paired(straight[3:], resumed):
        for key in ("loss", "lr", "rewards/margins", "logps/chosen", "grad_norm", "epoch"):
            assert ms[key] == mr[key], (key, ms[key], mr[key])


@pytest.mark.slow
def test_cached_reference_equals_live_reference(tmp_path):
    common = ("--train.max_steps", "3", "--train.learning_rate", "1e-3")
    cached = train(tmp_path / "cached", *common, "--train.reference", "cached")
    live = train(tmp_path / "live", *common, "--train.reference", "live")
    for mc, ml in paired(cached, live):
        for key in ("logps/ref_chosen", "logps/ref_rejected"):  # one sum each: a relative tolerance fits
            assert mc[key] == pytest.approx(ml[key], rel=1e-6), key
        # Differences of near-equal sums: an absolute tolerance scaled to the sums (a relative one on the
        # margin does not hold across CPUs: -0.13544005 vs -0.13544159 on two machines).
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert mc[key] == pytest.approx(ml[key], abs=logp_noise(mc)), key


@pytest.mark.slow
def test_changing_gamma_reuses_the_reference_cache(tmp_path):
    """gamma acts in the loss on cached per-token log-probs: a cache made under one gamma serves another."""
    cache = tmp_path / "cache"
    run_ddpo(
        "precompute-ref",
        TINY,
        "--train.output_dir",
        str(tmp_path / "pre"),
        "--train.reference_cache",
        str(cache),
        "--logging.progress_bar",
        "false",
    )
    written = (cache / "logps.parquet").stat().st_mtime_ns, (cache / "fingerprint.json").read_text()
    runs = {}
    for gamma in ("1.0", "5.0"):
        runs[gamma] = train(
            tmp_path / f"gamma{gamma}",
            "--train.max_steps",
            "2",
            "--train.reference_cache",
            str(cache),
            "--loss.gamma",
            gamma,
        )
        assert ((cache / "logps.parquet").stat().st_mtime_ns, (cache / "fingerprint.json").read_text()) == written
    for one, five in paired(runs["1.0"], runs["5.0"]):
        assert one["logps/ref_chosen"] != five["logps/ref_chosen"]  # same cache, weighted by each run's gamma


@pytest.mark.slow
def test_cache_with_wrong_fingerprint_is_refused(tmp_path):
    out = tmp_path / "run"
    run_ddpo("precompute-ref", TINY, "--train.output_dir", str(out), "--logging.progress_bar", "false")
    assert (out / "reference_cache" / "logps.parquet").is_file()
    proc = run_ddpo("train", TINY, "--train.output_dir", str(out), "--data.max_length", "200", expect_ok=False)
    assert proc.returncode != 0
    assert "max_length" in proc.stderr and "precompute-ref" in proc.stderr


def _deepspeed(out: Path, nproc: int, *overrides: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(_port()),
        "--module",
        "ddpo.train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return metrics(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one(tmp_path, stage):
    """2 processes x 2 pairs under ZeRO-{2,3} == 1 process x 4 pairs (same global batch, same data order)."""
    common = ("--train.max_steps", "3", "--train.learning_rate", "1e-3", "--data.synthetic_pairs", "32")
    ds_config = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    if stage == 3:  # partition every parameter (the shipped JSON keeps tiny ones whole), LM head included
        ds_config = tmp_path / "zero3_all.json"
        ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    single = train(tmp_path / "single", *common, "--train.micro_batch_size", "4")
    multi = _deepspeed(
        tmp_path / f"zero{stage}", 2, *common, "--train.micro_batch_size", "2", "--deepspeed.config", str(ds_config)
    )
    for ms, mm in paired(single, multi):
        assert ms["logps/chosen"] == pytest.approx(mm["logps/chosen"], rel=1e-4)
        for key in ("loss", "rewards/margins"):
            assert ms[key] == pytest.approx(mm[key], abs=logp_noise(ms)), key
