"""`ddpo estimate CONFIG`: per-GPU memory and time per epoch of a training config, before any GPU is rented.

    ddpo estimate CONFIG [--gpus N] [--nodes M] [--gpu-memory GiB] [--mfu F] [--gpu-tflops T] [--pairs N]
                         [--prompt-tokens N] [--answer-tokens N] [--section.field VALUE ...]

Defaults: 8 GPUs on 1 node, 80 GiB each, MFU 0.4, 989 TFLOP/s (H100 SXM bf16 dense; A100: 312). It prints the
model's parameters by part, the token shape of a pair, the config's memory per GPU, a table of every ZeRO stage
x gradient checkpointing x optimizer offload with what fits, the cheapest setting that fits, and the time per
epoch, of the config's run and of the reference cache. No weights, no GPU, no network: it runs on every
config in configs/ offline.

**Model.** The config's model is built on the meta device (no memory, no weights): a random-init preset as
`models.build.build_model` builds it; a local checkpoint directory (llava-hf, a released RLHF-V / Muffin or
OmniLMM checkpoint, a ddpo export) from its `config.json`; a released model that is not on this machine
(`llava-hf/llava-1.5-{7b,13b}-hf`, `openbmb/OmniLMM-12B`, `openbmb/RLAIF-V-12B`, an RLHF-V / Muffin
checkpoint directory not downloaded yet) from its published hyper-parameters (`RELEASED_MODELS`: the
released config.json keys, written by `models.replicas`, read by the loaders' own `*_config_from_original`).
Freezing and LoRA are applied as in training, so parameter counts are exact and "trainable" means
`requires_grad` (Muffin's lr-0 vision experts count: they get gradients and AdamW state). llava-hf pads the
vocabulary to 32064 rows, so its 7B has 7,063,427,072 parameters, 524,288 more than the original LLaVA-1.5-7B.

**Memory per GPU** (P parameters, Q trainable, d = GPUs x nodes data-parallel ranks, w = 2 bytes in bf16, 4
in float32), from DeepSpeed 0.19's code paths as the trainer sets them up (bf16 = weights and gradients in
bf16, float32 master weights):

| ZeRO | weights | gradients | optimizer (on the GPU unless offloaded) | buffers |
|---|---|---|---|---|
| 0 | wP | wQ | 8Q Adam + 4Q float32 master + 4Q float32 gradient copy at the step | all-reduce bucket if d > 1 |
| 1 | wP | wQ | (8 + 4 + 4) Q / d | reduce buckets: reduce_bucket_size x w (x2 with overlap_comm) |
| 2 | wP | wQ / d | (8 + 4 + 4) Q / d | the same |
| 3 | wP / d | wQ / d | (8 + 4) Q / d + 4 x min(Q / d, sub_group_size) | 2 gathered layers + prefetch + reduce bucket |

Float32 training keeps no master copy and no gradient copy at ZeRO-0 (torch's AdamW alone; it also keeps no
state for parameters no gradient reaches, such as the CLIP layers after LLaVA's vision_feature_layer).
Offloading the optimizer moves its column, and at ZeRO-2/3 the gradient partition, to host memory (reported
per node). A live reference adds a frozen copy of the weights (wP; wP / d under ZeRO-3); a cached reference
adds nothing on the GPU. With LoRA only the adapters have gradients and optimizer state. The sum is a peak:
the step's float32 gradient copy and the backward's buckets and activations never coexist in full.

**Activations** of one micro-batch, saved for the backward, from the token shape: each pair's image through
the vision tower once ((image / patch)^2 + CLS (+ Muffin's queries) tokens), the decoder over one packed
[prompt | chosen | rejected] row per pair (model.shared_prompt) or two rows, the LM head over the answer
tokens only (the chunked log-prob head). Per decoder layer and token (HF Llama / Mistral with sdpa, as
autograd saves them): the two RMSNorms' float32 copies of their inputs (2 x 4 x hidden), q, k, v as sdpa takes
them (after rotary and key/value repetition) and its output (4w x hidden), the MLP's gate, SiLU and up outputs
(3w x FFN); with trainable decoder weights also the norms' normalised values and outputs and the MLP product
(4w x hidden + w x FFN); LoRA adds each adapter's dropout output and mask ((w + 1) x its input width; w + w on
CPU) and its rank-r output. Vision layers per token: CLIP 8w x width + 3w x FFN, BEiT-3 (multiway, sub-LN)
10w x width + 3w x FFN, EVA (post-norm) 8w x width + 2w x FFN; the projector its input and hidden
activations. Plus the packed row's dense attention bias (rows x L^2 x w; none with flex_attention), the final
norm, rotary tables, and what the LM head keeps: the hidden states in the two-row layout ([2B, T, hidden]) when
it trains, d logp / d h of the answer tokens when frozen. A part saves nothing when neither it nor anything
before it trains (a frozen vision tower). Gradient checkpointing keeps each layer's input (w x hidden per token
and layer) and recomputes one layer at a time in the backward. The peak adds backward temporaries: that
recomputed layer, the LM head's float32 chunk buffers (2 x 4 x chunk x vocabulary) and the gradient flowing
back through a layer (w x tokens x max(hidden, FFN)).

**Time per epoch** = FLOPs / (GPUs x MFU x peak FLOP/s). FLOPs per pair: 6N x tokens for the trained
parameters, 4N x tokens for frozen ones a gradient flows through (LoRA's base weights), 2N x tokens for
frozen parts nothing before them trains (forward only), each part over its own tokens (vision tower: its
tokens; projector: image tokens; decoder layers: the packed row; LM head: answer tokens; embeddings: none);
attention 4 x hidden x (query, key) pairs per layer forward, x3 with the backward (the packed row's causal
pairs, the rejected answer skipping the chosen one; the vision tower's full square); gradient checkpointing
adds a second forward of the checkpointed layers; a live reference adds a forward of the whole model. The MFU
applies to all of it. A cached reference costs one forward over the data before training (`ddpo
precompute-ref`), reported apart. Pairs per epoch: the local data's count, the public sets' sizes
(`ddpo.plan.DATASET_SIZES`: RLHF-V-Dataset 5,733, RLAIF-V-Dataset 83,132, capped by data.max_samples), or
`--pairs`; the config's run is `ddpo.plan.run_plan`'s steps x global batch.

**Token shape.** Measured by encoding (the first 512 pairs of) the data with the model's tokenizer when both
are here (a random-init model's tokenizer is built from the data, as training does): the mean pair for time,
the 95th percentile of each length for memory. Otherwise assumed (`ASSUMED_TEXT_TOKENS`, printed as such;
`--prompt-tokens` / `--answer-tokens` replace them).

**What fits.** Each setting's total is compared with `--gpu-memory` less 10 % (CUDA context, allocator
fragmentation, communication buffers). The cheapest that fits is suggested: no offload before offload (a CPU
optimizer step and PCIe traffic every step), no recomputation before gradient checkpointing (+1/3 of the
FLOPs), then the lowest ZeRO stage (least communication).

**Validated** (tests/test_estimate.py). Parameter counts exact against LLaVA-1.5-7B (7,062,902,784), 13B
(13,350,839,296) and Muffin-13B (13,628,976,128), each derived by arithmetic in the test. On CPU, against
measurements that count tensor bytes (not the allocator): saved activations (autograd's saved-tensor hooks, or
torch's MemTracker with checkpointing) of the tiny LLaVA, Muffin and OmniLMM presets and of the bench-size
model of experiments/bench_step.py, with and without checkpointing, in float32 and bf16, two rows, LoRA and a
frozen LLM: measured / predicted 0.95-1.08; state memory (a census of live tensors inside the optimizer step
of the trainer's DeepSpeed engine) at ZeRO-0 float32, ZeRO-2 and ZeRO-3 bf16: 0.92-1.05 (ZeRO-2 has freed
its bf16 gradient partition by the time the census runs). On a GPU,
experiments/gpu_check.py writes the predicted peak beside `torch.cuda.max_memory_allocated` for each case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ddpo.config import Config, ConfigError, load_config, parse_overrides

GIB = 2**30
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, bf16 dense (A100: 312)
USABLE_FRACTION = 0.9  # of a GPU's memory: CUDA context, allocator fragmentation, NCCL buffers take the rest
SHAPE_SAMPLE = 512  # pairs encoded to measure the token shape
# Text tokens (template + question; each answer) when the data is not here: RLHF-V's corrected answers average
# 64.4 words (docs/PAPER_FACTS.md §2.1), ~1.33 LLaMA tokens a word; RLAIF-V's are longer detailed descriptions.
# (mean, 95th percentile) of (prompt text tokens, answer tokens).
ASSUMED_TEXT_TOKENS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "rlhf-v": ((60, 90), (90, 200)),
    "rlaif-v": ((60, 150), (90, 320)),
}
ASSUMED_DEFAULT = ((64, 128), (96, 256))
ASSUMED_VOCAB = 1024  # a random-init model's word tokenizer when its data is not here
# Saved activations per token and vision layer, in tensors of (width, FFN) elements: see the module docstring.
TOWER_SAVED = {"clip": (8, 3), "beit3": (10, 3), "eva": (8, 2)}
# ... and per token through the projector, in tensors of (tower width, LLM hidden) elements: LLaVA's MLP keeps
# its input, the first linear's output and the GELU's; Muffin's linear its input; OmniLMM's resampler the tower
# tokens, their projection, its LayerNorm and the keys and values built from it.
PROJECTOR_SAVED = {"clip": (1, 2), "beit3": (1, 0), "eva": (1, 4)}


# ------------------------------------------------------------------------------------------------
# The model, on the meta device
# ------------------------------------------------------------------------------------------------
class _ShapeTokenizer:
    """What the model builders and wrappers read from a tokenizer (vocabulary size, special-token ids), for a
    model whose real tokenizer is not on this machine."""

    def __init__(self, vocab_size: int, tokens: dict[str, int], pad_token_id: int = 0):
        self.vocab_size, self.tokens = vocab_size, dict(tokens)
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, 1, 2
        self.pad_token = self.eos_token = "</s>"

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self.tokens)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.tokens[token]


def _image_tokens(first: int) -> dict[str, int]:
    from ddpo.models.llava import IMAGE_TOKEN
    from ddpo.models.muffin import IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN

    return {IMAGE_PATCH_TOKEN: first, IMAGE_START_TOKEN: first + 1, IMAGE_END_TOKEN: first + 2, IMAGE_TOKEN: first}


def llava15_config(size: str, vocab_size: int = 32064):
    """LLaVA-1.5's architecture as llava-hf publishes it: CLIP ViT-L/14 at 336 px (24 layers, width 1024),
    a 2-layer GELU projector, Vicuna-7B / 13B (LLaMA sizes). llava-hf pads the vocabulary to 32064 rows
    (`<image>` 32000, `<pad>` 32001); the original LLaVA-1.5 checkpoints have 32000."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    hidden, layers, ffn = {"7b": (4096, 32, 11008), "13b": (5120, 40, 13824)}[size]
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001 if vocab_size > 32001 else 0,  # the original's pad is <unk>
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def muffin13b_original_config() -> dict:
    """RLHF-V's Muffin-13B as its released config.json describes it: BEiT-3 large at 448 px with 64 queries,
    LLaMA-13B (5120 wide, 40 layers, FFN 13824) with LLaMA's 32000 words + the 4 tokens Muffin adds."""
    from ddpo.models.replicas import MUFFIN_ADDED_TOKENS, muffin_original_config

    return muffin_original_config(
        32000 + len(MUFFIN_ADDED_TOKENS), hidden=5120, layers=40, heads=40, intermediate=13824, num_query=64
    )


