"""`ddpo push` (ddpo/hub.py), offline: a run directory as the trainer leaves it (run.json and config.yaml written
by ddpo/run_identity.py, final/, metrics.jsonl, summary.json), HfApi's network calls replaced by recorders."""

import json

import huggingface_hub
import pytest
import yaml
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ddpo import commands, hub
from ddpo.config import load_config
from ddpo.run_identity import RunStart, record

RUN_YAML = """
model:
  arch: llava
  name_or_path: llava-hf/llava-1.5-7b-hf
  gradient_checkpointing: true
  dtype: bfloat16
data:
  format: rlhf-v
  path: openbmb/RLHF-V-Dataset
  template: llava_v1
  max_samples: 1401
loss:
  beta: 0.5
  gamma: 5.0
  normalize: mean
  sft_weight: 0.2
train:
  max_steps: 301
  micro_batch_size: 2
  gradient_accumulation_steps: 2
  learning_rate: 2.0e-6
  warmup_ratio: 0.1
"""
FULL_MODEL = {
    "config.json": '{"model_type": "llava"}',
    "model.safetensors": "weights",
    "tokenizer_config.json": "{}",
    "tokenizer.json": "{}",
    "ddpo_model.json": '{"arch": "llava", "template": "llava_v1"}',
}
ROWS = [
    {"step": s, "epoch": round(s / 43, 4), "lr": 1e-6, "loss": 0.7 - s / 1000, "rewards/accuracies": 0.5 + s / 1000}
    for s in (285, 290, 295, 300, 301)
]
ROWS[-1]["rewards/margins"] = 1.234567891
SUMMARY = {"step": 301, "train": {"loss": 0.4125, "rewards/accuracies": 0.8125}, "eval": {"loss": 0.5311}}


def make_run(tmp_path, final_files=FULL_MODEL, summary=SUMMARY, rows=ROWS, yaml_text=RUN_YAML):
    run = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml_text)
    cfg = load_config(tmp_path / "c.yaml", ["--train.output_dir", str(run)])
    record(cfg, RunStart(run))  # run.json and config.yaml, as the trainer writes them
    final = run / "final"
    for name, text in final_files.items():
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        (final / name).write_text(text)
    if rows:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30')  # cut short
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's network methods recorded instead of called; HF_TOKEN set."""
    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def recorder(name, result=None):
        def method(self, *args, **kwargs):
            calls.append((name, self.token, args, kwargs))
            return result

        return method

    commit = huggingface_hub.CommitInfo(
        commit_url="https://huggingface.co/me/llava-ddpo/commit/abc123",
        commit_message="m",
        commit_description="",
        oid="abc123",
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", recorder("create_repo"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", recorder("upload_folder", commit))
    return calls


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert huggingface_hub.get_token() is None


def card_parts(run):
    text = (run / "final" / "README.md").read_text()
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body.lstrip("\n")


def table_after(body, heading):
    """The first markdown table under `heading`, as a list of rows of cells (header first)."""
    lines = body.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_push_creates_the_repo_and_uploads_final_with_its_card(tmp_path, hub_calls, capsys):
    run = make_run(tmp_path)
    (run / "final" / ".cache" / "huggingface").mkdir(parents=True)
    (run / "final" / ".cache" / "huggingface" / "x.lock").write_text("")  # hidden: stays behind
    argv = [str(run), "me/llava-ddpo", "--private", "--revision", "exp1"]
    assert commands.main(["push", *argv]) == 0
    files = sorted([*FULL_MODEL, "README.md"])
    assert [(name, token) for name, token, _, _ in hub_calls] == [
        ("create_repo", "hf_test_token"),
        ("create_branch", "hf_test_token"),
        ("upload_folder", "hf_test_token"),
    ]
    assert hub_calls[0][2:] == (("me/llava-ddpo",), {"private": True, "exist_ok": True})
    assert hub_calls[1][2:] == (("me/llava-ddpo",), {"branch": "exp1", "exist_ok": True})
    assert hub_calls[2][3] == {
        "repo_id": "me/llava-ddpo",
        "folder_path": str(run / "final"),
        "revision": "exp1",
        "commit_message": "ddpo push: run (301 steps)",
        "allow_patterns": files,
    }
    out = capsys.readouterr().out
    assert "pushed to me/llava-ddpo: https://huggingface.co/me/llava-ddpo/commit/abc123" in out
    assert f"{len(files)} files from {run / 'final'}:" in out and "  model.safetensors  (7 B)" in out


