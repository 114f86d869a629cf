"""POPE / AMBER yes-no: answer normalization and metrics by hand; AMBER files end to end."""

import json
import random

import pytest

from ddpo.data.synthetic.metrics import UnparsedError
from ddpo.eval.cli import main as eval_main
from ddpo.eval.yesno import normalize_yes_no, score_yes_no, yes_no_metrics


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  YES!", "yes"),
        ("No", "no"),
        ("no, there is a cat.", "no"),
        ("Yes, although it is not large.", "yes"),  # first word decides
        ("There is not a dog in the image.", "no"),  # negation in the first sentence
        ("There isn't a dog.", "no"),
        ("There is a dog. There is no cat.", None),  # only the first sentence counts; no yes/no there
        ("I think yes.", "yes"),
        ("A dog.", None),
        ("", None),
    ],
)
def test_normalize_yes_no(answer, expected):
    assert normalize_yes_no(answer) == expected


def test_metrics_by_hand_for_both_positive_classes():
    labels = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "no", None]
    pope = yes_no_metrics(preds, labels, positive="yes")  # tp 1, fp 1, fn 2 (a "no" and the unparsed)
    assert pope["accuracy"] == pytest.approx(2 / 5)
    assert pope["precision"] == pytest.approx(1 / 2)
    assert pope["recall"] == pytest.approx(1 / 3)
    assert pope["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    # yes_ratio is over the 4 parsed answers (2 say yes); accuracy and recall count the unparsed one as wrong
    assert pope["yes_ratio"] == pytest.approx(2 / 4) and pope["num_unparsed"] == 1
    assert pope["unparsed_rate"] == pytest.approx(1 / 5)
    amber = yes_no_metrics(preds, labels, positive="no")  # tp 1 (idx 3), fp 1 (idx 1), fn 1 (idx 2)
    assert (amber["precision"], amber["recall"], amber["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    none_positive = yes_no_metrics(["no", "no"], ["no", "no"], positive="yes")
    assert none_positive["precision"] is None and none_positive["recall"] is None and none_positive["accuracy"] == 1.0


def test_metrics_match_naive_confusion_counts():
    rng = random.Random(0)
    labels = [rng.choice(["yes", "no"]) for _ in range(200)]
    preds = [rng.choice(["yes", "no", None]) for _ in range(200)]
    m = yes_no_metrics(preds, labels, "yes")
    tp = fp = fn = tn = 0
    for p, y in zip(preds, labels):
        if p == "yes":
            tp, fp = tp + (y == "yes"), fp + (y == "no")
        elif p == "no":
            fn, tn = fn + (y == "yes"), tn + (y == "no")
        else:
            fn += y == "yes"
    assert m["accuracy"] == pytest.approx((tp + tn) / 200)
    assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))


def test_amber_answers_end_to_end(tmp_path, capsys):
    annotations = [
        {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "no"},
        {"id": 5, "type": "discriminative-attribute-state", "truth": "yes"},
    ]
    queries = [{"id": i, "image": f"AMBER_{i}.jpg", "query": f"Is there thing {i} in this image?"} for i in range(2, 6)]
    responses = [
        {"id": 2, "response": "No"},
        {"id": 3, "response": "No"},
        {"id": 4, "response": "No"},
        {"id": 5, "response": "Yes"},
    ]
    for name, data in [("annotations.json", annotations), ("query.json", queries), ("responses.json", responses)]:
        (tmp_path / name).write_text(json.dumps(data))
    assert (
        eval_main(
            [
                "--benchmark",
                "amber",
                "--answers",
                str(tmp_path / "responses.json"),
                "--questions",
                str(tmp_path / "query.json"),
                "--annotations",
                str(tmp_path / "annotations.json"),
                "--output",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "a.json").read_text())
    # "no" is AMBER's positive class: tp 2 (ids 2, 4), fp 1 (id 3), fn 0
    assert m["accuracy"] == pytest.approx(3 / 4) and m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["per_category"]["discriminative-hallucination"]["accuracy"] == 0.5
    assert m["per_category"]["discriminative-attribute-state"]["accuracy"] == 1.0

    (tmp_path / "query_gen.json").write_text(json.dumps([{"id": 1, "image": "AMBER_1.jpg", "query": "Describe."}]))
    assert (
        eval_main(
            [
                "--benchmark",
                "amber",
                "--answers",
                str(tmp_path / "responses.json"),
                "--questions",
                str(tmp_path / "query_gen.json"),
                "--annotations",
                str(tmp_path / "annotations.json"),
                "--output",
                str(tmp_path / "b.json"),
            ]
        )
        == 1
    )
    assert "id 1 is a generative AMBER query" in capsys.readouterr().err


def test_unparsed_answers_above_the_limit_give_an_error(tmp_path, capsys):
    rows = [{"question_id": i, "answer": "Yes" if i % 2 else "No", "label": "yes"} for i in range(20)]
    rows[3]["answer"] = "A dog."  # 1 of 20 = 5%: not above the limit
    m, details = score_yes_no(rows, "yes")
    assert m["num_unparsed"] == 1 and m["unparsed_rate"] == 0.05 and details[3]["prediction"] is None
    assert m["accuracy"] == pytest.approx(9 / 20) and m["yes_ratio"] == pytest.approx(9 / 19)
    rows[4]["answer"] = "I cannot tell from this picture, sorry."  # 2 of 20 = 10%
    with pytest.raises(UnparsedError) as caught:
        score_yes_no(rows, "yes")
    assert (caught.value.count, caught.value.total) == (2, 20)
    assert caught.value.examples == [("question 3", "A dog."), ("question 4", rows[4]["answer"])]
    # the command: exit 1, the message, no OUT.json
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.json"
    assert eval_main(["--benchmark", "pope", "--answers", str(answers), "--output", str(out)]) == 1
    assert capsys.readouterr().err == (
        "ddpo eval: error: POPE: 2 of 20 answers (10.0%) are unparsed (no yes or no in the answer's first sentence), "
        "more than max_unparsed 0.05 allows (--max-unparsed), so no score is given. First 2: question 3: 'A dog.'; "
        "question 4: 'I cannot tell from this picture, sorry.'. Fix: ask for a short answer (e.g. --prompt-suffix "
        "' Answer yes or no.'), or check that the answers file holds the answers in 'answer' (or 'text' / "
        "'response'); to score the parsed answers anyway, raise max_unparsed (below 1).\n"
    )
    assert not out.exists()
    argv = ["--benchmark", "pope", "--answers", str(answers), "--output", str(out), "--max-unparsed", "0.1"]
    assert eval_main(argv) == 0
    assert json.loads(out.read_text())["unparsed_rate"] == 0.1


@pytest.mark.parametrize("value", ["1", "1.5", "-0.01", "five"])
def test_max_unparsed_flag_is_a_share_below_one(value, capsys):
    with pytest.raises(SystemExit) as caught:
        eval_main(["--benchmark", "pope", "--answers", "a.jsonl", "--output", "o.json", "--max-unparsed", value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-unparsed:" in err and "[0, 1)" in err
