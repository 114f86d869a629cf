"""Conversation templates: a question + image -> prompt token ids; an answer -> labelled token ids.

Templates (the `data.template` config values):
  vicuna_v0      Muffin / RLHF-V:  "<s>{system}\\n\\n### Human: {image}\\n{question}\\n### Assistant:"
                                   + " {answer}\\n###"
  llava_v1       LLaVA-1.5:        "<s>{system} USER: {image}\\n{question} ASSISTANT:" + " {answer}" + "</s>"
  chat_template  the tokenizer's own `apply_chat_template`, the user turn being [image part, text part]
  rlhfv_eval     generation only, RLHF-V's evaluation prompt (Muffin `muffin_vqa.py`): the image *after*
                 the question, "<s>{system}\\n###Human: {question}\\n{image}\\n###"; the model writes
                 "Assistant: ..." itself and stops at the next "###" (see ddpo/eval/protocols.py)

`chat_template` and BOS/EOS: many multimodal chat templates (llava-hf's among them) render neither BOS
nor EOS, so the prompt gets the tokenizer's BOS here unless the rendered text already starts with it,
and the labelled answer ends with EOS unless the template already put it there (whitespace the template
adds after the answer is dropped). llava-hf's template has no system prompt either; for LLaVA-1.5's
training layout use `llava_v1`.

The prompt and the answer are tokenized separately (`add_special_tokens=False`; BOS/EOS are added
here explicitly), so the prompt ids of a pair's chosen and rejected sequences are identical and the
answer ids are exactly the labelled tokens. The split sits before the space that starts the answer, so
byte-level BPE tokenizers (which attach a leading space to the next word) tokenize the two parts as
they would the whole text.

Difference from the original Muffin code: there, the `### Assistant:` role prefix was labelled too
(LLaVA-v0 masking); here only the answer and the end marker are, unless `data.label_span: muffin`
(`role_prefix_length` counts those tokens).

Multi-turn prompts (`history`: the turns before the final user turn, `PreferenceRecord.history`) are
rendered in full, as the templates' original code renders conversations:
  vicuna_v0      "<s>{system}\n\n### Human: {image}\n{q1}\n### Assistant: {a1}\n### Human: {q2}\n### Assistant:"
                 (Muffin's `_add_speaker_and_signal`)
  llava_v1       "<s>{system} USER: {image}\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:" (LLaVA's
                 SeparatorStyle.TWO; "</s>" is the tokenizer's EOS text, checked to tokenize as the EOS id)
  chat_template  `apply_chat_template` on the whole conversation (the answer text checked to render as
                 after one user turn)
The image placeholder goes into the user turn that holds the image (the first one in most data), where
the template puts it in a single-turn prompt; a system message replaces the default system prompt.
Earlier assistant turns are part of the prompt ids, never labelled. `rlhfv_eval` renders one turn only.

`image_placeholder` is the model's text for one image, already expanded to its number of image tokens
(LLaVA: N x "<image>"; Muffin: "<im_start>" + 64 x "<im_patch>" + "<im_end>"). `check_image_tokens`
verifies that a prompt holds exactly those ids, contiguously.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ddpo.data.images import DataError
from ddpo.data.records import check_history

Span = tuple[int, int]

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# OmniLMM-12B / RLAIF-V-12B's system message (RLAIF-V omnilmm/train/train_utils.py `omni_preprocess`).
OMNILMM_SYSTEM_PROMPT = (
    "You are an artificial intelligence assistant, which gives helpful, detailed, and polite answers to the "
    "human's questions."
)
IMAGE_MARKER = "<image>"  # what a chat template must render for an image content part


@dataclass(frozen=True)
class TextTemplate:
    prompt: str  # with {system}, {image}, {question}; ends with the assistant role prefix
    answer: str | None  # with {answer}: the labelled text; None = a generation-only template
    append_eos: bool  # end the answer with the tokenizer's EOS id
    stop_strings: tuple[str, ...] = ()  # generation stops here (templates whose answers end without EOS)
    generated_prefix: str = ""  # a role prefix the model writes itself before its answer (removed from answers)
    role_prefix: str = ""  # the assistant role prefix ending the prompt (labelled too by Muffin's code)
    turn_start: str = ""  # where each user turn starts in `prompt`; '' = the template renders one turn only
    turn_end: str = ""  # what ends an earlier assistant turn in a multi-turn prompt ('{eos}': the EOS token)
    system: str = SYSTEM_PROMPT  # the default system message ({system})


TEXT_TEMPLATES = {
    "vicuna_v0": TextTemplate(
        "{system}\n\n### Human: {image}\n{question}\n### Assistant:",
        " {answer}\n###",
        append_eos=False,
        stop_strings=("###",),
        role_prefix="### Assistant:",
        turn_start="### Human: ",
        turn_end="\n",
    ),
    "llava_v1": TextTemplate(
        "{system} USER: {image}\n{question} ASSISTANT:",
        " {answer}",
        append_eos=True,
        turn_start="USER: ",
        turn_end="{eos}",
    ),
    # OmniLMM (Zephyr's chat template as omni_preprocess renders it: system, user turn = image + "\n" + question,
    # generation prompt; the answer ends with EOS).
    "omnilmm": TextTemplate(
        "<|system|>\n{system}</s>\n<|user|>\n{image}\n{question}</s>\n<|assistant|>\n",
        "{answer}",
        append_eos=True,
        turn_start="<|user|>\n",
        turn_end="{eos}\n",
        system=OMNILMM_SYSTEM_PROMPT,
    ),
    "rlhfv_eval": TextTemplate(
        "{system}\n###Human: {question}\n{image}\n###",
        None,
        append_eos=False,
        stop_strings=("###",),
        generated_prefix="Assistant:",
    ),
}
TRAINING_TEMPLATES = (*(name for name, t in TEXT_TEMPLATES.items() if t.answer is not None), "chat_template")
TEMPLATES = (*TRAINING_TEMPLATES, *(name for name, t in TEXT_TEMPLATES.items() if t.answer is None))


def _fill(text: str, **values: str) -> str:
    # str.replace, not str.format: questions and answers may contain braces.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template '{template}'; templates are {', '.join(TEMPLATES)}")


def _check_trainable(template: str) -> None:
    _check_template(template)
    if template not in TRAINING_TEMPLATES:
        raise ValueError(
            f"template '{template}' is a generation prompt only (an evaluation protocol's layout) and labels "
            f"no answers; train with one of {', '.join(TRAINING_TEMPLATES)}"
        )


def default_stop_strings(template: str) -> tuple[str, ...]:
    """Where generation with `template` ends besides EOS: '###' for the Vicuna-v0 layouts, whose answers
    carry no EOS (without it, answers run on into invented 'Human:' turns)."""
    _check_template(template)
    return TEXT_TEMPLATES[template].stop_strings if template in TEXT_TEMPLATES else ()


def generated_prefix(template: str) -> str:
    """The role prefix a model writes itself before its answer under `template` ('' for most)."""
    _check_template(template)
    return TEXT_TEMPLATES[template].generated_prefix if template in TEXT_TEMPLATES else ""


def _chat_messages(question: str, answer: str | None = None, history: Sequence[dict] | None = None) -> list[dict]:
    """The conversation as chat messages; the image part first in the content of the turn holding it."""
    history = list(history or ())
    turns = [*history, {"role": "user", "content": question, "image": not any(t.get("image") for t in history)}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return [
        {
            "role": turn["role"],
            "content": [*([{"type": "image"}] if turn.get("image") else []), {"type": "text", "text": turn["content"]}],
        }
        for turn in turns
    ]


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str | None = None, history: Sequence[dict] | None = None
) -> str:
    """The chat template's text of the conversation: up to the generation prompt, or with `answer`."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.template 'chat_template' needs a tokenizer with a chat template, and this one has none; use "
            "data.template vicuna_v0, llava_v1 or omnilmm, or a tokenizer that ships a chat template"
        )
    messages = _chat_messages(question, answer, history)
    if not history:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    except Exception as e:  # jinja's raise_exception (e.g. 'System role not supported'), any template error
        raise DataError(
            f"the tokenizer's chat template cannot render this {len(messages)}-message conversation "
            f"({type(e).__name__}: {str(e)[:200]}); drop the turns it refuses or use data.template vicuna_v0/llava_v1"
        ) from None


