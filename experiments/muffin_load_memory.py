"""Host memory of loading a released-layout Muffin / RLHF-V checkpoint: streamed vs all-at-once.

Writes a structural replica (models/replicas.py: `pytorch_model-0000k-of-0000n.bin` shards + index +
training_args.bin + SentencePiece tokenizer, the released config keys) whose LLaMA part is large enough
to dominate (default: hidden 1024, 8 layers, FFN 2816, ~400 MB in float32 over 8 shards), then loads it
in a fresh child process per variant and reports that child's RSS high-water mark minus its RSS right
before the load:

  streamed   what `model.muffin_checkpoint: DIR` does (`models.build`): parameters on the meta device,
             one shard read (memory-mapped) at a time, each tensor cast to bfloat16 as it is assigned.
  all-at-once  the plain baseline it is measured against: a float32 model initialised at random, every
             shard read into one state dict, then copied in (the same tensors exist twice, in float32).

The claim checked: streamed peak ~ final bf16 model + about one shard; all-at-once ~ fp32 model + the
whole fp32 checkpoint. At 13B (26 GB in bf16, 52 GB in fp32, ~10 GB shards) that is ~36 GB vs ~104 GB
per process when the model is built on the host (the trainer passes its device, so the shards then go
straight to the GPU and the host holds ~one shard).

    .venv/bin/python experiments/muffin_load_memory.py [--hidden 1024 --layers 8 --shards 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, directory: str) -> None:
    """Load in this (fresh) process and print one JSON line of measurements."""
    import torch

    torch.set_num_threads(1)
    import ddpo.models.muffin as muffin
    from ddpo.models.build import build_model
    from ddpo.models.config import ModelConfig
    from ddpo.models.replicas import muffin_vision_sizes_for_tests

    muffin.BEIT3_SIZES = muffin_vision_sizes_for_tests()  # keep the tower tiny: the LLM is what is measured
    before = rss_kib("VmRSS")
    if variant == "streamed":
        model = build_model(ModelConfig(arch="muffin", muffin_checkpoint=directory, dtype="bfloat16")).hf_model
    else:
        original = json.loads((Path(directory) / "config.json").read_text())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        config = muffin.muffin_config_from_original(original, tokenizer.convert_tokens_to_ids("<im_patch>"))
        model = muffin.MuffinForCausalLM(config)  # float32, random init
        state = {}
        for file in muffin.checkpoint_shards(directory):
            state.update(torch.load(file, map_location="cpu", weights_only=True))  # whole checkpoint in memory
        muffin.load_muffin_checkpoint(model, state)
    peak = rss_kib("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "variant": variant,
                "peak_above_start_mb": (peak - before) / 1024,
                "model_mb": model_bytes / MB,
                "dtype": str(next(model.parameters()).dtype),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", default=None, help="replica directory (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import ddpo.models.muffin as muffin
    from ddpo.models.replicas import muffin_vision_sizes_for_tests, replica_bytes, write_muffin_checkpoint

    muffin.BEIT3_SIZES = muffin_vision_sizes_for_tests()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.out or tmp) / "rlhfv_replica"
        write_muffin_checkpoint(
            directory,
            num_shards=args.shards,
            hidden=args.hidden,
            layers=args.layers,
            heads=16,
            intermediate=args.intermediate,
        )
        total, largest = replica_bytes(directory)
        print(f"replica: {args.shards} shards, {total / MB:.0f} MB float32 in all, largest shard {largest / MB:.0f} MB")
        for variant in ("streamed", "all-at-once"):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", variant, str(directory)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            over = r["peak_above_start_mb"] - r["model_mb"]
            print(
                f"{variant:12s} peak RSS growth {r['peak_above_start_mb']:7.0f} MB = final model "
                f"{r['model_mb']:.0f} MB "
                f"({r['dtype']}) + {over:.0f} MB ({over * MB / largest:.2f} x the largest shard, "
                f"{over * MB / total:.2f} x the checkpoint)"
            )


if __name__ == "__main__":
    main()
