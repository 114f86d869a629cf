"""Muffin (RLHF-V's base model): BEiT-3 with learnable queries -> one linear projector -> LLaMA.

The text holds `<im_start>` + N x `<im_patch>` + `<im_end>` per image; the N `<im_patch>` embeddings
are replaced by the projected outputs of the N learnable queries (`model.query`), which BEiT-3 appends
after the image patches and runs through its language experts (`models/beit3.py`).

`MuffinConfig` / `MuffinForCausalLM` are ordinary HF classes (save_pretrained / from_pretrained with
safetensors, `generate`), written here so no checkpoint code has to be trusted.

Original checkpoint names (thunlp/Muffin `muffin/model/muffin.py` `Beit3LlavaLlamaForCausalLM`, whose
vision tower is torchscale's BEiT-3 inside `BEiT3Wrapper`) map onto ours by prefix:

| RLHF-V / Muffin checkpoint                      | this module                                      |
|-------------------------------------------------|--------------------------------------------------|
| `model.embed_tokens.*`                          | `model.language_model.embed_tokens.*`            |
| `model.layers.{i}.*` (HF LLaMA decoder layer)   | `model.language_model.layers.{i}.*`              |
| `model.norm.weight`                             | `model.language_model.norm.weight`               |
| `model.vision_tower.beit3.vision_embed.{proj.weight, proj.bias, cls_token}` | same                 |
| `model.vision_tower.beit3.encoder.embed_positions.{A,B}.weight` | same                             |
| `model.vision_tower.beit3.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{A,B}.{weight,bias}` | same |
| `model.vision_tower.beit3.encoder.layers.{i}.self_attn.inner_attn_ln.{A,B}.{weight,bias}` | same   |
| `model.vision_tower.beit3.encoder.layers.{i}.{self_attn_layer_norm,final_layer_norm}.{A,B}.*` | same |
| `model.vision_tower.beit3.encoder.layers.{i}.ffn.{A,B}.{fc1,fc2,ffn_layernorm}.{weight,bias}` | same |
| `model.vision_tower.beit3.encoder.layer_norm.{A,B}.{weight,bias}` | same                           |
| `model.query` [num_query, D_vision]             | same                                             |
| `model.mm_projector.{weight,bias}`              | same                                             |
| `lm_head.weight`                                | same                                             |

Dropped (unused): `model.vision_tower.beit3.text_embed.weight` and `...vision_embed.mask_token`, which Muffin
deletes before training, and `model.layers.{i}.self_attn.rotary_emb.inv_freq`, a buffer that is recomputed.

RLHF-V freezing policy (`freeze_vision_experts`): learning rate 0 on every BEiT-3 parameter of a
vision expert (`.A.` in its name, the vision position embedding included) and on the patch embedding
(`beit3.vision_embed`). The 64 queries, the language experts, the projector and the LLM train.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ddpo.models.base import ImageTransform, PreferenceModel, scatter_image_features
from ddpo.models.beit3 import POSITION_OFFSET, Beit3QueryEncoder, VisionEmbedding, sub_ln_init_scale

IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN = "<im_patch>", "<im_start>", "<im_end>"
# Muffin's eval transform normalises with the Inception mean/std.
MUFFIN_IMAGE_MEAN = MUFFIN_IMAGE_STD = (0.5, 0.5, 0.5)


class MuffinConfig(PreTrainedConfig):
    """BEiT-3 vision settings (defaults: `beit3_large_patch16_448`), query count, and a LLaMA `text_config`."""

    model_type = "ddpo_muffin"
    sub_configs_defaults = {"text_config": LlamaConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_image_size: int = 448
    vision_patch_size: int = 16
    vision_hidden_size: int = 1024
    vision_num_layers: int = 24
    vision_num_heads: int = 16
    vision_ffn_dim: int = 4096
    vision_layernorm_eps: float = 1e-5
    vision_max_source_positions: int = 1024
    num_query: int = 64
    image_token_id: int = 32001  # <im_patch>
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False


class MuffinPreTrainedModel(PreTrainedModel):
    config: MuffinConfig
    config_class = MuffinConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "EncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Conv normal(0.02), zero bias; LayerNorm 1/0; Embedding normal
        std = self.config.initializer_range
        if isinstance(module, MuffinModel):
            init.trunc_normal_(module.query, std=std)
        elif isinstance(module, VisionEmbedding):
            init.trunc_normal_(module.cls_token, std=std)


class ImagePatchDecoderMixin:
    """The decoder forward of an architecture whose `<im_patch>` embeddings are replaced by image features
    (Muffin's query encoder, OmniLMM's resampler): the class provides `language_model`, `get_image_features`
    and `config.image_token_id`."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the <im_patch> tokens")
            features = self.get_image_features(pixel_values.to(inputs_embeds.dtype))
            inputs_embeds = scatter_image_features(inputs_embeds, input_ids, self.config.image_token_id, features)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )


