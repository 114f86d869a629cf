"""The fault and misuse suite: every everyday mistake a user can make ends in a named error (exit code and
message asserted, files left as they were) or in the correct result — never in a silent wrong one.
docs/TROUBLESHOOTING.md lists each message and its fix. Mistakes covered elsewhere: a damaged
checkpoint (tests/test_checkpoint.py), a longer max_steps on resume (tests/test_checkpoint.py), malformed
rows (tests/data/test_formats.py, tests/test_cli_errors.py)."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_trainer import TINY, run_ddpo, train

# --- run identity: output directories, resume, caches, sweeps ---
# One tiny run per test (2 steps on 16 pairs); a refused start stops before the model is built.
IDENTITY_RUN = ("--train.max_steps", "2", "--data.synthetic_pairs", "16", "--train.save_steps", "1")


def _files(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _error(proc) -> str:
    """The one user-facing error of a failed `ddpo` command (its first line onwards, without the --debug hint)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.split(": error: ", 1)[1].split("\n(--debug", 1)[0]


@pytest.mark.slow
def test_a_run_with_another_config_never_touches_the_earlier_run(tmp_path):
    """gamma 5 trained and pruned in `run`; gamma 1 pointed at it (resuming, or not) is refused before anything is
    written, naming the field and the ways on; train.overwrite_output_dir moves the gamma-5 run aside whole."""
    out = tmp_path / "run"
    train(out, *IDENTITY_RUN, "--train.save_total_limit", "1")
    before = _files(tmp_path)
    for resume in ("auto", "none"):
        proc = run_ddpo(
            "train", TINY, "--train.output_dir", str(out), *IDENTITY_RUN, "--loss.gamma", "1",
            "--train.resume", resume, "--logging.progress_bar", "false", expect_ok=False,
        )  # fmt: skip
        assert proc.returncode == 1
        message = _error(proc)
        assert message.startswith(f"{out} holds a run of another config (its run.json): loss.gamma 5.0 -> 1.0.\n")
        assert "train.resume auto" in message and "train.output_dir" in message
        assert "train.overwrite_output_dir true" in message
        assert _files(tmp_path) == before  # no config.yaml rewrite, cache, checkpoint, prune or metrics row
    logged = train(out, *IDENTITY_RUN, "--loss.gamma", "1", "--train.overwrite_output_dir", "true")
    (moved,) = tmp_path.glob("run.replaced-*")
    assert _files(moved) == {name.removeprefix("run/"): digest for name, digest in before.items()}
    assert [m["step"] for m in logged] == [1, 2]  # a new run from step 1, not the gamma-5 run resumed
    assert json.loads((out / "run.json").read_text())["config"]["loss"]["gamma"] == 1.0


@pytest.mark.slow
def test_precompute_ref_never_replaces_another_models_cache(tmp_path):
    cache = tmp_path / "cache"
    common = ("--train.output_dir", str(tmp_path / "pre"), "--train.reference_cache", str(cache))
    run_ddpo("precompute-ref", TINY, *common, "--data.synthetic_pairs", "16", "--logging.progress_bar", "false")
    before = _files(tmp_path)
    proc = run_ddpo("precompute-ref", TINY, *common, "--data.synthetic_pairs", "24", expect_ok=False)
    assert proc.returncode == 1
    message = _error(proc)
    assert message.startswith(f"reference cache {cache} holds the log-probs of another model or data (")
    assert "dataset: cache '" in message and "train.reference_cache" in message
    assert _files(tmp_path) == before  # nor a config.yaml in train.output_dir: precompute-ref claims no run


