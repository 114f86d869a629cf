"""experiments/lab_v3.py: the pre-registered analysis on hand-made seed results (the paired differences, the
families and the gate exclusions are read the way PREREGISTRATION.md says), and the validation rule."""

import json
import statistics

import pytest

import experiments.lab_v3 as lab_v3
from ddpo.lab.stats import holm, one_sided_p, p_value, tost_p

ARMS = ("sft", "dpo_mean", "ddpo_mean", "dpo_sum_tuned", "ddpo_sum_tuned", "ddpo_mean_tuned")
# per-seed "all" / position / object rates of DDPO minus DPO (seeds 100, 101, 102, 104; 103 missed the gate)
D_ALL = [-0.03, -0.02, -0.04, -0.01]
D_POS = [-0.02, -0.01, -0.03, 0.01]
D_OBJ = [0.005, -0.01, 0.0, 0.01]


def metrics(base: float, obj: float = 0.0, pos: float = 0.0, every: float = 0.0) -> dict:
    out = {k: base for k in lab_v3.REPORTED}
    out["object_response_rate"] += obj
    out["position_response_rate"] += pos
    out["all_response_rate"] += every
    return out


def write_seed(root, seed: int, k: int) -> None:
    folder = root / f"seed{seed}"
    folder.mkdir(parents=True)
    methods = {arm: metrics(0.3 + 0.01 * k) for arm in ARMS}
    methods["ddpo_mean"] = metrics(0.3 + 0.01 * k, D_OBJ[k], D_POS[k], D_ALL[k])
    methods["ddpo_sum_tuned"] = metrics(0.3 + 0.01 * k, every=-0.05)
    gate = {"passed": True, "failed": [], "kinds": {"single": {}, "multi": {}, "caption_errors": {}}}
    results = {
        "methods": methods,
        "sampled": methods,
        "drift": {arm: 0.0 for arm in ARMS},
        "gate": gate,
        "pairs": {"pairs_used": 900},
        "train_config": {"train": {"learning_rate": 1e-5}},
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_analyse_tests_the_preregistered_families_on_the_seeds_that_passed_the_gate(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    for k, seed in enumerate((100, 101, 102, 104)):
        write_seed(runs, seed, k)
    (runs / "seed103").mkdir()
    (runs / "seed103" / "excluded.json").write_text(json.dumps({"failed": ["multi_shape_accuracy 0.93 < 0.95"]}))
    out.mkdir()
    chosen = {a: {"lr": 1e-6, "beta": 2.5} for a in lab_v3.TUNED_ARMS}
    (out / "tuning.json").write_text(json.dumps({"beta_control": {"chosen": chosen}}))

    args = ["analyse", "--seeds", "100", "101", "102", "103", "104", "--output-dir", str(runs), "--results", str(out)]
    assert lab_v3.main(args) == 0
    got = json.loads((out / "results.json").read_text())

    assert got["seeds"] == [100, 101, 102, 104] and list(got["excluded_seeds"]) == ["103"]
    diff = got["differences"]["ddpo_mean - dpo_mean"]
    assert diff["all_response_rate"]["per_seed"] == pytest.approx(D_ALL, abs=1e-12)
    assert diff["all_response_rate"]["mean"] == pytest.approx(statistics.fmean(D_ALL), abs=1e-12)
    family = got["primary_family"]
    expected = {
        "H1_objects_equivalent": tost_p(D_OBJ, lab_v3.EQUIVALENCE_MARGIN),
        "H2_positions_lower": one_sided_p(D_POS, below=True),
        "H3_all_lower": one_sided_p(D_ALL, below=True),
    }
    assert {k: h["p"] for k, h in family.items()} == pytest.approx(expected, abs=1e-12)
    assert {k: h["p_holm"] for k, h in family.items()} == pytest.approx(holm(expected), abs=1e-12)
    assert family["H3_all_lower"]["outcome"] == ("hit" if holm(expected)["H3_all_lower"] < 0.05 else "miss")
    # 4 seeds, every sign negative: the exact sign test's smallest p is 1/16
    assert family["H3_all_lower"]["sign_p"] == pytest.approx(1 / 16)
    beta = got["secondary_beta_control"]
    assert len(beta) == 6
    assert beta["ddpo_sum_tuned - dpo_sum_tuned: all_response_rate"]["mean"] == pytest.approx(-0.05, abs=1e-12)
    assert not got["secondary_pairs_vs_steps"]  # no pairs arms on these seeds
    assert "H1_objects_equivalent" in (out / "RESULTS.md").read_text()


def test_analyse_refuses_a_seed_that_has_not_run(tmp_path):
    (tmp_path / "seed100").mkdir()
    with pytest.raises(SystemExit, match=r"seeds \[100\]"):
        lab_v3.main(["analyse", "--seeds", "100", "--output-dir", str(tmp_path), "--results", str(tmp_path)])


def test_pairs_arms_match_the_primary_arms_steps():
    runs = lab_v3.pairs_arms(1e-5, num_pairs=912, batch_size=32, epochs=2.0)
    assert runs["ddpo_mean_p200_steps"]["train.max_steps"] == 56  # 28 whole batches x 2 epochs, as the trainer plans
    assert runs["ddpo_mean_p200_steps"]["data.max_samples"] == 200
    assert "train.max_steps" not in runs["dpo_mean_p800_epochs"]
    assert runs["dpo_mean_p800_epochs"]["loss.gamma"] == 1.0 and runs["ddpo_mean_p800_epochs"]["loss.gamma"] == 5.0


def write_validation(folder, name: str, every: float, recall: float) -> None:
    path = folder / ("sft" if name == "sft" else f"runs/{name}/final")
    path.mkdir(parents=True, exist_ok=True)
    m = {k: 0.2 for k in lab_v3.REPORTED} | {"all_response_rate": every, "object_recall": recall}
    (path / "eval.json").write_text(json.dumps({"validation": m}))


def test_choose_takes_the_lowest_all_rate_that_keeps_recall(tmp_path):
    # 3e-6: both keep recall; 1e-5: lower "all" but DDPO loses 0.03 of recall (bar: 0.98 - 0.02); 3e-5: unreadable
    points = {3e-6: (0.50, 0.98), 1e-5: (0.40, 0.95)}
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        write_validation(folder, "sft", 0.6, 0.98)
        for lr, (every, recall) in points.items():
            write_validation(folder, f"dpo_mean_lr{lr:g}", every, 0.98)
            write_validation(folder, f"ddpo_mean_lr{lr:g}", every, recall)
        for name in ("dpo_mean_lr3e-05", "ddpo_mean_lr3e-05"):
            (folder / "runs" / name / "final").mkdir(parents=True)  # trained, no eval.json: unscorable
    args = ["choose", "--seeds", "0", "1", "2", "--output-dir", str(tmp_path), "--results", str(tmp_path / "results")]
    assert lab_v3.main(args) == 0
    choice = json.loads((tmp_path / "results" / "tuning.json").read_text())
    assert choice["primary"]["lr"] == 3e-6 and choice["primary"]["seeds"] == [0, 1]
    assert "beta_control" not in choice  # no β grid on these seeds


# per-seed "all" rate of chip minus dpo_mean (mdpo: unscored on two seeds; tpo: on one; ld_dpo: no admissible lr)
D_CHIP = [-0.04, -0.06, -0.05, -0.02]


def test_the_methods_family_tests_each_recipe_against_dpo_mean_two_sided(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    seeds = (100, 101, 102, 104)
    for k, seed in enumerate(seeds):
        write_seed(runs, seed, k)
        path = runs / f"seed{seed}" / "results.json"
        results = json.loads(path.read_text())
        base = 0.3 + 0.01 * k
        scored = {"chip": metrics(base, every=D_CHIP[k]), "dpo": metrics(base, every=-0.01)}
        scored |= {r: metrics(base) for r in lab_v3.METHOD_RECIPES if r not in ("chip", "mdpo", "tpo", "ld_dpo")}
        if k < 2:
            scored["mdpo"] = metrics(base)
        if k != 0:
            scored["tpo"] = metrics(base, pos=0.01 * k)
        results["methods"] |= scored
        results["sampled"] |= scored
        results["drift"] |= {r: 0.0 for r in scored}
        path.write_text(json.dumps(results))
    out.mkdir()
    lrs = {r: 1e-5 for r in (*lab_v3.METHOD_RECIPES, lab_v3.RECIPE_BASELINE) if r != "ld_dpo"}
    methods = {"chosen": lrs, "no_admissible_lr": {"ld_dpo": "no lr keeps recall"}}
    beta = {"chosen": {a: {"lr": 1e-6, "beta": 2.5} for a in lab_v3.TUNED_ARMS}}
    (out / "tuning.json").write_text(json.dumps({"beta_control": beta, "methods": methods}))

    args = ["analyse", "--seeds", *map(str, seeds), "--output-dir", str(runs), "--results", str(out)]
    assert lab_v3.main(args) == 0
    got = json.loads((out / "results.json").read_text())["secondary_methods"]

    assert set(got["not_tested"]) == {"mdpo", "ld_dpo"}  # scored on 2 of 4 seeds; no admissible lr
    family = got["family"]
    assert len(family) == 2 * 6  # 6 recipes tested on positions and "all"
    chip = family["chip - dpo_mean: all_response_rate"]
    assert chip["per_seed"] == pytest.approx(D_CHIP, abs=1e-12) and chip["p"] == pytest.approx(p_value(D_CHIP))
    assert chip["sign_p"] == pytest.approx(2 / 16)  # 4 of 4 below: one-sided 1/16, two-sided twice that
    assert {k: h["p_holm"] for k, h in family.items()} == pytest.approx(holm({k: h["p"] for k, h in family.items()}))
    tpo = family["tpo - dpo_mean: position_response_rate"]
    assert tpo["seeds"] == [101, 102, 104] and tpo["per_seed"] == pytest.approx([0.01, 0.02, 0.03], abs=1e-12)
    # described: what chip's parts add beyond the recipes' own DPO
    assert got["described"]["chip - dpo"]["all_response_rate"]["mean"] == pytest.approx(
        statistics.fmean(D_CHIP) + 0.01, abs=1e-12
    )
    assert "chip - dpo_mean: all_response_rate" in (out / "RESULTS.md").read_text()


def test_choose_takes_each_recipes_lr_on_its_own(tmp_path):
    # per lr: ("all" rate, recall); chip's best "all" (3e-5) loses recall; hsa_dpo keeps none
    chip = {3e-6: (0.5, 0.98), 1e-5: (0.4, 0.97), 3e-5: (0.2, 0.90)}
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        write_validation(folder, "sft", 0.6, 0.98)
        for lr in lab_v3.LR_GRID:
            for name in lab_v3.grid_arms():
                write_validation(folder, name, 0.5, 0.98)
            for recipe in (*lab_v3.METHOD_RECIPES, lab_v3.RECIPE_BASELINE):
                every, recall = chip[lr] if recipe == "chip" else (0.5, 0.5 if recipe == "hsa_dpo" else 0.98)
                write_validation(folder, f"{recipe}_lr{lr:g}", every, recall)
    args = ["choose", "--seeds", "0", "1", "--output-dir", str(tmp_path), "--results", str(tmp_path / "results")]
    assert lab_v3.main(args) == 0
    methods = json.loads((tmp_path / "results" / "tuning.json").read_text())["methods"]
    assert methods["chosen"]["chip"] == 1e-5 and methods["chosen"]["tdpo1"] == 3e-6  # ties: the smaller lr
    assert "hsa_dpo" not in methods["chosen"] and "hsa_dpo" in methods["no_admissible_lr"]
