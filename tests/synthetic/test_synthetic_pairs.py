import numpy as np

from ddpo.data.records import PreferenceRecord
from ddpo.data.synthetic.annotator import correct
from ddpo.data.synthetic.language import PROMPTS, LanguageConfig, build_tokenizer
from ddpo.data.synthetic.pairs import SyntheticConfig, records_from_answers, sft_examples, synthetic_records
from ddpo.data.synthetic.world import Scene, WorldConfig, WorldObject, render


def test_sft_examples_are_deterministic_and_well_formed():
    a, b = sft_examples(20, 3), sft_examples(20, 3)
    assert [e.caption for e in a] == [e.caption for e in b]
    assert [e.image.tobytes() for e in a] == [e.image.tobytes() for e in b]
    assert [e.caption for e in a] != [e.caption for e in sft_examples(20, 4)]
    assert all(e.prompt in PROMPTS["detailed"] and e.image.size == (64, 64) for e in a)
    short = sft_examples(5, 3, SyntheticConfig(language=LanguageConfig(style="short")))
    assert all(e.prompt in PROMPTS["short"] and e.caption.startswith("there is ") for e in short)


def test_synthetic_records_are_minimal_corrections_with_at_least_one_error():
    records = synthetic_records(40, 0)
    again = synthetic_records(40, 0)
    assert [(r.chosen, r.rejected) for r in records] == [(r.chosen, r.rejected) for r in again]
    tok = build_tokenizer(WorldConfig())
    for i, r in enumerate(records):
        assert isinstance(r, PreferenceRecord) and r.row_index == i and len(r.images) == 1
        assert r.chosen != r.rejected and r.meta["errors"] and r.meta["corrections"]
        assert correct(r.meta["scene"], r.chosen).status == "clean"
        assert tok.unk_token_id not in tok(r.prompt + " " + r.chosen + " " + r.rejected)["input_ids"]
    # most pairs are replacements (chosen as long as rejected in words), as configured by default
    same_length = np.mean([len(r.chosen.split()) == len(r.rejected.split()) for r in records])
    assert same_length > 0.5


def test_records_from_answers_counts_every_outcome():
    scene = Scene((WorldObject("circle", "red", "small", (0, 0)), WorldObject("square", "blue", "large", (2, 2))))
    image = render(scene, WorldConfig())
    answers = [
        "there is a small red circle at the top left and a large blue square at the bottom right.",  # clean
        "there is a small red circle at the top left and a large blue square at the center.",  # 1 position error
        # 1 object rewritten
        "there is a small red circle at the top left and a small green triangle at the top right.",
        "circle circle circle",  # unparseable
    ]
    records, stats = records_from_answers([scene] * 4, [image] * 4, ["describe the image in detail."] * 4, answers)
    assert [r.row_index for r in records] == [1, 2]
    assert (
        records[0].chosen == answers[0] and records[1].chosen == answers[0]
    )  # the triangle became the undescribed square
    assert stats["answers"] == 4 and stats["pairs"] == 2 and stats["clean"] == 1 and stats["unparseable"] == 1
    assert stats["corrections"] == {"object": 1, "position": 1} and stats["corrections_per_pair"] == 1.0
    assert stats["rejected_words"] == (18 + 19) / 2 and stats["chosen_words"] == (19 + 19) / 2
