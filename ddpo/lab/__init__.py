"""The synthetic benchmark pipeline ("the lab"): SFT on noisy captions, preference training, evaluation
against the synthetic world's ground truth (`ddpo demo`)."""
