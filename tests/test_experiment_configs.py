"""The full-scale experiment configs against the paper's and the released commands' hyperparameters, and
every shipped config resolved into a runnable plan (ddpo/plan.py, the trainer's own step arithmetic)."""

import math
from pathlib import Path

import pytest

from ddpo.config import ConfigError, load_config
from ddpo.plan import nominal_num_pairs, run_plan
from ddpo.trainer import Trainer, deepspeed_config

REPO = Path(__file__).resolve().parents[1]
ALL_YAMLS = sorted((REPO / "configs").rglob("*.yaml"))
EXPERIMENT_DIRS = ("rlhfv", "rlaifv", "ablations")  # the paper reproductions; tiny/synthetic configs are CPU runs

# Sources: docs/PAPER_FACTS.md §3.1 (released RLHF-V command), §3.2 (paper: §4.1 + App. C),
# §3.3 (RLAIF-V llava15_train.sh and the LoRA variant), §4.2 (Table 3, Figure 2).
PAPER = dict(
    arch="muffin",
    beta=0.5,
    gamma=5.0,
    normalize="mean",
    segments="token_diff",
    learning_rate=5e-7,
    warmup_ratio=0.1,
    lr_scheduler="cosine",
    weight_decay=0.0,
    world_size=8,
    global_batch=32,
    epochs=7.0,
    max_steps=-1,
    num_pairs=1401,
    total_steps=301,
    zero_stage=3,
    bf16="true",
    gradient_checkpointing=True,
    image_size=448,
    lora_r=0,
    freeze_vision_experts=True,
    template="vicuna_v0",
    max_length=2048,
)
RELEASED = dict(
    PAPER,
    beta=0.1,
    gamma=1.1,
    normalize="sum",
    warmup_ratio=0.03,
    global_batch=8,
    epochs=None,
    max_steps=2160,
    num_pairs=5733,
    total_steps=2160,
)
RLAIFV = dict(
    arch="llava",
    beta=0.1,
    gamma=1.0,
    normalize="sum",
    segments="none",
    learning_rate=5e-7,
    warmup_ratio=0.05,
    lr_scheduler="cosine",
    weight_decay=0.01,
    world_size=8,
    global_batch=8,
    epochs=None,
    max_steps=2672,
    num_pairs=83132,
    total_steps=2672,
    zero_stage=2,
    bf16="true",
    gradient_checkpointing=True,
    image_size=None,
    lora_r=0,
    freeze_vision_experts=False,
    template="llava_v1",
    max_length=2048,
)
EXPECTED = {
    "rlhfv/paper.yaml": PAPER,
    "rlhfv/released.yaml": RELEASED,
    "rlaifv/llava15_7b.yaml": RLAIFV,
    "rlaifv/llava15_7b_lora.yaml": dict(
        RLAIFV, learning_rate=1e-5, lora_r=64, lora_alpha=16, lora_dropout=0.05, lora_target="all-linear"
    ),
    # RLAIF-V released no 12B training script: its LLaVA-1.5 values, ZeRO-3 for 12B, OmniLMM's own template
    "rlaifv/omnilmm12b.yaml": dict(RLAIFV, arch="omnilmm", zero_stage=3, template="omnilmm"),
    # The paper's DDPO (loss, batch, warm-up) on LLaVA-1.5-7B: its model and template, 2 epochs of the 5.7k release
    "rlhfv/llava15_7b_ddpo.yaml": dict(
        PAPER,
        arch="llava",
        image_size=None,
        freeze_vision_experts=False,
        template="llava_v1",
        epochs=2.0,
        num_pairs=5733,
        total_steps=358,
    ),
    "rlhfv/llava15_7b_ddpo_lora.yaml": dict(
        PAPER,
        arch="llava",
        image_size=None,
        freeze_vision_experts=False,
        template="llava_v1",
        epochs=2.0,
        num_pairs=5733,
        total_steps=358,
        zero_stage=2,
        learning_rate=1e-5,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.05,
        lora_target="all-linear",
    ),
    "ablations/vanilla_dpo.yaml": dict(PAPER, gamma=1.0, segments="none"),
    "ablations/sum_normalization.yaml": dict(PAPER, normalize="sum"),
    "ablations/data_200.yaml": dict(PAPER, num_pairs=200, total_steps=42),
    "ablations/data_800.yaml": dict(PAPER, num_pairs=800, total_steps=175),
    "ablations/data_1400.yaml": dict(PAPER, num_pairs=1400, total_steps=301),
}
# What each ablation changes relative to configs/rlhfv/paper.yaml (train.output_dir aside).
ABLATED = {
    "ablations/vanilla_dpo.yaml": {"loss.gamma": 1.0, "data.segments": "none"},
    "ablations/sum_normalization.yaml": {"loss.normalize": "sum"},
    "ablations/data_200.yaml": {"data.max_samples": 200},
    "ablations/data_800.yaml": {"data.max_samples": 800},
    "ablations/data_1400.yaml": {"data.max_samples": 1400},
}
HUB_IDS = {
    "HaoyeZhang/RLHF-V-Dataset",
    "openbmb/RLHF-V-Dataset",
    "openbmb/RLAIF-V-Dataset",
    "llava-hf/llava-1.5-7b-hf",
    "openbmb/OmniLMM-12B",
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name DeepSpeed JSONs relative to the repository root


def _flat(cfg) -> dict:
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items() for key, value in fields.items()}


