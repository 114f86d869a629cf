"""The lab's pipeline, one function per stage: world -> SFT -> gate -> sample -> annotate -> train ->
evaluate. Each stage writes its artifacts under the run's directory and `run` skips a stage whose
artifacts exist, so an interrupted run resumes where it stopped.

  sft       a random-init LLaVA-style model (+ perception pretraining, v2), or `sft_init`'s model,
            learns to describe procedural images from captions that carry the world's biases -> sft/
  gate      the perception gate on held-out images, greedy (ddpo/lab/gate.py)             -> gate.json
  sample    the SFT model describes held-out images (temperature sampling)              -> pairs/answers.jsonl
  annotate  an oracle corrects each hallucinated answer minimally; chosen = corrected,
            rejected = original; JSONL + image folder                                   -> pairs/train.jsonl
  train     `ddpo train` once per run of `settings.methods`, all from the same SFT model on the same
            pairs; the trainer finds the corrected segments by diffing the two answers     -> runs/<name>/
  eval      greedy and sampled answers on the validation and test images, and each model's drift
            from the SFT model (ddpo/lab/evaluation.py); cached per model in eval.json  -> results.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ddpo.data.synthetic.metrics import UnparsedError
from ddpo.lab.evaluation import LOGPS_BATCH, DriftProbe, drift, evaluate_model
from ddpo.lab.gate import gate_error, gate_line, loss_plateau, perception_gate
from ddpo.lab.report import plot_method_bars, results_table
from ddpo.lab.settings import DemoSettings, base_config, generation_options, train_config
from ddpo.lab.world import cell_targets, split, synthetic_config
from ddpo.models.base import answer_token_logps
from ddpo.models.build import load_model
from ddpo.progress import progress_bar

logger = logging.getLogger("ddpo.lab")
STAGES = ("sft", "gate", "sample", "annotate", "train", "eval")
# bumped when the evaluation gains or changes figures (3: RLHF-V Table 3's per-kind response rates), so that
# each model's cached eval.json is recomputed instead of read without them
METRICS_VERSION = 3
ANNOTATOR_SEED_OFFSET = 6  # the human-like annotator's draws: seed * 100 + 6, next to the splits' offsets 1-5


# ------------------------------------------------------------------------------------------------
# sft, gate, sample, annotate
# ------------------------------------------------------------------------------------------------
def initial_model(settings: DemoSettings, scenes, images):
    """The model SFT starts from: `sft_init`'s (its tower frozen as the first SFT left it), or a random
    init whose tower and projector first learn to see (perception pretraining, v2) and then stay frozen,
    as LLaVA keeps its CLIP tower. Returns (model, perception losses)."""
    from ddpo.data.synthetic.language import build_tokenizer
    from ddpo.lab.sft import PerceptionSettings, pretrain_perception
    from ddpo.models.build import build_model

    if settings.sft_init:
        model = load_model(settings.sft_init)
        model.apply_freezing(True, False, False)
        return model, []
    cfg = base_config(settings)
    world = synthetic_config(settings).world
    # the config's freezing is for the preference runs; supervised fine-tuning trains every part
    model_cfg = dataclasses.replace(cfg.model, freeze_vision_tower=False, freeze_projector=False, freeze_llm=False)
    model = build_model(model_cfg, tokenizer=build_tokenizer(world))
    if settings.perception_steps <= 0:
        return model, []
    targets, classes = cell_targets(scenes, world, model.num_image_tokens, settings.perception_positions)
    perception = PerceptionSettings(
        steps=settings.perception_steps,
        seed=settings.seed,
        position_std=settings.perception_position_std if settings.perception_positions else None,
    )
    losses = pretrain_perception(model, images, targets, classes, perception)
    logger.info(
        "perception pretraining: loss %.3f -> %.3f over %d steps",
        losses[0],
        sum(losses[-20:]) / len(losses[-20:]),
        len(losses),
    )
    model.apply_freezing(True, False, False)
    return model, losses


def stage_sft(settings: DemoSettings, out: Path) -> Path:
    """The starting model (`initial_model`) + supervised fine-tuning on biased captions -> out/sft."""
    from ddpo.lab.sft import SFTSettings, sft

    cfg = base_config(settings)
    torch.manual_seed(settings.seed)
    scenes, images, prompts, captions = split(settings, "sft", settings.sft_examples)
    model, perception_losses = initial_model(settings, scenes, images)
    bar = progress_bar(total=settings.sft_steps, desc="sft")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    sft_settings = SFTSettings(
        steps=settings.sft_steps,
        batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate,
        template=cfg.data.template,
        seed=settings.seed,
    )
    losses = sft(model, images, prompts, captions, sft_settings, on_step=on_step)
    bar.close()
    model.save_pretrained(out / "sft")
    (out / "sft" / "sft_losses.json").write_text(json.dumps(losses))
    (out / "sft" / "perception_losses.json").write_text(json.dumps(perception_losses))
    return out / "sft"


def stage_gate(settings: DemoSettings, out: Path) -> dict:
    """The perception gate of the SFT model -> out/gate.json; raises GateError when it misses (if enforced)."""
    gate = perception_gate(load_model(out / "sft"), settings, base_config(settings).data.template)
    losses = json.loads((out / "sft" / "sft_losses.json").read_text())
    gate["sft_loss"] = loss_plateau(losses)
    (out / "gate.json").write_text(json.dumps(gate, indent=2))
    logger.info("perception gate: %s", gate_line(gate))
    if not gate["passed"] and settings.enforce_gate:
        raise gate_error(gate, str(out / "gate.json"))
    return gate


def stage_sample(settings: DemoSettings, out: Path) -> Path:
    """The SFT model describes the preference images (sampled, seeded) -> out/pairs/answers.jsonl."""
    model = load_model(out / "sft")
    cfg = base_config(settings)
    scenes, images, prompts, _ = split(settings, "preference", settings.preference_images)
    options = dataclasses.replace(
        generation_options(settings, cfg.data.template),
        do_sample=True,
        temperature=settings.sample_temperature,
        seed=settings.seed,
    )
    answers = model.generate(images, prompts, options)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    with open(out / "pairs" / "answers.jsonl", "w", encoding="utf-8") as f:
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            f.write(json.dumps({"index": i, "prompt": prompt, "answer": answer}) + "\n")
    return out / "pairs" / "answers.jsonl"


def stage_annotate(settings: DemoSettings, out: Path) -> Path:
    """Oracle corrections -> JSONL + image folder (data.format jsonl), at most `max_pairs` pairs."""
    from ddpo.data.synthetic.annotator import AnnotatorStyle
    from ddpo.data.synthetic.pairs import records_from_answers

    scenes, images, prompts, _ = split(settings, "preference", settings.preference_images)
    answers = [json.loads(line)["answer"] for line in (out / "pairs" / "answers.jsonl").read_text().splitlines()]
    records, stats = records_from_answers(
        scenes,
        images,
        prompts,
        answers,
        source="demo",
        empty_cells=synthetic_config(settings).empty_cells,
        style=AnnotatorStyle(**settings.annotator) if settings.annotator else None,
        seed=settings.seed * 100 + ANNOTATOR_SEED_OFFSET,
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


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def stage_train(settings: DemoSettings, out: Path) -> dict[str, Path]:
    """`ddpo train` once per method, same SFT model, same pairs, in this process; each run's drift
    from the SFT model is probed 8 times during training (DriftProbe)."""
    from ddpo import run_identity
    from ddpo.trainer import Trainer

    template = base_config(settings).data.template
    _, images, prompts, _ = split(settings, "val", min(settings.val_images, settings.drift_images))
    sft_model = load_model(out / "sft")
    answers = sft_model.generate(images, prompts, generation_options(settings, template))
    reference = answer_token_logps(sft_model, images, prompts, answers, template, batch_size=LOGPS_BATCH)
    probe = {"images": images, "prompts": prompts, "answers": answers, "template": template}
    finals = {}
    for method, overrides in settings.methods.items():
        run_dir = out / "runs" / method
        finals[method] = run_dir / "final"
        cfg = train_config(settings, out, run_dir, overrides)
        # a finished run is reused only when its config is this one; else the trainer refuses, naming the fields
        if (run_dir / "final").is_dir() and not run_identity.assess(run_dir, cfg).differences:
            continue
        logger.info("training %s (%s)", method, overrides)
        trainer = Trainer(cfg)
        trainer.setup()
        (run_dir / "drift.jsonl").unlink(missing_ok=True)
        trainer.callbacks.append(
            DriftProbe(probe, reference, max(1, trainer.total_steps // 8), run_dir / "drift.jsonl")
        )
        trainer.train()
    return finals


def train_with_sweep(settings: DemoSettings, out: Path) -> None:
    """The train stage through the sweep launcher instead (inline: one process, no start-up per run),
    without the drift probe: one resolved config.yaml per run under out/runs/<name>; finished runs
    skipped, interrupted ones resumed."""
    from ddpo import sweep
    from ddpo.config import save_config

    base = out / "runs" / "base.yaml"
    base.parent.mkdir(parents=True, exist_ok=True)
    save_config(train_config(settings, out, out / "runs", {}), base)
    spec = sweep.SweepSpec(
        base=str(base), output_dir=out / "runs", grid={}, seeds=None, overrides={}, eval_files=[], plot_metrics=[]
    )
    points = [
        sweep.Point(m, dict(overrides), out / "runs" / m)
        for m, overrides in settings.methods.items()
        if not (out / "runs" / m / "final").is_dir()
    ]
    sweep.write_configs(spec, points)
    failed = sweep.launch(
        spec, points, lambda p: sweep.command(p, "inline"), dry_run=False, world_size=None, inline=True
    )
    if failed:
        raise RuntimeError(
            f"{out}: run(s) {', '.join(failed)} failed (see their train.log); rerun the same command to resume"
        )


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
class _Yardstick:
    """The drift's yardstick: the SFT model on its own greedy validation answers. Its log-probs are
    computed only when a run has to be evaluated, so a full cache hit loads no model."""

    def __init__(self, settings: DemoSettings, sft_path: Path, template: str):
        _, self.images, self.prompts, _ = split(settings, "val", settings.val_images)
        self.sft_path, self.template = sft_path, template
        self.answers: list[str] | None = None
        self.model = None
        self._logps = None

    def logps(self, model) -> list[torch.Tensor]:
        return answer_token_logps(model, self.images, self.prompts, self.answers, self.template, batch_size=LOGPS_BATCH)

    def drift_of(self, model) -> float:
        if self._logps is None:
            self._logps = self.logps(self.model or load_model(self.sft_path))
        return drift(self.logps(model), self._logps)


def eval_key(settings: DemoSettings, out: Path) -> dict:
    """What a model's cached metrics (eval.json) depend on: the world, the splits and the SFT model
    (the drift's yardstick). A study that adds runs to a point evaluates only the new ones."""
    key = {
        "metrics": METRICS_VERSION,
        "world": [settings.world_version, settings.world, settings.priors],
        "seed": settings.seed,
        "answer_words": settings.answer_words,
        "val_images": settings.val_images,
        "test_images": 0 if settings.validation_only else settings.test_images,
        "sampled": None if settings.validation_only or not settings.sampled_eval else settings.sampled_eval_temperature,
        "sft": (out / "sft" / "ddpo_model.json").stat().st_mtime_ns,
    }
    return json.loads(json.dumps(key))  # as it reads back from eval.json (tuples become lists)


def evaluate_saved_model(settings: DemoSettings, path: Path, method: str, key: dict, yardstick: _Yardstick) -> dict:
    """The eval.json content of the model at `path`: validation (and test, greedy and sampled) metrics
    and its drift from the SFT model (0 for the SFT model itself)."""
    model = load_model(path)
    template = yardstick.template
    done = {"key": key}
    done["validation"], done["val_answers"] = evaluate_model(model, settings, "val", settings.val_images, template)
    if key["test_images"]:
        done["methods"], answers = evaluate_model(model, settings, "test", settings.test_images, template)
        done["samples"] = answers[:5]
    if key["sampled"] is not None:
        done["sampled"], _ = evaluate_model(model, settings, "test", settings.test_images, template, key["sampled"])
    if method == "sft":
        done["drift"], yardstick.model = 0.0, model
    else:
        done["drift"] = yardstick.drift_of(model)
    return done


def run_logs(settings: DemoSettings, out: Path, name: str) -> dict:
    """Each run's JSONL log `name` (metrics.jsonl, drift.jsonl) as a list of records, for runs that have it."""
    logs = {m: out / "runs" / m / name for m in settings.methods}
    return {
        m: [json.loads(line) for line in path.read_text().splitlines()] for m, path in logs.items() if path.is_file()
    }


def stage_eval(settings: DemoSettings, out: Path, timings: dict) -> dict:
    """Greedy (validation, test) and sampled (test) answers of every method -> results.{json,md,png},
    with each policy's drift from the SFT model on the SFT model's greedy validation answers."""
    cfg = base_config(settings)
    key = eval_key(settings, out)
    yardstick = _Yardstick(settings, out / "sft", cfg.data.template)
    results: dict = {"methods": {}, "validation": {}, "sampled": {}, "drift": {}, "samples": {}}
    for method in ("sft", *settings.methods):  # the SFT model first: its answers are the yardstick
        path = out / "sft" if method == "sft" else out / "runs" / method / "final"
        cache = path / "eval.json"
        done = json.loads(cache.read_text()) if cache.is_file() else {}
        if done.get("key") != key:
            try:
                done = evaluate_saved_model(settings, path, method, key, yardstick)
            except UnparsedError as error:
                named = UnparsedError(f"{method} ({path}): {error}", error.count, error.total, error.examples)
                if method == "sft" or not (settings.validation_only or settings.record_unscorable):
                    raise named from None
                # an lr grid records a run that writes unreadable text and chooses among the others
                results.setdefault("unscorable", {})[method] = str(named)
                logger.warning("%s", named)
                continue
            cache.write_text(json.dumps(done))
        if method == "sft":
            yardstick.answers = done["val_answers"]
        for table in ("validation", "methods", "sampled", "samples", "drift"):
            if table in done:
                results[table][method] = done[table]
    results["train_steps"] = {m: log[-1]["step"] for m, log in run_logs(settings, out, "metrics.jsonl").items()}
    results["drift_during_training"] = run_logs(settings, out, "drift.jsonl")
    if (out / "gate.json").is_file():
        results["gate"] = json.loads((out / "gate.json").read_text())
    results["pairs"] = json.loads((out / "pairs" / "stats.json").read_text())
    results["settings"] = asdict(settings)
    results["train_config"] = cfg.to_dict()
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if not settings.validation_only:
        (out / "results.md").write_text(results_table(results))
        plot_method_bars(results, out / "results.png")
    return results


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
def finished_stages(settings: DemoSettings, out: Path) -> set[str]:
    """The stages whose artifacts exist (the eval stage always runs: it reuses each model's eval.json)."""
    gate = out / "gate.json"
    done = {
        "sft": (out / "sft" / "ddpo_model.json").is_file(),
        "gate": gate.is_file() and (json.loads(gate.read_text())["passed"] or not settings.enforce_gate),
        "sample": (out / "pairs" / "answers.jsonl").is_file(),
        "annotate": (out / "pairs" / "train.jsonl").is_file(),
        "train": all((out / "runs" / m / "final").is_dir() for m in settings.methods),
        "eval": False,
    }
    return {stage for stage, finished in done.items() if finished}


def run(settings: DemoSettings, stages: Sequence[str] = STAGES, force: bool = False) -> dict:
    """The stages of one lab run, in pipeline order, each skipped when its artifacts exist (unless
    `force`); the results of the eval stage, {} when it did not run. Raises GateError on a missed gate."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars would bury the stage bars
    torch.set_num_threads(settings.num_threads)
    torch.set_flush_denormal(True)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    functions = {
        "sft": stage_sft,
        "gate": stage_gate,
        "sample": stage_sample,
        "annotate": stage_annotate,
        "train": stage_train,
    }
    results: dict = {}
    for stage in STAGES:
        if stage not in stages or (stage in finished_stages(settings, out) and not force):
            continue
        started = time.perf_counter()
        logger.info("stage %s", stage)
        if stage == "eval":
            results = stage_eval(settings, out, timings)
        else:
            functions[stage](settings, out)
        timings[stage] = round(time.perf_counter() - started, 1)
        timings_file.write_text(json.dumps(timings, indent=2))
    return results
