"""The `ddpo` command line as a tool, in-process: usage and exit codes, each subcommand's --help, the fields
with a config's values, user errors (model loads, out-of-memory) as one message. End-to-end runs of the same
mistakes: tests/test_faults.py ("errors in a few lines, relative paths, the command line")."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpo import cli, commands
from ddpo.config import ConfigError, load_config
from ddpo.data.images import DataError
from ddpo.models import build
from ddpo.models.build import ModelLoadError, build_model, load_config_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


# --- usage and exit codes ------------------------------------------------------------------------------------
def test_ddpo_without_a_command_prints_the_usage_on_stderr_and_exits_2(capsys):
    assert commands.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: ddpo COMMAND") and "  eval " in err


def test_ddpo_help_prints_the_usage_on_stdout_and_exits_0(capsys):
    assert commands.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: ddpo COMMAND") and "  sweep " in out


def test_an_unknown_command_exits_2(capsys):
    assert commands.main(["trian"]) == 2
    assert "ddpo: unknown command 'trian'; commands are train, precompute-ref" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train", "precompute-ref"])
def test_a_config_command_without_its_config_prints_the_usage_and_exits_2(capsys, name):
    assert commands.main([name]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"usage: ddpo {name} CONFIG.yaml")
    assert err.splitlines()[1] == f"ddpo {name}: the first argument is the config YAML"


def test_an_override_before_the_config_names_the_config_argument(capsys):
    assert commands.main(["train", "--loss.gamma", "3"]) == 2
    assert "ddpo train: the first argument is the config YAML; got '--loss.gamma' first" in capsys.readouterr().err


def test_a_missing_config_file_is_a_config_error(capsys, tmp_path):
    assert commands.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert f"ddpo train: config error: config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


# --- help ------------------------------------------------------------------------------------------------------
def test_train_help_lists_every_field_with_its_default(capsys):
    assert commands.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ddpo train CONFIG.yaml") and "  --train.max_steps (int, default -1)" in out


def test_train_config_help_lists_the_configs_values_and_trains_nothing(capsys, tmp_path):
    out_dir = tmp_path / "never"
    argv = ["train", TINY, "--loss.gamma", "3", "--train.output_dir", str(out_dir), "--help"]
    assert commands.main(argv) == 0
    out = capsys.readouterr().out
    assert f"Fields, with their values in {TINY} --loss.gamma 3" in out
    assert "  --loss.gamma 3.0  (" in out and "  --train.max_steps 8  (int, default -1)" in out
    assert not out_dir.exists()


def test_config_help_works_before_the_configs_inputs_exist(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  format: trl\n  path: later/pairs.jsonl\n")
    assert commands.main(["train", str(tmp_path / "c.yaml"), "-h"]) == 0
    assert '  --data.path "later/pairs.jsonl"  (' in capsys.readouterr().out
    assert commands.main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "config error: data.path 'later/pairs.jsonl' not found: tried " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["eval", "demo", "score", "sweep", "convert"])
def test_each_wing_help_names_its_own_command(capsys, name):
    with pytest.raises(SystemExit) as exit_:
        commands.main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ddpo {name} ")


def test_ddpo_help_imports_no_heavy_library():
    """What makes `ddpo --help` answer in a blink (0.1 s, against 5.5 s when every wing was imported first)."""
    check = (
        "import sys; from ddpo.commands import main; main(['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'deepspeed') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, cwd=REPO)


# --- user errors: one message, exit 1; the traceback behind --debug -------------------------------------------
def _failing(error: Exception):
    def run(cfg):
        raise error

    return run


@pytest.mark.parametrize(
    "error, message",
    [
        (DataError("row 3 of x.jsonl: no image"), "row 3 of x.jsonl: no image"),
        (ModelLoadError("model.name_or_path", "a/b", "gone"), "model.name_or_path 'a/b': gone"),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of memory (CUDA out of memory.",
        ),
        (MemoryError(), "out of memory (MemoryError): lower train.micro_batch_size"),
    ],
)
def test_a_user_error_is_one_message_and_exit_code_1(capsys, error, message):
    cfg = load_config(TINY)
    assert cli.run_reporting_errors("train", _failing(error), cfg, debug=False) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"ddpo train: error: {message}"), lines
    assert lines[1] == "(--debug or DDPO_DEBUG=1 shows the traceback)"
    with pytest.raises(type(error)):
        cli.run_reporting_errors("train", _failing(error), cfg, debug=True)


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        cli.run_reporting_errors("train", _failing(KeyError("x")), load_config(TINY), debug=False)


def test_debug_is_read_from_the_command_line_and_the_environment(monkeypatch):
    monkeypatch.delenv("DDPO_DEBUG", raising=False)
    assert cli.debug_requested(["x.yaml", "--debug"]) and not cli.debug_requested(["x.yaml"])
    monkeypatch.setenv("DDPO_DEBUG", "1")
    assert cli.debug_requested(["x.yaml"])


# --- model loads: what models/build.py raises ------------------------------------------------------------------
def _model_cfg(*overrides: str):
    return load_config(None, ["--data.format", "synthetic", *overrides]).model


def test_an_unknown_hub_id_offline_names_the_key_and_the_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        build_model(_model_cfg("--model.name_or_path", "no-such-org/no-such-model"))
    assert str(info.value).startswith(
        "model.name_or_path 'no-such-org/no-such-model': no such file or directory: "
    ) and str(info.value).endswith(
        "as a hub id, it is not in the local hub cache, and HF_HUB_OFFLINE=1 reads nothing else: download it first "
        "where there is network (`huggingface-cli download no-such-org/no-such-model`) or unset HF_HUB_OFFLINE"
    )
    with pytest.raises(ModelLoadError, match=r"^model.tokenizer 'no-such-org/no-such-tok': no such file"):
        load_config_tokenizer(_model_cfg("--model.tokenizer", "no-such-org/no-such-tok"))


def test_a_folder_that_holds_no_checkpoint_is_named(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        build_model(_model_cfg("--model.name_or_path", str(tmp_path)))
    assert str(info.value) == (
        f"model.name_or_path '{tmp_path}': {tmp_path} is a folder but holds no config.json or adapter_config.json: "
        "point it at a checkpoint"
    )


def test_out_of_memory_while_building_names_the_model_and_the_ways_out(monkeypatch):
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")

    monkeypatch.setattr(build, "_random_init", too_big)
    with pytest.raises(ModelLoadError) as info:
        build_model(_model_cfg("--model.preset", "bench"))
    assert str(info.value) == (
        "model.preset 'bench': out of memory while building or loading it (CUDA out of memory. Tried to allocate "
        f"26.00 GiB): {build.OUT_OF_MEMORY_AT_LOAD}"
    )


def test_a_vision_feature_layer_the_tower_lacks_is_a_config_error():
    from ddpo.data.tokenizer import build_word_tokenizer

    with pytest.raises(ConfigError, match=r"model.vision_feature_layer 7 is out of range .* 2-layer vision tower"):
        build_model(_model_cfg("--model.vision_feature_layer", "7"), tokenizer=build_word_tokenizer(["a b"]))
