"""OmniLMM-12B / RLAIF-V-12B: an EVA02-E/14 CLIP vision tower -> a perceiver resampler -> a Mistral decoder.

The RLAIF-V paper's 12B models (`openbmb/OmniLMM-12B`, the starting point; `openbmb/RLAIF-V-12B`, its
RLAIF-V-aligned version). Facts from RLAIF-V's `omnilmm/model/omnilmm.py`, `omnilmm/model/resampler.py`,
`omnilmm/model/utils.py` and `omnilmm/train/train_utils.py`, and from the released `config.json`s:

* vision tower: timm's `eva02_enormous_patch14_clip_224.laion2b_plus` created with `num_classes=0,
  dynamic_img_size=True, dynamic_img_pad=True` (timm `Eva`): width 1792, 64 post-norm blocks
  (x + LN(attn(x)), then x + LN(mlp(x))), 16 heads, GELU MLP of 15360, a fused qkv projection without
  bias plus separate query and value biases (keys have none), a CLS token and learned absolute positions
  for a 16 x 16 grid, resized bicubically (antialiased, float32) to the image's grid (448 px -> 32 x 32);
  an image side that is not a multiple of 14 is zero-padded at the right/bottom; a final LayerNorm; every
  LayerNorm eps 1e-6. The released code replaces the last block by an identity, so the features are the
  63rd block's output through the final LayerNorm, with the CLS token dropped. Its checkpoints hold
  blocks 0..62 only: this tower has `vision_num_layers` = 63 blocks.
* resampler: `num_query` learned queries on a square grid (256 = 16 x 16 for the 12B models), width =
  the LLM's hidden size, hidden / 128 heads (one below a width of 256, which only test replicas have).
  One cross-attention (torch `nn.MultiheadAttention`'s parameters and math) from LN(query) + a fixed 2-D
  sin-cos table to LN(kv_proj(tokens)) + that table resized bicubically to the token grid; values carry
  no positions. Then LayerNorm and a square matrix (`x @ proj`).
* LLM: Mistral (OmniLMM-12B started from Zephyr-7B-beta: 32 layers, 4096 wide, GQA 32/8, sliding window
  4096), LM head without bias. The text holds `<im_start>` + `num_query` x `<im_patch>` + `<im_end>`; the
  `<im_patch>` embeddings are replaced by the resampler's outputs (`<im_start>`/`<im_end>` keep theirs).
* image transform (evaluation, RLAIF-V's `build_transform(is_train=False, std_mode='OPENAI_CLIP')`):
  bicubic resize straight to image_size x image_size (448), OpenAI-CLIP mean/std.

The tower is written here rather than imported from timm: timm requires torchvision, whose PyPI build for
Linux is the CUDA one and cannot even be imported next to the CPU torch this project's machines run (and
transformers switches its image processors to torchvision when it is installed). The module names follow
timm's, so a released checkpoint maps onto ours by prefix only:

| released name (OmniLMMForCausalLM)                          | this module                               |
|-------------------------------------------------------------|-------------------------------------------|
| `model.embed_tokens.*`, `model.layers.{i}.*`, `model.norm.*` | `model.language_model.<same>`            |
| `model.vision_tower.{cls_token, pos_embed}`                 | same                                      |
| `model.vision_tower.patch_embed.proj.{weight,bias}`         | same                                      |
| `model.vision_tower.blocks.{i}.attn.{qkv.weight, q_bias, v_bias, proj.weight, proj.bias}` | same        |
| `model.vision_tower.blocks.{i}.{norm1,norm2}.{weight,bias}`, `...mlp.{fc1,fc2}.{weight,bias}` | same     |
| `model.vision_tower.norm.{weight,bias}`                     | same                                      |
| `model.resampler.{query, pos_embed, proj, kv_proj.weight}`  | same (`pos_embed` a buffer here)          |
| `model.resampler.attn.{in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias}` | same            |
| `model.resampler.{ln_q, ln_kv, ln_post}.{weight,bias}`      | same                                      |
| `lm_head.weight`                                            | same                                      |

Dropped when present: a timm `attn.k_bias` (a zero buffer) and `rotary_emb.inv_freq` (recomputed).
The released RLAIF-V-12B index lists 1130 tensors: 291 Mistral + 825 tower (4 + 63 x 13 + 2) + 14 resampler,
exactly this table's (tests/models/test_omnilmm.py enumerates them).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, MistralConfig, MistralModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from ddpo.models.base import ImageTransform
from ddpo.models.llava import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from ddpo.models.muffin import (
    IMAGE_END_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_START_TOKEN,
    INDEX_FILES,
    SINGLE_FILES,
    ImagePatchCausalLMMixin,
    ImagePatchDecoderMixin,
    ImagePatchPreferenceModel,
    checkpoint_shards,
    read_shard,
)

ORIGINAL_OMNILMM_TYPE = "omnilmm"  # model_type of the released OmniLMM-12B / RLAIF-V-12B config.json
# Tokens OmniLMM's tokenizer adds after the Mistral vocabulary, in the released order (ids 32000..32008).
OMNILMM_ADDED_TOKENS = (
    IMAGE_PATCH_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    "<box>",
    "</box>",
    "<ref>",
    "</ref>",
    "<quad>",
    "</quad>",
)
# Each resampler head is 128 wide in the released code (heads = hidden size // 128).
RESAMPLER_HEAD_WIDTH = 128


@dataclass(frozen=True)
class EvaTowerSize:
    """A timm EVA tower by its sizes: width, blocks, heads, MLP width, patch side and the image side its
    position table was trained for (the table is resized at run time to the image's grid)."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int
    pretrain_size: int


# `mm_vision_tower` values (the part before timm's '.pretrained_tag') the released configs name.
EVA_TOWERS = {"eva02_enormous_patch14_clip_224": EvaTowerSize(1792, 64, 16, 15360, 14, 224)}


class OmniLMMConfig(PreTrainedConfig):
    """EVA tower sizes, resampler settings and a Mistral `text_config` (defaults: OmniLMM-12B's)."""

    model_type = "ddpo_omnilmm"
    sub_configs_defaults = {"text_config": MistralConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_image_size: int = 448
    vision_patch_size: int = 14
    vision_pretrain_size: int = 224
    vision_hidden_size: int = 1792
    vision_num_layers: int = 63  # the released tower's 64 blocks less the last (penultimate-layer features)
    vision_num_heads: int = 16
    vision_mlp_dim: int = 15360
    vision_layernorm_eps: float = 1e-6
    num_query: int = 256
    resampler_num_heads: int = 32
    image_token_id: int = 32000  # <im_patch>
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False


# ------------------------------------------------------------------------------------------------
# The vision tower (timm Eva, post-norm blocks, penultimate layer)
# ------------------------------------------------------------------------------------------------
class EvaAttention(nn.Module):
    """Bidirectional self-attention with a fused bias-free qkv projection and separate q / v biases."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision width {dim} is not divisible by {num_heads} heads (vision_num_heads)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        # The bias is added after the projection module runs (not passed to F.linear with its weight) so
        # ZeRO-3, which gathers a module's weights when that module is called, sees qkv called.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = (self.qkv(x) + bias).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head width), as timm
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class EvaMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    """timm's `EvaBlockPostNorm`: the LayerNorms sit on the residual branches' outputs."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.attn = EvaAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = EvaMlp(dim, mlp_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class EvaPatchEmbed(nn.Module):
    """Strided convolution; with timm's `dynamic_img_pad`, a side that is not a multiple of the patch is
    zero-padded at the right / bottom first. [B, 3, H, W] -> [B, D, ceil(H/p), ceil(W/p)]."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = (-height) % self.patch_size, (-width) % self.patch_size
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.proj(pixel_values)


class EvaVisionTower(nn.Module):
    """[B, 3, H, W] -> patch features [B, h*w, D]: CLS + patches + resized positions, the blocks, the final
    LayerNorm, CLS dropped (the released `forward_features` minus the prefix token)."""

    def __init__(self, config: OmniLMMConfig):
        super().__init__()
        dim, patch = config.vision_hidden_size, config.vision_patch_size
        if config.vision_pretrain_size % patch:
            raise ValueError(
                f"vision_pretrain_size {config.vision_pretrain_size} must be a multiple of the patch size {patch}"
            )
        self.pos_grid = config.vision_pretrain_size // patch
        self.patch_embed = EvaPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid**2, dim))
        eps = config.vision_layernorm_eps
        self.blocks = nn.ModuleList(
            EvaBlock(dim, config.vision_num_heads, config.vision_mlp_dim, eps) for _ in range(config.vision_num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.gradient_checkpointing = False  # set by PreTrainedModel.activation_checkpointing_enable

    def positions(self, height: int, width: int) -> torch.Tensor:
        """[1, 1 + height*width, D]: the CLS row and the patch table resized to a height x width grid (timm's
        `resample_abs_pos_embed`: bicubic, antialiased, in float32)."""
        table = self.pos_embed
        if (height, width) == (self.pos_grid, self.pos_grid):
            return table
        grid = table[:, 1:].float().reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        patches = grid.permute(0, 2, 3, 1).reshape(1, height * width, -1).to(table.dtype)
        return torch.cat([table[:, :1], patches], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values.to(self.cls_token.dtype))  # [B, D, h, w]
        batch, _, height, width = patches.shape
        x = torch.cat([self.cls_token.expand(batch, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.positions(height, width)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)[:, 1:]


# ------------------------------------------------------------------------------------------------
# The resampler
# ------------------------------------------------------------------------------------------------
def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table [grid*grid, dim] (MAE's, as the released resampler builds it): position
    p = row * grid + col; the first half of the channels encodes the column, the second the row, each half
    [sin | cos] of the coordinate times 1 / 10000^(k / (dim/4)), k < dim/4."""
    if dim % 4:
        raise ValueError(f"the resampler width {dim} must be a multiple of 4 for its 2-D sin-cos positions")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coordinates = torch.arange(grid, dtype=torch.float64)

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    columns, rows = coordinates.repeat(grid), coordinates.repeat_interleave(grid)
    return torch.cat([encode(columns), encode(rows)], dim=1).float()


def resize_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A square position table [g*g, D] resized (bicubic, float32, no antialiasing) to a square grid of
    `tokens` entries, as the released resampler does for its keys."""
    source, target = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if source == target:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(target * target, -1).to(table.dtype)


class ResamplerAttention(nn.Module):
    """torch `nn.MultiheadAttention`'s parameters (`in_proj_weight`, `in_proj_bias`, `out_proj`) and math.
    Its own module rather than torch's because torch's calls `out_proj.weight` without calling `out_proj`,
    which ZeRO-3 (gathering a module's weights when it is called) would leave partitioned."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by {num_heads} heads (resampler_num_heads)")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [B, Q, D], key / value [B, N, D] -> [B, Q, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, D/heads]
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(query.shape))


class PerceiverResampler(nn.Module):
    """Vision tokens [B, N, kv_dim] (N a square) -> [B, num_queries, dim]."""

    def __init__(self, num_queries: int, dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        grid = math.isqrt(num_queries)
        if grid * grid != num_queries:
            raise ValueError(f"num_query {num_queries} must be a square (the queries sit on a square grid)")
        # A buffer, not a parameter: the released code freezes the table (requires_grad False), and a
        # parameter here would be unfrozen by PreferenceModel.apply_freezing. It is in the state dict.
        self.register_buffer("pos_embed", sincos_positions(dim, grid))
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = ResamplerAttention(dim, num_heads)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_kv(self.kv_proj(tokens))
        keys = x + resize_positions(self.pos_embed, x.shape[1]).to(x.dtype)
        queries = (self.ln_q(self.query) + self.pos_embed.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.ln_post(self.attn(queries, keys, x)) @ self.proj


# ------------------------------------------------------------------------------------------------
# The HF model
# ------------------------------------------------------------------------------------------------
class OmniLMMPreTrainedModel(PreTrainedModel):
    config: OmniLMMConfig
    config_class = OmniLMMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MistralDecoderLayer", "EvaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Conv normal(0.02), zero bias; LayerNorm 1/0; Embedding normal
        std = self.config.initializer_range
        if isinstance(module, EvaVisionTower):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, EvaAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)  # torch MultiheadAttention's initialisation
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, PerceiverResampler):
            init.trunc_normal_(module.query, std=std)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)  # the released dim^-0.5 * randn


class OmniLMMModel(ImagePatchDecoderMixin, OmniLMMPreTrainedModel):
    """Vision tower + resampler + Mistral decoder (no LM head)."""

    def __init__(self, config: OmniLMMConfig):
        super().__init__(config)
        self.vision_tower = EvaVisionTower(config)
        self.resampler = PerceiverResampler(
            config.num_query,
            config.text_config.hidden_size,
            config.resampler_num_heads,
            config.vision_hidden_size,
            config.vision_layernorm_eps,
        )
        self.language_model = MistralModel(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_query, D_llm]."""
        return self.resampler(self.vision_tower(pixel_values))


class OmniLMMForCausalLM(ImagePatchCausalLMMixin, OmniLMMPreTrainedModel, GenerationMixin):
    def __init__(self, config: OmniLMMConfig):
        super().__init__(config)
        self.model = OmniLMMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# ------------------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------------------
class OmniLMMPreferenceModel(ImagePatchPreferenceModel):
    arch = "omnilmm"
    template = "omnilmm"

    def __init__(
        self,
        hf_model: OmniLMMForCausalLM,
        tokenizer,
        image_transform: ImageTransform | None = None,
        logps_chunk_size: int = 256,
    ):
        config = hf_model.config
        transform = image_transform or ImageTransform(
            config.vision_image_size, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, mode="resize"
        )
        super().__init__(hf_model, tokenizer, transform, logps_chunk_size, "OmniLMM")

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        inner = self.hf_model.model
        return {
            "vision_tower": list(inner.vision_tower.parameters()),
            # The resampler is OmniLMM's vision-to-language projector (queries, attention, projection).
            "projector": list(inner.resampler.parameters()),
            "llm": [*inner.language_model.parameters(), *self.hf_model.lm_head.parameters()],
        }


def random_omnilmm(preset: dict[str, int], tokenizer, image_size: int | None = None, attn_implementation="sdpa"):
    """A randomly initialised OmniLMM of a `models.build.PRESETS` entry's sizes: EVA tower of the preset's
    vision sizes (positions trained for the image's own grid), the largest square number of queries not
    above the preset's, GQA Mistral (half as many key/value heads) of its text sizes."""
    size, patch, width = image_size or preset["image_size"], preset["patch"], preset["text_width"]
    heads = preset["text_heads"]
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=preset["text_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        max_position_embeddings=4096,
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = OmniLMMConfig(
        text_config=text,
        vision_image_size=size,
        vision_patch_size=patch,
        vision_pretrain_size=patch * math.ceil(size / patch),
        vision_hidden_size=preset["vision_width"],
        vision_num_layers=preset["vision_layers"],
        vision_num_heads=preset["vision_heads"],
        vision_mlp_dim=4 * preset["vision_width"],
        num_query=math.isqrt(preset["queries"]) ** 2,
        resampler_num_heads=max(1, width // RESAMPLER_HEAD_WIDTH),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN),
        attn_implementation=attn_implementation,
    )
    return OmniLMMForCausalLM(config)


# ------------------------------------------------------------------------------------------------
# Released OmniLMM-12B / RLAIF-V-12B checkpoints
# ------------------------------------------------------------------------------------------------
_KEY_RENAMES = [(re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1.")]
_DROPPED_KEYS = re.compile(r"(\.attn\.k_bias$|\.rotary_emb\.inv_freq$)")
# Keys of the released config.json that describe the multimodal parts, not the Mistral decoder.
_MULTIMODAL_KEYS = (
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "_name_or_path",
    "mm_vision_tower",
    "mm_use_im_start_end",
    "num_query",
    "image_size",
    "fully_tune",
    "tune_CLIP",
    "tune_mm_mlp_adapter",
    "use_mm_proj",
)


def map_omnilmm_key(name: str) -> str | None:
    """Released checkpoint name -> our name, or None for a tensor we do not use."""
    if _DROPPED_KEYS.search(name):
        return None
    for pattern, replacement in _KEY_RENAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


def eva_tower_of(original: dict) -> EvaTowerSize:
    """The EVA tower a released config.json names in `mm_vision_tower`."""
    name = original.get("mm_vision_tower", "")
    size = EVA_TOWERS.get(name.split(".")[0])
    if size is None:
        raise ValueError(
            f"unsupported mm_vision_tower '{name}' in the OmniLMM config.json: expected one of "
            f"{', '.join(sorted(EVA_TOWERS))} (with or without a '.<pretrained tag>')"
        )
    return size


def omnilmm_config_from_original(original: dict, image_token_id: int, image_size: int | None = None) -> OmniLMMConfig:
    """OmniLMMConfig from a released config.json (model_type 'omnilmm': Mistral fields + `mm_vision_tower`,
    `num_query`, `image_size`); `image_size` (pixels) replaces the config's. The Mistral fields pass through,
    `pad_token_id` 2 included: the released training's embedding row of `</s>` was a padding row too."""
    tower = eva_tower_of(original)
    text = MistralConfig(**{k: v for k, v in original.items() if k not in _MULTIMODAL_KEYS})
    num_query = int(original.get("num_query", 256))
    return OmniLMMConfig(
        text_config=text,
        vision_image_size=image_size or int(original.get("image_size", tower.pretrain_size)),
        vision_patch_size=tower.patch,
        vision_pretrain_size=tower.pretrain_size,
        vision_hidden_size=tower.width,
        vision_num_layers=tower.depth - 1,  # the released code drops the last block
        vision_num_heads=tower.heads,
        vision_mlp_dim=tower.mlp_dim,
        num_query=num_query,
        resampler_num_heads=max(1, text.hidden_size // RESAMPLER_HEAD_WIDTH),
        image_token_id=image_token_id,
    )


def _mapped_shard(state: dict, ours: dict, report: dict, dtype, device) -> dict[str, torch.Tensor]:
    """One shard's tensors under our names, cast and moved; `report` collects loaded / dropped / unexpected."""
    mapped = {}
    for name, tensor in state.items():
        target = map_omnilmm_key(name)
        if target is None:
            report["dropped"].append(name)
            continue
        if target not in ours:
            report["unexpected"].append(name)
            continue
        shape, own_dtype = ours[target]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"OmniLMM checkpoint key {name} (-> {target}) has shape {tuple(tensor.shape)}, the model expects "
                f"{shape}: the model config does not match the checkpoint (load it with its own config.json)"
            )
        mapped[target] = tensor.to(device=device or "cpu", dtype=dtype or own_dtype)
        report["loaded"].append(name)
    return mapped


def load_omnilmm_checkpoint(
    model: OmniLMMForCausalLM,
    path_or_state: str | os.PathLike | dict,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, list[str]]:
    """Load a released OmniLMM / RLAIF-V-12B checkpoint into `model` through the key table above, one shard
    at a time: each shard is read (safetensors, or `.bin` with `torch.load(weights_only=True)`), renamed,
    cast to `dtype` (default: the model's), moved to `device` (default: CPU) and assigned before the next is
    opened, so host memory holds about one shard beyond the model. `model` may be on the meta device
    (`build_empty_omnilmm`). Raises if any of our tensors is not covered, if a released tensor has no place
    in our model, or on a shape mismatch. Returns {"loaded": [...], "dropped": [...]} (released names)."""
    shards = [path_or_state] if isinstance(path_or_state, dict) else checkpoint_shards(path_or_state)
    ours = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    report: dict[str, list[str]] = {"loaded": [], "dropped": [], "unexpected": []}
    covered: set[str] = set()
    for shard in shards:
        state = shard if isinstance(shard, dict) else read_shard(shard)
        mapped = _mapped_shard(state, ours, report, dtype, device)
        model.load_state_dict(mapped, strict=False, assign=True)
        covered.update(mapped)
        del state, mapped  # drop this shard before the next is read
    missing, unexpected = sorted(set(ours) - covered), report["unexpected"]
    if missing or unexpected:
        raise ValueError(
            f"OmniLMM checkpoint does not match the model: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}); check the config.json next to the weights "
            "(mm_vision_tower, num_query, hidden sizes) and that every shard was downloaded"
        )
    return {"loaded": sorted(report["loaded"]), "dropped": sorted(report["dropped"])}


def build_empty_omnilmm(config: OmniLMMConfig, attn_implementation: str = "sdpa") -> OmniLMMForCausalLM:
    """The model with its parameters on the meta device (no memory; buffers stay real): fill it with
    `load_omnilmm_checkpoint`, which assigns every parameter and persistent buffer or raises."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return OmniLMMForCausalLM._from_config(config, attn_implementation=attn_implementation)


# What a hub snapshot needs: configs, tokenizer, weights; never `training_args.bin` (a pickled object).
_SNAPSHOT_FILES = ["*.json", "tokenizer.model", "*.safetensors", "pytorch_model*.bin"]


def checkpoint_directory(path: str | os.PathLike) -> Path:
    """A local checkpoint directory as it is; a hub id (`openbmb/RLAIF-V-12B`) is downloaded into the hub
    cache first (config, tokenizer and weight files only)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=_SNAPSHOT_FILES))
    except Exception as e:  # offline, no such repo, no access: say which and what to do
        raise FileNotFoundError(
            f"{path}: not a local directory, and downloading it from the hub failed ({type(e).__name__}: {e}); "
            "download the checkpoint (e.g. `huggingface-cli download openbmb/RLAIF-V-12B --local-dir DIR`) and "
            "pass the directory"
        ) from None


def is_original_omnilmm(path: str | os.PathLike) -> bool:
    """Whether a local directory holds a released OmniLMM-layout checkpoint (config.json model_type 'omnilmm')."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == ORIGINAL_OMNILMM_TYPE


@dataclass(frozen=True)
class OmniLMMLoad:
    """How `load_original_omnilmm` builds the model: dtype of the weights (None: float32), where the shards
    go as they are read (None: CPU), the decoder's attention kernel, the log-prob chunk size and an image
    side replacing the config's."""

    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    attn_implementation: str = "sdpa"
    logps_chunk_size: int = 256
    image_size: int | None = None


def load_original_omnilmm(path: str | os.PathLike, tokenizer, options: OmniLMMLoad | None = None):
    """An `OmniLMMPreferenceModel` from a released checkpoint (a directory or a hub id) and its tokenizer:
    built on the meta device, filled shard by shard in `options.dtype`."""
    options = options or OmniLMMLoad()
    directory = checkpoint_directory(path)
    if not any((directory / name).is_file() for name in (*INDEX_FILES, *SINGLE_FILES)):
        raise FileNotFoundError(
            f"{directory}: no {' / '.join(INDEX_FILES)} and no {' / '.join(SINGLE_FILES)}; download the whole "
            "checkpoint (weights and their index) into this directory"
        )
    if tokenizer.pad_token is None:  # the released config pads with id 2, the EOS token
        tokenizer.pad_token = tokenizer.eos_token
    original = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
    config = omnilmm_config_from_original(original, image_token_id, options.image_size)
    hf = build_empty_omnilmm(config, options.attn_implementation)
    load_omnilmm_checkpoint(hf, directory, dtype=options.dtype or torch.float32, device=options.device)
    return OmniLMMPreferenceModel(hf, tokenizer, logps_chunk_size=options.logps_chunk_size)
