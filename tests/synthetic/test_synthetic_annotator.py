import difflib
import re
from collections import Counter

import numpy as np
import pytest

from ddpo.data.synthetic.annotator import Correction, correct, ground
from ddpo.data.synthetic.language import LanguageConfig, describe, parse
from ddpo.data.synthetic.noise import NoiseConfig, noisy_caption
from ddpo.data.synthetic.world import Scene, WorldConfig, WorldObject, sample_scenes

WORLD = WorldConfig()
SCENE = Scene(
    (
        WorldObject("circle", "red", "small", (0, 0)),
        WorldObject("circle", "red", "large", (1, 1)),
        WorldObject("square", "blue", "large", (2, 2)),
    )
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def _word_edit_distance(a: str, b: str) -> int:
    """Fewest word insertions, deletions and substitutions that turn `a` into `b`."""
    x, y = _words(a), _words(b)
    row = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, wy in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wx != wy))
    return row[-1]


def _diff_size(a: str, b: str) -> int:
    """Words a word-level diff changes (difflib's, as the trainer's; its exact minimum when difflib's
    longest-match heuristic finds a larger one)."""
    ops = difflib.SequenceMatcher(None, _words(a), _words(b), autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


def test_hand_made_corrections():
    text = (
        "the image shows four objects. there are two red circles. a small red circle is at the top left. "
        "a large pink circle is at the middle right. a small red triangle is at the bottom left. "
        "the large red circle is below the blue square."
    )
    a = correct(SCENE, text)
    assert a.status == "hallucinated"
    # the triangle is rewritten into the one object nobody described (the blue square), not deleted
    assert a.corrected == (
        "the image shows three objects. there are two red circles. a small red circle is at the top left. "
        "a large red circle is at the center. a large blue square is at the bottom right. "
        "the large red circle is above the blue square."
    )
    assert [(c.type, text[c.span[0] : c.span[1]], c.replacement) for c in a.corrections] == [
        ("count", "four", "three"),
        ("attribute", "pink", "red"),
        ("position", "middle right", "center"),
        ("object", "small red triangle is at the bottom left", "large blue square is at the bottom right"),
        ("relation", "below", "above"),
    ]


def test_absent_object_is_renamed_when_its_position_holds_a_free_object():
    # the square at the bottom right is called a large yellow diamond: rename it, keep the rest
    text = (
        "there is a small red circle at the top left and a large red circle at the center and a large yellow diamond "
        "at the bottom right."
    )
    a = correct(SCENE, text)
    assert a.corrections == [Correction("object", (text.index("yellow"), text.index("diamond") + 7), "blue square")]
    assert a.corrected.endswith("a large blue square at the bottom right.")
    # at an empty cell: rewritten into the first object no one describes (all its words and its place)
    text = "there is a small green triangle at the top right and a small red circle at the top left."
    assert (
        correct(SCENE, text).corrected
        == "there is a large red circle at the center and a small red circle at the top left."
    )
    # every object described already: nothing to rename into, the list item goes, with its "and"
    rest = (
        " and a small red circle at the top left and a large red circle at the center and a large blue square at the "
        "bottom right."
    )
    assert correct(SCENE, "there is a small green triangle at the top right" + rest).corrected == "there is" + rest[4:]


def test_count_corrections_keep_the_sentence_grammatical():
    scene = Scene((WorldObject("circle", "red", "small", (0, 0)),))
    text = "the image shows two objects. there are two red circles. a small red circle is at the top left."
    a = correct(scene, text)
    assert a.corrected == "the image shows one object. there is one red circle. a small red circle is at the top left."
    assert Counter(c.type for c in a.corrections) == {"count": 2}


def test_clean_unparseable_and_empty():
    rng = np.random.default_rng(0)
    assert correct(SCENE, describe(SCENE, rng, LanguageConfig())).status == "clean"
    bad = correct(SCENE, "there is a red red circle.")
    assert bad.status == "unparseable" and bad.corrected is None and bad.unparsed == [(0, 26)]
    assert correct(SCENE, "a small green star.").status == "unparseable"
    assert correct(SCENE, "the green cross is above the blue triangle.").status == "empty"


@pytest.mark.parametrize("style,insert_share", [("short", 0.0), ("detailed", 0.0), ("detailed", 0.5), ("short", 1.0)])
def test_corrections_fix_every_error_and_touch_nothing_else(style, insert_share):
    lang = LanguageConfig(style=style)
    noise = NoiseConfig(
        object_prob=0.8,
        attribute_prob=0.8,
        position_prob=0.8,
        count_prob=0.8,
        relation_prob=0.8,
        object_insert_share=insert_share,
    )
    rng = np.random.default_rng(1)
    hallucinated = 0
    for scene in sample_scenes(300, 5, WORLD):
        noisy = noisy_caption(scene, rng, WORLD, lang, noise)
        a = correct(scene, noisy.text)
        # every injected error is found, as one correction of its type
        assert Counter(e.type for e in noisy.errors) == Counter(c.type for c in a.corrections), noisy.text
        assert a.status == ("hallucinated" if noisy.errors else "clean")
        if a.status != "hallucinated":
            continue
        hallucinated += 1
        fixed = ground(scene, parse(a.corrected))
        assert not fixed.errors and not fixed.parse.unparsed
        # outside the corrected spans the text is untouched ...
        pieces, cursor = [], 0
        for c in a.corrections:
            pieces += [noisy.text[cursor : c.span[0]], c.replacement]
            cursor = c.span[1]
        assert "".join(pieces) + noisy.text[cursor:] == a.corrected
        # ... each replacement sits on a wrong claim (deletions: whole sentences or list items) ...
        wrong = [v.claim.span for v in ground(scene, parse(noisy.text)).errors]
        for c in a.corrections:
            if c.replacement:
                assert any(c.span[0] <= s < c.span[1] or s <= c.span[0] < e for s, e in wrong)
                if c.type in ("attribute", "position", "relation"):
                    assert c.span in wrong
            else:
                gone = _words(noisy.text[c.span[0] : c.span[1]])  # a sentence, or a list item with its "and"
                assert c.type == "object" and (gone[-1] == "." or "and" in (gone[0], gone[-1]))
        # ... and a word-level diff (what the trainer runs) finds no more change than the corrections hold
        budget = sum(
            max(len(_words(noisy.text[c.span[0] : c.span[1]])), len(_words(c.replacement))) for c in a.corrections
        )
        assert _diff_size(noisy.text, a.corrected) <= budget or _word_edit_distance(noisy.text, a.corrected) <= budget
        assert correct(scene, noisy.text) == a  # deterministic
    assert hallucinated > 150


def test_model_like_answers_are_graded_without_crashing():
    # repeated sentences (degenerate sampling) and definite references to absent shapes
    text = (
        "a small red circle is at the top left. a small red circle is at the top left. "
        "the green cross is above the red circle. there are three blue squares."
    )
    a = correct(SCENE, text)
    # indefinite mentions are matched one-to-one where the scene allows: the repeat is read as the
    # other red circle (wrong size and position); the relation to an absent cross is deleted
    assert a.corrected == (
        "a small red circle is at the top left. a large red circle is at the center. there is one blue square."
    )


def test_a_second_indefinite_mention_of_a_lone_object_is_an_extra_object():
    # one diamond in the scene, described twice: the second "a ... diamond" claims a diamond that is not
    # there. It is renamed to the free object at its position, or deleted; never turned into a copy of
    # the first sentence (which would teach a model to describe one object twice)
    scene = Scene((WorldObject("diamond", "yellow", "large", (1, 2)), WorldObject("circle", "blue", "large", (1, 0))))
    text = "a large yellow diamond is at the middle right. a large red diamond is at the middle left."
    a = correct(scene, text)
    assert a.corrected == "a large yellow diamond is at the middle right. a large blue circle is at the middle left."
    assert [c.type for c in a.corrections] == ["object"]
    text = "a large yellow diamond is at the middle right. a large red diamond is at the top left."
    assert (
        correct(scene, text).corrected
        == "a large yellow diamond is at the middle right. a large blue circle is at the middle left."
    )
    g = ground(scene, parse(text))
    assert g.hallucinated == [False, True] and g.mentioned_objects() == {(1, 2)}
    lone = Scene(scene.objects[:1])
    assert correct(lone, text).corrected == "a large yellow diamond is at the middle right."
    # an object related to itself has no direction to check (and must not crash the oracle)
    assert correct(lone, "a large yellow diamond is to the left of the yellow diamond.").status in (
        "clean",
        "hallucinated",
    )
    # a definite mention refers back to an object and may share it
    text = "a large yellow diamond is at the middle right. the yellow diamond is to the right of the blue circle."
    assert correct(scene, text).status == "clean"


def test_overlapping_count_and_colour_fixes_merge_into_one_correction():
    """A model wrote a wrong count and a wrong colour in one phrase: both are fixed, as one correction."""
    from ddpo.data.synthetic.annotator import correct
    from ddpo.data.synthetic.language import parse
    from ddpo.data.synthetic.world import Scene, WorldObject

    scene = Scene((WorldObject("square", "purple", "small", (0, 0)), WorldObject("square", "blue", "large", (1, 1))))
    text = (
        "the image shows two objects. there are three green squares. a small purple square is at the top left. "
        "a large blue square is at the center."
    )
    a = correct(scene, text)
    assert a.status == "hallucinated" and len(a.corrections) == 1
    assert a.corrected == text.replace("are three green squares", "is one purple square")
    assert a.corrections[0].span == (35, 58) and a.corrections[0].type == "count"
    assert correct(scene, a.corrected).status == "clean" and not parse(a.corrected).unparsed
