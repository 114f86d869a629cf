"""The lab studies' statistics: seeds are the unit, so every comparison is a paired difference per seed,
summarised by its mean, a 95% t-interval and a paired t-test p; families of comparisons are corrected
with Holm; a run can also be compared with another method read at its drift (matched drift)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# two-sided 95% t quantiles by degrees of freedom (the studies have 2 to 11 seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a - b per seed (both in the same seed order)."""
    return [x - y for x, y in zip(a, b, strict=True)]


def interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (one per seed); nan bounds for a single seed."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    half = T95[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def p_value(diffs: Sequence[float]) -> float:
    """Two-sided p of the paired t-test (for the Holm correction); exact t CDF via the regularised
    incomplete beta function."""
    n = len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    if n < 2 or sd == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    t = statistics.fmean(diffs) / (sd / math.sqrt(n))
    df = n - 1
    x = df / (df + t * t)
    return _betainc(df / 2, 0.5, x)


def paired_test(diffs: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, 95% low, 95% high, p) of paired differences."""
    return (*interval(diffs), p_value(diffs))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / d
    h = d
    for m in range(1, 200):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + num / c if abs(1.0 + num / c) > 1e-300 else 1e-300
            h *= d * c
    return front * h / a


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def paired_gaps(runs: Mapping[str, Mapping[str, Sequence[float]]], against: Mapping[str, str]) -> dict:
    """For each run a of `against` (a -> b) present with its b in `runs` ({run: {metric: [per seed]}}):
    {a: {metric: paired_test(a - b)}} for every metric of a."""
    return {
        a: {k: paired_test(paired_differences(runs[a][k], runs[b][k])) for k in runs[a]}
        for a, b in against.items()
        if a in runs and b in runs
    }


def at_drift(points: list[tuple[float, float]], d: float) -> tuple[float, bool]:
    """A metric read at drift d from (drift, metric) points, piecewise linear; extrapolated from the two
    nearest points outside their range (flagged)."""
    points = sorted(points)
    inside = points[0][0] <= d <= points[-1][0]
    k = min(max(1, sum(x < d for x, _ in points)), len(points) - 1)
    (d0, y0), (d1, y1) = points[k - 1], points[k]
    return (y0 + (d - d0) / (d1 - d0) * (y1 - y0) if d1 != d0 else y0), not inside


def matched_differences(
    ladders: list[list[tuple[float, float]]], drifts: Sequence[float], values: Sequence[float]
) -> tuple[list[float], int]:
    """Per seed, a run's metric minus another method's read at the run's drift off that seed's ladder
    [(drift, metric) per lr]; and the number of seeds where the read was extrapolated."""
    diffs, extrapolated = [], 0
    for ladder, d, value in zip(ladders, drifts, values):
        read, outside = at_drift(ladder, d)
        diffs.append(value - read)
        extrapolated += outside
    return diffs, extrapolated


def weighted_share(share: float, gamma: float) -> float:
    """The share of the summed token weight on corrected tokens (a `share` of the tokens) at gamma: where
    the loss's gradient goes."""
    return gamma * share / (gamma * share + 1 - share)


def matched_drift_gaps(
    test: Mapping[str, Mapping[str, Sequence[float]]],
    drift: Mapping[str, Sequence[float]],
    ladders: Mapping[str, Sequence[str]],
    keys: Sequence[str],
) -> dict:
    """A run compared with another method at equal drift instead of equal lr: for each run -> ladder
    (that method's runs at several lrs) with the run and two ladder runs in `test` ({run: {metric: [per
    seed]}}; `drift`: {run: [per seed]}), per seed the run's metric minus the ladder read at the run's
    drift (`matched_differences`). {run: {"drift", "dpo_drift" (the ladder's mean drifts), metric:
    paired_test, and for keys[0] "per_seed" differences and "extrapolated" seeds}}."""
    out = {}
    for run_name, ladder in ladders.items():
        ladder = [n for n in ladder if n in test]
        if run_name not in test or len(ladder) < 2:
            continue
        row = {"drift": statistics.fmean(drift[run_name]), "dpo_drift": [statistics.fmean(drift[n]) for n in ladder]}
        seeds = range(len(drift[run_name]))
        for key in keys:
            diffs, outside = matched_differences(
                [[(drift[n][i], test[n][key][i]) for n in ladder] for i in seeds], drift[run_name], test[run_name][key]
            )
            row[key] = paired_test(diffs)
            if key == keys[0]:
                row["per_seed"], row["extrapolated"] = diffs, outside
        out[run_name] = row
    return out


# ------------------------------------------------------------------------------------------------
# one-sided, equivalence and distribution-free paired tests (lab v3's pre-registered family)
# ------------------------------------------------------------------------------------------------
def t_upper_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    half = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return half if t > 0 else 1.0 - half


def one_sided_p(diffs: Sequence[float], below: bool, shift: float = 0.0) -> float:
    """Paired t-test p of H_a: mean(d) < shift (`below`) or mean(d) > shift."""
    n = len(diffs)
    mean = statistics.fmean(diffs) - shift
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    if n < 2 or sd == 0:
        return 0.0 if (mean < 0 if below else mean > 0) else 1.0
    above = t_upper_tail(mean / (sd / math.sqrt(n)), n - 1)
    return 1.0 - above if below else above


def tost_p(diffs: Sequence[float], margin: float) -> float:
    """Equivalence (TOST) p for |mean(d)| < margin: the larger of the two one-sided t-tests' p."""
    return max(one_sided_p(diffs, below=False, shift=-margin), one_sided_p(diffs, below=True, shift=margin))


def sign_test_p(diffs: Sequence[float], below: bool, shift: float = 0.0) -> float:
    """Exact one-sided sign test of H_a: the median of d is below (above) `shift`; ties with it are dropped."""
    signs = [d - shift for d in diffs if d != shift]
    hits = sum(1 for s in signs if (s < 0 if below else s > 0))
    n = len(signs)
    return sum(math.comb(n, k) for k in range(hits, n + 1)) / 2**n if n else 1.0


def permutation_p(diffs: Sequence[float], below: bool, shift: float = 0.0) -> float:
    """Exact paired sign-flip permutation test of H_a: mean(d) below (above) `shift`: the share of the
    2^n sign assignments of |d - shift| whose sum is at least as extreme as the observed one."""
    values = [d - shift for d in diffs]
    observed = sum(values)
    extreme = 0
    for mask in range(2 ** len(values)):
        total = sum(-abs(v) if mask >> i & 1 else abs(v) for i, v in enumerate(values))
        extreme += total <= observed + 1e-12 if below else total >= observed - 1e-12
    return extreme / 2 ** len(values)
