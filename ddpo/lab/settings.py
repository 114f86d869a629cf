"""One lab run's settings (`DemoSettings`) and what follows from them alone: the `ddpo train` config of
a run and the generation options of every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddpo.models.base import GenerationOptions

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "synthetic"


@dataclass
class DemoSettings:
    """Sizes of one lab run (`ddpo demo` and every study over it); `quick` shrinks them to a CI-sized
    smoke run, `v1` gives the misperception world's own recipe."""

    output_dir: str = "demo_output"
    seed: int = 0
    # "v2": language priors (default); "v1": the misperception world (negative control, `v1()`)
    world_version: str = "v2"
    train_config: str = str(CONFIGS / "demo.yaml")
    answer_words: int = 55  # target length of the detailed descriptions (RLHF-V answers: ~64 words)
    sft_examples: int = 8000
    # 1500 (lab v3; was 1000): at 1000 seed 0's loss was still falling, and its multi-object position accuracy
    # rose 0.967 -> 0.986 with the longer run (experiments/results/lab_v3/NOTES.md)
    sft_steps: int = 1500
    sft_batch_size: int = 32
    # with the tower pretrained and frozen, 2e-3 converges faster than 1e-3 (loss 0.226 vs 0.262)
    sft_learning_rate: float = 2e-3
    # steps of perception pretraining before SFT (v2): the vision tower and projector learn to tell each
    # cell's shape and colour, as an MLLM starts from a pretrained CLIP tower; 0 = none (v1)
    perception_steps: int = 300
    # perception pretraining redraws the tower's position embeddings (at perception_position_std) and also labels
    # each image token with its own cell, so the frozen tower's features say where they are (lab v3: without it
    # they carried no cell identity and the SFT model named the wrong cell for objects it saw;
    # experiments/results/lab_v3/NOTES.md)
    perception_positions: bool = True
    # the std those position embeddings start at (a pretrained CLIP tower's are O(1)): 1 left seed 0's SFT model
    # unsure which cell held which object in 3 runs of 4 (multi-object position accuracy 0.91-0.99); 3 gave 0.989
    perception_position_std: float = 3.0
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
    # per kind (shape, colour, position, count), on one-object images and on the gate scenes: named right outside
    # the captions' prior contexts, at least (a model that misperceives a kind cannot be taught it by pairs)
    gate_kind_accuracy: float = 0.95
    # per kind, the SFT model's error on the gate scenes over its captions' (greedy decoding turns a prior above
    # 0.5 into a certainty, so up to 1 / 0.6 = 1.7x is the prior itself; more is the model's own misreading)
    gate_error_ratio: float = 2.0
    enforce_gate: bool = True  # stop the demo when the SFT model misses the gate (off for the v1 negative control)
    sampled_eval_temperature: float = 0.7  # the sampled evaluation's temperature (next to greedy)
    sampled_eval: bool = True  # also evaluate sampled test answers (off: greedy only, half the eval time)
    # share of unparsed answers above which an evaluation raises UnparsedError instead of scoring (< 1)
    max_unparsed: float = 0.05
    drift_images: int = 64  # validation images whose SFT answers probe the drift during training
    validation_only: bool = False  # evaluate on the validation split only (hyper-parameter searches: no test number)
    # record a trained arm whose answers are unparsed as unscorable and go on (a validation grid always does;
    # a study whose analysis has a rule for unscored arms); off, it raises UnparsedError
    record_unscorable: bool = False
    preference_images: int = 1600  # held-out images whose sampled answers get corrected
    sample_temperature: float = 0.7  # RLAIF-V samples at 0.7; at 1.0 answers drift far from greedy ones
    max_pairs: int = 1400  # the paper's 1.4k; fewer if fewer sampled answers hallucinate
    val_images: int = 300
    test_images: int = 600
    # the annotator's departures from minimal, clean, replace-only corrections (data/synthetic/annotator.py
    # AnnotatorStyle: miss_prob, wrong_fix_prob, delete_prob, rewrite_prob); default its HUMAN_LIKE rates,
    # {} = the minimal oracle (v1 and the studies before lab v3)
    annotator: dict = field(default_factory=lambda: human_like_rates())
    ddpo_gamma: float = 5.0
    world: dict = field(default_factory=dict)  # WorldConfig overrides on top of the demo world (e.g. max_objects)
    noise: dict = field(default_factory=dict)  # NoiseConfig overrides of the SFT captions' biases
    # name -> `ddpo train` overrides of that run; every run starts from the same SFT model and pairs.
    # Default: vanilla DPO (gamma 1) and DDPO (gamma = ddpo_gamma).
    methods: dict | None = None
    train_overrides: list = field(default_factory=list)  # extra `--section.field VALUE` for every run
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
            max_unparsed=0.99,  # a barely trained model writes many unreadable sentences; still scored
            train_overrides=["--train.micro_batch_size", "4"],
        )
        if overrides.get("world_version") == "v1":
            small.update(answer_words=15, train_config=str(CONFIGS / "demo_v1.yaml"), perception_steps=0, annotator={})
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
            train_config=str(CONFIGS / "demo_v1.yaml"),
            enforce_gate=False,
            annotator={},
        )
        return cls(**{**old, **overrides})


def human_like_rates() -> dict:
    """The human-like annotator's rates (annotator.HUMAN_LIKE) as a settings dict."""
    from dataclasses import asdict

    from ddpo.data.synthetic.annotator import HUMAN_LIKE

    return asdict(HUMAN_LIKE)


def base_config(settings: DemoSettings, *overrides: str):
    """The lab's `ddpo train` config (`settings.train_config`) with `--section.field VALUE` overrides."""
    from ddpo.config import load_config

    return load_config(settings.train_config, list(overrides))


def train_config(settings: DemoSettings, out: Path, run_dir: Path, overrides: dict):
    """The `ddpo train` config of one run: the SFT model, the point's pairs, the shared reference cache
    (its fingerprint ignores gamma and the normalisation: they act on cached tokens), then the run's own
    `section.field -> value` overrides."""
    cache = out / "reference_cache" / f"pairs-{overrides.get('data.max_samples', 'all')}"
    return base_config(
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


def generation_options(settings: DemoSettings, template: str) -> GenerationOptions:
    """Greedy decoding of the lab's answers (`dataclasses.replace` it to sample): room for twice the target
    length (answers run long before training converges) and large batches (the models are tiny)."""
    return GenerationOptions(template=template, max_new_tokens=2 * settings.answer_words + 24, batch_size=128)