def _text_turns(
    template: str, tokenizer: PreTrainedTokenizerBase, history: list[dict], question: str
) -> tuple[str, list[tuple[str, str, bool]]]:
    """A text template's multi-turn prompt: (system text, [(role, text, holds the image), ...]), checked."""
    spec = TEXT_TEMPLATES[template]
    if not spec.turn_start:
        raise DataError(
            f"template '{template}' renders one user turn only and this prompt has {len(history) + 1} messages; "
            "use data.template vicuna_v0, llava_v1 or chat_template"
        )
    if "{eos}" in spec.turn_end and tokenizer.eos_token is None:
        raise ValueError(f"template '{template}' ends earlier assistant turns with EOS, but the tokenizer has none")
    system = history[0]["content"] if history and history[0]["role"] == "system" else spec.system
    turns = [(t["role"], t["content"], bool(t.get("image"))) for t in history if t["role"] != "system"]
    return system, [*turns, ("user", question, not any(image for _, _, image in turns))]


def _text_prompt(
    template: str, tokenizer: PreTrainedTokenizerBase, question: str, image_placeholder: str, history: list[dict]
) -> str:
    """A text template's multi-turn prompt, pieced together from its single-turn layout (see the module doc)."""
    system, turns = _text_turns(template, tokenizer, history, question)
    spec = TEXT_TEMPLATES[template]
    # Pieces, not _fill: row texts (a system message) may contain '{image}' or '{question}' literally.
    before_image, _, rest = spec.prompt.partition("{image}")
    between, _, after = rest.partition("{question}")
    before_system, _, after_system = before_image.partition("{system}")
    header_end = after_system[: -len(spec.turn_start)]
    answer_start = spec.answer.partition("{answer}")[0]
    turn_end = spec.turn_end.replace("{eos}", tokenizer.eos_token or "")
    text = before_system + system + header_end
    for role, content, image in turns:
        if role == "assistant":
            text += answer_start + content + turn_end
        else:
            text += spec.turn_start + (image_placeholder + between if image else "") + content + after
    return text


