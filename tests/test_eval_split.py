"""Held-out evaluation (data.eval_fraction, data.eval_path, train.eval_steps) and the DDPO margin split
(rewards/margins_corrected + rewards/margins_unchanged = rewards/margins).

The end-to-end runs go through `python -m ddpo train` in fresh subprocesses (tests/test_trainer.py's helpers);
their numbers are checked against a naive recomputation here, in this process, from the exported model and the
reference cache."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from ddpo.config import ConfigError, fields_help, load_config
from ddpo.loss import DDPOLoss, LossConfig
from ddpo.trainer import split_heldout
from tests.data.fixtures import PAIRS, write_jsonl
from tests.test_trainer import THREADS, TINY, logp_noise, metrics, run_ddpo

NAN = float("nan")
TRL_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TIMING_KEYS = ("samples_per_s", "tokens_per_s")


# ----------------------------------------------------------------------------------------------
# The margin split
# ----------------------------------------------------------------------------------------------
def one_pair():
    """One pair, T = 4, the answer at positions 1-3 (chosen) and 1-2 (rejected); NaN outside it on purpose.

    chosen   log-probs [-1, -2, -3], corrected [no, yes, no];  reference [-1.5, -1, -2]
    rejected log-probs [-3, -1],     corrected [yes, no];      reference [-1, -1]
    With gamma 2 the weights are chosen [1, 2, 1], rejected [2, 1]."""
    pc = torch.tensor([[NAN, -1.0, -2.0, -3.0]], dtype=torch.float64)
    pr = torch.tensor([[NAN, -3.0, -1.0, NAN]], dtype=torch.float64)
    rc = torch.tensor([[NAN, -1.5, -1.0, -2.0]], dtype=torch.float64)
    rr = torch.tensor([[NAN, -1.0, -1.0, NAN]], dtype=torch.float64)
    answer = torch.tensor([[False, True, True, True], [False, True, True, False]])
    corrected = torch.tensor([[False, False, True, False], [False, True, False, False]])
    return pc, pr, rc, rr, answer, corrected


@pytest.mark.parametrize(
    ("normalize", "corrected", "unchanged"),
    [
        # sum: chosen corrected 2(-2 - -1) = -2, unchanged (-1 - -1.5) + (-3 - -2) = -0.5;
        #      rejected corrected 2(-3 - -1) = -4, unchanged (-1 - -1) = 0; beta 0.5:
        #      corrected 0.5 (-2 - -4) = 1, unchanged 0.5 (-0.5 - 0) = -0.25 (margin 0.75)
        ("sum", 1.0, -0.25),
        # mean: the same shares over N = 4 (chosen) and 3 (rejected):
        #      corrected 0.5 (-2/4 + 4/3) = 5/12, unchanged 0.5 (-0.5/4 - 0) = -1/16 (margin 17/48)
        ("mean", 5 / 12, -1 / 16),
    ],
)
def test_margin_split_by_hand_on_one_pair(normalize, corrected, unchanged):
    pc, pr, rc, rr, answer, corrected_mask = one_pair()
    _, m = DDPOLoss(LossConfig(beta=0.5, gamma=2.0, normalize=normalize))(pc, pr, rc, rr, answer, corrected_mask)
    # metrics are float32 batch means (pair_metrics): exact to float32's ~1e-7
    assert m["rewards/margins_corrected"].item() == pytest.approx(corrected, abs=1e-7)
    assert m["rewards/margins_unchanged"].item() == pytest.approx(unchanged, abs=1e-7)
    assert m["rewards/margins"].item() == pytest.approx(corrected + unchanged, abs=1e-7)
    assert not m["rewards/margins_corrected"].requires_grad


@pytest.mark.parametrize(
    "settings",
    [
        {"normalize": "mean"},
        {"normalize": "sum", "gamma": 5.0, "beta": 0.1},
        {"normalize": "mean", "reference_free": True},
        {"normalize": "mean", "gamma": 1.0, "token_weights": "length", "ld_alpha": 0.5},  # reference weighs 1
        {"normalize": "sum", "loss_type": "ipo", "sft_weight": 0.3},
    ],
)
def test_margin_split_adds_up_to_the_margin(settings):
    g = torch.Generator().manual_seed(3)
    b, t = 5, 9
    logps = [-torch.rand(b, t, generator=g, dtype=torch.float64) * 4 for _ in range(4)]
    lengths = torch.randint(2, t + 1, (2 * b,), generator=g)
    answer = torch.arange(t)[None, :] < lengths[:, None]
    corrected = answer & (torch.rand(2 * b, t, generator=g) < 0.4)
    _, m = DDPOLoss(LossConfig(**settings))(*logps, answer, corrected)
    split = m["rewards/margins_corrected"].item() + m["rewards/margins_unchanged"].item()
    assert split == pytest.approx(m["rewards/margins"].item(), abs=1e-6)  # float32 means of terms ~1
    assert m["rewards/margins_corrected"].item() != 0  # both parts carry something here


def test_margin_split_without_corrections_is_all_unchanged():
    pc, pr, rc, rr, answer, _ = one_pair()
    _, m = DDPOLoss(LossConfig(beta=0.5, gamma=2.0, normalize="sum"))(pc, pr, rc, rr, answer, torch.zeros_like(answer))
    assert m["rewards/margins_corrected"].item() == 0.0
    # unweighted sums: chosen (-6 - -4.5) = -1.5, rejected (-4 - -2) = -2 -> 0.5 x 0.5
    assert m["rewards/margins_unchanged"].item() == pytest.approx(0.25, abs=1e-7)
    assert m["rewards/margins_unchanged"].item() == m["rewards/margins"].item()


# ----------------------------------------------------------------------------------------------
# The seeded split and the config
# ----------------------------------------------------------------------------------------------
def test_split_heldout_is_seeded_disjoint_and_complete():
    kept, held = split_heldout(64, 0.25, seed=42)
    assert len(held) == 16 and len(kept) == 48
    assert sorted(kept + held) == list(range(64)) and not set(kept) & set(held)
    assert held == sorted(held) and kept == sorted(kept)
    # the definition: the first 16 of the seeded permutation
    expected = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(42)).tolist()[:16])
    assert held == expected
    assert split_heldout(64, 0.25, seed=42) == (kept, held)
    assert split_heldout(64, 0.25, seed=7)[1] != held


def test_split_heldout_rounds_and_keeps_something_to_train_on():
    assert len(split_heldout(10, 0.01, seed=0)[1]) == 1  # a positive share holds out at least one pair
    assert len(split_heldout(10, 0.26, seed=0)[1]) == 3  # round(2.6)
    with pytest.raises(ConfigError, match="data.eval_fraction 0.9 holds out 2 of 2 pairs"):
        split_heldout(2, 0.9, seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.eval_fraction", "1.0"], "data.eval_fraction must be in [0, 1)"),
        (["--data.eval_fraction", "-0.1"], "data.eval_fraction must be in [0, 1)"),
        (["--train.eval_steps", "5"], "train.eval_steps 5 evaluates an eval set, and there is none"),
        (["--train.eval_steps", "-1", "--data.eval_fraction", "0.1"], "train.eval_steps must be >= 0"),
        (["--data.eval_path", "x.jsonl"], "data.eval_path is a file in data.format, and the synthetic world"),
    ],
)
def test_eval_config_errors_name_the_fields(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_eval_fraction_and_eval_path_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(
            TINY,
            ["--data.format", "jsonl", "--data.path", "a.jsonl", "--data.eval_path", "b.jsonl"]
            + ["--data.eval_fraction", "0.1"],
        )
    assert "data.eval_fraction 0.1 and data.eval_path 'b.jsonl' both name an eval set" in str(e.value)


def test_eval_path_resolves_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "eval.jsonl").write_text("")
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  format: jsonl\n  path: held/eval.jsonl\n  eval_path: held/eval.jsonl\n")
    monkeypatch.chdir("/")
    cfg = load_config(config, check_paths=True)
    assert cfg.data.eval_path == str(tmp_path / "held" / "eval.jsonl")
    config.write_text("data:\n  format: jsonl\n  path: held/eval.jsonl\n  eval_path: held/missing.jsonl\n")
    with pytest.raises(ConfigError, match=r"data.eval_path 'held/missing.jsonl' not found: tried .*next to the config"):
        load_config(config, check_paths=True)


def test_help_lists_the_new_fields():
    text = fields_help()
    for key in ("--data.eval_fraction", "--data.eval_path", "--train.eval_steps", "--logging.tensorboard"):
        assert key in text, key
    proc = run_ddpo("train", TINY, "--help")
    assert "--data.eval_fraction 0.0" in proc.stdout and "--train.eval_steps 0" in proc.stdout
    assert "--logging.tensorboard false" in proc.stdout and "--data.eval_path null" in proc.stdout


# ----------------------------------------------------------------------------------------------
# A tiny run with data.eval_fraction 0.25 and train.eval_steps 2
# ----------------------------------------------------------------------------------------------
FRACTION_OVERRIDES = ("--train.max_steps", "4", "--data.eval_fraction", "0.25", "--train.eval_steps", "2")


@pytest.fixture(scope="module")
def fraction_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fraction") / "run"
    proc = run_ddpo(
        "train",
        TINY,
        "--train.output_dir",
        str(out),
        "--train.num_threads",
        THREADS,
        "--logging.progress_bar",
        "false",
        "--logging.tensorboard",
        "true",
        *FRACTION_OVERRIDES,
    )
    return out, proc


def _unprefixed(row: dict) -> dict:
    return {k.removeprefix("eval/"): v for k, v in row.items()}


def _train_and_eval(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]


@pytest.mark.slow
def test_eval_rows_are_logged_every_eval_steps_with_trl_names(fraction_run):
    out, _ = fraction_run
    train, evals = _train_and_eval(metrics(out))
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    rows = metrics(out)
    assert len(train) + len(evals) == len(rows)
    # at a step with both, the eval row comes first: the last row stays a train row (ddpo/sweep.py reads it)
    order = [("eval" if "eval/loss" in r else "train", r["step"]) for r in rows]
    assert order == [("train", 1), ("eval", 2), ("train", 2), ("train", 3), ("eval", 4), ("train", 4)]
    # rewards/margins is a difference of float32 sums of ~370 nats: it is exact to their rounding (logp_noise);
    # the two shares are computed in float64
    for row in train:
        assert set(TRL_NAMES) | {"rewards/margins_corrected", "rewards/margins_unchanged"} <= set(row)
        split = row["rewards/margins_corrected"] + row["rewards/margins_unchanged"]
        assert split == pytest.approx(row["rewards/margins"], abs=logp_noise(row))
    for row in evals:
        assert {f"eval/{n}" for n in TRL_NAMES} <= set(row) and not any(k in row for k in TRL_NAMES)
        split = row["eval/rewards/margins_corrected"] + row["eval/rewards/margins_unchanged"]
        assert split == pytest.approx(row["eval/rewards/margins"], abs=logp_noise(_unprefixed(row)))
    assert train[-1]["rewards/margins_corrected"] != 0 and evals[-1]["eval/rewards/margins"] != 0
    # 16 held-out pairs: an accuracy is a multiple of 1/16
    assert evals[-1]["eval/rewards/accuracies"] * 16 == pytest.approx(round(evals[-1]["eval/rewards/accuracies"] * 16))


def _naive(out: Path, positions: list[int] | None = None, fraction: float = 0.25):
    """The eval metrics recomputed from scratch: the exported policy (the model after the last step) and the
    cached reference log-probs of the held-out pairs, in one batch through DDPOLoss. With `positions`: those
    training positions' reference metrics instead (policy = reference)."""
    from ddpo import reference
    from ddpo.data.collator import PairCollator, PairDataset, PairEncoder
    from ddpo.data.formats import load_records
    from ddpo.models.build import load_model

    cfg = load_config(TINY, ["--train.output_dir", str(out), *FRACTION_OVERRIDES])
    model = load_model(out / "final").eval()
    dataset = PairDataset(
        load_records(cfg.data, seed=cfg.train.seed),
        PairEncoder.from_config(cfg.data, model.tokenizer, model.image_placeholder),
    )
    cache = out / "reference_cache"
    fp = json.loads((cache / "fingerprint.json").read_text())
    reference.attach(dataset.records, reference.read_cache(cache, fp), cache)
    kept, held = split_heldout(len(dataset), fraction, cfg.train.seed)
    collate = PairCollator(model.tokenizer.pad_token_id, image_transform=model.preprocess_images)
    batch = collate([dataset[i] for i in (held if positions is None else [kept[p] for p in positions])])
    b = batch.num_pairs
    ref = batch.ref_token_logps[:b], batch.ref_token_logps[b:]
    with torch.no_grad():
        policy = ref if positions is not None else model(batch)
        _, m = DDPOLoss(cfg.loss)(*policy, *ref, batch.answer_mask, batch.corrected)
    rows = [dataset.records[i].row_index for i in held], [dataset.records[i].row_index for i in kept]
    return {k: v.item() for k, v in m.items()}, rows


