import pytest

from ddpo.data.synthetic.metrics import evaluate
from ddpo.data.synthetic.world import Scene, WorldObject

SCENE = Scene(
    (
        WorldObject("circle", "red", "small", (0, 0)),
        WorldObject("circle", "red", "large", (1, 1)),
        WorldObject("square", "blue", "large", (2, 2)),
    )
)
ONE = Scene((WorldObject("cross", "pink", "small", (2, 0)),))


def test_hand_made_responses():
    answers = [
        # 2 mentions, both right: recalls 2 objects; 4 right attributes, 2 right positions; 19 words
        "there is a small red circle at the top left and a large blue square at the bottom right.",
        # 3 mentions: "two red circles" (right count, right colour), "a small green circle at the center"
        # (read as the large red circle there: size and colour wrong, position right), a triangle
        # (hallucinated: its claims are not graded); recalls 1; 22 words
        "there are two red circles. a small green circle is at the center. a small red triangle is at the top right.",
        # no object mentioned: outside the response-level denominator; 5 words
        "the background is dark gray.",
        # 2 mentions: an absent square (hallucinated, so its relation is not graded) and the pink cross
        # (right colour, recalls the cross); 8 words
        "the red square is above the pink cross.",
    ]
    m = evaluate([SCENE, SCENE, SCENE, ONE], answers)
    assert m["response_hallucination_rate"] == pytest.approx(2 / 3)
    assert m["mention_hallucination_rate"] == pytest.approx(2 / 7)
    assert m["object_recall"] == pytest.approx((2 + 1 + 0 + 1) / (3 + 3 + 3 + 1))
    assert m["mean_response_words"] == pytest.approx((19 + 22 + 5 + 8) / 4)
    assert m["attribute_error_rate"] == pytest.approx(2 / (4 + 1 + 2 + 1))
    assert m["position_error_rate"] == 0.0 and m["count_error_rate"] == 0.0
    assert m["relation_error_rate"] == 0.0  # no graded relation claim
    assert m["unparsed_rate"] == 0.0 and m["num_responses"] == 4
    wrong_place = evaluate(
        [SCENE], ["a small red circle is at the bottom left. the small red circle is below the blue square."]
    )
    assert wrong_place["position_error_rate"] == 1.0 and wrong_place["relation_error_rate"] == 1.0


def test_saying_less_does_not_look_better_on_recall():
    full = (
        "there is a small red circle at the top left and a large red circle at the center and a large blue square at "
        "the bottom right."
    )
    terse = "there is a large blue square at the bottom right."
    assert evaluate([SCENE], [full])["object_recall"] == 1.0
    assert evaluate([SCENE], [terse])["object_recall"] == pytest.approx(1 / 3)
    assert evaluate([SCENE], [terse])["response_hallucination_rate"] == 0.0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 scenes but 1 answers"):
        evaluate([SCENE, SCENE], ["x"])
