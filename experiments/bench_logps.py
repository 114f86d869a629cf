"""Peak memory and time of LM-head log-probs: chunked from hidden states vs naive from full logits.

Setting (the size of a 7B-class LM head on one long sequence pair): B=2, T=2048, V=32000, hidden 1024,
float32, every position labelled, forward + backward of sum(logps) with gradients for hidden and weight.

    naive:   token_logps(F.linear(hidden, weight), labels)   -> holds [B, T, V] logits and their gradient
    chunked: chunked_token_logps(hidden, weight, labels)      -> one [chunk, V] block at a time

Each variant runs in a fresh subprocess (this script with --variant) so that peak RSS belongs to it
alone: memory = peak RSS (ru_maxrss) minus RSS right before the measured computation (inputs already
built); time = median over --reps runs after one warm-up. The last line printed is
`memory_ratio=<chunked/naive>`.

    .venv/bin/python experiments/bench_logps.py [--reps 3] [--chunk-size 256]
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


def measure(variant: str, reps: int, chunk_size: int) -> dict:
    """Run one variant in this process; returns its extra peak memory and median step time."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LENGTH, WIDTH, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=g) / WIDTH**0.5).requires_grad_()
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
        "peak_mb": (peak_after - baseline) / MB,
        # ru_maxrss only rises: if set-up peaked higher than the computation, peak_mb is a lower bound
        "reliable": peak_after > peak_before,
        "seconds": statistics.median(times),
        "sum_logps": value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["naive", "chunked"], help="internal: measure one variant in this process")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.reps, args.chunk_size)))
        return

    results = {}
    for variant in ("naive", "chunked"):
        command = [sys.executable, __file__, "--variant", variant, "--reps", str(args.reps), "--chunk-size", str(args.chunk_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    naive, chunked = results["naive"], results["chunked"]
    print(f"B={BATCH} T={LENGTH} V={VOCAB} H={WIDTH} float32, fwd+bwd, chunk {args.chunk_size}, "
          f"median of {args.reps} after 1 warm-up, 2 threads")
    print(f"{'variant':<10}{'peak MB':>10}{'seconds':>10}{'sum logps':>16}")
    for r in (naive, chunked):
        note = "" if r["reliable"] else "  (lower bound: set-up peaked higher)"
        print(f"{r['variant']:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['sum_logps']:>16.2f}{note}")
    weight_grad_mb = VOCAB * WIDTH * 4 / MB
    print(f"(weight gradient alone: {weight_grad_mb:.0f} MB; time ratio chunked/naive "
          f"{chunked['seconds'] / naive['seconds']:.2f})")
    print(f"memory_ratio={chunked['peak_mb'] / naive['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
