"""The DDPO training recipe: setup -> train -> save, as one readable class.

    ddpo train CONFIG [--section.field VALUE ...]                  one plain process
    deepspeed --num_gpus N -m ddpo.train CONFIG [...]              N processes (GPUs, or CPUs with gloo)

Its parts are one hop away: data (data/formats, data/collator), the model (models/build), the loss
(ddpo/loss), the reference cache (ddpo/reference), the data order (ddpo/sampler), the run plan
(ddpo/plan), the learning-rate schedule (ddpo/schedule), checkpoints (ddpo/checkpoint), the summary a
finished run writes (ddpo/run_summary). Held-out pairs (data.eval_fraction or data.eval_path) go through the
same loss without gradients (`evaluate`, every train.eval_steps and at the end) as eval/ rows of metrics.jsonl.
`TrainerCallback` lets experiments act at checkpoints and log steps without subclassing.

One optimizer step, top to bottom (see `train`):
    for each of `gradient_accumulation_steps` micro-batches:
        chosen, rejected = policy per-token log-probs            [B, T-1] each, image encoded once per pair
        ref_chosen, ref_rejected = cached (or live) reference    [B, T-1] each
        extras, only when their loss setting is on                corrupted-image forward (mDPO, CHiP, TPO), KL (TDPO)
        loss = DDPOLoss(cfg.loss)(...)                            weights from the corrected mask and loss.gamma
                                                                  (or another source)
        engine.backward(loss)                                     DeepSpeed scales by 1/accumulation
    engine.step()                                                 clip, AdamW, LR schedule
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ddpo import checkpoint, reference, run_identity
from ddpo import distributed as dist
from ddpo.config import Config, ConfigError
from ddpo.corruption import Corruption, corrupt_batch
from ddpo.data.collator import PairCollator, PairDataset, PairEncoder
from ddpo.data.formats import load_records
from ddpo.data.images import DataError
from ddpo.data.tokenizer import build_word_tokenizer
from ddpo.loss import DDPOLoss, LossExtras
from ddpo.models.build import build_model, load_config_tokenizer
from ddpo.models.logps import HiddenAndHead, chunked_token_kl
from ddpo.plan import heldout_count, run_plan
from ddpo.progress import progress_bar
from ddpo.run_summary import RunFacts, is_eval_row, read_metrics_rows, summary_markdown, write_run_summary
from ddpo.sampler import PairOrder
from ddpo.schedule import lr_lambda
from ddpo.token_weights import label_logits

logger = logging.getLogger("ddpo")


def deepspeed_config(cfg: Config, bf16: bool) -> dict:
    """The engine's JSON: the file named by deepspeed.config (if any) with our fields filled in."""
    ds = {}
    if cfg.deepspeed.config:
        with open(cfg.deepspeed.config, encoding="utf-8") as f:
            ds = json.load(f)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        train_batch_size=cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * dist.world_size(),
        gradient_clipping=cfg.train.max_grad_norm,
        steps_per_print=sys.maxsize,
        zero_allow_untested_optimizer=True,  # torch's AdamW: FusedAdam is CUDA-only
        wall_clock_breakdown=False,
    )
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    return ds