def omnilmm12b_original_config() -> dict:
    """OmniLMM-12B / RLAIF-V-12B's released config.json: EVA02-E tower at 448 px, 256 resampler queries,
    Mistral-7B (GQA 32/8, FFN 14336) with 32000 + 9 added words (docs/MODELS.md)."""
    from ddpo.models.omnilmm import OMNILMM_ADDED_TOKENS
    from ddpo.models.replicas import omnilmm_original_config

    return omnilmm_original_config(
        32000 + len(OMNILMM_ADDED_TOKENS),
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        num_query=256,
        image_size=448,
    )


# Hub id -> (arch, the released config: a transformers config or an original config.json dict).
RELEASED_MODELS: dict[str, tuple[str, Callable[[], object]]] = {
    "llava-hf/llava-1.5-7b-hf": ("llava", lambda: llava15_config("7b")),
    "llava-hf/llava-1.5-13b-hf": ("llava", lambda: llava15_config("13b")),
    "openbmb/OmniLMM-12B": ("omnilmm", omnilmm12b_original_config),
    "openbmb/RLAIF-V-12B": ("omnilmm", omnilmm12b_original_config),
    "openbmb/RLHF-V": ("muffin", muffin13b_original_config),
    "Yirany/RLHF-V_v0_SFT": ("muffin", muffin13b_original_config),
}


