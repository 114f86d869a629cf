"""What other tools need to open an exported checkpoint: a Hugging Face processor and a chat template.

`save_processor(model, directory, template)` (called by `PreferenceModel.save_pretrained`) writes

* the image processor config (`preprocessor_config.json`) of the model's training transform
  (`ImageTransform`): a CLIP image processor (bicubic resize, rescale 1/255, normalise) for the
  'resize' and 'crop' modes, LLaVA's (pad to a square of the mean colour first) for 'pad';
* a chat template (Jinja) rendering TRL's conversational format — a user turn [image part, text part],
  then optionally an assistant turn — exactly as `data.templates` renders `template` for training:
  the same text, BOS included, one `<image>` for the image;
* for LLaVA, a `LlavaProcessor` (`processor_config.json`) that expands that one `<image>` to the
  model's number of image tokens, so `AutoProcessor` + `AutoModelForImageTextToText` load the
  directory and give the same token ids, pixels and generations as ddpo (tests/test_export.py).

Muffin is our own architecture, not one transformers knows: its directory gets the image processor
config and the chat template, but `AutoModel*` cannot open it (use `models.build.load_model`).

transformers' default image backend is torchvision when it is installed; its bicubic resize is not
PIL's, so pixel values may differ. `AutoProcessor.from_pretrained(DIR, backend="pil")` gives the
training pixels exactly (the tests run without torchvision, on the PIL backend).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaProcessor

from ddpo.data.templates import IMAGE_MARKER, TEXT_TEMPLATES

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def image_processor_config(transform) -> dict:
    """Keyword arguments of the transformers image processor that computes `transform` (an ImageTransform)."""
    size = transform.size
    mode = getattr(transform, "mode", "resize")
    common = dict(
        do_convert_rgb=True,
        do_resize=True,
        resample=BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
    )
    if mode == "resize":  # straight to size x size
        return dict(common, size={"height": size, "width": size}, do_center_crop=False)
    # 'crop': short side to `size`, centre crop; 'pad': the same after padding to a square (a no-op crop)
    return dict(
        common,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        **({"do_pad": True} if mode == "pad" else {}),
    )


def image_processor(transform):
    """The PIL-backend processor (PIL's bicubic, as the training transform); its saved config names the
    plain class, so a reader gets whichever backend it has."""
    config = image_processor_config(transform)
    if config.get("do_pad"):
        return LlavaImageProcessorPil(**config)
    return CLIPImageProcessorPil(**config)


def _literal(text: str) -> str:
    """A Jinja string expression printing `text` verbatim."""
    return "{{ " + json.dumps(text) + " }}"


def chat_template(template: str) -> str:
    """Jinja rendering [system?] user [assistant?] as `data.templates` renders `template`.

    The user turn's image parts become `<image>` each (the processor expands it), its text parts are
    joined; a system message replaces the default system prompt."""
    spec = TEXT_TEMPLATES[template]
    before_image, _, rest = spec.prompt.partition("{image}")
    between, _, generation_prompt = rest.partition("{question}")
    before_system, _, after_system = before_image.partition("{system}")
    answer_before, _, answer_after = (spec.answer or "").partition("{answer}")
    text_of = (
        "{%- if message.content is string %}{{ message.content }}{% else %}"
        "{%- for part in message.content if part.type == 'text' %}{{ part.text }}{% endfor %}{% endif -%}"
    )
    return "".join(
        [
            "{%- set system = messages[0].content if messages[0].role == 'system' else none -%}",
            "{%- set turns = messages[1:] if system is not none else messages -%}",
            "{%- if turns | length == 0 or turns | length > 2 or turns[0].role != 'user' or "
            "(turns | length == 2 and turns[1].role != 'assistant') -%}",
            "{{ raise_exception('this chat template renders one user turn, "
            "optionally followed by one assistant turn') }}",
            "{%- endif -%}",
            "{%- if bos_token %}{{ bos_token }}{% endif -%}",
            _literal(before_system),
            "{%- if system is not none %}{% set message = messages[0] %}",
            text_of,
            "{% else %}",
            _literal(spec.system),
            "{% endif -%}",
            _literal(after_system),
            "{%- set message = turns[0] -%}",
            "{%- if message.content is not string %}{% for part in message.content if part.type == 'image' %}",
            _literal(IMAGE_MARKER),
            "{% endfor %}{% endif -%}",
            _literal(between),
            text_of,
            "{%- if turns | length == 2 or add_generation_prompt %}",
            _literal(generation_prompt),
            "{% endif -%}",
            "{%- if turns | length == 2 %}{% set message = turns[1] %}",
            "{{ raise_exception('this template is for generation only') }}"
            if spec.answer is None
            else _literal(answer_before)
            + text_of
            + _literal(answer_after)
            + ("{{ eos_token }}" if spec.append_eos else ""),
            "{% endif -%}",
        ]
    )


def save_processor(model, directory: str | os.PathLike, template: str | None = None) -> None:
    """Write the image processor, the chat template and (LLaVA) the processor of `model` into `directory`.

    `template` (a `data.template` name) is what the model was trained with; 'chat_template' or None keep
    the tokenizer's own chat template when it has one (None falls back to 'vicuna_v0' otherwise)."""
    directory = Path(directory)
    tokenizer = copy.deepcopy(model.tokenizer)  # the live tokenizer keeps its own template
    if template in TEXT_TEMPLATES:
        tokenizer.chat_template = chat_template(template)
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template("vicuna_v0")
    images = image_processor(model.image_transform)
    if model.arch == "llava":
        config = model.hf_model.config
        processor = LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token=tokenizer.convert_ids_to_tokens(model.image_token_id),
            num_additional_image_tokens=1,  # the CLS token
        )
        processor.save_pretrained(directory)
    else:
        images.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
