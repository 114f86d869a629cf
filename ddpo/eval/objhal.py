"""Object HalBench: COCO ground truth, object extraction from answers (rules or an LLM), CHAIR metrics.

Ground-truth objects of an image = classes of its COCO instance annotations (category names mapped
through the synonym list) ∪ objects found in its COCO reference captions by the rule-based word
pipeline (`chair.text_to_mentions`). RLHF-V reads `instances_{train,val}2014.json` and
`captions_{train,val}2014.json`; here every `instances_*.json` / `captions_*.json` in the directory is read.

Answers are read as RLHF-V's `load_generated_captions` does: every "Assistant:" removed, then stripped; an
answer's length is its count of single-space-separated pieces (`len(answer.split(" "))`, its `avg_word_len`).

Extraction can fail where the chat model's reply holds no JSON list (RLHF-V retried such replies up to 100
times and then stopped the whole run): those answers are left out of CHAIR, counted in `num_unparsed` and
`unparsed_rate` (share of all answers), and their last reply is kept in the details as `extractor_reply`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ddpo.data.jsonl import json_objects
from ddpo.eval.chair import (
    ASSETS,
    ChairSample,
    CocoVocabulary,
    chair_metrics,
    default_vocabulary,
    names_to_mentions,
    text_to_mentions,
)
from ddpo.eval.judge import JudgeCache, JudgeClient, cached_judge

LLM_EXTRACTOR_MODEL = "gpt-3.5-turbo-0613"  # RLHF-V's (retired); pass another with --judge-model
LLM_EXTRACTOR_TEMPERATURE = 0.2
LLM_EXTRACTOR_MAX_TOKENS = 512


@lru_cache(maxsize=1)
def description_prompts() -> list[str]:
    """The 8 Object HalBench instructions (RLHF-V paper, Table 6)."""
    return json.loads((ASSETS / "objhal_prompts.json").read_text(encoding="utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a COCO annotation file") from e


def _coco_files(annotations_dir: Path, kind: str) -> list[Path]:
    files = sorted(annotations_dir.glob(f"{kind}_*.json"))
    if not files:
        raise FileNotFoundError(
            f"no {kind}_*.json in {annotations_dir}: put the COCO 2014 annotations there "
            f"({kind}_train2014.json and {kind}_val2014.json from annotations_trainval2014.zip)"
        )
    return files


def load_ground_truth(
    annotations_dir: str | Path, image_ids: Sequence[int], vocab: CocoVocabulary | None = None
) -> dict[int, set[str]]:
    """COCO classes present in each requested image (instances ∪ reference captions)."""
    vocab = vocab or default_vocabulary()
    annotations_dir = Path(annotations_dir)
    wanted = set(image_ids)
    objects: dict[int, set[str]] = {i: set() for i in wanted}
    annotated: set[int] = set()
    for path in _coco_files(annotations_dir, "instances"):
        data = _read_json(path)
        try:
            names = {c["id"]: c["name"].lower() for c in data["categories"]}
            annotated.update(img["id"] for img in data.get("images", []) if img["id"] in wanted)
            for ann in data["annotations"]:
                if ann["image_id"] in wanted:
                    name = names[ann["category_id"]]
                    if name not in vocab.synonym_to_class:
                        raise ValueError(
                            f"{path}: category '{name}' is not in the synonym list; "
                            "use the COCO 2014 annotations or a synonym file that names it"
                        )
                    objects[ann["image_id"]].add(vocab.synonym_to_class[name])
                    annotated.add(ann["image_id"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a COCO instances file (missing {e}); expected 'categories', "
                "'annotations' with 'image_id' and 'category_id'"
            ) from e
    for path in _coco_files(annotations_dir, "captions"):
        data = _read_json(path)
        try:
            for ann in data["annotations"]:
                if ann["image_id"] in wanted:
                    objects[ann["image_id"]].update(c for _, c in text_to_mentions(ann["caption"], vocab))
                    annotated.add(ann["image_id"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a COCO captions file (missing {e}); expected 'annotations' with 'image_id' and 'caption'"
            ) from e
    missing = sorted(wanted - annotated)
    if missing:
        raise ValueError(
            f"{len(missing)} image id(s) have no COCO annotation in {annotations_dir} "
            f"(first: {missing[:5]}); Object HalBench images come from COCO train/val 2014"
        )
    return objects


def parse_object_list(reply: str) -> list[str] | None:
    """The JSON list of names in an extractor reply (whole reply, or a list on its last line); None if absent."""
    candidates = [reply.strip()]
    lines = reply.strip().splitlines()
    if lines:
        candidates.append(lines[-1].strip())
    match = re.search(r"\[[^\[\]]*\]", reply)
    if match:
        candidates.append(match.group(0))
    for text in candidates:
        if text in ("()", "[]"):  # the prompt itself shows "()" as the empty list
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return None


@lru_cache(maxsize=1)
def _extraction_template() -> str:
    return (ASSETS / "objhal_extraction_prompt.txt").read_text(encoding="utf-8")


def extraction_messages(question: str, answer: str) -> list[dict[str, str]]:
    template = _extraction_template()
    fields = {"question": question, "answer": answer}
    # One pass, so braces inside the answer are never substituted again.
    prompt = re.sub(r"\{(question|answer)\}", lambda m: fields[m.group(1)], template)
    return [{"role": "system", "content": prompt}]  # RLHF-V sends it as the system message


def extract_with_llm(
    client: JudgeClient, cache: JudgeCache, question: str, answer: str, item: Any = None
) -> tuple[list[str] | None, str]:
    """(object names, the model's last reply) for an answer; names [] for answers of <= 3 words, sent to no
    model (as RLHF-V), None when no reply held a JSON list of names."""
    if len(answer.split()) <= 3:
        return [], ""
    judgement = cached_judge(client, cache, item, extraction_messages(question, answer), parse_object_list)
    return judgement.parsed, judgement.reply


def read_objhal_answers(path: str | Path) -> list[dict[str, Any]]:
    """A model's Object HalBench answers JSONL: one {"image_id": int, "answer": str} per line (optional "question")."""
    return [normalize_answer_row(row, where) for where, row in json_objects(path)]


def normalize_answer_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Check an answer row and make `image_id` an int (RLHF-V casts it too); the answer loses every
    "Assistant:" and its outer whitespace, as RLHF-V reads answers files."""
    answer = row.get("answer", row.get("text"))
    if not isinstance(answer, str):
        raise ValueError(f"{where}: field 'answer' must be a string, got {answer!r}")
    image_id = row.get("image_id")
    try:
        image_id = int(image_id)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field 'image_id' must be a COCO image id (an integer), got {image_id!r}") from None
    return {**row, "image_id": image_id, "answer": answer.replace("Assistant:", "").strip()}


def score_objhal(
    rows: Sequence[dict[str, Any]],
    annotations_dir: str | Path,
    extractor: tuple[JudgeClient, JudgeCache] | None = None,
    vocab: CocoVocabulary | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-answer details. `extractor=None`: rule-based mentions (every occurrence counts);
    else (client, cache): LLM-extracted names, de-duplicated per answer. Unparsed extractions are left
    out of the metrics and counted in `num_unparsed`."""
    vocab = vocab or default_vocabulary()
    rows = [normalize_answer_row(r, f"answer {i}") for i, r in enumerate(rows)]
    ground_truth = load_ground_truth(annotations_dir, [r["image_id"] for r in rows], vocab)
    samples: list[ChairSample] = []
    details: list[dict[str, Any]] = []
    unparsed = 0
    for i, row in enumerate(rows):
        extra: dict[str, Any] = {}
        if extractor is None:
            mentions = text_to_mentions(row["answer"], vocab)
        else:
            names, reply = extract_with_llm(
                *extractor, row.get("question", ""), row["answer"], item={"index": i, "image_id": row["image_id"]}
            )
            if names is None:
                unparsed += 1
                details.append({**row, "unparsed": True, "extractor_reply": reply})
                continue
            mentions = names_to_mentions(names, vocab)
            extra["extracted_names"] = names
        sample = ChairSample(mentions, ground_truth[row["image_id"]], len(row["answer"].split(" ")))
        samples.append(sample)
        details.append(
            {
                **row,
                **extra,
                "mentions": [list(m) for m in mentions],
                "hallucinated": [list(m) for m in sample.hallucinated],
                "ground_truth": sorted(sample.ground_truth),
            }
        )
    metrics: dict[str, Any] = dict(chair_metrics(samples))
    metrics["num_answers"] = len(rows)
    metrics["num_scored"] = len(samples)
    metrics["num_unparsed"] = unparsed
    metrics["unparsed_rate"] = unparsed / len(rows) if rows else None
    metrics["extractor"] = "rules" if extractor is None else f"llm:{extractor[0].model}"
    return metrics, details
