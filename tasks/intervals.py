"""Confidence intervals for evaluation metrics, chosen by what the per-row values are.

- Proportions (every per-row value 0 or 1): the Wilson score interval (Wilson 1927). Unlike a
  bootstrap, it never collapses to zero width at 0/n or n/n: 15/15 gives [0.796, 1] at 95%.
- Scores in {0, 1/2, 1} (win rates, ties counting half): the same Wilson interval on the mean. A value
  in [0, 1] with mean p has variance at most p(1 - p), so the binomial variance the score interval
  inverts is an upper bound and the interval errs wide ("wilson (ties as half)").
- Anything else (token-weighted eval_loss, reward scores): a BCa bootstrap of the (weighted) mean,
  resampling rows (Efron 1987; Efron & Tibshirani 1993, ch. 14), with the acceleration from the
  jackknife.
- Paired differences, candidate minus baseline on the same rows: for two proportions Newcombe's
  method 10 (Newcombe 1998, "Improved confidence intervals for the difference between binomial
  proportions based on paired data", Stat. Med. 17:2635-2650), which combines the two marginal Wilson
  intervals with the correlation of the pair and does not collapse at 0 or 1; otherwise a paired BCa
  bootstrap (the same resampled rows on both sides).

Pure functions of numbers (numpy and the standard library only), so the arithmetic the gates decide on
is tested on fixed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

WILSON = "wilson"
WILSON_TIES = "wilson (ties as half)"
NEWCOMBE = "newcombe-paired"
BCA = "bca-bootstrap"
PAIRED_BCA = "paired-bca-bootstrap"

_NORMAL = NormalDist()


class Interval(NamedTuple):
    low: float
    high: float
    method: str


def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile for `confidence` (1.96 at 0.95)."""
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def is_proportion(values: Sequence[float]) -> bool:
    """Every value is 0 or 1 (a yes/no metric)."""
    return all(v in (0.0, 1.0) for v in values)


def is_score(values: Sequence[float]) -> bool:
    """Every value is 0, 1/2 or 1 (a win rate with ties counting half)."""
    return all(v in (0.0, 0.5, 1.0) for v in values)


def metric_interval(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The interval of a per-row metric's (weighted) mean, by the method its values call for (see the
    module docstring). Weighted values always go to the bootstrap: their mean is not a proportion."""
    if weights is None and values and is_proportion(values):
        return Interval(*wilson_interval(sum(values), len(values), confidence), WILSON)
    if weights is None and values and is_score(values):
        return Interval(*wilson_interval(sum(values), len(values), confidence), WILSON_TIES)
    low, high = bca_interval(values, weights, confidence=confidence, resamples=resamples, seed=seed)
    return Interval(low, high, BCA)


def paired_interval(
    values: Sequence[float],
    baseline: Sequence[float],
    weights: Sequence[float] | None = None,
    baseline_weights: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The interval of mean(values) - mean(baseline), row i of each measured on the same prompt.

    Raises:
        ValueError: the two sides have different numbers of rows (they are not paired).
    """
    if len(values) != len(baseline):
        raise ValueError(
            f"paired interval needs the same rows on both sides: {len(values)} vs {len(baseline)}"
        )
    unweighted = weights is None and baseline_weights is None
    if unweighted and values and is_proportion(values) and is_proportion(baseline):
        a, b, c, d = paired_table(values, baseline)
        return Interval(*newcombe_paired_interval(a, b, c, d, confidence), NEWCOMBE)
    low, high = bca_interval(
        values,
        weights,
        baseline=baseline,
        baseline_weights=baseline_weights,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )
    return Interval(low, high, PAIRED_BCA)