@pytest.mark.slow
def test_eval_loss_equals_a_naive_recomputation(fraction_run):
    out, _ = fraction_run
    _, evals = _train_and_eval(metrics(out))
    naive, _ = _naive(out)
    # float32 sums of ~370 nats in another batch shape: a few ulps of each sum, times beta (logp_noise)
    for name in (*TRL_NAMES, "rewards/margins_corrected", "rewards/margins_unchanged"):
        assert evals[-1][f"eval/{name}"] == pytest.approx(naive[name], abs=logp_noise(naive)), name
    assert evals[-1]["eval/loss"] != pytest.approx(math.log(2), abs=1e-3)  # the policy moved: not the reference


@pytest.mark.slow
def test_training_draws_from_the_kept_pairs_only(fraction_run):
    """The first step's batch is PairOrder's first micro-batch of the 48 kept pairs (not of all 64): its
    reference log-probs, recomputed from the kept positions, are the ones step 1 logged."""
    from ddpo.sampler import PairOrder

    out, _ = fraction_run
    train, _ = _train_and_eval(metrics(out))
    first = PairOrder(48, 4, 42).epoch_batches(0)[0]
    naive, (held_rows, kept_rows) = _naive(out, positions=first)
    assert not set(held_rows) & set(kept_rows) and len(held_rows) == 16 and len(kept_rows) == 48
    for name in ("logps/ref_chosen", "logps/ref_rejected"):
        assert train[0][name] == pytest.approx(naive[name], rel=1e-6), name


