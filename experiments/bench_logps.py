"""Peak memory and time of LM-head log-probs: chunked from hidden states vs naive from full logits.

Setting (the size of a 7B-class LM head on one long sequence pair): B=2, T=2048, V=32000, hidden 1024,
float32, every position labelled, forward + backward of sum(logps), for both LM-head cases:

    frozen head (LoRA; gradients for the hidden states only)
    trainable head (full fine-tuning; gradients for the hidden states and the weight)

    naive:   token_logps(F.linear(hidden, weight), labels)   -> holds [B, T, V] logits and their gradient
    chunked: chunked_token_logps(hidden, weight, labels)      -> one [chunk, V] block at a time

The chunked head computes the hidden-state gradient in the forward when the head is frozen (2 matmuls,
as the naive head); with a trainable head its backward recomputes the logits (4 matmuls against 3),
because the weight gradient needs the upstream gradient (models/logps.py says why).

Each variant runs in a fresh subprocess (this script with --variant) so that peak RSS belongs to it
alone: memory = peak RSS (ru_maxrss) minus RSS right before the measured computation (inputs already
built); time = median over --reps runs after one warm-up. The last two lines printed are
`frozen head: memory_ratio=<chunked/naive> time_ratio=<chunked/naive>` and the same for the trainable head.

    .venv/bin/python experiments/bench_logps.py [--reps 3] [--chunk-size 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from models.logps import chunked_token_logps, token_logps

BATCH, LENGTH, VOCAB, WIDTH = 2, 2048, 32000, 1024
MB = 1 << 20


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Largest resident set size so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(variant: str, head: str, reps: int, chunk_size: int, threads: int) -> dict:
    """Run one variant in this process; returns its extra peak memory and median step time."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LENGTH, WIDTH, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=g) / WIDTH**0.5).requires_grad_(head == "trainable")
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)

    def step() -> float:
        hidden.grad = weight.grad = None  # a fresh gradient each time, as in a training step
        if variant == "naive":
            logps = token_logps(F.linear(hidden, weight), labels)
        else:
            logps = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size)
        logps.sum().backward()
        return logps.sum().item()

    baseline, peak_before = current_rss(), peak_rss()
    value = step()  # warm-up (also reaches the same peak as every later step)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_after = peak_rss()
    return {
        "variant": variant,
        "head": head,
        "peak_mb": (peak_after - baseline) / MB,
        # ru_maxrss only rises: if set-up peaked higher than the computation, peak_mb is a lower bound
        "reliable": peak_after > peak_before,
        "seconds": statistics.median(times),
        "sum_logps": value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["naive", "chunked"], help="internal: measure one variant in this process")
    parser.add_argument("--head", choices=["frozen", "trainable"], default="trainable", help="internal: with --variant")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores, if not shared)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.head, args.reps, args.chunk_size, args.threads)))
        return

    results = {}
    for head in ("frozen", "trainable"):
        for variant in ("naive", "chunked"):
            command = [sys.executable, __file__, "--variant", variant, "--head", head, "--reps", str(args.reps),
                       "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[head, variant] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"B={BATCH} T={LENGTH} V={VOCAB} H={WIDTH} float32, fwd+bwd, chunk {args.chunk_size}, "
          f"median of {args.reps} after 1 warm-up, {args.threads} thread(s)")
    print(f"{'head':<11}{'variant':<10}{'peak MB':>10}{'seconds':>10}{'sum logps':>16}")
    for r in results.values():
        note = "" if r["reliable"] else "  (lower bound: set-up peaked higher)"
        print(f"{r['head']:<11}{r['variant']:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['sum_logps']:>16.2f}{note}")
    print(f"(the trainable head's weight gradient alone: {VOCAB * WIDTH * 4 / MB:.0f} MB, in both variants)")
    for head in ("frozen", "trainable"):
        naive, chunked = results[head, "naive"], results[head, "chunked"]
        print(f"{head} head: memory_ratio={chunked['peak_mb'] / naive['peak_mb']:.3f} "
              f"time_ratio={chunked['seconds'] / naive['seconds']:.2f}")


if __name__ == "__main__":
    main()