class TrainerCallback:
    """Hooks for experiments (exports, probes); every method is a no-op unless overridden. They run on
    every rank (a callback that saves must let every rank call `trainer.save`, a collective)."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """After an optimizer step whose metrics were logged (`record` as written to metrics.jsonl)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint was written to `path` (every train.save_steps and at the end)."""


class Trainer:
    """Dense DPO with DeepSpeed. `setup()` builds everything, `train()` runs, `save()` exports."""

    def __init__(self, cfg: Config, callbacks: Sequence[TrainerCallback] = ()):
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.callbacks = list(callbacks)
        self.eval_dataset: PairDataset | None = None  # held-out pairs (data.eval_fraction / data.eval_path)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self, for_reference_cache: bool = False) -> Trainer:
        cfg = self.cfg
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        torch.set_flush_denormal(True)  # tiny random models hit denormals on CPU: ~9x slower without this
        dist.init_distributed()
        self.is_main = dist.rank() == 0
        logging.basicConfig(
            level=logging.INFO if self.is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
        )
        self._seed_everything(cfg.train.seed)
        self.device = dist.device()
        self.bf16 = cfg.deepspeed.bf16 == "true" or (
            cfg.deepspeed.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        )
        if not for_reference_cache:  # a cache has its own fingerprint; the output directory is the run's
            self._claim_output_dir()

        self._setup_data_and_model()
        self.reference_cache_dir = Path(cfg.train.reference_cache or self.output_dir / "reference_cache")
        self.loss_fn = DDPOLoss(cfg.loss)
        if for_reference_cache:
            for directory, fp, transform, _ in self._reference_caches(self.reference_cache_dir, self.records):
                self._compute_reference_cache(directory, fp, transform, self.dataset)
            return self
        self._check_data_for_loss()
        self.ref_model = None
        if cfg.train.reference == "cached" and not cfg.loss.reference_free:
            self._attach_reference_caches(self.reference_cache_dir, self.records, self.dataset)
        elif cfg.train.reference == "live" and not cfg.loss.reference_free:  # reference-free: no reference at all
            self.ref_model = self._frozen_reference()
        self._setup_steps()
        self._setup_engine()
        self.step, self.micro_batches_done = 0, 0
        ckpt = checkpoint.find(self.output_dir, cfg.train.resume)
        state = None
        if ckpt is not None:
            state = checkpoint.load(self.engine, ckpt)
            self.step, self.micro_batches_done = state["step"], state["micro_batches_done"]
            logger.info("resumed from %s at step %d", ckpt, self.step)
            self._continue_schedule(state)
        from ddpo import export  # LoRA on a random-init base: kept in output_dir/base, checked on resume

        self.lora_base_digest = export.prepare_lora_base(self, state)
        return self

    def _claim_output_dir(self) -> None:
        """Refuse a directory that holds a run of another config before anything is written (every rank checks,
        reading only), then record this run in it (ddpo/run_identity.py)."""
        start = run_identity.check(self.output_dir, self.cfg)
        if self.is_main:
            run_identity.record(self.cfg, start)
        dist.barrier()  # no rank looks for checkpoints or caches while rank 0 may still be moving the old run aside

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _setup_data_and_model(self) -> None:
        cfg = self.cfg
        self.records = load_records(cfg.data, seed=cfg.train.seed)
        tokenizer = None
        if cfg.model.name_or_path is None:
            tokenizer = self._tokenizer_for_random_init()
        model = build_model(cfg.model, tokenizer=tokenizer, device=self.device)
        model.template = cfg.data.template  # saved with the model: `ddpo eval` prompts it the way it was trained
        if self.bf16:
            model = model.to(torch.bfloat16)
        self.model = model.to(self.device)
        self.encoder = PairEncoder.from_config(cfg.data, model.tokenizer, model.image_placeholder)
        self.dataset = PairDataset(self.records, self.encoder, skip_bad_rows=cfg.data.skip_bad_rows)
        self.collate = PairCollator(
            pad_token_id=model.tokenizer.pad_token_id,
            padding_side=cfg.data.padding_side,
            image_transform=model.preprocess_images,
        )
        self.eval_dataset = self._eval_file_dataset()  # data.eval_fraction's pairs are split off in _setup_eval

    def _tokenizer_for_random_init(self):
        if self.cfg.model.tokenizer:
            return load_config_tokenizer(self.cfg.model)  # a missing tokenizer is one message, not a traceback
        return build_word_tokenizer(t for r in self.records for t in r.texts())

    def _check_data_for_loss(self) -> None:
        loss = self.cfg.loss
        if loss.answer_severity != "off" and not any(
            r.chosen_severity or r.rejected_severity for r in self.dataset.records
        ):  # else every score would be 1 and HSA-DPO would silently be plain DPO
            raise DataError(
                f"{self.cfg.data.path or self.cfg.data.format}: loss.answer_severity is {loss.answer_severity!r} "
                "but no row carries severity annotations (`chosen_severity` / `rejected_severity`: "
                "[[start, end, weight], ...], docs/DENSE_METHODS.md); add them or set loss.answer_severity off"
            )
        if loss.token_weights == "severity" and not any(
            r.chosen_severity or r.rejected_severity for r in self.dataset.records
        ):
            raise DataError(
                f"{self.cfg.data.path or self.cfg.data.format}: loss.token_weights is 'severity' but no row carries "
                "severity annotations (`chosen_severity` / `rejected_severity`: [[start, end, weight], ...], "
                "docs/DENSE_METHODS.md); add them or use loss.token_weights segments"
            )

    # -- reference ------------------------------------------------------------------------------
    def _reference_caches(self, base: Path, records) -> list[tuple[Path, dict, Callable | None, tuple[str, str]]]:
        """(directory, fingerprint, batch transform, record fields) of each cached view of `records`: the plain
        one at `base`, and for mDPO's conditional term its corrupted-image sibling. The fingerprint hashes every
        weight, so it is computed once here."""
        fp = reference.fingerprint(self.model, records, self.cfg)
        views = [(base, fp, None, ("ref_chosen_logps", "ref_rejected_logps"))]
        if self.loss_fn.needs_corrupted_reference:
            views.append(
                (
                    reference.corrupted_cache_dir(base, self.cfg.loss),
                    {**fp, **reference.corruption_fingerprint(self.cfg.loss), **self._corruption_fingerprint()},
                    self._corrupt,
                    ("ref_corrupted_chosen_logps", "ref_corrupted_rejected_logps"),
                )
            )
        return views

    def _compute_reference_cache(self, directory: Path, fp: dict, transform, dataset: PairDataset) -> None:
        reference.check_replaceable(directory, fp)  # before the forward passes: another cache is never replaced
        local = reference.compute_answer_logps(
            self.model,
            dataset,
            self.collate,
            self.cfg.train.micro_batch_size,
            reference.shard(len(dataset)),
            progress=self.is_main and self.cfg.logging.progress_bar,
            transform=transform,
        )
        merged = reference.gather(local)
        if self.is_main:
            reference.write_cache(directory, fp, merged)
            logger.info("wrote reference log-probs of %d pairs to %s", len(merged), directory)
        dist.barrier()

    def _attach_reference_caches(self, base: Path, records, dataset: PairDataset) -> None:
        """`records`' cached reference log-probs, computed from the initial policy where a cache is missing."""
        for directory, fp, transform, fields in self._reference_caches(base, records):
            if not (directory / reference.FINGERPRINT_FILE).is_file():
                logger.info("no reference cache at %s: computing it from the initial policy", directory)
                self._compute_reference_cache(directory, fp, transform, dataset)
            reference.attach(records, reference.read_cache(directory, fp), directory, fields)

    def _corruption(self) -> Corruption:
        transform = getattr(self.model, "image_transform", None)  # diffusion in 'pixels' space un-normalises
        return Corruption.from_loss(self.cfg.loss, getattr(transform, "mean", None), getattr(transform, "std", None))

    def _corruption_fingerprint(self) -> dict[str, str]:
        """The corrupted cache's view beyond kind, strength and seed (diffusion step and space, crop range);
        absent for the older kinds, so their caches keep matching."""
        view = self._corruption()
        return {"corruption_view": view.describe()} if view.kind in ("diffusion", "crop") else {}

    def _corrupt(self, batch, draw: tuple[int, ...] | None = None):
        """The batch with its images corrupted (loss.corruption, ddpo/corruption.py). `draw` None: the fixed
        per-pair view a reference cache holds, which does not exist when loss.corruption_draw redraws it."""
        if draw is None:
            if self.cfg.loss.corruption_draw != "pair":
                raise ValueError(
                    f"loss.corruption_draw {self.cfg.loss.corruption_draw!r} redraws the corrupted image during "
                    "training, so the reference's log-probs of it cannot be cached: set train.reference live, or "
                    "loss.corruption_draw pair"
                )
            draw = ()
        return corrupt_batch(batch, self._corruption(), self.model.num_image_tokens, draw)

    def _draw(self, stream: int) -> tuple[int, ...]:
        """This step's draw of a corrupted view (loss.corruption_draw): () the same every step, (step,) one per
        step shared by policy and reference, (step, stream) one per forward. The step is the checkpointed
        count of finished steps, so a resumed run draws the views the uninterrupted run would have."""
        mode = self.cfg.loss.corruption_draw
        return () if mode == "pair" else (self.step,) if mode == "step" else (self.step, stream)

    def _frozen_reference(self):
        import deepspeed

        ref = copy.deepcopy(self.model).eval()
        ref.requires_grad_(False)
        ds = deepspeed_config(self.cfg, self.bf16)
        if ds["zero_optimization"]["stage"] == 3:  # shard it like the policy
            ref, *_ = deepspeed.initialize(model=ref, config=ds)
        return ref

    # -- optimisation ---------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        """AdamW groups: decay / no decay (biases, norms), and lr 0 where the model says so."""
        lr, wd = self.cfg.train.learning_rate, self.cfg.train.weight_decay
        zero_lr = set(self.model.zero_lr_parameter_names()) if hasattr(self.model, "zero_lr_parameter_names") else set()
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            key = (name in zero_lr, p.ndim < 2)
            groups.setdefault(key, []).append(p)
        return [
            {"params": ps, "lr": 0.0 if frozen else lr, "weight_decay": 0.0 if no_decay else wd}
            for (frozen, no_decay), ps in sorted(groups.items())
        ]

    def _setup_steps(self) -> None:
        cfg = self.cfg.train
        self._setup_eval()  # before the plan: the held-out pairs leave the training set
        lengths = None
        if self.cfg.data.length_grouping:
            # Characters are a cheap, monotone proxy for tokens; image tokens are the same for every pair.
            lengths = [
                len(" ".join(r.texts()[:-2])) + max(len(r.chosen), len(r.rejected)) for r in self.dataset.records
            ]
        self.order = PairOrder(
            len(self.dataset), cfg.micro_batch_size, cfg.seed, dist.rank(), dist.world_size(), lengths=lengths
        )
        plan = run_plan(self.cfg, len(self.dataset), dist.world_size())
        logger.info("run plan: %s", plan.describe())
        self.steps_per_epoch, self.total_steps, self.warmup_steps = (
            plan.steps_per_epoch,
            plan.total_steps,
            plan.warmup_steps,
        )

    def _setup_engine(self) -> None:
        import deepspeed

        cfg = self.cfg.train
        # fused: one kernel for all parameters; the per-tensor loop costs ~30% of a small model's CPU step.
        optimizer = torch.optim.AdamW(
            self._param_groups(),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,
        )
        # Built on torch's optimizer: ZeRO wraps it and reads the group learning rates from it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, self.warmup_steps, cfg.lr_scheduler)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(self.cfg, self.bf16),
        )
        if dist.world_size() == 1 and self.engine.zero_optimization_stage() == 0:
            self.engine.enable_backward_allreduce = False  # an all-reduce over one process only copies gradients

    def _continue_schedule(self, state: dict) -> None:
        """After a resume: the learning rate of the next step comes from this run's schedule.

        The checkpoint restores the optimizer's rates as the saved run left them; when the run length
        changed (train.max_steps, epochs, warmup_ratio), the saved run's rate for this step (0 at its
        end) would be used once before the new schedule takes over. The change is a re-plan, said so."""
        cfg = self.cfg.train
        schedule = lr_lambda(self.total_steps, self.warmup_steps, cfg.lr_scheduler)
        saved_total, saved_warmup = state.get("total_steps"), state.get("warmup_steps", self.warmup_steps)
        if saved_total is not None and (saved_total, saved_warmup) != (self.total_steps, self.warmup_steps):
            old = lr_lambda(saved_total, saved_warmup, cfg.lr_scheduler)
            logger.warning(
                "resuming at step %d with a different run length: the checkpoint's run planned %d steps (%d warm-up) "
                "and this one plans %d (%d warm-up); the %s learning-rate schedule is re-planned from here: step %d "
                "uses %.4g (the saved run's schedule: %.4g). Steps 1-%d followed the old schedule, so this run is not "
                "the same as a %d-step run from scratch",
                self.step,
                saved_total,
                saved_warmup,
                self.total_steps,
                self.warmup_steps,
                cfg.lr_scheduler,
                self.step + 1,
                cfg.learning_rate * schedule(self.step),
                cfg.learning_rate * old(self.step),
                self.step,
                self.total_steps,
            )
        # LambdaLR's own formula, so an unchanged run continues bit for bit.
        optimizer, scheduler = self.scheduler.optimizer, self.scheduler
        scheduler.last_epoch = self.step
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * schedule(self.step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    # ------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to `total_steps`; returns the logged train rows (also in metrics.jsonl, beside the eval rows of
        `evaluate`, which `self.eval_logged` holds). At the end rank 0 prints and writes the run's summary
        (summary.json, summary.md, summary.png: ddpo/run_summary.py)."""
        if not hasattr(self, "engine"):
            self.setup()
        cfg = self.cfg.train
        accumulation = cfg.gradient_accumulation_steps
        data = self.order.iterate(self.micro_batches_done)
        session = {"started": time.perf_counter(), "tokens": 0, "step_seconds": 0.0}  # for the summary
        sinks = {"wandb": self._start_wandb(), "tensorboard": self._start_tensorboard()}
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.is_main:
            self._keep_logged_steps(metrics_file)
        logged: list[dict] = []
        self.eval_logged: list[dict] = []
        bar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not (self.is_main and self.cfg.logging.progress_bar),
        )
        self.engine.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            lr = self.scheduler.get_last_lr()[-1]  # the rate this step uses
            grad_norm = None
            step_metrics: dict[str, torch.Tensor] = {}
            tokens = pairs = 0
            for micro in range(accumulation):
                epoch, indices = next(data)
                batch = self.collate([self.dataset[i] for i in indices]).to(self.device)
                loss, metrics = self._micro_step(batch, micro)
                self.engine.backward(loss)
                if micro == accumulation - 1 and self.engine.zero_optimization_stage() == 0:
                    grad_norm = self._grad_norm()  # ZeRO-0 keeps no norm; ZeRO-1/2/3 report theirs
                self.engine.step()  # a no-op for the optimizer except at the accumulation boundary
                self.micro_batches_done += 1
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v.detach().float() / accumulation
                tokens += int(batch.attention_mask.sum())
                pairs += batch.num_pairs
            self.step += 1
            elapsed = time.perf_counter() - started
            session["tokens"] += tokens * dist.world_size()
            session["step_seconds"] += elapsed
            if self._eval_due():  # before the step's train row: the last row of metrics.jsonl stays a train row
                self.eval_logged.append(self.evaluate())
                self._write_row(self.eval_logged[-1], metrics_file, sinks)
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                record = self._log_record(step_metrics, lr, grad_norm, elapsed, pairs, tokens)
                logged.append(record)
                self._write_row(record, metrics_file, sinks)
                if self.is_main:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}", refresh=False
                    )
                for callback in self.callbacks:
                    callback.on_log(self, record)
            bar.update(1)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.save()
        self._finish_run(sinks, metrics_file, session)
        return logged

    def _micro_step(self, batch, micro: int):
        """Forward one micro-batch of pairs and return (loss, metrics)."""
        b = batch.num_pairs
        # TDPO's KL and TPO's logits read the final hidden states (no extra forward)
        hidden = self.loss_fn.needs_kl or self.loss_fn.needs_visual_logits
        chosen_logps, rejected_logps, *policy_hidden = (
            self.engine(batch, return_hidden=True) if hidden else self.engine(batch)
        )  # [B, T-1] each (model.shared_prompt: one packed row per pair)
        ref_chosen = ref_rejected = None  # loss.reference_free: the reference is not run, its part is 0
        ref_hidden: list[torch.Tensor] = []
        if self.loss_fn.needs_reference and self.ref_model is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected, *ref_hidden = (
                    self.ref_model(batch, return_hidden=True) if hidden else self.ref_model(batch)
                )
            ref_chosen, ref_rejected = ref_chosen.float(), ref_rejected.float()
        elif self.loss_fn.needs_reference and batch.ref_token_logps is not None:
            ref_chosen, ref_rejected = batch.ref_token_logps[:b], batch.ref_token_logps[b:]
        extras = self._loss_extras(batch, policy_hidden, ref_hidden)
        loss, metrics = self.loss_fn(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, batch.answer_mask, batch.corrected, extras
        )
        finite = torch.tensor([float(torch.isfinite(loss))], device=loss.device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            raise FloatingPointError(
                f"non-finite loss at optimizer step {self.step + 1}, micro-batch {micro}; this rank's pairs come from "
                f"source rows {batch.row_indices}. Lower train.learning_rate, check those rows, or resume from the "
                "last checkpoint."
            )
        return loss, metrics

    def _loss_extras(self, batch, policy_hidden: list, ref_hidden: list) -> LossExtras:
        """The dense methods' inputs (docs/DENSE_METHODS.md), each computed only when its setting is on."""
        extras = LossExtras()
        if self.loss_fn.needs_severity:  # a batch whose rows carry no annotation: every answer token unannotated
            extras.severity = (
                batch.severity
                if batch.severity is not None
                else torch.zeros(batch.answer_mask.shape, device=batch.answer_mask.device)
            )
        if self.loss_fn.needs_corrupted_view:
            self._corrupted_view(batch, extras, policy_hidden, ref_hidden)
        if self.loss_fn.needs_kl:
            extras.kl = self._token_kl(batch, policy_hidden[0], ref_hidden[0])
        return extras

    def _corrupted_view(self, batch, extras: LossExtras, policy_hidden: list, ref_hidden: list) -> None:
        """Fill `extras` from one more policy forward over the corrupted batch (with gradient: the
        image-conditional comparison and TPO's scores both differentiate it) and, unless reference_free,
        the reference's view: its forward over the same corrupted images (a fresh draw with
        loss.corruption_draw 'forward', as mDPO crops inside each forward) or the cached log-probs."""
        tpo = self.loss_fn.needs_visual_logits
        corrupted = self._corrupt(batch, self._draw(stream=0))
        policy = self.engine(corrupted, return_hidden=True) if tpo else self.engine(corrupted)
        extras.corrupted = (policy[0], policy[1])
        if tpo:
            extras.visual_logits = (
                self._label_logits(self.model, policy_hidden[0], batch),
                self._label_logits(self.model, policy[2], batch),
            )
        if not self.loss_fn.needs_corrupted_reference:
            return
        if self.ref_model is None:
            if tpo:
                raise ValueError(
                    "loss.tpo_score needs the reference's logits given the real and the corrupted images, which "
                    "the reference cache does not hold: set train.reference live"
                )
            extras.ref_corrupted_chosen_token_logps = batch.ref_corrupted_token_logps[: batch.num_pairs]
            return
        if self.cfg.loss.corruption_draw == "forward":
            corrupted = self._corrupt(batch, self._draw(stream=1))
        with torch.no_grad():
            reference = self.ref_model(corrupted, return_hidden=True) if tpo else self.ref_model(corrupted)
        extras.ref_corrupted_chosen_token_logps = reference[0].float()
        if tpo:
            extras.ref_visual_logits = (
                self._label_logits(self.ref_model, ref_hidden[0], batch),
                self._label_logits(self.ref_model, reference[2], batch),
            )

    def _label_logits(self, model, hidden, batch) -> torch.Tensor:
        """TPO: the raw logit of each labelled token [2B, T-1] from final hidden states through `model`'s LM
        head, read outside the forward pass (so not under ZeRO-3, which partitions the head)."""
        if self.engine.zero_optimization_stage() == 3:
            raise ValueError(
                "loss.tpo_score reads the LM heads outside the forward pass, which ZeRO-3 partitions: use "
                "deepspeed.zero_stage 0, 1 or 2, or loss.tpo_score false"
            )
        head = model.lm_head
        return label_logits(hidden, head.weight, head.bias, batch.labels)

    def _token_kl(self, batch, hidden, ref_hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position KL(reference || policy) of the chosen and the rejected rows (TDPO), [B, T-1] each."""
        policy_head, reference_head = self.model.lm_head, self.ref_model.lm_head
        kl = chunked_token_kl(
            HiddenAndHead(hidden, policy_head.weight, policy_head.bias),
            HiddenAndHead(ref_hidden, reference_head.weight, reference_head.bias),
            batch.labels,
            chunk_size=self.model.logps_chunk_size,
        )
        return kl[: batch.num_pairs], kl[batch.num_pairs :]

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # -- held-out evaluation (data.eval_fraction / data.eval_path, train.eval_steps) ----------------------------
    def _eval_file_dataset(self) -> PairDataset | None:
        """data.eval_path's pairs, read as data.path is (its format, template and lengths; all its rows, relative
        images in data.image_dir or the file's own folder); None without one. Read before any forward, so a bad
        file stops the run before the reference cache is computed."""
        path = self.cfg.data.eval_path
        if not path:
            return None
        settings = dataclasses.replace(self.cfg.data, path=path, max_samples=None)
        records = load_records(settings, seed=self.cfg.train.seed)
        dataset = PairDataset(records, self.encoder, skip_bad_rows=self.cfg.data.skip_bad_rows)
        if len(dataset) == 0:
            raise DataError(
                f"data.eval_path {path}: no usable pairs to evaluate; fix the file or set data.eval_path null"
            )
        return dataset

    def _setup_eval(self) -> None:
        """The held-out pairs, once the reference log-probs are attached. data.eval_fraction splits them off
        self.dataset here (`split_heldout`), after the reference cache covered every loaded pair: that cache is
        the very one a run without an eval set makes and uses. data.eval_path's pairs get theirs from a cache of
        their own (`_eval_file_reference`)."""
        if self.cfg.data.eval_fraction > 0:
            kept, held = split_heldout(len(self.dataset), self.cfg.data.eval_fraction, self.cfg.train.seed)
            self.eval_dataset, self.dataset = _subset(self.dataset, held), _subset(self.dataset, kept)
            logger.info(
                "held out %d of %d pairs for evaluation (data.eval_fraction %g, train.seed %d)",
                len(held),
                len(held) + len(kept),
                self.cfg.data.eval_fraction,
                self.cfg.train.seed,
            )
        elif self.eval_dataset is not None and self.cfg.train.reference == "cached" and self.loss_fn.needs_reference:
            self._eval_file_reference()

    def _eval_file_reference(self) -> None:
        """Cached reference log-probs of data.eval_path's pairs (and of their corrupted view, when the loss needs
        it), computed from the initial policy where missing. They live beside the training cache, in
        <reference_cache>-eval with a fingerprint of their own: a sibling, as the corrupted cache is, because a
        recomputed cache replaces its whole directory; the training cache stays the one a run without
        data.eval_path makes."""
        base = self.reference_cache_dir.with_name(f"{self.reference_cache_dir.name}-eval")
        self._attach_reference_caches(base, self.eval_dataset.records, self.eval_dataset)

    def _eval_due(self) -> bool:
        """Evaluate after this step: every train.eval_steps steps and after the last one, when there is an eval set."""
        every = self.cfg.train.eval_steps
        return self.eval_dataset is not None and (self.step == self.total_steps or (every and self.step % every == 0))

    def evaluate(self) -> dict:
        """One pass over the held-out pairs without gradients (dropout off), through the training loss:
        {"step", "eval/<metric>": mean over the held-out pairs} for every metric a train row logs (the loss,
        TRL's rewards/ and logps/ names, ...). The pairs are sharded over the ranks in contiguous blocks and the
        sums all-reduced, so the values do not depend on the world size beyond float rounding."""
        if self.eval_dataset is None:
            raise ValueError("Trainer.evaluate: there is no eval set; set data.eval_fraction or data.eval_path")
        sums: dict[str, torch.Tensor] = {}
        was_training = self.model.training  # the module's flag: DeepSpeed's engine.train() sets only the module's
        self.engine.eval()
        with torch.no_grad():
            for indices, counted in self._eval_batches():
                batch = self.collate([self.eval_dataset[i] for i in indices]).to(self.device)
                _, metrics = self._micro_step(batch, 0)
                for name, value in metrics.items():  # batch means -> sums over the batch's pairs
                    sums[name] = sums.get(name, 0.0) + value.detach().float() * (batch.num_pairs if counted else 0)
        self.engine.train(was_training)
        names = sorted(sums)
        totals = torch.stack([sums[n] for n in names])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(totals)
        return {"step": self.step, **{f"eval/{n}": float(v) / len(self.eval_dataset) for n, v in zip(names, totals)}}

    def _eval_batches(self) -> list[tuple[list[int], bool]]:
        """This rank's (indices, counted) micro-batches of the eval set: a contiguous block of it, then, where the
        block is short, repeats of pair 0 that are not counted, so that every rank runs as many forwards (ZeRO-3
        gathers parameters in every forward on every rank)."""
        size, n = self.cfg.train.micro_batch_size, len(self.eval_dataset)
        per_rank = -(-n // dist.world_size())
        start = dist.rank() * per_rank
        mine = list(range(start, min(start + per_rank, n)))
        batches = [(mine[i : i + size], True) for i in range(0, len(mine), size)]
        return batches + [([0], False)] * (-(-per_rank // size) - len(batches))

    # -- logging ---------------------------------------------------------------------------------
    def _write_row(self, row: dict, metrics_file: Path, sinks: dict) -> None:
        """A train row or an eval row (`evaluate`) to metrics.jsonl, wandb and TensorBoard; rank 0 only."""
        if not self.is_main:
            return
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        evaluation = is_eval_row(row)
        if sinks["wandb"] is not None:  # an eval row joins the train row of its step
            sinks["wandb"].log({k: v for k, v in row.items() if k != "step"} if evaluation else row, step=row["step"])
        writer = sinks["tensorboard"]
        if writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key if evaluation else f"train/{key}", value, row["step"])
            writer.flush()  # a TensorBoard watching the run sees each row as it is logged

    def _start_tensorboard(self):
        """A SummaryWriter on <output_dir>/tensorboard (logging.tensorboard, rank 0), else None."""
        if not (self.cfg.logging.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"logging.tensorboard needs the tensorboard package ({e}): pip install tensorboard (requirements.txt "
                "pins it), or set logging.tensorboard false"
            ) from None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _finish_run(self, sinks: dict, metrics_file: Path, session: dict) -> None:
        """Close the loggers; rank 0 writes and prints the run's summary (ddpo/run_summary.py) from the whole
        metrics.jsonl (a resumed run's earlier steps included)."""
        if sinks["tensorboard"] is not None:
            sinks["tensorboard"].close()
        if sinks["wandb"] is not None:
            sinks["wandb"].finish()
        if not self.is_main:
            return
        cfg = self.cfg.train
        facts = RunFacts(
            steps=self.step,
            epochs=round(self.micro_batches_done / self.order.batches_per_epoch, 4),
            wall_time_s=round(time.perf_counter() - session["started"], 3),
            pairs_trained=self.step * cfg.micro_batch_size * cfg.gradient_accumulation_steps * dist.world_size(),
            train_pairs=len(self.dataset),
            eval_pairs=0 if self.eval_dataset is None else len(self.eval_dataset),
            tokens_per_s=round(session["tokens"] / session["step_seconds"], 1) if session["step_seconds"] else 0.0,
            model_dir=str(self.output_dir / run_identity.FINAL_DIR),
        )
        summary = write_run_summary(read_metrics_rows(metrics_file), facts, self.output_dir)
        print(summary_markdown(summary), flush=True)

    def _log_record(self, step_metrics: dict, lr: float, grad_norm, elapsed: float, pairs: int, tokens: int) -> dict:
        names = sorted(step_metrics)
        reduced = dist.all_reduce_mean(torch.stack([step_metrics[n] for n in names]))
        record = {
            "step": self.step,
            "epoch": round(self.micro_batches_done / self.order.batches_per_epoch, 4),
            "lr": lr,
        }
        record.update({n: float(v) for n, v in zip(names, reduced)})
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        world = dist.world_size()
        record["samples_per_s"] = round(pairs * world / elapsed, 3)
        record["tokens_per_s"] = round(tokens * world / elapsed, 1)
        return record

    def _keep_logged_steps(self, metrics_file: Path) -> None:
        """metrics.jsonl holds each step once: rows past the step training starts from (a killed run's steps
        after its last checkpoint, or a previous run's in a reused output_dir) are dropped before they are
        logged again."""
        if not metrics_file.is_file():
            return
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _logged_step(line) <= self.step]  # a row cut by a kill is dropped too
        if len(kept) != len(lines):
            logger.info(
                "%s: dropped %d rows past step %d (logged again by this run)",
                metrics_file,
                len(lines) - len(kept),
                self.step,
            )
            checkpoint.write_text_atomic(metrics_file, "".join(line + "\n" for line in kept))

    def _start_wandb(self):
        mode = self.cfg.logging.wandb
        if mode == "disabled" or not self.is_main:
            return None
        import wandb

        return wandb.init(
            mode=mode,
            project=self.cfg.logging.project,
            entity=self.cfg.logging.entity,
            name=self.cfg.logging.run_name or self.output_dir.name,
            config=self.cfg.to_dict(),
            dir=str(self.output_dir),
        )

    # ------------------------------------------------------------------------------------------
    # save
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "micro_batches_done": self.micro_batches_done,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }
        if self.lora_base_digest is not None:
            from ddpo.export import BASE_DIGEST

            state[BASE_DIGEST] = self.lora_base_digest
        lora = self.cfg.model.lora_r > 0  # the adapters and their optimizer state, not the frozen base
        path = checkpoint.save(
            self.engine, self.output_dir, self.step, state, self.cfg.train.save_total_limit, trainable_only=lora
        )
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Export the policy in Hugging Face format (`models.build.load_model` reloads it). A LoRA run's: the
        PEFT adapter alone, on its base (ddpo/export.py; `ddpo export --merge` writes it merged)."""
        import deepspeed

        from ddpo.export import lora_base_path
        from ddpo.models.lora import save_lora_adapters

        directory = Path(directory or self.output_dir / "final")
        tmp = directory.with_name(f".{directory.name}.tmp")
        params = list(self.model.parameters())
        gather = self.engine.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                if self.cfg.model.lora_r > 0:
                    save_lora_adapters(self.model, tmp, lora_base_path(self.cfg), template=self.cfg.data.template)
                else:
                    self.model.save_pretrained(tmp, template=self.cfg.data.template)
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(tmp, directory)
        dist.barrier()
        return directory


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a row that is not one (cut short when a run was killed)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def split_heldout(num_pairs: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """data.eval_fraction's split of `num_pairs` pairs: (training positions, held-out positions), each in
    ascending order. The held-out ones are the first round(fraction x num_pairs) (at least 1) of a permutation
    drawn from a generator seeded with `seed` (train.seed): the same seed and pairs hold out the same pairs."""
    held_count = heldout_count(num_pairs, fraction)
    if held_count >= num_pairs:
        raise ConfigError(
            f"data.eval_fraction {fraction} holds out {held_count} of {num_pairs} pairs, leaving none to train on: "
            "lower data.eval_fraction or use more data"
        )
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:held_count])
    held_set = set(held)
    return [i for i in range(num_pairs) if i not in held_set], held


def _subset(dataset: PairDataset, positions: list[int]) -> PairDataset:
    """The pairs of `dataset` at `positions`, encoded as it encodes them (no second length check)."""
    part = copy.copy(dataset)
    part.records = [dataset.records[i] for i in positions]
    return part


def precompute_reference(cfg: Config) -> Path:
    """`ddpo precompute-ref`: compute and write the reference cache for the config's model and data."""
    trainer = Trainer(cfg)
    trainer.setup(for_reference_cache=True)
    return trainer.reference_cache_dir
