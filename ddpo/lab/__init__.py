"""The synthetic benchmark ("the lab"): SFT on biased captions, preference training, evaluation against
the synthetic world's ground truth; `ddpo demo` and the studies in experiments/ are built on it.

    settings.py    DemoSettings (one lab run), base_config, train_config, generation_options
    world.py       synthetic_config, split (seeded per use), single_object_scenes, cell_targets
    sft.py         sft, pretrain_perception (SFTSettings, PerceptionSettings)
    gate.py        perception_gate, GateError, gate_line, loss_plateau
    evaluation.py  evaluate_model, drift, DriftProbe; METRICS, PRIOR_METRICS, CLAIM_ERRORS
    stages.py      stage_sft .. stage_eval, run (cached, resumable), train_with_sweep; STAGES
    pairs.py       answer_tokens, segment_subsets, write_pairs
    recipes.py     the studies' named runs as `ddpo train` overrides (lr grids, ablation parts, regime
                   runs, configs/methods recipes)
    selection.py   the validation rule: best_lr, choose_lrs, select_checkpoint
    stats.py       paired differences, t-intervals, paired t-test, Holm, matched-drift reads
    report.py      the demo's table and plot; cells, table heads and figures for the studies
    regime.py      the dense-regime map's points
    demo.py        `ddpo demo`
"""
