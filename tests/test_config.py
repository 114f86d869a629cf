"""Typed config: YAML loading, command-line overrides, validation messages, every shipped YAML loads."""

import dataclasses
import re
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
        (["--deepspeed.config", "nope.json"], "deepspeed.config 'nope.json' not found: tried "),
        (["--model.patch_size", "0"], "model.patch_size must be > 0"),
        (["--train.resume", "/no/such/dir"], "train.resume '/no/such/dir' not found: no such file or folder"),
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


# --- relative paths: next to the config file, else the working directory -----------------------------------
def _layout(tmp_path, monkeypatch, yaml_text: str) -> Path:
    """A config folder (tmp/cfg) and a separate working directory (tmp/work, the cwd); returns the YAML."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "cfg" / "run.yaml").write_text(yaml_text)
    return tmp_path / "cfg" / "run.yaml"


def test_relative_input_paths_are_found_next_to_the_config_then_in_the_working_directory(tmp_path, monkeypatch):
    config = _layout(
        tmp_path,
        monkeypatch,
        "data:\n  format: trl\n  path: pairs.jsonl\n  image_dir: images\n"
        "model:\n  tokenizer: tok\n"
        "deepspeed:\n  config: ds.json\n"
        "train:\n  output_dir: runs/x\n  reference_cache: cache\n",
    )
    for beside in ("pairs.jsonl", "ds.json", "tok/tokenizer.json"):
        (tmp_path / "cfg" / beside).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cfg" / beside).write_text("{}")
    (tmp_path / "work" / "images").mkdir()  # only in the working directory
    (tmp_path / "work" / "tok").mkdir()  # in both: the config's folder wins
    cfg = load_config(config, check_paths=True)
    assert cfg.data.path == str(tmp_path / "cfg" / "pairs.jsonl")
    assert cfg.deepspeed.config == str(tmp_path / "cfg" / "ds.json")
    assert cfg.model.tokenizer == str(tmp_path / "cfg" / "tok")
    assert cfg.data.image_dir == "images"  # found in the working directory: as written
    # outputs are written where the command runs, whatever exists next to the config
    (tmp_path / "cfg" / "runs" / "x").mkdir(parents=True)
    assert load_config(config).train.output_dir == "runs/x" and cfg.train.reference_cache == "cache"


def test_the_resolved_config_reloads_from_anywhere(tmp_path, monkeypatch):
    config = _layout(tmp_path, monkeypatch, "data:\n  format: synthetic\ndeepspeed:\n  config: ds.json\n")
    (tmp_path / "cfg" / "ds.json").write_text("{}")
    cfg = load_config(config)
    save_config(cfg, tmp_path / "work" / "resolved.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "work" / "resolved.yaml") == cfg


def test_a_relative_path_found_nowhere_names_both_places_tried(tmp_path, monkeypatch):
    config = _layout(tmp_path, monkeypatch, "data:\n  format: jsonl\n  path: pairs.jsonl\n  image_dir: images\n")
    (tmp_path / "cfg" / "pairs.jsonl").write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(config, check_paths=True)
    message = str(info.value)
    assert message.startswith("data.image_dir 'images' not found: tried ")
    assert f"{tmp_path / 'cfg' / 'images'} (next to the config file)" in message
    assert f"{tmp_path / 'work' / 'images'} (the working directory)" in message
    assert load_config(config).data.image_dir == "images"  # a library caller may create its inputs later


def test_a_command_line_path_is_relative_to_the_working_directory_only(tmp_path, monkeypatch):
    config = _layout(tmp_path, monkeypatch, "data:\n  format: synthetic\n")
    (tmp_path / "cfg" / "ds.json").write_text("{}")
    with pytest.raises(
        ConfigError, match=r"deepspeed.config 'ds.json' not found: tried .*work/ds.json \(a command-line"
    ):
        load_config(config, ["--deepspeed.config", "ds.json"])
    (tmp_path / "work" / "ds.json").write_text("{}")
    assert load_config(config, ["--deepspeed.config", "ds.json"]).deepspeed.config == "ds.json"


@pytest.mark.parametrize("key", ["data.path", "model.name_or_path", "model.tokenizer"])
def test_a_hub_id_stays_a_hub_id(tmp_path, monkeypatch, key):
    section, name = key.split(".")
    extra = "  format: rlhf-v\n" if section == "data" else ""
    config = _layout(
        tmp_path,
        monkeypatch,
        f"data:\n  format: rlhf-v\n  path: x/y\n{section}:\n{extra}  {name}: openbmb/RLHF-V-Dataset\n",
    )
    assert getattr(getattr(load_config(config, check_paths=True), section), name) == "openbmb/RLHF-V-Dataset"


@pytest.mark.parametrize("value", ["pairs.jsonl", "./pairs", "data/rlhfv/pairs"])
def test_a_data_path_that_cannot_be_a_hub_id_must_exist(tmp_path, monkeypatch, value):
    config = _layout(tmp_path, monkeypatch, f"data:\n  format: trl\n  path: {value}\n")
    with pytest.raises(ConfigError, match=rf"data.path '{re.escape(value)}' not found: tried "):
        load_config(config, check_paths=True)


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("loss:\n  gamma: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: "):
        load_config(tmp_path / "c.yaml")


def test_fields_help_with_a_config_shows_its_values():
    cfg = load_config(None, ["--data.format", "synthetic", "--loss.gamma", "3"])
    text = fields_help(cfg)
    assert "--loss.gamma 3.0  (" in text and '--data.format "synthetic"  (' in text
    assert "Relative: next to the config file if there, else the working directory." in text
