"""The papers' generation settings, each a named preset that `ddpo eval --protocol NAME` applies.

Hallucination rates depend on how answers are generated as much as on the model: a Muffin answer ends
with "\\n###" and no EOS, so without a stop string it runs on into invented "Human:" turns that get scored;
beam search and a repetition penalty change answer length and object mentions. A preset fixes every
setting the paper's released evaluation used, and `ddpo eval` records the resolved settings in its output
JSON (`generation`), so a number always says how its answers were made.

| preset         | template (image)                  | beams | new tokens | rep. pen. | stop          | images | batch |
|----------------|-----------------------------------|-------|------------|-----------|---------------|--------|-------|
| `rlhfv`        | `rlhfv_eval` (after the question) | 3     | 1024       | 1.1       | `###` (+ EOS) | resize | 1     |
| `rlaifv-llava` | `llava_v1` (before the question)  | 3     | 1024       | 1.0       | EOS           | pad    | 1     |

("batch": questions per forward pass of the model, `decode_batch_size`.)

`rlhfv` is for RLHF-V / Muffin models (Object HalBench, MMHal-Bench), `rlaifv-llava` for RLAIF-V's LLaVA-1.5 models.

Sources (docs/REPRODUCING.md has the commands): RLHF-V's `muffin/eval/muffin_vqa.py` builds
"{system}\\n###Human: {question}\\n<im_start><im_patch>x64<im_end>\\n###" (conversation `default` with
separator "\\n###"), generates with num_beams 3, max_new_tokens 1024, repetition_penalty 1.1, stops at
"###", cuts the answer there and drops the "Assistant:" the model writes; RLAIF-V's LLaVA-1.5 evaluation
uses the llava_v1 conversation, greedy beam search with 3 beams (temperature 0) and 1024 new tokens.
Images: Muffin's eval transform resizes to a square; RLAIF-V's LLaVA evaluation goes through LLaVA's
`process_images`, which pads to a square with the mean colour, although its DPO training (and the
llava-hf processor, hence a llava-hf checkpoint's default) centre-crops. A preset sets the mode for
generation only (`--image-mode` overrides it); the model's own mode is what it trains with.

Decode batch: both released evaluations generate one question per `generate` call (Muffin's
`muffin_vqa.py` reads questions with a DataLoader of batch_size 1; RLAIF-V's `muffin/eval/llava15_chair.py`
loops over them, one `unsqueeze(0)` sequence each), so nothing is padded.
Left padding changes greedy and beam-search outputs of some models in bfloat16 (ddpo/eval/generation.py), so
the presets decode one question at a time too; without a preset, `generation.DECODE_BATCH_SIZE` questions
share a forward pass (faster).

Without a preset, `ddpo eval` uses the model's template (the one it was trained with, else its
architecture's), that template's stop strings, greedy decoding and 512 new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddpo.eval.generation import DECODE_BATCH_SIZE


@dataclass(frozen=True)
class Protocol:
    """Generation settings of one paper's evaluation; None = the model's own (template) default."""

    template: str | None
    num_beams: int
    max_new_tokens: int
    repetition_penalty: float
    stop_strings: tuple[str, ...] | None  # None = the template's (data.templates.default_stop_strings)
    image_mode: str | None  # models.base.IMAGE_MODES; None = the model's
    source: str
    decode_batch_size: int = 1  # questions per forward pass: 1 = unpadded, as the released evaluations


PROTOCOLS: dict[str, Protocol] = {
    "rlhfv": Protocol(
        template="rlhfv_eval",
        num_beams=3,
        max_new_tokens=1024,
        repetition_penalty=1.1,
        stop_strings=("###",),
        image_mode="resize",
        source="RLHF-V (Muffin muffin_vqa.py): Object HalBench, MMHal-Bench",
    ),
    "rlaifv-llava": Protocol(
        template="llava_v1",
        num_beams=3,
        max_new_tokens=1024,
        repetition_penalty=1.0,
        stop_strings=(),
        image_mode="pad",
        source="RLAIF-V's LLaVA-1.5 evaluation (llava_v1, 3 beams, temperature 0)",
    ),
}
DEFAULT = Protocol(
    template=None,
    num_beams=1,
    max_new_tokens=512,
    repetition_penalty=1.0,
    stop_strings=None,
    image_mode=None,
    source="ddpo default: the model's template and stop strings, greedy",
    decode_batch_size=DECODE_BATCH_SIZE,
)


def resolve_protocol(name: str | None) -> Protocol:
    """The preset called `name`; None = the model's own settings (`DEFAULT`)."""
    if name is None:
        return DEFAULT
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol '{name}'; protocols are {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
