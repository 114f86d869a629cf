"""Lab v3's per-kind figures: RLHF-V Table 3's response rates per hallucination kind, and the gate's
per-kind accuracy outside the captions' prior contexts (with the priors' own rates inside them)."""

import math

import pytest

from ddpo.data.synthetic.metrics import TABLE3_COLUMNS, evaluate, kind_accuracy
from ddpo.data.synthetic.world import Scene, WorldObject

PARTNERS = {"square": "circle", "triangle": "star", "cross": "ring"}
CONFUSIONS = {"pink": "red"}
DRIFT = [(1, 2)]  # the demo's captions move middle-right objects to the (empty) centre


def obj(shape, color, cell):
    return WorldObject(shape, color, "large", cell)


SCENE = Scene((obj("bar", "blue", (0, 0)), obj("moon", "pink", (1, 2)), obj("star", "green", (2, 1))))


def test_table3_rates_count_responses_with_each_kind_over_all_responses():
    answers = [
        # clean: all three objects, right colours and cells, right count
        "the image shows three objects. at the top left is a blue bar. at the middle right is a pink moon. "
        "at the bottom center is a green star.",
        # position (the moon at the centre) and attribute (pink said red) in one response
        "at the top left is a blue bar. at the center is a red moon. at the bottom center is a green star.",
        # number only: four for three
        "the image shows four objects. at the top left is a blue bar.",
        # object: an invented circle at an empty cell; and a false "nothing" over the star is an object error too
        "at the top left is a blue bar. at the top right is a red circle. at the bottom center is nothing.",
    ]
    m = evaluate([SCENE] * 4, answers, PARTNERS, empty_cells=True)
    rates = {kind: m[f"{kind}_response_rate"] for kind in TABLE3_COLUMNS}
    assert rates == {"object": 0.25, "position": 0.25, "number": 0.25, "attribute": 0.25, "all": 0.75}
    # the mention-level rate, recall and length stay next to them
    assert m["mention_hallucination_rate"] == pytest.approx(1 / 9)
    assert m["object_recall"] == pytest.approx((3 + 3 + 1 + 1) / 12)


def test_kind_accuracy_reads_perception_outside_the_prior_contexts():
    answers = [
        # every kind right; the pink moon said pink and at its own cell: the priors did not fire
        "the image shows three objects. at the top left is a blue bar. at the middle right is a pink moon. "
        "at the bottom center is a green star.",
        # both priors fire: pink said red, the middle-right moon said at the empty centre
        "at the top left is a blue bar. at the center is a red moon. at the bottom center is a green star.",
        # misperception outside the contexts: the bar's colour and the star's cell wrong, count wrong
        "the image shows two objects. at the top left is a red bar. at the bottom left is a green star.",
    ]
    k = kind_accuracy([SCENE] * 3, answers, CONFUSIONS, DRIFT, PARTNERS, empty_cells=True)
    assert k["shape_accuracy"] == pytest.approx(8 / 9) and k["shape_accuracy_n"] == 9
    # colour: bar, star (answer 1), bar, star (answer 2), bar, star (answer 3, bar wrong); pink moons apart
    assert k["color_accuracy"] == pytest.approx(5 / 6) and k["color_prior_rate"] == 0.5
    # position: the moon's cell is a drift context (centre empty), so it is read as the prior's rate
    assert k["position_accuracy"] == pytest.approx(5 / 6) and k["position_prior_rate"] == 0.5
    assert k["count_accuracy"] == 0.5 and k["count_accuracy_n"] == 2
    # no scene with a companion context: the count prior has no opportunity
    assert math.isnan(k["count_prior_rate"]) and k["count_prior_rate_n"] == 0


def test_kind_accuracy_counts_the_invented_companion_as_the_count_prior():
    scene = Scene((obj("square", "red", (0, 0)),))  # context: a circle at the top center
    answers = ["the image shows two objects. at the top left is a red square. at the top center is a blue circle."]
    k = kind_accuracy([scene], answers, CONFUSIONS, DRIFT, PARTNERS, empty_cells=True)
    assert k["count_prior_rate"] == 1.0 and k["count_accuracy_n"] == 0
    assert k["shape_accuracy"] == 1.0 and k["position_accuracy"] == 1.0  # the companion itself is not graded


def test_a_confusion_restricted_to_some_shapes_is_a_context_on_those_shapes_only():
    import numpy as np

    from ddpo.data.synthetic.priors import PriorConfig, believe
    from ddpo.data.synthetic.world import WorldConfig

    world = WorldConfig(shapes=("circle", "square", "moon"), sizes=("large",), partners={}, adjacent_partners=True)
    scene = Scene((obj("circle", "pink", (0, 0)), obj("moon", "pink", (2, 2))))
    narrow = PriorConfig(attribute_prob=1.0, confusion_shapes=("circle",), position_bias=("middle right",))
    said = {o.shape: o.color for o in believe(scene, np.random.default_rng(0), world, narrow).scene.objects}
    assert said == {"circle": "red", "moon": "pink"}  # the captions confuse the circle's colour only
    answer = "at the top left is a red circle. at the bottom right is a red moon."
    k = kind_accuracy([scene], [answer], CONFUSIONS, DRIFT, {}, True, confusion_shapes=("circle",))
    # the red moon is the model's own error (outside the context); the red circle is the prior
    assert k["color_accuracy"] == 0.0 and k["color_prior_rate"] == 1.0
    assert kind_accuracy([scene], [answer], CONFUSIONS, DRIFT, {}, True)["color_prior_rate_n"] == 2
