"""The v2 world: co-occurrence in the images, language-prior captions that never contradict
themselves, an oracle whose replacements fix every hallucination and nothing else, and the gate."""

import re
from collections import Counter

import numpy as np
import pytest

from ddpo.data.synthetic.annotator import correct, ground
from ddpo.data.synthetic.language import POSITIONS, LanguageConfig, n_words, parse
from ddpo.data.synthetic.metrics import companion_context, evaluate, gate_figures
from ddpo.data.synthetic.priors import PriorConfig, believe, prior_caption, prior_statistics
from ddpo.data.synthetic.world import Scene, WorldConfig, WorldObject, partner_cell, render, sample_scenes

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "bar", "moon")
PARTNERS = {"square": "circle", "triangle": "star", "cross": "ring"}
WORLD = WorldConfig(
    image_size=48,
    shapes=SHAPES,
    sizes=("large",),
    max_objects=4,
    partners=PARTNERS,
    cooccurrence_prob=0.3,
    repeat_prob=0.1,
    adjacent_partners=True,
)
LANGUAGE = LanguageConfig(style="detailed", target_words=55)
PRIORS = PriorConfig(position_bias=("middle right",))


def obj(shape, color, cell):
    return WorldObject(shape, color, "large", cell)


def test_partner_cell_is_the_next_cell_to_the_right_then_below():
    assert partner_cell((0, 0)) == (0, 1) and partner_cell((1, 1)) == (1, 2)
    assert partner_cell((0, 2)) == (1, 2) and partner_cell((1, 2)) == (2, 2)
    assert partner_cell((2, 2)) == (2, 1)


def test_companions_really_stand_next_to_their_anchors():
    scenes = sample_scenes(3000, 0, WORLD)
    assert all(1 <= len(s.objects) <= 4 for s in scenes)
    # P(circle at the square's partner cell | square) is far above P(circle at a given other cell)
    at_partner = [
        s.at(partner_cell(o.cell)) is not None and s.at(partner_cell(o.cell)).shape == "circle"
        for s in scenes
        for o in s.objects
        if o.shape == "square"
    ]
    baseline = [s.at(c) is not None and s.at(c).shape == "circle" for s in scenes for c in POSITIONS]  # any cell
    assert np.mean(at_partner) > 0.2 > 3 * np.mean(baseline)
    # colours are independent of shapes: every shape takes every colour
    assert all(len({o.color for s in scenes for o in s.objects if o.shape == shape}) == 6 for shape in SHAPES)
    # the controls never get a partner
    assert not set(PARTNERS) & {"bar", "moon"} and not {"bar", "moon"} & set(PARTNERS.values())


def test_every_shape_renders_a_distinct_silhouette():
    masks = []
    for shape in SHAPES:
        image = np.asarray(
            render(
                Scene((WorldObject(shape, "red", "large", (1, 1)),)),
                WorldConfig(image_size=48, shapes=SHAPES, sizes=("large",), partners={}, jitter=0),
            )
        )
        masks.append((image[16:32, 16:32] != (40, 40, 40)).any(-1))
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] != masks[j]).sum() >= 12, (SHAPES[i], SHAPES[j])  # pixels that tell them apart


def test_the_prior_fires_only_in_its_context_and_says_nothing_otherwise():
    scene = Scene((obj("square", "red", (0, 0)), obj("bar", "blue", (2, 2))))
    fired = believe(scene, np.random.default_rng(0), WORLD, PriorConfig(companion_prob=1.0))
    assert [e.type for e in fired.errors] == ["object", "count"]
    assert fired.scene.at((0, 1)).shape == "circle" and fired.scene.at((0, 0)) == scene.at((0, 0))
    held = believe(scene, np.random.default_rng(0), WORLD, PriorConfig(companion_prob=0.0))
    assert (
        held.errors == [] and held.scene == scene and (0, 1) in held.stated_empty
    )  # the truthful sentence at that place
    text = prior_caption(
        scene, np.random.default_rng(3), WORLD, LANGUAGE, PriorConfig(companion_prob=0.0, empty_prob=0.0)
    ).text
    assert "at the top center is nothing." in text
    # partner present, or partner cell taken: no context, no companion
    for other in (
        Scene((obj("square", "red", (0, 0)), obj("circle", "red", (2, 2)))),
        Scene((obj("square", "red", (0, 0)), obj("moon", "red", (0, 1)))),
    ):
        assert believe(other, np.random.default_rng(0), WORLD, PriorConfig(companion_prob=1.0)).errors == []
        assert companion_context(other, PARTNERS) == set()
    assert companion_context(scene, PARTNERS) == {"circle"}


