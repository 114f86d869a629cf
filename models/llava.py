"""LLaVA-1.5 through transformers' `LlavaForConditionalGeneration`.

Real `llava-hf/llava-1.5-*-hf` checkpoints load with `from_pretrained`; tests build tiny configs. The
vision tower is CLIP, or BEiT (`BeitConfig` / `Data2VecVisionConfig` work as LLaVA vision configs).
The model does not expand `<image>`: the text holds N `<image>` ids per image, N = (size / patch)^2
with `vision_feature_select_strategy="default"` (CLS dropped), one more with "full".

Image once per pair: `encode_images` runs the vision tower and projector on the B pair images; the base
class indexes the features into the 2B rows, scatters them at the `<image>` positions and runs the
language model backbone alone (`model.language_model`), so the LM head is applied only to answer
positions by the chunked log-prob path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from ddpo.models.base import ImageTransform, PreferenceModel

IMAGE_TOKEN = "<image>"
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
BEIT_IMAGE_MEAN = BEIT_IMAGE_STD = (0.5, 0.5, 0.5)


def default_image_transform(vision_config) -> ImageTransform:
    """The vision tower's own normalisation (CLIP's statistics for CLIP, 0.5/0.5 for BEiT-style towers) and
    LLaVA-1.5's pad-to-square (`image_aspect_ratio: pad`)."""
    size = vision_config.image_size
    if vision_config.model_type == "clip_vision_model":
        return ImageTransform(size, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, mode="pad")  # LLaVA-1.5's pad-to-square
    return ImageTransform(size, BEIT_IMAGE_MEAN, BEIT_IMAGE_STD, mode="pad")


class LlavaPreferenceModel(PreferenceModel):
    arch = "llava"
    template = "llava_v1"

    def __init__(
        self,
        hf_model: LlavaForConditionalGeneration,
        tokenizer,
        image_transform: ImageTransform | None = None,
        logps_chunk_size: int = 256,
    ):
        config = hf_model.config
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer id of {IMAGE_TOKEN} is {token_id} but the model config says "
                f"{config.image_token_id}: use the tokenizer the model was built/saved with"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("only a single vision_feature_layer is supported (LLaVA-1.5 uses -2)")
        vision = config.vision_config
        num_tokens = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "full":
            num_tokens += 1
        super().__init__(
            hf_model,
            tokenizer,
            image_transform or default_image_transform(vision),
            token_id,
            num_tokens,
            logps_chunk_size,
        )

    @property
    def image_placeholder(self) -> str:
        return IMAGE_TOKEN * self.num_image_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.hf_model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(out.pooler_output))  # one [N, D] per image -> [B, N, D]

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        inner = self.hf_model.model
        return {
            "vision_tower": list(inner.vision_tower.parameters()),
            "projector": list(inner.multi_modal_projector.parameters()),
            "llm": [*inner.language_model.parameters(), *self.hf_model.lm_head.parameters()],
        }