def meta_model(arch: str, config, cfg, image_size: int | None = None):
    """A PreferenceModel of `arch` from `config` (a transformers config, or a released config.json dict for
    Muffin / OmniLMM) with its parameters on the meta device."""
    import torch

    if arch == "llava":
        from transformers import LlavaForConditionalGeneration

        from ddpo.models.llava import LlavaPreferenceModel

        with torch.device("meta"):
            hf = LlavaForConditionalGeneration(config)
        tokenizer = _ShapeTokenizer(config.text_config.vocab_size, _image_tokens(config.image_token_id))
        return LlavaPreferenceModel(hf, tokenizer, logps_chunk_size=cfg.logps_chunk_size)
    from ddpo.models.muffin import MuffinPreferenceModel, build_empty_muffin, muffin_config_from_original
    from ddpo.models.omnilmm import OmniLMMPreferenceModel, build_empty_omnilmm, omnilmm_config_from_original

    if isinstance(config, dict):  # a released config.json: <im_patch> is Muffin's third-last word, OmniLMM's 32000
        image_token = config["vocab_size"] - 3 if arch == "muffin" else 32000
        to_ours = muffin_config_from_original if arch == "muffin" else omnilmm_config_from_original
        config = to_ours(config, image_token, image_size)
    tokenizer = _ShapeTokenizer(config.text_config.vocab_size, _image_tokens(config.image_token_id))
    if arch == "muffin":
        hf = build_empty_muffin(config)
        return MuffinPreferenceModel(hf, tokenizer, freeze_vision_experts=cfg.freeze_vision_experts)
    return OmniLMMPreferenceModel(build_empty_omnilmm(config), tokenizer)


def _local_checkpoint(path: Path):
    """(arch, config) of a checkpoint directory from its config.json, as `models.build.load_model` reads it: a
    released RLHF-V / Muffin or OmniLMM one, llava-hf, or a ddpo export."""
    from transformers import LlavaConfig

    from ddpo.models.muffin import MuffinConfig
    from ddpo.models.omnilmm import OmniLMMConfig

    original = json.loads((path / "config.json").read_text(encoding="utf-8"))
    kind = original.get("model_type")
    if kind in ("beit3_llava", "omnilmm"):
        return ("muffin" if kind == "beit3_llava" else "omnilmm"), original
    ours = {"llava": ("llava", LlavaConfig), MuffinConfig.model_type: ("muffin", MuffinConfig)}
    ours[OmniLMMConfig.model_type] = ("omnilmm", OmniLMMConfig)
    if kind in ours:
        arch, config_class = ours[kind]
        return arch, config_class.from_pretrained(path)
    raise ConfigError(
        f"{path}: model_type '{kind}' is not one the estimator builds from a config.json (llava-hf, a released "
        "RLHF-V / Muffin or OmniLMM checkpoint, a ddpo export); estimate a random-init preset or a hub id instead"
    )


@dataclass
class BuiltModel:
    """The meta-device model and where its architecture came from (and what the estimate had to assume)."""

    model: object
    source: str
    tokenizer: object = None  # the real tokenizer, when there is one (a random-init model's, built from the data)
    notes: list[str] = field(default_factory=list)


def build_meta_model(cfg: Config, records=None) -> BuiltModel:
    """The config's model with its parameters on the meta device, freezing and LoRA applied as in training."""
    m = cfg.model
    if m.name_or_path or m.muffin_checkpoint:
        built = _released_or_local(cfg)
        model = built.model
        model.apply_freezing(m.freeze_vision_tower, m.freeze_projector, m.freeze_llm)
        if m.lora_r > 0:
            from ddpo.models.lora import apply_lora

            apply_lora(model, m)
        return built
    import torch

    from ddpo.models.build import build_model

    notes, tokenizer = [], None
    if m.tokenizer and Path(m.tokenizer).exists():
        from ddpo.models.build import load_config_tokenizer

        tokenizer = load_config_tokenizer(m)
    elif m.tokenizer:
        notes.append(f"model.tokenizer '{m.tokenizer}' is not here: the vocabulary below is not its")
    if tokenizer is None and records is not None:
        from ddpo.data.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(t for r in records for t in r.texts())
    stand_in = tokenizer or _ShapeTokenizer(ASSUMED_VOCAB, _image_tokens(4))
    if tokenizer is None:
        notes.append(f"vocabulary {ASSUMED_VOCAB} assumed: the random-init model's tokenizer comes from data not here")
    with torch.device("meta"):
        model = build_model(replace(m, gradient_checkpointing=False, dtype="float32"), tokenizer=stand_in)
    return BuiltModel(model, f"random-init preset '{m.preset}' (models/build.py)", tokenizer, notes)


def _released_or_local(cfg: Config) -> BuiltModel:
    m = cfg.model
    path = m.name_or_path or m.muffin_checkpoint
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        arch, config = _local_checkpoint(local)
        built = BuiltModel(meta_model(arch, config, m, m.image_size), f"{path} (its config.json)")
        try:  # with its tokenizer, the local data's token shape can be measured
            from ddpo.models.build import load_tokenizer

            built.tokenizer = load_tokenizer(local, m.trust_remote_code)
        except (ImportError, ValueError, OSError) as e:
            built.notes.append(f"{path}: no usable tokenizer ({type(e).__name__}); token shape assumed")
        return built
    if path in RELEASED_MODELS:
        arch, make = RELEASED_MODELS[path]
        source = f"{path} (published architecture, ddpo/estimate.py RELEASED_MODELS; no weights read)"
    elif m.arch == "muffin":  # an RLHF-V / Muffin checkpoint directory that is not downloaded yet
        arch, make = "muffin", muffin13b_original_config
        source = f"{path}: not here; the released RLHF-V / Muffin-13B architecture (BEiT-3 large + LLaMA-13B)"
    else:
        known = ", ".join(RELEASED_MODELS)
        raise ConfigError(
            f"model.name_or_path '{path}': no config.json there and not a released model the estimator knows "
            f"({known}); download its config.json into a directory and pass that"
        )
    if arch != m.arch:
        raise ConfigError(f"model.arch is '{m.arch}' but {path} is a '{arch}' model")
    return BuiltModel(meta_model(arch, make(), m, m.image_size), source)


# ------------------------------------------------------------------------------------------------
# The shapes the arithmetic needs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tower:
    """A vision tower: kind ('clip', 'beit3', 'eva'), width, layers, FFN width, tokens per image."""

    kind: str
    width: int
    layers: int
    ffn: int
    tokens: int


@dataclass(frozen=True)
class Decoder:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class Lora:
    """LoRA adapters of one decoder layer: the summed input width of the adapted linears, their number, rank
    and dropout."""

    inputs: int
    adapters: int
    rank: int
    dropout: float


