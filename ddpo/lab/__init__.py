"""The synthetic benchmark ("the lab"): SFT on biased captions, preference training, evaluation against
the synthetic world's ground truth; `ddpo demo` and the studies in experiments/ are built on it.

    settings.py    DemoSettings (one lab run), base_config, train_config, generation_options
    world.py       synthetic_config, split (seeded per use), single_object_scenes, cell_targets (shape, colour, cell)
    sft.py         sft, pretrain_perception, reset_position_embeddings (SFTSettings, PerceptionSettings)
    gate.py        perception_gate (per kind: shape, colour, position, count), count_probe, GateError, gate_line
    evaluation.py  evaluate_model, drift, DriftProbe; METRICS, PRIOR_METRICS, CLAIM_ERRORS
    stages.py      stage_sft .. stage_eval, run (cached, resumable), train_with_sweep; STAGES
    pairs.py       answer_tokens, segment_subsets, write_pairs
    recipes.py     the studies' named runs as `ddpo train` overrides (lr grids, ablation parts, regime
                   runs, configs/methods recipes)
    selection.py   the validation rule: best_lr, choose_lrs, select_checkpoint
    stats.py       paired differences, t-intervals, paired t-test, Holm, matched-drift reads
    report.py      the demo's tables (RLHF-V Table 3's endpoints) and plot; cells, heads and figures for studies
    regime.py      the dense-regime map's points
    demo.py        `ddpo demo`
"""