class ImagePatchCausalLMMixin:
    """The causal-LM head over an `ImagePatchDecoderMixin` decoder at `self.model`, with `self.lm_head`."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF causal-LM forward. `cache` and `use_cache`, only passed on, travel in `kwargs` to the decoder
        forward (`ImagePatchDecoderMixin`), which names them (llava-hf's `LlavaForConditionalGeneration.forward`
        does the same with `use_cache`). `position_ids` and `logits_to_keep` must stay named: transformers' `generate`
        reads this signature to decide whether to make position ids from the attention mask and whether to
        compute only the last position's logits at each step."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


class MuffinModel(ImagePatchDecoderMixin, MuffinPreTrainedModel):
    """Vision tower + queries + projector + LLaMA decoder (no LM head)."""

    def __init__(self, config: MuffinConfig):
        super().__init__(config)
        self.vision_tower = Beit3QueryEncoder(
            image_size=config.vision_image_size,
            patch_size=config.vision_patch_size,
            dim=config.vision_hidden_size,
            num_layers=config.vision_num_layers,
            num_heads=config.vision_num_heads,
            ffn_dim=config.vision_ffn_dim,
            eps=config.vision_layernorm_eps,
            max_source_positions=config.vision_max_source_positions,
        )
        if config.num_query > config.vision_max_source_positions - 2:
            raise ValueError(
                f"num_query {config.num_query} exceeds BEiT-3's {config.vision_max_source_positions - 2} text positions"
            )
        self.query = nn.Parameter(torch.zeros(config.num_query, config.vision_hidden_size))
        self.mm_projector = nn.Linear(config.vision_hidden_size, config.text_config.hidden_size)
        self.language_model = LlamaModel(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_query, D_llm]."""
        return self.mm_projector(self.vision_tower(pixel_values, self.query))


class MuffinForCausalLM(ImagePatchCausalLMMixin, MuffinPreTrainedModel, GenerationMixin):
    def __init__(self, config: MuffinConfig):
        super().__init__(config)
        self.model = MuffinModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# ------------------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------------------
class ImagePatchPreferenceModel(PreferenceModel):
    """Muffin's and OmniLMM's interface: the image enters the prompt as <im_start> + num_query x <im_patch> +
    <im_end>, whose patch token the model config names; `family` names the model in the tokenizer's errors."""

    def __init__(self, hf_model, tokenizer, image_transform: ImageTransform, logps_chunk_size: int, family: str):
        config = hf_model.config
        patch_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
        if patch_id != config.image_token_id:
            raise ValueError(
                f"tokenizer id of {IMAGE_PATCH_TOKEN} is {patch_id} but the model config says "
                f"{config.image_token_id}: use the tokenizer saved with the model"
            )
        for token in (IMAGE_START_TOKEN, IMAGE_END_TOKEN):
            if token not in tokenizer.get_vocab():
                raise ValueError(
                    f"the tokenizer lacks {token}: add it as a special token ({family}'s image delimiters)"
                )
        super().__init__(
            hf_model, tokenizer, image_transform, config.image_token_id, config.num_query, logps_chunk_size
        )

    @property
    def image_placeholder(self) -> str:
        return IMAGE_START_TOKEN + IMAGE_PATCH_TOKEN * self.num_image_tokens + IMAGE_END_TOKEN

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf_model.model.get_image_features(pixel_values)


class MuffinPreferenceModel(ImagePatchPreferenceModel):
    arch = "muffin"
    template = "vicuna_v0"

    def __init__(
        self,
        hf_model: MuffinForCausalLM,
        tokenizer,
        image_transform: ImageTransform | None = None,
        logps_chunk_size: int = 256,
        freeze_vision_experts: bool = False,
    ):
        config = hf_model.config
        transform = image_transform or ImageTransform(config.vision_image_size, MUFFIN_IMAGE_MEAN, MUFFIN_IMAGE_STD)
        super().__init__(hf_model, tokenizer, transform, logps_chunk_size, "Muffin")
        self.freeze_vision_experts = freeze_vision_experts

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        inner = self.hf_model.model
        return {
            # The queries run inside BEiT-3: they belong to the vision encoder.
            "vision_tower": [*inner.vision_tower.parameters(), inner.query],
            "projector": list(inner.mm_projector.parameters()),
            "llm": [*inner.language_model.parameters(), *self.hf_model.lm_head.parameters()],
        }

    def zero_lr_parameter_names(self) -> list[str]:
        """RLHF-V: lr 0 on BEiT-3 vision experts and the patch embedding, when `freeze_vision_experts`.

        These keep requires_grad (as in RLHF-V), so their gradients still count in the global gradient
        norm that clipping uses; only their updates are zero.
        """
        if not self.freeze_vision_experts:
            return []
        return [name for name, _ in self.named_parameters() if is_vision_expert_parameter(name)]


