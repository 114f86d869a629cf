"""Build a `PreferenceModel` from the `model:` config section, or reload one from a directory.

Random-init presets (`model.preset`, when `model.name_or_path` is null); both architectures share the
sizes, Muffin's vision tower being BEiT-3 of that width and its image tokens the learnable queries:

| preset | vision W/L/H/FFN | image/patch px | LLaVA image tokens | Muffin queries | LLM W/L/H/FFN |
|--------|------------------|----------------|--------------------|----------------|---------------|
| tiny   | 64/2/4/256       | 32/8           | 16                 | 8              | 64/2/4/256    |
| small  | 128/2/4/512      | 48/8           | 36                 | 16             | 128/2/4/512   |
| bench  | 256/4/4/1024     | 64/8           | 64                 | 64             | 256/4/4/1024  |

W/L/H/FFN: width, layers, attention heads, FFN width; the LLM is Llama.

OmniLMM (`arch: omnilmm`, models/omnilmm.py) takes the same sizes: an EVA tower of the vision sizes, the
largest square number of queries not above Muffin's (4 / 16 / 64) and a Mistral decoder of the LLM sizes
(half as many key/value heads); `model.name_or_path` may also name a released OmniLMM-12B / RLAIF-V-12B
checkpoint (a directory or hub id), loaded shard by shard onto the meta-device model.

The vocabulary is the tokenizer's (`len(tokenizer)`), so a random-init model needs one: the trainer
passes it (or `model.tokenizer` names one). `bench` with an 8192-word vocabulary is the 11.5 M-parameter
LLaVA of the benchmarks.

LoRA adapters (`model.lora_r > 0`) are models/lora.py; `load_model` on a directory written by
`models.lora.save_lora_adapters` (a LoRA run's final/) rebuilds base + adapters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ddpo.models.base import DDPO_MODEL_FILE, ImageTransform, PreferenceModel
from ddpo.models.config import ConfigError, ModelConfig
from ddpo.models.llava import IMAGE_TOKEN, LlavaPreferenceModel
from ddpo.models.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LORA_ADAPTER,
    apply_lora,
    has_lora,
    merge_lora_in_place,
)
from ddpo.models.muffin import (
    IMAGE_PATCH_TOKEN,
    MuffinConfig,
    MuffinForCausalLM,
    MuffinPreferenceModel,
    apply_sub_ln_init,
    build_empty_muffin,
    checkpoint_image_size,
    load_muffin_checkpoint,
    muffin_config_from_original,
)
from ddpo.models.omnilmm import (
    ORIGINAL_OMNILMM_TYPE,
    OmniLMMConfig,
    OmniLMMForCausalLM,
    OmniLMMLoad,
    OmniLMMPreferenceModel,
    load_original_omnilmm,
    random_omnilmm,
)

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        vision_width=64,
        vision_layers=2,
        vision_heads=4,
        image_size=32,
        patch=8,
        queries=8,
        text_width=64,
        text_layers=2,
        text_heads=4,
    ),
    "small": dict(
        vision_width=128,
        vision_layers=2,
        vision_heads=4,
        image_size=48,
        patch=8,
        queries=16,
        text_width=128,
        text_layers=2,
        text_heads=4,
    ),
    "bench": dict(
        vision_width=256,
        vision_layers=4,
        vision_heads=4,
        image_size=64,
        patch=8,
        queries=64,
        text_width=256,
        text_layers=4,
        text_heads=4,
    ),
}


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' = bfloat16 on a GPU that supports it, float32 otherwise (CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _text_config(preset: dict, tokenizer) -> LlamaConfig:
    width = preset["text_width"]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=preset["text_layers"],
        num_attention_heads=preset["text_heads"],
        num_key_value_heads=preset["text_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def random_llava(
    preset_name: str,
    tokenizer,
    image_size: int | None = None,
    attn_implementation: str = "sdpa",
    patch_size: int | None = None,
    vision_feature_layer: int = -2,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-1.5-shaped model (CLIP tower, 2-layer GELU projector, Llama) of a preset's size."""
    p = PRESETS[preset_name]
    size, patch = image_size or p["image_size"], patch_size or p["patch"]
    if size % patch:
        raise ConfigError(f"model.image_size {size} must be a multiple of the patch size {patch} (model.patch_size)")
    layers = p["vision_layers"]
    if not -(layers + 1) <= vision_feature_layer <= layers:  # else an IndexError at the first forward pass
        raise ConfigError(
            f"model.vision_feature_layer {vision_feature_layer} is out of range for the '{preset_name}' preset's "
            f"{layers}-layer vision tower: use -1 (its last layer) down to -{layers + 1} (its patch embeddings)"
        )
    vision = CLIPVisionConfig(
        hidden_size=p["vision_width"],
        intermediate_size=4 * p["vision_width"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=size,
        patch_size=patch,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(p, tokenizer),
        image_token_index=_token_id(tokenizer, IMAGE_TOKEN),
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    return LlavaForConditionalGeneration(config)


def random_muffin(
    preset_name: str,
    tokenizer,
    image_size: int | None = None,
    attn_implementation: str = "sdpa",
    patch_size: int | None = None,
) -> MuffinForCausalLM:
    """A randomly initialised Muffin (BEiT-3 + queries + linear projector + Llama) of a preset's size."""
    p = PRESETS[preset_name]
    size, patch = image_size or p["image_size"], patch_size or p["patch"]
    if size % patch:
        raise ConfigError(f"model.image_size {size} must be a multiple of the patch size {patch} (model.patch_size)")
    config = MuffinConfig(
        text_config=_text_config(p, tokenizer),
        vision_image_size=size,
        vision_patch_size=patch,
        vision_hidden_size=p["vision_width"],
        vision_num_layers=p["vision_layers"],
        vision_num_heads=p["vision_heads"],
        vision_ffn_dim=4 * p["vision_width"],
        num_query=p["queries"],
        image_token_id=_token_id(tokenizer, IMAGE_PATCH_TOKEN),
        attn_implementation=attn_implementation,
    )
    model = MuffinForCausalLM(config)
    apply_sub_ln_init(model)
    return model


def _token_id(tokenizer, token: str) -> int:
    if token not in tokenizer.get_vocab():
        raise ConfigError(
            f"the tokenizer has no '{token}' token: add it as a special token (data/tokenizer.py adds the image tokens)"
        )
    return tokenizer.convert_tokens_to_ids(token)


def build_model(cfg: ModelConfig, tokenizer=None, device: torch.device | str | None = None) -> PreferenceModel:
    """The model the `model:` section describes: a checkpoint (`name_or_path`), or a random-init preset
    (optionally filled from an original Muffin checkpoint), with freezing, checkpointing and dtype applied.
    `device`: where an original Muffin checkpoint's shards go as they are read (the trainer's device)."""
    if cfg.attn_implementation == "flex_attention":  # built with sdpa, then only the decoder switches
        return build_model(replace(cfg, attn_implementation="sdpa"), tokenizer, device).set_decoder_attention(
            "flex_attention"
        )
    dtype = resolve_dtype(cfg.dtype)
    if tokenizer is None and cfg.tokenizer:
        tokenizer = load_config_tokenizer(cfg)
    if cfg.name_or_path:
        with _loading("model.name_or_path", cfg.name_or_path, ("config.json", ADAPTER_CONFIG_FILE)):
            model = load_model(
                cfg.name_or_path,
                tokenizer=tokenizer,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                logps_chunk_size=cfg.logps_chunk_size,
                freeze_vision_experts=cfg.freeze_vision_experts,
                device=device,  # a released OmniLMM's shards go straight to the trainer's device
            )
        if model.arch != cfg.arch:
            raise ConfigError(f"model.arch is '{cfg.arch}' but {cfg.name_or_path} holds a '{model.arch}' model")
    else:
        key, value = (
            ("model.muffin_checkpoint", cfg.muffin_checkpoint)
            if cfg.muffin_checkpoint
            else ("model.preset", cfg.preset)
        )
        with _loading(key, value):
            model = _random_init(cfg, tokenizer, device).to(dtype)
    if cfg.image_mode:
        model.image_transform = replace(model.image_transform, mode=cfg.image_mode)
    model.apply_freezing(cfg.freeze_vision_tower, cfg.freeze_projector, cfg.freeze_llm)
    if cfg.lora_r > 0:  # after the freezing: LoRA freezes everything but its adapters
        if has_lora(model):  # model.name_or_path is a LoRA run's final/: its adapters become part of the base
            merge_lora_in_place(model.hf_model)
        apply_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.shared_prompt = cfg.shared_prompt
    return model


def _random_init(cfg: ModelConfig, tokenizer, device: torch.device | str | None = None) -> PreferenceModel:
    muffin_dir = Path(cfg.muffin_checkpoint) if cfg.muffin_checkpoint else None
    if muffin_dir is not None and cfg.arch != "muffin":
        raise ConfigError("model.muffin_checkpoint needs model.arch 'muffin'")
    if tokenizer is None and muffin_dir is not None and (muffin_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(muffin_dir, cfg.trust_remote_code)
    if tokenizer is None:
        raise ConfigError(
            f"a random-init '{cfg.arch}' model (model.name_or_path null) needs a tokenizer: "
            "pass one to build_model or set model.tokenizer"
        )
    if cfg.arch == "llava":
        return LlavaPreferenceModel(
            random_llava(
                cfg.preset, tokenizer, cfg.image_size, cfg.attn_implementation, cfg.patch_size, cfg.vision_feature_layer
            ),
            tokenizer,
            logps_chunk_size=cfg.logps_chunk_size,
        )
    if cfg.arch == "omnilmm":
        preset = dict(PRESETS[cfg.preset], patch=cfg.patch_size or PRESETS[cfg.preset]["patch"])
        hf = random_omnilmm(preset, tokenizer, cfg.image_size, cfg.attn_implementation)
        return OmniLMMPreferenceModel(hf, tokenizer, logps_chunk_size=cfg.logps_chunk_size)
    if muffin_dir is not None and (muffin_dir / "config.json").is_file():  # a full original checkpoint directory
        hf = _load_original_muffin(cfg, muffin_dir, tokenizer, device)
    else:
        hf = random_muffin(cfg.preset, tokenizer, cfg.image_size, cfg.attn_implementation, cfg.patch_size)
        if muffin_dir is not None:  # a bare state dict (file, or a directory of shards) onto the preset's shape
            load_muffin_checkpoint(hf, muffin_dir, interpolate_positions=cfg.interpolate_positions)
    return MuffinPreferenceModel(
        hf, tokenizer, logps_chunk_size=cfg.logps_chunk_size, freeze_vision_experts=cfg.freeze_vision_experts
    )


def _load_original_muffin(cfg: ModelConfig, muffin_dir: Path, tokenizer, device) -> MuffinForCausalLM:
    """An original RLHF-V / Muffin checkpoint directory: the model is built on the meta device and filled
    shard by shard in `model.dtype` (a 13B model never exists in float32 or twice in host memory)."""
    original = json.loads((muffin_dir / "config.json").read_text(encoding="utf-8"))
    own_size = checkpoint_image_size(original)
    if cfg.image_size and cfg.image_size != own_size and not cfg.interpolate_positions:
        raise ConfigError(
            f"model.image_size is {cfg.image_size} but {muffin_dir} is a {own_size}-px checkpoint "
            f"(mm_vision_tower '{original.get('mm_vision_tower')}'): set model.image_size to {own_size} "
            "or null, or set model.interpolate_positions: true to resize its BEiT-3 position embeddings "
            "(what RLHF-V did to train Muffin-13B's 672-px tower at 448)"
        )
    config = muffin_config_from_original(original, _token_id(tokenizer, IMAGE_PATCH_TOKEN), cfg.image_size or own_size)
    hf = build_empty_muffin(config, cfg.attn_implementation)
    load_muffin_checkpoint(
        hf, muffin_dir, dtype=resolve_dtype(cfg.dtype), device=device, interpolate_positions=cfg.interpolate_positions
    )
    return hf


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded or built: no such directory, a hub id that is unknown or not
    in the cache (offline), files that are not a checkpoint, out of memory. The message names the config
    key, the path and what to do; `ddpo train` prints it without a traceback."""

    def __init__(self, key: str, path: str | os.PathLike, problem: str):
        super().__init__(f"{key} '{path}': {problem}")
        self.key, self.path, self.problem = key, str(path), problem


# Each process builds the whole model before DeepSpeed shards anything (no zero.Init), so ZeRO, LoRA and freezing
# do not help here; only the model's own size does.
OUT_OF_MEMORY_AT_LOAD = (
    "every process holds the whole model while it is built: use model.dtype bfloat16 (half of float32), a smaller "
    "model (model.preset, model.name_or_path), fewer processes per machine, or a device with more memory"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# A hub id is 'name' or 'owner/name' (huggingface_hub's rule); anything else can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@contextmanager
def _loading(key: str, path: str | os.PathLike, needs: tuple[str, ...] = ()) -> Iterator[None]:
    """What loading `path` (the value of config `key`) raises, as one ModelLoadError that says what to do:
    transformers and huggingface_hub report a missing directory or hub id as an OSError whose chained
    tracebacks run to a hundred lines. `needs`: files of which a local folder must hold one (checked first:
    a folder of something else fails deep in transformers with a ValueError)."""
    folder = Path(path).expanduser()
    if needs and folder.is_dir() and not any((folder / name).is_file() for name in needs):
        raise ModelLoadError(
            key, path, f"{folder.absolute()} is a folder but holds no {' or '.join(needs)}: point it at a checkpoint"
        )
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            key, path, f"out of memory while building or loading it ({reason}): {OUT_OF_MEMORY_AT_LOAD}"
        ) from e
    except OSError as e:
        raise ModelLoadError(key, path, _load_problem(path, e)) from e


def _load_problem(path: str | os.PathLike, e: OSError) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    local = Path(path).expanduser()
    if local.exists():
        return (
            f"{local.absolute()} could not be read ({reason}); point it at a checkpoint directory (config.json, "
            "weights and tokenizer files, e.g. a `ddpo train` output_dir/final)"
        )
    missing = f"no such file or directory: {local.absolute()}"
    if not _HUB_ID.match(str(path)):
        return (
            f"{missing}; fix the path (relative paths in a config are looked up next to the config file, then in "
            "the working directory; on the command line, in the working directory)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        hub = (
            "is not in the local hub cache, and HF_HUB_OFFLINE=1 reads nothing else: download it first where there "
            f"is network (`huggingface-cli download {path}`) or unset HF_HUB_OFFLINE"
        )
    else:
        hub = f"could not be loaded from the hub ({reason}); check the id and your network or access token"
    return f"{missing}; as a hub id, it {hub}"


def open_checkpoint(argument: str, path: str | os.PathLike, **load_options) -> PreferenceModel:
    """`load_model(path, **load_options)` for a command-line `argument` (e.g. `--model`): a path that is not a
    checkpoint, an unknown hub id or an out-of-memory is one ModelLoadError naming the argument and the fix."""
    with _loading(argument, path, ("config.json", ADAPTER_CONFIG_FILE)):
        return load_model(path, **load_options)


def load_config_tokenizer(cfg: ModelConfig):
    """The tokenizer `model.tokenizer` names, or a ModelLoadError naming that key and the fix."""
    with _loading("model.tokenizer", cfg.tokenizer, TOKENIZER_FILES):
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """AutoTokenizer, with the fix named when a SentencePiece-only tokenizer (LLaMA-1's `tokenizer.model`,
    as RLHF-V / Muffin ship) cannot be read."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError) as e:
        if (Path(path) / "tokenizer.model").is_file() and not (Path(path) / "tokenizer.json").is_file():
            raise ConfigError(
                f"{path}: its tokenizer is a SentencePiece tokenizer.model, which needs the `sentencepiece` "
                f"package (pinned in requirements.txt; `pip install -r requirements.txt`): {e}"
            ) from e
        raise


def _load_lora_adapters(path: Path, **load_options) -> PreferenceModel:
    """A peft adapter directory (`models.lora.save_lora_adapters`): its base_model_name_or_path, loaded as
    any checkpoint, with the adapters injected and filled; the template and image transform the adapters
    were trained with (their ddpo_model.json) replace the base's."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(path))
    config_file = path / ADAPTER_CONFIG_FILE
    if not config.base_model_name_or_path:
        raise ConfigError(f"{config_file}: base_model_name_or_path is empty; set it to the base checkpoint")
    base, needs = config.base_model_name_or_path, ("config.json", ADAPTER_CONFIG_FILE)
    with _loading(f"base_model_name_or_path of {config_file}", base, needs):
        model = load_model(base, **load_options)
    if has_lora(model):  # the base is itself an adapter (a LoRA run started from another's final/): merged first
        merge_lora_in_place(model.hf_model)
    inject_adapter_in_model(config, model.hf_model, adapter_name=LORA_ADAPTER)
    result = set_peft_model_state_dict(
        model.hf_model, load_file(path / ADAPTER_WEIGHTS_FILE), adapter_name=LORA_ADAPTER
    )
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ConfigError(
            f"{path / ADAPTER_WEIGHTS_FILE} lacks adapter weights, e.g. {missing[0]}: it does not match the base model"
        )
    info_file = path / DDPO_MODEL_FILE
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    if info.get("template"):
        model.template = info["template"]
    if "image_transform" in info:
        saved = info["image_transform"]
        model.image_transform = ImageTransform(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    if load_options.get("logps_chunk_size") is None and info.get("logps_chunk_size"):
        model.logps_chunk_size = info["logps_chunk_size"]
    return model


def load_model(
    path: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    logps_chunk_size: int | None = None,
    freeze_vision_experts: bool = False,
    device: torch.device | str | None = None,
) -> PreferenceModel:
    """Reload a `PreferenceModel.save_pretrained` directory, or open an HF LLaVA checkpoint (local dir or hub
    id) or an original RLHF-V / Muffin checkpoint directory (model_type 'beit3_llava'); on `device` if given.
    attn_implementation 'flex_attention' applies to the decoder only; vision towers (no mask) keep sdpa."""
    if attn_implementation == "flex_attention":
        return load_model(
            path, tokenizer, dtype, "sdpa", trust_remote_code, logps_chunk_size, freeze_vision_experts, device
        ).set_decoder_attention("flex_attention")
    if (Path(path) / ADAPTER_CONFIG_FILE).is_file():  # models.lora.save_lora_adapters: base + adapters
        return _load_lora_adapters(
            Path(path),
            tokenizer=tokenizer,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            logps_chunk_size=logps_chunk_size,
            freeze_vision_experts=freeze_vision_experts,
        )
    path = str(path)
    info_file = Path(path) / DDPO_MODEL_FILE
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    tokenizer = tokenizer or load_tokenizer(path, trust_remote_code)
    if not info and _arch_of_checkpoint(path, trust_remote_code) == ORIGINAL_MUFFIN_TYPE:  # released RLHF-V / Muffin
        cfg = ModelConfig(
            arch="muffin",
            muffin_checkpoint=path,
            attn_implementation=attn_implementation,
            dtype={torch.bfloat16: "bfloat16"}.get(dtype, "float32"),
            freeze_vision_experts=freeze_vision_experts,
            **({"logps_chunk_size": logps_chunk_size} if logps_chunk_size else {}),
        )
        return _random_init(cfg, tokenizer, device)
    if not info and _model_type(path, trust_remote_code) == ORIGINAL_OMNILMM_TYPE:  # released OmniLMM / RLAIF-V-12B
        return load_original_omnilmm(
            path, tokenizer, OmniLMMLoad(dtype, device, attn_implementation, logps_chunk_size or 256)
        )
    options = dict(
        dtype=dtype or torch.float32, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    arch = info.get("arch") or _arch_of_checkpoint(path, trust_remote_code)
    transform = (
        ImageTransform(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["image_transform"].items()})
        if "image_transform" in info
        else _hf_image_transform(path)
    )
    chunk = logps_chunk_size or info.get("logps_chunk_size", 256)
    if arch == "llava":
        hf = LlavaForConditionalGeneration.from_pretrained(path, **options)
        model = LlavaPreferenceModel(hf, tokenizer, transform, chunk)
    elif arch == "muffin":
        hf = MuffinForCausalLM.from_pretrained(path, **options)
        model = MuffinPreferenceModel(hf, tokenizer, transform, chunk, freeze_vision_experts=freeze_vision_experts)
    elif arch == "omnilmm":
        model = OmniLMMPreferenceModel(OmniLMMForCausalLM.from_pretrained(path, **options), tokenizer, transform, chunk)
    else:
        raise ConfigError(
            f"{path}: unsupported model type '{arch}' (expected a LLaVA, a ddpo Muffin or OmniLMM checkpoint, or a "
            "released RLHF-V / Muffin or OmniLMM / RLAIF-V-12B one)"
        )
    if info.get("template"):  # what it was trained with; else the architecture's
        model.template = info["template"]
    return model if device is None else model.to(device)


ORIGINAL_MUFFIN_TYPE = "beit3_llava"  # model_type of the released RLHF-V / Muffin config.json


def _model_type(path: str, trust_remote_code: bool) -> str | None:
    """`model_type` of a checkpoint's config.json (local, else from the hub; AutoConfig as the last resort)."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    hub_config = _checkpoint_json(path, "config.json")  # read as JSON: AutoConfig does not know 'omnilmm'
    if hub_config is not None:
        return hub_config.get("model_type")
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type


def _arch_of_checkpoint(path: str, trust_remote_code: bool) -> str:
    model_type = _model_type(path, trust_remote_code)
    mapping = {"llava": "llava", MuffinConfig.model_type: "muffin", OmniLMMConfig.model_type: "omnilmm"}
    return mapping.get(model_type, model_type)


def _hf_image_transform(path: str) -> ImageTransform | None:
    """Image size/mean/std/mode from an HF checkpoint's `preprocessor_config.json` (llava-hf; or the
    `image_processor` of its `processor_config.json`); None = the tower's defaults.

    The mode: 'crop' when the processor centre-crops (llava-hf's CLIP processor: short side to `size`,
    centre crop), unless the checkpoint's config says `image_aspect_ratio: pad` (LLaVA-1.5's own format),
    'resize' when it resizes to a fixed height x width.
    """
    spec = _checkpoint_json(path, "preprocessor_config.json")
    if spec is None:  # transformers 5 writes the image processor inside processor_config.json
        spec = (_checkpoint_json(path, "processor_config.json") or {}).get("image_processor")
    if spec is None:
        return None
    size = spec.get("crop_size") or spec.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    if not side or "image_mean" not in spec:
        return None
    config = _checkpoint_json(path, "config.json") or {}
    if config.get("image_aspect_ratio") == "pad":
        mode = "pad"
    elif spec.get("do_center_crop", False):
        mode = "crop"
    else:
        mode = "resize"
    return ImageTransform(int(side), tuple(spec["image_mean"]), tuple(spec["image_std"]), mode)


def _checkpoint_json(path: str, name: str) -> dict | None:
    file = Path(path) / name
    if not file.is_file():
        if Path(path).is_dir():
            return None
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(path, name))
        except Exception:  # offline or no such file: the caller falls back to defaults
            return None
    return json.loads(file.read_text(encoding="utf-8"))
