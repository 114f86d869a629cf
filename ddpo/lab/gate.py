"""The perception gate: before any preference pair is made, the SFT model must see what it names
(one-object images; scenes with no anchor) and hallucinate from the prior (companion rate), or the lab
would test nothing about preference learning on objects."""

from __future__ import annotations

from collections.abc import Sequence

from ddpo.lab.settings import DemoSettings, generation_options
from ddpo.lab.world import single_object_scenes, split, synthetic_config


class GateError(RuntimeError):
    """The SFT model misses the perception gate: the lab cannot test preference learning on objects."""


def perception_gate(model, settings: DemoSettings, template: str) -> dict:
    """The gate's figures (data/synthetic/metrics.py gate_figures) from greedy answers on every
    one-object image and on the held-out "gate" scenes, with pass/fail per figure."""
    from ddpo.data.synthetic.language import PROMPTS
    from ddpo.data.synthetic.metrics import gate_figures
    from ddpo.data.synthetic.world import render

    cfg = synthetic_config(settings)
    singles = single_object_scenes(cfg.world)[:: settings.gate_single_stride]
    prompts = [PROMPTS["detailed"][i % len(PROMPTS["detailed"])] for i in range(len(singles))]
    options = generation_options(settings, template)
    single_answers = model.generate([render(sc, cfg.world) for sc in singles], prompts, options)
    scenes, images, prompts, _ = split(settings, "gate", settings.gate_images)
    answers = model.generate(images, prompts, options)
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


def gate_error(gate: dict, where: str) -> GateError:
    """The error of a missed gate, telling a model that cannot see from one that sees but names too few
    absent companions (the two need different fixes)."""
    perception = any(not f.startswith("companion_rate") for f in gate["failed"])
    why = (
        "It cannot see what it names, so preference learning on objects would test nothing; train it longer "
        "(sft_steps) or check the world."
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


def gate_line(gate: dict) -> str:
    """The gate's figures and verdict in one line (logs and result tables)."""
    return (
        f"single-object accuracy {gate['single_object_accuracy']:.3f}, recall without anchor "
        f"{gate['recall_without_anchor']:.3f}, companion rate {gate['companion_rate']:.3f} -> "
        f"{'passed' if gate['passed'] else 'MISSED: ' + '; '.join(gate['failed'])}"
    )
