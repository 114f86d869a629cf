"""Yes/no hallucination probes: POPE and AMBER's discriminative part.

Answer normalization (`normalize_yes_no`), applied to the model's free text:
1. lower-case, keep the first sentence (up to the first '.', '!', '?' or line break);
2. split into words (letters and apostrophes; punctuation and case are ignored);
3. the first word "yes" or "no" decides ("No, there is no dog." -> no; "Yes, though not ..." -> yes);
4. otherwise a negation anywhere in the sentence — "no", "not", or a word ending in "n't" — means no
   (LLaVA's POPE rule: "There is not a dog" -> no);
5. otherwise "yes" anywhere means yes; anything else is unparsed (`None`). Unparsed answers count as
   wrong in accuracy and recall (both are over the questions) and as neither yes nor no: `yes_ratio` is
   over the parsed answers (LLaVA's POPE script would count them as yes). `unparsed_rate` stands next to
   the scores; above `max_unparsed` of them `score_yes_no` raises UnparsedError instead of scoring.

Metrics treat one answer as the positive class: "yes" for POPE (the object is there), "no" for AMBER
(AMBER scores the detection of hallucination probes, so its precision/recall are about "no").
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpo.data.jsonl import json_objects
from ddpo.data.synthetic.metrics import DEFAULT_MAX_UNPARSED, check_unparsed

_SENTENCE_END = re.compile(r"[.!?\n]")
_WORD = re.compile(r"[a-z']+")


def normalize_yes_no(answer: str) -> str | None:
    """'yes', 'no' or None (see the module docstring for the rules)."""
    first_sentence = _SENTENCE_END.split(answer.strip().lower(), maxsplit=1)[0]
    words = _WORD.findall(first_sentence)
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if any(w in ("no", "not") or w.endswith("n't") for w in words):
        return "no"
    if "yes" in words:
        return "yes"
    return None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def yes_no_metrics(predictions: Sequence[str | None], labels: Sequence[str], positive: str = "yes") -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (of `positive`), yes-ratio (of the parsed answers), unparsed rate;
    fractions in [0, 1], null if undefined. `predictions`: normalized answers, None where unparsed."""
    if positive not in ("yes", "no"):
        raise ValueError(f"positive must be 'yes' or 'no', got {positive!r}")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pairs = list(zip(predictions, labels))
    tp = sum(p == positive and y == positive for p, y in pairs)
    fp = sum(p == positive and y != positive for p, y in pairs)
    fn = sum(p != positive and y == positive for p, y in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _ratio(sum(p == y for p, y in pairs), len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _ratio(sum(p == "yes" for p in predictions), sum(p is not None for p in predictions)),
        "positive": positive,
        "num_answers": len(pairs),
        "num_unparsed": sum(p is None for p in predictions),
        "unparsed_rate": _ratio(sum(p is None for p in predictions), len(predictions)),
    }


def score_yes_no(
    rows: Sequence[dict[str, Any]], positive: str, max_unparsed: float = DEFAULT_MAX_UNPARSED
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rows with 'answer' and 'label' (and optional 'category'): overall and per-category metrics;
    UnparsedError when more than `max_unparsed` of the answers say neither yes nor no."""
    details = []
    for i, row in enumerate(rows):
        label = str(row.get("label", "")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(
                f"row {i} (question_id {row.get('question_id')!r}): label must be 'yes' or 'no', "
                f"got {row.get('label')!r}"
            )
        if not isinstance(row.get("answer"), str):
            raise ValueError(f"row {i} (question_id {row.get('question_id')!r}): 'answer' must be a string")
        details.append({**row, "label": label, "prediction": normalize_yes_no(row["answer"])})
    check_unparsed(
        "POPE" if positive == "yes" else "AMBER",
        "no yes or no in the answer's first sentence",
        [
            (f"question {d.get('question_id', i)}", d["answer"])
            for i, d in enumerate(details)
            if d["prediction"] is None
        ],
        len(details),
        max_unparsed,
        "ask for a short answer (e.g. --prompt-suffix ' Answer yes or no.'), or check that the answers file "
        "holds the answers in 'answer' (or 'text' / 'response')",
    )
    metrics = yes_no_metrics([d["prediction"] for d in details], [d["label"] for d in details], positive)
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in details:
        if d.get("category") is not None:
            by_category[str(d["category"])].append(d)
    if by_category:
        metrics["per_category"] = {
            c: yes_no_metrics([d["prediction"] for d in ds], [d["label"] for d in ds], positive)
            for c, ds in sorted(by_category.items())
        }
    return metrics, details


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list or JSONL of objects."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    return [row for _, row in json_objects(path)]


def load_pope_questions(path: str | Path) -> list[dict[str, Any]]:
    """POPE question file (JSONL): {"question_id", "image", "text", "label"} (optional "category")."""
    questions = []
    for i, r in enumerate(read_records(path)):
        question = r.get("text", r.get("question"))
        if "question_id" not in r or "image" not in r or not isinstance(question, str) or "label" not in r:
            raise ValueError(f"{path}: record {i} needs 'question_id', 'image', 'text' and 'label' (POPE format)")
        questions.append(
            {
                "question_id": r["question_id"],
                "image": r["image"],
                "question": question,
                "label": r["label"],
                "category": r.get("category"),
            }
        )
    return questions


def load_amber_questions(query_path: str | Path, annotations_path: str | Path) -> list[dict[str, Any]]:
    """AMBER discriminative queries [{"id", "image", "query"}] joined with annotations.json, whose entry
    id − 1 holds {"type", "truth"}; the category is the annotation's type (existence, attribute-*, relation)."""
    annotations = read_records(annotations_path)
    questions = []
    for i, r in enumerate(read_records(query_path)):
        qid = r.get("id")
        if not isinstance(qid, int) or not 1 <= qid <= len(annotations):
            raise ValueError(
                f"{query_path}: record {i} has id {qid!r}, not an entry of {annotations_path} (1..{len(annotations)})"
            )
        truth = annotations[qid - 1]
        if str(truth.get("type", "")).startswith("generative"):
            raise ValueError(f"{query_path}: id {qid} is a generative AMBER query; use query_discriminative*.json")
        questions.append(
            {
                "question_id": qid,
                "image": r["image"],
                "question": r["query"],
                "label": truth["truth"],
                "category": truth["type"],
            }
        )
    return questions


def attach_answers(questions: Sequence[dict[str, Any]], answers_path: str | Path) -> list[dict[str, Any]]:
    """Join an answers file ({"question_id"|"id", "answer"|"text"|"response"}) to questions by id."""
    by_id = {q["question_id"]: q for q in questions}
    rows = []
    for i, a in enumerate(read_records(answers_path)):
        qid = a.get("question_id", a.get("id"))
        answer = a.get("answer", a.get("text", a.get("response")))
        if qid not in by_id:
            raise ValueError(f"{answers_path}: record {i} has question id {qid!r}, which is not in the question file")
        if not isinstance(answer, str):
            raise ValueError(f"{answers_path}: record {i} needs a string 'answer' (or 'text'/'response')")
        rows.append({**by_id[qid], "answer": answer})
    return rows
