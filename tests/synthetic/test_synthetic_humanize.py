"""The human-like annotator (lab v3): deletions of an invented object's sentence, rewrites of a whole
sentence, missed errors and wrong fixes, each at its stated rate, on top of the minimal corrections."""

from collections import Counter

import numpy as np
import pytest

from ddpo.data.synthetic.annotator import HUMAN_LIKE, AnnotatorStyle, correct, ground, humanize
from ddpo.data.synthetic.language import LanguageConfig, parse
from ddpo.data.synthetic.priors import PriorConfig, prior_caption
from ddpo.data.synthetic.world import Scene, WorldConfig, WorldObject, sample_scenes

WORLD = WorldConfig(
    image_size=48,
    shapes=("circle", "square", "triangle", "cross", "star", "ring", "bar", "moon"),
    sizes=("large",),
    partners={"square": "circle", "triangle": "star", "cross": "ring"},
    cooccurrence_prob=0.3,
    repeat_prob=0.1,
    adjacent_partners=True,
)
SCENE = Scene((WorldObject("square", "pink", "large", (0, 0)), WorldObject("bar", "blue", "large", (2, 2))))
# an invented circle (the square's companion), the pink square said red, the bar one cell off
TEXT = "at the top left is a red square. at the top center is a blue circle. at the bottom center is a blue bar."


def human(text, **rates):
    return humanize(text, correct(SCENE, text, empty_cells=True), AnnotatorStyle(**rates), np.random.default_rng(0))


def test_zero_rates_are_the_minimal_oracle():
    minimal = correct(SCENE, TEXT, empty_cells=True)
    got, did = human(TEXT)
    assert got == minimal and did == Counter()
    assert got.corrected == (
        "at the top left is a pink square. at the top center is nothing. at the bottom right is a blue bar."
    )


def test_each_departure_on_a_hand_made_answer():
    deleted, did = human(TEXT, delete_prob=1.0)
    assert deleted.corrected == "at the top left is a pink square. at the bottom right is a blue bar."
    assert did == Counter(deleted=1) and [c.replacement for c in deleted.corrections if c.type == "object"] == [""]
    rewritten, did = human(TEXT, rewrite_prob=1.0)
    # both object sentences with a fix are said again, object first: the whole sentence is the segment
    assert rewritten.corrected == (
        "a pink square is at the top left. at the top center is nothing. a blue bar is at the bottom right."
    )
    assert did == Counter(rewritten=2)
    assert not ground(SCENE, parse(rewritten.corrected), empty_cells=True).errors
    missed, did = human(TEXT, miss_prob=1.0)
    assert missed.status == "clean" and missed.corrected == TEXT and did == Counter(missed=3)
    slipped, did = human(TEXT, wrong_fix_prob=1.0)
    assert did == Counter(wrong_fix=2)  # the colour and the position fix; the object fix is no one-word value
    values = {c.type: c.replacement for c in slipped.corrections}
    assert values["attribute"] not in ("pink", "red") and values["position"] not in ("bottom right", "bottom center")


def test_stated_rates_are_the_measured_rates_and_every_chosen_answer_parses():
    language, priors = LanguageConfig(target_words=55), PriorConfig(position_bias=("middle right",))
    rng, draws = np.random.default_rng(3), np.random.default_rng(4)
    did, fixes, invented, kept_errors = Counter(), 0, 0, 0
    for scene in sample_scenes(1500, 7, WORLD):
        text = prior_caption(scene, rng, WORLD, language, priors).text
        minimal = correct(scene, text, empty_cells=True)
        fixes += len(minimal.corrections)
        invented += sum(c.replacement.endswith("is nothing.") for c in minimal.corrections)
        got, done = humanize(text, minimal, HUMAN_LIKE, draws)
        did += done
        if got.status == "hallucinated":
            parsed = parse(got.corrected)
            assert not parsed.unparsed, got.corrected
            kept_errors += bool(ground(scene, parsed, empty_cells=True).errors)
    assert fixes > 1000
    assert did["missed"] / fixes == pytest.approx(HUMAN_LIKE.miss_prob, abs=0.015)
    # deletions: of the invented objects' sentences the annotator did not miss
    assert did["deleted"] / (invented * (1 - HUMAN_LIKE.miss_prob)) == pytest.approx(HUMAN_LIKE.delete_prob, abs=0.05)
    assert did["rewritten"] > 0 and did["wrong_fix"] > 0
    # the chosen answers that still hold an error are the missed and slipped ones, no more
    assert kept_errors <= did["missed"] + did["wrong_fix"]
    with pytest.raises(ValueError, match="miss_prob must be in"):
        AnnotatorStyle(miss_prob=1.5)