@dataclass(frozen=True)
class PartCount:
    params: int
    trainable: int


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts by part (vision_tower, projector, decoder layers, embeddings, lm_head) and the sizes the
    activation and FLOP arithmetic needs."""

    parts: dict[str, PartCount]
    tower: Tower
    decoder: Decoder
    image_tokens: int
    largest_layer: int  # parameters of the largest decoder / vision layer (ZeRO-3 gathers one at a time)
    logps_chunk_size: int
    decoder_weights_train: bool = True  # the decoder layers' own weights (not LoRA adapters) are trainable
    lora: Lora | None = None
    unused_trainable: int = 0  # trainable parameters that get no gradient (see `_unused_trainable`)

    @property
    def total(self) -> int:
        return sum(p.params for p in self.parts.values())

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.parts.values())


def _count(params) -> PartCount:
    params = list({id(p): p for p in params}.values())  # tied weights once
    return PartCount(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def _tower(model) -> Tower:
    config = model.hf_model.config
    if model.arch == "llava":
        v = config.vision_config
        return Tower(
            "clip", v.hidden_size, v.num_hidden_layers, v.intermediate_size, (v.image_size // v.patch_size) ** 2 + 1
        )
    patches = math.ceil(config.vision_image_size / config.vision_patch_size) ** 2
    if model.arch == "muffin":  # [CLS, patches, queries] through BEiT-3
        tokens = patches + 1 + config.num_query
        return Tower("beit3", config.vision_hidden_size, config.vision_num_layers, config.vision_ffn_dim, tokens)
    return Tower("eva", config.vision_hidden_size, config.vision_num_layers, config.vision_mlp_dim, patches + 1)


def _lora(layer) -> Lora | None:
    """The LoRA adapters of one decoder layer (peft layers carry `lora_A`), or None."""
    adapted = [m for m in layer.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    if not adapted:
        return None
    first = next(iter(adapted[0].lora_A.values()))
    dropout = next(iter(adapted[0].lora_dropout.values()))
    return Lora(sum(m.in_features for m in adapted), len(adapted), first.out_features, getattr(dropout, "p", 0.0))


def _unused_trainable(model) -> int:
    """Trainable parameters no gradient reaches: a LLaVA tower's layers past `vision_feature_layer` and its
    post-LayerNorm (the features are taken before them). Torch's AdamW keeps no state for them."""
    if model.arch != "llava":
        return 0
    config = model.hf_model.config
    tower = model.hf_model.model.vision_tower  # transformers 5: CLIPVisionModel without the vision_model level
    tower = getattr(tower, "vision_model", tower)
    layers = len(tower.encoder.layers)
    used = config.vision_feature_layer % (layers + 1)  # hidden_states[k] is the output of layer k (0: embeddings)
    unused = [p for layer in tower.encoder.layers[used:] for p in layer.parameters()]
    unused += list(tower.post_layernorm.parameters())
    return sum(p.numel() for p in unused if p.requires_grad)


def model_shape(model) -> ModelShape:
    """Counts and sizes of a PreferenceModel (any device, the meta device included)."""
    parts = model.parameter_parts()
    decoder = model.hf_model.model.language_model
    head = model.lm_head
    layers = list(decoder.layers)
    text = decoder.config
    layer_params = [p for layer in layers for p in layer.parameters()]
    own = {id(p) for p in (*layer_params, *head.parameters())}
    vision_layers = [
        m for m in model.hf_model.modules() if type(m).__name__ in ("CLIPEncoderLayer", "EncoderLayer", "EvaBlock")
    ]
    counts = {
        "vision_tower": _count(parts["vision_tower"]),
        "projector": _count(parts["projector"]),
        "decoder_layers": _count(layer_params),
        "embeddings": _count(p for p in parts["llm"] if id(p) not in own),
        "lm_head": _count(head.parameters()),
    }
    base_weights = [p for n, p in layers[0].named_parameters() if "lora_" not in n]
    return ModelShape(
        parts=counts,
        tower=_tower(model),
        decoder=Decoder(
            text.hidden_size, len(layers), text.num_attention_heads, text.intermediate_size, text.vocab_size
        ),
        image_tokens=model.num_image_tokens,
        largest_layer=max(sum(p.numel() for p in m.parameters()) for m in [*layers, *vision_layers]),
        logps_chunk_size=model.logps_chunk_size,
        decoder_weights_train=any(p.requires_grad for p in base_weights),
        lora=_lora(layers[0]),
        unused_trainable=_unused_trainable(model),
    )


# ------------------------------------------------------------------------------------------------
# The token shape of a pair
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairShape:
    """Text tokens of one pair: the prompt (template + question; image tokens not included) and each answer."""

    prompt: int
    chosen: int
    rejected: int


@dataclass(frozen=True)
class TokenShape:
    mean: PairShape  # for time
    sizing: PairShape  # for memory: a long pair (95th percentile)
    note: str


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_token_shape(cfg: Config, records, tokenizer, model) -> TokenShape:
    """The mean and 95th-percentile pair of the first `SHAPE_SAMPLE` records, encoded as training encodes them
    (answers cut to data.max_length)."""
    from ddpo.data.collator import PairEncoder

    encoder = PairEncoder.from_config(cfg.data, tokenizer, model.image_placeholder)
    prompts, chosen, rejected = [], [], []
    for record in list(records)[:SHAPE_SAMPLE]:
        prompt, c, r = encoder.check_lengths(record)
        room = cfg.data.max_length - prompt
        prompts.append(prompt - model.num_image_tokens)
        chosen.append(min(c, room))
        rejected.append(min(r, room))
    n = len(prompts)
    mean = PairShape(*(round(sum(v) / n) for v in (prompts, chosen, rejected)))
    sizing = PairShape(*(_percentile(v, 0.95) for v in (prompts, chosen, rejected)))
    return TokenShape(mean, sizing, f"measured on {n} pairs of the data with the model's tokenizer")


def assumed_token_shape(cfg: Config, prompt_tokens: int | None = None, answer_tokens: int | None = None) -> TokenShape:
    """Text lengths when the data or the tokenizer is not here (`ASSUMED_TEXT_TOKENS`), or as given."""
    (prompt_mean, prompt_long), (answer_mean, answer_long) = ASSUMED_TEXT_TOKENS.get(cfg.data.format, ASSUMED_DEFAULT)
    if prompt_tokens is not None:
        prompt_mean = prompt_long = prompt_tokens
    if answer_tokens is not None:
        answer_mean = answer_long = answer_tokens
    given = prompt_tokens is not None and answer_tokens is not None
    note = (
        "as given (--prompt-tokens, --answer-tokens)"
        if given
        else f"assumed for data.format '{cfg.data.format}' (data or tokenizer not here; --prompt-tokens / "
        "--answer-tokens set them)"
    )
    cap = cfg.data.max_length  # an answer is cut to what the prompt leaves of data.max_length
    return TokenShape(
        PairShape(prompt_mean, min(answer_mean, cap), min(answer_mean, cap)),
        PairShape(prompt_long, min(answer_long, cap), min(answer_long, cap)),
        note,
    )


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    zero_stage: int
    checkpointing: bool
    offload: bool

    def describe(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}", "checkpointing" if self.checkpointing else "no checkpointing"]
        return ", ".join(parts + (["optimizer offload"] if self.offload else []))


