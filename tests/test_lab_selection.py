"""The lab's validation rule (ddpo/lab/selection.py): least mention-level hallucination among runs that keep
recall within 0.02 of SFT; a run that wrote unreadable text (absent from the validation table) is no candidate."""

import pytest

from ddpo.lab.selection import best_lr

VALIDATION = {
    "sft": {"mention_hallucination_rate": 0.20, "object_recall": 0.90},
    "a_lr1e-05": {"mention_hallucination_rate": 0.10, "object_recall": 0.89},  # keeps recall: 0.89 >= 0.88
    "a_lr3e-05": {"mention_hallucination_rate": 0.05, "object_recall": 0.80},  # lower, but recall lost
}


def test_the_rule_picks_the_least_hallucination_that_keeps_recall():
    assert best_lr(VALIDATION, {1e-5: "a_lr1e-05", 3e-5: "a_lr3e-05"}) == 1e-5


def test_an_unscorable_run_is_no_candidate_and_none_scorable_is_an_error():
    # a_lr1e-04 is missing from the table: its answers were unparsed (stages.stage_eval records it apart)
    assert best_lr(VALIDATION, {1e-5: "a_lr1e-05", 1e-4: "a_lr1e-04"}) == 1e-5
    with pytest.raises(ValueError, match="could be scored"):
        best_lr(VALIDATION, {1e-4: "a_lr1e-04"})
