"""A lab point's preference pairs on disk (pairs/train.jsonl + pairs/images, `data.format: jsonl`):
their answer length, subsets by corrected segments per pair, and online pairs written in that format."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def read_rows(train_file: Path) -> list[dict]:
    return [json.loads(line) for line in train_file.read_text().splitlines()]


def answer_tokens(train_file: Path) -> float:
    """Mean tokens (words and punctuation: the world's tokenizer is word-level) of the rejected answers."""
    from ddpo.data.segments import words_with_spans

    return statistics.fmean(len(words_with_spans(r["rejected"])[0]) for r in read_rows(train_file))


def segment_subsets(out: Path, subsets: dict[str, tuple[int, int]], n_pairs: int) -> dict[str, Path]:
    """The point's pairs split by corrected segments per pair, as the trainer's diff counts them
    (data/synthetic/pairs.py diff_segments): for each subset name -> (fewest, most) segments, the first
    `n_pairs` such pairs in file order -> out/segment_pairs/<subset>.jsonl, with their statistics in
    stats.json; images stay in the point's pairs/images."""
    from ddpo.data.synthetic.language import n_words
    from ddpo.data.synthetic.pairs import diff_segments

    rows = read_rows(out / "pairs" / "train.jsonl")
    diffs = [diff_segments(r["rejected"], r["chosen"]) for r in rows]
    files, stats = {}, {}
    for subset, (low, high) in subsets.items():
        chosen = [i for i, (segments, _) in enumerate(diffs) if low <= segments <= high][:n_pairs]
        if len(chosen) < n_pairs:
            raise ValueError(f"{out}: only {len(chosen)} pairs with {low}-{high} segments, {n_pairs} needed")
        files[subset] = out / "segment_pairs" / f"{subset}.jsonl"
        files[subset].parent.mkdir(exist_ok=True)
        files[subset].write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
        stats[subset] = {
            "segments_per_pair": statistics.fmean(diffs[i][0] for i in chosen),
            "corrected_word_share": sum(diffs[i][1] for i in chosen)
            / sum(n_words(rows[i]["rejected"]) for i in chosen),
        }
    (out / "segment_pairs" / "stats.json").write_text(json.dumps(stats, indent=2))
    return files


def write_pairs(pairs, images, prompts, directory: Path) -> Path:
    """Online pairs (`ddpo.online.pairs.Pair`) as `data.format: jsonl` + an image folder; images named
    by prompt index, each written once."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(pairs):
            name = f"{p.prompt_index:05d}.png"
            if not (directory / "images" / name).is_file():
                images[p.prompt_index].save(directory / "images" / name)
            row = {
                "idx": f"r-{i}",
                "image": name,
                "question": prompts[p.prompt_index],
                "chosen": p.chosen,
                "rejected": p.rejected,
                "chosen_score": p.chosen_score,
                "rejected_score": p.rejected_score,
            }
            f.write(json.dumps(row) + "\n")
    return directory / "train.jsonl"