@dataclass(frozen=True)
class ZeroBuffers:
    """The bucket sizes of the DeepSpeed JSON (elements), DeepSpeed 0.19's defaults where it sets none."""

    reduce_bucket: int = 500_000_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)
    contiguous_gradients: bool = True
    prefetch_bucket: int = 50_000_000
    sub_group: int = 1_000_000_000

    @classmethod
    def from_json(cls, path: str | None) -> ZeroBuffers:
        zero = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}) if path else {}
        return cls(
            reduce_bucket=int(float(zero.get("reduce_bucket_size", cls.reduce_bucket))),
            overlap_comm=zero.get("overlap_comm"),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            prefetch_bucket=int(float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket))),
            sub_group=int(float(zero.get("sub_group_size", cls.sub_group))),
        )


@dataclass(frozen=True)
class Plan:
    """What of the training set-up the estimate reads: precision, batch layout, reference and the cluster."""

    weight_bytes: int = 2  # 2: bf16 (DeepSpeed bf16 on, fp32 master weights), 4: float32
    micro_batch: int = 1
    shared_prompt: bool = True
    flex_attention: bool = False
    live_reference: bool = False
    gpus_per_node: int = 1
    nodes: int = 1
    buffers: ZeroBuffers = ZeroBuffers()
    device: str = "cuda"  # where dropout masks are bool (CUDA's fused kernel) or of the weights' dtype (CPU)

    @property
    def dropout_mask_bytes(self) -> int:
        return 1 if self.device == "cuda" else self.weight_bytes

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def mixed(self) -> bool:
        return self.weight_bytes < 4


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (and per node of host memory for an offloaded optimizer)."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    reference: float
    activations: float  # saved for the backward
    transient: float  # backward temporaries on top of them, at the peak
    host_per_node: float = 0.0

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.buffers + self.reference + self.activations + self.transient


def state_memory(shape: ModelShape, plan: Plan, setting: Setting) -> dict[str, float]:
    """weights, gradients, optimizer, buffers, reference, host_per_node (bytes per GPU) of a ZeRO setting."""
    P, Q, d, w = shape.total, shape.trainable, plan.world, plan.weight_bytes
    stage = setting.zero_stage
    shard = d if stage >= 1 else 1  # optimizer state (and at ZeRO-2/3 the gradients) is split over the ranks
    master = 4 if (plan.mixed or stage >= 1) else 0  # ZeRO keeps an fp32 partition copy even of fp32 weights
    grad_copy = 4 if plan.mixed else 0  # the step converts the (partitioned) gradients to float32
    if stage == 3:  # one sub-group at a time
        step_copy = grad_copy * min(Q / shard, plan.buffers.sub_group)
    else:
        step_copy = grad_copy * Q / shard
    optimizer = (8 + master) * Q / shard + step_copy
    gradients = w * Q / (d if stage >= 2 else 1)
    if stage == 0:  # no flat buffers: parameters no gradient reaches have none (nor, in float32, Adam state)
        gradients = w * (Q - shape.unused_trainable)
        if not plan.mixed:
            optimizer = 8 * (Q - shape.unused_trainable)
    buffers = 0.0
    b = plan.buffers
    if stage in (1, 2) and b.contiguous_gradients:
        buffers = w * b.reduce_bucket * (2 if b.overlap_comm else 1)
    elif stage == 3:
        buffers = w * (2 * shape.largest_layer + b.prefetch_bucket + b.reduce_bucket)
    elif d > 1:  # ZeRO-0's data-parallel all-reduce flattens gradients bucket by bucket
        buffers = w * min(Q, b.reduce_bucket)
    host = 0.0
    if setting.offload and stage >= 1:  # Adam, master weights and float32 gradients live in host memory
        host = (8 + 4 + 4) * Q / shard * plan.gpus_per_node
        optimizer = 0.0
        gradients = 0.0 if stage >= 2 else gradients
    reference = w * P / (d if stage == 3 else 1) if plan.live_reference else 0.0
    return dict(
        weights=w * P / (d if stage == 3 else 1),
        gradients=gradients,
        optimizer=optimizer,
        buffers=buffers,
        reference=reference,
        host_per_node=host,
    )


def _trains(shape: ModelShape, *parts: str) -> bool:
    return any(shape.parts[p].trainable for p in parts)


def decoder_layer_bytes(tokens: int, shape: ModelShape, plan: Plan) -> float:
    """Saved activations of one HF Llama / Mistral decoder layer over `tokens` tokens (module docstring)."""
    w, hidden, ffn = plan.weight_bytes, shape.decoder.hidden, shape.decoder.ffn
    # Always: each RMSNorm's float32 copy of its input; q, k, v as sdpa takes them and its output; the MLP's
    # gate, SiLU(gate) and up projection.
    per_token = 2 * 4 * hidden + 4 * w * hidden + 3 * w * ffn + 4 * shape.decoder.heads  # + log-sum-exp per head
    if shape.decoder_weights_train:  # the norms' normalised values, the linears' inputs (norm outputs, product)
        per_token += 2 * 2 * w * hidden + w * ffn
    lora = shape.lora
    if lora is not None:
        if lora.dropout > 0:  # each adapter's dropout output and mask
            per_token += (w + plan.dropout_mask_bytes) * lora.inputs
        elif not shape.decoder_weights_train:  # lora_A keeps the norm outputs and the MLP product
            per_token += 2 * w * hidden + w * ffn
        per_token += w * lora.rank * lora.adapters  # lora_A's outputs
    return tokens * per_token


def _tower_layer_bytes(tokens: int, tower: Tower, w: int) -> float:
    per_width, per_ffn = TOWER_SAVED[tower.kind]
    return tokens * w * (per_width * tower.width + per_ffn * tower.ffn)


@dataclass(frozen=True)
class Rows:
    """The decoder's batch for a pair shape: rows x length tokens, the two-row layout the LM head reads, and
    the labelled answer tokens."""

    rows: int
    length: int
    two_row_tokens: int
    answers: int
    images: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def decoder_rows(shape: ModelShape, plan: Plan, pair: PairShape, pairs: int | None = None) -> Rows:
    pairs = plan.micro_batch if pairs is None else pairs
    prompt = pair.prompt + shape.image_tokens
    two_row_length = prompt + max(pair.chosen, pair.rejected)
    answers = pairs * (pair.chosen + pair.rejected)
    if plan.shared_prompt:
        return Rows(pairs, prompt + pair.chosen + pair.rejected, 2 * pairs * two_row_length, answers, pairs)
    return Rows(2 * pairs, two_row_length, 2 * pairs * two_row_length, answers, pairs)


def batch_rows(model, batch) -> Rows:
    """The `Rows` of a real `PairBatch` through `model` (its padded lengths), to compare with a measurement."""
    from ddpo.data.records import IGNORE_INDEX
    from ddpo.models.shared_prompt import shared_prompt_layout

    pairs = batch.num_pairs
    answers = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    if model.shared_prompt:
        layout = shared_prompt_layout(batch.input_ids, batch.attention_mask, batch.labels, model.tokenizer.pad_token_id)
        return Rows(pairs, layout.input_ids.shape[1], batch.input_ids.numel(), answers, pairs)
    return Rows(2 * pairs, batch.input_ids.shape[1], batch.input_ids.numel(), answers, pairs)


