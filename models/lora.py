"""LoRA (`model.lora_r > 0`, through peft, as RLAIF-V's LoRA recipe): adapters on every linear layer of
the language model's decoder (or the `model.lora_target` names), never on the LM head, the projector or
the vision tower; everything but the adapters is frozen. The adapters are injected in place, so the
model keeps its structure and `pair_token_logps` (which reads `lm_head.weight` directly) is unchanged.
Saving writes the adapters merged into the base weights: a plain checkpoint that `load_model` reloads
without peft. `save_lora_adapters` writes the adapters alone (peft format, a few hundred MB at 7B)
next to a named base checkpoint; `load_model` on that directory rebuilds base + adapters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ddpo.models.config import ConfigError, ModelConfig

# The model arguments are `models.base.PreferenceModel`s; base imports this module (saving merges the
# adapters), so the type is not imported here.

LORA_ADAPTER = "default"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's names
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def lora_target_modules(model: nn.Module, target: str = "all-linear") -> list[str]:
    """Names (in `model.hf_model`) of the language model's linear layers that get adapters.

    'all-linear' = every `nn.Linear` of the LLM except the LM head (RLAIF-V's `find_all_linear_names`);
    otherwise a comma-separated list of module names (`q_proj,v_proj`) matched against each name's last part.
    """
    llm = {id(p) for p in model.parameter_parts()["llm"]}
    linears = [
        name
        for name, module in model.hf_model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in llm and module is not model.lm_head
    ]
    if target != "all-linear":
        wanted = {t.strip() for t in target.split(",") if t.strip()}
        linears = [name for name in linears if name.rsplit(".", 1)[-1] in wanted]
        if not linears:
            raise ConfigError(
                f"model.lora_target '{target}' matches no linear layer of the language model; use 'all-linear' "
                "or names such as q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
            )
    return linears


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Inject LoRA adapters (rank cfg.lora_r) in place; only they keep requires_grad."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=lora_target_modules(model, cfg.lora_target),
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model.hf_model, adapter_name=LORA_ADAPTER)  # marks only the adapters trainable
    return model


def _lora_layers(hf_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in hf_model.named_modules() if isinstance(module, LoraLayer)}


def merged_lora_state_dict(hf_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The HF state dict with every adapter folded into its base weight (W + alpha/r * B A) and the
    plain module names (`q_proj.weight`, not `q_proj.base_layer.weight`); None if there is no LoRA."""
    layers = _lora_layers(hf_model)
    if not layers:
        return None
    state = hf_model.state_dict()
    for name, layer in layers.items():
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            tensor = state.pop(key)
            rest = key[len(prefix) :]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B: folded into the weight
            rest = rest[len("base_layer.") :]
            if rest == "weight":
                tensor = (tensor.float() + layer.get_delta_weight(LORA_ADAPTER).float()).to(tensor.dtype)
            state[prefix + rest] = tensor
    return state


def save_lora_adapters(model: nn.Module, directory: str | os.PathLike, base_model: str) -> Path:
    """Write the adapters alone (peft's adapter_config.json + adapter_model.safetensors) and the
    tokenizer; `base_model` is the checkpoint (directory or hub id) they apply to."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not _lora_layers(model.hf_model):
        raise ValueError("save_lora_adapters: the model has no LoRA adapters (model.lora_r is 0)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.hf_model.peft_config[LORA_ADAPTER]
    config.base_model_name_or_path = str(base_model)
    config.save_pretrained(directory)
    weights = get_peft_model_state_dict(model.hf_model, adapter_name=LORA_ADAPTER)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / ADAPTER_WEIGHTS_FILE)
    model.tokenizer.save_pretrained(directory)
    return directory
