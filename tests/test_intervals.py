"""Confidence intervals on fixed numbers: Wilson, Newcombe's paired method 10, BCa bootstrap, and the
rows a gate would need (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate import _summarise
from tasks.intervals import (
    BCA,
    NEWCOMBE,
    PAIRED_BCA,
    WILSON,
    WILSON_TIES,
    bca_interval,
    metric_interval,
    newcombe_paired_interval,
    paired_interval,
    paired_table,
    scaled_rows_needed,
    wilson_interval,
    wilson_rows_needed,
    z_value,
)
from tunegate.config import EvaluateSection

Z2 = z_value(0.95) ** 2  # 3.8415


def test_wilson_never_collapses_at_all_or_nothing():
    # 15/15: lower bound n / (n + z^2), not 1; 0/28: upper bound z^2 / (n + z^2), not 0
    assert wilson_interval(15, 15) == pytest.approx((15 / (15 + Z2), 1.0), abs=1e-12)
    assert wilson_interval(15, 15)[0] == pytest.approx(0.796117, abs=1e-6)
    assert wilson_interval(0, 28) == pytest.approx((0.0, 0.120643), abs=1e-6)
    assert wilson_interval(10, 12) == pytest.approx((0.551969, 0.953035), abs=1e-6)
    assert wilson_interval(1, 1)[0] == pytest.approx(0.206549, abs=1e-6)  # one row still says little
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_matches_scipy_on_every_count_up_to_40():
    from scipy.stats import binomtest

    for n in range(1, 41):
        for k in range(n + 1):
            expected = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
            low, high = wilson_interval(k, n, 0.9)
            assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12), (k, n)
            assert high - low > 0


def test_each_metric_gets_the_method_its_values_call_for():
    assert metric_interval([1.0] * 15)[:2] == pytest.approx((15 / (15 + Z2), 1.0))
    assert metric_interval([1.0] * 15).method == WILSON
    # win rates, ties counting half: Wilson on the mean (6.5 of 10)
    ties = metric_interval([1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0])
    assert ties.method == WILSON_TIES and (ties.low, ties.high) == pytest.approx(wilson_interval(6.5, 10))
    # a token-weighted loss is a ratio, not a proportion, even when every row is 0 or 1
    assert metric_interval([1.0, 0.0, 1.0], [10, 20, 30]).method == BCA
    assert metric_interval([2.1, 1.7, 2.4]).method == BCA


def test_newcombe_matches_the_published_example():
    # Cavo et al. 2012 (complete response before/after consolidation), the worked example of Fagerland,
    # Lydersen & Laake 2014 (Stat. Med. 33:2850) for Newcombe's square-and-add interval:
    # estimate -0.0621, 95% CI -0.1186 to -0.0046
    low, high = newcombe_paired_interval(59, 6, 16, 80)
    assert (6 - 16) / 161 == pytest.approx(-0.0621, abs=5e-5)
    assert (low, high) == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def test_a_paired_difference_of_all_against_nothing_is_not_zero_width():
    for n in (1, 15, 28):
        got = paired_interval([1.0] * n, [0.0] * n)
        # no concordant pairs, phi = 0: L = 1 - sqrt(2) z^2 / (n + z^2), U = 1
        assert got.method == NEWCOMBE
        assert (got.low, got.high) == pytest.approx((1 - math.sqrt(2) * Z2 / (n + Z2), 1.0), abs=1e-12)
    assert paired_interval([1.0] * 15, [0.0] * 15).low == pytest.approx(0.711665, abs=1e-6)
    # identical answers everywhere: no difference seen, but not "no difference possible"
    same = paired_interval([1.0] * 20, [1.0] * 20)
    assert (same.low, same.high) == pytest.approx((-Z2 / (20 + Z2), Z2 / (20 + Z2)), abs=1e-12)
    assert paired_table([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="same rows on both sides: 3 vs 2"):
        paired_interval([1.0, 0.0, 1.0], [1.0, 0.0])


def test_newcombe_holds_its_shape_on_every_small_table():
    for n in range(1, 9):
        for a in range(n + 1):
            for b in range(n + 1 - a):
                for c in range(n + 1 - a - b):
                    low, high = newcombe_paired_interval(a, b, c, n - a - b - c)
                    delta = (b - c) / n
                    assert -1 <= low <= delta <= high <= 1, (a, b, c, n)
                    assert high - low > 0.05, (a, b, c, n)


def _exact_coverage(n: int, interval) -> callable:
    """Exact coverage of a paired interval at cell probabilities pi: the multinomial probability of every
    n-row table whose interval contains pi_b - pi_c."""
    tables = np.array(
        [
            (a, b, c, n - a - b - c)
            for a in range(n + 1)
            for b in range(n + 1 - a)
            for c in range(n + 1 - a - b)
        ]
    )
    bounds = np.array([interval(*t) for t in tables])
    log_count = np.array([math.lgamma(n + 1) - sum(math.lgamma(x + 1) for x in t) for t in tables])

    def coverage(pi) -> float:
        p = np.exp(log_count + (tables * np.log(pi)).sum(axis=1))
        delta = pi[1] - pi[2]
        inside = (bounds[:, 0] <= delta + 1e-12) & (delta - 1e-12 <= bounds[:, 1])
        return float(p[inside].sum())

    return coverage


def test_newcombe_covers_the_true_difference_at_the_nominal_rate():
    z = z_value(0.95)

    def wald(a, b, c, d):
        n = a + b + c + d
        delta = (b - c) / n
        half = z * math.sqrt(max((b + c) / n - delta**2, 0.0) / n)
        return delta - half, delta + half

    newcombe, naive = _exact_coverage(20, newcombe_paired_interval), _exact_coverage(20, wald)
    points = np.random.default_rng(0).dirichlet([1, 1, 1, 1], size=200)
    covered = [newcombe(pi) for pi in points]
    # exact, over 200 random 20-row settings: mean 0.954, the worst 0.928 (Newcombe 1998 reports the
    # method's mean coverage just above nominal)
    assert np.mean(covered) == pytest.approx(0.954, abs=0.002) and min(covered) > 0.925
    # where it matters, few discordant pairs near the edge, the Wald interval collapses and misses
    edge = (0.85, 0.05, 0.02, 0.08)
    assert newcombe(edge) > 0.99 and naive(edge) == pytest.approx(0.761, abs=1e-3)


def test_bca_matches_scipy_and_reaches_into_the_skew():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.exponential(size=30)
    w = rng.integers(5, 40, size=30).astype(float)
    y = x + rng.normal(0, 0.5, size=30)

    def scipy_bca(data, statistic, seed):
        res = stats.bootstrap(
            data, statistic, paired=True, vectorized=True, method="BCa", n_resamples=4000, rng=seed
        )
        return res.confidence_interval.low, res.confidence_interval.high

    # the same seed draws the same resampled rows as scipy's BCa, so the intervals agree exactly
    ours = bca_interval(x, resamples=4000, seed=2)
    assert ours == pytest.approx(scipy_bca((x,), lambda a, axis: a.mean(axis=axis), 2), abs=1e-9)
    weighted = bca_interval(x, w, resamples=4000, seed=3)
    ratio = lambda a, b, axis: (a * b).sum(axis=axis) / b.sum(axis=axis)  # noqa: E731
    assert weighted == pytest.approx(scipy_bca((x, w), ratio, 3), abs=1e-9)
    paired = bca_interval(y, baseline=x, resamples=4000, seed=4)
    diff = lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis)  # noqa: E731
    assert paired == pytest.approx(scipy_bca((y, x), diff, 4), abs=1e-9)
    # exponential data skew right: the interval reaches further above the mean than below it
    assert ours[1] - x.mean() > 1.2 * (x.mean() - ours[0])
    assert bca_interval([0.7] * 50) == pytest.approx((0.7, 0.7), abs=1e-12)  # no spread to measure
    assert paired_interval(list(y), list(x)).method == PAIRED_BCA


def test_rows_needed_to_resolve_a_threshold():
    # 15/15 against 0.8: the Wilson lower bound n / (n + z^2) clears 0.8 from n > 4 z^2 = 15.37
    assert wilson_rows_needed(1.0, 0.8) == 16
    # 10/12 against 0.8: at the observed 0.833 the lower bound first clears 0.8 at 554 rows
    rows = wilson_rows_needed(10 / 12, 0.8)
    assert rows == 554
    assert wilson_interval(10 / 12 * 554, 554)[0] > 0.8 > wilson_interval(10 / 12 * 553, 553)[0]
    # below the threshold, the upper bound has to come down under it
    assert wilson_rows_needed(0.7, 0.8) == 62
    assert wilson_interval(0.7 * 62, 62)[1] < 0.8 < wilson_interval(0.7 * 61, 61)[1]
    assert wilson_rows_needed(0.8, 0.8) is None
    assert scaled_rows_needed(70, 0.1, 0.06) == 195  # 70 (0.1 / 0.06)^2 = 194.4
    assert scaled_rows_needed(70, 0.0, 0.06) is None


def test_the_evaluation_summary_records_every_interval_with_its_method():
    per_row = {
        "base": {"fact_accuracy": [0.0] * 28, "regex_match": [0.0] * 15, "eval_loss": [2.0, 2.6, 1.9]},
        "candidate": {"fact_accuracy": [1.0] * 28, "regex_match": [1.0] * 15, "eval_loss": [1.1, 1.4, 0.9]},
    }
    weights = {label: {"eval_loss": [40.0, 12.0, 25.0]} for label in per_row}
    scalars = {label: {"size_mb": 1.0} for label in per_row}
    scores, intervals, deltas, methods, delta_methods = _summarise(
        EvaluateSection(), per_row, weights, scalars, seed=0
    )
    assert intervals["candidate"]["regex_match"] == pytest.approx([0.796117, 1.0], abs=1e-6)
    assert intervals["base"]["fact_accuracy"] == pytest.approx([0.0, 0.120643], abs=1e-6)
    # 28 of 28 against 0 of 28 on the same rows: 1 - sqrt(2) * 0.12064
    assert deltas["base"]["fact_accuracy"] == pytest.approx([0.829385, 1.0], abs=1e-6)
    assert methods["candidate"] == {
        "fact_accuracy": WILSON,
        "regex_match": WILSON,
        "eval_loss": BCA,
        "perplexity": f"{BCA} (exp of eval_loss)",
    }
    assert delta_methods["base"] == {
        "eval_loss": PAIRED_BCA,
        "fact_accuracy": NEWCOMBE,
        "regex_match": NEWCOMBE,
    }
    assert scores["candidate"]["eval_loss"] == pytest.approx((1.1 * 40 + 1.4 * 12 + 0.9 * 25) / 77)
    assert intervals["candidate"]["perplexity"] == pytest.approx(
        [math.exp(x) for x in intervals["candidate"]["eval_loss"]]
    )
