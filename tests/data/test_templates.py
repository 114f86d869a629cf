"""Conversation templates: exact texts, separately tokenized prompt/answer, image-token checks, offsets."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ddpo.data.images import DataError
from ddpo.data.templates import (
    SYSTEM_PROMPT,
    answer_text,
    check_image_tokens,
    encode_answer,
    encode_answer_with_offsets,
    encode_prompt,
    image_token_ids,
    prompt_text,
)

LLAVA_IMAGE = "<image>" * 4
MUFFIN_IMAGE = "<im_start>" + "<im_patch>" * 4 + "<im_end>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER : {% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\n' }}"
    "{% else %}ASSISTANT : {{ m['content'][0]['text'] }}{{ eos_token }}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on the template and answer texts."""
    texts = [
        SYSTEM_PROMPT,
        "### Human: ### Assistant: USER: ASSISTANT:",
        "What is in the picture? There is a red circle at the top left.",
    ] * 3
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def test_vicuna_v0_text_and_ids(word_tokenizer):
    text = prompt_text("vicuna_v0", word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE)
    assert text == SYSTEM_PROMPT + "\n\n### Human: " + MUFFIN_IMAGE + "\nWhat is in the picture ?\n### Assistant:"
    ids = encode_prompt("vicuna_v0", word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE)
    assert ids[0] == word_tokenizer.bos_token_id
    assert ids[1:] == word_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert word_tokenizer.convert_ids_to_tokens(ids[-3:]) == ["###", "Assistant", ":"]
    assert word_tokenizer.unk_token_id not in ids
    answer = encode_answer("vicuna_v0", word_tokenizer, "a red circle .")
    assert word_tokenizer.convert_ids_to_tokens(answer) == ["a", "red", "circle", ".", "###"]


def test_llava_v1_text_and_ids(word_tokenizer):
    text = prompt_text("llava_v1", word_tokenizer, "What is in the picture ?", LLAVA_IMAGE)
    assert text == SYSTEM_PROMPT + " USER: " + LLAVA_IMAGE + "\nWhat is in the picture ? ASSISTANT:"
    ids = encode_prompt("llava_v1", word_tokenizer, "What is in the picture ?", LLAVA_IMAGE)
    assert word_tokenizer.convert_ids_to_tokens(ids[-2:]) == ["ASSISTANT", ":"]
    assert ids.count(word_tokenizer.convert_tokens_to_ids("<image>")) == 4
    answer = encode_answer("llava_v1", word_tokenizer, "a red circle .")
    assert word_tokenizer.convert_ids_to_tokens(answer) == ["a", "red", "circle", ".", "</s>"]
    assert answer_text("llava_v1", word_tokenizer, "yes") == (" yes", 1)


@pytest.mark.parametrize("template", ["vicuna_v0", "llava_v1"])
def test_bpe_prompt_and_answer_concatenate_like_the_whole_text(bpe_tokenizer, template):
    question, answer = "What is in the picture?", "There is a red circle."
    prompt_ids = encode_prompt(template, bpe_tokenizer, question, "<image>" * 3)
    answer_ids = encode_answer(template, bpe_tokenizer, answer)
    whole = (
        prompt_text(template, bpe_tokenizer, question, "<image>" * 3) + answer_text(template, bpe_tokenizer, answer)[0]
    )
    expected = [bpe_tokenizer.bos_token_id] + bpe_tokenizer(whole, add_special_tokens=False)["input_ids"]
    if template == "llava_v1":
        expected.append(bpe_tokenizer.eos_token_id)
    assert prompt_ids + answer_ids == expected
    assert bpe_tokenizer.decode(answer_ids).startswith(" There is a red circle.")


def test_chat_template(word_tokenizer):
    word_tokenizer.chat_template = CHAT_TEMPLATE
    text = prompt_text("chat_template", word_tokenizer, "What is in the picture ?", LLAVA_IMAGE)
    assert text == "<s>USER : " + LLAVA_IMAGE + "\nWhat is in the picture ?\nASSISTANT :"
    ids = encode_prompt("chat_template", word_tokenizer, "What is in the picture ?", LLAVA_IMAGE)
    assert ids == word_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == word_tokenizer.bos_token_id and ids.count(word_tokenizer.bos_token_id) == 1
    answer = encode_answer("chat_template", word_tokenizer, "a red circle .")
    assert word_tokenizer.convert_ids_to_tokens(answer) == ["a", "red", "circle", ".", "</s>"]


def test_chat_template_missing_is_a_clear_error(word_tokenizer):
    word_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt("chat_template", word_tokenizer, "q", LLAVA_IMAGE)


