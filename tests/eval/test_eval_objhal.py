"""Object HalBench: CHAIR word pipeline, COCO ground truth, metrics by hand, the answers-file command."""

import json

import pytest

from ddpo.eval import objhal
from ddpo.eval.chair import ChairSample, chair_metrics, default_vocabulary, names_to_mentions, text_to_mentions
from ddpo.eval.cli import main as eval_main


def classes(text):
    return [c for _, c in text_to_mentions(text)]


def test_vocabulary_has_80_classes_and_bigram_rules():
    vocab = default_vocabulary()
    assert len(vocab.classes) == 80
    assert vocab.synonym_to_class["woman"] == "person" and vocab.synonym_to_class["bike"] == "bicycle"
    assert vocab.bigrams["baby elephant"] == "elephant" and vocab.bigrams["passenger train"] == "train"
    assert vocab.bigrams["wine glas"] == "wine glass" and vocab.bigrams["home plate"] == "home plate"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog and a frisbee.", ["dog", "frisbee"]),
        ("Two DOGS, three Frisbees!", ["dog", "frisbee"]),  # case, plurals
        ("A woman on a bike with children.", ["person", "bicycle", "person"]),  # synonyms; every mention counts
        ("A hot dog.", ["hot dog"]),  # bigram wins over "dog"
        ("A hot dog and a dog.", ["hot dog", "dog"]),
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A passenger jet.", ["airplane"]),
        ("A man in a bow tie.", ["person", "tie"]),
        ("Wine glasses on a dining table.", ["wine glass", "dining table"]),
        ("The toilet seat is up.", ["toilet"]),  # not a chair
        ("A seat next to the toilet.", ["toilet"]),  # "seat" dropped near a toilet
        ("A seat by the window.", ["chair"]),
        ("A train on the train tracks near home plate.", ["train"]),  # track/plate are not objects
        ("The dog's bowl.", ["dog", "bowl"]),  # possessive split off
        ("A corgi.", ["dog"]),  # vocabulary words are not re-lemmatized
        ("It is a sunny day.", []),
    ],
)
def test_text_to_mentions(text, expected):
    assert classes(text) == expected


def test_names_to_mentions_dedups_and_keeps_noun_compounds_whole():
    """RLHF-V's rules (tests/eval/test_chair_parity.py has more): an adjective is dropped ("red frisbee"), a
    noun compound outside the vocabulary is no mention ("baseball player" is not a person)."""
    mentions = names_to_mentions(["dog", "red frisbee", "dog", "hot dog", "toilet seat", "baseball player", "grass"])
    assert mentions == [("dog", "dog"), ("frisbee", "frisbee"), ("hot dog", "hot dog"), ("toilet", "toilet")]


def test_chair_metrics_by_hand():
    samples = [
        ChairSample([("dog", "dog"), ("frisbee", "frisbee")], {"dog"}, 5),  # 1 of 2 hallucinated
        ChairSample([("woman", "person"), ("bike", "bicycle")], {"person", "bicycle", "car"}, 5),
        ChairSample([], {"cat"}, 4),  # mentions nothing
        ChairSample([("cat", "cat"), ("cat", "cat"), ("sofa", "couch")], {"cat"}, 10),  # 1 of 3 hallucinated
    ]
    m = chair_metrics(samples)
    assert m["response_hallucination_rate"] == pytest.approx(2 / 3)
    assert m["mention_hallucination_rate"] == pytest.approx(2 / 7)
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx((1 + 2 + 0 + 1) / (1 + 3 + 1 + 1))
    assert m["mean_response_words"] == pytest.approx(24 / 4)
    assert chair_metrics([ChairSample([], {"dog"}, 0)])["response_hallucination_rate"] is None


