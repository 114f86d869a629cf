"""The named training runs of the lab's studies, each as `ddpo train` overrides ("section.field" ->
value) applied on top of the lab's train config (configs/synthetic/demo.yaml) through
`DemoSettings.methods`. Every run of a point starts from the same SFT model on the same pairs."""

from __future__ import annotations

from pathlib import Path

import yaml

from ddpo.lab.settings import REPO

# ------------------------------------------------------------------------------------------------
# the v2 lab (experiments/synthetic_v2.py): lr grids and the ablation's parts
# ------------------------------------------------------------------------------------------------
# from 3e-5 up every lr cost 0.5-0.9 of validation recall (the model says "nothing" at real objects),
# so the mean's grid reaches down to 1e-6 (experiments/results/synthetic_v2/README.md)
MEAN_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
SUM_GRID = (1e-6, 3e-6, 1e-5, 3e-5)  # the sum takes larger steps per lr: recall collapses from 3e-5 up
ABLATION_PARTS = ("primary", "gamma", "sum", "sumgamma", "pairs", "sumpairs", "matched", "tuned")


def run_overrides(gamma: float, normalize: str, lr: float, **extra) -> dict:
    """One run: DDPO's gamma (1 = vanilla DPO), the log-prob normalisation ("mean": RLHF-V Eq. 5;
    "sum": the released code), the learning rate, then any other overrides."""
    return {"loss.gamma": gamma, "loss.normalize": normalize, "train.learning_rate": lr, **extra}


def lr_grid_runs(normalize: str) -> dict[str, dict]:
    """DPO and DDPO (gamma 5) at every lr of the normalisation's grid."""
    runs = {}
    for lr in MEAN_GRID if normalize == "mean" else SUM_GRID:
        runs[f"dpo_{normalize}_lr{lr:g}"] = run_overrides(1.0, normalize, lr)
        runs[f"ddpo_{normalize}_g5_lr{lr:g}"] = run_overrides(5.0, normalize, lr)
    return runs


def grid_run_name(overrides: dict) -> str:
    """The lr-grid run's name for these overrides (a study on seed 0 reuses it instead of retraining)."""
    gamma = overrides["loss.gamma"]
    return (
        f"{'dpo' if gamma == 1 else 'ddpo'}_{overrides['loss.normalize']}{'' if gamma == 1 else f'_g{gamma:g}'}"
        f"_lr{overrides['train.learning_rate']:g}"
    )


def _pair_count_runs(norm: str, lr: float) -> dict[str, dict]:
    runs = {}
    for n in (200, 800):
        runs[f"dpo_{norm}_p{n}"] = run_overrides(1.0, norm, lr, **{"data.max_samples": n})
        runs[f"ddpo_{norm}_g5_p{n}"] = run_overrides(5.0, norm, lr, **{"data.max_samples": n})
    return runs


def _matched_runs(mean: dict, total: dict) -> dict[str, dict]:
    """DPO at every grid lr above the shared one up to DDPO's own (a ladder to read DPO at DDPO's drift)
    and DDPO-sum at its own lr."""
    runs = {}
    for norm, lr in (("mean", mean), ("sum", total)):
        grid = MEAN_GRID if norm == "mean" else SUM_GRID
        runs.update(
            {f"dpo_{norm}_lr{x:g}": run_overrides(1.0, norm, x) for x in grid if lr["shared"] < x <= lr["ddpo"]}
        )
    if total["ddpo"] != total["shared"]:
        runs["ddpo_sum_g5_tuned"] = run_overrides(5.0, "sum", total["ddpo"])
    return runs


