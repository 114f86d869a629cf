"""GPU check: a LLaVA-shaped model with random weights, a few DDPO steps under ZeRO-2 and ZeRO-3 in
bf16 with gradient checkpointing, for each layout of a pair batch; writes one JSON and one Markdown
table (tokens/s, peak memory, model FLOPs utilization, exactness against two rows).

The step is the trainer's: `LlavaPreferenceModel.pair_token_logps` (image once per pair, chunked LM head)
-> `DDPOLoss` -> a DeepSpeed engine built from `ddpo.trainer.deepspeed_config` (one process). Layouts:

    two_rows      each pair as two rows (prompt and image tokens run twice), sdpa
    shared        one packed [prompt | chosen | rejected] row per pair, sdpa with a dense 4-D mask
    packed_flex   the same packed row, flex_attention with a block mask (models/shared_prompt.py)

Per ZeRO stage one engine is built; before any step, the log-probs of every layout are compared with
two rows (no_grad; bf16, so differences of ~1e-2 are rounding); then each layout runs --warmup + --steps
optimizer steps (median step time reported). On CPU, packed_flex is skipped with the reason recorded
(PyTorch has no FlexAttention backward on CPU) and so is any ZeRO stage DeepSpeed cannot initialise.

    python experiments/gpu_check.py                      # on a GPU: preset 7b with, per ZeRO stage, as many
                                                         # decoder layers as ddpo/estimate.py predicts to fit
    python experiments/gpu_check.py --preset 7b          # LLaVA-1.5-7B dims: ZeRO-3 needs ~115 GB (an H200), 1 GPU
    python experiments/gpu_check.py --preset 7b-16l      # 7B widths, 16 of 32 decoder layers: an 80 GB H100
    python experiments/gpu_check.py --preset tiny        # the CPU default: checks the code path in seconds
    python experiments/gpu_check.py --ladder             # also the step benchmark's ladder (experiments/bench_step.py,
                                                         # on the GPU)
    python experiments/gpu_check.py --head-bench         # also chunked vs naive LM head (experiments/bench_logps.py)

--time-budget-s (default 400) bounds the run: a case that would start past the budget is skipped and
recorded as such, and --head-bench / --ladder get only what is left of it (+45 s), so the script ends
within 8 minutes on one H100 / H200 with its table written.

Memory prediction: for every case, ddpo/estimate.py's per-GPU peak (weights, gradients, optimizer, DeepSpeed
buffers of configs/deepspeed/zero{2,3}.json, saved activations of this batch and backward temporaries; one
GPU, bf16) is written beside `torch.cuda.max_memory_allocated()` over the case's steps (`predicted_peak_gib`,
`measured_over_predicted`). `--layers auto` (the default) uses the same arithmetic before anything is built:
on a GPU, per ZeRO stage, the most decoder layers (at most the preset's, at 7B widths) whose predicted peak fits
92 % of its memory for every layout (on an 80 GB H100: 15 under ZeRO-2, 18 under ZeRO-3; on an H200: 29 and all
32), so MFU is measured at the 7B layer shape without an out-of-memory case.
`estimator_mfu` counts the estimator's FLOPs (each part on its own tokens, causal attention, no recompute)
instead of 6 x parameters x decoder tokens.

Presets (vision = CLIP ViT; LLM = Llama; vocabulary 32064 except tiny):

| preset | vision width / layers / image px / patch | LLM hidden / layers / heads / FFN | parameters |
|--------|------------------------------------------|-----------------------------------|------------|
| tiny   | 64 / 2 / 32 / 8                          | 64 / 2 / 4 / 256, vocab 1024      | ~0.4 M     |
| 7b-16l | 1024 / 24 / 336 / 14 (CLIP-L/336)        | 4096 / 16 / 32 / 11008            | ~3.8 G     |
| 7b     | 1024 / 24 / 336 / 14 (CLIP-L/336)        | 4096 / 32 / 32 / 11008            | ~7.1 G     |

Tokens: `pair_tokens` = the real tokens of the 2B two-row layout (the same work for every layout, so
pair tokens/s compares layouts); `decoder_tokens` = the real tokens the decoder runs (the shared prompt
runs once per pair). MFU = 6 x parameters x decoder_tokens / step time / peak FLOP/s of one GPU
(`--peak-tflops`, default 989 = H100/H200 SXM bf16 dense; none on CPU unless given): the usual
approximation, leaving out attention's quadratic term and checkpointing's recomputed forward (so
hardware utilisation is higher), and counting the vision tower as if it ran on every token.

Memory at full fine-tuning in bf16 with AdamW: ~16 bytes per parameter (bf16 weights and gradients,
fp32 master weights, Adam moments) plus activations. ZeRO-2's step also makes a float32 copy of its whole
gradient partition (DeepSpeed 0.19 `stage_1_and_2.py`: +4 bytes per parameter, ~142 GB in all at 7B on
one GPU, more than an H200's 139 GiB usable), ZeRO-3 one sub-group at a time; so ZeRO-3 runs first and a
stage that fails (out of memory, say) is recorded in the table, not fatal.
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


def device_memory() -> int:
    return torch.cuda.get_device_properties(0).total_memory


def auto_preset() -> str:
    """7b on a GPU (`--layers auto` then keeps as many of its 32 decoder layers as fit), tiny on CPU."""
    return "7b" if torch.cuda.is_available() else "tiny"


def llava_config(size: Size, tokenizer):
    """The LlavaConfig of a preset (CLIP tower, 2-layer GELU projector, Llama)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from ddpo.models.llava import IMAGE_TOKEN

    vision = CLIPVisionConfig(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch,
    )
    text = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(size.image_size // size.patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_model(size: Size, tokenizer, checkpointing: bool = True):
    """A random-init LLaVA-1.5-shaped model wrapped as the trainer's `LlavaPreferenceModel`."""
    from transformers import LlavaForConditionalGeneration

    from ddpo.models.llava import LlavaPreferenceModel

    config = llava_config(size, tokenizer)
    # Build directly in bf16 on the device: a 7B fp32 copy on the host would need 28 GB and minutes.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model = LlavaPreferenceModel(hf, tokenizer)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def random_batch(model, pairs: int, prompt_len: int, answer_len: int, vocab: int, seed: int):
    """`pairs` pairs of [BOS, prompt words, image tokens, prompt words | answer]; chosen/rejected answers differ."""
    from ddpo.data.records import IGNORE_INDEX, PairBatch

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
    return PairBatch(
        pixel_values=torch.randn(pairs, 3, size, size, generator=g),
        input_ids=input_ids,
        attention_mask=torch.ones(2 * pairs, T, dtype=torch.long),
        labels=labels,
        corrected=torch.zeros(2 * pairs, T - 1, dtype=torch.bool),
        ref_token_logps=torch.zeros(2 * pairs, T - 1),
        row_indices=list(range(pairs)),
    )


LAYOUTS = ("two_rows", "shared", "packed_flex")


def use_layout(model, layout: str) -> bool:
    """Set the decoder's attention for `layout`; returns the shared_prompt flag of the forward."""
    model.set_decoder_attention("flex_attention" if layout == "packed_flex" else "sdpa")
    return layout != "two_rows"


def layout_skip_reason(layout: str, cuda: bool) -> str | None:
    from ddpo.models.base import flex_attention_has_cpu_backward

    if layout == "packed_flex" and not cuda and not flex_attention_has_cpu_backward():
        return f"PyTorch {torch.__version__} has no FlexAttention backward on CPU; runs on a GPU"
    return None


def decoder_tokens(batch, layout: str) -> int:
    """Real tokens the decoder runs for `batch` in `layout` (the shared prompt once per pair)."""
    if layout == "two_rows":
        return int(batch.attention_mask.sum())
    from ddpo.models.shared_prompt import PAD, shared_prompt_layout

    packed = shared_prompt_layout(batch.input_ids, batch.attention_mask, batch.labels, pad_token_id=0)
    return int((packed.segments != PAD).sum())


def predicted_memory(shape, args, stage: int, layout: str):
    """ddpo/estimate.py's per-GPU peak for this case: one GPU, bf16, the stage's DeepSpeed JSON, the batch's
    shape (every pair BOS + prompt + image tokens, answers of --answer-len)."""
    from ddpo import estimate

    plan = estimate.Plan(
        weight_bytes=2,
        micro_batch=args.pairs,
        shared_prompt=layout != "two_rows",
        flex_attention=layout == "packed_flex",
        buffers=estimate.ZeroBuffers.from_json(str(REPO / f"configs/deepspeed/zero{stage}.json")),
    )
    pair = estimate.PairShape(args.prompt_len + 1, args.answer_len, args.answer_len)
    setting = estimate.Setting(stage, args.checkpointing, False)
    return estimate.memory(shape, plan, setting, pair), estimate.pair_flops(shape, plan, pair, args.checkpointing)


def layers_that_fit(size: Size, args, tokenizer, device_bytes: int, stage: int) -> int:
    """The most decoder layers (at most the preset's) whose predicted peak under ZeRO-`stage` fits 92 % of the GPU
    for every layout to run: no device minutes spent on a case the arithmetic says cannot fit."""
    from ddpo import estimate
    from ddpo.models.config import ModelConfig

    for layers in range(size.layers, 0, -1):
        config = llava_config(Size(**{**size.__dict__, "layers": layers}), tokenizer)
        shape = estimate.model_shape(estimate.meta_model("llava", config, ModelConfig()))
        peak = max(predicted_memory(shape, args, stage, layout)[0].total for layout in args.layouts)
        if peak <= 0.92 * device_bytes:
            return layers
    return 1


def run_stage(stage: int, args, size: Size, tokenizer, deadline: float) -> list[dict]:
    """One engine under ZeRO-`stage`; an exactness check of every layout, then warm-up + measured steps per layout."""
    import deepspeed

    from ddpo.config import load_config
    from ddpo.loss import DDPOLoss
    from ddpo.trainer import deepspeed_config

    cuda = torch.cuda.is_available()
    cfg = load_config(
        None,
        [
            "--data.format",
            "synthetic",
            "--deepspeed.config",
            str(REPO / f"configs/deepspeed/zero{stage}.json"),
            "--train.micro_batch_size",
            str(args.pairs),
            "--train.learning_rate",
            "1e-6",
        ],
    )
    torch.manual_seed(0)
    model = build_model(size, tokenizer, args.checkpointing)
    params = sum(p.numel() for p in model.parameters())
    from ddpo import estimate

    shape = estimate.model_shape(model)  # before ZeRO-3 partitions the parameters
    # fused on CUDA, as in the trainer: the foreach kernel's temporaries (a float32 copy of every
    # parameter, 28 GB at 7B) would not fit beside a 7B model's optimizer state on one GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, fused=cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16=True))
    loss_fn = DDPOLoss(cfg.loss)
    batch = random_batch(model, args.pairs, args.prompt_len, args.answer_len, size.vocab, seed=0).to(engine.device)
    b = batch.num_pairs
    layouts = [(layout, layout_skip_reason(layout, cuda)) for layout in args.layouts]

    # Exactness before any step: the same weights, every layout against two rows.
    with torch.no_grad():
        reference = torch.cat(engine(batch, shared_prompt=use_layout(model, "two_rows"))).float()
        max_diff = {
            layout: float(
                (torch.cat(engine(batch, shared_prompt=use_layout(model, layout))).float() - reference).abs().max()
            )
            for layout, skip in layouts
            if skip is None
        }

    results = []
    for layout, skip in layouts:
        row = {
            "zero_stage": stage,
            "layout": layout,
            "decoder_layers": size.layers,
            "parameters": params,
            "bf16": True,
            "gradient_checkpointing": args.checkpointing,
            "pairs": b,
        }
        started_case = time.perf_counter()
        if skip is None and started_case > deadline:
            skip = f"time budget ({args.time_budget_s:g} s) spent before this case"
        if skip is not None:
            results.append({**row, "skipped": skip})
            continue
        shared = use_layout(model, layout)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            chosen, rejected = engine(batch, shared_prompt=shared)
            loss, _ = loss_fn(
                chosen.float(),
                rejected.float(),
                batch.ref_token_logps[:b],
                batch.ref_token_logps[b:],
                batch.answer_mask,
                batch.corrected,
            )
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
            losses.append(float(loss.detach()))
        if not all(torch.isfinite(torch.tensor(losses))):
            raise FloatingPointError(f"ZeRO-{stage} {layout}: non-finite loss {losses}")
        step_time = statistics.median(times)
        pair_tokens, run_tokens = int(batch.attention_mask.sum()), decoder_tokens(batch, layout)
        predicted, flops = predicted_memory(shape, args, stage, layout)
        measured = torch.cuda.max_memory_allocated() if cuda else None
        results.append(
            {
                **row,
                "pair_tokens_per_step": pair_tokens,
                "decoder_tokens_per_step": run_tokens,
                "step_time_s": round(step_time, 4),
                "pair_tokens_per_s": round(pair_tokens / step_time, 1),
                "mfu": None
                if args.peak_tflops is None
                else round(6 * params * run_tokens / step_time / (args.peak_tflops * 1e12), 4),
                # ddpo/estimate.py's FLOPs (each part on its own tokens, attention, no recompute): MFU at this shape
                "estimator_mfu": None
                if args.peak_tflops is None
                else round(flops.model * b / step_time / (args.peak_tflops * 1e12), 4),
                "peak_gpu_memory_gib": round(measured / 2**30, 2) if cuda else None,
                "predicted_peak_gib": round(predicted.total / 2**30, 2),
                "predicted_parts_gib": {
                    k: round(getattr(predicted, k) / 2**30, 6)
                    for k in ("weights", "gradients", "optimizer", "buffers", "activations", "transient")
                },
                "measured_over_predicted": round(measured / predicted.total, 3) if cuda else None,
                "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "max_abs_logp_diff_vs_two_rows": max_diff[layout],
                "losses": [round(x, 5) for x in losses],
                "case_seconds": round(time.perf_counter() - started_case, 1),
            }
        )
    engine.destroy()
    del engine, model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    two_rows = next((r for r in results if r["layout"] == "two_rows" and "skipped" not in r), None)
    for r in results:
        if two_rows and "skipped" not in r:
            r["speedup_vs_two_rows"] = round(r["pair_tokens_per_s"] / two_rows["pair_tokens_per_s"], 3)
    return results


def run_script(script: str, script_args: str, timeout_s: int) -> tuple[dict, list[str]]:
    """experiments/`script` in a subprocess: a record of the run and its stdout lines."""
    import subprocess

    command = [sys.executable, str(REPO / "experiments" / script), *script_args.split()]
    if timeout_s < 20:
        return {"command": " ".join(command), "skipped": "time budget spent"}, []
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command), "skipped": f"timed out after {timeout_s} s"}, []
    lines = done.stdout.strip().splitlines()
    return {
        "command": " ".join(command),
        "returncode": done.returncode,
        "output": lines[-20:],
        "stderr_tail": done.stderr.strip().splitlines()[-5:],
    }, lines


