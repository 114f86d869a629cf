"""MMHal-Bench: rating parsing, scores by hand, judged end to end against the fake API."""

import json
import re

import pytest

from ddpo.eval import mmhal
from ddpo.eval.cli import main as eval_main


def test_shipped_questions_and_prompt():
    questions = mmhal.load_questions()
    assert len(questions) == 96
    assert {q["question_type"] for q in questions} == {
        "attribute",
        "adversarial",
        "comparison",
        "counting",
        "relation",
        "environment",
        "holistic",
        "other",
    }
    (message,) = mmhal.judge_messages(questions[0], "The cap is {yellow}.")
    assert message["role"] == "user"
    assert message["content"].endswith(
        "### Image Contents\nFire hydrant\n\n### Question\nWhat color is the fire hydrant cap in the picture?\n\n"
        "### Standard Human-Generated Answer\nThe color of the fire hydrant cap in the image is yellow.\n\n"
        "### LMM Response to Evaluate\nThe cap is {yellow}.\n"
    )
    assert "- Rating: 6, very informative with good analysis or reasoning, no hallucination" in message["content"]


@pytest.mark.parametrize(
    "reply, rating",
    [
        ("The answer is accurate.\nRating: 5, very informative, no hallucination", 5),
        ("rating:3", 3),
        ("**Rating:** 2", 2),
        ("Rating: 4. Again, Rating: 4", 4),
        ("Rating: 2 or maybe Rating: 5", None),  # two different ratings
        ("Rating: 4.5", None),
        ("Rating: 7", None),
        ("I would rate it highly.", None),
    ],
)
def test_parse_rating(reply, rating):
    assert mmhal.parse_rating(reply) == rating


def test_metrics_by_hand():
    # The original evaluator (MMHal-Bench eval_gpt4.py) scores an unparsed reply 0: ratings 6 2 4 0 0 3.
    m = mmhal.mmhal_metrics([6, 2, 4, None, 0, 3], ["a", "a", "b", "b", "c", "c"])
    assert m["average_score"] == pytest.approx(15 / 6)
    assert m["hallucination_rate"] == pytest.approx(3 / 6)  # 2, the unparsed 0 and 0
    # informativeness: 6 -> 3/3, 2 -> 2/3, 4 -> 1/3, unparsed -> 0, 0 -> 0, 3 -> 0
    assert m["informativeness"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 6)
    assert m["num_unparsed"] == 1 and m["num_answers"] == 6 and m["unparsed_rate"] == pytest.approx(1 / 6)
    assert m["per_type"] == {
        "a": {"average_score": 4.0, "hallucination_rate": 0.5, "count": 2, "unparsed": 0},
        "b": {"average_score": 2.0, "hallucination_rate": 0.5, "count": 2, "unparsed": 1},
        "c": {"average_score": 1.5, "hallucination_rate": 0.5, "count": 2, "unparsed": 0},
    }
    empty = mmhal.mmhal_metrics([], [])
    assert empty["average_score"] is None and empty["unparsed_rate"] is None


