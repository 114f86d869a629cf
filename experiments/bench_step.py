"""Benchmark: time per optimizer step and peak memory of our DDPO step vs TRL's DPOTrainer, and its ablations.

Same small LLaVA for every mode (the `bench` preset: CLIP 256 / 4 layers / 64-px images / patch 8 -> 64
image tokens; Llama 256 / 4 layers; vocabulary 8192 from a local word-level tokenizer; random init,
11.5 M parameters), the same 64 pairs (prompt ~80 tokens of which 64 are image tokens, answers ~48
tokens, rejected = chosen with some words replaced), batch 4 pairs, AdamW, fp32, one CPU process.

Modes (each a cumulative step of the ladder, except `trl` and `floor`):
    trl          TRL 1.16 `DPOTrainer`, VLM path, live reference (ref_model = deepcopy(model)), the only
                 reference mode it allows for images; bf16, checkpointing, eval, logging and saving off
    live         ours: `ddpo.trainer.Trainer` itself (ZeRO-0 DeepSpeed engine, AdamW, clipping, metrics),
                 live reference, each pair's image encoded per row, two rows per pair
    cached       + cached reference log-probs (precomputed once, before timing)
    image_once   + each pair's image encoded once
    shared       + shared prompt (one packed [prompt | chosen | rejected] row per pair)
    grouped      + length-grouped batches (data.length_grouping): all on
    floor        forward + backward of the policy alone on the `grouped` mode's batches (collated
                 beforehand): no reference, no data pipeline, no optimizer

Timing: all modes are set up in one process and then take turns, one optimizer step each, round-robin
(a baton passes between one thread per mode), so a busy shared machine slows all modes alike; the
process runs `--repeats` times (mode order reversed every other time); median ms per step over the
`--steps` steps after `--warmup` of every repeat. Step time = from the turn's start to the end of the
optimizer step, data loading included (ours: collation; TRL: its collator), for TRL and ours alike.
Memory: a fresh process per mode; peak = the RSS high-water mark over its steps (reset through
/proc/self/clear_refs just before them) minus its RSS then (model, reference, data already loaded).
Also printed: the fraction of padded tokens per epoch with and without length grouping, for two rows
per pair and for packed rows. The last line is `ratio_vs_trl=<best of ours / TRL>`.

TRL is an optional benchmark dependency (requirements-bench.txt: trl==1.16.0, installed with
`pip install --no-deps -r requirements-bench.txt` next to requirements.txt).

    .venv/bin/python experiments/bench_step.py [--steps 15] [--warmup 3] [--repeats 2] [--threads 2]
                                               [--modes trl,shared,...]
    python experiments/bench_step.py --device cuda     # on a GPU: TRL and ours in bf16 (DeepSpeed bf16 / TRL's
                                                       # autocast); step times after a synchronize; peak memory
                                                       # from the CUDA allocator
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddpo.benchmarking import (
    BATCH_PAIRS,
    IMAGE_SIZE,
    LADDER,
    PAIRS,
    TEMPLATE,
    Baton,
    reset_rss_peak,
    rss_peak_mb,
    step_config,
    write_step_fixture,
)

REPO = Path(__file__).resolve().parents[1]
OURS = ["live", "cached", "image_once", "shared", "grouped"]
MODES = ["trl", *OURS, "floor"]
TRL_MISSING = (
    "TRL is not installed: .venv/bin/pip install --no-deps -r requirements-bench.txt (trl==1.16.0), "
    "or leave 'trl' out of --modes"
)
CHILD_ENV = dict(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    PYTHONPATH=str(REPO),
)
DEVICE = "cpu"  # the child's --device


# ------------------------------------------------------------------------------------------------
# Memory: RSS high-water mark over the measured steps only
# ------------------------------------------------------------------------------------------------
class PeakMemory:
    """`start()` resets the RSS high-water mark (Linux clear_refs 5) and notes the RSS; `peak_mb()` is the growth
    since. On CUDA the same with the allocator's peak of device memory."""

    def start(self) -> None:
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        self.base = reset_rss_peak()

    def peak_mb(self) -> float:
        if DEVICE == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return rss_peak_mb() - self.base


