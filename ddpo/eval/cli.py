"""`ddpo eval`: generate answers for a benchmark and score them, or score an existing answers file.

    ddpo eval --benchmark objhal --answers ANSWERS.jsonl --annotations COCO_DIR --output OUT.json
    ddpo eval --benchmark objhal --model CKPT --questions Q.jsonl --image-dir IMGS --annotations COCO_DIR \
        --output OUT.json
    ddpo eval --benchmark mmhal  --model CKPT --image-dir MMHAL_IMAGES --output OUT.json   (judge key: $OPENAI_API_KEY)
    ddpo eval --benchmark pope   --model CKPT --questions coco_pope_random.jsonl --image-dir val2014 --output OUT.json
    ddpo eval --benchmark amber  --answers A.json --questions query_discriminative.json \
        --annotations annotations.json --output OUT.json
    ddpo eval --benchmark synthetic --model demo_output/runs/ddpo/final --max-new-tokens 84 --template llava_v1 \
        --output OUT.json
    ddpo eval --benchmark objhal --protocol rlhfv --model RLHF-V_CKPT ...
        (RLHF-V's prompt layout, 3 beams, 1024 tokens, rep. 1.1, stop ###)

Generation settings: a --protocol preset (ddpo/eval/protocols.py: the papers' settings), each of which
--template / --num-beams / --max-new-tokens / --repetition-penalty / --stop / --image-mode overrides; without a
preset, the model's template and its stop strings, greedy, 512 new tokens. The resolved settings are written to
OUT.json under "generation".

Writes OUT.json (metrics; rates are fractions in [0, 1]), OUT.samples.jsonl (per-answer scoring details)
and, when generating, OUT.answers.jsonl (the answers, re-scorable with --answers).

Unparsed answers (synthetic: a sentence outside the world's grammar; POPE/AMBER: no yes or no; MMHal-Bench:
no "Rating: N" in the judge's reply; Object HalBench --extractor llm: no JSON list in the extractor's reply)
are counted in every OUT.json as `num_unparsed` and `unparsed_rate`. When more than --max-unparsed of them
(default 0.05) are unparsed, no score is given: `ddpo eval` exits 1 with an error naming the count and the
first few, and writes no OUT.json / OUT.samples.jsonl (an answers file it generated is kept). Judge verdicts are
cached in OUT.judge_cache.jsonl (or --judge-cache): a re-run only asks for what is not judged yet.

A benchmark is an entry of BENCHMARKS: name -> Benchmark(questions, read_answers, score), three plain
functions of the parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ddpo.data.jsonl import json_objects
from ddpo.data.synthetic.metrics import (
    DEFAULT_MAX_UNPARSED,
    UnparsedError,
    check_max_unparsed,
    check_unparsed,
    evaluate,
)
from ddpo.data.templates import default_stop_strings
from ddpo.eval import mmhal, objhal, protocols, yesno
from ddpo.eval.generation import generate_answers
from ddpo.eval.judge import DEFAULT_BASE_URL, JudgeCache, JudgeClient, JudgeError
from ddpo.lab.settings import DemoSettings
from ddpo.lab.world import split, synthetic_config
from ddpo.models.base import GenerationOptions
from ddpo.models.build import open_checkpoint, resolve_dtype

Rows = list[dict[str, Any]]


class Benchmark(NamedTuple):
    questions: Callable[[argparse.Namespace], Rows]  # rows with "image" (path) and "question" (prompt)
    read_answers: Callable[[argparse.Namespace], Rows]  # rows of an answers file, ready for `score`
    score: Callable[[argparse.Namespace, Rows], tuple[dict[str, Any], Rows]]


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--benchmark {args.benchmark} needs {', '.join(missing)}")


def _image_path(args: argparse.Namespace, name: str) -> str:
    return str(Path(args.image_dir) / name) if args.image_dir else name


def _judge_client(
    args: argparse.Namespace, default_model: str, temperature: float, max_tokens: int | None
) -> JudgeClient:
    return JudgeClient(
        model=args.judge_model or default_model,
        base_url=args.judge_base_url,
        api_key_env=args.judge_api_key_env,
        temperature=temperature,
        max_tokens=max_tokens,
        timeout_s=args.judge_timeout,
        max_retries=args.judge_retries,
        requests_per_minute=args.judge_rpm,
    )


def _judge_cache(args: argparse.Namespace) -> JudgeCache:
    return JudgeCache(args.judge_cache or _sibling(args.output, ".judge_cache.jsonl"))


# --- Object HalBench -------------------------------------------------------------------------------
def _objhal_questions(args: argparse.Namespace) -> Rows:
    """--questions JSONL: {"image_id", "image"[, "question"]}; a missing question gets prompt i mod 8."""
    _require(args, "questions", "image_dir")
    prompts = objhal.description_prompts()
    rows = []
    for i, r in enumerate(yesno.read_records(args.questions)):
        if "image_id" not in r or "image" not in r:
            raise ValueError(f"{args.questions}: record {i} needs 'image_id' and 'image' (a file in --image-dir)")
        rows.append(
            {
                "image_id": r["image_id"],
                "image": _image_path(args, r["image"]),
                "question": r.get("question") or prompts[i % len(prompts)],
            }
        )
    return rows


def _objhal_score(args: argparse.Namespace, rows: Rows) -> tuple[dict[str, Any], Rows]:
    _require(args, "annotations")
    extractor = None
    if args.extractor == "llm":
        client = _judge_client(
            args, objhal.LLM_EXTRACTOR_MODEL, objhal.LLM_EXTRACTOR_TEMPERATURE, objhal.LLM_EXTRACTOR_MAX_TOKENS
        )
        extractor = (client, _judge_cache(args))
    metrics, details = objhal.score_objhal(rows, args.annotations, extractor)
    # score_objhal leaves unparsed extractions out of CHAIR and counts them; the limit is applied here.
    check_unparsed(
        f"Object HalBench ({metrics['extractor']})",
        "the extractor's reply holds no JSON list of object names",
        [(f"image {d['image_id']}", d.get("extractor_reply") or d["answer"]) for d in details if d.get("unparsed")],
        len(details),
        args.max_unparsed,
        "extract with a chat model that answers with a JSON list (--judge-model), or with the rules "
        "(--extractor rules); unparsed replies are not cached, so a re-run asks only for those",
    )
    metrics.setdefault("unparsed_rate", metrics["num_unparsed"] / len(details) if details else None)
    return metrics, details


# --- MMHal-Bench -----------------------------------------------------------------------------------
def _mmhal_image(args: argparse.Namespace, record: dict[str, Any]) -> str:
    """The image of a record in --image-dir: the file name of `image_src`, else `{image_id}.jpg/.png`."""
    names = [Path(str(record.get("image_src", ""))).name] + [
        f"{record.get('image_id')}{ext}" for ext in (".jpg", ".png")
    ]
    for name in filter(None, names):
        if (Path(args.image_dir) / name).exists():
            return str(Path(args.image_dir) / name)
    raise FileNotFoundError(f"no image for MMHal question '{record['question']}' in {args.image_dir} (tried {names})")


def _mmhal_questions(args: argparse.Namespace) -> Rows:
    _require(args, "image_dir")
    return [
        {"index": i, "question_type": r["question_type"], "question": r["question"], "image": _mmhal_image(args, r)}
        for i, r in enumerate(mmhal.load_questions(args.questions))
    ]


def _mmhal_read_answers(args: argparse.Namespace) -> Rows:
    questions = mmhal.load_questions(args.questions)
    return [{"index": i, "answer": a} for i, a in enumerate(mmhal.read_mmhal_answers(args.answers, questions))]


def _mmhal_score(args: argparse.Namespace, rows: Rows) -> tuple[dict[str, Any], Rows]:
    questions = mmhal.load_questions(args.questions)
    client = _judge_client(args, mmhal.JUDGE_MODEL, temperature=0.0, max_tokens=None)
    answers = [r["answer"] for r in sorted(rows, key=lambda r: r["index"])]
    return mmhal.score_mmhal(questions, answers, client, _judge_cache(args), max_unparsed=args.max_unparsed)


# --- POPE / AMBER ----------------------------------------------------------------------------------
def _pope_questions(args: argparse.Namespace) -> Rows:
    _require(args, "questions")
    return [{**q, "image": _image_path(args, q["image"])} for q in yesno.load_pope_questions(args.questions)]


def _amber_questions(args: argparse.Namespace) -> Rows:
    _require(args, "questions", "annotations")
    return [
        {**q, "image": _image_path(args, q["image"])}
        for q in yesno.load_amber_questions(args.questions, args.annotations)
    ]


def _yesno_read_answers(load_questions: Callable[[argparse.Namespace], Rows]) -> Callable[[argparse.Namespace], Rows]:
    def read(args: argparse.Namespace) -> Rows:
        if args.questions is None:  # a file written by `ddpo eval` carries its labels
            return yesno.read_records(args.answers)
        return yesno.attach_answers(load_questions(args), args.answers)

    return read


# --- synthetic world --------------------------------------------------------------------------------
def _synthetic_split(args: argparse.Namespace):
    """The `ddpo demo` test split of seed --seed (scenes, images, prompts): same images as the demo's."""
    scenes, images, prompts, _ = split(DemoSettings(seed=args.seed), "test", args.num_images)
    return scenes, images, prompts