def write_coco(dir_):
    """Two COCO splits: GT = instances ∪ objects of the reference captions."""
    cats = [
        {"id": 1, "name": "person"},
        {"id": 2, "name": "bicycle"},
        {"id": 18, "name": "dog"},
        {"id": 58, "name": "hot dog"},
        {"id": 70, "name": "toilet"},
    ]

    def instances(anns):
        images = sorted({a[0] for a in anns})
        return {
            "images": [{"id": i} for i in images],
            "categories": cats,
            "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)],
        }

    (dir_ / "instances_val2014.json").write_text(json.dumps(instances([(1, 18), (2, 1), (4, 70)])))
    (dir_ / "instances_train2014.json").write_text(json.dumps(instances([(3, 58)])))
    caps = [
        (1, "A dog lying on the grass."),
        (2, "A man riding a bike down the street."),
        (3, "A hot dog with mustard."),
        (4, "A white toilet with the seat up."),
    ]
    (dir_ / "captions_val2014.json").write_text(
        json.dumps({"annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(caps)]})
    )
    (dir_ / "captions_train2014.json").write_text(json.dumps({"annotations": []}))


ANSWERS = [
    (1, "A dog and a frisbee."),  # frisbee hallucinated: 1 of 2
    (2, "A woman rides a bicycle."),  # person (caption: man) + bicycle (caption: bike): correct
    (3, "A hot dog on a bun next to a dog."),  # dog hallucinated: 1 of 2
    (4, "The toilet seat is up and the seat is clean."),  # toilet only
    ("2", "It is a sunny day."),  # no COCO object; id as a string
]


def test_ground_truth_is_instances_plus_captions(tmp_path):
    write_coco(tmp_path)
    gt = objhal.load_ground_truth(tmp_path, [1, 2, 3, 4])
    assert gt == {1: {"dog"}, 2: {"person", "bicycle"}, 3: {"hot dog"}, 4: {"toilet"}}
    with pytest.raises(ValueError, match=r"image id\(s\) have no COCO annotation.*\[99\]"):
        objhal.load_ground_truth(tmp_path, [1, 99])
    with pytest.raises(FileNotFoundError, match="no instances_"):
        objhal.load_ground_truth(tmp_path / "missing", [1])


def test_answers_file_command_end_to_end(tmp_path, capsys):
    coco = tmp_path / "coco"
    coco.mkdir()
    write_coco(coco)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"image_id": i, "answer": a}) + "\n" for i, a in ANSWERS))
    out = tmp_path / "out" / "objhal.json"
    from ddpo.commands import main as ddpo_main  # the real `ddpo eval` dispatch

    assert (
        ddpo_main(
            [
                "eval",
                "--benchmark",
                "objhal",
                "--answers",
                str(answers),
                "--annotations",
                str(coco),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["response_hallucination_rate"] == pytest.approx(2 / 4)
    assert m["mention_hallucination_rate"] == pytest.approx(2 / 7)
    assert m["chair_s"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx((1 + 2 + 1 + 1 + 0) / (1 + 2 + 1 + 1 + 2))
    assert m["mean_response_words"] == pytest.approx((5 + 5 + 10 + 10 + 5) / 5)
    assert m["num_answers"] == 5 and m["extractor"] == "rules"
    samples = [json.loads(line) for line in (tmp_path / "out" / "objhal.samples.jsonl").read_text().splitlines()]
    assert samples[0]["hallucinated"] == [["frisbee", "frisbee"]]


def test_bad_answers_line_names_file_and_line(tmp_path, capsys):
    coco = tmp_path / "coco"
    coco.mkdir()
    write_coco(coco)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"image_id": 1, "answer": "ok"}) + "\n" + json.dumps({"image_id": "abc", "answer": "x"}) + "\n"
    )
    rc = eval_main(
        [
            "--benchmark",
            "objhal",
            "--answers",
            str(answers),
            "--annotations",
            str(coco),
            "--output",
            str(tmp_path / "o.json"),
        ]
    )
    assert rc == 1
    assert "answers.jsonl:2: field 'image_id'" in capsys.readouterr().err


def test_llm_extraction_through_fake_api(tmp_path, chat_server):
    coco = tmp_path / "coco"
    coco.mkdir()
    write_coco(coco)
    replies = {
        "A dog catches a red frisbee in the park.": '["dog", "red frisbee", "park", "dog"]',
        "A woman rides her bicycle downtown today.": 'Objects:\n["woman", "bicycle"]',
        "Some text the extractor cannot handle well.": "I cannot do that.",
    }

    def reply(body):
        prompt = body["messages"][0]["content"]
        assert body["messages"][0]["role"] == "system" and body["temperature"] == 0.2 and body["max_tokens"] == 512
        answer = next(a for a in replies if a in prompt)
        return chat_server.ok(replies[answer])

    chat_server.default = reply
    rows = [{"image_id": 1, "question": "Describe.", "answer": a} for a in replies] + [
        {"image_id": 2, "answer": "Just a man."}
    ]
    rows[1]["image_id"] = 2
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--benchmark",
        "objhal",
        "--answers",
        str(answers),
        "--annotations",
        str(coco),
        "--output",
        str(tmp_path / "o.json"),
        "--extractor",
        "llm",
        "--judge-model",
        "extractor-test",
        "--judge-base-url",
        chat_server.base_url,
        "--judge-api-key-env",
        "DDPO_TEST_JUDGE_KEY",
        "--max-unparsed",
        "0.5",
    ]
    assert eval_main(argv) == 0
    m = json.loads((tmp_path / "o.json").read_text())
    # answer 1: dog (ok), frisbee (hallucinated) after de-dup; answer 2: person, bicycle (ok);
    # answer 3: unparsed after 3 tries -> left out; answer 4: <= 3 words -> no objects, not sent.
    assert m["num_answers"] == 4 and m["num_scored"] == 3 and m["num_unparsed"] == 1
    assert m["unparsed_rate"] == pytest.approx(1 / 4)
    unparsed = [json.loads(line) for line in (tmp_path / "o.samples.jsonl").read_text().splitlines()][2]
    assert unparsed["unparsed"] and unparsed["extractor_reply"] == "I cannot do that."
    assert m["mention_hallucination_rate"] == pytest.approx(1 / 4)
    assert m["response_hallucination_rate"] == pytest.approx(1 / 2)
    assert m["extractor"] == "llm:extractor-test"
    assert len(chat_server.requests) == 2 + 3
    # re-running asks only for the unparsed answer again
    chat_server.requests.clear()
    assert eval_main(argv) == 0
    assert len(chat_server.requests) == 3


def test_answers_are_read_as_rlhfv_reads_them(tmp_path):
    """RLHF-V's load_generated_captions removes every "Assistant:" and strips; its avg_word_len counts the
    pieces between single spaces (a double space adds an empty piece)."""
    write_coco(tmp_path)
    rows = [{"image_id": 1, "answer": "Assistant: A dog  on the grass.\n"}]
    metrics, details = objhal.score_objhal(rows, tmp_path)
    assert details[0]["answer"] == "A dog  on the grass."
    assert metrics["mean_response_words"] == 6 and metrics["response_hallucination_rate"] == 0
    assert metrics["num_unparsed"] == 0 and metrics["unparsed_rate"] == 0
