"""A procedural hallucination world for DDPO on a CPU: scenes of coloured shapes, their captions,
systematic caption noise, an oracle that corrects answers minimally, exact metrics, and preference pairs.

    world.py      WorldConfig, Scene, sample_scene, render
    language.py   LanguageConfig, describe (scene -> text), parse (text -> claims), vocabulary, build_tokenizer
    noise.py      NoiseConfig, noisy_caption, expected_errors, calibrate, PAPER_MIX (v1: misperception noise)
    priors.py     PriorConfig, believe, prior_caption (v2: language-prior captions of one believed scene)
    annotator.py  ground (claims vs scene), correct (minimal corrections)
    metrics.py    evaluate (hallucination rates, recall, length, per-type error rates)
    pairs.py      SyntheticConfig, sft_examples, synthetic_records, records_from_answers
"""

from ddpo.data.synthetic.annotator import Annotation, Correction, correct, ground
from ddpo.data.synthetic.language import PROMPTS, LanguageConfig, build_tokenizer, describe, parse, vocabulary
from ddpo.data.synthetic.metrics import evaluate
from ddpo.data.synthetic.noise import PAPER_MIX, NoiseConfig, calibrate, expected_errors, noisy_caption
from ddpo.data.synthetic.pairs import SyntheticConfig, records_from_answers, sft_examples, synthetic_records
from ddpo.data.synthetic.priors import PriorConfig, believe, prior_caption
from ddpo.data.synthetic.world import Scene, WorldConfig, WorldObject, render, sample_scene, sample_scenes

__all__ = [
    "Annotation",
    "Correction",
    "correct",
    "ground",
    "PROMPTS",
    "LanguageConfig",
    "build_tokenizer",
    "describe",
    "parse",
    "vocabulary",
    "evaluate",
    "PAPER_MIX",
    "NoiseConfig",
    "calibrate",
    "expected_errors",
    "noisy_caption",
    "SyntheticConfig",
    "records_from_answers",
    "sft_examples",
    "synthetic_records",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "render",
    "sample_scene",
    "sample_scenes",
    "PriorConfig",
    "believe",
    "prior_caption",
]
