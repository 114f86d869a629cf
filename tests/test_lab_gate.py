"""The per-kind perception gate (lab v3): which figures it checks, how a miss is named, the count probe,
and the Table-3 table the demo prints."""

import math

import pytest
import torch

from ddpo.data.synthetic.world import Scene, WorldObject
from ddpo.lab import gate
from ddpo.lab.report import results_table
from ddpo.lab.settings import DemoSettings

PARTNERS = {"square": "circle", "triangle": "star", "cross": "ring"}


def kinds(position=0.99, position_error=0.05):
    per_probe = {
        "shape_accuracy": 1.0,
        "color_accuracy": 0.99,
        "position_accuracy": position,
        "count_probe_accuracy": 0.97,
        "count_accuracy": 1.0,
    }
    return {
        "single": dict(per_probe),
        "multi": dict(per_probe),
        "caption_errors": {
            "object": {"model": 0.12, "captions": 0.10},
            "attribute": {"model": 0.15, "captions": 0.10},
            "position": {"model": position_error, "captions": 0.05},
            "count": {"model": 0.20, "captions": 0.24},
        },
        "priors": {"object": 0.6, "attribute": 0.9, "position": 0.8, "count": 0.7},
    }


SHARED = {"single_object_accuracy": 1.0, "recall_without_anchor": 0.99, "companion_rate": 0.6}


def test_gate_passes_a_model_that_sees_every_kind_and_names_each_failing_figure():
    settings = DemoSettings()
    thresholds, failed = gate.gate_checks(kinds(), SHARED, settings)
    assert failed == [] and thresholds["multi_position_accuracy"] == 0.95
    assert thresholds["position_error_vs_captions"] == 2.0
    # the v2 SFT model's failure: it sees shapes but names the wrong cell, 4.8x its captions' position error
    thresholds, failed = gate.gate_checks(kinds(position=0.76, position_error=0.24), SHARED, settings)
    assert failed == [
        "single_position_accuracy 0.760 < 0.95",
        "multi_position_accuracy 0.760 < 0.95",
        "position error 0.240 > 2 x the captions' 0.050",
    ]
    error = gate.gate_error({"failed": failed}, "gate.json")
    assert "which kind it misperceives" in str(error)
    # a probe with no opportunity (NaN) fails rather than passes
    blind = kinds()
    blind["single"]["count_probe_accuracy"] = math.nan
    assert gate.gate_checks(blind, SHARED, settings)[1] == ["single_count_probe_accuracy nan < 0.95"]


def test_gate_line_shows_every_kind():
    line = gate.gate_line({**SHARED, "kinds": kinds(), "passed": True, "failed": []})
    assert "position 0.990/0.990 (error 0.050 vs captions 0.050, prior 0.80)" in line and line.endswith("passed")
    # a gate.json of the lab before v3 has no kinds: the line is the old one
    assert gate.gate_line({**SHARED, "passed": False, "failed": ["x"]}).endswith("-> MISSED: x")


def test_count_probe_reads_the_likeliest_number_after_the_image_shows(monkeypatch):
    scenes = [
        Scene((WorldObject("bar", "red", "large", (0, 0)), WorldObject("moon", "red", "large", (2, 2)))),
        Scene((WorldObject("square", "red", "large", (0, 0)),)),  # context: the circle at the top center
        Scene((WorldObject("circle", "red", "large", (1, 0)),)),  # a lone partner: its anchor (square) absent
        Scene((WorldObject("circle", "red", "large", (1, 0)),)),
    ]
    # right for the first; the second counts the invented companion, the third the absent anchor, the fourth not
    said = [2, 2, 2, 1]

    def fake_logps(model, images, prompts, answers, template, batch_size):
        out = []
        for k, text in enumerate(answers):
            number = 1 + k % 9
            out.append(torch.tensor([0.0, 0.0, 0.0, 0.0 if number == said[k // 9] else -5.0, 0.0]))
            assert text.startswith("the image shows ")
        return out

    monkeypatch.setattr("ddpo.models.base.answer_token_logps", fake_logps)
    got = gate.count_probe(None, scenes, [None] * 4, ["p"] * 4, "llava_v1", PARTNERS)
    assert got == {"count_probe_accuracy": 1.0, "count_probe_prior_rate": 2 / 3}


def test_results_table_prints_table3_next_to_the_papers():
    m = {
        "response_hallucination_rate": 0.3,
        "mention_hallucination_rate": 0.1,
        "object_recall": 0.93,
        "mean_response_words": 53.5,
        "object_response_rate": 0.25,
        "position_response_rate": 0.125,
        "number_response_rate": 0.05,
        "attribute_response_rate": 0.2,
        "all_response_rate": 0.5,
    }
    results = {
        "settings": {"seed": 0, "test_images": 600, "ddpo_gamma": 5.0, "world_version": "v2"},
        "pairs": {"pairs_used": 1000},
        "methods": {"sft": m},
        "sampled": {},
    }
    table = results_table(results)
    assert "| sft | greedy | 25.0 | 12.5 | 5.0 | 20.0 | 50.0 | 10.0 | 0.930 | 53.5 |" in table
    assert "| RLHF-V DDPO (paper) | MHumanEval | 21.9 | 7.5 | 14.4 | – | 55.5 | – | – | – |" in table
    with pytest.raises(KeyError):
        results_table({**results, "methods": {"sft": {}}})