def test_public_push_to_main_leaves_visibility_and_branch_alone(tmp_path, hub_calls):
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/llava-ddpo"]) == 0
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][3] == {"private": None, "exist_ok": True}  # the owner's default visibility
    assert hub_calls[1][3]["revision"] is None


def test_card_front_matter_and_sections(tmp_path, hub_calls):
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/llava-ddpo", "--dry-run"]) == 0
    meta, body = card_parts(run)
    assert meta == {
        "library_name": "transformers",
        "base_model": "llava-hf/llava-1.5-7b-hf",
        "datasets": ["openbmb/RLHF-V-Dataset"],
        "tags": ["ddpo", "dpo", "rlhf-v", "vision-language"],
        "pipeline_tag": "image-text-to-text",
    }
    assert body.startswith(hub.CARD_MARKER + "\n\n# llava-ddpo\n")
    assert "trained on the preference pairs of `openbmb/RLHF-V-Dataset` with Dense DPO (DDPO" in body
    assert "weigh γ = 5 in each answer's log-probability" in body
    recipe = dict(table_after(body, "## Recipe")[1:])
    assert recipe["β (`loss.beta`)"] == "0.5" and recipe["γ (`loss.gamma`)"] == "5"
    assert recipe["normalisation (`loss.normalize`)"].startswith("mean: weighted mean")
    assert recipe["corrected segments (`data.segments`)"] == "token_diff"
    assert table_after(body, "Other method settings")[1:] == [["`loss.sft_weight`", "0.2"]]  # the only flag set
    data = dict(table_after(body, "## Data")[1:])
    assert data["pairs used (`data.max_samples`)"] == "1401" and data["conversation template"] == "llava_v1"
    setup = dict(table_after(body, "## Training setup")[1:])
    assert setup["optimizer steps"] == "301 (configured: max_steps 301)"
    assert setup["learning rate"] == "2e-06, cosine, warm-up ratio 0.1"
    assert setup["batch"].startswith("2 pairs per process x 2 gradient accumulation = 4 pairs per process per")
    assert 'LlavaForConditionalGeneration.from_pretrained("me/llava-ddpo"' in body
    assert 'load_model(snapshot_download("me/llava-ddpo"))' in body
    assert hub_calls == []  # a dry run uploads nothing


def test_card_metrics_are_the_summary_values(tmp_path, hub_calls):
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/x", "--dry-run"]) == 0
    _, body = card_parts(run)
    shown = {name.strip("`"): float(value) for name, value in table_after(body, "## Final metrics")[1:]}
    assert shown == {"step": 301.0, "train/loss": 0.4125, "train/rewards/accuracies": 0.8125, "eval/loss": 0.5311}


def test_card_metrics_fall_back_to_the_last_rows_of_metrics_jsonl(tmp_path, hub_calls):
    run = make_run(tmp_path, summary=None)
    assert hub.main([str(run), "me/x", "--dry-run"]) == 0
    _, body = card_parts(run)
    header, *rows = table_after(body, "## Final metrics")
    assert header == ["step", "epoch", "loss", "rewards/accuracies", "rewards/margins"]
    assert "The last 3 logged rows" in body
    for shown, source in zip(rows, ROWS[-3:], strict=True):  # the row cut short by a kill is not one of them
        values = dict(zip(header, shown, strict=True))
        assert int(values["step"]) == source["step"]
        for key in header[1:]:
            if key in source:
                assert float(values[key]) == pytest.approx(source[key], rel=1e-5)
            else:
                assert values[key] == "-"
    assert float(rows[-1][-1]) == pytest.approx(1.234567891, rel=1e-5)


