"""Structural replicas of released checkpoints: tiny random weights in the exact on-disk layout.

No weights can be downloaded in tests or on an offline machine, yet loading code breaks on layouts
(a shard index, a pickled `training_args.bin` next to the shards, a SentencePiece-only tokenizer, old
config keys), not on sizes. These writers produce what a user downloads, at any size:

* `write_muffin_checkpoint`: RLHF-V / Muffin-13B (`openbmb/RLHF-V`, `Yirany/Muffin-13B`):
  `pytorch_model-0000k-of-0000n.bin` shards (original parameter names, incl. the unused BEiT-3 text
  embedding and mask token and LLaMA's `rotary_emb.inv_freq`) + `pytorch_model.bin.index.json` +
  `training_args.bin` (a pickled object) + `config.json` (model_type `beit3_llava`, the released keys:
  bos 0 / eos 1 / pad -1, `mm_vision_tower`, `num_query`, ...) + a SentencePiece `tokenizer.model` +
  `tokenizer_config.json` (`LlamaTokenizer`, old AddedToken dicts) + `special_tokens_map.json` +
  `added_tokens.json` (`[PAD]`, `<im_patch>`, `<im_start>`, `<im_end>` after the SentencePiece vocabulary).
  The BEiT-3 width comes from `BEIT3_SIZES[size]`, so a test can make "large" tiny.
* `write_omnilmm_checkpoint`: OmniLMM-12B / RLAIF-V-12B (`openbmb/OmniLMM-12B`, `openbmb/RLAIF-V-12B`):
  `model-0000k-of-0000n.safetensors` shards under the released names (`OmniLMMForCausalLM`: Mistral's
  `model.layers.*`, timm's `model.vision_tower.*` without the dropped last block, `model.resampler.*`) +
  `model.safetensors.index.json` + `config.json` (model_type `omnilmm`, the released keys: `mm_vision_tower`,
  `num_query`, `image_size`, pad 2, sliding window, ...) + a SentencePiece `tokenizer.model` whose
  `tokenizer_config.json` adds `<im_patch>`, `<im_start>`, `<im_end>` and the six box/ref/quad tokens after
  the SentencePiece vocabulary (as `initialize_vision_tokenizer` does) and carries Zephyr's chat template.
  The EVA tower's sizes come from `EVA_TOWERS[name]`, so a test can make the 'enormous' tower tiny.
* `write_llava_hf_checkpoint`: llava-hf (`llava-hf/llava-1.5-7b-hf`): what `save_pretrained` of
  `LlavaForConditionalGeneration` and of its `LlavaProcessor` (CLIP image processor: short side + centre
  crop; Llama tokenizer with `<image>` and `<pad>`; llava-hf's chat template) write.

`experiments/muffin_load_memory.py` measures loading memory on a large replica.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpo.data.templates import SYSTEM_PROMPT

MUFFIN_ADDED_TOKENS = ("[PAD]", "<im_patch>", "<im_start>", "<im_end>")  # ids V, V+1, V+2, V+3 (released order)
# llava-hf's chat template (llava-1.5-*-hf): no BOS, no system prompt, no EOS; images before the text.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_SPM_TEXTS = [
    SYSTEM_PROMPT,
    "### Human: What is in the picture? ### Assistant: There is a red circle at the top left.",
    "USER: ASSISTANT: Describe the image in detail. A dog sits on a couch next to two cats and a frisbee.",
    "Provide a thorough description of the given image. 0123456789 yes no",
]


@dataclass
class TrainingArguments:
    """Stands for the `transformers.TrainingArguments` object RLHF-V pickles into `training_args.bin`:
    an arbitrary class, which `torch.load(weights_only=True)` refuses (so it must never be read as weights)."""

    learning_rate: float = 5e-7
    output_dir: str = "RLHF-V_checkpoints"


def write_sentencepiece_tokenizer(directory: Path, vocab_size: int = 400) -> int:
    """A LLaMA-style SentencePiece BPE `tokenizer.model` (unk 0, bos 1, eos 2, byte fallback) trained on a
    few template sentences; returns its vocabulary size."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SPM_TEXTS * 10),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    return vocab_size


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_muffin_tokenizer(directory: Path) -> int:
    """RLHF-V's tokenizer files (LLaMA-1 SentencePiece + 4 added tokens); returns the full vocabulary size."""
    base = write_sentencepiece_tokenizer(directory)
    (directory / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(MUFFIN_ADDED_TOKENS)}))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"})
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 2048,
                "pad_token": None,
                "padding_side": "right",
                "sp_model_kwargs": {},
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": _added_token("<s>"),
                "eos_token": _added_token("</s>"),
                "unk_token": _added_token("<unk>"),
            }
        )
    )
    return base + len(MUFFIN_ADDED_TOKENS)


