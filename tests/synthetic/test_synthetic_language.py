import numpy as np
import pytest

from ddpo.data.synthetic.language import (
    CELLS,
    POSITIONS,
    LanguageConfig,
    build_tokenizer,
    describe,
    n_words,
    parse,
    relation_holds,
    vocabulary,
)
from ddpo.data.synthetic.noise import NoiseConfig, noisy_caption
from ddpo.data.synthetic.world import WorldConfig, sample_scenes

WORLD = WorldConfig()


@pytest.mark.parametrize("style", ["short", "detailed"])
def test_description_parses_back_to_exactly_the_scene(style):
    rng = np.random.default_rng(0)
    for scene in sample_scenes(300, 1, WORLD):
        p = parse(describe(scene, rng, LanguageConfig(style=style)))
        assert not p.unparsed
        described = sorted(
            (m.shape_name, m.color.text, m.size.text, CELLS[m.position_name]) for m in p.mentions if m.position
        )
        assert described == sorted((o.shape, o.color, o.size, o.cell) for o in scene.objects)
        for m in p.mentions:
            if m.number is not None:  # "there are two red circles"
                assert m.number == scene.count(m.shape_name, m.color.text)
        for s in p.sentences:
            if s.kind == "overview":
                assert s.total.text == ["zero", "one", "two", "three", "four"][len(scene.objects)]
        for r in p.relations:  # definite references are unique, so each picks one object
            a, b = (
                [
                    o
                    for o in scene.objects
                    if o.shape == m.shape_name and o.color == m.color.text and (m.size is None or o.size == m.size.text)
                ]
                for m in (p.mentions[r.subject], p.mentions[r.target])
            )
            assert len(a) == len(b) == 1 and relation_holds(r.relation, a[0].cell, b[0].cell)


def test_claims_carry_exact_spans():
    text = "there are two red circles. a small red circle is at the top left, next to nothing"
    p = parse(text)
    assert [(c.kind, c.value, text[c.span[0] : c.span[1]]) for c in p.claims] == [
        ("object", "circle", "circles"),
        ("color", "red", "red"),
        ("count", "2", "two"),
    ]
    assert [text[a:b] for a, b in p.unparsed] == ["a small red circle is at the top left, next to nothing"]
    rel = "the small red circle is to the left of the blue square."
    kinds = [(c.kind, c.value) for c in parse(rel).claims]
    assert ("relation", "to the left of") in kinds and kinds.count(("object", "circle")) == 1


def test_parser_reports_garbage_and_never_raises():
    for text in [
        "",
        ".",
        "red red red",
        "there is a",
        "a small red circle is at the",
        "the image shows objects.",
        "there is a red circle at the top left and and a square.",
        "?? ,, !!",
        "Circle. SQUARE is at top",
    ]:
        p = parse(text)
        assert all(0 <= a < b <= len(text) for a, b in p.unparsed)
    assert parse("").claims == [] and parse("").unparsed == []
    assert len(parse("red red red. there is a small red circle at the top left.").unparsed) == 1
    # the decoder's spacing does not matter: "circle." and "circle ." parse alike
    assert [c.value for c in parse("there is a red circle at the center .").claims] == ["circle", "red", "center"]


def test_detailed_length_follows_the_target():
    scenes = sample_scenes(300, 2, WORLD)
    means = {}
    for target in (30, 60, 100):
        rng = np.random.default_rng(0)
        means[target] = np.mean([n_words(describe(s, rng, LanguageConfig(target_words=target))) for s in scenes])
    assert 25 < means[30] <= 36  # four-object scenes cannot be shorter than their object sentences
    assert 55 < means[60] <= 60
    assert 80 < means[100] <= 100


def test_tokenizer_covers_every_word_and_round_trips_captions():
    tok = build_tokenizer(WORLD)
    assert tok.unk_token_id not in tok(" ".join(vocabulary(WORLD)))["input_ids"]
    rng = np.random.default_rng(0)
    for style in ("short", "detailed"):
        lang = LanguageConfig(style=style)
        for scene in sample_scenes(100, 3, WORLD):
            text = noisy_caption(scene, rng, WORLD, lang, NoiseConfig(object_insert_share=0.5)).text
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text  # what a model generates reads back as the same string
    assert set(POSITIONS.values()) <= set(CELLS)
