"""`ddpo demo`: RLHF-V's claims reproduced on a CPU in minutes, through the full-scale pipeline.

    ddpo demo [--output-dir DIR] [--seed N] [--stages sft,gate,sample,annotate,train,eval] [--quick] [--world v1]

Stages (each a function below; each writes its artifacts under DIR and is skipped when they exist,
so an interrupted demo resumes where it stopped):

  sft       a random-init LLaVA-style model learns to describe procedural images from captions that
            carry language priors (v2 world, data/synthetic/priors.py: an absent companion named
            next to its anchor; colour and position biases)                          -> DIR/sft/
  gate      the perception gate on held-out images, greedy: does the SFT model see what it names
            (one-object images; scenes with no anchor) and does it hallucinate from the prior
            (companion rate)? Stops the demo, naming the figure, when it misses       -> DIR/gate.json
  sample    the SFT model describes held-out images (temperature sampling)            -> DIR/pairs/answers.jsonl
  annotate  an oracle corrects each hallucinated answer minimally; chosen = corrected,
            rejected = original; written as JSONL + image folder                      -> DIR/pairs/train.jsonl
  train     `ddpo train` twice from the same SFT model on the same pairs: vanilla DPO
            (gamma 1) and DDPO (gamma > 1); the trainer finds the corrected segments by
            diffing the two answers, exactly as at full scale                          -> DIR/runs/{dpo,ddpo}/
  eval      greedy and sampled (T 0.7) answers on held-out validation and test images: response-
            and mention-level hallucination, companion rate, non-target hallucination,
            object recall, length, claim errors; the drift of each policy from the SFT model
            (mean per-token log-ratio on the SFT model's validation answers)          -> DIR/results.{json,md,png}

Worlds: "v2" (default): a strong perceiver that hallucinates from co-occurrence priors, as in
RLHF-V. "v1": the first world, whose caption noise renamed visible objects (misperception); kept as
the negative control (`--world v1`, configs/synthetic/demo_v1.yaml; it fails the gate).

Hyper-parameters live in `configs/synthetic/demo.yaml` (a normal `ddpo train` config: model, data,
loss, train); the demo sets only the paths, gamma and seed. Validation metrics are reported next to the
test ones so that settings can be chosen on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ddpo.models.build import load_model
from ddpo.progress import progress_bar
from ddpo.trainer import TrainerCallback

logger = logging.getLogger("ddpo.lab.demo")
REPO = Path(__file__).resolve().parents[2]
STAGES = ("sft", "gate", "sample", "annotate", "train", "eval")
METRICS = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall", "mean_response_words")
PRIOR_METRICS = ("companion_rate", "target_mention_rate", "nontarget_mention_rate")
V2_SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "bar", "moon")
V2_PARTNERS = {"square": "circle", "triangle": "star", "cross": "ring"}  # anchor -> companion; bar and moon: controls


class GateError(RuntimeError):
    """The SFT model misses the perception gate: the lab cannot test preference learning on objects."""


@dataclass
class DemoSettings:
    """Sizes of the demo; `--quick` shrinks them to a CI-sized smoke run."""

    output_dir: str = "demo_output"
    seed: int = 0
    world_version: str = (
        "v2"  # "v2": language priors (default); "v1": the misperception world (negative control, `v1()`)
    )
    train_config: str = str(REPO / "configs" / "synthetic" / "demo.yaml")
    answer_words: int = 55  # target length of the detailed descriptions (RLHF-V answers: ~64 words)
    sft_examples: int = 8000
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_learning_rate: float = (
        2e-3  # with the tower pretrained and frozen, 2e-3 converges faster than 1e-3 (loss 0.226 vs 0.262)
    )
    # steps of perception pretraining before SFT (v2): the vision tower and projector learn to tell each
    # cell's shape and colour, as an MLLM starts from a pretrained CLIP tower; 0 = none (v1)
    perception_steps: int = 300
    # continue supervised fine-tuning from this SFT model instead of a random init (its pretrained,
    # frozen tower kept; no perception pretraining): the dense-regime map's SFT models at other answer
    # lengths start from the seed's 55-word one and learn only the new length's captions
    sft_init: str | None = None
    priors: dict = field(default_factory=dict)  # v2: PriorConfig overrides of the SFT captions' biases
    gate_images: int = 400  # held-out scenes for the gate's recall and companion figures (plus every one-object image)
    gate_single_stride: int = 1  # use every n-th one-object image (1: all of them; the quick run takes fewer)
    gate_single_object: float = 0.98  # the gate: shape named right on one-object images, at least
    gate_recall_without_anchor: float = 0.95  # recall on scenes holding no anchor, at least
    gate_companion_rate: float = 0.3  # absent companions named next to their anchor, at least (something to fix)
    enforce_gate: bool = True  # stop the demo when the SFT model misses the gate (off for the v1 negative control)
    sampled_eval_temperature: float = 0.7  # the sampled evaluation's temperature (next to greedy)
    sampled_eval: bool = True  # also evaluate sampled test answers (off: greedy only, half the eval time)
    drift_images: int = 64  # validation images whose SFT answers probe the drift during training
    validation_only: bool = (
        False  # evaluate on the validation split only (hyper-parameter searches: no test number exists)
    )
    preference_images: int = 1600  # held-out images whose sampled answers get corrected
    sample_temperature: float = 0.7  # RLAIF-V samples at 0.7; at 1.0 answers drift far from greedy ones
    max_pairs: int = 1400  # the paper's 1.4k; fewer if fewer sampled answers hallucinate
    val_images: int = 300
    test_images: int = 600
    ddpo_gamma: float = 5.0
    world: dict = field(default_factory=dict)  # WorldConfig overrides on top of the demo world (e.g. max_objects)
    noise: dict = field(default_factory=dict)  # NoiseConfig overrides of the SFT captions' biases
    # name -> `ddpo train` overrides of that run; every run starts from the same SFT model and pairs.
    # Default: vanilla DPO (gamma 1) and DDPO (gamma = ddpo_gamma).
    methods: dict | None = None
    train_overrides: list = field(default_factory=list)  # extra `--section.field VALUE` for both runs
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.world_version not in ("v1", "v2"):
            raise ValueError(f"DemoSettings.world_version must be 'v1' or 'v2', got {self.world_version!r}")
        if self.methods is None:
            self.methods = {"dpo": {"loss.gamma": 1.0}, "ddpo": {"loss.gamma": self.ddpo_gamma}}

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        """A CI-sized smoke run: every stage, numbers meaningless, the gate reported but not enforced."""
        small = dict(
            answer_words=30,
            sft_examples=600,
            sft_steps=150,
            sft_batch_size=16,
            preference_images=96,
            max_pairs=64,
            val_images=16,
            test_images=24,
            gate_images=24,
            gate_single_stride=9,
            enforce_gate=False,
            perception_steps=50,
            train_overrides=["--train.micro_batch_size", "4"],
        )
        if overrides.get("world_version") == "v1":
            small.update(
                answer_words=15, train_config=str(REPO / "configs" / "synthetic" / "demo_v1.yaml"), perception_steps=0
            )
        return cls(**{**small, **overrides})

    @classmethod
    def v1(cls, **overrides) -> DemoSettings:
        """The first world (misperception: caption noise renames visible objects), kept as the negative
        control with its own settings: 30-word answers, its SFT recipe and configs/synthetic/demo_v1.yaml."""
        old = dict(
            world_version="v1",
            answer_words=30,
            sft_examples=6000,
            sft_steps=1200,
            sft_learning_rate=5e-4,
            perception_steps=0,
            train_config=str(REPO / "configs" / "synthetic" / "demo_v1.yaml"),
            enforce_gate=False,
        )
        return cls(**{**old, **overrides})


# ------------------------------------------------------------------------------------------------
# The world's data splits: disjoint seeds per use
# ------------------------------------------------------------------------------------------------
def synthetic_config(settings: DemoSettings):
    """The demo's world.

    v2: 8 shapes with distinct silhouettes in one size and 6 independent colours, 1-4 objects; three
    directed anchor -> companion pairs (square -> circle, triangle -> star, cross -> ring) whose
    companion really stands at the anchor's partner cell in 30% of the scenes that allow it; bar and
    moon are controls without a partner. Captions: data/synthetic/priors.py.

    v1: 4 shapes in one size, at most 3 objects, each shape the frequent partner of the next (circle ->
    square -> triangle -> diamond -> circle); captions: data/synthetic/noise.py (renames visible objects).
    """
    from ddpo.data.synthetic import SyntheticConfig
    from ddpo.data.synthetic.language import LanguageConfig
    from ddpo.data.synthetic.noise import NoiseConfig
    from ddpo.data.synthetic.priors import PriorConfig
    from ddpo.data.synthetic.world import WorldConfig

    language = LanguageConfig(style="detailed", target_words=settings.answer_words)
    if settings.world_version == "v2":
        world = dict(
            image_size=_train_config(settings).model.image_size,
            shapes=V2_SHAPES,
            sizes=("large",),
            max_objects=4,
            partners=dict(V2_PARTNERS),
            cooccurrence_prob=0.3,
            repeat_prob=0.1,
            adjacent_partners=True,
        )
        world.update({k: tuple(v) if isinstance(v, list) else v for k, v in settings.world.items()})
        priors = {"position_bias": ("middle right",), **settings.priors}
        return SyntheticConfig(
            world=WorldConfig(**world),
            language=language,
            priors=PriorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in priors.items()}),
        )
    world = dict(
        image_size=_train_config(settings).model.image_size,  # rendered at the model's input size
        shapes=("circle", "square", "triangle", "diamond"),
        sizes=("large",),
        max_objects=3,
        partners={"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "circle"},
    )
    world.update({k: tuple(v) if isinstance(v, list) else v for k, v in settings.world.items()})
    return SyntheticConfig(world=WorldConfig(**world), language=language, noise=NoiseConfig(**settings.noise))


def split(settings: DemoSettings, name: str, n: int):
    """(scenes, images, prompts) of a split; each split draws from its own seed, so adding images to one
    split never changes another."""
    from ddpo.data.synthetic import sft_examples

    offset = {"sft": 1, "preference": 2, "val": 3, "test": 4, "gate": 5}[name]
    examples = sft_examples(n, settings.seed * 100 + offset, synthetic_config(settings))
    return (
        [e.scene for e in examples],
        [e.image for e in examples],
        [e.prompt for e in examples],
        [e.caption for e in examples],
    )


def _train_config(settings: DemoSettings, *overrides: str):
    from ddpo.config import load_config

    return load_config(settings.train_config, list(overrides))


def generation_options(settings: DemoSettings, template: str) -> dict:
    return dict(template=template, max_new_tokens=2 * settings.answer_words + 24, batch_size=128)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
def stage_sft(settings: DemoSettings, out: Path) -> Path:
    """Random-init model (+ perception pretraining, v2), or `sft_init`'s model, + supervised fine-tuning
    on biased captions -> out/sft."""
    from ddpo.data.synthetic.language import build_tokenizer
    from ddpo.lab.sft import PerceptionSettings, SFTSettings, pretrain_perception, sft
    from ddpo.models.build import build_model

    cfg = _train_config(settings)
    torch.manual_seed(settings.seed)
    scenes, images, prompts, captions = split(settings, "sft", settings.sft_examples)
    perception_losses: list[float] = []
    if settings.sft_init:
        model = load_model(settings.sft_init)
        model.apply_freezing(True, False, False)  # the tower stays as the first SFT left it
    else:
        # the config's freezing is for the preference runs; supervised fine-tuning trains every part
        model_cfg = dataclasses.replace(cfg.model, freeze_vision_tower=False, freeze_projector=False, freeze_llm=False)
        model = build_model(model_cfg, tokenizer=build_tokenizer(synthetic_config(settings).world))
    if settings.perception_steps > 0 and not settings.sft_init:
        world = synthetic_config(settings).world
        targets, classes = cell_targets(scenes, world, model.num_image_tokens)
        perception_losses = pretrain_perception(
            model, images, targets, classes, PerceptionSettings(steps=settings.perception_steps, seed=settings.seed)
        )
        logger.info(
            "perception pretraining: loss %.3f -> %.3f over %d steps",
            perception_losses[0],
            sum(perception_losses[-20:]) / len(perception_losses[-20:]),
            len(perception_losses),
        )
        model.apply_freezing(True, False, False)  # then, as LLaVA keeps its CLIP tower, the tower stays as pretrained
    bar = progress_bar(total=settings.sft_steps, desc="sft")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    losses = sft(
        model,
        images,
        prompts,
        captions,
        SFTSettings(
            steps=settings.sft_steps,
            batch_size=settings.sft_batch_size,
            learning_rate=settings.sft_learning_rate,
            template=cfg.data.template,
            seed=settings.seed,
        ),
        on_step=on_step,
    )
    bar.close()
    model.save_pretrained(out / "sft")
    (out / "sft" / "sft_losses.json").write_text(json.dumps(losses))
    (out / "sft" / "perception_losses.json").write_text(json.dumps(perception_losses))
    return out / "sft"


def cell_targets(scenes, world, image_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Per image token (one per grid cell, row-major: needs patch = cell, 9 tokens), the shape and the
    colour of the object in its cell (0 = empty): [n, 9, 2] and the class counts."""
    from ddpo.data.synthetic.world import GRID

    if image_tokens != GRID * GRID:
        raise ValueError(
            f"perception pretraining labels one image token per grid cell, so it needs {GRID * GRID} image "
            f"tokens (model.patch_size = image_size / 3); this model has {image_tokens}; "
            f"set perception_steps 0 or the patch size"
        )
    targets = torch.zeros(len(scenes), GRID * GRID, 2, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            targets[i, o.cell[0] * GRID + o.cell[1]] = torch.tensor(
                [world.shapes.index(o.shape) + 1, world.colors.index(o.color) + 1]
            )
    return targets, [len(world.shapes) + 1, len(world.colors) + 1]


def loss_plateau(losses: Sequence[float]) -> dict:
    """Mean SFT loss over each tenth of training: a flat last stretch says training converged."""
    n = max(1, len(losses) // 10)
    tenths = [sum(losses[i : i + n]) / len(losses[i : i + n]) for i in range(0, len(losses) - n + 1, n)][:10]
    return {
        "loss_by_tenth": [round(v, 4) for v in tenths],
        "last_tenth_change": round(tenths[-1] - tenths[-2], 4) if len(tenths) > 1 else None,
    }


def single_object_scenes(world):
    """Every one-object scene of the world: each shape x colour x cell, one size, no jitter."""
    from ddpo.data.synthetic.language import POSITIONS
    from ddpo.data.synthetic.world import Scene, WorldObject

    return [
        Scene((WorldObject(shape, color, world.sizes[-1], cell),))
        for shape in world.shapes
        for color in world.colors
        for cell in POSITIONS
    ]


def perception_gate(model, settings: DemoSettings, template: str) -> dict:
    """The gate's figures (data/synthetic/metrics.py gate_figures) from greedy answers on every
    one-object image and on the held-out "gate" scenes, with pass/fail per figure."""
    from ddpo.data.synthetic.language import PROMPTS
    from ddpo.data.synthetic.metrics import gate_figures
    from ddpo.data.synthetic.world import render

    cfg = synthetic_config(settings)
    singles = single_object_scenes(cfg.world)[:: settings.gate_single_stride]
    prompts = [PROMPTS["detailed"][i % len(PROMPTS["detailed"])] for i in range(len(singles))]
    single_answers = model.generate(
        [render(sc, cfg.world) for sc in singles], prompts, **generation_options(settings, template)
    )
    scenes, images, prompts, _ = split(settings, "gate", settings.gate_images)
    answers = model.generate(images, prompts, **generation_options(settings, template))
    figures = gate_figures(singles, single_answers, scenes, answers, cfg.world.partners, cfg.empty_cells)
    thresholds = {
        "single_object_accuracy": settings.gate_single_object,
        "recall_without_anchor": settings.gate_recall_without_anchor,
        "companion_rate": settings.gate_companion_rate,
    }
    failed = [f"{name} {figures[name]:.3f} < {bound}" for name, bound in thresholds.items() if figures[name] < bound]
    return {
        **figures,
        "thresholds": thresholds,
        "passed": not failed,
        "failed": failed,
        "examples": [{"scene": str(sc.objects), "answer": a} for sc, a in list(zip(scenes, answers))[:3]],
    }


def stage_gate(settings: DemoSettings, out: Path) -> dict:
    """The perception gate of the SFT model -> out/gate.json; raises GateError when it misses (if enforced)."""
    gate = perception_gate(load_model(out / "sft"), settings, _train_config(settings).data.template)
    losses = json.loads((out / "sft" / "sft_losses.json").read_text())
    gate["sft_loss"] = loss_plateau(losses)
    (out / "gate.json").write_text(json.dumps(gate, indent=2))
    logger.info("perception gate: %s", gate_line(gate))
    if not gate["passed"] and settings.enforce_gate:
        perception = any(not f.startswith("companion_rate") for f in gate["failed"])
        why = (
            "It cannot see what it names, so preference learning on objects would test nothing; train it longer "
            "(sft_steps) or check the world."
            if perception
            else "It sees, but names too few absent companions: too little prior-driven hallucination for preference "
            "learning to fix; strengthen the captions' prior (priors) or check the world."
        )
        raise GateError(
            f"the SFT model misses the perception gate: {'; '.join(gate['failed'])} (figures in {out / 'gate.json'}). {why}"
        )
    return gate


def gate_line(gate: dict) -> str:
    return (
        f"single-object accuracy {gate['single_object_accuracy']:.3f}, recall without anchor "
        f"{gate['recall_without_anchor']:.3f}, companion rate {gate['companion_rate']:.3f} -> "
        f"{'passed' if gate['passed'] else 'MISSED: ' + '; '.join(gate['failed'])}"
    )


def stage_sample(settings: DemoSettings, out: Path) -> Path:
    """The SFT model describes the preference images (sampled, seeded) -> out/pairs/answers.jsonl."""
    model = load_model(out / "sft")
    cfg = _train_config(settings)
    scenes, images, prompts, _ = split(settings, "preference", settings.preference_images)
    answers = model.generate(
        images,
        prompts,
        do_sample=True,
        temperature=settings.sample_temperature,
        seed=settings.seed,
        **generation_options(settings, cfg.data.template),
    )
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    with open(out / "pairs" / "answers.jsonl", "w", encoding="utf-8") as f:
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            f.write(json.dumps({"index": i, "prompt": prompt, "answer": answer}) + "\n")
    return out / "pairs" / "answers.jsonl"


def stage_annotate(settings: DemoSettings, out: Path) -> Path:
    """Oracle corrections -> JSONL + image folder (data.format jsonl), at most `max_pairs` pairs."""
    from ddpo.data.synthetic.pairs import records_from_answers

    scenes, images, prompts, _ = split(settings, "preference", settings.preference_images)
    answers = [json.loads(line)["answer"] for line in (out / "pairs" / "answers.jsonl").read_text().splitlines()]
    records, stats = records_from_answers(
        scenes, images, prompts, answers, source="demo", empty_cells=synthetic_config(settings).empty_cells
    )
    records = records[: settings.max_pairs]
    stats["pairs_used"] = len(records)
    image_dir = out / "pairs" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs" / "train.jsonl.tmp", "w", encoding="utf-8") as f:
        for r in records:
            name = f"{r.row_index:05d}.png"
            r.images[0].save(image_dir / name)
            row = {"idx": r.idx, "image": name, "question": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            if r.rejected_severity:  # the oracle's corrections by type (loss.token_weights 'severity')
                row["rejected_severity"] = [list(span) for span in r.rejected_severity]
            f.write(json.dumps(row) + "\n")
    (out / "pairs" / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "pairs" / "train.jsonl.tmp").replace(out / "pairs" / "train.jsonl")
    logger.info("annotated %d answers -> %d pairs (%s)", stats["answers"], len(records), stats)
    return out / "pairs" / "train.jsonl"


def train_config(settings: DemoSettings, out: Path, run_dir: Path, overrides: dict):
    """The `ddpo train` config of one method: the SFT model, the point's pairs, the shared reference
    cache (its fingerprint ignores gamma and the normalisation: they act on cached tokens), then the
    method's own `section.field -> value` overrides."""
    cache = out / "reference_cache" / f"pairs-{overrides.get('data.max_samples', 'all')}"
    return _train_config(
        settings,
        "--model.name_or_path",
        str(out / "sft"),
        "--data.format",
        "jsonl",
        "--data.path",
        str(out / "pairs" / "train.jsonl"),
        "--data.image_dir",
        str(out / "pairs" / "images"),
        "--train.output_dir",
        str(run_dir),
        "--train.seed",
        str(settings.seed),
        "--train.reference_cache",
        str(cache),
        "--train.num_threads",
        str(settings.num_threads),
        *settings.train_overrides,
        *[arg for key, value in overrides.items() for arg in (f"--{key}", str(value))],
    )


class DriftProbe(TrainerCallback):
    """Logs the policy's drift from the SFT model during training: the mean per-token log-ratio
    log pi - log pi_sft on the SFT model's greedy answers to the first validation images, at the
    first step and then every `every` steps (and the last) -> run_dir/drift.jsonl."""

    def __init__(self, prompts, answers, images, reference_logps, template: str, every: int, path: Path):
        self.prompts, self.answers, self.images = prompts, answers, images
        self.reference_logps, self.template, self.every, self.path = reference_logps, template, every, path

    def on_log(self, trainer, record: dict) -> None:
        if trainer.step != 1 and trainer.step % self.every and trainer.step != trainer.total_steps:
            return
        model = trainer.model
        was_training = model.training
        model.eval()
        value = drift(
            answer_token_logps(model, self.prompts, self.answers, self.images, self.template), self.reference_logps
        )
        model.train(was_training)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.step, "drift": value}) + "\n")


