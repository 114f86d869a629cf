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
    with pytest.raises(ValueError, match="vicuna_v0, llava_v1, chat_template"):
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