def ablation_runs(lrs: dict, parts: list[str]) -> dict[str, dict]:
    """The v2 ablation's runs of `parts` (ABLATION_PARTS) at the lr grid's choice `lrs`
    ({"mean": choose_lrs(...), "sum": choose_lrs(...)})."""
    mean, total = lrs["mean"], lrs["sum"]
    runs: dict[str, dict] = {}
    if "primary" in parts:
        runs["dpo_mean"] = run_overrides(1.0, "mean", mean["shared"])
        runs["ddpo_mean_g5"] = run_overrides(5.0, "mean", mean["shared"])
    if "gamma" in parts:
        runs.update({f"ddpo_mean_g{g}": run_overrides(float(g), "mean", mean["shared"]) for g in (2, 10)})
    if "sum" in parts:
        runs["dpo_sum"] = run_overrides(1.0, "sum", total["shared"])
        runs["ddpo_sum_g5"] = run_overrides(5.0, "sum", total["shared"])
    if "sumgamma" in parts:
        runs.update({f"ddpo_sum_g{g}": run_overrides(float(g), "sum", total["shared"]) for g in (2, 10)})
    if "pairs" in parts:
        runs.update(_pair_count_runs("mean", mean["shared"]))
    if "sumpairs" in parts:
        runs.update(_pair_count_runs("sum", total["shared"]))
    if "matched" in parts:
        runs.update(_matched_runs(mean, total))
    if "tuned" in parts:
        # each method at its own validation-best lr; one equal to the shared lr is its primary run
        for label, name, gamma in (("dpo", "dpo_mean", 1.0), ("ddpo", "ddpo_mean_g5", 5.0)):
            if mean[label] != mean["shared"]:
                runs[f"{name}_tuned"] = run_overrides(gamma, "mean", mean[label])
    return runs


# the primary pair at the lab config's own settings (Eq. 5 mean, beta 0.5, lr 3e-6): the models
# best-of-N scores with
PRIMARY_POLICIES = {"dpo_mean": {"loss.gamma": 1.0}, "ddpo_mean_g5": {"loss.gamma": 5.0}}

# ------------------------------------------------------------------------------------------------
# the dense-regime map (experiments/dense_regime.py): every lr is the v2 lab's choice at 55 words
# ------------------------------------------------------------------------------------------------
REGIME_BETA, REGIME_LR, REGIME_LR_HIGH, REGIME_LR_SUM_DDPO = 0.5, 3e-6, 1e-5, 3e-5  # the last: DDPO-sum's own lr
REGIME_PARTS = ("primary", "matched", "gamma", "sum", "rescaled", "sumtuned", "segments")
# part -> run -> (gamma, normalisation, lr, beta rescaled by the point's answer tokens?)
REGIME_RUNS = {
    "primary": {"dpo_mean": (1.0, "mean", REGIME_LR, False), "ddpo_mean_g5": (5.0, "mean", REGIME_LR, False)},
    "matched": {"dpo_mean_lr1e-05": (1.0, "mean", REGIME_LR_HIGH, False)},
    "gamma": {"ddpo_mean_g2": (2.0, "mean", REGIME_LR, False), "ddpo_mean_g10": (10.0, "mean", REGIME_LR, False)},
    "sum": {
        "dpo_sum": (1.0, "sum", REGIME_LR, False),
        "ddpo_sum_g5": (5.0, "sum", REGIME_LR, False),
        "dpo_sum_lr1e-05": (1.0, "sum", REGIME_LR_HIGH, False),
    },
    "rescaled": {"dpo_rescaled": (1.0, "mean", REGIME_LR, True), "ddpo_rescaled_g5": (5.0, "mean", REGIME_LR, True)},
    "sumtuned": {
        "ddpo_sum_g5_lr3e-05": (5.0, "sum", REGIME_LR_SUM_DDPO, False),
        "dpo_sum_lr3e-05": (1.0, "sum", REGIME_LR_SUM_DDPO, False),
    },
}
SEGMENT_RUNS = ("dpo_mean", "ddpo_mean_g5", "ddpo_sum_g5_lr3e-05", "dpo_sum_lr1e-05", "dpo_sum_lr3e-05")


def regime_overrides(spec: tuple[float, str, float, bool], tokens: float) -> dict:
    """A REGIME_RUNS entry as overrides; a rescaled beta is REGIME_BETA x the point's mean answer tokens
    (the sum's step size for DPO, while gamma no longer enlarges it)."""
    gamma, norm, lr, rescaled = spec
    return run_overrides(gamma, norm, lr, **{"loss.beta": round(REGIME_BETA * tokens, 2) if rescaled else REGIME_BETA})


