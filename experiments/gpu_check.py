"""GPU check: a LLaVA-shaped model with random weights, a few DDPO steps under ZeRO-2 and ZeRO-3 in
bf16 with gradient checkpointing; prints tokens/s, peak GPU memory and model FLOPs utilization.

The step is the trainer's: `LlavaPreferenceModel.pair_token_logps` (image once per pair, chunked LM head)
-> `DDPOLoss` -> a DeepSpeed engine built from `ddpo.trainer.deepspeed_config` (one process).

    python experiments/gpu_check.py                      # on a GPU: the largest preset that fits it
    python experiments/gpu_check.py --preset 7b          # LLaVA-1.5-7B dims: needs ~115 GB (an H200), 1 GPU
    python experiments/gpu_check.py --preset 7b-16l      # 7B widths, 16 of 32 decoder layers: fits an 80 GB H100
    python experiments/gpu_check.py --preset tiny        # the CPU default: checks the code path in seconds

Presets (vision = CLIP ViT; LLM = Llama; vocabulary 32064 except tiny):

| preset | vision width / layers / image px / patch | LLM hidden / layers / heads / FFN | parameters |
|--------|------------------------------------------|-----------------------------------|------------|
| tiny   | 64 / 2 / 32 / 8                          | 64 / 2 / 4 / 256, vocab 1024      | ~0.4 M     |
| 7b-16l | 1024 / 24 / 336 / 14 (CLIP-L/336)        | 4096 / 16 / 32 / 11008            | ~3.8 G     |
| 7b     | 1024 / 24 / 336 / 14 (CLIP-L/336)        | 4096 / 32 / 32 / 11008            | ~7.1 G     |

MFU = 6 x parameters x tokens / step time / peak FLOP/s, with tokens = the real (unpadded) tokens of the
2B rows of a step and the peak of one GPU (`--peak-tflops`, default 989 = H100/H200 SXM bf16 dense).
It is the usual model-FLOPs approximation: it leaves out attention's quadratic term and gradient
checkpointing's recomputed forward (so hardware utilisation is higher), and counts the vision tower
as if it ran on every token (it runs once per image).

Memory at full fine-tuning in bf16 with AdamW: ~16 bytes per parameter (bf16 weights and gradients,
fp32 master weights, Adam moments) plus activations.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

@dataclass(frozen=True)
class Size:
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int


CLIP_L_336 = dict(vision_width=1024, vision_layers=24, vision_heads=16, image_size=336, patch=14)
PRESETS = {
    "tiny": Size(64, 2, 4, 32, 8, hidden=64, layers=2, heads=4, ffn=256, vocab=1024),
    "7b-16l": Size(**CLIP_L_336, hidden=4096, layers=16, heads=32, ffn=11008, vocab=32064),
    "7b": Size(**CLIP_L_336, hidden=4096, layers=32, heads=32, ffn=11008, vocab=32064),
}


def auto_preset() -> str:
    """The largest preset that fits: 7b needs ~115 GB, 7b-16l ~62 GB (+ activations)."""
    if not torch.cuda.is_available():
        return "tiny"
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return "7b" if total_gib >= 125 else "7b-16l"


def build_model(size: Size, tokenizer):
    """A random-init LLaVA-1.5-shaped model wrapped as the trainer's `LlavaPreferenceModel`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from models.llava import IMAGE_TOKEN, LlavaPreferenceModel

    vision = CLIPVisionConfig(hidden_size=size.vision_width, intermediate_size=4 * size.vision_width,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch)
    text = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(size.image_size // size.patch) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    # Build directly in bf16 on the device: a 7B fp32 copy on the host would need 28 GB and minutes.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model = LlavaPreferenceModel(hf, tokenizer)
    model.enable_gradient_checkpointing()
    return model


def random_batch(model, pairs: int, prompt_len: int, answer_len: int, vocab: int, seed: int):
    """`pairs` pairs of [BOS, prompt words, image tokens, prompt words | answer]; chosen/rejected answers differ."""
    from data.records import IGNORE_INDEX, PairBatch

    g = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    first_word = max(tok.all_special_ids + [model.image_token_id]) + 1  # ordinary ids only

    def words(n: int) -> list[int]:
        return torch.randint(first_word, vocab, (n,), generator=g).tolist()

    image = [model.image_token_id] * model.num_image_tokens
    rows = []
    for _ in range(pairs):
        prompt = [tok.bos_token_id, *words(prompt_len // 2), *image, *words(prompt_len - prompt_len // 2)]
        rows.append((prompt, words(answer_len)))
    rows += [(prompt, words(answer_len)) for prompt, _ in rows]  # rejected rows B..2B-1 share the prompts
    T = len(rows[0][0]) + answer_len
    input_ids = torch.tensor([p + a for p, a in rows])
    labels = input_ids.clone()
    labels[:, : len(rows[0][0])] = IGNORE_INDEX
    size = model.image_transform.size
    return PairBatch(pixel_values=torch.randn(pairs, 3, size, size, generator=g), input_ids=input_ids,
                     attention_mask=torch.ones(2 * pairs, T, dtype=torch.long), labels=labels,
                     corrected=torch.zeros(2 * pairs, T - 1, dtype=torch.bool), ref_token_logps=torch.zeros(2 * pairs, T - 1),
                     row_indices=list(range(pairs)))


def run_stage(stage: int, args, size: Size, tokenizer) -> dict:
    """Build a fresh model and engine under ZeRO-`stage`, run warm-up + measured steps, return the numbers."""
    import deepspeed

    from ddpo.config import load_config
    from ddpo.loss import DDPOLoss
    from ddpo.trainer import deepspeed_config

    cuda = torch.cuda.is_available()
    cfg = load_config(None, ["--data.format", "synthetic", "--deepspeed.config", str(REPO / f"configs/deepspeed/zero{stage}.json"),
                             "--train.micro_batch_size", str(args.pairs), "--train.learning_rate", "1e-6"])
    torch.manual_seed(0)
    model = build_model(size, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16=True))
    loss_fn = DDPOLoss.from_config(cfg.loss)
    device = engine.device
    batch = random_batch(model, args.pairs, args.prompt_len, args.answer_len, size.vocab, seed=0).to(device)
    tokens = int(batch.attention_mask.sum())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        chosen, rejected = engine(batch)
        b = batch.num_pairs
        loss, _ = loss_fn(chosen.float(), rejected.float(), batch.ref_token_logps[:b], batch.ref_token_logps[b:],
                          batch.answer_mask, batch.corrected)
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    step_time = statistics.median(times)
    result = {
        "zero_stage": stage, "parameters": params, "tokens_per_step": tokens, "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
        "mfu": 6 * params * tokens / step_time / (args.peak_tflops * 1e12),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "losses": [round(x, 5) for x in losses],
    }
    if not all(torch.isfinite(torch.tensor(losses))):
        raise FloatingPointError(f"ZeRO-{stage}: non-finite loss {losses}")
    engine.destroy()
    del engine, model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="model size (auto: largest that fits; tiny on CPU)")
    parser.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="ZeRO stages to run")
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs per step (2 rows each)")
    parser.add_argument("--prompt-len", type=int, default=64, help="text tokens of each prompt (plus the image tokens)")
    parser.add_argument("--answer-len", type=int, default=256, help="tokens of each answer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s of one GPU (H100/H200 SXM: 989)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from data.tokenizer import build_word_tokenizer
    from ddpo import distributed

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch.distributed calls

    torch.set_flush_denormal(True)
    distributed.init_distributed()
    preset = auto_preset() if args.preset == "auto" else args.preset
    size = PRESETS[preset]
    if args.layers:
        size = Size(**{**size.__dict__, "layers": args.layers})
    tokenizer = build_word_tokenizer(["a random weights check"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device {device}; preset {preset} ({size.layers} decoder layers); {args.pairs} pair(s)/step, "
          f"prompt {args.prompt_len} + image tokens, answers {args.answer_len}; bf16, gradient checkpointing", flush=True)
    results = []
    for stage in args.stages:
        r = run_stage(stage, args, size, tokenizer)
        results.append(r)
        memory = f"{r['peak_gpu_memory_gib']} GiB" if r["peak_gpu_memory_gib"] is not None else "n/a (CPU)"
        print(f"ZeRO-{stage}: {r['parameters'] / 1e6:.1f} M params, {r['tokens_per_step']} tokens/step, "
              f"{r['step_time_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak GPU memory {memory}, "
              f"MFU {100 * r['mfu']:.3g}% (peak {args.peak_tflops:g} TFLOP/s); losses {r['losses']}", flush=True)
    if len(results) > 1:  # same weights, same batch: the stages must agree on the first loss
        first = [r["losses"][0] for r in results]
        print(f"first-step loss per stage {first}: {'agree' if max(first) - min(first) < 1e-2 else 'DISAGREE'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "preset": preset, "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