def test_unknown_template(word_tokenizer):
    with pytest.raises(ValueError, match="vicuna_v0, llava_v1, omnilmm, chat_template"):
        encode_prompt("alpaca", word_tokenizer, "q", LLAVA_IMAGE)


def test_answer_offsets_point_into_the_answer(word_tokenizer):
    answer = "there is a red circle ."
    ids, offsets = encode_answer_with_offsets("vicuna_v0", word_tokenizer, answer)
    tokens = word_tokenizer.convert_ids_to_tokens(ids)
    assert [answer[s:e] for s, e in offsets[:-1]] == tokens[:-1]
    assert offsets[-1][0] == offsets[-1][1]  # '###' end marker: zero width, never in a span
    ids, offsets = encode_answer_with_offsets("llava_v1", word_tokenizer, answer)
    assert offsets[-1] == (len(answer), len(answer)) and ids[-1] == word_tokenizer.eos_token_id


def test_image_token_check(word_tokenizer):
    placeholder = image_token_ids(word_tokenizer, MUFFIN_IMAGE)
    assert len(placeholder) == 6
    good = encode_prompt("vicuna_v0", word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE)
    check_image_tokens(good, placeholder)
    typed = encode_prompt("vicuna_v0", word_tokenizer, "<im_patch> What is in the picture ?", MUFFIN_IMAGE)
    with pytest.raises(DataError, match="exactly once"):
        check_image_tokens(typed, placeholder)
    i = good.index(placeholder[0])
    split = good[: i + 2] + [good[0]] + good[i + 2 :]  # same counts, a BOS inside the image tokens
    with pytest.raises(DataError, match="split apart"):
        check_image_tokens(split, placeholder)


# --- multi-turn prompts: every turn rendered, compared with the template written out by hand ----------------

# (user, assistant) turns of a conversation; its last user turn is the one the answers reply to
TURNS = [
    ("Describe the image in detail .", "there is a red circle at the top left ."),
    ("What is in the picture ?", "a blue square in the center ."),
    ("How many objects are there ?", None),
]


def history_of(turns: int) -> tuple[list[dict], str]:
    """(history, question) of a `turns`-turn conversation: the image in the first user turn."""
    history = []
    for k, (user, assistant) in enumerate(TURNS[: turns - 1]):
        history += [{"role": "user", "content": user, **({"image": True} if k == 0 else {})}]
        history += [{"role": "assistant", "content": assistant}]
    return history, TURNS[turns - 1][0]


def by_hand(template: str, tokenizer, turns: int, image: str) -> str:
    """The prompt text as the template's original code writes a `turns`-turn conversation."""
    users = [u for u, _ in TURNS[:turns]]
    answers = [a for _, a in TURNS[: turns - 1]]
    if template == "vicuna_v0":  # Muffin: header, then '### Human: ...\n### Assistant: ...\n' per turn
        text = SYSTEM_PROMPT + "\n\n"
        for k, user in enumerate(users):
            text += "### Human: " + (image + "\n" if k == 0 else "") + user + "\n### Assistant:"
            text += " " + answers[k] + "\n" if k < len(answers) else ""
        return text
    text = SYSTEM_PROMPT + " "  # llava_v1: LLaVA's SeparatorStyle.TWO, sep ' ', sep2 '</s>'
    for k, user in enumerate(users):
        text += "USER: " + (image + "\n" if k == 0 else "") + user + " ASSISTANT:"
        text += " " + answers[k] + tokenizer.eos_token if k < len(answers) else ""
    return text


