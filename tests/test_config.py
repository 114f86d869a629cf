"""Typed config: YAML loading, command-line overrides, validation messages, every shipped YAML loads."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ddpo.config import SECTIONS, Config, ConfigError, fields_help, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
ALL_YAMLS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_directory_has_yamls():
    assert ALL_YAMLS, "configs/ must ship YAML experiments"


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # YAMLs name deepspeed JSONs relative to the repo root
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "loss:\n  beta: 0.1\n  gamma: 1.1\n  normalize: sum\n"
        "train:\n  learning_rate: 5e-7\n  max_steps: 10\n"
        "data:\n  format: synthetic\n"
    )
    cfg = load_config(path, ["--loss.gamma", "5", "--train.seed=7", "--model.name_or_path", "null"])
    assert (cfg.loss.beta, cfg.loss.gamma, cfg.loss.normalize) == (0.1, 5.0, "sum")
    assert cfg.train.learning_rate == 5e-7 and isinstance(
        cfg.train.learning_rate, float
    )  # YAML 1.1 reads 5e-7 as a string
    assert cfg.train.seed == 7 and cfg.train.max_steps == 10 and cfg.model.name_or_path is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--data.format", "synthetic", "--loss.gamma", "2", "--deepspeed.zero_stage", "3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--loss.gama", "2"], "unknown config key 'loss.gama': loss has beta, gamma"),
        (["--los.gamma", "2"], "section one of model, data, loss"),
        (["--loss.normalize", "avg"], "loss.normalize: expected one of 'mean', 'sum', got 'avg'"),
        (["--train.max_steps", "ten"], "train.max_steps: expected an integer, got 'ten'"),
        (["--model.freeze_llm", "maybe"], "model.freeze_llm: expected a boolean"),
        (["--loss.gamma", "0.5"], "loss.gamma must be >= 1"),
        (["--loss.beta", "0"], "loss.beta must be > 0"),
        (
            ["--loss.loss_type", "ipo", "--loss.label_smoothing", "0.1"],
            "label_smoothing is only defined for loss.loss_type 'sigmoid'",
        ),
        (["--data.format", "rlhf-v"], "data.path is required for data.format 'rlhf-v'"),
        (["--loss.reference_free", "true"], "loss.reference_free needs no reference"),
        (["--model.freeze_vision_experts", "true"], "applies to model.arch 'muffin' only"),
        (["--deepspeed.config", "nope.json"], "deepspeed.config: file not found"),
        (["--train.resume", "/no/such/dir"], "train.resume must be 'none', 'auto' or an existing checkpoint directory"),
        (["--data.template", "llava_v1", "--data.label_span", "muffin"], "data.label_span 'muffin' labels vicuna_v0's"),
        (
            ["--data.segments", "word_diff", "--data.segment_diff", "muffin"],
            "data.segment_diff 'muffin' is the released token-id diff",
        ),
        (["--loss.sft_form", "sum"], "loss.sft_form: expected one of 'token_mean', 'released'"),
        (["--model.image_mode", "squash"], "model.image_mode: expected one of"),
        (["loss.gamma", "2"], "overrides look like --<section>.<field> VALUE"),
        (["--loss.gamma"], "needs a value"),
    ],
)
def test_bad_values_fail_with_actionable_messages(overrides, message):
    base = ["--data.format", "synthetic"] if not any(o == "--data.format" for o in overrides) else []
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, base + overrides)
    assert message in str(info.value)


def test_unknown_yaml_section_and_key_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"a.yaml: unknown section 'optim'"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"b.yaml: unknown config key 'train.lr'"):
        load_config(tmp_path / "b.yaml")


def test_every_field_is_documented_in_help():
    text = fields_help()
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
            assert f"--{name}.{f.name} " in text


@pytest.mark.slow
def test_train_help_from_the_console():
    out = subprocess.run(
        [sys.executable, "-m", "ddpo", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for key in (
        "--train.output_dir",
        "--train.max_steps",
        "--train.save_steps",
        "--train.resume",
        "--train.seed",
        "--train.reference",
        "--loss.beta",
        "--loss.gamma",
        "--loss.normalize",
        "--loss.loss_type",
    ):
        assert key in out


@pytest.mark.slow
def test_train_with_bad_config_exits_2_and_names_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("loss:\n  gamma: 0\n")
    run = subprocess.run(
        [sys.executable, "-m", "ddpo", "train", str(tmp_path / "c.yaml")], capture_output=True, text=True
    )
    assert run.returncode == 2 and "loss.gamma must be >= 1" in run.stderr


def test_attn_implementation_choices():
    cfg = load_config(None, ["--data.format", "synthetic", "--model.attn_implementation", "flex_attention"])
    assert cfg.model.attn_implementation == "flex_attention"
    with pytest.raises(ConfigError, match="model.attn_implementation.*flex_attention"):
        load_config(None, ["--data.format", "synthetic", "--model.attn_implementation", "flash_attention_2"])