@pytest.mark.slow
def test_eval_fraction_leaves_the_reference_cache_as_a_run_without_it(fraction_run, tmp_path):
    import pyarrow.parquet as pq

    out, _ = fraction_run
    plain = tmp_path / "plain_cache"
    run_ddpo(
        "precompute-ref",
        TINY,
        "--train.output_dir",
        str(tmp_path / "pre"),
        "--train.reference_cache",
        str(plain),
        "--logging.progress_bar",
        "false",
    )
    ours = out / "reference_cache"
    assert (ours / "fingerprint.json").read_text() == (plain / "fingerprint.json").read_text()
    assert pq.read_table(ours / "logps.parquet").equals(pq.read_table(plain / "logps.parquet"))
    assert not (out / "reference_cache-eval").exists()  # held-out pairs of the same data: the one cache holds them


@pytest.mark.slow
def test_tensorboard_holds_the_train_and_eval_scalars(fraction_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = fraction_run
    train, evals = _train_and_eval(metrics(out))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins_corrected", "eval/loss", "eval/rewards/accuracies"} <= tags
    for tag, rows, key in (("train/loss", train, "loss"), ("eval/rewards/margins", evals, "eval/rewards/margins")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in events


@pytest.mark.slow
def test_summary_matches_the_last_rows(fraction_run):
    from PIL import Image

    out, proc = fraction_run
    train, evals = _train_and_eval(metrics(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train"] == train[-1] and summary["final_eval"] == evals[-1]
    counts = ("steps", "train_pairs", "eval_pairs", "pairs_trained")
    assert [summary[k] for k in counts] == [4, 48, 16, 16]
    assert summary["epochs"] == train[-1]["epoch"] == round(4 / 12, 4)
    assert summary["model_dir"] == str(out / "final") and (out / "final").is_dir()
    assert summary["config_hash"] == json.loads((out / "run.json").read_text())["config_hash"]
    assert summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0
    markdown = (out / "summary.md").read_text()
    assert markdown in proc.stdout  # printed as written
    assert f"| loss | {train[-1]['loss']:.6g} | {evals[-1]['eval/loss']:.6g} |" in markdown
    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    with Image.open(out / "summary.png") as image:
        image.verify()
    assert width > 3 * height > 0  # three panels side by side


# ----------------------------------------------------------------------------------------------
# data.eval_path: a separate file
# ----------------------------------------------------------------------------------------------
def _jsonl_config(folder: Path, eval_path: str | None) -> Path:
    """A YAML beside train/ and held/ (relative paths: resolved next to it) for the tiny model on JSONL pairs."""
    write_jsonl(folder / "train")
    held = [
        {"image": f"images/{i}.png", "question": q, "chosen": c, "rejected": r}
        for i, (q, c, r) in enumerate(reversed(PAIRS[:4]))
    ]
    write_jsonl(folder / "held", held)
    text = Path(TINY).read_text().replace("format: synthetic", "format: jsonl\n  path: train/data.jsonl")
    if eval_path:
        text = text.replace("  path: train/data.jsonl", f"  path: train/data.jsonl\n  eval_path: {eval_path}")
    text = text.replace("deepspeed/zero0.json", str(Path(TINY).parent / "deepspeed" / "zero0.json"))
    (folder / "run.yaml").write_text(text)
    return folder / "run.yaml"


@pytest.mark.slow
def test_eval_path_is_evaluated_and_leaves_training_as_it_was(tmp_path):
    common = ("--train.max_steps", "3", "--train.micro_batch_size", "2", "--train.learning_rate", "1e-3")
    base = ("--train.num_threads", THREADS, "--logging.progress_bar", "false", *common)
    with_eval = _jsonl_config(tmp_path / "a", "held/data.jsonl")
    without = _jsonl_config(tmp_path / "b", None)
    run_ddpo("train", str(with_eval), "--train.output_dir", str(tmp_path / "a" / "run"), "--train.eval_steps=2", *base)
    run_ddpo("train", str(without), "--train.output_dir", str(tmp_path / "b" / "run"), *base)
    train, evals = _train_and_eval(metrics(tmp_path / "a" / "run"))
    plain = metrics(tmp_path / "b" / "run")
    # evaluation runs without gradients, dropout or random draws: training is exactly the run without it
    assert len(train) == len(plain) == 3
    for row, other in zip(train, plain):
        assert {k: v for k, v in row.items() if k not in TIMING_KEYS} == {
            k: v for k, v in other.items() if k not in TIMING_KEYS
        }
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["eval_pairs"] == 4 and summary["train_pairs"] == 6 and summary["final_eval"] == evals[-1]
    # the eval file's reference log-probs: a cache of their own; the training cache is the run without eval's
    a_cache, b_cache = tmp_path / "a" / "run" / "reference_cache", tmp_path / "b" / "run" / "reference_cache"
    assert (a_cache / "fingerprint.json").read_text() == (b_cache / "fingerprint.json").read_text()
    eval_fp = json.loads((tmp_path / "a" / "run" / "reference_cache-eval" / "fingerprint.json").read_text())
    assert eval_fp["dataset"] != json.loads((a_cache / "fingerprint.json").read_text())["dataset"]
    assert evals[0]["eval/loss"] < math.log(2)  # lr 1e-3 on pairs the eval file repeats: it learned them


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path):
    """13 held-out pairs (0.2 x 64) over 2 ranks under ZeRO-3: 7 and 6 pairs, the short rank running an uncounted
    repeat so that both run 4 forwards; the all-reduced means equal one process's."""
    from tests.test_trainer import _deepspeed, train

    common = ("--train.max_steps", "2", "--train.learning_rate", "1e-3", "--data.eval_fraction", "0.2")
    ds_config = tmp_path / "zero3_all.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    _, single = _train_and_eval(train(tmp_path / "single", *common, "--train.micro_batch_size", "4"))
    _, multi = _train_and_eval(
        _deepspeed(
            tmp_path / "multi", 2, *common, "--train.micro_batch_size", "2", "--deepspeed.config", str(ds_config)
        )
    )
    assert [r["step"] for r in single] == [r["step"] for r in multi] == [2]  # at the end only (eval_steps 0)
    assert multi[0]["eval/rewards/accuracies"] * 13 == pytest.approx(round(multi[0]["eval/rewards/accuracies"] * 13))
    for name in TRL_NAMES:
        assert multi[0][f"eval/{name}"] == pytest.approx(
            single[0][f"eval/{name}"], abs=logp_noise(_unprefixed(single[0]))
        )
    assert json.loads((tmp_path / "multi" / "summary.json").read_text())["eval_pairs"] == 13