def test_every_experiment_config_is_in_the_table():
    shipped = {str(p.relative_to(REPO / "configs")) for p in ALL_YAMLS if p.parent.name in EXPERIMENT_DIRS}
    assert shipped == set(EXPECTED), "add new experiment configs to EXPECTED (with the values their source states)"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hyperparameters_match_the_paper_and_released_commands(name):
    cfg, want = load_config(REPO / "configs" / name), EXPECTED[name]
    m, d, loss, t = cfg.model, cfg.data, cfg.loss, cfg.train
    assert (m.arch, loss.beta, loss.gamma, loss.normalize, d.segments) == (
        want["arch"],
        want["beta"],
        want["gamma"],
        want["normalize"],
        want["segments"],
    )
    assert (t.learning_rate, t.warmup_ratio, t.lr_scheduler, t.weight_decay) == (
        want["learning_rate"],
        want["warmup_ratio"],
        want["lr_scheduler"],
        want["weight_decay"],
    )
    assert t.max_steps == want["max_steps"]
    if want["epochs"] is not None:
        assert t.epochs == want["epochs"]
    assert deepspeed_config(cfg, bf16=True)["zero_optimization"]["stage"] == want["zero_stage"]
    assert cfg.deepspeed.bf16 == want["bf16"] and m.gradient_checkpointing == want["gradient_checkpointing"]
    assert (m.image_size, m.freeze_vision_experts, d.template, d.max_length) == (
        want["image_size"],
        want["freeze_vision_experts"],
        want["template"],
        want["max_length"],
    )
    assert m.lora_r == want["lora_r"]
    if m.lora_r:
        assert (m.lora_alpha, m.lora_dropout, m.lora_target) == (
            want["lora_alpha"],
            want["lora_dropout"],
            want["lora_target"],
        )
    # Real hub ids; Muffin starts from the original RLHF-V SFT checkpoint.
    assert d.path in HUB_IDS
    if m.arch == "muffin":
        assert m.muffin_checkpoint and "RLHF-V_v0_SFT" in m.muffin_checkpoint and m.name_or_path is None
    else:
        assert m.name_or_path in HUB_IDS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_run_plan_reaches_the_stated_global_batch_and_steps(name):
    cfg, want = load_config(REPO / "configs" / name), EXPECTED[name]
    pairs = nominal_num_pairs(cfg)
    assert pairs == want["num_pairs"]
    plan = run_plan(cfg, pairs, world_size=want["world_size"])
    # the config's own batch settings, multiplied here, reach the stated global batch; the plan agrees
    t = cfg.train
    assert want["world_size"] * t.micro_batch_size * t.gradient_accumulation_steps == want["global_batch"]
    assert (plan.world_size, plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch) == (
        want["world_size"],
        t.micro_batch_size,
        t.gradient_accumulation_steps,
        want["global_batch"],
    )
    assert plan.total_steps == want["total_steps"]
    if want["epochs"] is not None:
        # steps = epochs x data / batch, less the tail of each epoch that fills no whole step
        assert plan.total_steps == math.ceil(want["epochs"] * (pairs // want["global_batch"]))
        assert (
            want["epochs"] * pairs / want["global_batch"] - want["epochs"]
            <= plan.total_steps
            <= want["epochs"] * pairs / want["global_batch"]
        )
    assert plan.warmup_steps == math.ceil(want["warmup_ratio"] * want["total_steps"])


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_resolves_into_a_runnable_plan(path):
    cfg = load_config(path)
    name = str(path.relative_to(REPO / "configs"))
    world = EXPECTED[name]["world_size"] if name in EXPECTED else 1
    # A local data set's size is only known once it exists (the demo writes its own): plan one full batch of it.
    t = cfg.train
    batch = world * t.micro_batch_size * t.gradient_accumulation_steps
    pairs = nominal_num_pairs(cfg) or batch
    plan = run_plan(cfg, pairs, world)
    # the expectation from the config alone: max_steps, else whole batches per epoch times the epochs
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * (pairs // batch))
    assert steps >= 1 and (plan.total_steps, plan.global_batch) == (steps, batch)
    assert plan.warmup_steps == math.ceil(t.warmup_ratio * steps) and 0 <= plan.warmup_steps < steps
    assert plan.pairs_seen == steps * batch


@pytest.mark.parametrize("name", sorted(ABLATED))
def test_ablations_differ_from_the_paper_setting_only_in_the_ablated_keys(name):
    paper, ablation = _flat(load_config(REPO / "configs/rlhfv/paper.yaml")), _flat(load_config(REPO / "configs" / name))
    diff = {k: v for k, v in ablation.items() if paper[k] != v and k != "train.output_dir"}
    assert diff == ABLATED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_headers_name_the_source_expected_numbers_hardware_and_launch(name):
    header = [line for line in (REPO / "configs" / name).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Reproduces:" in text and "Hardware:" in text and "Run plan:" in text
    assert any("--module ddpo.train" in line and f"configs/{name}" in line for line in header)
    plan = run_plan(load_config(REPO / "configs" / name), EXPECTED[name]["num_pairs"], EXPECTED[name]["world_size"])
    assert (
        f"{plan.total_steps} steps" in text or f"max_steps {plan.total_steps}" in text
    )  # the header's plan is the real one
    assert f"{plan.warmup_steps} warm-up steps" in text


@pytest.mark.parametrize(
    "num_pairs, overrides",
    [
        (100, []),
        (1401, ["--train.epochs", "7", "--train.micro_batch_size", "2", "--train.gradient_accumulation_steps", "2"]),
        (37, ["--train.epochs", "2.5", "--train.micro_batch_size", "3", "--train.warmup_ratio", "0.3"]),
        (64, ["--train.max_steps", "11", "--train.gradient_accumulation_steps", "4"]),
    ],
)
def test_run_plan_is_the_trainers_arithmetic(num_pairs, overrides):
    cfg = load_config(None, ["--data.format", "synthetic", *overrides])
    trainer = Trainer(cfg)
    trainer.dataset = range(num_pairs)  # _setup_steps only needs the length
    trainer._setup_steps()
    plan = run_plan(cfg, num_pairs, world_size=1)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (
        trainer.steps_per_epoch,
        trainer.total_steps,
        trainer.warmup_steps,
    )


def test_run_plan_numbers_and_errors():
    cfg = load_config(
        None,
        [
            "--data.format",
            "synthetic",
            "--train.epochs",
            "7",
            "--train.micro_batch_size",
            "2",
            "--train.gradient_accumulation_steps",
            "2",
            "--train.warmup_ratio",
            "0.1",
        ],
    )
    plan = run_plan(cfg, 1401, world_size=8)
    # 1401 // 32 = 43 steps/epoch (25 pairs of each epoch's tail dropped); 7 x 43 = 301; ceil(30.1) = 31
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (32, 43, 301, 31)
    assert plan.pairs_seen == 9632 and plan.epochs == pytest.approx(6.875, abs=1e-3)
    assert "global batch 32; 43 steps/epoch, 301 steps" in plan.describe()
    with pytest.raises(ConfigError, match="31 pairs cannot fill one optimizer step of global batch 32"):
        run_plan(cfg, 31, world_size=8)