def test_captions_never_contradict_themselves():
    rng = np.random.default_rng(1)
    for scene in sample_scenes(1500, 2, WORLD):
        belief = believe(scene, rng, WORLD, PRIORS)
        caption = prior_caption(scene, np.random.default_rng(len(scene.objects)), WORLD, LANGUAGE, PRIORS)
        parsed = parse(caption.text)
        assert not parsed.unparsed, caption.text
        # a caption is a faithful description of the scene it believes: no claim is wrong about it
        cells = [m.position_name for m in parsed.mentions] + [
            s.position_name for s in parsed.sentences if s.kind == "empty"
        ]
        assert len(cells) == len(set(cells)), caption.text  # each cell said once
        overview = [s for s in parsed.sentences if s.kind == "overview"]
        if overview:
            assert overview[0].total.text == ["zero", "one", "two", "three", "four", "five"][len(parsed.mentions)], (
                caption.text
            )
    for scene in sample_scenes(1500, 3, WORLD):
        r = np.random.default_rng(9)
        state = r.bit_generator.state
        caption = prior_caption(scene, r, WORLD, LANGUAGE, PRIORS)
        r.bit_generator.state = state
        belief = believe(scene, r, WORLD, PRIORS)
        g = ground(belief.scene, parse(caption.text), empty_cells=True)
        assert not g.errors, (caption.text, belief.scene)


def test_corrections_fix_every_hallucination_and_touch_nothing_else():
    rng = np.random.default_rng(4)
    fixed_pairs = 0
    for scene in sample_scenes(2000, 5, WORLD):
        caption = prior_caption(scene, rng, WORLD, LANGUAGE, PRIORS)
        a = correct(scene, caption.text, empty_cells=True)
        assert a.status == ("hallucinated" if caption.errors else "clean"), caption.text
        if not caption.errors:
            continue
        fixed_pairs += 1
        assert Counter(e.type for e in caption.errors) == Counter(c.type for c in a.corrections), caption.text
        assert all(c.replacement for c in a.corrections)  # replacements only: nothing deleted
        assert not ground(scene, parse(a.corrected), empty_cells=True).errors, a.corrected
        pieces, cursor = [], 0
        for c in a.corrections:  # outside the corrected spans the text is byte for byte the rejected one
            pieces += [caption.text[cursor : c.span[0]], c.replacement]
            cursor = c.span[1]
        assert "".join(pieces) + caption.text[cursor:] == a.corrected
        assert abs(n_words(a.corrected) - n_words(caption.text)) <= 3 * len(a.corrections)
    assert fixed_pairs > 500


def test_hand_made_v2_corrections():
    scene = Scene((obj("square", "red", (0, 0)), obj("bar", "pink", (1, 2))))
    text = (
        "the image shows three objects. at the top left is a red square. at the top center is a blue circle. "
        "at the center is a red bar. at the bottom right is nothing. nothing else is visible."
    )
    a = correct(scene, text, empty_cells=True)
    assert a.corrected == (
        "the image shows two objects. at the top left is a red square. at the top center is nothing. "
        "at the middle right is a pink bar. at the bottom right is nothing. nothing else is visible."
    )
    assert sorted(c.type for c in a.corrections) == ["attribute", "count", "object", "position"]
    # a wrong "at ... is nothing." over an undescribed object becomes that object's sentence
    a = correct(scene, "at the top left is a red square. at the middle right is nothing.", empty_cells=True)
    assert a.corrected == "at the top left is a red square. at the middle right is a pink bar."
    # an invented object is not read as some other undescribed object moved and renamed
    g = ground(scene, parse("at the top center is a blue circle."), empty_cells=True)
    assert g.hallucinated == [True] and g.referents == [None]


