"""The perception gate: before any preference pair is made, the SFT model must see what it names -- each
kind the captions name (shape, colour, position, count), on one-object images and on held-out scenes --
make no more errors of a kind than its captions taught it (at most `gate_error_ratio` x theirs), and
hallucinate from the prior (companion rate), or the lab would test nothing about preference learning.

Why per kind: a gate on shapes alone let a model through that named the wrong cell for a quarter of the
objects it saw (v2, experiments/results/lab_v3/NOTES.md); its position "hallucinations" were misperception,
which no preference pair can teach away, and preference learning could not lower them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ddpo.lab.settings import DemoSettings, generation_options
from ddpo.lab.world import single_object_scenes, split, synthetic_config

# the kinds each caption names, as the gate reads them; "object" errors are the hallucinated mentions
CAPTION_ERRORS = {
    "object": "mention_hallucination_rate",
    "attribute": "attribute_error_rate",
    "position": "position_error_rate",
    "count": "count_error_rate",
}


class GateError(RuntimeError):
    """The SFT model misses the perception gate: the lab cannot test preference learning on objects."""


def prior_contexts(cfg) -> dict:
    """kind_accuracy's prior contexts: the captions' colour confusions (and the shapes they touch), the cells
    whose objects they move to the centre."""
    from ddpo.data.synthetic.language import CELLS

    if cfg.priors is not None:
        p = cfg.priors
        return {
            "color_confusions": dict(p.color_confusions),
            "drift_cells": [CELLS[c] for c in p.position_bias],
            "confusion_shapes": tuple(p.confusion_shapes),
        }
    n = cfg.noise
    return {"color_confusions": dict(n.color_confusions), "drift_cells": [CELLS[c] for c in n.position_bias]}


def lone_partner(scene, partners: dict[str, str]) -> bool:
    """Whether `scene` holds a partner shape whose anchor is absent (a count prior would add the anchor)."""
    present = scene.shapes()
    return any(partner in present and anchor not in present for anchor, partner in partners.items())


def count_probe(model, scenes, images, prompts, template: str, partners: dict[str, str]) -> dict[str, float]:
    """The count a model gives when asked for one: the answer forced to open with "the image shows" and the
    likeliest number word after it (1 .. 9), against the truth; scenes with a companion context apart
    (`count_prior_rate`: the number one above the truth, the invented companion counted). A partner shape
    without its anchor is a prior context too (lab v3: seed 0's SFT models counted a lone circle, the square's
    companion, as two objects in 15 of ~270 one-object images, the co-occurrence read backwards;
    experiments/results/lab_v3/NOTES.md)."""
    from ddpo.data.synthetic.language import NUMBERS
    from ddpo.data.synthetic.metrics import companion_context
    from ddpo.lab.evaluation import LOGPS_BATCH
    from ddpo.models.base import answer_token_logps

    numbers = range(1, len(NUMBERS))
    texts = [f"the image shows {NUMBERS[n]} {'object' if n == 1 else 'objects'}." for n in numbers]
    rows = [(i, t) for i in range(len(scenes)) for t in texts]
    logps = answer_token_logps(
        model, [images[i] for i, _ in rows], [prompts[i] for i, _ in rows], [t for _, t in rows], template, LOGPS_BATCH
    )
    hits = {"count": [], "count_prior": []}
    for i, scene in enumerate(scenes):
        said = 1 + max(range(len(texts)), key=lambda k: float(logps[i * len(texts) + k][3]))  # token 3: the number
        if companion_context(scene, partners) or lone_partner(scene, partners):
            hits["count_prior"].append(said == len(scene.objects) + 1)
        else:
            hits["count"].append(said == len(scene.objects))
    share = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {"count_probe_accuracy": share(hits["count"]), "count_probe_prior_rate": share(hits["count_prior"])}


def kind_figures(model, settings: DemoSettings, template: str) -> tuple[dict, dict]:
    """Greedy answers on every one-object image and on the held-out "gate" scenes, read per kind
    (data/synthetic/metrics.py kind_accuracy, plus the count probe), and the gate scenes' SFT captions:
    (per-kind figures {"single": .., "multi": ..}, the shared figures of `gate_figures`)."""
    from ddpo.data.synthetic.language import PROMPTS
    from ddpo.data.synthetic.metrics import evaluate, gate_figures, kind_accuracy
    from ddpo.data.synthetic.world import render

    cfg = synthetic_config(settings)
    contexts = prior_contexts(cfg)
    singles = single_object_scenes(cfg.world)[:: settings.gate_single_stride]
    single_prompts = [PROMPTS["detailed"][i % len(PROMPTS["detailed"])] for i in range(len(singles))]
    single_images = [render(sc, cfg.world) for sc in singles]
    options = generation_options(settings, template)
    single_answers = model.generate(single_images, single_prompts, options)
    scenes, images, prompts, captions = split(settings, "gate", settings.gate_images)
    answers = model.generate(images, prompts, options)
    shared = gate_figures(singles, single_answers, scenes, answers, cfg.world.partners, cfg.empty_cells)
    shared["examples"] = [{"scene": str(sc.objects), "answer": a} for sc, a in list(zip(scenes, answers))[:3]]
    kinds = {}
    for name, (scs, ims, ps, ans) in {
        "single": (singles, single_images, single_prompts, single_answers),
        "multi": (scenes, images, prompts, answers),
    }.items():
        kinds[name] = kind_accuracy(scs, ans, partners=cfg.world.partners, empty_cells=cfg.empty_cells, **contexts)
        kinds[name].update(count_probe(model, scs, ims, ps, template, cfg.world.partners))
    model_errors = evaluate(scenes, answers, cfg.world.partners, cfg.empty_cells, max_unparsed=0.99)
    caption_errors = evaluate(scenes, captions, cfg.world.partners, cfg.empty_cells)
    kinds["caption_errors"] = {
        kind: {"model": model_errors[key], "captions": caption_errors[key]} for kind, key in CAPTION_ERRORS.items()
    }
    kinds["priors"] = {
        "object": shared["companion_rate"],
        "attribute": kinds["multi"]["color_prior_rate"],
        "position": kinds["multi"]["position_prior_rate"],
        "count": kinds["multi"]["count_probe_prior_rate"],
    }
    return kinds, shared


def gate_checks(kinds: dict, shared: dict, settings: DemoSettings) -> tuple[dict, list[str]]:
    """The gate's thresholds (name -> bound) and the figures that miss them ("name value < bound")."""
    thresholds = {
        "single_object_accuracy": settings.gate_single_object,
        "recall_without_anchor": settings.gate_recall_without_anchor,
        "companion_rate": settings.gate_companion_rate,
    }
    figures = {name: shared[name] for name in thresholds}
    for probe in ("single", "multi"):
        for kind in ("shape", "color", "position", "count_probe"):
            name = f"{probe}_{kind}_accuracy"
            thresholds[name], figures[name] = settings.gate_kind_accuracy, kinds[probe][f"{kind}_accuracy"]
    failed = [
        f"{name} {figures[name]:.3f} < {bound}"
        for name, bound in thresholds.items()
        if not figures[name] >= bound  # NaN (no such probe) fails too
    ]
    for kind, pair in kinds["caption_errors"].items():
        bound = settings.gate_error_ratio * pair["captions"]
        thresholds[f"{kind}_error_vs_captions"] = settings.gate_error_ratio
        if pair["model"] > bound + 1e-9:
            ratio = settings.gate_error_ratio
            failed.append(f"{kind} error {pair['model']:.3f} > {ratio:g} x the captions' {pair['captions']:.3f}")
    return thresholds, failed