def run_ladder(args, seconds_left: int) -> dict:
    """experiments/bench_step.py (TRL vs ours; on the GPU where there is one), reduced; its ratio_vs_trl."""
    record, lines = run_script("bench_step.py", args.ladder_args, min(args.ladder_timeout_s, seconds_left))
    record["ratio_vs_trl"] = next(
        (float(line.split("=")[1]) for line in reversed(lines) if line.startswith("ratio_vs_trl=")), None
    )
    return record


def run_head_bench(args, seconds_left: int) -> dict:
    """experiments/bench_logps.py (chunked vs naive LM-head log-probs); memory and time ratios per head case."""
    record, lines = run_script("bench_logps.py", args.head_bench_args, min(args.head_bench_timeout_s, seconds_left))
    for line in lines:  # "frozen head: memory_ratio=0.114 time_ratio=0.99"
        if " head: memory_ratio=" in line:
            head, ratios = line.split(" head: ")
            record[head] = {key: float(value) for key, value in (pair.split("=") for pair in ratios.split())}
    return record


def markdown_table(report: dict) -> str:
    head = (
        f"GPU check: {report['device']}; preset {report['preset']}, decoder layers by ZeRO stage "
        f"{report['decoder_layers']} ({report['parameters'] / 1e6:.1f} M parameters in the first); "
        f"{report['args']['pairs']} pair(s)/step, prompt {report['args']['prompt_len']} + image tokens, answers "
        f"{report['args']['answer_len']}; bf16, gradient checkpointing "
        f"{'on' if report['args']['checkpointing'] else 'off'}; "
        f"median of {report['args']['steps']} steps after {report['args']['warmup']}; wall {report['wall_s']:.0f} s\n\n"
    )
    lines = [
        "| ZeRO | layout | decoder tokens/step | s/step | pair tokens/s | vs two rows | peak memory GiB "
        "| predicted GiB | measured / predicted | MFU | MFU (estimator FLOPs) | max abs Δlogp vs two rows |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['zero_stage']} | {r['layout']} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        memory = (
            r["peak_gpu_memory_gib"] if r["peak_gpu_memory_gib"] is not None else f"{r['peak_host_rss_gib']} (host RSS)"
        )
        mfu, mfu_estimator = ("n/a" if v is None else f"{100 * v:.1f} %" for v in (r["mfu"], r["estimator_mfu"]))
        ratio = "n/a" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
        lines.append(
            f"| {r['zero_stage']} | {r['layout']} | {r['decoder_tokens_per_step']} | {r['step_time_s']:.3f} | "
            f"{r['pair_tokens_per_s']:.0f} | {r.get('speedup_vs_two_rows', float('nan')):.2f} | {memory} | "
            f"{r['predicted_peak_gib']} | {ratio} | {mfu} | {mfu_estimator} | "
            f"{r['max_abs_logp_diff_vs_two_rows']:.2e} |"
        )
    table = head + "\n".join(lines) + "\n"

    def status(record: dict) -> str:  # why an extra has no numbers, if it has none
        if "skipped" in record:
            return f"skipped: {record['skipped']}"
        if record["returncode"] != 0:
            return f"failed (exit {record['returncode']}): {(record['stderr_tail'] or [''])[-1]}"
        return ""

    if report.get("ladder"):
        ladder = report["ladder"]
        table += f"\nStep ladder (`{ladder['command']}`): ratio_vs_trl={ladder.get('ratio_vs_trl')} {status(ladder)}\n"
    if report.get("head_bench"):
        bench = report["head_bench"]
        table += f"\nLM-head log-probs, chunked / naive (`{bench['command']}`): {status(bench)}\n"
        for head in ("frozen", "trainable"):
            if head in bench:
                ratios = bench[head]
                table += f"- {head} head: memory_ratio={ratios['memory_ratio']} time_ratio={ratios['time_ratio']}\n"
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=["auto", *PRESETS], default="auto", help="model size (auto: largest that fits; tiny on CPU)"
    )
    parser.add_argument(
        "--layers",
        default="auto",
        help="decoder layers (default auto: the preset's, or on a GPU the most that ddpo/estimate.py predicts to "
        "fit 92 %% of its memory for every stage and layout)",
    )
    parser.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[3, 2],
        choices=[2, 3],
        help="ZeRO stages to run, in this order (3 first: the target case; at 7B on one 141 GB GPU, ZeRO-2's "
        "whole-partition float32 gradient copy may not fit, and a failed stage is recorded, not fatal)",
    )
    parser.add_argument(
        "--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS, help="pair-batch layouts to run"
    )
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2 rows each)")
    parser.add_argument("--prompt-len", type=int, default=64, help="text tokens of each prompt (plus the image tokens)")
    parser.add_argument("--answer-len", type=int, default=256, help="tokens of each answer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (per layout)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (median reported)")
    parser.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", help="gradient checkpointing off"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="peak bf16 dense TFLOP/s of one GPU for MFU (default: 989, H100/H200 SXM, on a GPU; none on CPU)",
    )
    parser.add_argument(
        "--time-budget-s", type=float, default=400, help="skip (and record) cases that would start later than this"
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also run experiments/bench_step.py (TRL vs ours; on the GPU where there is one)",
    )
    parser.add_argument(
        "--ladder-args",
        default="--steps 5 --warmup 2 --repeats 1 --modes trl,shared,grouped,floor",
        help="arguments for bench_step.py with --ladder",
    )
    parser.add_argument("--ladder-timeout-s", type=int, default=400)
    parser.add_argument(
        "--head-bench", action="store_true", help="also run experiments/bench_logps.py (chunked vs naive LM head)"
    )
    parser.add_argument(
        "--head-bench-args",
        default="--device cuda --dtype bfloat16 --hidden 4096 --vocab 32064 --reps 5",
        help="arguments for bench_logps.py with --head-bench (default: LLaVA-1.5-7B's head on the GPU)",
    )
    parser.add_argument("--head-bench-timeout-s", type=int, default=120)
    parser.add_argument(
        "--out",
        default=str(REPO / "experiments" / "results" / "gpu_check"),
        help="directory for gpu_check.json and gpu_check.md",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()

    from ddpo import distributed
    from ddpo.data.tokenizer import build_word_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch.distributed calls

    torch.set_flush_denormal(True)
    distributed.init_distributed()
    cuda = torch.cuda.is_available()
    if args.peak_tflops is None and cuda:
        args.peak_tflops = 989.0
    if cuda and "--device" not in args.ladder_args:
        args.ladder_args += " --device cuda"
    preset = auto_preset() if args.preset == "auto" else args.preset
    size = PRESETS[preset]
    tokenizer = build_word_tokenizer(["a random weights check"])
    if args.layers != "auto":
        size = Size(**{**size.__dict__, "layers": int(args.layers)})
    sizes = {stage: size for stage in args.stages}  # the model of each stage's engine
    if args.layers == "auto" and cuda:
        for stage in args.stages:
            layers = layers_that_fit(size, args, tokenizer, device_memory(), stage)
            sizes[stage] = Size(**{**size.__dict__, "layers": layers})
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"device {device}; preset {preset}, decoder layers by ZeRO stage "
        f"{ {stage: sizes[stage].layers for stage in args.stages} }; {args.pairs} pair(s)/step, "
        f"prompt {args.prompt_len} + image tokens, answers {args.answer_len}; bf16, gradient checkpointing "
        f"{'on' if args.checkpointing else 'off'}",
        flush=True,
    )
    deadline = started + args.time_budget_s
    results = []
    for stage in args.stages:
        if time.perf_counter() > deadline:
            results += [
                {"zero_stage": stage, "layout": layout, "skipped": f"time budget ({args.time_budget_s:g} s) spent"}
                for layout in args.layouts
            ]
            continue
        try:
            rows = run_stage(stage, args, sizes[stage], tokenizer, deadline)
        except Exception as error:  # noqa: BLE001 - recorded in the table (a GPU run must still write it)
            rows = [
                {
                    "zero_stage": stage,
                    "layout": layout,
                    "skipped": f"ZeRO-{stage} failed: {type(error).__name__}: {error}"[:300],
                }
                for layout in args.layouts
            ]
        gc.collect()  # a failed stage's engine goes with its traceback: free its GPU memory for the next stage
        if cuda:
            torch.cuda.empty_cache()
        for r in rows:
            print(json.dumps(r), flush=True)
        results += rows
    report = {
        "device": device,
        "preset": preset,
        "decoder_layers": {stage: sizes[stage].layers for stage in args.stages},
        "parameters": next((r["parameters"] for r in results if "parameters" in r), 0),
        "torch": torch.__version__,
        "args": vars(args),
        "results": results,
    }

    def seconds_left() -> int:  # the extras, too, end by the time budget (+45 s to write the table)
        return int(started + args.time_budget_s + 45 - time.perf_counter())

    if args.head_bench:
        report["head_bench"] = run_head_bench(args, seconds_left())
    if args.ladder:
        report["ladder"] = run_ladder(args, seconds_left())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown_table(report))
    print(markdown_table(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [r for r in results if str(r.get("skipped", "")).startswith(f"ZeRO-{r['zero_stage']} failed")]
    return 1 if failed and cuda else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