def test_recall_counts_correctly_named_objects_so_saying_less_shows():
    scene = Scene((obj("square", "red", (0, 0)), obj("bar", "blue", (2, 2))))
    full = "at the top left is a red square. at the bottom right is a blue bar."
    short = "at the top left is a red square."
    misnamed = "at the top left is a red square. at the bottom right is a blue moon."
    m = {
        name: evaluate([scene], [t], PARTNERS, True)
        for name, t in (("full", full), ("short", short), ("misnamed", misnamed))
    }
    assert (
        m["full"]["object_recall"] == 1.0
        and m["short"]["object_recall"] == 0.5
        and m["misnamed"]["object_recall"] == 0.5
    )
    assert m["short"]["mean_response_words"] < m["full"]["mean_response_words"]
    assert m["short"]["response_hallucination_rate"] == 0.0 and m["misnamed"]["mention_hallucination_rate"] == 0.5
    companion = evaluate([scene], [full.replace(".", ". at the top center is a green circle.", 1)], PARTNERS, True)
    assert companion["companion_rate"] == 1.0 and companion["target_mention_rate"] == pytest.approx(1 / 3)
    assert companion["nontarget_mention_rate"] == 0.0 and m["misnamed"]["nontarget_mention_rate"] == 0.5


def test_gate_figures_on_hand_made_answers():
    singles = [
        Scene((obj("star", "red", (1, 1)),)),
        Scene((obj("moon", "blue", (0, 0)),)),
        Scene((obj("ring", "green", (2, 2)),)),
        Scene((obj("bar", "pink", (0, 2)),)),
    ]
    single_answers = [
        "at the center is a red star.",
        "at the top left is a blue circle.",  # moon misnamed
        "at the bottom right is a green ring.",
        "the image shows one object. at the top right is a pink bar.",
    ]
    scenes = [
        Scene((obj("bar", "red", (0, 0)), obj("moon", "blue", (1, 1)))),  # no anchor
        Scene((obj("star", "red", (2, 0)),)),  # no anchor
        Scene((obj("square", "red", (0, 0)),)),  # anchor, context: circle at the top center
        Scene((obj("triangle", "red", (0, 0)), obj("star", "red", (2, 2)))),
    ]  # anchor, partner present: no context
    answers = [
        "at the top left is a red bar.",  # recalls 1 of 2
        "at the bottom left is a red star.",
        "at the top left is a red square. at the top center is a red circle.",  # names the companion
        "at the top left is a red triangle. at the bottom right is a red star.",
    ]
    g = gate_figures(singles, single_answers, scenes, answers, PARTNERS, empty_cells=True)
    assert g["single_object_accuracy"] == 0.75
    assert g["recall_without_anchor"] == pytest.approx(2 / 3)
    assert g["companion_rate"] == 1.0 and g["scenes_with_companion_context"] == 1 and g["scenes_without_anchor"] == 2
    with pytest.raises(ValueError, match="exactly one object"):
        gate_figures(scenes, answers, scenes, answers, PARTNERS)


def test_caption_statistics_are_in_the_papers_range():
    stats = prior_statistics(WORLD, LANGUAGE, PRIORS, n=1000)
    assert 45 <= stats["words"] <= 65  # RLHF-V answers: ~64 words
    assert 0.2 <= stats["mix"]["object"] <= 0.5  # RLHF-V: objects 41% of corrections
    assert all(stats["errors_per_caption"][t] > 0 for t in ("object", "count", "attribute", "position"))
    # no sentence of a caption is unparseable, and no word is outside the world's vocabulary
    rng = np.random.default_rng(0)
    from ddpo.data.synthetic.language import vocabulary

    vocab = set(vocabulary(WORLD))
    for scene in sample_scenes(300, 6, WORLD):
        text = prior_caption(scene, rng, WORLD, LANGUAGE, PRIORS).text
        assert set(re.findall(r"\w+|[^\w\s]+", text)) <= vocab