def regime_runs(parts: list[str], tokens: float, segment_files: dict[str, Path] | None = None) -> dict[str, dict]:
    """Each part's runs as overrides; `segments` trains SEGMENT_RUNS on each subset file
    ({subset: train.jsonl}, each with its own reference cache)."""
    runs = {name: spec for part in parts if part != "segments" for name, spec in REGIME_RUNS[part].items()}
    out = {name: regime_overrides(spec, tokens) for name, spec in runs.items()}
    if "segments" in parts and segment_files:
        every = {name: spec for part in REGIME_RUNS.values() for name, spec in part.items()}
        for subset, path in segment_files.items():
            for name in SEGMENT_RUNS:
                out[f"{name}_seg{subset}"] = {
                    **regime_overrides(every[name], tokens),
                    "data.path": str(path),
                    "train.reference_cache": str(path.parent / f"reference_cache_{subset}"),
                }
    return out


# ------------------------------------------------------------------------------------------------
# the dense-method recipes (configs/methods/, experiments/methods.py and chip_parts.py)
# ------------------------------------------------------------------------------------------------
RECIPE_DIR = REPO / "configs" / "methods"
RECIPES = ("dpo", "ddpo_paper", "ddpo_released", "chip", "mdpo", "hsa_dpo", "tpo", "tdpo1", "tdpo2", "ld_dpo")
# the summed recipes take larger steps per lr in log-ratio than DPO's mean, so the grid spans both sides
# of the v2 lab's choice; 1e-6 is left out for budget (it moved DPO and DDPO least in the v2 grids)
RECIPE_GRID = (3e-6, 1e-5, 3e-5)
RECIPE_QUICK_GRID = (1e-5, 1e-4)


def recipe_overrides(name: str) -> dict:
    """A recipe's run keys: its whole `loss:` section and, when it needs a live reference, `train.reference`
    (not its train.learning_rate: the source's rate is for its model at scale; the lab picks its own)."""
    data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
    overrides = {f"loss.{key}": value for key, value in data["loss"].items()}
    if data.get("train", {}).get("reference", "cached") != "cached":
        overrides["train.reference"] = data["train"]["reference"]
    return overrides


def recipe_run_name(recipe: str, lr: float) -> str:
    return f"{recipe}_lr{lr:g}"


def chip_part_runs(lr: float = 3e-6) -> dict[str, dict]:
    """The chip recipe without each of its parts: TDPO's KL, the cross-modal term (inside the margin), and
    the KL alone (gamma 1, no cross-modal term). Without the KL the reference stays live: the diffused image
    is redrawn every step (loss.corruption_draw step), so its reference log-probs cannot be cached."""
    chip = {**recipe_overrides("chip"), "train.learning_rate": lr}
    no_cross = {"loss.image_conditional_weight": 0.0, "loss.image_conditional_in_margin": False}
    return {
        "chip_no_kl": {**chip, "loss.tdpo_alpha": 0.0},
        "chip_no_cond": {**chip, **no_cross},
        "chip_kl_only": {**chip, **no_cross, "loss.gamma": 1.0},
    }


# ------------------------------------------------------------------------------------------------
# the v1 world's ablation (experiments/synthetic_ablation.py, the negative control)
# ------------------------------------------------------------------------------------------------
# a mean log-prob is ~N times smaller than the sum (N ~ 33 answer tokens) and the DPO gradient scales
# with beta, so 0.5 x 33 starts the mean at the sum's step size
V1_MEAN_BETA = 16.0


def v1_ablation_runs() -> dict[str, dict]:
    """Sum and mean at gamma 1, 2, 5, 10, and the sum at 200 and 800 pairs (the paper's Figure 2 axis)."""
    runs: dict[str, dict] = {"dpo_sum": {"loss.gamma": 1.0, "loss.normalize": "sum"}}
    runs.update({f"ddpo_sum_g{g}": {"loss.gamma": float(g), "loss.normalize": "sum"} for g in (2, 5, 10)})
    runs["dpo_mean"] = {"loss.gamma": 1.0, "loss.normalize": "mean", "loss.beta": V1_MEAN_BETA}
    runs.update(
        {
            f"ddpo_mean_g{g}": {"loss.gamma": float(g), "loss.normalize": "mean", "loss.beta": V1_MEAN_BETA}
            for g in (2, 5, 10)
        }
    )
    for pairs in (200, 800):
        runs[f"dpo_sum_p{pairs}"] = {"loss.gamma": 1.0, "loss.normalize": "sum", "data.max_samples": pairs}
        runs[f"ddpo_sum_g5_p{pairs}"] = {"loss.gamma": 5.0, "loss.normalize": "sum", "data.max_samples": pairs}
    return runs
