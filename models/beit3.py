"""BEiT-3 multiway encoder with learnable queries, written without torchscale.

BEiT-3 (torchscale `EncoderConfig(multiway=True, subln=True)`, the `beit3_large_patch16_*` models that
Muffin / RLHF-V use) is a pre-LayerNorm Transformer encoder in which every LayerNorm, attention
projection and FFN exists twice: a vision expert `A` and a language expert `B`. A sequence is split by
position: the first `split` tokens go through `A`, the rest through `B`; attention itself is shared, so
every token attends to all tokens. Muffin feeds `[CLS, patches..., queries...]`: CLS and the patches
take the vision experts, the learnable queries the language experts, and the query outputs are the
image features.

Position handling, as in torchscale's BEiT-3: learned absolute position embeddings, themselves
multiway (`embed_positions.A` for the vision tokens, `embed_positions.B` for the queries), each part
numbered from 2 (the fairseq convention, positions 0 and 1 unused). `beit3_large_*` sets no relative
position buckets (`rel_pos_buckets=0`), so there is no relative attention bias. Sub-LN (`subln=True`):
an extra LayerNorm on the attention output before `out_proj` (`inner_attn_ln`) and one inside the
FFN after the activation (`ffn_layernorm`).

Parameter names follow torchscale's so that a Muffin checkpoint maps by prefix only
(`models/muffin.py` holds the table), e.g. `beit3.encoder.layers.0.self_attn.q_proj.A.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Positions of each multiway part start at 2 (fairseq convention kept by torchscale's BEiT-3).
POSITION_OFFSET = 2


class Multiway(nn.Module):
    """Two copies of a module: `A` for tokens before `split`, `B` for tokens from `split` on."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.A = a
        self.B = b

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """x: [B, L, ...]; split in [0, L]."""
        if split >= x.shape[1]:
            return self.A(x)
        if split == 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


def multiway_layer_norm(dim: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))


def multiway_linear(dim_in: int, dim_out: int) -> Multiway:
    return Multiway(nn.Linear(dim_in, dim_out), nn.Linear(dim_in, dim_out))


class VisionEmbedding(nn.Module):
    """Patchify with a strided convolution and prepend a CLS token: [B, 3, S, S] -> [B, 1 + P, D]."""

    def __init__(self, image_size: int, patch_size: int, dim: int, in_channels: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"BEiT-3 expects {self.image_size}x{self.image_size} images, got {height}x{width}")
        patches = self.proj(pixel_values).flatten(2).transpose(1, 2)  # [B, P, D]
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class FeedForward(nn.Module):
    """fc1 -> GELU -> LayerNorm (sub-LN) -> fc2."""

    def __init__(self, dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class MultiwayAttention(nn.Module):
    """Full (bidirectional) self-attention whose projections and sub-LN are multiway."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = multiway_linear(dim, dim)
        self.k_proj = multiway_linear(dim, dim)
        self.v_proj = multiway_linear(dim, dim)
        self.inner_attn_ln = multiway_layer_norm(dim, eps)
        self.out_proj = multiway_linear(dim, dim)

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, D/heads]
            return t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x, split)), heads(self.k_proj(x, split)), heads(self.v_proj(x, split))
        attn = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as torchscale
        attn = attn.transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(self.inner_attn_ln(attn, split), split)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.self_attn_layer_norm = multiway_layer_norm(dim, eps)
        self.self_attn = MultiwayAttention(dim, num_heads, eps)
        self.final_layer_norm = multiway_layer_norm(dim, eps)
        self.ffn = Multiway(FeedForward(dim, ffn_dim, eps), FeedForward(dim, ffn_dim, eps))

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    """Position embeddings + layers + final multiway LayerNorm."""

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        eps: float,
        num_vision_positions: int,
        max_source_positions: int,
    ):
        super().__init__()
        self.embed_positions = Multiway(
            nn.Embedding(num_vision_positions + POSITION_OFFSET, dim),
            nn.Embedding(max_source_positions, dim),
        )
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, ffn_dim, eps) for _ in range(num_layers))
        self.layer_norm = multiway_layer_norm(dim, eps)
        self.gradient_checkpointing = False

    def positions(self, length: int, split: int, device: torch.device) -> torch.Tensor:
        """Position embeddings [1, L, D]: each multiway part numbered from POSITION_OFFSET."""
        vision = self.embed_positions.A(torch.arange(split, device=device) + POSITION_OFFSET)
        text = self.embed_positions.B(torch.arange(length - split, device=device) + POSITION_OFFSET)
        return torch.cat([vision, text], dim=0).unsqueeze(0)

    def forward(self, tokens: torch.Tensor, split: int) -> torch.Tensor:
        """tokens [B, L, D] (vision tokens first, `split` of them) -> final hidden states [B, L, D]."""
        x = tokens + self.positions(tokens.shape[1], split, tokens.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, split, use_reentrant=False)
            else:
                x = layer(x, split)
        return self.layer_norm(x, split)


class BEiT3(nn.Module):
    """The `beit3` module of a Muffin vision tower (vision embedding + multiway encoder)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        eps: float = 1e-5,
        max_source_positions: int = 1024,
    ):
        super().__init__()
        self.vision_embed = VisionEmbedding(image_size, patch_size, dim)
        self.encoder = Encoder(
            dim,
            num_layers,
            num_heads,
            ffn_dim,
            eps,
            num_vision_positions=self.vision_embed.num_patches + 1,
            max_source_positions=max_source_positions,
        )


class Beit3QueryEncoder(nn.Module):
    """Muffin's vision tower: encodes [CLS, patches, queries] and returns the query outputs.

    `query` [Q, D] is passed in (Muffin keeps it on the language-model side as `model.query`).
    Returns [B, Q, D]; Q must be < max_source_positions - 2.
    """

    def __init__(self, **beit3_kwargs):
        super().__init__()
        self.beit3 = BEiT3(**beit3_kwargs)

    @property
    def num_vision_tokens(self) -> int:
        return self.beit3.vision_embed.num_patches + 1

    def forward(self, pixel_values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        vision = self.beit3.vision_embed(pixel_values.to(self.beit3.vision_embed.proj.weight.dtype))
        queries = query.unsqueeze(0).expand(vision.shape[0], -1, -1).to(vision.dtype)
        split = vision.shape[1]
        hidden = self.beit3.encoder(torch.cat([vision, queries], dim=1), split)
        return hidden[:, split:]


def sub_ln_init_scale(num_layers: int) -> float:
    """torchscale's sub-LN initialisation multiplies fc1/fc2/out_proj/v_proj weights by this."""
    return math.sqrt(math.log(2 * num_layers))