# ------------------------------------------------------------------------------------------------
# Runners: each mode trains in its own thread; a baton lets one step run at a time, round-robin
# ------------------------------------------------------------------------------------------------
class Runner:
    """Times one mode's optimizer steps: `begin_step()` waits for the turn, `end_step()` records and hands it on."""

    def __init__(self, name: str, baton: Baton | None, total_steps: int):
        self.name, self.baton, self.total = name, baton, total_steps
        self.step_s: list[float] = []
        self.memory = PeakMemory()
        self.peak_mb = float("nan")
        self.error: BaseException | None = None
        self.losses: list[float] = []

    def begin_step(self) -> None:
        self.started = self.baton.wait(self.name) if self.baton else time.perf_counter()

    def end_step(self) -> None:
        if DEVICE == "cuda":  # the step's kernels finish before its time is taken and the turn passes
            torch.cuda.synchronize()
        self.step_s.append(time.perf_counter() - self.started)
        if len(self.step_s) == self.total:
            if self.baton is None:
                self.peak_mb = self.memory.peak_mb()
            return  # the thread hands the turn on once train() has returned (its clean-up runs alone)
        if self.baton:
            self.baton.pass_on(self.name)
        self.begin_step()

    def run(self, train: Callable[[], object]) -> None:
        try:
            if self.baton is None:
                self.memory.start()
            self.begin_step()
            logged = train()
            if isinstance(logged, list):  # our Trainer returns its metrics records
                self.losses = [record["loss"] for record in logged]
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            if self.baton:
                self.baton.pass_on(self.name, finished=True)


def setup_ours(workdir: Path, mode: str, runner: Runner, threads: int) -> Callable[[], object]:
    """A `Trainer` for one rung of the ladder, its optimizer steps reported to `runner`."""
    from ddpo.trainer import Trainer

    run_dir = workdir / "runs" / f"{mode}-{os.getpid()}"
    trainer = Trainer(step_config(workdir, mode, runner.total, threads, run_dir))
    trainer.setup()
    once = LADDER[mode][1]
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            model.image_once_per_pair = once
    trainer.save_checkpoint = lambda: None  # the benchmark times steps, not checkpoint writing
    trainer.save = lambda *args, **kwargs: None
    engine_step = trainer.engine.step

    def step(*args, **kwargs):
        engine_step(*args, **kwargs)
        runner.end_step()  # accumulation 1: every engine.step() is an optimizer step

    trainer.engine.step = step
    return trainer.train


def setup_floor(workdir: Path, runner: Runner, threads: int) -> Callable[[], object]:
    """Forward + backward of the policy alone on the `grouped` mode's batches, collated beforehand."""
    from ddpo.trainer import Trainer

    run_dir = workdir / "runs" / f"floor-{os.getpid()}"
    trainer = Trainer(step_config(workdir, "floor", runner.total, threads, run_dir)).setup()
    model = trainer.model.train()
    data = trainer.order.iterate(0)
    batches = [
        trainer.collate([trainer.dataset[i] for i in next(data)[1]]).to(trainer.device) for _ in range(runner.total)
    ]

    def train() -> None:
        for batch in batches:
            chosen, rejected = model.pair_token_logps(batch, shared_prompt=True)
            (chosen.sum() - rejected.sum()).backward()
            model.zero_grad(set_to_none=True)
            runner.end_step()

    return train


def setup_trl(workdir: Path, runner: Runner, threads: int) -> Callable[[], object]:
    """TRL's DPOTrainer (VLM path, live reference) on the same model, tokens and images."""
    import copy

    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        raise SystemExit(TRL_MISSING) from None
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor, TrainerCallback

    from ddpo.data.templates import answer_text, prompt_text
    from ddpo.models.build import random_llava

    run_dir = workdir / "runs" / f"trl-{os.getpid()}"
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    cfg = step_config(workdir, "live", runner.total, threads, run_dir)
    lines = [json.loads(line) for line in open(cfg.data.path, encoding="utf-8")]
    # Exactly our token sequences: our template renders the prompt with one <image>, which the processor
    # expands to the model's 64 image tokens; the answers carry the template's separator and end marker.
    rows = {
        "prompt": [prompt_text(TEMPLATE, tokenizer, r["question"], "<image>") for r in lines],
        "chosen": [answer_text(TEMPLATE, tokenizer, r["chosen"])[0] for r in lines],
        "rejected": [answer_text(TEMPLATE, tokenizer, r["rejected"])[0] for r in lines],
        "images": [[Image.open(Path(cfg.data.image_dir) / r["image"]).convert("RGB")] for r in lines],
    }
    torch.manual_seed(cfg.train.seed)
    model = random_llava("bench", tokenizer)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    args = DPOConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=BATCH_PAIRS,
        gradient_accumulation_steps=1,
        max_steps=runner.total,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.1,
        bf16=DEVICE == "cuda",
        gradient_checkpointing=False,
        max_length=512,
        use_cpu=DEVICE == "cpu",
        seed=cfg.train.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            runner.end_step()

    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        processing_class=processor,
        train_dataset=Dataset.from_dict(rows),
        callbacks=[StepTimer()],
    )
    return trainer.train