def activation_memory(shape: ModelShape, plan: Plan, rows: Rows, checkpointing: bool) -> tuple[float, float]:
    """(saved, transient) activation bytes of one micro-batch laid out as `rows` (module docstring)."""
    w, dec, tower = plan.weight_bytes, shape.decoder, shape.tower
    images = rows.images
    vision_saves = _trains(shape, "vision_tower")
    upstream = vision_saves or _trains(shape, "projector")
    decoder_saves = upstream or _trains(shape, "decoder_layers", "embeddings")
    layer = decoder_layer_bytes(rows.tokens, shape, plan) if decoder_saves else 0.0
    vision_layer = _tower_layer_bytes(images * tower.tokens, tower, w) if vision_saves else 0.0
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time in the backward
        decoder = dec.layers * w * rows.tokens * dec.hidden if decoder_saves else 0.0
        vision = tower.layers * w * images * tower.tokens * tower.width if vision_saves else 0.0
        recompute = max(layer, vision_layer)
    else:
        decoder, vision, recompute = dec.layers * layer, tower.layers * vision_layer, 0.0
    projector = 0.0
    if upstream:
        per_width, per_hidden = PROJECTOR_SAVED[tower.kind]
        tokens = tower.tokens - 1 if tower.kind == "eva" else shape.image_tokens  # the resampler reads every patch
        projector = w * images * tokens * (per_width * tower.width + per_hidden * dec.hidden)
    extra = 0.0
    if decoder_saves:
        extra += (4 + (w if _trains(shape, "embeddings") else 0)) * rows.tokens * dec.hidden  # the final norm
        extra += 2 * w * rows.tokens * dec.hidden // dec.heads  # rotary cos / sin
        if plan.shared_prompt and not plan.flex_attention:
            extra += w * rows.rows * rows.length**2  # the packed row's dense additive attention bias
    head_trains = _trains(shape, "lm_head")
    extra += w * (rows.two_row_tokens if head_trains else rows.answers) * dec.hidden
    chunk = min(shape.logps_chunk_size, rows.answers)
    transient = recompute + 2 * 4 * chunk * dec.vocab + w * rows.tokens * max(dec.hidden, dec.ffn)
    return decoder + vision + projector + extra, transient


def memory(shape: ModelShape, plan: Plan, setting: Setting, pair: PairShape) -> Memory:
    saved, transient = activation_memory(shape, plan, decoder_rows(shape, plan, pair), setting.checkpointing)
    return Memory(**state_memory(shape, plan, setting), activations=saved, transient=transient)


# ------------------------------------------------------------------------------------------------
# FLOPs and time
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """FLOPs per pair: the training step's forward + backward, gradient checkpointing's second forward, a live
    reference's forward, and one plain forward (what `ddpo precompute-ref` runs per pair)."""

    model: float
    recompute: float
    reference: float
    forward: float

    @property
    def step(self) -> float:
        return self.model + self.recompute + self.reference


def attended_pairs(prompt: int, chosen: int, rejected: int, shared_prompt: bool) -> int:
    """(query, key) pairs causal attention computes for one pair: the packed row's rejected answer skips the
    chosen one; two rows each see their own prompt."""

    def causal(n: int) -> int:
        return n * (n + 1) // 2

    if shared_prompt:
        return causal(prompt) + sum(a * prompt + causal(a) for a in (chosen, rejected))
    return causal(prompt + chosen) + causal(prompt + rejected)


def pair_flops(shape: ModelShape, plan: Plan, pair: PairShape, checkpointing: bool) -> Flops:
    """FLOPs of one pair of shape `pair` (module docstring: 6N / 4N / 2N per token, attention, recompute)."""
    prompt = pair.prompt + shape.image_tokens
    decoder_tokens = (1 if plan.shared_prompt else 2) * prompt + pair.chosen + pair.rejected
    tower, dec = shape.tower, shape.decoder
    projector_tokens = tower.tokens - 1 if tower.kind == "eva" else shape.image_tokens
    tokens = dict(
        vision_tower=tower.tokens,
        projector=projector_tokens,
        decoder_layers=decoder_tokens,
        embeddings=0,
        lm_head=pair.chosen + pair.rejected,
    )
    model = forward = 0.0
    upstream = False  # whether a part before this one trains: the gradient then flows through this one
    for name, count in tokens.items():
        part = shape.parts[name]
        frozen = part.params - part.trainable
        model += count * (6 * part.trainable + (4 if upstream or part.trainable else 2) * frozen)
        forward += 2 * count * part.params
        upstream = upstream or part.trainable > 0
    vision_saves = _trains(shape, "vision_tower")
    decoder_saves = vision_saves or _trains(shape, "projector", "decoder_layers", "embeddings")
    attention = 4 * dec.hidden * dec.layers * attended_pairs(prompt, pair.chosen, pair.rejected, plan.shared_prompt)
    vision_attention = 4 * tower.width * tower.layers * tower.tokens**2
    model += attention * (3 if decoder_saves else 1) + vision_attention * (3 if vision_saves else 1)
    forward += attention + vision_attention
    recompute = 0.0
    if checkpointing and decoder_saves:
        recompute += 2 * shape.parts["decoder_layers"].params * decoder_tokens + attention
    if checkpointing and vision_saves:
        recompute += 2 * shape.parts["vision_tower"].params * tower.tokens + vision_attention
    return Flops(model, recompute, forward if plan.live_reference else 0.0, forward)


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB
    mfu: float = DEFAULT_MFU
    peak_tflops: float = DEFAULT_PEAK_TFLOPS

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def hours(self, flops: float) -> float:
        return flops / (self.gpus * self.mfu * self.peak_tflops * 1e12) / 3600


# ------------------------------------------------------------------------------------------------
# The estimate of a config
# ------------------------------------------------------------------------------------------------
SETTINGS = [Setting(stage, ckpt, offload) for stage in range(4) for ckpt in (False, True) for offload in (False, True)]
SETTINGS = [s for s in SETTINGS if not (s.offload and s.zero_stage == 0)]  # offload needs ZeRO >= 1


def _cost(setting: Setting) -> tuple[bool, bool, int]:
    """Cheapest first: no CPU optimizer step, no recomputation, the least communication."""
    return setting.offload, setting.checkpointing, setting.zero_stage


@dataclass
class Estimate:
    """Everything `ddpo estimate` prints, for one config on one cluster."""

    config: str
    built: BuiltModel
    shape: ModelShape
    tokens: TokenShape
    plan: Plan
    hardware: Hardware
    configured: Setting
    pairs: int | None
    pairs_note: str
    cfg: Config

    def memory(self, setting: Setting) -> Memory:
        return memory(self.shape, self.plan, setting, self.tokens.sizing)

    def fits(self, setting: Setting) -> bool:
        return self.memory(setting).total <= USABLE_FRACTION * self.hardware.gpu_memory_gib * GIB

    def cheapest(self) -> Setting | None:
        fitting = [s for s in SETTINGS if self.fits(s)]
        return min(fitting, key=_cost) if fitting else None

    def flops(self, checkpointing: bool) -> Flops:
        return pair_flops(self.shape, self.plan, self.tokens.mean, checkpointing)