@pytest.mark.slow
def test_a_sweep_point_holding_another_config_is_an_error_not_a_skip(tmp_path):
    spec = yaml.safe_load((Path(TINY).parents[1] / "experiments" / "sweeps" / "tiny.yaml").read_text())
    spec.update(output_dir=str(tmp_path / "sweep"), grid={"loss.gamma": [5.0]}, seeds=None)
    spec["overrides"].update({"train.max_steps": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_ddpo("sweep", str(tmp_path / "spec.yaml"))
    spec["overrides"].update({"train.learning_rate": 1e-3})  # the spec changed after its point finished
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    before = _files(tmp_path / "sweep")
    proc = run_ddpo("sweep", str(tmp_path / "spec.yaml"), expect_ok=False)
    assert proc.returncode == 2 and ": done" not in proc.stdout
    assert f"{tmp_path / 'sweep' / 'gamma=5.0'} holds a run of another config (its run.json)" in proc.stderr
    assert "train.learning_rate 0.0001 -> 0.001" in proc.stderr and "train.overwrite_output_dir: true" in proc.stderr
    assert _files(tmp_path / "sweep") == before


# --- prompts in full, images found where the message says ---
# A tiny TRL dataset as JSON lines: image paths relative to its folder (images/<i>.png), prompts of `turns` user
# turns, the earlier ones answered, the image part in the first. Words the tiny model's tokenizer learns.
TRL_TEXTS = [
    ("Describe the image in detail .", "there is a red circle at the top left .", "there is a blue circle ."),
    ("What is in the picture ?", "a cat and a dog are in the center .", "a cat and a frisbee are in the center ."),
    ("How many objects are there ?", "there is one object .", "there are four objects ."),
    ("What is in the picture ?", "a blue square is in the center .", "a red square is in the center ."),
]


def _trl_data(folder: Path, turns: int = 1) -> Path:
    from PIL import Image

    def message(role: str, text: str, image: bool = False) -> dict:
        return {"role": role, "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}

    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (8, 6), (30 * i, 255 - 30 * i, 90)).save(folder / "images" / f"{i}.png")
        question, chosen, rejected = TRL_TEXTS[i % 4]
        earlier = [TRL_TEXTS[(i + k + 1) % 4] for k in range(turns - 1)]
        prompt = [
            m for k, (q, a, _) in enumerate(earlier) for m in (message("user", q, k == 0), message("assistant", a))
        ]
        rows.append(
            {
                "prompt": [*prompt, message("user", question, turns == 1)],
                "chosen": [message("assistant", chosen)],
                "rejected": [message("assistant", rejected)],
                "images": [f"images/{i}.png"],
            }
        )
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "pairs.jsonl"


TRL_RUN = ("--data.format", "trl", "--train.max_steps", "2")


@pytest.mark.slow
def test_trl_image_paths_are_looked_up_in_data_image_dir(tmp_path):
    """The missing image's message names the row, the path tried and data.image_dir; setting it trains."""
    data = _trl_data(tmp_path / "data")
    (tmp_path / "pictures").mkdir()
    (tmp_path / "data" / "images").rename(tmp_path / "pictures" / "images")
    out = tmp_path / "run"
    proc = run_ddpo(
        "train", TINY, "--train.output_dir", str(out), *TRL_RUN, "--data.path", str(data),
        "--logging.progress_bar", "false", expect_ok=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert _error(proc).strip() == (
        f"row 0 of {data}, field 'images': image file not found: {tmp_path / 'data' / 'images' / '0.png'} (the row's "
        f"'images/0.png' relative to {tmp_path / 'data'}, the folder of data.path, as data.image_dir is unset); fix "
        "the row's path, or set data.image_dir to the folder its image paths are relative to"
    )
    logged = train(out, *TRL_RUN, "--data.path", str(data), "--data.image_dir", str(tmp_path / "pictures"))
    assert [m["step"] for m in logged] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("template", ["vicuna_v0", "llava_v1"])
def test_multi_turn_prompts_train_with_every_turn(tmp_path, template):
    """3-turn prompts train (the earlier turns in the prompt, unlabelled); a prompt the format cannot carry, one
    that ends with an assistant turn, is an error naming its row, not a cut."""
    data = _trl_data(tmp_path / "data", turns=3)
    out = tmp_path / "run"
    logged = train(out, *TRL_RUN, "--data.path", str(data), "--data.template", template)
    assert [m["step"] for m in logged] == [1, 2]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[5]["prompt"].append(rows[5]["chosen"][0])
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = run_ddpo(
        "train", TINY, "--train.output_dir", str(tmp_path / "run2"), *TRL_RUN, "--data.path", str(data),
        "--logging.progress_bar", "false", expect_ok=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert _error(proc).strip() == (
        f"row 5 of {data}, field 'prompt': the last message is 'assistant', not 'user'; the prompt must end with the "
        "user turn that 'chosen' and 'rejected' answer"
    )


# --- parse failures are failures ---
# Answers no parser can read get an error naming their count and the first of them, never a score: read as
# saying nothing, they would show 0.0 hallucination.
UNREADABLE = ["The image shows a red circle.", "Sure! Here is a description of the image:", "I see some shapes."]


def test_unparseable_synthetic_answers_are_an_error_never_zero_hallucination(tmp_path, capsys):
    from ddpo.eval.cli import main as eval_main

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"index": i, "answer": a}) + "\n" for i, a in enumerate(UNREADABLE)))
    out = tmp_path / "out.json"
    argv = ["--benchmark", "synthetic", "--answers", str(answers), "--output", str(out), "--num-images", "3"]
    before = _files(tmp_path)
    for limit in ([], ["--max-unparsed", "0.99"]):  # even the highest limit refuses a run with nothing parsed
        assert eval_main(argv + limit) == 1
        assert capsys.readouterr().err == (
            "ddpo eval: error: synthetic evaluation: 3 of 3 answers (100.0%) are unparsed (a sentence fits no rule "
            f"of the world's grammar), more than max_unparsed {0.99 if limit else 0.05} allows (--max-unparsed), so "
            "no score is given. First 3: answer 0: 'The image shows a red circle.'; answer 1: 'Sure!'; answer 2: "
            "'I see some shapes.'. Fix: score answers of a model trained on this world, generated with its "
            "template and enough new tokens to finish the last sentence (ddpo eval: --template, --max-new-tokens); "
            "to score the parsed answers anyway, raise max_unparsed (below 1).\n"
        )
        assert _files(tmp_path) == before  # no OUT.json, no OUT.samples.jsonl