def test_scores_answers_file_with_fake_judge(tmp_path, chat_server):
    questions = mmhal.load_questions()
    # The "bad" answers below go to the questions at index % 8 == 1: all 12 adversarial ones.
    assert [i for i, q in enumerate(questions) if q["question_type"] == "adversarial"] == list(range(1, 96, 8))

    # The judge rates by the answer text: "good i" -> 6, "bad i" -> 1, "odd" -> unparseable.
    def reply(body):
        assert body["temperature"] == 0.0 and body["model"] == "gpt-4-test"
        answer = body["messages"][0]["content"].rsplit("### LMM Response to Evaluate\n", 1)[1].strip()
        if answer.startswith("good"):
            return chat_server.ok("Accurate and detailed.\nRating: 6, very informative with good analysis")
        if answer.startswith("bad"):
            return chat_server.ok("Claims a dog that is not there. Rating: 1")
        return chat_server.ok("Hard to say.")

    chat_server.default = reply
    answers = ["good" if i % 8 == 0 else "bad" if i % 8 == 1 else "odd" if i == 2 else "good" for i in range(96)]
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_text(
        "".join(json.dumps({"index": i, "answer": f"{a} {i}"}) + "\n" for i, a in enumerate(answers))
    )
    argv = [
        "--benchmark",
        "mmhal",
        "--answers",
        str(answers_file),
        "--output",
        str(tmp_path / "m.json"),
        "--judge-model",
        "gpt-4-test",
        "--judge-base-url",
        chat_server.base_url,
        "--judge-api-key-env",
        "DDPO_TEST_JUDGE_KEY",
    ]
    assert eval_main(argv) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    # 12 "bad" (type adversarial, index % 8 == 1) rated 1, 83 rated 6; question 2 (comparison) unparsed after
    # 3 asks: it scores 0, as in the original evaluator, and 1 of 96 is below the 5% limit
    assert m["num_unparsed"] == 1 and m["unparsed_rate"] == pytest.approx(1 / 96)
    assert m["average_score"] == pytest.approx((12 * 1 + 83 * 6 + 0) / 96)
    assert m["hallucination_rate"] == pytest.approx((12 + 1) / 96)
    assert m["informativeness"] == pytest.approx((12 * 1 / 3 + 83 * 1 + 0) / 96)
    assert m["per_type"]["adversarial"] == {"average_score": 1.0, "hallucination_rate": 1.0, "count": 12, "unparsed": 0}
    assert m["per_type"]["comparison"] == {
        "average_score": pytest.approx(11 * 6 / 12),
        "hallucination_rate": pytest.approx(1 / 12),
        "count": 12,
        "unparsed": 1,
    }
    assert len(chat_server.requests) == 95 + 3
    details = [json.loads(x) for x in (tmp_path / "m.samples.jsonl").read_text().splitlines()]
    assert details[2]["rating"] is None and details[2]["judge_reply"] == "Hard to say."

    chat_server.requests.clear()  # re-run: all parsed verdicts come from the cache
    assert eval_main(argv) == 0
    assert len(chat_server.requests) == 3
    assert json.loads((tmp_path / "m.json").read_text())["average_score"] == pytest.approx(m["average_score"])


def test_template_answers_must_keep_question_order(tmp_path):
    questions = mmhal.load_questions()
    records = [{**q, "model_answer": "x"} for q in questions]
    records[0], records[1] = records[1], records[0]
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=re.escape("record 0 asks")):
        mmhal.read_mmhal_answers(path, questions)
    records[0], records[1] = records[1], records[0]
    path.write_text(json.dumps(records))
    assert mmhal.read_mmhal_answers(path, questions) == ["x"] * 96


def test_too_many_unparsed_ratings_give_an_error_not_a_score(tmp_path, chat_server, capsys):
    """6 of 96 judge replies hold no rating: 6.25% > 5% -> exit 1, the count and the first replies named,
    no OUT.json; with --max-unparsed 0.1 the same replies score 0 each."""
    chat_server.default = lambda body: chat_server.ok(
        "Hard to say." if "### LMM Response to Evaluate\nodd" in body["messages"][0]["content"] else "Fine. Rating: 4"
    )
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_text(
        "".join(json.dumps({"index": i, "answer": "odd" if i < 6 else "plain"}) + "\n" for i in range(96))
    )
    out = tmp_path / "m.json"
    argv = ["--benchmark", "mmhal", "--answers", str(answers_file), "--output", str(out), "--judge-model", "gpt-4-test"]
    argv += ["--judge-base-url", chat_server.base_url, "--judge-api-key-env", "DDPO_TEST_JUDGE_KEY"]
    assert eval_main(argv) == 1
    assert capsys.readouterr().err == (
        "ddpo eval: error: MMHal-Bench (judge gpt-4-test): 6 of 96 answers (6.2%) are unparsed (the judge's reply "
        'names no single "Rating: N" after 3 asks), more than max_unparsed 0.05 allows (--max-unparsed), so no '
        "score is given. First 3: question 0: 'Hard to say.'; question 1: 'Hard to say.'; question 2: 'Hard to "
        'say.\'. Fix: judge with a model that ends its reply with "Rating: N" as the prompt asks (--judge-model); '
        "unparsed replies are not cached, so a re-run asks only for those; to score the parsed answers anyway, "
        "raise max_unparsed (below 1).\n"
    )
    assert not out.exists() and not (tmp_path / "m.samples.jsonl").exists()
    assert eval_main(argv + ["--max-unparsed", "0.1"]) == 0
    m = json.loads(out.read_text())
    assert m["num_unparsed"] == 6 and m["unparsed_rate"] == pytest.approx(6 / 96)
    assert m["average_score"] == pytest.approx(90 * 4 / 96) and m["hallucination_rate"] == pytest.approx(6 / 96)
    assert m["informativeness"] == pytest.approx(90 * (1 / 3) / 96)
