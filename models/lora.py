"""LoRA (`model.lora_r > 0`, through peft, as RLAIF-V's LoRA recipe): adapters on every linear layer of
the language model's decoder (or the `model.lora_target` names), never on the LM head, the projector or
the vision tower; everything but the adapters is frozen. The adapters are injected in place, so the
model keeps its structure and `pair_token_logps` (which reads `lm_head.weight` directly) is unchanged.

Two ways to save. `save_lora_adapters` writes the adapters alone in peft's format (a few hundred MB at
7B; the base stays where it is) with the tokenizer, processor and `ddpo_model.json`: a LoRA run's
`final/` (ddpo/export.py). `peft.PeftModel.from_pretrained(base, directory)` opens it, and
`models.build.load_model(directory)` rebuilds base + adapters. `PreferenceModel.save_pretrained` writes
the adapters merged into the base weights (`merged_lora_state_dict`): a plain checkpoint that
`load_model` and transformers reload without peft (`ddpo export RUN_DIR --merge`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ddpo.models.config import ConfigError, ModelConfig

# The model arguments are `models.base.PreferenceModel`s; base imports this module (saving merges the
# adapters), so the type is not imported here.

LORA_ADAPTER = "default"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's names
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The key prefix PeftModel.save_pretrained writes: readers of peft adapters other than peft itself (which
# takes keys with or without it) expect it.
PEFT_KEY_PREFIX = "base_model.model."
_DDPO_MODEL_FILE = "ddpo_model.json"  # models.base.DDPO_MODEL_FILE, not imported: base imports this module


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


def has_lora(model: nn.Module) -> bool:
    """Whether `model` (a PreferenceModel) carries LoRA adapters."""
    return bool(_lora_layers(model.hf_model))


@contextmanager
def lora_disabled(hf_model: nn.Module) -> Iterator[None]:
    """The adapters switched off for the block: the forward computes the base model's outputs and
    `merged_lora_state_dict` gives the base weights. Only peft's per-layer flag changes (peft's own
    `enable_adapters(False)` would also clear requires_grad on the adapters an optimizer holds)."""
    layers = list(_lora_layers(hf_model).values())
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


def merged_lora_state_dict(hf_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The HF state dict with every adapter folded into its base weight (W + alpha/r * B A) and the
    plain module names (`q_proj.weight`, not `q_proj.base_layer.weight`); None if there is no LoRA.
    Adapters switched off (`lora_disabled`) are left out: the state dict is then the base's."""
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
            if rest == "weight" and not layer.disable_adapters:
                tensor = (tensor.float() + layer.get_delta_weight(LORA_ADAPTER).float()).to(tensor.dtype)
            state[prefix + rest] = tensor
    return state


def merge_lora_in_place(hf_model: nn.Module) -> None:
    """Fold every adapter into its base weight (as `merged_lora_state_dict` does) and put the plain layer
    back in place of peft's wrapper: a model loaded from an adapter directory becomes a plain model that new
    adapters can go on (a LoRA run started from another LoRA run's final/)."""
    for name, layer in _lora_layers(hf_model).items():
        base = layer.get_base_layer()
        if not layer.disable_adapters:
            with torch.no_grad():
                merged = base.weight.float() + layer.get_delta_weight(LORA_ADAPTER).float()
                base.weight.copy_(merged.to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(hf_model.get_submodule(parent), child, base)
    if hasattr(hf_model, "peft_config"):
        del hf_model.peft_config  # else the next injection finds the old adapter's config


def save_lora_adapters(
    model: nn.Module, directory: str | os.PathLike, base_model: str, template: str | None = None
) -> Path:
    """Write the adapters alone (peft's adapter_config.json + adapter_model.safetensors, keys as
    PeftModel.save_pretrained writes them), the tokenizer and processor, and `ddpo_model.json` (the
    template, default the model's, and the image transform, which the base checkpoint may not hold);
    `base_model` is the checkpoint (directory or hub id) they apply to."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ddpo.models.processor import save_processor

    if not has_lora(model):
        raise ValueError("save_lora_adapters: the model has no LoRA adapters (model.lora_r is 0)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.hf_model.peft_config[LORA_ADAPTER])
    config.base_model_name_or_path = str(base_model)
    config.inference_mode = True  # as peft saves it: a trained adapter, opened for use
    config.save_pretrained(directory)
    weights = get_peft_model_state_dict(model.hf_model, adapter_name=LORA_ADAPTER)
    save_file(
        {PEFT_KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()},
        directory / ADAPTER_WEIGHTS_FILE,
        metadata={"format": "pt"},
    )
    template = template or model.template
    model.tokenizer.save_pretrained(directory)
    save_processor(model, directory, template)
    info = {
        "arch": model.arch,
        "template": template,
        "image_transform": asdict(model.image_transform),
        "logps_chunk_size": model.logps_chunk_size,
        "format_version": 1,
    }
    (directory / _DDPO_MODEL_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return directory
