import numpy as np
import pytest

from ddpo.data.synthetic.language import LanguageConfig
from ddpo.data.synthetic.noise import ERROR_TYPES, PAPER_MIX, NoiseConfig, calibrate, expected_errors, noisy_caption
from ddpo.data.synthetic.world import WorldConfig, sample_scenes

WORLD = WorldConfig()
LANG = LanguageConfig()


@pytest.mark.parametrize("error_type", ERROR_TYPES)
def test_each_error_type_fires_at_its_configured_rate(error_type):
    # same seed = same scenes and opportunities; with p = 0.3 about 30% of them become errors
    n = 400
    opportunities = expected_errors(WORLD, LANG, NoiseConfig().only(error_type, 1.0), n, seed=3)[error_type] * n
    fired = expected_errors(WORLD, LANG, NoiseConfig().only(error_type, 0.3), n, seed=3)[error_type] * n
    assert opportunities >= 40
    assert abs(fired / opportunities - 0.3) < 4 * np.sqrt(0.3 * 0.7 / opportunities)
    others = expected_errors(WORLD, LANG, NoiseConfig().only(error_type, 1.0), n, seed=3)
    assert all(others[t] == 0 for t in ERROR_TYPES if t != error_type)


def test_default_noise_gives_a_plausible_sft_hallucination_rate():
    # the share of scenes with an object-error context is what a greedy SFT model would hallucinate on
    contexts = expected_errors(WORLD, LANG, NoiseConfig().only("object", 1.0), 1000, seed=0)["object_captions"]
    assert 0.3 <= contexts <= 0.6
    captions = expected_errors(WORLD, LANG, NoiseConfig(), 1000, seed=0)
    assert 0.6 * contexts - 0.05 < captions["object_captions"] < 0.6 * contexts + 0.05


def test_swap_keeps_length_and_insert_adds_a_sentence():
    swap, insert = NoiseConfig().only("object"), NoiseConfig(object_insert_share=1.0).only("object")
    swapped = inserted = 0
    for scene in sample_scenes(200, 4, WORLD):
        clean = noisy_caption(scene, np.random.default_rng(1), WORLD, LANG, NoiseConfig().only("object", 0.0)).text
        a = noisy_caption(scene, np.random.default_rng(1), WORLD, LANG, swap)
        b = noisy_caption(scene, np.random.default_rng(1), WORLD, LANG, insert)
        assert len(a.text.split()) == len(clean.split())  # a renamed object: same words count
        assert len(b.text.split()) >= len(clean.split())
        assert (len(b.text.split()) > len(clean.split())) == bool(b.errors)
        swapped += a.text != clean
        inserted += bool(b.errors)
    assert swapped > 20 and inserted > 20  # the checks above saw both kinds of error, not only clean captions


def test_noise_is_deterministic():
    scene = sample_scenes(1, 9, WORLD)[0]
    texts = {noisy_caption(scene, np.random.default_rng(5), WORLD, LANG, NoiseConfig()).text for _ in range(3)}
    assert len(texts) == 1


def test_calibrate_reaches_the_paper_mix_in_a_larger_world():
    world = WorldConfig(
        partners={
            "circle": "square",
            "square": "triangle",
            "triangle": "diamond",
            "diamond": "cross",
            "cross": "circle",
        }
    )
    cfg = calibrate(2.5, PAPER_MIX, world, LANG, NoiseConfig(object_insert_share=0.5), n=300, seed=0)
    got = expected_errors(world, LANG, cfg, 500, seed=1)
    assert 2.0 < got["total"] < 2.8  # one error per phrase: errors on the same object crowd each other out
    for t in ERROR_TYPES:
        assert abs(got[t] / got["total"] - PAPER_MIX[t]) < 0.06, (t, got)
    with pytest.raises(ValueError, match="'object' errors per answer wanted"):
        calibrate(2.5, PAPER_MIX, WORLD, LanguageConfig(target_words=30), n=100)


def test_calibrate_spreads_a_missing_type_over_the_others_when_not_strict():
    # 30-word answers hold no relation sentences: their 12% goes to the other types in proportion
    lang = LanguageConfig(target_words=30)
    world = WorldConfig(
        partners={
            "circle": "square",
            "square": "triangle",
            "triangle": "diamond",
            "diamond": "cross",
            "cross": "circle",
        }
    )
    cfg = calibrate(2.0, PAPER_MIX, world, lang, NoiseConfig(object_insert_share=0.5), n=300, seed=0, strict=False)
    assert cfg.relation_prob == 0.0
    got = expected_errors(world, lang, cfg, 500, seed=1)
    assert 1.6 < got["total"] < 2.3 and got["relation"] == 0.0
    assert got["position"] / got["total"] == pytest.approx(0.20 / 0.88, abs=0.06)
    with pytest.raises(ValueError, match="opportunities in all"):
        calibrate(40.0, PAPER_MIX, world, lang, n=100, strict=False)