def prompt_text(
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    image_placeholder: str,
    history: Sequence[dict] | None = None,
) -> str:
    """The prompt as text (without BOS for the text templates), the image placeholder inserted; `history`:
    the turns before `question` (PreferenceRecord.history), rendered in full. Row errors (a conversation the
    template cannot render) are DataErrors without the row: the caller names it."""
    _check_template(template)
    if history:
        check_history(list(history))
    if template in TEXT_TEMPLATES:
        if history:
            return _text_prompt(template, tokenizer, question, image_placeholder, list(history))
        spec = TEXT_TEMPLATES[template]
        return _fill(spec.prompt, system=spec.system, image=image_placeholder, question=question)
    rendered = _render_chat(tokenizer, question, history=history)
    if history:
        _check_chat_answer_layout(tokenizer, question, history, rendered)
    if history and rendered.count(IMAGE_MARKER) > 1:  # the template rendered one: the rest are in the row's texts
        raise DataError(
            f"the conversation renders {rendered.count(IMAGE_MARKER)} '{IMAGE_MARKER}' markers for its one image; "
            f"remove '{IMAGE_MARKER}' from the texts of its turns"
        )
    if rendered.count(IMAGE_MARKER) != 1:
        raise ValueError(
            f"the tokenizer's chat template rendered {rendered.count(IMAGE_MARKER)} '{IMAGE_MARKER}' markers for one "
            "image part (need exactly 1); use a multimodal chat template or vicuna_v0/llava_v1"
        )
    return rendered.replace(IMAGE_MARKER, image_placeholder)


