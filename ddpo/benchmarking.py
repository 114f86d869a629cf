"""What the step benchmarks share (experiments/bench_step.py, experiments/bench_scaling.py): turn-taking between
trainers set up in one process, and two measures of peak memory on the CPU.

Turn-taking (`Baton`): the machines these benchmarks run on are shared and their load changes from minute to
minute, so the systems compared live in one process, one thread each, and take turns one optimizer step at a
time; a busy machine then slows all of them alike and their ratio stays meaningful.

Peak memory on the CPU, two measures:
- the RSS high-water mark (`reset_rss_peak`, `rss_peak_mb`): everything the process touches (tensors, Python
  objects, image buffers, the allocator's slack), but one number per process, so one measured system per
  process, and the C allocator's reuse of freed blocks moves it by tens of MB between runs;
- `TensorPeak`: the most bytes of CPU tensors allocated in a window and live at once, from the memory events of
  torch's profiler: tensors only, but exact, and per thread, so it runs inside the timing process.

The step benchmark's model and data (`write_step_fixture`, `step_config`): also what tests/test_estimate.py
measures the estimator against.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # configs/deepspeed/ of the repository (an editable install)


class Baton:
    """Turn-taking between runner threads: exactly one runs a step at a time, modes alternate step by step,
    so every mode sees the same machine load (this machine is shared and noisy)."""

    def __init__(self, names: list[str]):
        self.cond = threading.Condition()
        self.queue = list(names)  # whose turn: queue[0]

    def wait(self, name: str) -> float:
        with self.cond:
            self.cond.wait_for(lambda: self.queue[0] == name)
        return time.perf_counter()

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            assert self.queue[0] == name
            self.queue.pop(0)
            if not finished:
                self.queue.append(name)
            self.cond.notify_all()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_rss_peak() -> float:
    """Resets this process's RSS high-water mark to its current RSS (Linux: /proc/self/clear_refs 5) and returns
    that RSS in MB, the base to subtract from `rss_peak_mb()` later."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def rss_peak_mb() -> float:
    """This process's RSS high-water mark in MB (since it started or since the last `reset_rss_peak`)."""
    return _status_mb("VmHWM")


class TensorPeak:
    """The most MB of CPU tensors allocated between `start()` and `stop()` and live at once.

    While it profiles memory, torch's CPU allocator reports every allocation and free to the profiler; blocks
    allocated before `start()` count neither when allocated nor when freed (their frees are skipped by address),
    so the result is the working memory of what ran in between (activations, gradients, temporaries, the batch),
    not the weights or optimizer state held before it. Not counted: memory that is not a torch tensor (Python
    objects, numpy or PIL buffers) and tensors allocated inside intra-op worker threads. The profiler follows the
    thread that starts it (and the autograd work it launches on the CPU): start and stop in the thread that runs
    the work, while no other thread runs any."""

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def stop(self) -> float:
        self.profiler.stop()
        # The chrome trace is the profiler's public record of memory events (address, signed bytes, time).
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            self.profiler.export_chrome_trace(str(path))
            events = json.loads(path.read_text(encoding="utf-8"))["traceEvents"]
        memory = sorted(
            (e["ts"], e["args"]["Bytes"], e["args"]["Addr"])
            for e in events
            if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # 0: CPU
        )
        mine: set[int] = set()
        live = peak = 0
        for _, nbytes, addr in memory:
            if nbytes > 0:
                mine.add(addr)
            elif addr in mine:
                mine.discard(addr)
            else:
                continue  # a block allocated before start(): its allocation was not counted either
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20


# ------------------------------------------------------------------------------------------------
# The step benchmark's model and data
# ------------------------------------------------------------------------------------------------
VOCAB_SIZE, PAIRS, BATCH_PAIRS, IMAGE_SIZE = 8192, 64, 4, 64
QUESTION_WORDS, ANSWER_WORDS = (10, 16), (36, 60)  # inclusive ranges of words per question / answer
TEMPLATE = "chat_template"
# A minimal multimodal chat template (USER: <image>\nquestion ASSISTANT: answer</s>), so prompts are ~80 tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
# mode -> (train.reference, image once per pair, model.shared_prompt, data.length_grouping)
LADDER = {
    "live": ("live", False, False, False),
    "cached": ("cached", False, False, False),
    "image_once": ("cached", True, False, False),
    "shared": ("cached", True, True, False),
    "grouped": ("cached", True, True, True),
    "floor": ("cached", True, True, True),
}


# ------------------------------------------------------------------------------------------------
def write_step_fixture(workdir: Path, seed: int = 0) -> None:
    """experiments/bench_step.py's data in `workdir`: a word-level tokenizer of VOCAB_SIZE with a minimal chat
    template, PAIRS random images and pairs (rejected = chosen with ~15% of its words replaced)."""
    from PIL import Image

    from ddpo.data.tokenizer import build_word_tokenizer

    base = len(build_word_tokenizer([]))
    words = [f"w{i}" for i in range(VOCAB_SIZE - base)]
    tokenizer = build_word_tokenizer([" ".join(words)])
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(workdir / "tokenizer")

    rng = random.Random(seed)
    (workdir / "images").mkdir(exist_ok=True)
    with open(workdir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i in range(PAIRS):
            image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randrange(256) for _ in range(3)))
            for _ in range(4):  # a few rectangles, so images differ in more than colour
                x, y = rng.randrange(IMAGE_SIZE - 8), rng.randrange(IMAGE_SIZE - 8)
                image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
            image.save(workdir / "images" / f"{i}.png")
            question = " ".join(rng.choices(words, k=rng.randint(*QUESTION_WORDS)))
            chosen = rng.choices(words, k=rng.randint(*ANSWER_WORDS))
            rejected = [rng.choice(words) if rng.random() < 0.15 else w for w in chosen]  # hallucinated words
            f.write(
                json.dumps(
                    {
                        "image": f"{i}.png",
                        "question": question,
                        "chosen": " ".join(chosen),
                        "rejected": " ".join(rejected),
                    }
                )
                + "\n"
            )


def step_config(workdir: Path, mode: str, max_steps: int, threads: int, run_dir: Path):
    """The validated ddpo Config of one LADDER mode of the step benchmark, on write_step_fixture's data."""
    from ddpo.config import Config

    reference, _, shared, grouped = LADDER[mode]
    cfg = Config()
    cfg.model.arch, cfg.model.preset, cfg.model.tokenizer = "llava", "bench", str(workdir / "tokenizer")
    cfg.model.dtype, cfg.model.shared_prompt = "float32", shared
    cfg.data.format, cfg.data.path, cfg.data.image_dir = "jsonl", str(workdir / "pairs.jsonl"), str(workdir / "images")
    cfg.data.template, cfg.data.max_length, cfg.data.length_grouping = TEMPLATE, 512, grouped
    cfg.loss.beta, cfg.loss.gamma = 0.1, 5.0
    t = cfg.train
    t.output_dir, t.max_steps, t.micro_batch_size, t.gradient_accumulation_steps = (
        str(run_dir),
        max_steps,
        BATCH_PAIRS,
        1,
    )
    t.learning_rate, t.warmup_ratio, t.lr_scheduler, t.max_grad_norm = 1e-5, 0.0, "constant", 1.0
    t.reference, t.reference_cache, t.num_threads = reference, str(workdir / "reference_cache"), threads
    cfg.deepspeed.config = str(REPO / "configs" / "deepspeed" / "zero0.json")
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    return cfg.validate()