def is_vision_expert_parameter(name: str) -> bool:
    """BEiT-3 parameters RLHF-V gives learning rate 0: vision experts ('.A.') and the patch embedding."""
    return ".beit3." in name and (".A." in name or ".vision_embed." in name)


# ------------------------------------------------------------------------------------------------
# Original RLHF-V / Muffin checkpoints
# ------------------------------------------------------------------------------------------------
# (pattern on the original name, replacement) in order; the first match wins. See the module docstring.
_KEY_RENAMES = [
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
]
_DROPPED_KEYS = re.compile(
    r"(^model\.vision_tower\.beit3\.text_embed\.|^model\.vision_tower\.beit3\.vision_embed\.mask_token$|"
    r"\.rotary_emb\.inv_freq$)"
)


def map_muffin_key(name: str) -> str | None:
    """Original checkpoint name -> our name, or None for a parameter we do not use."""
    if _DROPPED_KEYS.search(name):
        return None
    for pattern, replacement in _KEY_RENAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # preferred first
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_shards(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint, in order.

    A file is itself; a directory is read through its shard index (`model.safetensors.index.json`, then
    `pytorch_model.bin.index.json`: its `weight_map` names the shards), else its single
    `model.safetensors` / `pytorch_model.bin`. Never a glob: RLHF-V / Muffin directories also hold
    `training_args.bin` (a pickled object, not weights) and optimizer files.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Muffin checkpoint not found: {path}")
    for name in INDEX_FILES:
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{index}: not a shard index with a 'weight_map' ({e}); re-save the checkpoint"
                ) from None
            shards = [path / f for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in shards if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} names shards that are not there: {missing[:3]}; download the whole checkpoint"
                )
            return sorted(shards)
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(
        f"{path}: no {' / '.join(INDEX_FILES)} and no {' / '.join(SINGLE_FILES)}; "
        "point model.muffin_checkpoint at the checkpoint directory or at one weight file"
    )