def stage_train(settings: DemoSettings, out: Path) -> dict[str, Path]:
    """`ddpo train` once per method, same SFT model, same pairs, in this process; each run's drift
    from the SFT model is probed 8 times during training (DriftProbe)."""
    from ddpo.trainer import Trainer

    template = _train_config(settings).data.template
    _, images, prompts, _ = split(settings, "val", min(settings.val_images, settings.drift_images))
    sft_model = load_model(out / "sft")
    answers = sft_model.generate(images, prompts, **generation_options(settings, template))
    reference = answer_token_logps(sft_model, prompts, answers, images, template)
    finals = {}
    for method, overrides in settings.methods.items():
        run = out / "runs" / method
        finals[method] = run / "final"
        if (run / "final").is_dir():
            continue
        logger.info("training %s (%s)", method, overrides)
        trainer = Trainer(train_config(settings, out, run, overrides))
        trainer.setup()
        (run / "drift.jsonl").unlink(missing_ok=True)
        probe = DriftProbe(
            prompts, answers, images, reference, template, max(1, trainer.total_steps // 8), run / "drift.jsonl"
        )
        trainer.callbacks.append(probe)
        trainer.train()
    return finals


def evaluate_model(
    model, settings: DemoSettings, split_name: str, n: int, template: str, temperature: float | None = None
) -> tuple[dict, list[str]]:
    """Metrics of `model`'s answers on a split: greedy, or sampled at `temperature` (seeded)."""
    from ddpo.data.synthetic.metrics import evaluate

    cfg = synthetic_config(settings)
    scenes, images, prompts, _ = split(settings, split_name, n)
    sampling = {} if temperature is None else dict(do_sample=True, temperature=temperature, seed=settings.seed + 7)
    answers = model.generate(images, prompts, **generation_options(settings, template), **sampling)
    return evaluate(scenes, answers, cfg.world.partners, cfg.empty_cells), answers


def answer_token_logps(
    model, prompts: Sequence[str], answers: Sequence[str], images, template: str, batch_size: int = 64
) -> list[torch.Tensor]:
    """Per-token log-probs of each answer given its image and prompt (one 1-d tensor per answer)."""
    from ddpo.data.collator import collate_sequences, encode_sequences
    from ddpo.data.records import IGNORE_INDEX

    encoded = encode_sequences(model.tokenizer, template, model.image_placeholder, prompts, answers)
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            ids, mask, labels = collate_sequences(encoded[i : i + batch_size], model.tokenizer.pad_token_id)
            pixels = model.preprocess_images(images[i : i + batch_size]).to(model.dtype)
            logps = model.sequence_token_logps(ids, mask, labels, pixels)
            keep = labels[:, 1:] != IGNORE_INDEX
            out += [row[k] for row, k in zip(logps, keep)]
    return out


def drift(policy_logps: Sequence[torch.Tensor], reference_logps: Sequence[torch.Tensor]) -> float:
    """Mean per-token log-ratio log pi(y_t) - log pi_ref(y_t), pooled over all answer tokens."""
    diff = torch.cat([p - r for p, r in zip(policy_logps, reference_logps)])
    return float(diff.mean())


def stage_eval(settings: DemoSettings, out: Path, timings: dict) -> dict:
    """Greedy (validation, test) and sampled (test) answers of every method -> results.{json,md,png},
    with each policy's drift from the SFT model on the SFT model's greedy validation answers."""
    cfg = _train_config(settings)
    template = cfg.data.template
    models = {"sft": out / "sft", **{m: out / "runs" / m / "final" for m in settings.methods}}
    results: dict = {"methods": {}, "validation": {}, "sampled": {}, "drift": {}, "samples": {}}
    _, val_images, val_prompts, _ = split(settings, "val", settings.val_images)
    # a model's metrics are kept beside it (eval.json) and reused while the world, the splits and the SFT
    # model (the drift's yardstick) that made them are the same, so a study that adds runs to a point
    # evaluates only the new ones
    key = {
        "world": [settings.world_version, settings.world, settings.priors],
        "seed": settings.seed,
        "answer_words": settings.answer_words,
        "val_images": settings.val_images,
        "test_images": 0 if settings.validation_only else settings.test_images,
        "sampled": None if settings.validation_only or not settings.sampled_eval else settings.sampled_eval_temperature,
        "sft": (out / "sft" / "ddpo_model.json").stat().st_mtime_ns,
    }
    key = json.loads(json.dumps(key))  # as it reads back from eval.json (tuples become lists)
    # the drift's yardstick: the SFT model (first in `models`) on its own greedy validation answers; its
    # log-probs are computed only when a run has to be evaluated
    sft_model, reference_answers, reference_logps = None, None, None
    for method, path in models.items():
        cache = path / "eval.json"
        done = json.loads(cache.read_text()) if cache.is_file() else {}
        if done.get("key") != key:
            model = load_model(path)
            done = {"key": key}
            done["validation"], done["val_answers"] = evaluate_model(
                model, settings, "val", settings.val_images, template
            )
            if key["test_images"]:
                done["methods"], answers = evaluate_model(model, settings, "test", settings.test_images, template)
                done["samples"] = answers[:5]
            if key["sampled"] is not None:
                done["sampled"], _ = evaluate_model(
                    model, settings, "test", settings.test_images, template, key["sampled"]
                )
            if method == "sft":
                done["drift"], sft_model = 0.0, model
            else:
                if reference_logps is None:
                    reference_logps = answer_token_logps(
                        sft_model or load_model(models["sft"]), val_prompts, reference_answers, val_images, template
                    )
                done["drift"] = drift(
                    answer_token_logps(model, val_prompts, reference_answers, val_images, template), reference_logps
                )
            cache.write_text(json.dumps(done))
        if method == "sft":
            reference_answers = done["val_answers"]
        for table in ("validation", "methods", "sampled", "samples", "drift"):
            if table in done:
                results[table][method] = done[table]
    results["train_steps"] = {
        m: json.loads((out / "runs" / m / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        for m in settings.methods
        if (out / "runs" / m / "metrics.jsonl").is_file()
    }
    results["drift_during_training"] = {
        m: [json.loads(line) for line in (out / "runs" / m / "drift.jsonl").read_text().splitlines()]
        for m in settings.methods
        if (out / "runs" / m / "drift.jsonl").is_file()
    }
    if (out / "gate.json").is_file():
        results["gate"] = json.loads((out / "gate.json").read_text())
    results["pairs"] = json.loads((out / "pairs" / "stats.json").read_text())
    results["settings"] = asdict(settings)
    results["train_config"] = cfg.to_dict()
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if not settings.validation_only:
        (out / "results.md").write_text(results_table(results))
        plot(results, out / "results.png")
    return results


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def results_table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Synthetic hallucination benchmark, world {s.get('world_version', 'v1')} (seed {s['seed']}, {s['test_images']} test "
        f"images; {results['pairs']['pairs_used']} preference pairs, DDPO gamma {s['ddpo_gamma']})",
        "",
    ]
    if "gate" in results:
        lines += [f"Perception gate (SFT, greedy): {gate_line(results['gate'])}", ""]
    header = (
        "| method | decoding | response hallucination | mention hallucination | companion rate | non-target mentions "
        "| object recall | words / answer | drift |"
    )
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    for decoding, table in (
        ("greedy", results["methods"]),
        (f"T {s.get('sampled_eval_temperature', 0.7)}", results.get("sampled", {})),
    ):
        for method, m in table.items():
            d = results.get("drift", {}).get(method)
            lines.append(
                f"| {method} | {decoding} | {m['response_hallucination_rate']:.3f} | {m['mention_hallucination_rate']:.3f} | "
                f"{m.get('companion_rate', float('nan')):.3f} | {m.get('nontarget_mention_rate', float('nan')):.3f} | "
                f"{m['object_recall']:.3f} | {m['mean_response_words']:.1f} | {'' if d is None else f'{d:+.3f}'} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a nicety; the numbers are in results.json/md
        logger.warning("matplotlib is not installed: no plot written")
        return None
    methods = list(results["methods"])
    names = ("response_hallucination_rate", "mention_hallucination_rate", "object_recall")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, name in zip(axes, names):
        values = [results["methods"][m][name] for m in methods]
        ax.bar(methods, values, color=["#999999", "#4c72b0", "#dd8452"][: len(methods)])
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 1)
        for i, v in enumerate(values):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def run(settings: DemoSettings, stages: Sequence[str] = STAGES, force: bool = False) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars would bury the stage bars
    torch.set_num_threads(settings.num_threads)
    torch.set_flush_denormal(True)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {
        "sft": lambda: (out / "sft" / "ddpo_model.json").is_file(),
        "gate": lambda: (
            (out / "gate.json").is_file()
            and (json.loads((out / "gate.json").read_text())["passed"] or not settings.enforce_gate)
        ),
        "sample": lambda: (out / "pairs" / "answers.jsonl").is_file(),
        "annotate": lambda: (out / "pairs" / "train.jsonl").is_file(),
        "train": lambda: all((out / "runs" / m / "final").is_dir() for m in settings.methods),
        "eval": lambda: False,
    }
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    results: dict = {}
    for stage in STAGES:
        if stage not in stages or (done[stage]() and not force):
            continue
        started = time.perf_counter()
        logger.info("stage %s", stage)
        if stage == "eval":
            results = stage_eval(settings, out, timings)
        else:
            {
                "sft": stage_sft,
                "gate": stage_gate,
                "sample": stage_sample,
                "annotate": stage_annotate,
                "train": stage_train,
            }[stage](settings, out)
        timings[stage] = round(time.perf_counter() - started, 1)
        timings_file.write_text(json.dumps(timings, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpo demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    parser.add_argument(
        "--quick", action="store_true", help="a CI-sized smoke run (about a minute); numbers are meaningless"
    )
    parser.add_argument("--gamma", type=float, default=None, help="DDPO's gamma (default: the demo's 5)")
    parser.add_argument("--max-pairs", type=int, default=None, help="cap on preference pairs (default 1400)")
    parser.add_argument("--train-config", default=None, help="ddpo train YAML for the DPO/DDPO runs")
    parser.add_argument(
        "--world",
        choices=("v2", "v1"),
        default="v2",
        help="v2: language priors (default); v1: the misperception world, the negative control",
    )
    args = parser.parse_args(argv)
    overrides = {"output_dir": args.output_dir, "seed": args.seed}
    if args.gamma is not None:
        overrides["ddpo_gamma"] = args.gamma
    if args.max_pairs is not None:
        overrides["max_pairs"] = args.max_pairs
    if args.train_config is not None:
        overrides["train_config"] = args.train_config
    if args.quick:
        settings = DemoSettings.quick(world_version=args.world, **overrides)
    else:
        settings = DemoSettings.v1(**overrides) if args.world == "v1" else DemoSettings(**overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        results = run(settings, stages, force=args.force)
    except GateError as error:
        print(f"ddpo demo: {error}", file=sys.stderr)
        return 2
    if results:
        print()
        print(results_table(results))
        print(f"wrote {Path(settings.output_dir) / 'results.json'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
