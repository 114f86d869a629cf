"""Benchmark: a pair batch's forward + backward with each image encoded once vs twice (duplicated).

Small LLaVA (CLIP 256 / 4 layers / 64 px / patch 8 -> 64 image tokens; Llama 256 / 4 layers; the `bench`
preset), 4 pairs, prompt ~80 tokens (64 of them image tokens), answers ~48 tokens, float32. "shared" is
`pair_token_logps` (B images, features indexed into 2B rows); "duplicated" is the same code with the
images repeated (2B images, row i -> image i), i.e. what the anchors do. Variants alternate, median over
the timed steps after warm-up. Peak memory: RSS high-water mark of a fresh child process per variant,
minus its RSS right before the measured steps.

    .venv/bin/python experiments/bench_image_once.py [--steps 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from ddpo.config import ModelConfig
from ddpo.data.records import IGNORE_INDEX, PairBatch
from ddpo.data.tokenizer import build_word_tokenizer
from ddpo.models.build import build_model

PAIRS, PROMPT_WORDS, ANSWER_WORDS = 4, 16, 48


def setup(seed: int = 0):
    words = [f"w{i}" for i in range(8000)]
    tokenizer = build_word_tokenizer([" ".join(words)])
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="llava", preset="bench"), tokenizer=tokenizer)
    g = torch.Generator().manual_seed(seed)
    placeholder = tokenizer(model.image_placeholder, add_special_tokens=False)["input_ids"]
    rows = []
    for r in range(2 * PAIRS):
        prompt = [
            tokenizer.bos_token_id,
            *placeholder,
            *torch.randint(20, len(tokenizer), (PROMPT_WORDS,), generator=g).tolist(),
        ]
        answer = torch.randint(20, len(tokenizer), (ANSWER_WORDS - 4 * (r % 3),), generator=g).tolist()
        rows.append((prompt, answer))
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((2 * PAIRS, T), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (p, a) in enumerate(rows):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        mask[r, : len(p) + len(a)] = 1
        labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
    pixels = torch.randn(PAIRS, 3, 64, 64, generator=g)
    batch = PairBatch(
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        corrected=torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool),
    )
    return model, batch


def step(model, batch: PairBatch, variant: str) -> None:
    if variant == "shared":
        chosen, rejected = model.pair_token_logps(batch)
        loss = chosen.sum() - rejected.sum()
    else:  # every row gets its own copy of its pair's image
        logps = model.sequence_token_logps(
            batch.input_ids, batch.attention_mask, batch.labels, batch.pixel_values.repeat(2, 1, 1, 1)
        )
        loss = logps[:PAIRS].sum() - logps[PAIRS:].sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(variant: str, threads: int) -> None:
    """Runs in a fresh process: peak RSS growth of 3 steps of one variant (MB), printed as JSON."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model, batch = setup()
    before = rss_mb()
    for _ in range(3):
        step(model, batch, variant)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"variant": variant, "peak_mb": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", choices=["shared", "duplicated"])
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.threads)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, batch = setup()
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, batch {PAIRS} pairs x 2 rows, "
        f"T={batch.input_ids.shape[1]}, {model.num_image_tokens} image tokens, {args.threads} threads"
    )
    # Same values first (a benchmark of two different computations would mean nothing).
    with torch.no_grad():
        shared = torch.cat(model.pair_token_logps(batch))
        duplicated = model.sequence_token_logps(
            batch.input_ids, batch.attention_mask, batch.labels, batch.pixel_values.repeat(2, 1, 1, 1)
        )
    print(f"max |shared - duplicated| log-prob: {(shared - duplicated).abs().max().item():.2e}")

    times: dict[str, list[float]] = {"shared": [], "duplicated": []}
    for i in range(args.warmup + args.steps):
        for variant in ("shared", "duplicated") if i % 2 == 0 else ("duplicated", "shared"):
            start = time.perf_counter()
            step(model, batch, variant)
            if i >= args.warmup:
                times[variant].append(time.perf_counter() - start)

    memory = {}
    for variant in times:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])["peak_mb"]

    print(f"{'variant':<12}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'peak +MB':>10}")
    for variant, ts in times.items():
        print(
            f"{variant:<12}{1e3 * statistics.median(ts):>10.1f}{1e3 * min(ts):>9.1f}{1e3 * max(ts):>9.1f}"
            f"{memory[variant]:>10.1f}"
        )
    print(f"memory_ratio={memory['shared'] / memory['duplicated']:.3f}")
    print(f"time_ratio={statistics.median(times['shared']) / statistics.median(times['duplicated']):.3f}")


if __name__ == "__main__":
    main()
