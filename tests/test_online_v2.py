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
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((results / "validation.json").read_text())
    seed0 = out["per_seed"]["0"]
    rows = seed0["rows"]
    assert set(rows) == {
        "greedy:sft",
        "greedy:dpo_mean",
        "greedy:ddpo_mean_g5",
        *[f"{k}-of-{n}" for n in (1, 2, 4) for k in ("random", "oracle")],
        *[f"best-of-{n}:{r}" for n in (1, 2, 4) for r in REWARDS],
    }
    # N = 1: nothing to choose, every pick is the first sample; random-of-N pools the first N samples
    assert all(rows[f"best-of-1:{r}"] == rows["random-of-1"] == rows["oracle-of-1"] for r in REWARDS)
    assert rows["random-of-4"]["num_responses"] == 12.0 and rows["best-of-4:dpo_mean/sum"]["num_responses"] == 3.0
    # the agreement is recomputed from the cached samples: same number
    samples = json.loads(next((lab / "seed0" / "best_of_n").glob("*.samples.json")).read_text())
    for name in REWARDS:
        agree, pairs = pair_agreement(samples["rewards"][name], samples["oracle"])
        assert seed0["agreement"][name] == {"agreement": pytest.approx(agree / max(pairs, 1)), "pairs": pairs}
    # the primary: the pre-registered reward against random at the largest N (no 16 among 1, 2, 4)
    assert out["primary_label"].startswith("best-of-4:ddpo_mean_g5/sum - random-of-4")
    assert (results / "validation.png").stat().st_size > 0
    # a rerun reads the per-seed cache: identical numbers
    assert run_script("best_of_n", argv).returncode == 0
    assert json.loads((results / "validation.json").read_text())["per_seed"] == out["per_seed"]
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
    assert proc.returncode == 0, proc.stderr[-4000:]
    seed0 = out / "seed0"
    one = json.loads((seed0 / "one_round" / "round1" / "selected.json").read_text())
    assert one["prompts"] == [0, 12]  # both rounds' prompts at once
    loop = [json.loads((seed0 / "iterate" / f"round{k}" / "selected.json").read_text()) for k in (1, 2)]
    assert [r["prompts"] for r in loop] == [[0, 6], [6, 12]]
    # round 2 starts from round 1's selected export: its reference cache is filled from that model
    cfg = (seed0 / "iterate" / "round2" / "run" / "config.yaml").read_text()
    assert loop[0]["selected"] in cfg
    saved = json.loads((results / "results.json").read_text())
    rows = [row["row"] for row in saved["rows"]]
    assert rows == ["round 0", "round 1", "round 2", "picked on validation", "one round, same prompts"]
    picked = saved["per_seed"]["0"]["picked_round"]
    assert picked in (0, 1, 2)
    # the pick is the v2 rule over the rounds' validation metrics (round 0: SFT's)
    rounds = saved["per_seed"]["0"]["rounds"]
    chosen = {str(r["round"]): r["validation"][Path(r["selected"]).name if r["round"] else "sft"] for r in rounds}
    assert picked == int(select_checkpoint(chosen, "v2", rounds[0]["validation"]["sft"]))
    assert rounds[0]["drift"] == 0.0 and all(isinstance(r["drift"], float) for r in rounds)
    assert "picked on validation - one round (primary)" in saved["differences"]["differences"]
    assert "python experiments/iterate.py --quick" in (results / "results.md").read_text()