def setup(mode: str, workdir: Path, runner: Runner, threads: int) -> Callable[[], object]:
    if mode == "trl":
        return setup_trl(workdir, runner, threads)
    if mode == "floor":
        return setup_floor(workdir, runner, threads)
    return setup_ours(workdir, mode, runner, threads)


def child(args) -> None:
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    workdir = Path(args.workdir)
    total = args.warmup + args.steps
    if args.child == "prepare":  # the reference cache every cached mode reads (fingerprint-checked)
        from ddpo.trainer import Trainer

        Trainer(step_config(workdir, "cached", 1, args.threads, workdir / "runs" / "prepare")).setup(
            for_reference_cache=True
        )
        return
    if args.child == "timing":  # every mode in this process, alternating step by step
        modes = args.modes.split(",")
        # TRL first: its Accelerator must see a plain single process, before ours sets RANK/WORLD_SIZE.
        modes.sort(key=lambda m: m != "trl")
        baton = Baton(modes)
        runners = {m: Runner(m, baton, total) for m in modes}
        trains = {m: setup(m, workdir, runners[m], args.threads) for m in modes}
        threads = [threading.Thread(target=runners[m].run, args=(trains[m],), name=m) for m in modes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result = {m: {"step_s": r.step_s[args.warmup :], "losses": r.losses} for m, r in runners.items()}
    else:  # "memory:<mode>": one mode alone in a fresh process
        mode = args.child.split(":", 1)[1]
        runners = {mode: Runner(mode, None, total)}
        runners[mode].run(setup(mode, workdir, runners[mode], args.threads))
        result = {mode: {"peak_mb": runners[mode].peak_mb, "step_s": runners[mode].step_s[args.warmup :]}}
    for m, r in runners.items():
        if r.error is not None:
            raise RuntimeError(f"mode '{m}' failed") from r.error
        if len(r.step_s) != total:
            raise RuntimeError(f"mode '{m}' ran {len(r.step_s)} optimizer steps, expected {total}")
    print("RESULT " + json.dumps(result))


def spawn(child_name: str, args, workdir: Path, modes: list[str], steps: int, warmup: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(CHILD_ENV, OMP_NUM_THREADS=str(args.threads))
    if args.device == "cpu":  # DeepSpeed (and so our trainer) would take a GPU where one exists
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable,
        __file__,
        "--child",
        child_name,
        "--workdir",
        str(workdir),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(args.threads),
        "--modes",
        ",".join(modes),
        "--device",
        args.device,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child '{child_name}' failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


# ------------------------------------------------------------------------------------------------
# Padding: fraction of padded tokens per epoch, without and with length grouping
# ------------------------------------------------------------------------------------------------
def padding_report(workdir: Path) -> dict[str, float]:
    from transformers import AutoTokenizer

    from ddpo.data.collator import PairDataset, PairEncoder
    from ddpo.data.formats import load_records
    from ddpo.sampler import PairOrder

    cfg = step_config(workdir, "grouped", 1, 1, workdir / "runs" / "padding")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    records = load_records(cfg.data, seed=cfg.train.seed)
    encoder = PairEncoder.from_config(cfg.data, tokenizer, "<image>" * 64)
    dataset = PairDataset(records, encoder)
    pairs = [dataset[i] for i in range(len(dataset))]
    lengths = [len(r.prompt) + max(len(r.chosen), len(r.rejected)) for r in dataset.records]  # as the trainer does
    report = {}
    for grouped in (False, True):
        order = PairOrder(len(dataset), BATCH_PAIRS, cfg.train.seed, lengths=lengths if grouped else None)
        real = {"two rows": 0, "packed": 0}
        total = {"two rows": 0, "packed": 0}
        for batch in order.epoch_batches(0):
            ps = [pairs[i] for i in batch]
            rows = [len(p.prompt_ids) + len(a) for p in ps for a in (p.chosen_ids, p.rejected_ids)]
            packed = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in ps]
            for name, lens in (("two rows", rows), ("packed", packed)):
                real[name] += sum(lens)
                total[name] += max(lens) * len(lens)
        for name in real:
            report[f"{name}, {'grouped' if grouped else 'random order'}"] = (1 - real[name] / total[name], total[name])
    report["prompt tokens (mean)"] = statistics.mean(len(p.prompt_ids) for p in pairs)
    report["answer tokens (mean)"] = statistics.mean(len(a) for p in pairs for a in (p.chosen_ids, p.rejected_ids))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where TRL and ours train")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory run (after 1 warm-up)")
    parser.add_argument("--workdir", help="fixture directory (default: a fresh temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here; leave --device out to run on the CPU")
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; modes are {', '.join(MODES)}")
    if "trl" in modes:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(TRL_MISSING) from None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_step_"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_step_fixture(workdir)
    padding = padding_report(workdir)
    print(
        f"{PAIRS} pairs, batch {BATCH_PAIRS}, prompt {padding.pop('prompt tokens (mean)'):.1f} tokens "
        f"(64 image), answers {padding.pop('answer tokens (mean)'):.1f} tokens; {args.threads} threads; {args.device}; "
        f"fixture {workdir}"
    )
    if any(LADDER.get(m, ("",))[0] == "cached" for m in modes):
        spawn("prepare", args, workdir, modes, 1, 0)

    step_s: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats):  # one process per repeat, all modes alternating step by step inside
        order = modes if repeat % 2 == 0 else modes[::-1]
        out = spawn("timing", args, workdir, order, args.steps, args.warmup)
        for m in modes:
            step_s[m] += out[m]["step_s"]
        if repeat == 0:  # same computation check: the cached modes see the same data order until `grouped`
            print("  final loss: " + ", ".join(f"{m} {out[m]['losses'][-1]:.6f}" for m in modes if out[m]["losses"]))
        print(
            f"  timing run {repeat}: "
            + ", ".join(f"{m} {1e3 * statistics.median(out[m]['step_s']):.0f}" for m in modes)
            + " ms/step",
            flush=True,
        )
    peak_mb = {}
    for m in modes:  # a fresh process per mode: the RSS high-water mark of its steps alone
        peak_mb[m] = spawn(f"memory:{m}", args, workdir, [m], args.memory_steps, 1)[m]["peak_mb"]

    ms = {m: 1e3 * statistics.median(v) for m, v in step_s.items()}
    print("\npadding per epoch (layout, order: padded fraction, tokens through the decoder incl. padding):")
    for name, (fraction, tokens) in padding.items():
        print(f"  {name:<26} {fraction:6.1%} {tokens:>8d}")
    print(f"\n{'mode':<12}{'ms/step':>9}{'IQR ms':>14}{'peak +MB':>10}{'vs TRL':>8}{'vs floor':>10}")
    for m in modes:
        q = statistics.quantiles(step_s[m], n=4)
        vs_trl = f"{ms[m] / ms['trl']:.3f}" if "trl" in ms else "-"
        vs_floor = f"{ms[m] / ms['floor']:.2f}" if "floor" in ms else "-"
        iqr = f"{1e3 * q[0]:.0f}-{1e3 * q[2]:.0f}"
        print(f"{m:<12}{ms[m]:>9.1f}{iqr:>14}{peak_mb[m]:>10.0f}{vs_trl:>8}{vs_floor:>10}")
    ours = [m for m in modes if m in OURS]
    if "trl" in ms and ours:
        print(f"ratio_vs_trl={min(ms[m] for m in ours) / ms['trl']:.3f}")


if __name__ == "__main__":
    main()
