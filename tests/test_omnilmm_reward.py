"""The RLAIF-V reward end to end on tiny replicas: a tiny LLaVA policy samples candidate answers, `ddpo score`
scores them with an RLAIF-V-12B-layout policy against an OmniLMM-12B-layout reference (both released-layout
replicas, loaded through the path a user's hub download takes), and best-of-N keeps the best candidate."""

import json

import pytest
import torch
from PIL import Image

import ddpo.models.omnilmm as omnilmm
from ddpo.data.templates import TEMPLATES
from ddpo.models.base import GenerationOptions, answer_token_logps
from ddpo.models.build import build_model, load_model
from ddpo.models.config import ModelConfig
from ddpo.models.replicas import eva_tower_sizes_for_tests, write_omnilmm_checkpoint
from ddpo.online.best_of_n import best_of_n, sample_candidates
from ddpo.online.scoring import RewardSettings, implicit_rewards
from ddpo.online.scoring import main as score_main

PROMPTS = ["Describe the image in detail .", "What is in the picture ?"]
SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, num_query=4, image_size=28)


@pytest.fixture
def replicas(tmp_path, monkeypatch):
    """(RLAIF-V-12B, OmniLMM-12B) directories: the same tokenizer, different random weights."""
    monkeypatch.setattr(omnilmm, "EVA_TOWERS", eva_tower_sizes_for_tests(width=32, depth=2, heads=2, mlp_dim=64))
    reference = write_omnilmm_checkpoint(tmp_path / "OmniLMM-12B", num_shards=2, seed=0, **SIZES)
    policy = write_omnilmm_checkpoint(tmp_path / "RLAIF-V-12B", num_shards=2, seed=1, **SIZES)
    assert (policy / "tokenizer.model").read_bytes() == (reference / "tokenizer.model").read_bytes()
    return policy, reference


def llava_candidates(word_tokenizer, images, n: int) -> list[list[str]]:
    torch.manual_seed(0)
    llava = build_model(ModelConfig(arch="llava", preset="tiny"), tokenizer=word_tokenizer).eval()
    options = GenerationOptions(template="llava_v1", max_new_tokens=6, temperature=1.0, seed=0)
    candidates = sample_candidates(llava, images, PROMPTS, n, options)
    assert all(len(set(group)) > 1 for group in candidates)  # sampled: distinct candidates to rank
    return candidates


def write_answers(tmp_path, images, candidates):
    (tmp_path / "images").mkdir()
    rows = []
    for k, (image, group) in enumerate(zip(images, candidates)):
        image.save(tmp_path / "images" / f"{k}.png")
        rows.append({"image": f"{k}.png", "question": PROMPTS[k], "answers": group})
    answers = tmp_path / "candidates.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return answers


@pytest.mark.parametrize(
    "template",
    [
        "llava_v1",
        pytest.param(
            "omnilmm",
            marks=pytest.mark.skipif("omnilmm" not in TEMPLATES, reason="data/templates.py has no 'omnilmm' yet"),
        ),
    ],
)
def test_rlaifv_reward_scores_and_ranks_another_models_samples(replicas, word_tokenizer, tmp_path, template):
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (20, 60, 220))]
    candidates = llava_candidates(word_tokenizer, images, n=3)
    answers = write_answers(tmp_path, images, candidates)
    policy_dir, reference_dir = replicas
    argv = ["--policy", str(policy_dir), "--reference", str(reference_dir), "--answers", str(answers)]
    argv += ["--image-dir", str(tmp_path / "images"), "--template", template, "--variant", "mean"]
    assert score_main(argv + ["--beta", "0.1", "--device", "cpu", "--dtype", "float32"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "candidates.scored.jsonl").read_text().splitlines()]

    # the same models, loaded as `ddpo score` does; the reward by its definition, token by token
    policy, reference = load_model(policy_dir), load_model(reference_dir)
    assert policy.arch == reference.arch == "omnilmm" and policy.tokenizer.vocab_size != len(word_tokenizer)
    flat = [(image, prompt, answer) for image, prompt, group in zip(images, PROMPTS, candidates) for answer in group]
    images_, prompts_, answers_ = map(list, zip(*flat))
    pi = answer_token_logps(policy, images_, prompts_, answers_, template)
    ref = answer_token_logps(reference, images_, prompts_, answers_, template)
    by_definition = [0.1 * float((p - r).mean()) for p, r in zip(pi, ref)]
    assert [r for row in scored for r in row["rewards"]] == pytest.approx(by_definition, abs=1e-5)
    # RLAIF-V's reward_computer 'avg': 0.1 * sum(diff) / len(tokens) * 0.1, the tokens being the answer and its EOS
    released_avg = [0.1 * float((p - r).sum()) / len(p) * 0.1 for p, r in zip(pi, ref)]
    assert released_avg == pytest.approx([0.1 * value for value in by_definition], abs=1e-7)

    settings = RewardSettings(beta=0.1, template=template, variant="mean")
    assert implicit_rewards(policy, reference, images_, prompts_, answers_, settings) == pytest.approx(by_definition)
    best, rewards = best_of_n(policy, reference, images, PROMPTS, candidates, settings)
    for group, values, row, chosen in zip(candidates, rewards, scored, best):
        assert values == pytest.approx(row["rewards"], abs=1e-5)
        assert chosen == group[max(range(len(group)), key=lambda i: (values[i], -i))]
