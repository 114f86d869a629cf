"""Where did training move the policy: on the corrected tokens or everywhere? (v2 lab, training pairs)

    python experiments/edit_locality.py --lab-dir runs/synthetic_v2 --seeds 0 1 3 4 5 \
        --runs dpo_sum_lr1e-05 ddpo_sum_g5_tuned dpo_mean_lr1e-05 ddpo_mean_g5_tuned

For every run (a policy trained from the seed's SFT model) and every training pair, the per-token
log-ratio policy / SFT on the chosen and the rejected answers, split by the trainer's own corrected
mask (PairBatch.corrected). Printed per run, mean over seeds: the mean log-ratio on corrected and on
unchanged tokens of each side, and the share of all |log-ratio| mass that sits on corrected tokens
(the corrected tokens' share of the tokens is printed beside it). The mechanism behind the v2 lab's
matched-drift result: under the sum, does DDPO move the edits and leave the rest?
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ddpo.data.collator import PairCollator, PairDataset, PairEncoder
from ddpo.data.formats import load_records
from ddpo.lab.settings import DemoSettings, train_config
from ddpo.models.build import load_model


@torch.no_grad()
def token_logps(model, batches: list) -> list[torch.Tensor]:
    """Per batch: the token log-probs [2B, T-1] of its answers (chosen rows first)."""
    return [torch.cat(model(batch)) for batch in batches]


def locality(seed_dir: Path, seed: int, runs: list[str]) -> dict:
    settings = DemoSettings(output_dir=str(seed_dir), seed=seed)
    cfg = train_config(settings, seed_dir, seed_dir / "runs" / "_locality", {})
    records = load_records(cfg.data, seed=seed)
    sft = load_model(seed_dir / "sft")
    dataset = PairDataset(records, PairEncoder.from_config(cfg.data, sft.tokenizer, sft.image_placeholder))
    collate = PairCollator(
        pad_token_id=sft.tokenizer.pad_token_id,
        padding_side=cfg.data.padding_side,
        image_transform=sft.preprocess_images,
    )
    # encoded and collated once (images decoded once), then run through every model
    batches = [
        collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        for start in range(0, len(dataset), 64)
    ]
    reference = token_logps(sft, batches)
    out = {}
    for run in runs:
        policy = load_model(seed_dir / "runs" / run / "final")
        sums = {k: 0.0 for k in ("chosen_corrected", "chosen_unchanged", "rejected_corrected", "rejected_unchanged")}
        counts = dict.fromkeys(sums, 0)
        mass = {"corrected": 0.0, "all": 0.0}
        for batch, logps, ref in zip(batches, token_logps(policy, batches), reference):
            ratio = logps - ref  # [2B, T-1], chosen rows first
            b = batch.num_pairs
            for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
                answer, corrected = batch.answer_mask[rows], batch.corrected[rows] & batch.answer_mask[rows]
                for part, mask in (("corrected", corrected), ("unchanged", answer & ~corrected)):
                    sums[f"{side}_{part}"] += float(ratio[rows][mask].sum())
                    counts[f"{side}_{part}"] += int(mask.sum())
            answer = batch.answer_mask
            mass["corrected"] += float(ratio[batch.corrected & answer].abs().sum())
            mass["all"] += float(ratio[answer].abs().sum())
        row = {k: sums[k] / max(counts[k], 1) for k in sums}
        row["corrected_share_of_movement"] = mass["corrected"] / mass["all"]
        row["corrected_share_of_tokens"] = (counts["chosen_corrected"] + counts["rejected_corrected"]) / sum(
            counts.values()
        )
        out[run] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", default="runs/synthetic_v2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 3, 4, 5])
    parser.add_argument(
        "--runs", nargs="+", default=["dpo_sum_lr1e-05", "ddpo_sum_g5_tuned", "dpo_mean_lr1e-05", "ddpo_mean_g5_tuned"]
    )
    parser.add_argument("--output", default=None, help="write the per-seed numbers as JSON here")
    args = parser.parse_args(argv)
    per_seed = {s: locality(Path(args.lab_dir) / f"seed{s}", s, args.runs) for s in args.seeds}
    keys = list(next(iter(per_seed.values()))[args.runs[0]])
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for run in args.runs:
        print(
            f"| {run} | "
            + " | ".join(f"{statistics.fmean(per_seed[s][run][k] for s in args.seeds):+.4f}" for k in keys)
            + " |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(per_seed, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
