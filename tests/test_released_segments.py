"""configs/rlhfv/released.yaml marks the same corrected tokens as the released RLHF-V code.

The released algorithm is written out again here, independently of ddpo/data/segments.py, from
thunlp/Muffin (commit 85d72b4):
  - muffin/train/train_muffin.py, `DataCollatorForDPODataset.__call__`: for each pair it takes the whole
    `input_ids` of the rejected and the chosen sequence minus their first token (BOS), diffs them with
    `get_diff_ids(rejected[1:], chosen[1:], min_match_size=3)` and sets the token weight to gamma at the
    returned indices of the shifted sequences (index k = the label of token k + 1);
  - utils/diff_lib.py, `get_match_info`: `difflib.SequenceMatcher(None, a, b)` with difflib's defaults
    (autojunk on), matching blocks shorter than min_match_size dropped except the final (len, len, 0) one;
    `complete_modification_spans`: the kept blocks cut each sequence into [gap, match, gap, match, ...];
    `generate_modification_mapping_impl`: a gap is a modification only when non-empty on both sides.

Our side is the whole data path: the config file -> `PairEncoder.from_config` -> `EncodedPair` masks, on
a word-level tokenizer (one token per word, so random word edits are random token edits) and Muffin's
prompt layout (system prompt, 64 image-patch tokens between <im_start>/<im_end>, question).
"""

import difflib
import random
from pathlib import Path

import pytest
from PIL import Image

from ddpo.config import load_config
from ddpo.data.collator import PairEncoder
from ddpo.data.records import PreferenceRecord
from ddpo.data.tokenizer import build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "<im_start>" + "<im_patch>" * 64 + "<im_end>"  # Muffin: num_query 64, mm_use_im_start_end True
VOCAB = [f"w{k}" for k in range(60)]
# Zipf-like word frequencies: a few words fill more than 1% of a long answer, as "the" and "." do, so
# difflib's autojunk (on in the released code for sequences of 200+ tokens) has popular ids to drop.
WEIGHTS = [1 / (k + 1) ** 1.3 for k in range(len(VOCAB))]
QUESTIONS = ["Describe the image in detail .", "What is in the picture ?", "w3 w7 w1 w3 ?"]
NUM_PAIRS = 300


def released_gamma_positions(rejected_full: list[int], chosen_full: list[int], autojunk: bool = True):
    """Indices into (rejected[1:], chosen[1:]) that the released collator gives weight gamma (min_match_size 3;
    `autojunk` False only to show that the comparison can tell it apart)."""
    a, b, min_match_size = rejected_full[1:], chosen_full[1:], 3
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=autojunk).get_matching_blocks()  # released: defaults
    blocks = [m for m in blocks[:-1] if m.size >= min_match_size] + [blocks[-1]]
    # Alternating spans, gap first: gap k sits before kept block k (the last gap ends at the sentinel).
    a_spans, b_spans, a_end, b_end = [], [], 0, 0
    for m in blocks:
        a_spans += [(a_end, m.a), (m.a, m.a + m.size)]
        b_spans += [(b_end, m.b), (m.b, m.b + m.size)]
        a_end, b_end = m.a + m.size, m.b + m.size
    a_ids, b_ids = set(), set()
    for (a_lo, a_hi), (b_lo, b_hi) in list(zip(a_spans, b_spans))[::2]:  # the gaps
        if a_hi > a_lo and b_hi > b_lo:
            a_ids.update(range(a_lo, a_hi))
            b_ids.update(range(b_lo, b_hi))
    return a_ids, b_ids


def edit(words: list[str], rng: random.Random) -> list[str]:
    """1-6 random edits: replacements, insertions, deletions of 1-12 words (short ones likelier), often a few
    words after the previous edit: the short common runs between such edits are where autojunk matters."""
    out, at = list(words), None
    for _ in range(rng.randint(1, 6)):
        kind, size = rng.choice(["replace", "insert", "delete"]), min(rng.randint(1, 12), rng.randint(1, 12))
        if at is not None and rng.random() < 0.6:
            at = min(len(out), at + rng.randint(2, 6))
        else:
            at = rng.choice([0, len(out), rng.randint(0, len(out))])  # the answer's ends are edited often too
        new = rng.choices(VOCAB, WEIGHTS, k=size)
        if kind == "insert":
            out[at:at] = new
        elif kind == "delete":
            del out[at : at + size]
        else:
            out[at : at + size] = new
    return out or ["w0"]


