"""Peak memory and time of LM-head log-probs: chunked from hidden states vs naive from full logits.

Setting (default: the vocabulary of a 7B-class LM head on one long sequence pair): B=2, T=2048, V=32000,
hidden 1024, float32 on the CPU, every position labelled, forward + backward of sum(logps), for both
LM-head cases:

    frozen head (LoRA; gradients for the hidden states only)
    trainable head (full fine-tuning; gradients for the hidden states and the weight)

    naive:   token_logps(F.linear(hidden, weight), labels)   -> holds [B, T, V] logits and their gradient
    chunked: chunked_token_logps(hidden, weight, labels)      -> one [chunk, V] block at a time

The chunked head computes the hidden-state gradient in the forward when the head is frozen (2 matmuls,
as the naive head); with a trainable head its backward recomputes the logits (4 matmuls against 3),
because the weight gradient needs the upstream gradient (models/logps.py says why).

Each variant runs in a fresh subprocess (this script with --variant) so that its peak belongs to it
alone: memory = peak RSS (ru_maxrss) minus RSS right before the measured computation (inputs already
built), or on CUDA the allocator's peak minus what was allocated then; time = median over --reps runs
after one warm-up. The last two lines printed are
`frozen head: memory_ratio=<chunked/naive> time_ratio=<chunked/naive>` and the same for the trainable head.

    .venv/bin/python experiments/bench_logps.py [--reps 3] [--chunk-size 256] [--threads 2]
    python experiments/bench_logps.py --device cuda --dtype bfloat16 --hidden 4096 --vocab 32064  # LLaVA-1.5-7B's head
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

from ddpo.models.logps import chunked_token_logps, token_logps

MB = 1 << 20


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Largest resident set size so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(variant: str, head: str, args) -> dict:
    """Run one variant in this process; returns its extra peak memory and median step time."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device, dtype, cuda = torch.device(args.device), getattr(torch, args.dtype), args.device == "cuda"
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.length, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    weight.requires_grad_(head == "trainable")
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=g).to(device)

    def step() -> float:
        hidden.grad = weight.grad = None  # a fresh gradient each time, as in a training step
        if variant == "naive":
            logps = token_logps(F.linear(hidden, weight), labels)
        else:
            logps = chunked_token_logps(hidden, weight, labels, chunk_size=args.chunk_size)
        logps.sum().backward()
        return logps.float().sum().item()  # .item() waits for the device

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline, peak_before = current_rss(), peak_rss()
    value = step()  # warm-up (also reaches the same peak as every later step)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {
        "variant": variant,
        "head": head,
        "peak_mb": (peak - baseline) / MB,
        # ru_maxrss only rises: if set-up peaked higher than the computation, peak_mb is a lower bound
        "reliable": cuda or peak > peak_before,
        "seconds": statistics.median(times),
        "sum_logps": value,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["naive", "chunked"], help="internal: measure one variant in this process")
    parser.add_argument("--head", choices=["frozen", "trainable"], default="trainable", help="internal: with --variant")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores, if not shared)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="hidden states and LM head")
    parser.add_argument("--batch", type=int, default=2, help="rows")
    parser.add_argument("--length", type=int, default=2048, help="labelled positions per row")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here; leave --device out to run on the CPU")
    if args.variant:
        print(json.dumps(measure(args.variant, args.head, args)))
        return

    settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "head")]
    results = {}
    for head in ("frozen", "trainable"):
        for variant in ("naive", "chunked"):
            command = [sys.executable, __file__, "--variant", variant, "--head", head, *settings]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[head, variant] = json.loads(done.stdout.strip().splitlines()[-1])

    print(
        f"B={args.batch} T={args.length} V={args.vocab} H={args.hidden} {args.dtype} on {args.device}, fwd+bwd, "
        f"chunk {args.chunk_size}, median of {args.reps} after 1 warm-up, {args.threads} thread(s)"
    )
    print(f"{'head':<11}{'variant':<10}{'peak MB':>10}{'seconds':>10}{'sum logps':>16}")
    for r in results.values():
        note = "" if r["reliable"] else "  (lower bound: set-up peaked higher)"
        print(
            f"{r['head']:<11}{r['variant']:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['sum_logps']:>16.2f}{note}"
        )
    weight_mb = args.vocab * args.hidden * getattr(torch, args.dtype).itemsize / MB
    print(f"(the trainable head's weight gradient alone: {weight_mb:.0f} MB, in both variants)")
    for head in ("frozen", "trainable"):
        naive, chunked = results[head, "naive"], results[head, "chunked"]
        print(
            f"{head} head: memory_ratio={chunked['peak_mb'] / naive['peak_mb']:.3f} "
            f"time_ratio={chunked['seconds'] / naive['seconds']:.2f}"
        )


if __name__ == "__main__":
    main()