def answer_text(template: str, tokenizer: PreTrainedTokenizerBase, answer: str) -> tuple[str, int]:
    """The labelled text of an answer (separator + answer + text end marker) and where `answer` starts in it."""
    _check_trainable(template)
    if template in TEXT_TEMPLATES:
        before, _, after = TEXT_TEMPLATES[template].answer.partition("{answer}")
        return before + answer + after, len(before)
    question = "Q"  # any question: the answer text is what the full conversation adds to the prompt
    return _chat_answer(_render_chat(tokenizer, question), _render_chat(tokenizer, question, answer), answer)


def _chat_answer(prompt: str, full: str, answer: str) -> tuple[str, int]:
    """What rendering `answer` adds to the rendered `prompt` (trailing whitespace dropped), and where it starts."""
    if not full.startswith(prompt) or answer not in full[len(prompt) :]:
        raise ValueError(
            "the tokenizer's chat template does not render a conversation as prompt (with generation prompt) + "
            "answer; use vicuna_v0 or llava_v1"
        )
    text = full[len(prompt) :]
    start = text.index(answer)
    if not text[start + len(answer) :].strip():  # only whitespace after the answer (llava-hf): EOS follows it
        text = text[: start + len(answer)]
    return text, start


def _check_chat_answer_layout(
    tokenizer: PreTrainedTokenizerBase, question: str, history: Sequence[dict], rendered: str
) -> None:
    """Answers are encoded once, as after one user turn (`answer_text`): a template that renders the final
    answer differently after earlier turns would label other tokens than it trains the model to write."""
    probe = "A"
    after_turns = _chat_answer(rendered, _render_chat(tokenizer, question, probe, history), probe)
    if after_turns != answer_text("chat_template", tokenizer, probe):
        raise DataError(
            "the tokenizer's chat template renders the final answer differently after earlier turns "
            f"({after_turns[0]!r}) than after one user turn; use data.template vicuna_v0 or llava_v1"
        )


def _chat_needs_eos(tokenizer: PreTrainedTokenizerBase, answer_text_: str) -> bool:
    """chat_template: True when the rendered answer lacks the EOS token (it is appended, so it is trained)."""
    if tokenizer.eos_token is None:
        raise ValueError(
            "template 'chat_template' renders answers without an end marker and the tokenizer has no eos_token: "
            "a model trained on it would never learn to stop; set tokenizer.eos_token or use llava_v1/vicuna_v0"
        )
    return tokenizer.eos_token not in answer_text_


