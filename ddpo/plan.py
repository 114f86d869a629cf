"""Run-plan arithmetic: how a config, a data set size and a world size turn into optimizer steps.

The same integer arithmetic as the trainer (`Trainer._setup_steps` with `ddpo.sampler.PairOrder`):

    global batch     = world_size x micro_batch_size x gradient_accumulation_steps
    steps per epoch  = num_pairs // global batch          (each epoch's tail that fills no step is dropped)
    total steps      = max_steps, or ceil(epochs x steps per epoch)
    warm-up steps    = ceil(warmup_ratio x total steps)

`run_plan` checks the plan is runnable and `RunPlan.describe()` is what a launcher (or the trainer)
prints before starting, so "7 epochs of 1.4k at batch 32 on 8 GPUs" can be checked before any GPU time
is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddpo.config import Config, ConfigError

# Rows of the public preference sets (HF viewer / dataset cards; docs/PAPER_FACTS.md §2), for planning before any
# download. The trainer uses the real count.
DATASET_SIZES: dict[str, int] = {
    "HaoyeZhang/RLHF-V-Dataset": 5733,
    "openbmb/RLHF-V-Dataset": 5733,
    "openbmb/RLAIF-V-Dataset": 83132,
}


@dataclass(frozen=True)
class RunPlan:
    num_pairs: int
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def pairs_seen(self) -> int:
        return self.total_steps * self.global_batch

    @property
    def epochs(self) -> float:
        """Passes over the data actually made (dropped tails make it a little less than `train.epochs`)."""
        return self.pairs_seen / self.num_pairs

    def describe(self) -> str:
        return (
            f"{self.num_pairs} pairs, {self.world_size} processes x {self.micro_batch_size} pairs x "
            f"{self.gradient_accumulation_steps} accumulation = global batch {self.global_batch}; "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps ({self.epochs:.2f} epochs, "
            f"{self.pairs_seen} pairs seen), {self.warmup_steps} warm-up steps"
        )


def nominal_num_pairs(cfg: Config) -> int | None:
    """Pairs the config will train on, known before loading the data: the synthetic count, or a public
    set's size (capped by data.max_samples, less the data.eval_fraction held out); None when only loading the
    data can tell."""
    if cfg.data.format == "synthetic":
        size = cfg.data.synthetic_pairs
    else:
        size = DATASET_SIZES.get(cfg.data.path or "")
    if size is not None and cfg.data.max_samples is not None:
        size = min(size, cfg.data.max_samples)
    elif size is None:
        size = cfg.data.max_samples
    if size is None or not cfg.data.eval_fraction:
        return size
    return size - heldout_count(size, cfg.data.eval_fraction)  # data.eval_fraction's pairs are not trained on


def heldout_count(num_pairs: int, fraction: float) -> int:
    """Pairs data.eval_fraction holds out of `num_pairs`: round(fraction x num_pairs), at least 1."""
    return max(1, round(fraction * num_pairs))


def run_plan(cfg: Config, num_pairs: int, world_size: int = 1) -> RunPlan:
    """The steps `cfg` runs on `num_pairs` pairs over `world_size` processes; ConfigError if it cannot run."""
    t = cfg.train
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    global_batch = world_size * t.micro_batch_size * t.gradient_accumulation_steps
    steps_per_epoch = num_pairs // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{num_pairs} pairs cannot fill one optimizer step of global batch {global_batch} ({world_size} "
            f"processes x train.micro_batch_size {t.micro_batch_size} x train.gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps}): "
            "use more data or a smaller batch"
        )
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    return RunPlan(
        num_pairs=num_pairs,
        world_size=world_size,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=math.ceil(t.warmup_ratio * total_steps),
    )