def _synthetic_world():
    """The demo world's anchor -> companion map and whether its texts may say a cell is empty."""
    cfg = synthetic_config(DemoSettings())
    return cfg.world.partners, cfg.empty_cells


def _synthetic_questions(args: argparse.Namespace) -> Rows:
    _, images, prompts = _synthetic_split(args)
    image_dir = _sibling(args.output, ".images")
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        image.save(image_dir / f"{i:05d}.png")
        rows.append({"index": i, "image": str(image_dir / f"{i:05d}.png"), "question": prompt})
    return rows


def _synthetic_read_answers(args: argparse.Namespace) -> Rows:
    rows = []
    for where, row in json_objects(args.answers):
        if not isinstance(row.get("index"), int) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{where}: needs an integer 'index' (test image) and a string 'answer'")
        rows.append(row)
    return rows


def _synthetic_score(args: argparse.Namespace, rows: Rows) -> tuple[dict[str, Any], Rows]:
    args.num_images = max(args.num_images, 1 + max(r["index"] for r in rows))
    scenes, _, _ = _synthetic_split(args)
    answers = [r["answer"] for r in rows]
    metrics = evaluate([scenes[r["index"]] for r in rows], answers, *_synthetic_world(), args.max_unparsed)
    return metrics, [{"index": r["index"], "answer": r["answer"]} for r in rows]