def test_the_lab_names_the_split_of_unparseable_answers():
    from ddpo.data.synthetic.metrics import UnparsedError
    from ddpo.lab.evaluation import evaluate_model
    from ddpo.lab.settings import DemoSettings

    class Babbler:  # a model that writes text outside the world's grammar
        def generate(self, images, prompts, options):
            return [UNREADABLE[k % 3] for k in range(len(prompts))]

    with pytest.raises(UnparsedError) as caught:
        evaluate_model(Babbler(), DemoSettings.quick(), "val", 4, "llava_v1", temperature=0.7)
    assert str(caught.value).startswith("val split, sampled at T 0.7: synthetic evaluation: 4 of 4 answers (100.0%)")
    assert str(caught.value).endswith("In the lab that limit is DemoSettings.max_unparsed.")
    assert caught.value.examples[0] == ("answer 0", "The image shows a red circle.")


# --- errors in a few lines, relative paths, the command line ---
# A config with relative paths trains from any working directory; what a model load, a missing input or the
# command line gets wrong ends in one message (exit 2: config or usage, 1: the run), the traceback behind --debug.
def _ddpo_from(cwd: Path, *args: str):
    """`python -m ddpo ARGS` started in `cwd` (run_ddpo starts in the repository root), offline, one thread."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(TINY).parents[1]),
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "ddpo", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def _relative_config(folder: Path, **sections: dict) -> Path:
    """configs/tiny.yaml, with `sections` merged in, written as folder/run.yaml."""
    cfg = yaml.safe_load(Path(TINY).read_text())
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "run.yaml"


@pytest.mark.slow
def test_a_config_with_relative_paths_trains_from_another_working_directory(tmp_path):
    """data.path and deepspeed.config next to the config, output_dir in the working directory."""
    folder = tmp_path / "experiment"
    _trl_data(folder)  # pairs.jsonl + images/, image paths relative to it
    (folder / "zero0.json").write_text((Path(TINY).parent / "deepspeed" / "zero0.json").read_text())
    config = _relative_config(
        folder,
        data={"format": "trl", "path": "pairs.jsonl"},
        deepspeed={"config": "zero0.json"},
        train={"output_dir": "runs/relative", "max_steps": 2, "num_threads": 1},
        logging={"progress_bar": False},
    )
    (tmp_path / "elsewhere").mkdir()
    proc = _ddpo_from(tmp_path / "elsewhere", "train", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "elsewhere" / "runs" / "relative"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["path"] == str(folder / "pairs.jsonl")
    assert resolved["deepspeed"]["config"] == str(folder / "zero0.json")


@pytest.mark.slow
def test_a_relative_path_found_nowhere_names_the_places_tried(tmp_path):
    config = _relative_config(tmp_path / "experiment", deepspeed={"config": "deepspeed/zero0.json"})
    (tmp_path / "elsewhere").mkdir()
    proc = _ddpo_from(tmp_path / "elsewhere", "train", str(config))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "ddpo train: config error: deepspeed.config 'deepspeed/zero0.json' not found: tried "
        f"{tmp_path}/experiment/deepspeed/zero0.json (next to the config file) and "
        f"{tmp_path}/elsewhere/deepspeed/zero0.json (the working directory); fix the path (configs/deepspeed/ has "
        "the shipped ones), or set it null\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake, code, message",
    [
        (
            ("--model.name_or_path", "no-such-org/no-such-model"),
            1,
            "model.name_or_path 'no-such-org/no-such-model': no such file or directory: {repo}/no-such-org/"
            "no-such-model; as a hub id, it is not in the local hub cache, and HF_HUB_OFFLINE=1 reads nothing "
            "else: download it first where there is network (`huggingface-cli download no-such-org/no-such-model`) "
            "or unset HF_HUB_OFFLINE",
        ),
        (
            ("--model.name_or_path", "{tmp}/gone"),
            2,
            "model.name_or_path '{tmp}/gone' not found: no such file or folder; fix the path, or give a hub id "
            "'owner/name'",
        ),
        (
            ("--model.name_or_path", "{tmp}"),
            1,
            "model.name_or_path '{tmp}': {tmp} is a folder but holds no config.json or adapter_config.json: point it "
            "at a checkpoint",
        ),
        (
            ("--model.vision_feature_layer", "7"),
            1,
            "model.vision_feature_layer 7 is out of range for the 'tiny' preset's 2-layer vision tower: use -1 (its "
            "last layer) down to -3 (its patch embeddings)",
        ),
        (("--model.arch", "blip"), 2, "model.arch: expected one of 'llava', 'muffin', 'omnilmm', got 'blip'"),
    ],
    ids=["unknown-hub-id-offline", "missing-local-dir", "folder-without-checkpoint", "feature-layer", "arch"],
)
def test_a_model_that_cannot_be_loaded_is_one_message(tmp_path, mistake, code, message):
    fill = {"tmp": tmp_path, "repo": Path(TINY).parents[1]}
    args = [a.format(**fill) for a in mistake]
    proc = run_ddpo("train", TINY, "--train.output_dir", str(tmp_path / "run"), *args, expect_ok=False)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    kind = "error" if code == 1 else "config error"
    said = [line for line in proc.stderr.splitlines() if line.startswith("ddpo train: ")]
    assert said == [f"ddpo train: {kind}: {message.format(**fill)}"]


@pytest.mark.slow
def test_eval_and_score_name_a_model_that_cannot_be_loaded_in_one_message(tmp_path):
    """`ddpo eval --model` and `ddpo score --policy` load checkpoints outside any config: the same one message,
    naming the command-line argument."""
    from PIL import Image

    gone = tmp_path / "gone"
    proc = _ddpo_from(tmp_path, "eval", "--benchmark", "synthetic", "--model", str(gone), "--num-images", "2",
                      "--output", str(tmp_path / "eval.json"))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-2:] == [
        f"ddpo eval: error: --model '{gone}': no such file or directory: {gone}; fix the path (relative paths in a "
        "config are looked up next to the config file, then in the working directory; on the command line, in the "
        "working directory)",
        "(--debug or DDPO_DEBUG=1 shows the traceback)",
    ]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question": "what is here?", "answer": "a cube", "image": "a.png"}) + "\n")
    proc = _ddpo_from(tmp_path, "score", "--policy", str(tmp_path), "--reference", str(tmp_path),
                      "--answers", str(answers), "--image-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-2] == (
        f"ddpo score: error: --policy '{tmp_path}': {tmp_path} is a folder but holds no config.json or "
        "adapter_config.json: point it at a checkpoint"
    )
    proc = _ddpo_from(tmp_path, "eval", "--benchmark", "synthetic", "--model", str(gone), "--num-images", "2",
                      "--output", str(tmp_path / "eval.json"), "--debug")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr


@pytest.mark.slow
def test_debug_shows_the_model_loads_traceback(tmp_path):
    proc = run_ddpo(
        "train", TINY, "--train.output_dir", str(tmp_path / "run"), "--model.name_or_path", "no-such-org/x",
        "--debug", expect_ok=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr


@pytest.mark.slow
def test_the_command_line_behaves_like_a_tool(tmp_path):
    """No command or no config: the usage on stderr, exit 2; each subcommand's help names it."""
    for args in ([], ["train"], ["precompute-ref"]):
        proc = _ddpo_from(tmp_path, *args)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("usage: ddpo "), args
    proc = _ddpo_from(tmp_path, "eval", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ddpo eval ")
    proc = run_ddpo("train", TINY, "--train.max_steps", "3", "--help")
    assert proc.returncode == 0 and "  --train.max_steps 3  (int, default -1)" in proc.stdout