def perception_gate(model, settings: DemoSettings, template: str) -> dict:
    """The gate's figures (`kind_figures`), with its thresholds, pass/fail and the figures that failed."""
    kinds, shared = kind_figures(model, settings, template)
    thresholds, failed = gate_checks(kinds, shared, settings)
    return {**shared, "kinds": kinds, "thresholds": thresholds, "passed": not failed, "failed": failed}


def gate_error(gate: dict, where: str) -> GateError:
    """The error of a missed gate, telling a model that cannot see from one that sees but names too few
    absent companions (the two need different fixes)."""
    perception = any(not f.startswith("companion_rate") for f in gate["failed"])
    why = (
        "It cannot see (or name) what it describes, so preference learning would test nothing; the figures per "
        "kind say which kind it misperceives: train it longer (sft_steps) or check the world and the perception "
        "pretraining."
        if perception
        else "It sees, but names too few absent companions: too little prior-driven hallucination for preference "
        "learning to fix; strengthen the captions' prior (priors) or check the world."
    )
    return GateError(
        f"the SFT model misses the perception gate: {'; '.join(gate['failed'])} (figures in {where}). {why}"
    )


def loss_plateau(losses: Sequence[float]) -> dict:
    """Mean SFT loss over each tenth of training: a flat last stretch says training converged."""
    n = max(1, len(losses) // 10)
    tenths = [sum(losses[i : i + n]) / len(losses[i : i + n]) for i in range(0, len(losses) - n + 1, n)][:10]
    return {
        "loss_by_tenth": [round(v, 4) for v in tenths],
        "last_tenth_change": round(tenths[-1] - tenths[-2], 4) if len(tenths) > 1 else None,
    }


def kind_line(gate: dict) -> str:
    """Per kind: single / multi accuracy, the model's caption error against the captions', the prior's rate."""
    kinds = gate.get("kinds")
    if not kinds:
        return ""
    cells = []
    for kind, error in (("shape", "object"), ("color", "attribute"), ("position", "position"), ("count", "count")):
        acc = "count_probe_accuracy" if kind == "count" else f"{kind}_accuracy"
        pair = kinds["caption_errors"][error]
        cells.append(
            f"{kind} {kinds['single'][acc]:.3f}/{kinds['multi'][acc]:.3f} (error {pair['model']:.3f} vs "
            f"captions {pair['captions']:.3f}, prior {kinds['priors'][error]:.2f})"
        )
    return "per kind, single/multi accuracy: " + "; ".join(cells)


def gate_line(gate: dict) -> str:
    """The gate's figures and verdict in one line (logs and result tables)."""
    kinds = kind_line(gate)
    return (
        f"single-object accuracy {gate['single_object_accuracy']:.3f}, recall without anchor "
        f"{gate['recall_without_anchor']:.3f}, companion rate {gate['companion_rate']:.3f}"
        + (f"; {kinds}" if kinds else "")
        + f" -> {'passed' if gate['passed'] else 'MISSED: ' + '; '.join(gate['failed'])}"
    )
