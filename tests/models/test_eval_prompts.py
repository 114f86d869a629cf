"""Evaluation prompts and defaults on real (tiny) models: RLHF-V's layout by hand, templates per architecture."""

import torch
from PIL import Image

from ddpo.data.templates import SYSTEM_PROMPT, default_stop_strings, encode_prompt, prompt_text
from ddpo.models.base import GenerationOptions
from ddpo.models.build import load_model
from tests.models.helpers import tiny_model

QUESTION = "Describe the image in detail ."


def test_rlhfv_eval_prompt_is_muffins_layout(word_tokenizer):
    """muffin_vqa.py: BOS + system + '\\n###' + 'Human: ' + question + '\\n'
    + <im_start><im_patch>xN<im_end> + '\\n###'."""
    model = tiny_model("muffin", word_tokenizer)
    placeholder = "<im_start>" + "<im_patch>" * model.num_image_tokens + "<im_end>"
    assert model.image_placeholder == placeholder
    expected = SYSTEM_PROMPT + "\n###Human: " + QUESTION + "\n" + placeholder + "\n###"
    assert prompt_text("rlhfv_eval", word_tokenizer, QUESTION, model.image_placeholder) == expected
    ids = encode_prompt("rlhfv_eval", word_tokenizer, QUESTION, model.image_placeholder)
    assert ids == [word_tokenizer.bos_token_id, *word_tokenizer(expected, add_special_tokens=False)["input_ids"]]
    tokens = word_tokenizer.convert_ids_to_tokens(ids)
    assert tokens.index("<im_start>") > tokens.index("Describe")  # the image after the question
    assert tokens[-2:] == ["<im_end>", "###"]
    assert default_stop_strings("rlhfv_eval") == ("###",)


def test_rlhfv_answers_lose_the_role_prefix_and_the_next_turn(word_tokenizer):
    model = tiny_model("muffin", word_tokenizer)
    # (this word tokenizer's decoder glues "###" to the previous word, so the next turn is cut at "Human")
    generated = torch.tensor(
        word_tokenizer("Assistant : a red circle . Human : one", add_special_tokens=False)["input_ids"]
    )
    prefix = word_tokenizer.decode(word_tokenizer("Assistant :", add_special_tokens=False)["input_ids"])
    assert model._decode_answer(generated, ["Human"], prefix) == "a red circle."
    assert model._decode_answer(generated, ["Human"]).startswith("Assistant")


def test_default_template_is_the_architectures_then_the_trained_one(word_tokenizer, tmp_path):
    llava, muffin = tiny_model("llava", word_tokenizer), tiny_model("muffin", word_tokenizer)
    assert (llava.template, muffin.template) == ("llava_v1", "vicuna_v0")
    image = [Image.new("RGB", (30, 20), (200, 10, 10))]
    # generate() without a template uses the model's: same answer as naming it
    assert llava.generate(image, [QUESTION], GenerationOptions(max_new_tokens=3)) == llava.generate(
        image, [QUESTION], GenerationOptions(template="llava_v1", max_new_tokens=3)
    )
    muffin.template = "llava_v1"  # what the trainer records (data.template)
    muffin.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").template == "llava_v1"
