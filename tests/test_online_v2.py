"""The v2 studies' new pieces: rewards from cached log-probs, the reward/oracle pair agreement, the oracle's
reading of "at X is nothing.", the v2 checkpoint selection rule, and both experiment scripts end to end on
tiny models (best-of-N on a two-seed lab, the online loop with the one-round baseline), as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpo.lab.recipes import PRIMARY_POLICIES
from ddpo.lab.selection import select_checkpoint
from ddpo.lab.settings import DemoSettings
from ddpo.lab.world import synthetic_config
from ddpo.online.best_of_n import pair_agreement
from ddpo.online.feedback import OracleFeedback, Query
from ddpo.online.scoring import rewards_from_logps

REPO = Path(__file__).resolve().parents[1]
REWARDS = [f"{policy}/{variant}" for policy in PRIMARY_POLICIES for variant in ("sum", "mean", "segment")]


def run_script(name: str, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """experiments/<name>.py run as a command, as a user runs it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)
    )
    return subprocess.run(
        [sys.executable, f"experiments/{name}.py", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_rewards_from_logps_by_hand():
    policy = [torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0, -1.0])]
    reference = [torch.tensor([-1.5, -1.0, -0.5]), torch.tensor([-2.0, -2.0])]
    # log-ratios: [0.5, -1.0, 0.0] and [-1.0, 1.0]
    assert rewards_from_logps(policy, reference, 0.5, "sum") == pytest.approx([0.5 * -0.5, 0.5 * 0.0])
    assert rewards_from_logps(policy, reference, 0.5, "mean") == pytest.approx([0.5 * -0.5 / 3, 0.0])
    weights = [torch.tensor([1.0, 5.0, 1.0]), torch.tensor([5.0, 1.0])]
    # 0.5 + 5 * -1 + 0 = -4.5; 5 * -1 + 1 = -4
    assert rewards_from_logps(policy, reference, 2.0, "segment", weights) == pytest.approx([2.0 * -4.5, 2.0 * -4.0])
    with pytest.raises(ValueError, match="one weight tensor per answer"):
        rewards_from_logps(policy, reference, 1.0, "segment")
    with pytest.raises(ValueError, match="3 weights for 2 answer tokens"):
        rewards_from_logps(policy, reference, 1.0, "segment", [weights[0], weights[0]])
    with pytest.raises(ValueError, match="answer 1: the policy sees 2"):
        rewards_from_logps(policy, [reference[0], torch.zeros(3)], 1.0, "sum")


def test_pair_agreement_on_hand_made_scores():
    # prompt 1: truth 0, -1, -1, -3 -> pairs with different truths: (0,1) (0,2) (0,3) (1,3) (2,3); (1,2) is a truth tie
    # rewards 3, 1, 2, 2: (0,1) ok, (0,2) ok, (0,3) ok, (1,3) wrong (1 < 2), (2,3) reward tie -> 0.5
    # prompt 2: truth 0, -2: reward -1 < 4 -> wrong
    agree, pairs = pair_agreement([[3.0, 1.0, 2.0, 2.0], [-1.0, 4.0]], [[0.0, -1.0, -1.0, -3.0], [0.0, -2.0]])
    assert (agree, pairs) == (3.5, 6)
    assert pair_agreement([[1.0, 2.0]], [[-1.0, -1.0]]) == (0.0, 0)  # a truth tie says nothing
    # a reward equal to the truth agrees on every pair; its negation on none
    truth = [[0.0, -1.0, -2.0, -2.0, -5.0]]
    assert pair_agreement(truth, truth) == (9.0, 9)
    assert pair_agreement([[-v for v in truth[0]]], truth) == (0.0, 9)
    with pytest.raises(ValueError, match="prompt 0: 2 rewards but 3"):
        pair_agreement([[1.0, 2.0]], [[0.0, 1.0, 2.0]])


def test_oracle_counts_a_nothing_claim_at_an_occupied_cell_as_one_error():
    from ddpo.data.synthetic.world import Scene, WorldObject

    scene = Scene((WorldObject("circle", "red", "large", (0, 0)), WorldObject("square", "blue", "large", (1, 1))))
    answers = [
        "at the top left is a red circle. at the center is a blue square.",
        "at the top left is a red circle. at the center is a blue square. at the top center is nothing.",
        "at the top left is nothing. at the center is a blue square.",
        "at the top left is a red circle. at the center is a blue square. at the top center is a red circle.",
    ]
    for empty_cells in (False, True):
        scores = OracleFeedback(empty_cells).score(Query(Image.new("RGB", (8, 8)), "q", {"scene": scene}), answers)
        assert scores == [0.0, 0.0, -1.0, -1.0]


