"""The lab's paired tests against hand-derived values (ddpo/lab/stats.py)."""

import math

import pytest

from ddpo.lab.stats import holm, one_sided_p, p_value, permutation_p, sign_test_p, t_upper_tail, tost_p


def test_t_tail_matches_closed_forms():
    assert t_upper_tail(0.0, 5) == pytest.approx(0.5, abs=1e-12)
    assert t_upper_tail(1.0, 1) == pytest.approx(0.25, abs=1e-10)  # Cauchy: 1/2 - atan(1)/pi
    # df 2: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2))
    assert t_upper_tail(1.0, 2) == pytest.approx(0.5 - 1 / (2 * math.sqrt(3)), abs=1e-10)
    assert t_upper_tail(-1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)), abs=1e-10)


def test_one_sided_p_halves_the_two_sided_p_in_the_observed_direction():
    diffs = [-0.03, -0.01, -0.02, 0.005, -0.015]
    two = p_value(diffs)
    assert one_sided_p(diffs, below=True) == pytest.approx(two / 2, abs=1e-12)
    assert one_sided_p(diffs, below=False) == pytest.approx(1 - two / 2, abs=1e-12)


def test_tost_is_the_larger_of_the_shifted_one_sided_tests():
    # d = (-1, 0, 1) +- 3: mean 0, sd 1, se 1/sqrt(3); shift by 3 -> t = 3 sqrt(3) with 2 df for both sides
    diffs = [-1.0, 0.0, 1.0]
    t = 3 * math.sqrt(3)
    expected = 0.5 - t / (2 * math.sqrt(2 + t * t))
    assert tost_p(diffs, 3.0) == pytest.approx(expected, abs=1e-10)
    assert tost_p(diffs, 0.1) > 0.4  # a margin far inside the noise cannot show equivalence


def test_sign_and_permutation_tests_by_counting():
    assert sign_test_p([-1, -1, -1, 1], below=True) == pytest.approx(5 / 16)  # P(Bin(4, 1/2) >= 3)
    assert sign_test_p([-1, -1, -1, 1], below=False) == pytest.approx(15 / 16)
    assert sign_test_p([0, -1, -2], below=True) == pytest.approx(1 / 4)  # the tie is dropped
    # |d| = 1, 2, 3, 1 (sum 7), observed sum -5: flips with sum <= -5 are those whose negative part is >= 6:
    # {2, 3, 1a}, {2, 3, 1b}, {1, 2, 3, 1}: 3 of 16
    assert permutation_p([-1, -2, -3, 1], below=True) == pytest.approx(3 / 16)
    # and sums >= -5: every flip but the all-negative one (sum -7)
    assert permutation_p([-1, -2, -3, 1], below=False) == pytest.approx(15 / 16)


def test_holm_multiplies_by_rank_and_keeps_order():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