BENCHMARKS: dict[str, Benchmark] = {
    "synthetic": Benchmark(_synthetic_questions, _synthetic_read_answers, _synthetic_score),
    "objhal": Benchmark(_objhal_questions, lambda a: objhal.read_objhal_answers(a.answers), _objhal_score),
    "mmhal": Benchmark(_mmhal_questions, _mmhal_read_answers, _mmhal_score),
    "pope": Benchmark(
        _pope_questions,
        _yesno_read_answers(_pope_questions),
        lambda a, rows: yesno.score_yes_no(rows, "yes", a.max_unparsed),
    ),
    "amber": Benchmark(
        _amber_questions,
        _yesno_read_answers(_amber_questions),
        lambda a, rows: yesno.score_yes_no(rows, "no", a.max_unparsed),
    ),
}


# --- command line ----------------------------------------------------------------------------------
def _sibling(output: str, suffix: str) -> Path:
    out = Path(output)
    return out.with_name(out.stem + suffix)


def _share_below_one(text: str) -> float:
    """--max-unparsed's type: a share in [0, 1), checked before any answer is generated or judged."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}; give a share in [0, 1), e.g. 0.05") from None
    try:
        return check_max_unparsed(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpo eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (models.build.load_model) to generate answers with")
    src.add_argument("--answers", help="score this answers file instead of generating")
    p.add_argument("--output", required=True, help="metrics JSON; OUT.samples.jsonl / OUT.answers.jsonl go next to it")
    p.add_argument(
        "--questions",
        help="objhal: JSONL {image_id, image[, question]}; mmhal: template JSON (default: the shipped 96); "
        "pope: JSONL {question_id, image, text, label}; amber: query_discriminative*.json",
    )
    p.add_argument(
        "--annotations",
        help="objhal: directory with COCO instances_*.json and captions_*.json; amber: annotations.json",
    )
    p.add_argument("--image-dir", help="folder that question image names are relative to")
    p.add_argument(
        "--num-images", type=int, default=600, help="synthetic: test images of the `ddpo demo` world (seed --seed)"
    )
    p.add_argument(
        "--max-unparsed",
        type=_share_below_one,
        default=DEFAULT_MAX_UNPARSED,
        help="give no score, but an error naming them, when more than this share of the answers is unparsed "
        "(default %(default)s; below 1)",
    )
    p.add_argument(
        "--extractor",
        choices=["rules", "llm"],
        default="rules",
        help="objhal object extraction: rule-based CHAIR (offline) or a chat model",
    )
    _add_judge_arguments(p)
    _add_generation_arguments(p)
    return p


def _add_judge_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge / LLM extractor (OpenAI-compatible chat completions)")
    g.add_argument(
        "--judge-model",
        help=f"default: {mmhal.JUDGE_MODEL} (mmhal), {objhal.LLM_EXTRACTOR_MODEL} (objhal) "
        "— the papers' models, since retired",
    )
    g.add_argument("--judge-base-url", default=DEFAULT_BASE_URL)
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--judge-rpm", type=float, default=None, help="at most this many requests per minute")
    g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument(
        "--judge-retries", type=int, default=5, help="retries of failed requests (429/5xx/timeouts), with backoff"
    )
    g.add_argument("--judge-cache", help="JSONL cache of judged items (default OUT.judge_cache.jsonl)")


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    gen = p.add_argument_group(
        "generation (defaults: the --protocol preset, else the model's template, greedy, 512 tokens)"
    )
    gen.add_argument(
        "--protocol",
        choices=sorted(protocols.PROTOCOLS),
        default=None,
        help="a paper's evaluation settings: rlhfv (Muffin/RLHF-V), rlaifv-llava (RLAIF-V, LLaVA-1.5)",
    )
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on a GPU that supports it",
    )
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=None, help="RLHF-V and RLAIF-V evaluate with 3 beams")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="RLHF-V evaluates with 1.1")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--stop",
        action="append",
        default=None,
        help="stop string (repeatable); default: the template's ('###' for vicuna_v0/rlhfv_eval, "
        "none for EOS templates)",
    )
    gen.add_argument(
        "--image-mode",
        choices=["pad", "crop", "resize"],
        default=None,
        help="how non-square images become square (default: the protocol's, else the model's)",
    )
    gen.add_argument(
        "--template", default=None, help="conversation template (default: the protocol's, else the model's)"
    )
    gen.add_argument("--prompt-suffix", default="", help="appended to every question, e.g. ' Answer yes or no.'")


def eval_generation_options(args: argparse.Namespace, model_template: str) -> GenerationOptions:
    """The settings answers are generated with: the preset, each flag given overriding it; the template
    falls back to the model's and the stop strings to the template's."""
    preset = protocols.resolve_protocol(args.protocol)
    template = args.template or preset.template or model_template
    if args.stop is not None:
        stops = list(args.stop)
    elif preset.stop_strings is not None:
        stops = list(preset.stop_strings)
    else:
        stops = list(default_stop_strings(template))
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    return GenerationOptions(
        max_new_tokens=pick(args.max_new_tokens, preset.max_new_tokens),
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=pick(args.num_beams, preset.num_beams),
        repetition_penalty=pick(args.repetition_penalty, preset.repetition_penalty),
        seed=args.seed,
        stop_strings=stops,
        template=template,
        batch_size=args.batch_size,
    )


def _generate(args: argparse.Namespace, bench: Benchmark) -> Rows:
    questions = bench.questions(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = open_checkpoint("--model", args.model, dtype=resolve_dtype(args.dtype), device=device)
    options = eval_generation_options(args, model.template)
    protocol = protocols.resolve_protocol(args.protocol)
    image_mode = args.image_mode or protocol.image_mode
    if image_mode:
        model.image_transform = replace(model.image_transform, mode=image_mode)
    # the papers' protocols decode one question at a time, as their originals do (padding moves greedy answers)
    decode = {"decode_batch_size": protocol.decode_batch_size}
    args.generation = {"protocol": args.protocol, **asdict(options), "image_mode": model.image_transform.mode, **decode}
    answers_path = _sibling(args.output, ".answers.jsonl")
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    with answers_path.open("w", encoding="utf-8") as f:

        def write(start: int, answers: list[str]) -> None:
            for q, a in zip(questions[start : start + len(answers)], answers):
                f.write(json.dumps({**q, "answer": a}, ensure_ascii=False) + "\n")
            f.flush()

        answers = generate_answers(
            model,
            [q["image"] for q in questions],
            [q["question"] + args.prompt_suffix for q in questions],
            options,
            on_batch=write,
            **decode,
        )
    print(f"ddpo eval: wrote {len(answers)} answers to {answers_path}")
    return [{**q, "answer": a} for q, a in zip(questions, answers)]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    try:
        rows = _generate(args, bench) if args.model else bench.read_answers(args)
        metrics, details = bench.score(args, rows)
    except (ValueError, FileNotFoundError, JudgeError) as e:
        kept = ""
        if isinstance(e, UnparsedError) and args.model:
            kept = f" The answers are kept in {_sibling(args.output, '.answers.jsonl')} (re-score with --answers)."
        print(f"ddpo eval: error: {e}{kept}", file=sys.stderr)
        return 1
    metrics = {"benchmark": args.benchmark, **metrics, "source": args.model or args.answers}
    if getattr(args, "generation", None):
        metrics["generation"] = args.generation
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with _sibling(args.output, ".samples.jsonl").open("w", encoding="utf-8") as f:
        for d in details:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    return 0