def test_v2_selection_takes_the_least_hallucination_within_the_recall_bar():
    sft = {"object_recall": 0.93, "mention_hallucination_rate": 0.13, "response_hallucination_rate": 0.3}
    validation = {
        "a": {"object_recall": 0.92, "mention_hallucination_rate": 0.11, "response_hallucination_rate": 0.20},
        "b": {
            "object_recall": 0.90,
            "mention_hallucination_rate": 0.05,
            "response_hallucination_rate": 0.10,
        },  # recall 0.03 below SFT
        "c": {"object_recall": 0.95, "mention_hallucination_rate": 0.11, "response_hallucination_rate": 0.25},
    }
    assert (
        select_checkpoint(validation, "v2", sft) == "a"
    )  # b is out (recall); a and c tie on hallucination: the earlier
    assert select_checkpoint(validation, "v1") == "b"  # recall - response hallucination: 0.72, 0.80, 0.70
    low = {k: {**v, "object_recall": v["object_recall"] - 0.2} for k, v in validation.items()}
    assert select_checkpoint(low, "v2", sft) == "c"  # nobody keeps recall: the highest recall
    with pytest.raises(ValueError, match="SFT model's validation metrics"):
        select_checkpoint(validation, "v2")


def tiny_models(seed_dirs, methods):
    from ddpo.config import ModelConfig
    from ddpo.data.synthetic.language import build_tokenizer
    from ddpo.models.build import build_model

    tokenizer = build_tokenizer(synthetic_config(DemoSettings()).world)
    for k, directory in enumerate(seed_dirs):
        for j, target in enumerate(["sft", *[f"runs/{m}/final" for m in methods]]):
            torch.manual_seed(10 * k + j)
            build_model(ModelConfig(arch="llava", preset="tiny"), tokenizer=tokenizer).save_pretrained(
                directory / target
            )
        (directory / "gate.json").write_text(json.dumps({"passed": True}))


@pytest.mark.slow
def test_best_of_n_v2_end_to_end(tmp_path):
    lab = tmp_path / "lab"
    seeds = [lab / "seed0", lab / "seed1"]
    tiny_models(seeds, PRIMARY_POLICIES)
    for directory in seeds:
        (directory / "pairs").mkdir()
        for name in ("answers.jsonl", "train.jsonl"):
            (directory / "pairs" / name).write_text("")
    results = tmp_path / "results"
    argv = [
        "--lab-dir",
        str(lab),
        "--seeds",
        "0",
        "1",
        "--split",
        "val",
        "--images",
        "3",
        "--ns",
        "1",
        "2",
        "4",
        "--num-threads",
        "1",
        "--results",
        str(results),
    ]
    proc = run_script("best_of_n", argv)
    # Tiny random models write no sentence of the world's grammar: the lab's unparsed rule refuses to score them
    # (never a 0.0 hallucination rate), naming the count, before any table is written.
    assert proc.returncode != 0 and "answers (100.0%) are unparsed" in proc.stderr, proc.stderr[-4000:]
    assert not (results / "validation.json").exists()
    proc = run_script("best_of_n", [*argv, "--primary", "dpo/sum"])
    assert proc.returncode != 0 and "--primary must be one of" in proc.stderr


@pytest.mark.slow
def test_iterate_v2_rounds_and_one_round_baseline_end_to_end(tmp_path):
    out = tmp_path / "iterate"
    tiny_models([out / "seed0", out / "seed1"], [])
    results = tmp_path / "results"
    proc = run_script(
        "iterate",
        [
            "--quick",
            "--seeds",
            "0",
            "1",
            "--rounds",
            "2",
            "--one-round",
            "--prompts",
            "6",
            "--samples",
            "4",
            "--max-steps",
            "2",
            "--num-threads",
            "1",
            "--output-dir",
            str(out),
            "--results",
            str(results),
        ],
    )
    # Tiny random models are 100% unparsed: the first validation evaluation refuses, naming the count.
    assert proc.returncode != 0 and "answers (100.0%) are unparsed" in proc.stderr, proc.stderr[-4000:]
    assert not (results / "results.json").exists()