def wilson_interval(successes: float, n: int | float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n`.

    The set of p for which |p_hat - p| <= z * sqrt(p (1 - p) / n), in closed form:
    (p_hat + z^2/2n -/+ z sqrt(p_hat (1 - p_hat)/n + z^2/4n^2)) / (1 + z^2/n). At p_hat = 1 the lower
    bound is n / (n + z^2); at p_hat = 0 the upper bound is z^2 / (n + z^2). (Wilson 1927, JASA 22:209;
    Brown, Cai & DasGupta 2001, Stat. Sci. 16:101, eq. 4.) `successes` may be fractional (ties as half).
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    z = z_value(confidence)
    p = successes / n
    k = z * z / n
    centre = (p + k / 2) / (1 + k)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / (1 + k)
    low = 0.0 if p <= 0 else max(0.0, centre - half)
    high = 1.0 if p >= 1 else min(1.0, centre + half)
    return (low, high)


def paired_table(values: Sequence[float], baseline: Sequence[float]) -> tuple[int, int, int, int]:
    """The paired 2x2 counts (a, b, c, d): both 1, only `values` 1, only `baseline` 1, both 0."""
    a = b = c = d = 0
    for x, y in zip(values, baseline, strict=True):
        if x and y:
            a += 1
        elif x:
            b += 1
        elif y:
            c += 1
        else:
            d += 1
    return a, b, c, d


def newcombe_paired_interval(
    a: float, b: float, c: float, d: float, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's method 10 (square-and-add of Wilson intervals) for p1 - p2 on paired 0/1 data.

    With p1 = (a + b)/n, p2 = (a + c)/n, their Wilson intervals (l1, u1) and (l2, u2), and phi the
    correlation of the pair,
        L = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        U = (p1 - p2) + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)
    where phi = (ad - bc - n/2) / sqrt(efgh) when ad - bc > n/2, 0 when 0 <= ad - bc <= n/2,
    (ad - bc) / sqrt(efgh) when ad - bc < 0, and 0 when a margin e, f, g, h is empty (Newcombe 1998,
    Stat. Med. 17:2635; Fagerland, Lydersen & Laake 2014, Stat. Med. 33:2850, "Newcombe square-and-add").
    """
    n = a + b + c + d
    if n <= 0:
        return (float("nan"), float("nan"))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    delta = p1 - p2
    low = delta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = delta + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return (max(-1.0, low), min(1.0, high))


def bca_interval(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    baseline: Sequence[float] | None = None,
    baseline_weights: Sequence[float] | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bias-corrected and accelerated bootstrap interval of a (weighted) mean over rows.

    Rows are resampled with replacement (seeded). With `baseline`, the statistic is the paired
    difference mean(values) - mean(baseline) on the same resampled rows. The interval is the
    bootstrap distribution's quantiles at Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q))) for
    z_q = -/+ z, where z0 = Phi^-1(share of replicates below the estimate, ties counting half) corrects
    the median bias and the acceleration a = sum(d_i^3) / (6 (sum(d_i^2))^1.5), d_i the jackknife
    deviations (mean of leave-one-out estimates minus each), corrects for skew (Efron 1987, JASA
    82:171; Efron & Tibshirani 1993, eq. 14.9-14.15). When every replicate equals the estimate (all
    rows the same) there is no spread to measure and the interval is the point.
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return (float("nan"), float("nan"))
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    pairs = [(v, w)]
    if baseline is not None:
        b = np.asarray(baseline, dtype=float)
        bw = np.ones(n) if baseline_weights is None else np.asarray(baseline_weights, dtype=float)
        pairs.append((b, bw))

    def estimate(idx: np.ndarray | None) -> np.ndarray | float:
        out = [_weighted_mean(x, xw, idx) for x, xw in pairs]
        return out[0] - out[1] if len(out) == 2 else out[0]

    theta = float(estimate(None))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = np.asarray(estimate(idx))
    spread = np.abs(stats - theta).max()
    if not np.isfinite(spread) or spread <= 1e-12 * max(1.0, abs(theta)):
        return (theta, theta)
    share = (np.sum(stats < theta) + 0.5 * np.sum(stats == theta)) / resamples
    share = min(max(share, 0.5 / resamples), 1 - 0.5 / resamples)
    z0 = _NORMAL.inv_cdf(share)
    accel = _acceleration(pairs)
    z = z_value(confidence)
    levels = []
    for zq in (-z, z):
        shifted = z0 + zq
        levels.append(_NORMAL.cdf(z0 + shifted / (1 - accel * shifted)))
    low, high = np.quantile(stats, levels)
    return (float(low), float(high))


def _weighted_mean(x: np.ndarray, w: np.ndarray, idx: np.ndarray | None) -> np.ndarray | float:
    if idx is None:
        return float((x * w).sum() / max(w.sum(), 1e-12))
    return (x[idx] * w[idx]).sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-12)


def _acceleration(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Jackknife acceleration of the (paired difference of) weighted means."""
    n = len(pairs[0][0])
    if n < 3:
        return 0.0
    loo = []
    for x, w in pairs:  # leave-one-out weighted means, all n at once
        loo.append(((x * w).sum() - x * w) / np.maximum(w.sum() - w, 1e-12))
    jack = loo[0] - loo[1] if len(loo) == 2 else loo[0]
    dev = jack.mean() - jack
    denom = 6 * (dev**2).sum() ** 1.5
    return float((dev**3).sum() / denom) if denom > 0 else 0.0


def wilson_rows_needed(
    rate: float, required: float, confidence: float = 0.95, max_rows: int = 10_000_000
) -> int | None:
    """The fewest rows at which a proportion observed at `rate` has a Wilson interval that excludes
    `required` (the lower bound above it when rate > required, the upper bound below it otherwise).

    Found by bisection: at a fixed rate the Wilson bounds close in on it as n grows. None when rate
    equals required (no number of rows separates them) or more than `max_rows` would be needed.
    """
    if rate == required or not 0 <= rate <= 1:
        return None
    above = rate > required

    def clears(n: int) -> bool:
        low, high = wilson_interval(rate * n, n, confidence)
        return low > required if above else high < required

    if not clears(max_rows):
        return None
    lo, hi = 1, max_rows  # clears(hi) holds; find the least such n
    while lo < hi:
        mid = (lo + hi) // 2
        if clears(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def scaled_rows_needed(n: int, half_width: float, distance: float) -> int | None:
    """Rows at which an interval whose half-width (on the side that faces the requirement) is
    `half_width` at n rows shrinks to `distance`, assuming it shrinks as 1/sqrt(n):
    ceil(n (half_width / distance)^2)."""
    if n <= 0 or distance <= 0 or not math.isfinite(half_width) or half_width <= 0:
        return None
    return math.ceil(n * (half_width / distance) ** 2 - 1e-9)