def random_records(n: int, seed: int = 0) -> list[PreferenceRecord]:
    """Seeded (rejected = model answer, chosen = its edited correction) pairs of 3-300 words."""
    rng = random.Random(seed)
    records = []
    for row in range(n):
        rejected = rng.choices(VOCAB, WEIGHTS, k=rng.choice([rng.randint(3, 40), rng.randint(40, 300)]))
        chosen = edit(rejected, rng)
        records.append(
            PreferenceRecord(
                images=[Image.new("RGB", (4, 4))],
                prompt=rng.choice(QUESTIONS),
                chosen=" ".join(chosen),
                rejected=" ".join(rejected),
                row_index=row,
            )
        )
    return records


@pytest.fixture(scope="module")
def released():
    cfg = load_config(REPO / "configs" / "rlhfv" / "released.yaml")
    tokenizer = build_word_tokenizer([" ".join(VOCAB), *QUESTIONS])
    return cfg, tokenizer


def test_released_config_sets_the_released_segment_finder(released):
    cfg, _ = released
    d = cfg.data
    assert (d.segments, d.min_match, d.include_insertions) == ("token_diff", 3, False)
    assert (d.segment_diff, d.label_span) == ("muffin", "muffin")
    assert (cfg.loss.beta, cfg.loss.gamma, cfg.loss.normalize, cfg.loss.sft_weight) == (0.1, 1.1, "sum", 0.0)


def test_masks_equal_the_released_algorithm_on_random_edits(released):
    cfg, tokenizer = released
    encoder = PairEncoder.from_config(cfg.data, tokenizer, PLACEHOLDER)
    plain = PairEncoder.from_config(type(cfg.data)(), tokenizer, PLACEHOLDER)  # the default: answers only
    differs_from_default = long_pairs = autojunk_matters = 0
    for record in random_records(NUM_PAIRS):
        pair = encoder.encode(record)
        assert pair.chosen_ids[0] == tokenizer.convert_tokens_to_ids("###")  # label_span muffin: role prefix labelled
        rejected_full, chosen_full = pair.prompt_ids + pair.rejected_ids, pair.prompt_ids + pair.chosen_ids
        r_mod, c_mod = released_gamma_positions(rejected_full, chosen_full)
        # Shifted index k is full-sequence token k + 1; the answer starts at len(prompt_ids).
        start = len(pair.prompt_ids) - 1
        assert min(r_mod | c_mod, default=start) >= start, f"row {record.row_index}: the released diff marked prompt"
        expected_chosen = [start + j in c_mod for j in range(len(pair.chosen_ids))]
        expected_rejected = [start + j in r_mod for j in range(len(pair.rejected_ids))]
        assert (pair.chosen_corrected, pair.rejected_corrected) == (expected_chosen, expected_rejected), (
            f"row {record.row_index}: chosen {record.chosen!r} rejected {record.rejected!r}"
        )
        default = plain.encode(record)
        differs_from_default += (default.chosen_corrected, default.rejected_corrected) != (
            pair.chosen_corrected[3:],
            pair.rejected_corrected[3:],
        )
        long_pairs += len(chosen_full) > 201  # difflib's autojunk applies from 200 items of the diffed chosen side
        autojunk_matters += (r_mod, c_mod) != released_gamma_positions(rejected_full, chosen_full, autojunk=False)
    # The comparison covers both regimes, and the switches matter on this data (the test can tell them apart).
    assert long_pairs > NUM_PAIRS // 4 and NUM_PAIRS - long_pairs > NUM_PAIRS // 4
    assert differs_from_default > 10 and autojunk_matters > 10