def _plan(cfg: Config, hardware: Hardware, bf16: bool | None) -> Plan:
    if bf16 is None:  # 'auto' is on for the GPUs this estimates (A100, H100 support bf16)
        bf16 = cfg.deepspeed.bf16 != "false" or cfg.model.dtype == "bfloat16"
    reference = cfg.train.reference == "live" and not cfg.loss.reference_free
    return Plan(
        weight_bytes=2 if bf16 else 4,
        micro_batch=cfg.train.micro_batch_size,
        shared_prompt=cfg.model.shared_prompt,
        flex_attention=cfg.model.attn_implementation == "flex_attention",
        live_reference=reference,
        gpus_per_node=hardware.gpus_per_node,
        nodes=hardware.nodes,
        buffers=ZeroBuffers.from_json(cfg.deepspeed.config),
    )


def configured_setting(cfg: Config) -> Setting:
    """The ZeRO stage, checkpointing and offload the config trains with."""
    stage = cfg.deepspeed.zero_stage
    if stage is None and cfg.deepspeed.config:
        stage = json.loads(Path(cfg.deepspeed.config).read_text(encoding="utf-8")).get("zero_optimization", {})
        stage = stage.get("stage", 0)
    return Setting(stage or 0, cfg.model.gradient_checkpointing, cfg.deepspeed.offload_optimizer)


def _local_records(cfg: Config, notes: list[str]):
    """The config's records when its data is here (synthetic, or a local path), else None."""
    from ddpo.data.formats import load_records
    from ddpo.data.images import DataError

    if cfg.data.format != "synthetic" and not (cfg.data.path and Path(cfg.data.path).exists()):
        return None
    try:
        return load_records(cfg.data, seed=cfg.train.seed)
    except (DataError, OSError, ValueError) as e:
        notes.append(f"data not read ({type(e).__name__}: {str(e)[:120]}); token shape assumed")
        return None


@dataclass(frozen=True)
class TextLengths:
    """`--pairs`, `--prompt-tokens`, `--answer-tokens`: None = from the data, or assumed."""

    pairs: int | None = None
    prompt_tokens: int | None = None
    answer_tokens: int | None = None


def estimate(cfg: Config, hardware: Hardware, lengths: TextLengths = TextLengths(), bf16: bool | None = None):
    """The `Estimate` of `cfg` on `hardware` (bf16 None: as the config trains on a GPU)."""
    from ddpo.plan import nominal_num_pairs

    notes: list[str] = []
    records = _local_records(cfg, notes)
    built = build_meta_model(cfg, records)
    built.notes[:0] = notes
    shape = model_shape(built.model)
    given = lengths.prompt_tokens is not None or lengths.answer_tokens is not None
    if records is not None and built.tokenizer is not None and not given:
        tokens = measure_token_shape(cfg, records, built.tokenizer, built.model)
    else:
        tokens = assumed_token_shape(cfg, lengths.prompt_tokens, lengths.answer_tokens)
    pairs, pairs_note = lengths.pairs, "--pairs"
    if pairs is None and records is not None:
        pairs, pairs_note = len(records), "the local data"
    if pairs is None:
        pairs, pairs_note = nominal_num_pairs(cfg), f"the published size of {cfg.data.path}"
    plan = _plan(cfg, hardware, bf16)
    return Estimate(
        cfg.model.name_or_path or cfg.model.muffin_checkpoint or cfg.model.preset,
        built,
        shape,
        tokens,
        plan,
        hardware,
        configured_setting(cfg),
        pairs,
        pairs_note if pairs is not None else "unknown: pass --pairs",
        cfg,
    )


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GIB:.1f}" if value >= GIB / 10 or value == 0 else f"{value / GIB:.3f}"


def _flop(value: float) -> str:
    return f"{value / 1e12:.2f} TFLOP" if value >= 1e10 else f"{value / 1e9:.3f} GFLOP"


