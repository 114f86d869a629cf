"""The `model:` section of the config (read by models/build.py), and the two pieces every section
shares: `ConfigError` and `config_field` (a dataclass field with its one-line help). ddpo/config.py
composes the sections into the full `Config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key, value or combination is invalid; the message names the key and the fix."""


def config_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and its one-line help (printed by `ddpo train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    arch: Literal["llava", "muffin", "omnilmm"] = config_field(
        "llava",
        "Architecture: 'llava' (LLaVA-1.5, transformers Llava*), 'muffin' (BEiT-3 + 64 queries + LLaMA, RLHF-V) or "
        "'omnilmm' (EVA02-E tower + resampler + Mistral: OmniLMM-12B / RLAIF-V-12B).",
    )
    name_or_path: str | None = config_field(
        None,
        "Checkpoint directory or hub id (a ddpo export, llava-hf, or a released RLHF-V / OmniLMM / RLAIF-V-12B "
        "checkpoint); null = random init from `preset`.",
    )
    preset: Literal["tiny", "small", "bench"] = config_field(
        "tiny", "Size of a randomly initialised model when name_or_path is null (models/build.py lists the sizes)."
    )
    tokenizer: str | None = config_field(
        None,
        "Tokenizer path/hub id for a random-init model; null = build a word-level tokenizer from the training texts.",
    )
    muffin_checkpoint: str | None = config_field(
        None,
        "Original RLHF-V/Muffin checkpoint (a .safetensors/.bin state dict or a directory of them) mapped onto our "
        "parameter names.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = config_field(
        "auto", "Weights/compute dtype: auto = bfloat16 on a GPU that supports it, float32 on CPU."
    )
    image_size: int | None = config_field(
        None,
        "Input image side in pixels for a random-init model; null = the preset's (or an original Muffin "
        "checkpoint's; a different value needs interpolate_positions).",
    )
    patch_size: int | None = config_field(
        None,
        "Vision patch side in pixels for a random-init model; null = the preset's. image_size must be a "
        "multiple of it.",
    )
    image_mode: Literal["pad", "crop", "resize"] | None = config_field(
        None,
        "How a non-square image becomes square: pad (LLaVA-1.5), crop (llava-hf processor, RLAIF-V training), resize "
        "(Muffin); null = the checkpoint's preprocessor config, else pad for LLaVA and resize for Muffin.",
    )
    interpolate_positions: bool = config_field(
        False,
        "With model.muffin_checkpoint: resize BEiT-3's vision position embeddings (bicubic) when model.image_size "
        "differs from the checkpoint's resolution (e.g. Muffin-13B's 672 px -> 448); off = such a mismatch is "
        "an error.",
    )
    vision_feature_layer: int = config_field(
        -2,
        "Random-init LLaVA: the vision-tower layer whose output feeds the projector (LLaVA-1.5: -2, the penultimate; "
        "a 2-layer tower needs -1 not to waste its last layer).",
    )
    freeze_vision_tower: bool = config_field(
        False, "Freeze the whole vision encoder (no gradients, not in the optimizer)."
    )
    freeze_projector: bool = config_field(False, "Freeze the vision-to-language projector.")
    freeze_llm: bool = config_field(False, "Freeze the language model (decoder and LM head).")
    freeze_vision_experts: bool = config_field(
        False,
        "RLHF-V policy for Muffin: learning rate 0 on BEiT-3 vision experts ('A') and the patch embedding; queries "
        "and language experts train.",
    )
    gradient_checkpointing: bool = config_field(
        False, "Recompute decoder-layer activations in the backward pass to save memory."
    )
    shared_prompt: bool = config_field(
        True,
        "Run each pair as one packed [prompt | chosen | rejected] row (prompt and image once; exact: same log-probs "
        "and gradients as two rows).",
    )
    logps_chunk_size: int = config_field(
        256, "Answer tokens per chunk in the LM-head log-prob pass (bounds the [tokens, vocab] logits held at once)."
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = config_field(
        "sdpa",
        "Attention kernel of the decoder: sdpa (shared-prompt rows as a dense 4-D bias), eager, or flex_attention (a "
        "block mask from the [prompt | chosen | rejected] structure; skips masked blocks; needs a CUDA device to "
        "train: PyTorch has no FlexAttention backward on CPU). Vision towers always use sdpa.",
    )
    trust_remote_code: bool = config_field(
        False, "Allow a checkpoint's own Python code to run on load. Off: only enable for sources you trust."
    )
    lora_r: int = config_field(0, "LoRA rank for the language model through peft; 0 = full fine-tuning.")
    lora_alpha: int = config_field(16, "LoRA scaling alpha.")
    lora_dropout: float = config_field(0.05, "LoRA dropout.")
    lora_target: str = config_field(
        "all-linear", "LoRA target modules: 'all-linear' or a comma-separated list of module names."
    )
