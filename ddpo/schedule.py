"""The learning-rate schedule (one for every loop: the trainer's, the lab's SFT): linear warm-up, then
constant, linear or cosine decay to 0 at the last step."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based), for
    `torch.optim.lr_scheduler.LambdaLR`. The warm-up reaches the peak on its last step and never spends
    a step at learning rate 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn
