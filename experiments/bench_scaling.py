"""Cost curves: time per optimizer step and peak memory of our DDPO step and TRL's DPOTrainer as the token shape
grows, one factor at a time around a base point, up to LLaVA-1.5's real token shape (576 image tokens).

Axes: one-factor-at-a-time curves through the base point, not the full factorial:
    image tokens   64, 144, 256, 576  (images of 64 / 96 / 128 / 192 px, patch 8: exactly (side / 8)^2 tokens)
    answer tokens  50, 100, 200, 400  (each of chosen and rejected, its end-of-answer token included)
    batch          1, 4, 8 pairs per optimizer step
    width          256, 512           (hidden size of both towers; 4 + 4 layers either way, heads of 64 dims)
Base point: 144 image tokens, 100 answer tokens, batch 4, width 256. Plus LLaVA-1.5's real token shape (576
image tokens, 90 answer tokens) at batch 4 and width 256, measured in the image axis's process.

Model: the `bench` preset's LLaVA (CLIP tower, 2-layer projector, Llama; random init, fp32, vocabulary 8192
from a local word-level tokenizer) at the point's width and image size. Prompts have LLaVA-1.5's own layout
(the `llava_v1` template: BOS, system prompt, "USER: <image>\\n{question} ASSISTANT:") with 12-word questions:
image tokens + 46. Answers have exactly the point's token count; rejected = chosen with ~15 % of its words
replaced (same length: no padding anywhere). Each step gets fresh pairs (batch x steps pairs per point).

Systems:
    ours  ddpo.trainer.Trainer with the fastest settings of experiments/bench_step.py (its `grouped` mode):
          cached reference log-probs, each image encoded once per pair, shared prompt (one packed
          [prompt | chosen | rejected] row per pair), length-grouped batches; ZeRO-0 DeepSpeed engine, fused
          AdamW, clipping 1.0, loss with gamma = 5
    trl   TRL 1.16 DPOTrainer, VLM path, live reference (its only option with images); the same token
          sequences (checked per point: TRL's collated prompt + chosen equals ours for the first pair)

Timing: one process per axis. Every (system, point) of the axis is set up in it, then they take turns, one
optimizer step each, round-robin (ddpo.benchmarking.Baton), so the shared machine's changing load hits all
alike; `--warmup` steps, then `--steps` timed steps each; median and IQR per (system, point). The base point is
in every axis's process: its four measurements give the spread between processes. A step runs from the start of
its turn to the end of its optimizer step, data loading (collation; TRL's image processing) included.
Memory (ddpo.benchmarking.TensorPeak): one more step per (system, point) after the timed ones, profiled, not
timed: the most MB of CPU tensors allocated in that step and live at once (activations, gradients,
temporaries, the batch; not the weights, optimizer state or reference held before it). `--rss-points` adds
bench_step.py's measure for some points: a fresh process per system, the RSS high-water mark over its first
`--rss-steps` steps minus its RSS before them (includes the optimizer state allocated by the first step).
FLOPs (torch.utils.flop_counter.FlopCounterMode, in the first warm-up step): matmuls, convolutions and attention
of forward and backward, counted per (system, point); their ratio does not depend on the machine's load.
Fits, per system: ms/step = c0 + c1 L + c2 L^2 (least squares) along the image and the answer axis, where L =
prompt + answer tokens, the length of one DPO row (TRL runs 2 x batch such rows through policy and reference;
ours runs batch packed rows of L + answer tokens through the policy); along batch ms/step = c0 + c1 B; width
has two points: the measured ratio only.

    .venv/bin/python experiments/bench_scaling.py [--warmup 1] [--steps 4] [--axes image,answer,batch,width]
                                                  [--rss-points base,real] [--out experiments/results/scaling]
    .venv/bin/python experiments/bench_scaling.py --smoke --out /tmp/s   # tiny grid, one process, ~1 min (tests)
CPU only (one process, fp32, `--threads` torch threads). TRL is an optional dependency (requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE, PATCH, QUESTION_WORDS, TEMPLATE = 8192, 8, 12, "llava_v1"
SYSTEMS = ("ours", "trl")
AXES = {  # axis -> (Point field, label with units)
    "image": ("image_tokens", "image tokens per image"),
    "answer": ("answer_tokens", "answer tokens (chosen and rejected each)"),
    "batch": ("batch", "batch (pairs per optimizer step)"),
    "width": ("width", "model width (hidden size of both towers)"),
}
TRL_MISSING = "TRL is not installed: .venv/bin/pip install --no-deps -r requirements-bench.txt (trl==1.16.0)"


@dataclass(frozen=True)
class Point:
    image_tokens: int
    answer_tokens: int
    batch: int
    width: int

    @property
    def name(self) -> str:
        return f"i{self.image_tokens}-a{self.answer_tokens}-b{self.batch}-w{self.width}"

    @staticmethod
    def parse(name: str) -> Point:
        return Point(*map(int, re.fullmatch(r"i(\d+)-a(\d+)-b(\d+)-w(\d+)", name).groups()))

    @property
    def image_size(self) -> int:
        side = math.isqrt(self.image_tokens)
        if side * side != self.image_tokens:
            raise ValueError(f"{self.image_tokens} image tokens is not a square number of {PATCH}-px patches")
        return side * PATCH


@dataclass(frozen=True)
class Grid:
    base: Point
    axes: dict[str, list[int]]
    real: Point  # LLaVA-1.5's token shape, measured in the image axis's process
    one_process: bool = False  # every axis in one timing process (the smoke grid: one process start, not four)

    def members(self, axis: str) -> list[tuple[str, Point]]:
        points = [(axis, Point(**{**asdict(self.base), AXES[axis][0]: v})) for v in self.axes[axis]]
        return points + ([("real", self.real)] if axis == "image" else [])

    def groups(self, axes: list[str]) -> list[tuple[str, list[tuple[str, Point]]]]:
        """The timing processes: [(name, [(axis or 'real', point), ...])], one per axis unless `one_process`; a
        point on several axes of one process (the base) is measured once there and recorded on each."""
        groups = [(axis, self.members(axis)) for axis in axes]
        return [("all", [m for _, ms in groups for m in ms])] if self.one_process else groups


FULL = Grid(
    Point(144, 100, 4, 256),
    {"image": [64, 144, 256, 576], "answer": [50, 100, 200, 400], "batch": [1, 4, 8], "width": [256, 512]},
    Point(576, 90, 4, 256),
)
# Three image-token values, so the quadratic fit is exact there (the test checks it reproduces its points); the
# "real" point is an image-axis point here, so it adds no trainer.
SMOKE = Grid(
    Point(16, 8, 2, 64),
    {"image": [4, 16, 36], "answer": [8, 16], "batch": [1, 2], "width": [64, 128]},
    Point(36, 8, 2, 64),
    one_process=True,
)


# ------------------------------------------------------------------------------------------------
# Fixture: one tokenizer; per point its images and pairs
# ------------------------------------------------------------------------------------------------
def write_tokenizer(workdir: Path) -> list[str]:
    from ddpo.data.tokenizer import build_word_tokenizer

    base = len(build_word_tokenizer([]))
    words = [f"w{i}" for i in range(VOCAB_SIZE - base)]
    tokenizer = build_word_tokenizer([" ".join(words)])
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    tokenizer.save_pretrained(workdir / "tokenizer")
    return words


def write_pairs(directory: Path, point: Point, pairs: int, words: list[str]) -> None:
    """`pairs` pairs with images of the point's size and answers of exactly its token count (words + EOS)."""
    from PIL import Image

    rng = random.Random(0)
    size = point.image_size
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with open(directory / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i in range(pairs):
            image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            for _ in range(4):  # a few rectangles, so images differ in more than colour
                x, y = rng.randrange(size - 8), rng.randrange(size - 8)
                image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
            image.save(directory / "images" / f"{i}.png")
            chosen = rng.choices(words, k=point.answer_tokens - 1)  # the template's EOS is the last token
            rejected = [rng.choice(words) if rng.random() < 0.15 else w for w in chosen]  # hallucinated words
            if rejected == chosen:  # the loader skips pairs without a difference: every pair keeps one
                k = rng.randrange(len(chosen))
                rejected[k] = next(w for w in words if w != chosen[k])
            row = {
                "image": f"{i}.png",
                "question": " ".join(rng.choices(words, k=QUESTION_WORDS)),
                "chosen": " ".join(chosen),
                "rejected": " ".join(rejected),
            }
            f.write(json.dumps(row) + "\n")


@contextmanager
def bench_width(width: int) -> Iterator[None]:
    """The config offers fixed model presets; the width axis needs `bench` at other widths, so the timing process
    resizes it while it builds a point's models (layers unchanged, heads of 64 dims; 256 is `bench` itself)."""
    from ddpo.models.build import PRESETS

    saved = PRESETS["bench"]
    heads = max(1, width // 64)
    PRESETS["bench"] = dict(saved, vision_width=width, text_width=width, vision_heads=heads, text_heads=heads)
    try:
        yield
    finally:
        PRESETS["bench"] = saved


def ours_config(workdir: Path, point: Point, max_steps: int, threads: int, run_dir: Path):
    from ddpo.config import Config

    data = workdir / point.name
    cfg = Config()
    m, d, t = cfg.model, cfg.data, cfg.train
    m.arch, m.preset, m.tokenizer, m.dtype = "llava", "bench", str(workdir / "tokenizer"), "float32"
    m.image_size, m.patch_size, m.shared_prompt = point.image_size, PATCH, True
    d.format, d.path, d.image_dir = "jsonl", str(data / "pairs.jsonl"), str(data / "images")
    d.template, d.max_length, d.length_grouping = TEMPLATE, 4096, True
    cfg.loss.beta, cfg.loss.gamma = 0.1, 5.0
    t.output_dir, t.max_steps, t.micro_batch_size, t.gradient_accumulation_steps = (
        str(run_dir),
        max_steps,
        point.batch,
        1,
    )
    t.learning_rate, t.warmup_ratio, t.lr_scheduler, t.max_grad_norm = 1e-5, 0.0, "constant", 1.0
    t.reference, t.reference_cache, t.num_threads = "cached", str(data / "reference_cache"), threads
    cfg.deepspeed.config = str(REPO / "configs" / "deepspeed" / "zero0.json")
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    return cfg.validate()


# ------------------------------------------------------------------------------------------------
# Contenders: one (system, point) each, in its own thread; the baton gives one step at a time
# ------------------------------------------------------------------------------------------------
@dataclass
class Contender:
    """Times one (system, point)'s optimizer steps turn by turn; its last step is profiled for memory instead, and
    its first (a warm-up step, untimed) counts FLOPs. Without a baton it runs alone and measures its RSS
    high-water mark over all its steps."""

    name: str
    baton: object | None  # ddpo.benchmarking.Baton
    total: int
    count_flops: bool = False
    step_s: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    gflop: float = float("nan")
    tokens: dict = field(default_factory=dict)
    error: BaseException | None = None

    def begin_step(self) -> None:
        from ddpo.benchmarking import TensorPeak, reset_rss_peak

        if self.baton is not None:
            self.baton.wait(self.name)
            if len(self.step_s) == self.total - 1:  # the memory step
                self.memory = TensorPeak()
                self.memory.start()
            elif not self.step_s and self.count_flops:
                from torch.utils.flop_counter import FlopCounterMode

                # A dispatch mode of this thread (CPU autograd runs here too): matmuls, convolutions, attention.
                self.flops = FlopCounterMode(display=False)
                self.flops.__enter__()
        elif not self.step_s:
            self.rss_base = reset_rss_peak()
        self.started = time.perf_counter()

    def end_step(self) -> None:
        from ddpo.benchmarking import rss_peak_mb

        self.step_s.append(time.perf_counter() - self.started)
        if len(self.step_s) == 1 and self.count_flops and self.baton is not None:
            self.flops.__exit__(None, None, None)
            self.gflop = self.flops.get_total_flops() / 1e9
        if len(self.step_s) < self.total:
            if self.baton is not None:
                self.baton.pass_on(self.name)
            self.begin_step()
        elif self.baton is not None:
            self.peak_mb = self.memory.stop()  # the turn passes once train() has returned: clean-up runs alone
        else:
            self.peak_mb = rss_peak_mb() - self.rss_base

    def run(self, train: Callable[[], object]) -> None:
        try:
            self.begin_step()
            train()
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            if self.baton is not None:
                self.baton.pass_on(self.name, finished=True)


def setup_ours(workdir: Path, point: Point, contender: Contender, threads: int) -> Callable[[], object]:
    """Our Trainer at the point (its reference cache computed here, before any timing), steps reported."""
    from ddpo.trainer import Trainer

    run_dir = workdir / "runs" / f"ours-{point.name}-{os.getpid()}"
    with bench_width(point.width):
        trainer = Trainer(ours_config(workdir, point, contender.total, threads, run_dir)).setup()
    trainer.save_checkpoint = lambda: None  # the benchmark times steps, not checkpoint writing
    trainer.save = lambda *args, **kwargs: None
    pairs = [trainer.dataset[i] for i in range(len(trainer.dataset))]
    lengths = {(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs}
    if len(lengths) != 1 or next(iter(lengths))[1:] != (point.answer_tokens,) * 2:
        raise RuntimeError(f"{point.name}: (prompt, chosen, rejected) token counts {sorted(lengths)}")
    prompt = next(iter(lengths))[0]
    contender.tokens = {"prompt": prompt, "answer": point.answer_tokens, "packed_row": prompt + 2 * point.answer_tokens}
    contender.first_pair = pairs[0].prompt_ids + pairs[0].chosen_ids  # TRL's first row must equal this
    engine_step = trainer.engine.step

    def step(*args, **kwargs):
        engine_step(*args, **kwargs)
        contender.end_step()  # accumulation 1: every engine.step() is an optimizer step

    trainer.engine.step = step
    return trainer.train


def trl_rows(workdir: Path, point: Point) -> dict[str, list]:
    """The point's pairs as TRL's prompt / chosen / rejected / images columns, rendered by our template."""
    from PIL import Image
    from transformers import AutoTokenizer

    from ddpo.data.templates import answer_text, prompt_text

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    data = workdir / point.name
    lines = [json.loads(line) for line in open(data / "pairs.jsonl", encoding="utf-8")]
    # Our encoder adds the BOS id before the prompt and the EOS id after the answer (llava_v1 ends it with EOS);
    # TRL's processor is called without special tokens, so TRL gets both as text.
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    return {
        "prompt": [bos + prompt_text(TEMPLATE, tokenizer, r["question"], "<image>") for r in lines],
        "chosen": [answer_text(TEMPLATE, tokenizer, r["chosen"])[0] + eos for r in lines],
        "rejected": [answer_text(TEMPLATE, tokenizer, r["rejected"])[0] + eos for r in lines],
        "images": [[Image.open(data / "images" / r["image"]).convert("RGB")] for r in lines],
    }


def setup_trl(workdir: Path, point: Point, contender: Contender, threads: int) -> Callable[[], object]:
    """TRL's DPOTrainer on the same model shape, tokens and images; its collated batches' shapes recorded."""
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ddpo.models.build import random_llava

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    torch.manual_seed(0)
    with bench_width(point.width):
        model = random_llava("bench", tokenizer, image_size=point.image_size, patch_size=PATCH)
    size = point.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    args = DPOConfig(
        output_dir=str(workdir / "runs" / f"trl-{point.name}-{os.getpid()}"),
        per_device_train_batch_size=point.batch,
        max_steps=contender.total,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.1,
        max_length=None,  # the real shape's rows are ~700 tokens; nothing is cut on either side
        bf16=False,  # TRL defaults to bf16 (CPU autocast: AMX matmuls); ours is fp32, as in bench_step.py
        use_cpu=True,
        seed=0,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            contender.end_step()

    dataset = Dataset.from_dict(trl_rows(workdir, point))
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        processing_class=processor,
        train_dataset=dataset,
        callbacks=[StepTimer()],
    )
    first = trainer.data_collator([dataset[0]])["input_ids"][0].tolist()
    contender.tokens = {"row": len(first), "first_row": first}
    return trainer.train


def setup(system: str, workdir: Path, point: Point, contender: Contender, threads: int) -> Callable[[], object]:
    return (setup_trl if system == "trl" else setup_ours)(workdir, point, contender, threads)


# ------------------------------------------------------------------------------------------------
# Child processes: one axis's timing, or one (system, point)'s RSS
# ------------------------------------------------------------------------------------------------
def child_timing(workdir: Path, points: list[Point], args) -> dict:
    from ddpo.benchmarking import Baton

    names = [f"{s}@{p.name}" for p in points for s in SYSTEMS]  # each point's two systems take adjacent turns
    baton = Baton(names)
    total = args.warmup + args.steps + 1  # + the profiled memory step
    contenders = {n: Contender(n, baton, total, count_flops=args.warmup > 0) for n in names}
    # TRL first: its Accelerator must see a plain single process, before ours sets RANK/WORLD_SIZE.
    trains = {}
    for system in ("trl", "ours"):
        for p in points:
            name = f"{system}@{p.name}"
            trains[name] = setup(system, workdir, p, contenders[name], args.threads)
    for p in points:  # the same token sequences on both sides
        ours, trl = contenders[f"ours@{p.name}"], contenders[f"trl@{p.name}"]
        if trl.tokens.pop("first_row") != ours.first_pair:
            raise RuntimeError(f"{p.name}: TRL's first row differs from our prompt + chosen ids")
    threads = [threading.Thread(target=contenders[n].run, args=(trains[n],), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {n: report(c, total, args.warmup) for n, c in contenders.items()}


def report(contender: Contender, total: int, warmup: int) -> dict:
    if contender.error is not None:
        raise RuntimeError(f"'{contender.name}' failed") from contender.error
    if len(contender.step_s) != total:
        raise RuntimeError(f"'{contender.name}' ran {len(contender.step_s)} optimizer steps, expected {total}")
    timed = contender.step_s[warmup:-1] if contender.baton is not None else contender.step_s
    gflop = None if math.isnan(contender.gflop) else contender.gflop  # not counted without a warm-up step
    return {"step_s": timed, "peak_mb": contender.peak_mb, "gflop": gflop, "tokens": contender.tokens}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    workdir = Path(args.workdir)
    if args.child == "timing":
        result = child_timing(workdir, [Point.parse(n) for n in args.points.split(",")], args)
    else:  # "rss:<system>": one system at one point, alone in this fresh process
        system, point = args.child.split(":", 1)[1], Point.parse(args.points)
        contender = Contender(system, None, args.rss_steps)
        train = setup(system, workdir, point, contender, args.threads)
        contender.run(train)
        result = report(contender, args.rss_steps, 0)
    print("RESULT " + json.dumps(result))


def spawn(args, child_name: str, points: list[Point], workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS=str(args.threads),
        DS_ACCELERATOR="cpu",  # CPU only: DeepSpeed (and so our trainer) would take a GPU where one exists
        CUDA_VISIBLE_DEVICES="",
    )
    command = [sys.executable, __file__, "--child", child_name, "--workdir", str(workdir)]
    command += ["--points", ",".join(p.name for p in points), "--threads", str(args.threads)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--rss-steps", str(args.rss_steps)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark child '{child_name}' failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------
# Analysis: summaries, least-squares fits, table, plot
# ------------------------------------------------------------------------------------------------
def summary(step_s: list[float]) -> dict:
    ms = sorted(1e3 * s for s in step_s)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"ms_median": statistics.median(ms), "ms_q1": q1, "ms_q3": q3, "repetitions": len(ms)}


def fit(x: list[float], y: list[float], degree: int) -> dict:
    """Least-squares polynomial y = c0 + c1 x (+ c2 x^2); degree drops to len(x) - 1 where points are fewer."""
    import numpy as np

    degree = min(degree, len(x) - 1)
    design = np.vander(np.asarray(x, float), degree + 1, increasing=True)
    coefficients = np.linalg.lstsq(design, np.asarray(y, float), rcond=None)[0]
    predicted = design @ coefficients
    residual = float(np.sum((np.asarray(y) - predicted) ** 2))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return {
        "x": list(map(float, x)),
        "measured": list(map(float, y)),
        "coefficients": [float(c) for c in coefficients],  # c0, c1, c2
        "predicted": [float(p) for p in predicted],
        "r2": 1 - residual / total if total > 0 else 1.0,
        "max_rel_error": float(np.max(np.abs(predicted - np.asarray(y)) / np.asarray(y))),
    }


def fits(points: list[dict]) -> dict:
    """Per system and axis: length axes quadratic in L (prompt + answer tokens), batch linear, width a ratio."""
    out: dict = {s: {} for s in SYSTEMS}
    for axis in AXES:
        rows = sorted((p for p in points if p["axis"] == axis), key=lambda p: p[AXES[axis][0]])
        for s in SYSTEMS if len(rows) > 1 else ():
            ms = [p[s]["ms_median"] for p in rows]
            if axis in ("image", "answer"):
                out[s][axis] = dict(fit([p["row_tokens"] for p in rows], ms, 2), variable="L = prompt + answer tokens")
            elif axis == "batch":
                out[s][axis] = dict(fit([p["batch"] for p in rows], ms, 1), variable="B = pairs per step")
            else:
                out[s][axis] = {"x": [p["width"] for p in rows], "measured": ms, "ratio_last_to_first": ms[-1] / ms[0]}
    return out


def point_record(axis: str, point: Point, measured: dict, process: dict) -> dict:
    ours, trl = measured[f"ours@{point.name}"], measured[f"trl@{point.name}"]
    record = {"axis": axis, **asdict(point), "image_px": point.image_size}
    record["prompt_tokens"] = ours["tokens"]["prompt"]
    record["row_tokens"] = ours["tokens"]["prompt"] + point.answer_tokens  # one DPO row: what TRL runs 2B of
    record["packed_row_tokens"] = ours["tokens"]["packed_row"]
    for s, m in (("ours", ours), ("trl", trl)):
        record[s] = {**summary(m["step_s"]), "peak_mb": m["peak_mb"], "gflop": m["gflop"]}
        record[s]["gflop_per_s"] = m["gflop"] and m["gflop"] / (record[s]["ms_median"] / 1e3)
    record["ratio"] = record["ours"]["ms_median"] / record["trl"]["ms_median"]
    record["flop_ratio"] = ours["gflop"] and trl["gflop"] and ours["gflop"] / trl["gflop"]
    record["process"] = process
    return record


def number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def cell(summary_: dict) -> str:
    return f"{summary_['ms_median']:.0f} ({summary_['ms_q1']:.0f}–{summary_['ms_q3']:.0f})"


def table(results: dict) -> str:
    lines = [
        "| axis | image tok | answer tok | batch | width | row L | ours ms/step (IQR) | TRL ms/step (IQR) "
        "| ours / TRL | ours peak MB | TRL peak MB | ours GFLOP | TRL GFLOP | FLOP ratio "
        "| load avg (1 min, start→end) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["points"]:
        load = p["process"]["loadavg_start"][0], p["process"]["loadavg_end"][0]
        lines.append(
            f"| {p['axis']} | {p['image_tokens']} | {p['answer_tokens']} | {p['batch']} | {p['width']} "
            f"| {p['row_tokens']} | {cell(p['ours'])} | {cell(p['trl'])} | **{p['ratio']:.3f}** "
            f"| {p['ours']['peak_mb']:.0f} | {p['trl']['peak_mb']:.0f} | {number(p['ours']['gflop'], '.1f')} "
            f"| {number(p['trl']['gflop'], '.1f')} | {number(p['flop_ratio'], '.3f')} | {load[0]:.1f}→{load[1]:.1f} |"
        )
    lines += ["", "Fits (ms/step; L = prompt + answer tokens of one row, B = pairs per step):", ""]
    lines += [
        "| system | axis | model | c0 | c1 | c2 | R² | max rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in SYSTEMS:
        for axis, f in results["fits"][s].items():
            if "coefficients" not in f:
                lines.append(
                    f"| {s} | {axis} | ratio {f['x'][-1]}/{f['x'][0]} = {f['ratio_last_to_first']:.2f} | | | | | |"
                )
                continue
            c = f["coefficients"] + [float("nan")] * (3 - len(f["coefficients"]))
            model = "c0 + c1 L + c2 L²" if axis in ("image", "answer") else "c0 + c1 B"
            c2 = f"{c[2]:.3g}" if not math.isnan(c[2]) else ""
            lines.append(
                f"| {s} | {axis} | {model} | {c[0]:.1f} | {c[1]:.3g} | {c2} | {f['r2']:.4f} "
                f"| {f['max_rel_error']:.1%} |"
            )
    for r in results["rss"]:
        lines.append(
            f"\nRSS check ({r['point']}, fresh process, {r['steps']} steps): "
            f"ours +{r['ours']:.0f} MB, TRL +{r['trl']:.0f} MB"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [axis for axis in AXES if any(p["axis"] == axis for p in results["points"])]
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 7.5), sharex="col", squeeze=False)
    colours = {"ours": "tab:blue", "trl": "tab:orange"}
    for col, axis in enumerate(shown):
        key, label = AXES[axis]
        rows = sorted((p for p in results["points"] if p["axis"] == axis), key=lambda p: p[key])
        x = [p[key] for p in rows]
        top, bottom = axes[0][col], axes[1][col]
        for s in SYSTEMS:
            y = [p[s]["ms_median"] for p in rows]
            err = [[p[s]["ms_median"] - p[s]["ms_q1"] for p in rows], [p[s]["ms_q3"] - p[s]["ms_median"] for p in rows]]
            top.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[s], label=f"{s} (median, IQR)", ls="")
            f = results["fits"][s].get(axis, {})
            if "coefficients" in f:  # the fit's curve against the axis value (L = value + a constant offset)
                dense = np.linspace(min(x), max(x), 100)
                offset = f["x"][0] - x[0] if axis in ("image", "answer") else 0
                top.plot(dense, np.polyval(f["coefficients"][::-1], dense + offset), color=colours[s], lw=1)
            else:
                top.plot(x, y, color=colours[s], lw=1)
        bottom.plot(x, [p["ratio"] for p in rows], marker="o", color="black", label="ours / TRL, ms per step")
        if all(p["flop_ratio"] for p in rows):
            flops = [p["flop_ratio"] for p in rows]
            bottom.plot(x, flops, marker="s", ls="--", color="grey", label="ours / TRL, FLOPs per step (counted)")
        if axis == "image" and results["real_shape"]:
            real = next(p for p in results["points"] if p["axis"] == "real")
            for s in SYSTEMS:
                top.plot([real["image_tokens"]], [real[s]["ms_median"]], marker="*", ms=12, color=colours[s], ls="")
            bottom.plot(
                [real["image_tokens"]],
                [real["ratio"]],
                marker="*",
                ms=12,
                color="red",
                ls="",
                label=f"LLaVA-1.5 shape ({real['image_tokens']} img, {real['answer_tokens']} ans)",
            )
        top.set_ylabel("ms per optimizer step (median, CPU)")
        top.set_title(f"{label}\n(others at the base point)", fontsize=9)
        bottom.set_ylabel("ours / TRL (ratio per optimizer step)")
        bottom.set_xlabel(label)
        bottom.set_ylim(0, max(0.6, 1.1 * max(p["ratio"] for p in results["points"])))
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(f"One DDPO optimizer step: ours vs TRL DPOTrainer (base {results['base']}), fits: lines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main: fixture, one timing process per axis, optional RSS checks, outputs
# ------------------------------------------------------------------------------------------------
def measure(args, grid: Grid, workdir: Path) -> list[dict]:
    points = []
    for index, (axis, members) in enumerate(grid.groups(args.axes.split(","))):
        started, load = time.time(), os.getloadavg()
        measured = spawn(args, "timing", list(dict.fromkeys(p for _, p in members)), workdir)
        process = {
            "index": index,
            "axis": axis,
            "loadavg_start": list(load),
            "loadavg_end": list(os.getloadavg()),
            "wall_s": round(time.time() - started, 1),
        }
        for name, p in members:
            points.append(point_record(name, p, measured, process))
            r = points[-1]
            print(
                f"  {name:<7}{p.name:<22} ours {r['ours']['ms_median']:7.0f}  "
                f"trl {r['trl']['ms_median']:7.0f} ms/step  "
                f"ratio {r['ratio']:.3f}  peak MB {r['ours']['peak_mb']:.0f} / {r['trl']['peak_mb']:.0f}  "
                f"FLOP ratio {number(r['flop_ratio'], '.3f')}",
                flush=True,
            )
        print(f"process {axis}: {process['wall_s']:.0f} s, load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return points


def rss_checks(args, grid: Grid, workdir: Path) -> list[dict]:
    named = {"base": grid.base, "real": grid.real}
    out = []
    for key in [k for k in args.rss_points.split(",") if k]:
        point = named[key]
        peaks = {s: spawn(args, f"rss:{s}", [point], workdir)["peak_mb"] for s in SYSTEMS}
        out.append({"point": f"{key} {point.name}", "steps": args.rss_steps, **peaks})
        print(f"  RSS {key} {point.name}: ours +{peaks['ours']:.0f} MB, trl +{peaks['trl']:.0f} MB", flush=True)
    return out


def collect(args, grid: Grid, points: list[dict], rss: list[dict]) -> dict:
    import torch
    import trl

    base = [
        p
        for p in points
        if (p["image_tokens"], p["answer_tokens"], p["batch"], p["width"]) == tuple(asdict(grid.base).values())
    ]
    real = next((p for p in points if p["axis"] == "real"), None)
    return {
        "command": "python experiments/bench_scaling.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "grid": "smoke" if args.smoke else "full",
        "design": "one factor at a time around the base point (not the full factorial); one process per axis",
        "base": grid.base.name,
        "settings": {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": args.threads,
            "memory": "TensorPeak: peak MB of CPU tensors allocated in one profiled steady-state step (after the "
            "timed ones) and live at once; rss: fresh process, RSS high-water mark growth over its first steps",
            "rss_steps": args.rss_steps,
        },
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "trl": trl.__version__},
        "points": points,
        "fits": fits(points),
        "real_shape": real and {k: real[k] for k in ("image_tokens", "answer_tokens", "batch", "width", "ratio")},
        "ratio_by_image_tokens": {str(p["image_tokens"]): p["ratio"] for p in points if p["axis"] == "image"},
        "base_across_processes": [
            {"axis": p["axis"], "ours_ms": p["ours"]["ms_median"], "trl_ms": p["trl"]["ms_median"], "ratio": p["ratio"]}
            for p in base
        ],
        "rss": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "scaling"))
    parser.add_argument("--smoke", action="store_true", help="tiny grid and widths, 1 + 2 steps: for the test")
    parser.add_argument("--warmup", type=int, help="untimed steps per (system, point) first (default 1; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps per (system, point) (default 4; smoke 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--axes", default=",".join(AXES), help=f"a subset of {','.join(AXES)} (image brings 'real')")
    parser.add_argument(
        "--rss-points", help="base,real: also bench_step.py's RSS measure there (default both; smoke none)"
    )
    parser.add_argument("--rss-steps", type=int, default=2, help="steps of each RSS process")
    parser.add_argument("--workdir", help="fixture directory (default: a fresh temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--points", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 4)
    args.rss_points = args.rss_points if args.rss_points is not None else ("" if args.smoke else "base,real")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(TRL_MISSING) from None
    grid = SMOKE if args.smoke else FULL
    started = time.time()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    words = write_tokenizer(workdir)
    pairs_per_step = max(args.warmup + args.steps + 1, args.rss_steps)
    for p in {p for _, members in grid.groups(args.axes.split(",")) for _, p in members}:
        write_pairs(workdir / p.name, p, p.batch * pairs_per_step, words)
    print(f"fixture {workdir}; {args.warmup} warm-up + {args.steps} timed steps; load {os.getloadavg()}", flush=True)
    points = measure(args, grid, workdir)
    results = collect(args, grid, points, rss_checks(args, grid, workdir))
    results["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "table.md").write_text(table(results), encoding="utf-8")
    plot(results, out / "scaling.png")
    print(f"\nwrote {out}/results.json, table.md, scaling.png in {results['wall_s']:.0f} s")
    if results["real_shape"]:
        print(f"ratio_at_real_shape={results['real_shape']['ratio']:.3f}")


if __name__ == "__main__":
    main()