def _appends_eos(template: str, tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    if template in TEXT_TEMPLATES:
        return TEXT_TEMPLATES[template].append_eos
    return _chat_needs_eos(tokenizer, text)


def encode_prompt(
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    image_placeholder: str,
    history: Sequence[dict] | None = None,
) -> list[int]:
    """BOS + system + user turn (image placeholder, question) + assistant role prefix: the generation prompt.
    With `history`, every earlier turn comes before the final user turn (see `prompt_text`)."""
    text = prompt_text(template, tokenizer, question, image_placeholder, history)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Text templates never hold BOS; a chat template may render it itself (then the ids start with it).
    if tokenizer.bos_token_id is not None and (
        template in TEXT_TEMPLATES or not ids or ids[0] != tokenizer.bos_token_id
    ):
        ids = [tokenizer.bos_token_id, *ids]
    if history and template in TEXT_TEMPLATES and "{eos}" in TEXT_TEMPLATES[template].turn_end:
        answers = sum(turn["role"] == "assistant" for turn in history)
        if ids.count(tokenizer.eos_token_id) != answers:  # EOS text typed into a turn, or not parsed as EOS
            raise DataError(
                f"the prompt tokenizes to {ids.count(tokenizer.eos_token_id)} EOS tokens for its {answers} earlier "
                f"assistant turns, which template '{template}' ends with '{tokenizer.eos_token}'; remove "
                f"'{tokenizer.eos_token}' from the row's texts (or use a tokenizer that parses it as its EOS token)"
            )
    return ids


def role_prefix_length(
    template: str,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    image_placeholder: str,
    history: Sequence[dict] | None = None,
) -> int:
    """How many of `encode_prompt`'s last ids spell the assistant role prefix ('### Assistant:' of
    vicuna_v0), which the released Muffin code labels as part of the answer (`data.label_span: muffin`)."""
    _check_template(template)
    role = TEXT_TEMPLATES[template].role_prefix if template in TEXT_TEMPLATES else ""
    if not role:
        raise ValueError(
            f"data.label_span 'muffin' labels the '### Assistant:' role prefix of vicuna_v0 (Muffin's layout); "
            f"template '{template}' has none: use data.label_span 'answer'"
        )
    text = prompt_text(template, tokenizer, question, image_placeholder, history)
    start = text.rindex(role)
    if not tokenizer.is_fast:
        raise ValueError("data.label_span 'muffin' needs a fast tokenizer (character offsets)")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for s, e in offsets if e > start)


def encode_answer_with_offsets(
    template: str, tokenizer: PreTrainedTokenizerBase, answer: str
) -> tuple[list[int], list[Span]]:
    """Answer token ids (answer + end marker / EOS) and each token's [start, end) character offsets
    into `answer` itself (clipped; zero-width for tokens of the separator or the end marker)."""
    text, start = answer_text(template, tokenizer, answer)
    if not tokenizer.is_fast:
        raise ValueError("character offsets need a fast tokenizer (use_fast=True); or use data.segments 'token_diff'")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    clip = lambda i: min(max(i - start, 0), len(answer))  # noqa: E731
    offsets = [(clip(s), clip(e)) for s, e in encoding["offset_mapping"]]
    if _appends_eos(template, tokenizer, text):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"template '{template}' ends answers with EOS, but the tokenizer has no eos_token")
        ids.append(tokenizer.eos_token_id)
        offsets.append((len(answer), len(answer)))
    return ids, offsets


def encode_answer(template: str, tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Answer token ids: the labelled tokens (answer + the template's end marker or EOS)."""
    if tokenizer.is_fast:
        return encode_answer_with_offsets(template, tokenizer, answer)[0]
    text = answer_text(template, tokenizer, answer)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if _appends_eos(template, tokenizer, text):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"template '{template}' ends answers with EOS, but the tokenizer has no eos_token")
        ids.append(tokenizer.eos_token_id)
    return ids


def image_token_ids(tokenizer: PreTrainedTokenizerBase, image_placeholder: str) -> list[int]:
    """The ids one image occupies in a prompt."""
    return tokenizer(image_placeholder, add_special_tokens=False)["input_ids"]


def check_image_tokens(prompt_ids: Sequence[int], placeholder_ids: Sequence[int], where: str = "prompt") -> None:
    """Raise DataError unless `prompt_ids` hold the placeholder ids exactly once, contiguously (no other
    occurrence of any image-token id, e.g. from an '<image>' typed into the question)."""
    counts = Counter(prompt_ids)
    expected = Counter(placeholder_ids)
    wrong = {i: counts[i] for i in expected if counts[i] != expected[i]}
    # With the counts right, the placeholder can only start at the first occurrence of its first id.
    start = list(prompt_ids).index(placeholder_ids[0]) if not wrong else 0
    contiguous = list(prompt_ids[start : start + len(placeholder_ids)]) == list(placeholder_ids)
    if wrong or not contiguous:
        raise DataError(
            f"{where}: the prompt must hold the image tokens exactly once ({dict(expected)} by id), found "
            f"{wrong or 'them split apart'}; remove image markers such as '<image>' from the question text"
        )
