import pytest

from ddpo.data.synthetic.metrics import UnparsedError, evaluate, gate_figures
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


RIGHT = "there is a small red circle at the top left."  # parsed, right: recalls 1 object, no hallucination
HALF_READ = "there is a small red circle at the top left. purple monkey dishwasher."  # 2nd sentence unparsed


def test_all_unparsed_answers_give_an_error_never_zero_hallucination():
    answers = ["lorem ipsum dolor.", "there is a small red", "purple monkey dishwasher."]
    with pytest.raises(UnparsedError) as caught:
        evaluate([SCENE] * 3, answers)
    e = caught.value
    assert (e.count, e.total) == (3, 3)
    assert e.examples == [
        ("answer 0", "lorem ipsum dolor."),
        ("answer 1", "there is a small red"),
        ("answer 2", answers[2]),
    ]
    assert str(e).startswith(
        "synthetic evaluation: 3 of 3 answers (100.0%) are unparsed (a sentence fits no rule of the world's grammar), "
        "more than max_unparsed 0.05 allows (--max-unparsed), so no score is given. First 3: answer 0: "
        "'lorem ipsum dolor.'; answer 1: 'there is a small red'; answer 2: 'purple monkey dishwasher.'. Fix: "
    )
    assert "raise max_unparsed (below 1)" in str(e)
    # the highest limit there is still refuses a run with nothing parsed
    with pytest.raises(UnparsedError, match="3 of 3 answers"):
        evaluate([SCENE] * 3, answers, max_unparsed=0.99)


def test_unparsed_rate_counts_answers_and_the_limit_is_a_strict_bound():
    # 20 answers, one with an unparsed 2nd sentence: 1/20 = 0.05 is not above 0.05 -> scored
    m = evaluate([SCENE] * 20, [HALF_READ] + [RIGHT] * 19)
    assert m["unparsed_rate"] == 0.05 and m["num_unparsed"] == 1 and m["num_responses"] == 20
    # the parsed first sentence still counts: 20 mentions, none hallucinated; 20 of 60 objects recalled
    assert m["response_hallucination_rate"] == 0.0 and m["object_recall"] == pytest.approx(20 / 60)
    # 2/20 = 0.1 > 0.05 -> error; with max_unparsed 0.1 the same answers are scored
    two = [HALF_READ, "lorem ipsum dolor."] + [RIGHT] * 18
    with pytest.raises(UnparsedError, match=r"2 of 20 answers \(10\.0%\).*answer 0: 'purple monkey dishwasher\.'"):
        evaluate([SCENE] * 20, two)
    m = evaluate([SCENE] * 20, two, max_unparsed=0.1)
    assert m["unparsed_rate"] == pytest.approx(0.1) and m["num_unparsed"] == 2
    # the fully unparsed answer has no mention: outside the response rate's denominator (19 mentioning answers)
    assert m["mention_hallucination_rate"] == 0.0 and m["object_recall"] == pytest.approx(19 / 60)


@pytest.mark.parametrize("limit", [1.0, -0.1, 5])
def test_max_unparsed_must_be_a_share_below_one(limit):
    with pytest.raises(ValueError, match=r"max_unparsed \(--max-unparsed\) must be a share in \[0, 1\)"):
        evaluate([SCENE], [RIGHT], max_unparsed=limit)


def test_gate_figures_report_their_unparsed_rate_without_a_limit():
    # 1 one-object answer + 3 scene answers, 2 of them unparsed: 2/4; no error (unread answers lower the figures)
    g = gate_figures([ONE], ["lorem ipsum dolor."], [SCENE, SCENE, SCENE], [RIGHT, RIGHT, HALF_READ], {})
    assert g["unparsed_rate"] == 0.5 and g["single_object_accuracy"] == 0.0
