"""The unparsed rule where `ddpo eval` applies it itself: Object HalBench's LLM extraction (score_objhal counts
the unparsed extractions; the command refuses a score above --max-unparsed)."""

import json

import pytest

from ddpo.eval.cli import main as eval_main

CAT = "A cat sleeps on the sofa today."  # an answer the fake extractor cannot read


def write_coco(dir_):
    """One image (id 1) holding a dog."""
    (dir_ / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1}],
                "categories": [{"id": 18, "name": "dog"}],
                "annotations": [{"id": 0, "image_id": 1, "category_id": 18}],
            }
        )
    )
    (dir_ / "captions_val2014.json").write_text(
        json.dumps({"annotations": [{"id": 0, "image_id": 1, "caption": "A dog."}]})
    )


def test_objhal_llm_extractions_above_the_limit_give_an_error(tmp_path, chat_server, capsys):
    # 20 answers; the extractor answers "I cannot do that." for those naming a cat: 2 of 20 = 10% > 5%
    write_coco(tmp_path)
    chat_server.default = lambda body: chat_server.ok(
        "I cannot do that." if CAT in body["messages"][0]["content"] else '["dog"]'
    )
    answers = [f"A dog runs on the grass, picture {i}." for i in range(20)]
    answers[5] = answers[9] = CAT
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"image_id": 1, "answer": a}) + "\n" for a in answers))
    out = tmp_path / "o.json"
    argv = ["--benchmark", "objhal", "--answers", str(path), "--annotations", str(tmp_path), "--output", str(out)]
    argv += ["--extractor", "llm", "--judge-model", "extractor-test", "--judge-base-url", chat_server.base_url]
    argv += ["--judge-api-key-env", "DDPO_TEST_JUDGE_KEY"]
    assert eval_main(argv) == 1
    assert capsys.readouterr().err == (
        "ddpo eval: error: Object HalBench (llm:extractor-test): 2 of 20 answers (10.0%) are unparsed (the "
        "extractor's reply holds no JSON list of object names), more than max_unparsed 0.05 allows "
        "(--max-unparsed), so no score is given. First 2: image 1: 'I cannot do that.'; image 1: 'I cannot do "
        "that.'. Fix: extract with a chat model that answers with a JSON list (--judge-model), or with the rules "
        "(--extractor rules); unparsed replies are not cached, so a re-run asks only for those; to score the "
        "parsed answers anyway, raise max_unparsed (below 1).\n"
    )
    assert not out.exists()
    # with a limit of 0.1 the 18 parsed answers are scored: each names the dog, which is there
    assert eval_main(argv + ["--max-unparsed", "0.1"]) == 0
    m = json.loads(out.read_text())
    assert m["num_unparsed"] == 2 and m["unparsed_rate"] == pytest.approx(0.1) and m["num_scored"] == 18
    assert m["response_hallucination_rate"] == 0.0
