"""`ddpo score`: the DPO implicit reward of candidate answers, r = beta * (log pi(y|x) - log pi_ref(y|x)).

A policy trained with (dense) DPO defines a reward model for free: DPO's optimum satisfies
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + const(x), so comparing this quantity across answers to the
same prompt ranks them by the reward the policy was trained to follow (RLAIF-V uses it for best-of-N
selection at inference time; `ddpo.online.best_of_n`). Three variants over the answer tokens t:

    sum      beta * sum_t (log pi_t - log pi_ref_t)              the sequence log-ratio (DPO's reward)
    mean     beta * mean_t (log pi_t - log pi_ref_t)             length-normalised (no bonus for length)
    segment  beta * sum_t w_t (log pi_t - log pi_ref_t)          DDPO-style: w_t = gamma on tokens that
             differ from a reference answer (data.segments' token diff; replacements only), 1 elsewhere;
             without a reference answer every w_t is 1 (= sum)

Only differences between answers to the same prompt are meaningful (the const(x) cancels).

The RLAIF-V reward (RLAIF-V's `data_engine/pipeline/dpo_reward_pipeline/reward_computer.py`) is this with
RLAIF-V-12B as the policy and OmniLMM-12B as the reference, over an answer's tokens and the EOS ending it:
its `sum` is `sum` at beta 0.1 and its length-normalised `avg` is `mean` at beta 0.1 times another 0.1 (the
same ranking). The paper's best-of-N uses the length-normalised reward (the sum prefers short answers):

    ddpo score --policy openbmb/RLAIF-V-12B --reference openbmb/OmniLMM-12B --template omnilmm \
        --variant mean --answers candidates.jsonl --image-dir IMAGES

    ddpo score --policy RUN/final --reference SFT --answers answers.jsonl --image-dir IMAGES \
        [--output scored.jsonl] [--beta 0.1] [--variant sum|mean|segment] [--gamma 5] \
        [--template vicuna_v0] [--batch-size 16] [--device cuda] [--dtype auto|float32|bfloat16]

Answers JSONL, one object per line:
    image       path of the image, relative to --image-dir
    question    the prompt (or `prompt`)
    answer      one candidate answer (a string), or `answers`: a list of candidates
    reference   optional: a reference answer for the `segment` variant's weights
The output repeats every row with `reward` (for `answer`) or `rewards` (for `answers`) added; by default
it is written next to the answers as `<name>.scored.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ddpo.data.images import DataError, ImageDir, decode_image
from ddpo.data.jsonl import jsonl_lines, parse_json_object
from ddpo.data.segments import token_corrections
from ddpo.data.templates import TEMPLATES, encode_answer
from ddpo.models.base import answer_token_logps
from ddpo.models.build import open_checkpoint, resolve_dtype
from ddpo.token_weights import token_weights

VARIANTS = ("sum", "mean", "segment")


def segment_weights(
    tokenizer, template: str, answer: str, reference_answer: str | None, gamma: float, min_match: int = 3
) -> torch.Tensor:
    """[n_answer_tokens] weights of `answer`: gamma where its tokens replace tokens of `reference_answer`
    (RLHF-V's token diff), 1 elsewhere; all ones without a reference answer. The same corrected mask ->
    weights path as training (`data.segments` finds the tokens, `ddpo.token_weights.token_weights` weighs them)."""
    ids = encode_answer(template, tokenizer, answer)
    corrected = [False] * len(ids)
    if reference_answer is not None:
        corrected, _ = token_corrections(ids, encode_answer(template, tokenizer, reference_answer), min_match)
    return token_weights(torch.ones(len(ids), dtype=torch.bool), torch.tensor(corrected, dtype=torch.bool), gamma)


@dataclass(frozen=True)
class RewardSettings:
    """How the implicit reward of an answer is computed (module doc): the policy's DPO `beta`, the
    `variant` over its answer tokens, the `segment` variant's `gamma`, the conversation `template` the
    policy was trained with, and how many answers go through a model at once (`batch_size`)."""

    beta: float
    template: str
    variant: str = "sum"
    gamma: float = 5.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"RewardSettings.variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        if not self.beta > 0:
            raise ValueError(f"RewardSettings.beta must be > 0 (the beta the policy was trained with), got {self.beta}")
        if self.batch_size < 1:
            raise ValueError(f"RewardSettings.batch_size must be >= 1, got {self.batch_size}")


def implicit_rewards(
    policy,
    reference,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: Sequence[str],
    settings: RewardSettings,
    reference_answers: Sequence[str | None] | None = None,
) -> list[float]:
    """The implicit reward of each answer (module doc): a list of floats, one per answer.

    `policy` and `reference` are `PreferenceModel`s sharing a tokenizer; `reference_answers` (one per
    answer, entries may be None) only matter for the `segment` variant.
    """
    if reference_answers is not None and len(reference_answers) != len(answers):
        raise ValueError(
            f"{len(reference_answers)} reference answers for {len(answers)} answers; give one (or None) per answer"
        )
    template, batch_size = settings.template, settings.batch_size
    policy_logps = answer_token_logps(policy, images, prompts, answers, template, batch_size)
    reference_logps = answer_token_logps(reference, images, prompts, answers, template, batch_size)
    weights = None
    if settings.variant == "segment":
        references = reference_answers if reference_answers is not None else [None] * len(answers)
        weights = [
            segment_weights(policy.tokenizer, template, answer, reference_answer, settings.gamma)
            for answer, reference_answer in zip(answers, references)
        ]
    return rewards_from_logps(policy_logps, reference_logps, settings.beta, settings.variant, weights)


def rewards_from_logps(
    policy_logps: Sequence[torch.Tensor],
    reference_logps: Sequence[torch.Tensor],
    beta: float,
    variant: str = "sum",
    weights: Sequence[torch.Tensor] | None = None,
) -> list[float]:
    """The implicit reward of each answer from its per-token log-probs under the policy and the reference
    (module doc); `weights` (one [n_answer_tokens] tensor per answer, `segment_weights`) only for `segment`.
    Lets one reference pass serve several policies and variants."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    if variant == "segment" and (weights is None or len(weights) != len(policy_logps)):
        raise ValueError("the segment variant needs one weight tensor per answer (segment_weights)")
    rewards = []
    for i, (p, r) in enumerate(zip(policy_logps, reference_logps, strict=True)):
        if p.shape != r.shape:
            raise ValueError(
                f"answer {i}: the policy sees {len(p)} answer tokens, the reference {len(r)}; "
                "the two models must share a tokenizer (the reference is the policy's starting model)"
            )
        ratio = p - r
        if variant == "sum":
            value = ratio.sum()
        elif variant == "mean":
            value = ratio.mean()
        else:
            if weights[i].shape != ratio.shape:
                raise ValueError(f"answer {i}: {len(weights[i])} weights for {len(ratio)} answer tokens")
            value = (weights[i] * ratio).sum()
        rewards.append(beta * float(value))
    return rewards


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def read_candidate_answers(path: Path, image_dir: Path) -> tuple[list[dict], list[Image.Image]]:
    """Rows of `ddpo score`'s answers JSONL (module doc: one prompt, image and candidate answer(s) per
    row) and their images; a bad row raises DataError naming it."""
    rows, images = [], []
    folder = ImageDir(Path(image_dir), "--image-dir", "set by --image-dir")
    for i, line in jsonl_lines(path):
        where = f"row {i} (line {i + 1}) of {path}"
        row = parse_json_object(line, where)
        question = row.get("question", row.get("prompt"))
        if not isinstance(question, str):
            raise DataError(
                f"{where}, field 'question': missing or not a string; give the prompt as `question` (or `prompt`)"
            )
        has_one, has_many = isinstance(row.get("answer"), str), isinstance(row.get("answers"), list)
        if has_one == has_many:
            raise DataError(
                f"{where}, field 'answer'/'answers': give exactly one of `answer` (a string) "
                "or `answers` (a list of strings)"
            )
        if has_many and not all(isinstance(a, str) for a in row["answers"]):
            raise DataError(f"{where}, field 'answers': every candidate must be a string")
        if row.get("reference") is not None and not isinstance(row["reference"], str):
            raise DataError(f"{where}, field 'reference': must be a string (a reference answer) or absent")
        if not isinstance(row.get("image"), str):
            raise DataError(f"{where}, field 'image': missing; give the image path relative to --image-dir")
        image_path = folder.resolve(row["image"])
        if not image_path.is_file():
            raise folder.missing(row["image"], where, "image")
        images.append(decode_image(path=image_path, where=where, field="image"))
        rows.append(row)
    return rows, images


def score_rows(policy, reference, rows: list[dict], images: list[Image.Image], settings: RewardSettings) -> list[dict]:
    """Rows with `reward` / `rewards` added; all candidates of all rows are scored in shared batches."""
    flat_images, flat_prompts, flat_answers, flat_refs, owners = [], [], [], [], []
    for k, (row, image) in enumerate(zip(rows, images)):
        candidates = [row["answer"]] if isinstance(row.get("answer"), str) else row["answers"]
        for answer in candidates:
            flat_images.append(image)
            flat_prompts.append(row.get("question", row.get("prompt")))
            flat_answers.append(answer)
            flat_refs.append(row.get("reference"))
            owners.append(k)
    rewards = implicit_rewards(policy, reference, flat_images, flat_prompts, flat_answers, settings, flat_refs)
    per_row: list[list[float]] = [[] for _ in rows]
    for k, reward in zip(owners, rewards):
        per_row[k].append(reward)
    out = []
    for row, values in zip(rows, per_row):
        scored = dict(row)
        if isinstance(row.get("answer"), str):
            scored["reward"] = values[0]
        else:
            scored["rewards"] = values
        out.append(scored)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddpo score",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--policy", required=True, help="trained policy directory (e.g. RUN/final)")
    parser.add_argument("--reference", required=True, help="its reference (starting) model directory")
    parser.add_argument("--answers", required=True, help="answers JSONL (schema below)")
    parser.add_argument("--image-dir", required=True, help="folder that the rows' `image` paths are relative to")
    parser.add_argument(
        "--output", default=None, help="scored JSONL (default: <answers>.scored.jsonl next to the answers)"
    )
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta the policy was trained with (default 0.1)")
    parser.add_argument("--variant", choices=VARIANTS, default="sum")
    parser.add_argument(
        "--gamma", type=float, default=5.0, help="segment variant: weight of tokens that differ from `reference`"
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="vicuna_v0",
        help="the conversation template the policy was trained with (omnilmm for OmniLMM / RLAIF-V-12B)",
    )
    parser.add_argument("--device", default=None, help="where both models run (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weights of both models: auto = bfloat16 on a GPU that supports it, else float32",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)

    answers_path = Path(args.answers)
    output = Path(args.output) if args.output else answers_path.with_name(answers_path.stem + ".scored.jsonl")
    try:
        settings = RewardSettings(args.beta, args.template, args.variant, args.gamma, args.batch_size)
        rows, images = read_candidate_answers(answers_path, Path(args.image_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"ddpo score: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype)  # two 12B models in float32 would need ~96 GB
    policy = open_checkpoint("--policy", args.policy, dtype=dtype, device=device)
    reference = open_checkpoint("--reference", args.reference, dtype=dtype, device=device)
    scored = score_rows(policy, reference, rows, images, settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for row in scored:
            f.write(json.dumps(row) + "\n")
    n_answers = sum(len(r.get("rewards", [0])) for r in scored)
    print(f"scored {n_answers} answers of {len(scored)} rows ({args.variant}, beta {args.beta}) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