def muffin_original_config(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    tower: str = "beit3_large_patch16_448",
    num_query: int = 8,
) -> dict:
    """The released `config.json` keys (openbmb/RLHF-V), with the sizes given."""
    return {
        "_name_or_path": "replica",
        "architectures": ["Beit3LlavaLlamaForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "freeze_mm_mlp_adapter": False,
        "fully_tune": True,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_sequence_length": 2048,
        "mm_use_im_start_end": True,
        "mm_vision_tower": tower,
        "model_type": "beit3_llava",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_query": num_query,
        "pad_token_id": -1,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.28.0.dev0",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def original_muffin_state_dict(model) -> dict[str, torch.Tensor]:
    """Our MuffinForCausalLM's weights under the released names (the inverse of `models.muffin.map_muffin_key`),
    plus the tensors the released files carry and we drop."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("model.language_model.", "model.", 1)] = tensor.clone()
    config = model.config
    dim = config.vision_hidden_size
    state["model.vision_tower.beit3.text_embed.weight"] = torch.randn(64, dim)
    state["model.vision_tower.beit3.vision_embed.mask_token"] = torch.randn(1, 1, dim)
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    for i in range(config.text_config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
            torch.arange(0, head_dim, 2).float() / head_dim
        )
    return state


def write_sharded_bin(directory: Path, state: dict[str, torch.Tensor], num_shards: int) -> list[Path]:
    """`pytorch_model-0000k-of-0000n.bin` shards of about equal bytes + `pytorch_model.bin.index.json`."""
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    filled = 0
    for name in names:
        k = min(num_shards - 1, filled * num_shards // max(total, 1))
        shards[k][name] = state[name]
        filled += state[name].numel() * state[name].element_size()
    files, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = directory / f"pytorch_model-{k:05d}-of-{num_shards:05d}.bin"
        torch.save(shard, file)
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return files


def write_muffin_checkpoint(
    directory: str | Path, num_shards: int = 3, tower: str = "beit3_large_patch16_448", seed: int = 0, **sizes
) -> Path:
    """A released-layout RLHF-V / Muffin checkpoint with random weights (see the module docstring).
    `sizes`: hidden, layers, heads, intermediate, num_query of the LLaMA part (BEiT-3's from BEIT3_SIZES)."""
    from ddpo.models.muffin import MuffinForCausalLM, muffin_config_from_original

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_muffin_tokenizer(directory)
    original = muffin_original_config(vocab, tower=tower, **sizes)
    (directory / "config.json").write_text(json.dumps(original, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps(
            {
                "_from_model_config": True,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 0,
                "transformers_version": "4.28.0.dev0",
            }
        )
    )
    torch.manual_seed(seed)
    model = MuffinForCausalLM(muffin_config_from_original(original, image_token_id=vocab - 3))
    write_sharded_bin(directory, original_muffin_state_dict(model), num_shards)
    torch.save(TrainingArguments(), directory / "training_args.bin")  # pickled object, as the Trainer writes it
    return directory


def write_llava_hf_checkpoint(
    directory: str | Path, image_size: int = 32, patch_size: int = 8, seed: int = 0, hub_layout: bool = True
) -> Path:
    """What `LlavaForConditionalGeneration.save_pretrained` + `LlavaProcessor.save_pretrained` write for a
    llava-1.5-*-hf model: safetensors + config, CLIP image processor (shortest_edge + centre crop),
    a Llama tokenizer with `<image>` and `<pad>` added, and llava-hf's chat template. `hub_layout`
    also writes `preprocessor_config.json`, as the hub repos have it (transformers 5 nests the image
    processor in `processor_config.json` instead)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from ddpo.models.llava import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm_dir = directory / "_spm"
    spm_dir.mkdir(exist_ok=True)
    write_sentencepiece_tokenizer(spm_dir)
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    tokenizer = AutoTokenizer.from_pretrained(spm_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # llava-hf: <image> = 32000, <pad> = 32001
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = LLAVA_HF_CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=list(CLIP_IMAGE_MEAN),
        image_std=list(CLIP_IMAGE_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(_tiny_llava_config(tokenizer, image_size, patch_size)).save_pretrained(directory)
    processor.save_pretrained(directory)
    if hub_layout:  # the hub repos (saved by transformers 4.x) keep the image processor in its own file
        image_processor.save_pretrained(directory)
    for file in spm_dir.iterdir():
        file.unlink()
    spm_dir.rmdir()
    return directory


def _tiny_llava_config(tokenizer, image_size: int, patch_size: int):
    """A 2-layer LLaVA-1.5 config (CLIP tower, Llama decoder) for `tokenizer`'s vocabulary and image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def muffin_vision_sizes_for_tests(width: int = 32, layers: int = 2, heads: int = 4) -> dict[str, tuple[int, int, int]]:
    """A BEIT3_SIZES table whose 'large' is tiny (monkeypatch it in) so replicas keep the released tower names."""
    return {"base": (width, layers, heads), "large": (width, layers, heads)}


def replica_bytes(directory: str | Path, pattern: str = "pytorch_model-*.bin") -> tuple[int, int]:
    """(total, largest) bytes of a replica's weight shards."""
    sizes = [f.stat().st_size for f in Path(directory).glob(pattern)]
    return sum(sizes), max(sizes)


# ------------------------------------------------------------------------------------------------
# OmniLMM-12B / RLAIF-V-12B
# ------------------------------------------------------------------------------------------------
# Zephyr-7B-beta's chat template, which OmniLMM's tokenizer renders conversations with: its
# `omni_preprocess` searches the rendered ids for the '\n<|user|>\n' and '\n<|assistant|>\n' markers.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def write_omnilmm_tokenizer(directory: Path) -> int:
    """OmniLMM's tokenizer files (a Mistral-style SentencePiece model + 9 added tokens, pad = EOS as the
    released config's pad_token_id 2, Zephyr's chat template); returns the full vocabulary size."""
    from ddpo.models.omnilmm import OMNILMM_ADDED_TOKENS

    base = write_sentencepiece_tokenizer(directory)
    special = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: base + i for i, t in enumerate(OMNILMM_ADDED_TOKENS)}}
    decoder = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, i in special.items()
    }
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": ZEPHYR_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": "</s>",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return base + len(OMNILMM_ADDED_TOKENS)


def omnilmm_original_config(
    vocab_size: int,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 512,
    num_query: int = 9,
    image_size: int = 56,
) -> dict:
    """The released `config.json` keys (openbmb/RLAIF-V-12B), with the sizes given."""
    return {
        "_name_or_path": "replica",
        "architectures": ["OmniLMMForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "fully_tune": True,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "image_size": image_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "mm_use_im_start_end": True,
        "mm_vision_tower": "eva02_enormous_patch14_clip_224.laion2b_plus",
        "model_type": "omnilmm",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_query": num_query,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0",
        "tune_CLIP": True,
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def original_omnilmm_state_dict(model) -> dict[str, torch.Tensor]:
    """Our OmniLMMForCausalLM's weights (and the resampler's position table) under the released names:
    the inverse of `models.omnilmm.map_omnilmm_key`."""
    state = model.state_dict()
    return {name.replace("model.language_model.", "model.", 1): tensor.clone() for name, tensor in state.items()}


def write_sharded_safetensors(directory: Path, state: dict[str, torch.Tensor], num_shards: int) -> list[Path]:
    """`model-0000k-of-0000n.safetensors` shards of about equal bytes + `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    filled = 0
    for name, tensor in state.items():
        shards[min(num_shards - 1, filled * num_shards // max(total, 1))][name] = tensor.contiguous()
        filled += tensor.numel() * tensor.element_size()
    files, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = directory / f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, file, metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return files


def write_omnilmm_checkpoint(directory: str | Path, num_shards: int = 2, seed: int = 0, **sizes) -> Path:
    """A released-layout OmniLMM-12B / RLAIF-V-12B checkpoint with random weights (module docstring).
    `sizes`: the Mistral part's and the resampler's (`omnilmm_original_config`); the EVA tower's come from
    `EVA_TOWERS` (monkeypatch `eva_tower_sizes_for_tests()` in for a tiny one). Weights are stored in
    bfloat16, as released."""
    from ddpo.models.omnilmm import OMNILMM_ADDED_TOKENS, OmniLMMForCausalLM, omnilmm_config_from_original

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_omnilmm_tokenizer(directory)
    original = omnilmm_original_config(vocab, **sizes)
    (directory / "config.json").write_text(json.dumps(original, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"})
    )
    torch.manual_seed(seed)
    image_token_id = vocab - len(OMNILMM_ADDED_TOKENS)  # <im_patch>, the first added token
    model = OmniLMMForCausalLM(omnilmm_config_from_original(original, image_token_id))
    state = {k: v.to(torch.bfloat16) for k, v in original_omnilmm_state_dict(model).items()}
    write_sharded_safetensors(directory, state, num_shards)
    return directory


def eva_tower_sizes_for_tests(width: int = 64, depth: int = 3, heads: int = 4, mlp_dim: int = 160) -> dict:
    """An EVA_TOWERS table whose 'eva02_enormous_patch14_clip_224' is tiny (monkeypatch it in) so replicas keep
    the released tower name: patch 14, positions trained for 28 px (a 2 x 2 grid, resized at run time)."""
    from ddpo.models.omnilmm import EvaTowerSize

    return {"eva02_enormous_patch14_clip_224": EvaTowerSize(width, depth, heads, mlp_dim, 14, 28)}
