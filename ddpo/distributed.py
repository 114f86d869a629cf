"""Process-group set-up that works the same under `deepspeed`, `torchrun` and one plain process.

On a CPU-only machine DeepSpeed needs `DS_ACCELERATOR=cpu` before it is imported, and a single process
started without a launcher needs RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (otherwise DeepSpeed looks
for MPI). Everything here is idempotent.
"""

from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python -m ddpo ...`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # The CPU comm backend would JIT-compile a shared-memory op (~30 s) on first use; gloo gives
        # identical results for our message sizes.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    """Destroy the process group before the interpreter exits: a process that leaves gloo's threads running at
    exit can abort ("terminate called without an active exception") after its work is done."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (used for logged metrics)."""
    if world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world_size()
    return values