def trl_messages(turns: int) -> list[dict]:
    """The conversation as chat messages (TRL's form), image part first in the first user turn."""
    history, question = history_of(turns)
    messages = [
        {
            "role": t["role"],
            "content": [*([{"type": "image"}] if t.get("image") else []), {"type": "text", "text": t["content"]}],
        }
        for t in history
    ]
    first = [{"type": "image"}] if turns == 1 else []
    return [*messages, {"role": "user", "content": [*first, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("template", ["vicuna_v0", "llava_v1"])
def test_text_templates_render_every_turn(word_tokenizer, bpe_tokenizer, template, turns):
    history, question = history_of(turns)
    for tokenizer, image in ((word_tokenizer, MUFFIN_IMAGE), (bpe_tokenizer, "<image>" * 3)):
        text = by_hand(template, tokenizer, turns, image)
        assert prompt_text(template, tokenizer, question, image, history or None) == text
        ids = encode_prompt(template, tokenizer, question, image, history or None)
        assert ids == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert word_tokenizer.unk_token_id not in encode_prompt(template, word_tokenizer, question, MUFFIN_IMAGE, history)
    if template == "llava_v1":  # each earlier answer ends with the EOS id, as LLaVA tokenizes its '</s>'
        assert ids.count(bpe_tokenizer.eos_token_id) == turns - 1


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_chat_template_renders_every_turn(word_tokenizer, turns):
    word_tokenizer.chat_template = CHAT_TEMPLATE
    history, question = history_of(turns)
    rendered = word_tokenizer.apply_chat_template(trl_messages(turns), tokenize=False, add_generation_prompt=True)
    text = rendered.replace("<image>", LLAVA_IMAGE)
    assert prompt_text("chat_template", word_tokenizer, question, LLAVA_IMAGE, history) == text
    ids = encode_prompt("chat_template", word_tokenizer, question, LLAVA_IMAGE, history)
    assert ids == word_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert word_tokenizer.unk_token_id not in ids and ids.count(word_tokenizer.eos_token_id) == turns - 1


def test_single_turn_encoding_is_unchanged_by_an_empty_history(word_tokenizer):
    for template in ("vicuna_v0", "llava_v1"):
        one = encode_prompt(template, word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE)
        assert encode_prompt(template, word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE, []) == one


def test_image_stays_in_the_turn_that_holds_it(word_tokenizer):
    history = [
        {"role": "user", "content": "Describe the image in detail ."},
        {"role": "assistant", "content": "no"},
    ]
    text = prompt_text("vicuna_v0", word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE, history)
    assert text == (
        SYSTEM_PROMPT
        + "\n\n### Human: Describe the image in detail .\n### Assistant: no\n### Human: "
        + MUFFIN_IMAGE
        + "\nWhat is in the picture ?\n### Assistant:"
    )
    history[0]["image"] = True
    text = prompt_text("llava_v1", word_tokenizer, "What is in the picture ?", LLAVA_IMAGE, history)
    assert (
        text
        == SYSTEM_PROMPT
        + " USER: "
        + LLAVA_IMAGE
        + "\nDescribe the image in detail . ASSISTANT: no</s>USER: "
        + ("What is in the picture ? ASSISTANT:")
    )


def test_a_system_message_replaces_the_default_system_prompt(word_tokenizer):
    history = [{"role": "system", "content": "a {question} system prompt ."}]
    text = prompt_text("vicuna_v0", word_tokenizer, "What is in the picture ?", MUFFIN_IMAGE, history)
    assert (
        text
        == "a {question} system prompt .\n\n### Human: " + MUFFIN_IMAGE + "\nWhat is in the picture ?\n### Assistant:"
    )
    assert prompt_text("llava_v1", word_tokenizer, "q", "<image>", history) == (
        "a {question} system prompt . USER: <image>\nq ASSISTANT:"
    )


def test_conversations_a_template_cannot_carry_are_named_errors(word_tokenizer):
    history, question = history_of(2)
    with pytest.raises(DataError, match="template 'rlhfv_eval' renders one user turn only and this prompt has 3"):
        prompt_text("rlhfv_eval", word_tokenizer, question, MUFFIN_IMAGE, history)
    with pytest.raises(DataError, match=r"message 1 \('user'\) follows another 'user' message"):
        prompt_text("vicuna_v0", word_tokenizer, question, MUFFIN_IMAGE, [history[0], history[0]])
    typed_eos = [history[0], {"role": "assistant", "content": "yes </s> no"}]
    with pytest.raises(DataError, match="2 EOS tokens for its 1 earlier assistant turns"):
        encode_prompt("llava_v1", word_tokenizer, question, LLAVA_IMAGE, typed_eos)
    word_tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}" + (
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
    )
    with pytest.raises(DataError, match="cannot render this 2-message conversation .*System role not supported"):
        prompt_text("chat_template", word_tokenizer, question, LLAVA_IMAGE, [{"role": "system", "content": "s"}])


def test_chat_template_whose_last_answer_renders_differently_is_refused(word_tokenizer):
    # A template that closes the final assistant turn differently from earlier ones ('loop.last'):
    # the answer ids, encoded as after one user turn, would not be what this conversation renders.
    word_tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{{ m['content'][0]['text'] }}{{ eos_token }}",
        "{{ m['content'][0]['text'] }}{% if loop.index > 2 %} ###{% endif %}{{ eos_token }}",
    )
    history, question = history_of(2)
    with pytest.raises(DataError, match="renders the final answer differently after earlier turns"):
        prompt_text("chat_template", word_tokenizer, question, LLAVA_IMAGE, history)
