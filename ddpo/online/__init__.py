"""Online RLAIF-V tools: implicit-reward scoring, feedback sources, pair construction, best-of-N."""