def test_adapter_final_is_a_peft_card(tmp_path, hub_calls):
    adapter = {"adapter_config.json": '{"base_model_name_or_path": "llava-hf/llava-1.5-7b-hf", "r": 64}'}
    adapter["adapter_model.safetensors"] = "lora"
    lora_yaml = RUN_YAML.replace("  dtype: bfloat16\n", "  dtype: bfloat16\n  lora_r: 64\n")
    run = make_run(tmp_path, final_files=adapter, yaml_text=lora_yaml)
    assert hub.main([str(run), "me/llava-ddpo-lora"]) == 0
    meta, body = card_parts(run)
    assert (meta["library_name"], meta["base_model"]) == ("peft", "llava-hf/llava-1.5-7b-hf")
    assert body.split("\n\n")[2].startswith("LoRA adapters for [`llava-hf/llava-1.5-7b-hf`]")
    assert dict(table_after(body, "## Training setup")[1:])["parameters trained"] == (
        "LoRA r 64, α 16, dropout 0.05, on `all-linear`"
    )
    assert "from_pretrained" not in body  # the adapters load through ddpo (base + adapters)
    assert hub_calls[-1][3]["allow_patterns"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_local_base_and_data_stay_out_of_the_front_matter(tmp_path, hub_calls):
    base, data = tmp_path / "ckpt" / "my-sft", tmp_path / "prefs.jsonl"
    base.mkdir(parents=True)
    data.write_text("")
    local = RUN_YAML.replace("llava-hf/llava-1.5-7b-hf", str(base)).replace("openbmb/RLHF-V-Dataset", str(data))
    run = make_run(tmp_path, yaml_text=local.replace("format: rlhf-v", "format: jsonl"))
    assert hub.main([str(run), "me/x", "--dry-run"]) == 0
    meta, body = card_parts(run)
    assert "base_model" not in meta and "datasets" not in meta
    assert "a local checkpoint (`my-sft`)" in body and str(tmp_path) not in body  # no path of the trainer's disk


def test_dry_run_needs_no_token_and_lists_the_files(tmp_path, no_token, capsys):
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split("  (")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == sorted([*FULL_MODEL, "README.md"])
    assert "dry run: nothing uploaded" in out and (run / "final" / "README.md").is_file()


def test_no_token_refuses_before_writing_anything(tmp_path, no_token, capsys):
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/x"]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "`hf auth login`" in err
    assert not (run / "final" / "README.md").exists()


def test_a_readme_of_the_users_own_is_kept(tmp_path, hub_calls, capsys):
    run = make_run(tmp_path)
    (run / "final" / "README.md").write_text("# My card\n")
    assert hub.main([str(run), "me/x"]) == 0
    assert (run / "final" / "README.md").read_text() == "# My card\n"
    assert "kept (it has no ddpo marker line" in capsys.readouterr().out
    assert "README.md" in hub_calls[-1][3]["allow_patterns"]


def test_a_generated_card_is_rewritten(tmp_path, hub_calls):
    run = make_run(tmp_path)
    (run / "final" / "README.md").write_text(f"old\n{hub.CARD_MARKER}\n")
    assert hub.main([str(run), "me/x", "--dry-run"]) == 0
    assert card_parts(run)[0]["library_name"] == "transformers"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: __import__("shutil").rmtree(run / "final"), "final not found: the trainer writes final/"),
        (lambda run: (run / "final" / "model.safetensors").unlink(), "is incomplete: no weights (model.safetensors"),
        (lambda run: (run / "final" / "model.safetensors").write_text(""), "is incomplete: no weights"),
        (lambda run: (run / "final" / "config.json").unlink(), "is incomplete: no config.json"),
        (lambda run: (run / "final" / "tokenizer_config.json").unlink(), "is incomplete: no tokenizer"),
        (lambda run: (run / "run.json").write_text("{not json"), "run.json cannot be read (JSONDecodeError"),
        (
            lambda run: [(run / n).unlink() for n in ("run.json", "config.yaml")],
            "holds no run.json or config.yaml, so the run's config",
        ),
        (lambda run: (run / "summary.json").write_text("{"), "summary.json cannot be read"),
    ],
    ids=[
        "no-final",
        "no-weights",
        "empty-weights",
        "no-config",
        "no-tokenizer",
        "bad-run-json",
        "no-record",
        "bad-sum",
    ],
)
def test_a_run_that_cannot_be_pushed_is_refused_naming_it(tmp_path, hub_calls, capsys, damage, message):
    run = make_run(tmp_path)
    damage(run)
    assert hub.main([str(run), "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpo push: error: ") and message in err
    assert hub_calls == []


def test_sharded_weights_need_every_shard(tmp_path, hub_calls, capsys):
    files = {k: v for k, v in FULL_MODEL.items() if k != "model.safetensors"}
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": shards})
    files[shards["a"]] = "w"
    run = make_run(tmp_path, final_files=files)
    assert hub.main([str(run), "me/x"]) == 1
    assert "shards named in model.safetensors.index.json are missing: model-00002-of-00002" in capsys.readouterr().err
    (run / "final" / shards["b"]).write_text("w")
    assert hub.main([str(run), "me/x"]) == 0


def test_an_adapter_on_a_local_base_is_refused(tmp_path, hub_calls, capsys):
    """A random-init LoRA run's adapter names RUN_DIR/base: pushed alone, nobody could apply it."""
    base = tmp_path / "run" / "base"
    adapter = {
        "adapter_config.json": json.dumps({"base_model_name_or_path": str(base)}),
        "adapter_model.safetensors": "w",
    }
    run = make_run(tmp_path, final_files=adapter)
    assert hub.main([str(run), "me/x"]) == 1
    assert capsys.readouterr().err == (
        f"ddpo push: error: {run / 'final'} holds LoRA adapters on the local base {base}, which no one downloading "
        f"them can reach: write the merged model (`ddpo export {run} --merge`) and upload {run / 'final-merged'} "
        "(`hf upload REPO_ID DIR`), or train the adapters on a hub model (model.name_or_path 'owner/name')\n"
    )
    assert hub_calls == []


def test_adapter_config_without_weights_is_incomplete(tmp_path, hub_calls, capsys):
    run = make_run(tmp_path, final_files={"adapter_config.json": "{}"})
    assert hub.main([str(run), "me/x"]) == 1
    assert "an adapter_config.json but no adapter weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, first_line",
    [
        ("http", "403 Forbidden: you cannot write to me/x"),
        (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), "Cannot reach"),
    ],
)
def test_an_upload_error_is_one_message(tmp_path, hub_calls, monkeypatch, capsys, error, first_line):
    if error == "http":
        httpx = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client (2.x)
        request = httpx.Request("POST", "https://huggingface.co/api/me/x/commit/main")
        error = HfHubHTTPError(first_line, response=httpx.Response(403, request=request))

    def refuse(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    run = make_run(tmp_path)
    assert hub.main([str(run), "me/x"]) == 1
    err = capsys.readouterr().err
    assert f"to me/x failed: {first_line}" in err and "write access" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        hub.main([str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        hub.main([str(tmp_path), "not a/valid//id"])
    assert e.value.code == 2 and "is not a hub repository id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        commands.main(["push", "--help"])
    assert e.value.code == 0 and "HF_TOKEN" in capsys.readouterr().out


def test_hub_ids_and_local_paths(tmp_path):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert hub.is_hub_id("llava-hf/llava-1.5-7b-hf") and hub.is_hub_id("openbmb/RLHF-V-Dataset")
    assert not hub.is_hub_id("/abs/path/model") and not hub.is_hub_id("data/prefs.jsonl")
    assert not hub.is_hub_id(None) and not hub.is_hub_id("single-name")
    assert not hub.is_hub_id(str(tmp_path / "owner" / "name"))