def read_shard(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One weight file. `.bin` / `.pt` load with `torch.load(weights_only=True, mmap=True)`: no pickled
    code runs, and tensors stay in the page cache until they are copied (one shard in memory at a time)."""
    from safetensors.torch import load_file

    file = str(file)
    if file.endswith(".safetensors"):
        return load_file(file)
    try:
        part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) serialisation cannot be memory-mapped
        part = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(part, dict) and isinstance(part.get("model"), dict):
        part = part["model"]
    return part


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file or directory, see `checkpoint_shards`) in one dict. For small
    checkpoints and tests; `load_muffin_checkpoint` streams shard by shard instead."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_shards(path):
        state.update(read_shard(file))
    return state


def interpolate_vision_positions(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """BEiT-3 vision position table [2 + 1 + g*g, D] -> [2 + 1 + grid*grid, D]: the two unused rows and
    CLS kept, the patch rows resized as a g x g image with bicubic interpolation (as Muffin does when the
    tower's resolution changes, e.g. 672 -> 448 px)."""
    keep = POSITION_OFFSET + 1
    side = math.isqrt(weight.shape[0] - keep)
    if side * side != weight.shape[0] - keep:
        raise ValueError(f"vision position table has {weight.shape[0]} rows, not {keep} + a square grid")
    if side == grid:
        return weight
    patches = weight[keep:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([weight[:keep].float(), patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(weight.dtype)


VISION_POSITIONS_KEY = "model.vision_tower.beit3.encoder.embed_positions.A.weight"


def load_muffin_checkpoint(
    model: MuffinForCausalLM,
    path_or_state: str | os.PathLike | dict,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    interpolate_positions: bool = False,
) -> dict[str, list[str]]:
    """Load an original RLHF-V / Muffin checkpoint into `model` through the key table above, one shard at
    a time: each shard is read, renamed, cast to `dtype` (default: the model's) and moved to `device`
    (default: CPU) before the next is opened, so host memory holds about one shard beyond the model.
    `model` may be built on the meta device (`build_empty_muffin`); its parameters are then assigned.

    Raises if any of our parameters is not covered, if an original key has no place in our model, or on a
    shape mismatch; a vision position table of another resolution is interpolated only when
    `interpolate_positions` (else the error says so). Returns {"loaded": [...], "dropped": [...]} (original names).
    """
    shards = [path_or_state] if isinstance(path_or_state, dict) else checkpoint_shards(path_or_state)
    ours = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    loaded, dropped, unexpected, covered = [], [], [], set()
    for shard in shards:
        state = shard if isinstance(shard, dict) else read_shard(shard)
        mapped = {}
        for name, tensor in state.items():
            target = map_muffin_key(name)
            if target is None:
                dropped.append(name)
                continue
            if target not in ours:
                unexpected.append(name)
                continue
            shape, own_dtype = ours[target]
            if target == VISION_POSITIONS_KEY and tuple(tensor.shape) != shape and interpolate_positions:
                tensor = interpolate_vision_positions(tensor, math.isqrt(shape[0] - POSITION_OFFSET - 1))
            if tuple(tensor.shape) != shape:
                hint = (
                    (
                        " (the checkpoint's image resolution differs: set model.image_size to the checkpoint's, or "
                        "model.interpolate_positions: true to resize BEiT-3's position embeddings)"
                    )
                    if target == VISION_POSITIONS_KEY
                    else ""
                )
                raise ValueError(
                    f"Muffin checkpoint key {name} (-> {target}) has shape {tuple(tensor.shape)}, "
                    f"the model expects {shape}: the model config does not match the checkpoint{hint}"
                )
            mapped[target] = tensor.to(device=device or "cpu", dtype=dtype or own_dtype)
            loaded.append(name)
        model.load_state_dict(mapped, strict=False, assign=True)
        covered.update(mapped)
        del state, mapped  # drop this shard before the next is read
    missing = sorted(set(ours) - covered)
    if missing or unexpected:
        raise ValueError(
            f"Muffin checkpoint does not match the model: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}); check vision/text sizes and num_query"
        )
    return {"loaded": sorted(loaded), "dropped": sorted(dropped)}


def build_empty_muffin(config: MuffinConfig, attn_implementation: str = "sdpa") -> MuffinForCausalLM:
    """The model with its parameters on the meta device (no memory; buffers stay real): fill it with
    `load_muffin_checkpoint`, which assigns every parameter or raises."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return MuffinForCausalLM._from_config(config, attn_implementation=attn_implementation)


# BEiT-3 sizes by the name in `mm_vision_tower`: (width, layers, heads); FFN = 4 x width.
BEIT3_SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}


def checkpoint_image_size(original: dict) -> int:
    """Image side in pixels of an original Muffin `config.json` (from `mm_vision_tower`, e.g. 672 for
    Muffin-13B's 'beit3_large_patch16_672', 448 for RLHF-V's)."""
    tower = original.get("mm_vision_tower", "beit3_large_patch16_448")
    match = re.fullmatch(r"beit3_(base|large)_patch(\d+)_(\d+)", tower)
    if not match:
        raise ValueError(f"unsupported mm_vision_tower '{tower}': expected beit3_{{base,large}}_patch<P>_<size>")
    return int(match.group(3))


def muffin_config_from_original(original: dict, image_token_id: int, image_size: int | None = None) -> MuffinConfig:
    """MuffinConfig from an original Muffin `config.json` (model_type 'beit3_llava': LLaMA fields +
    `mm_vision_tower` like 'beit3_large_patch16_448' + `num_query`); `image_size` replaces the
    checkpoint's resolution (its position embeddings then need `interpolate_vision_positions`)."""
    tower = original.get("mm_vision_tower", "beit3_large_patch16_448")
    match = re.fullmatch(r"beit3_(base|large)_patch(\d+)_(\d+)", tower)
    if not match:
        raise ValueError(f"unsupported mm_vision_tower '{tower}': expected beit3_{{base,large}}_patch<P>_<size>")
    size, patch, image = match.group(1), int(match.group(2)), image_size or int(match.group(3))
    width, layers, heads = BEIT3_SIZES[size]
    # LLaMA fields pass through; the multimodal ones (mm_*, num_query, ...) become harmless extra attributes.
    # Not the special-token ids: the released configs say bos 0, eos 1, pad -1 (an early LLaMA conversion
    # bug; the tokenizer's are 1, 2 and <unk>/<pad>), and pad -1 would make the last row of the embedding
    # table (`<im_end>`) a padding row that never gets a gradient.
    text = {
        k: v
        for k, v in original.items()
        if k
        not in ("architectures", "model_type", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id")
    }
    return MuffinConfig(
        text_config=LlamaConfig(**text),
        vision_image_size=image,
        vision_patch_size=patch,
        vision_hidden_size=width,
        vision_num_layers=layers,
        vision_num_heads=heads,
        vision_ffn_dim=4 * width,
        num_query=original.get("num_query", 64),
        image_token_id=image_token_id,
    )


def apply_sub_ln_init(model: MuffinForCausalLM) -> None:
    """torchscale scales fc1/fc2/out_proj/v_proj of a sub-LN encoder at init; do the same for random init."""
    encoder = model.model.vision_tower.beit3.encoder
    scale = sub_ln_init_scale(len(encoder.layers))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if any(k in name for k in ("fc1", "fc2", "out_proj", "v_proj")) and name.endswith("weight"):
                p.mul_(scale)
