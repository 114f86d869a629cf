"""Hallucination benchmarks: Object HalBench (CHAIR), MMHal-Bench, POPE / AMBER yes-no, and generation.

Modules: `chair` (COCO word pipeline + CHAIR metrics), `objhal` (COCO ground truth, rule/LLM extraction),
`mmhal` (0–6 judge ratings), `yesno` (POPE/AMBER), `judge` (OpenAI-compatible client + cache),
`generation` (batched answers through `model.generate`), `cli` (`ddpo eval`). Definitions follow the
RLHF-V evaluation code; see each module's docstring for where and why they differ.

Every score stands next to its `unparsed_rate` (answers, judge replies or extractions that could not be
read); above `max_unparsed` (default 0.05) a scoring function raises `UnparsedError` (data/synthetic/metrics.py)
naming the count and the first few instead of returning a score, and `ddpo eval` exits 1 with that message.
"""