def _duration(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{60 * hours:.1f} min"


def _parameters_lines(e: Estimate) -> list[str]:
    s, m = e.shape, e.cfg.model
    names = dict(
        vision_tower="vision tower",
        projector="projector",
        decoder_layers="decoder layers",
        embeddings="embeddings + norm",
        lm_head="LM head",
    )
    parts = ", ".join(f"{names[k]} {v.params:,}" for k, v in s.parts.items())
    if m.lora_r > 0:
        kind = f"LoRA r={m.lora_r} ({m.lora_target}): adapters only"
    elif s.trainable == s.total:
        kind = "full fine-tuning"
        if m.freeze_vision_experts:  # lr 0, but they keep gradients and AdamW state, as RLHF-V trains
            kind += "; BEiT-3 vision experts at learning rate 0, with gradients and optimizer state"
    else:
        kind = ", ".join(f"{names[k]} frozen" for k, v in s.parts.items() if v.trainable == 0) or "partly frozen"
    return [
        f"model      {e.built.source}",
        f"           {s.total:,} parameters: {parts}",
        f"           trainable {s.trainable:,} ({kind})",
    ]


def _shape_lines(e: Estimate) -> list[str]:
    t, s, plan = e.tokens, e.shape, e.plan
    mean, long = t.mean, t.sizing
    rows = decoder_rows(s, plan, long)
    layout = (
        f"one packed [prompt | chosen | rejected] row per pair (model.shared_prompt): {rows.rows} x {rows.length}"
        if plan.shared_prompt
        else f"two rows per pair: {rows.rows} x {rows.length}"
    )
    return [
        f"pair       {s.image_tokens} image + {mean.prompt} prompt + {mean.chosen} / {mean.rejected} answer tokens "
        f"(mean; for time), {long.prompt} + {long.chosen} / {long.rejected} (95th percentile; for memory): {t.note}",
        f"           vision tower: {s.tower.tokens} tokens per image; decoder: {layout} tokens per micro-batch of "
        f"{plan.micro_batch} pair(s); LM head: {rows.answers} answer tokens",
    ]


def _memory_lines(e: Estimate) -> list[str]:
    c = e.configured
    mem = e.memory(c)
    other = e.memory(replace(c, checkpointing=not c.checkpointing))
    reference = "live reference (a frozen copy)" if e.plan.live_reference else "cached reference (nothing on the GPU)"
    lines = [
        f"memory     per GPU at the config's setting ({c.describe()}, {reference}), GiB:",
        f"           weights {_gib(mem.weights)}, gradients {_gib(mem.gradients)}, optimizer {_gib(mem.optimizer)}, "
        f"buffers {_gib(mem.buffers)}, reference {_gib(mem.reference)}, activations {_gib(mem.activations)} "
        f"(+{_gib(mem.transient)} backward temporaries): total {_gib(mem.total)}",
        f"           activations {'without' if c.checkpointing else 'with'} gradient checkpointing: "
        f"{_gib(other.activations)} (+{_gib(other.transient)})",
    ]
    if mem.host_per_node:
        lines.append(f"           host memory per node for the offloaded optimizer: {_gib(mem.host_per_node)} GiB")
    return lines


def _table_lines(e: Estimate) -> list[str]:
    usable = USABLE_FRACTION * e.hardware.gpu_memory_gib
    lines = [
        f"settings   GiB per GPU; fits = total <= {usable:.0f} GiB "
        f"({USABLE_FRACTION:.0%} of {e.hardware.gpu_memory_gib:g})",
        f"           {'setting':<46}{'weights':>8}{'grads':>7}{'optim':>7}{'buffers':>8}{'ref':>6}{'activ':>7}"
        f"{'total':>7}  fits",
    ]
    for setting in SETTINGS:
        m = e.memory(setting)
        mark = "yes" if e.fits(setting) else "no"
        lead = "config ->  " if setting == e.configured else " " * 11
        cells = (m.weights, m.gradients, m.optimizer, m.buffers, m.reference, m.activations + m.transient, m.total)
        widths = (8, 7, 7, 8, 6, 7, 7)
        lines.append(
            f"{lead}{setting.describe():<46}" + "".join(f"{_gib(v):>{w}}" for v, w in zip(cells, widths)) + f"  {mark}"
        )
    best = e.cheapest()
    if best is None:
        lines.append(
            "suggest    nothing fits: train fewer weights (model.lora_r), a smaller train.micro_batch_size or "
            "data.max_length, more GPUs (--gpus / --nodes), or larger ones (--gpu-memory)"
        )
    else:
        config = "fits" if e.fits(e.configured) else "does NOT fit"
        lines.append(
            f"suggest    cheapest setting that fits: {best.describe()} ({_gib(e.memory(best).total)} GiB); "
            f"the config's ({e.configured.describe()}) {config}"
        )
    return lines


def _time_lines(e: Estimate) -> list[str]:
    from ddpo.plan import run_plan

    hw, c = e.hardware, e.configured
    flops = e.flops(c.checkpointing)
    parts = f"training {_flop(flops.model)}"
    if flops.recompute:
        parts += f" + checkpointing recompute {_flop(flops.recompute)}"
    if flops.reference:
        parts += f" + live reference {_flop(flops.reference)}"
    lines = [
        f"time       {_flop(flops.step)} per pair ({parts}); {hw.gpus} GPU(s) at MFU {hw.mfu:g} of "
        f"{hw.peak_tflops:g} TFLOP/s"
    ]
    if e.pairs is None:
        return lines + [f"           pairs per epoch {e.pairs_note}"]
    best = e.cheapest()
    lines.append(
        f"           {e.pairs:,} pairs per epoch ({e.pairs_note}): "
        f"{_duration(hw.hours(flops.step * e.pairs))} per epoch at the config's setting"
        + (
            f", {_duration(hw.hours(e.flops(best.checkpointing).step * e.pairs))} at the suggested one"
            if best is not None and best.checkpointing != c.checkpointing
            else ""
        )
    )
    try:
        plan = run_plan(e.cfg, e.pairs, hw.gpus)
        lines.append(
            f"           the config's run: {plan.total_steps} steps x {plan.global_batch} pairs = {plan.pairs_seen:,} "
            f"pairs ({plan.epochs:.2f} epochs): {_duration(hw.hours(flops.step * plan.pairs_seen))}"
        )
    except ConfigError as error:
        lines.append(f"           the config's run: {error}")
    if e.cfg.train.reference == "cached" and not e.cfg.loss.reference_free:
        lines.append(
            f"           cached reference: one forward over the data first (`ddpo precompute-ref`): "
            f"{_duration(hw.hours(flops.forward * e.pairs))}"
        )
    return lines


def report(e: Estimate) -> str:
    hw = e.hardware
    precision = "bf16 (fp32 master weights)" if e.plan.mixed else "float32"
    lines = [
        f"ddpo estimate {e.config}",
        f"cluster    {hw.gpus} GPU(s) ({hw.nodes} node(s) x {hw.gpus_per_node}) of {hw.gpu_memory_gib:g} GiB; "
        f"{precision}",
        *_parameters_lines(e),
        *_shape_lines(e),
        *_memory_lines(e),
        *_table_lines(e),
        *_time_lines(e),
    ]
    lines += [f"note       {note}" for note in e.built.notes]
    indent = " " * 11  # continuation lines line up under the first line's text
    wrap = textwrap.TextWrapper(width=118, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
    return "\n".join(wrap.fill(line) if len(line) > 118 else line for line in lines)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, --section.field overrides): an override is `--a.b VALUE` or `--a.b=VALUE`."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            take = 1 if "=" in arg else 2
            overrides += argv[i : i + take]
            i += take
        else:
            own.append(arg)
            i += 1
    return own, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo estimate",
        description="Per-GPU memory (weights, gradients, optimizer, activations) of every ZeRO stage x gradient "
        "checkpointing x offload, which fit, and the time per epoch, from the config alone (the model is built on "
        "the meta device; no weights, no GPU).",
        epilog="Any --section.field VALUE overrides the config, as in `ddpo train` (e.g. --model.name_or_path "
        "llava-hf/llava-1.5-13b-hf). The arithmetic and its validation: ddpo/estimate.py's docstring.",
    )
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GIB, help="memory of one GPU in GiB (default 80)"
    )
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed (default 0.4)")
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=DEFAULT_PEAK_TFLOPS,
        help="peak dense bf16 TFLOP/s of one GPU (default 989, H100 SXM; A100: 312)",
    )
    parser.add_argument("--pairs", type=int, help="pairs per epoch (default: the local data's, or the public set's)")
    parser.add_argument("--prompt-tokens", type=int, help="text tokens of a prompt, image tokens excluded")
    parser.add_argument("--answer-tokens", type=int, help="tokens of each answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    own, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(own)
    problems = [
        f"{flag} must be > 0"
        for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--gpu-memory", args.gpu_memory))
        if value <= 0
    ]
    if not 0 < args.mfu <= 1:
        problems.append("--mfu must be in (0, 1]")
    if problems:
        print(f"ddpo estimate: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        parse_overrides(overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"ddpo estimate: config error: {e}", file=sys.stderr)
        return 2
    hardware = Hardware(args.gpus, args.nodes, args.gpu_memory, args.mfu, args.gpu_tflops)
    lengths = TextLengths(args.pairs, args.prompt_tokens, args.answer_tokens)
    result = estimate(cfg, hardware, lengths)
    result.config = args.config
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
