"""Implicit-reward scoring (ddpo.online.scoring), best-of-N (ddpo.online.best_of_n) and its experiment script."""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpo.config import ModelConfig
from ddpo.data.templates import encode_answer, encode_prompt
from ddpo.models.base import GenerationOptions, answer_token_logps
from ddpo.models.build import build_model
from ddpo.online.best_of_n import best_of_n, pick_best, sample_candidates
from ddpo.online.scoring import RewardSettings, implicit_rewards
from ddpo.online.scoring import main as score_main

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "vicuna_v0"
PROMPT = "Describe the image in detail ."
ANSWERS = ["there is a red circle at the top left .", "there is a blue square .", "one two three four green dog"]


def tiny(tokenizer, seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="llava", preset="tiny"), tokenizer=tokenizer).eval()


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


@pytest.fixture(scope="module")
def models():
    from ddpo.data.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(
        [
            "there is a red circle at the top left and a blue square in the center .",
            "Describe the image in detail . one two three four green dog",
        ]
    )
    return tiny(tokenizer, 0), tiny(tokenizer, 1)


def naive_answer_logps(model, img: Image.Image, prompt: str, answer: str) -> torch.Tensor:
    """The HF model's own forward on one unpadded row, full logits: log-probs of the answer tokens."""
    prompt_ids = encode_prompt(TEMPLATE, model.tokenizer, prompt, model.image_placeholder)
    answer_ids = encode_answer(TEMPLATE, model.tokenizer, answer)
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids, pixel_values=model.preprocess_images([img])).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt_ids) - 1 :]


def test_policy_equal_to_reference_gives_zero_reward(models):
    policy, _ = models
    images = [image(i) for i in range(3)]
    for variant in ("sum", "mean", "segment"):
        rewards = implicit_rewards(
            policy,
            copy.deepcopy(policy),
            images,
            [PROMPT] * 3,
            ANSWERS,
            RewardSettings(beta=0.5, template=TEMPLATE, variant=variant),
            reference_answers=[ANSWERS[0]] * 3,
        )
        assert rewards == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)


def test_rewards_are_beta_times_log_prob_differences(models):
    policy, reference = models
    images = [image(i) for i in range(3)]
    naive = [
        (naive_answer_logps(policy, im, PROMPT, a), naive_answer_logps(reference, im, PROMPT, a))
        for im, a in zip(images, ANSWERS)
    ]
    # Batched (padding, several rows) equals the one-row full-logit computation.
    batched = answer_token_logps(policy, images, [PROMPT] * 3, ANSWERS, TEMPLATE, batch_size=3)
    for got, (p, _) in zip(batched, naive, strict=True):
        torch.testing.assert_close(got, p, atol=1e-5, rtol=1e-5)
    beta = 0.25
    sums = implicit_rewards(
        policy, reference, images, [PROMPT] * 3, ANSWERS, RewardSettings(beta, TEMPLATE, "sum", batch_size=2)
    )
    means = implicit_rewards(
        policy, reference, images, [PROMPT] * 3, ANSWERS, RewardSettings(beta, TEMPLATE, "mean", batch_size=1)
    )
    assert sums == pytest.approx([beta * float((p - r).sum()) for p, r in naive], abs=1e-4)
    assert means == pytest.approx([beta * float((p - r).mean()) for p, r in naive], abs=1e-5)
    # Ranking by the summed reward is the ranking by the log-prob difference.
    diffs = [float((p - r).sum()) for p, r in naive]
    assert sorted(range(3), key=lambda i: sums[i]) == sorted(range(3), key=lambda i: diffs[i])


def test_segment_reward_upweights_tokens_that_differ_from_the_reference_answer(models):
    policy, reference = models
    answer, ref_answer = "there is a red circle at the top left .", "there is a blue circle at the top left ."
    img = image(0)
    delta = naive_answer_logps(policy, img, PROMPT, answer) - naive_answer_logps(reference, img, PROMPT, answer)
    red = answer.split().index("red")  # word-level tokenizer: token i = word i; only "red" is replaced
    gamma, beta = 5.0, 1.0
    settings = RewardSettings(beta, TEMPLATE, "segment", gamma=gamma)
    segment = implicit_rewards(policy, reference, [img], [PROMPT], [answer], settings, [ref_answer])[0]
    assert segment == pytest.approx(float(delta.sum()) + (gamma - 1) * float(delta[red]), abs=1e-4)
    # Without a reference answer, every weight is 1: the summed reward.
    plain = implicit_rewards(policy, reference, [img], [PROMPT], [answer], settings)[0]
    assert plain == pytest.approx(float(delta.sum()), abs=1e-4)


def test_a_policy_trained_to_prefer_an_answer_ranks_it_first(models):
    from ddpo.lab.sft import SFTSettings, sft

    _, reference = models
    policy = copy.deepcopy(reference)
    img = image(3)
    target = ANSWERS[1]
    sft(
        policy,
        [img] * 4,
        [PROMPT] * 4,
        [target] * 4,
        SFTSettings(steps=15, batch_size=4, learning_rate=1e-2, template=TEMPLATE),
    )
    candidates = [[ANSWERS[0], ANSWERS[2], target]]
    best, rewards = best_of_n(policy, reference, [img], [PROMPT], candidates, RewardSettings(0.1, TEMPLATE))
    assert best == [target]
    assert rewards[0][2] > max(rewards[0][:2])


def test_pick_best_ties_and_first_n():
    candidates = [["a", "b", "c", "d"]]
    assert pick_best(candidates, [[1.0, 3.0, 3.0, 9.0]]) == ["d"]
    assert pick_best(candidates, [[1.0, 3.0, 3.0, 9.0]], first_n=3) == ["b"]  # tie: the earlier one
    with pytest.raises(ValueError, match="first_n 5"):
        pick_best(candidates, [[0.0] * 4], first_n=5)


def test_sample_candidates_shape_and_seed(models):
    policy, _ = models
    images, prompts = [image(0), image(1)], [PROMPT, PROMPT]
    options = GenerationOptions(template=TEMPLATE, seed=7, max_new_tokens=6, batch_size=64)
    first = sample_candidates(policy, images, prompts, 3, options)
    again = sample_candidates(policy, images, prompts, 3, options)
    assert [len(g) for g in first] == [3, 3] and first == again
    assert len({a for g in first for a in g}) > 1  # sampling, not greedy


def test_score_command_writes_rewards_next_to_the_answers(models, tmp_path):
    policy, reference = models
    policy.save_pretrained(tmp_path / "policy")
    reference.save_pretrained(tmp_path / "reference")
    (tmp_path / "images").mkdir()
    image(0).save(tmp_path / "images" / "a.png")
    rows = [
        {"image": "a.png", "question": PROMPT, "answer": ANSWERS[0]},
        {"image": "a.png", "prompt": PROMPT, "answers": ANSWERS[1:], "reference": ANSWERS[0]},
    ]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert (
        score_main(
            [
                "--policy",
                str(tmp_path / "policy"),
                "--reference",
                str(tmp_path / "reference"),
                "--answers",
                str(answers),
                "--image-dir",
                str(tmp_path / "images"),
                "--beta",
                "0.5",
                "--variant",
                "mean",
            ]
        )
        == 0
    )
    scored = [json.loads(line) for line in (tmp_path / "answers.scored.jsonl").read_text().splitlines()]
    expected = implicit_rewards(
        policy, reference, [image(0)] * 3, [PROMPT] * 3, ANSWERS, RewardSettings(0.5, TEMPLATE, "mean")
    )
    assert scored[0]["reward"] == pytest.approx(expected[0], abs=1e-5)
    assert scored[1]["rewards"] == pytest.approx(expected[1:], abs=1e-5)
    assert scored[1]["reference"] == ANSWERS[0]


def test_score_command_names_the_bad_row(tmp_path, capsys):
    (tmp_path / "answers.jsonl").write_text(json.dumps({"image": "a.png", "question": "q"}) + "\n")
    code = score_main(
        [
            "--policy",
            "p",
            "--reference",
            "r",
            "--answers",
            str(tmp_path / "answers.jsonl"),
            "--image-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "row 0 (line 1)" in err and "'answer'/'answers'" in err


@pytest.mark.slow
def test_best_of_n_experiment_end_to_end(tmp_path):
    """The experiment script, run as a command, on a --quick demo directory whose models are tiny (made here, so
    no stage trains): it loads the demo's models and evaluates through the lab's rules."""
    import os
    import subprocess
    import sys

    from ddpo.data.synthetic.language import build_tokenizer
    from ddpo.lab.settings import DemoSettings
    from ddpo.lab.world import synthetic_config

    demo = tmp_path / "demo"
    tokenizer = build_tokenizer(synthetic_config(DemoSettings.quick()).world)
    tiny(tokenizer, 0).save_pretrained(demo / "sft")
    for method, seed in (("dpo", 1), ("ddpo", 2)):
        tiny(tokenizer, seed).save_pretrained(demo / "runs" / method / "final")
    (demo / "pairs").mkdir()
    for name in ("answers.jsonl", "train.jsonl"):
        (demo / "pairs" / name).write_text("")
    results_dir = tmp_path / "results"
    argv = ["--world", "v1", "--demo-dir", str(demo), "--quick", "--images", "6", "--ns", "1", "2", "4"]
    proc = subprocess.run(
        [sys.executable, "experiments/best_of_n.py", *argv, "--num-threads", "1", "--results", str(results_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=600,
    )
    # Random tiny models write no sentence of the world's grammar: the script must refuse to score them (the
    # lab's unparsed rule), naming the count, rather than report 0.0 hallucination.
    assert proc.returncode != 0 and "6 of 6 answers (100.0%) are unparsed" in proc.stderr, proc.stderr[-4000:]
    assert not (results_dir / "results.json").exists()
