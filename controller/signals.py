"""Signal math: pure functions over plain floats, no state of their own.

A job's :class:`~trimtab.controller.state.JobState` keeps the running values and
calls these to update them, so each formula is tested alone.

>>> m, v = ema_var(None, None, 2.0, 0.5)
>>> m, v = ema_var(m, v, 4.0, 0.5)
>>> (m, v)
(3.0, 1.0)
>>> zscore(5.0, m, v, 0.0)
2.0
>>> slope, se = ols_slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
>>> (slope, se)
(2.0, 0.0)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["ema", "ema_var", "zscore", "ols_slope", "t_stat", "lined_up"]


def ema(prev: float | None, x: float, alpha: float) -> float:
    """Exponential moving average: ``alpha * x + (1 - alpha) * prev``; the first value seeds it."""
    if prev is None:
        return float(x)
    return prev + alpha * (x - prev)


def ema_var(
    mean: float | None, var: float | None, x: float, alpha: float
) -> tuple[float, float]:
    """One step of the exponentially weighted mean and variance, ``(mean, var)``.

    West (1979) / Finch (2009), "Incremental calculation of weighted mean and
    variance", section 9: ``d = x - mean; mean += alpha * d;
    var = (1 - alpha) * (var + alpha * d * d)``. The first value seeds the mean
    with variance 0. With ``alpha = 1/n`` it reproduces the running population
    mean and variance exactly, which :class:`JobState` uses while warming up.
    """
    if mean is None or var is None:
        return float(x), 0.0
    diff = x - mean
    incr = alpha * diff
    return mean + incr, (1.0 - alpha) * (var + diff * incr)


def zscore(x: float | None, mean: float | None, var: float | None, eps: float) -> float | None:
    """How many standard deviations ``x`` lies above ``mean``; ``None`` if any input is missing.

    ``eps`` is added to the variance so that a perfectly flat history does not
    turn the smallest wobble into an infinite score.
    """
    if x is None or mean is None or var is None:
        return None
    if not (math.isfinite(x) and math.isfinite(mean) and math.isfinite(var)):
        return None
    return (x - mean) / math.sqrt(max(var, 0.0) + eps)


def ols_slope(
    xs: Sequence[float | None], ys: Sequence[float | None]
) -> tuple[float, float]:
    """Least-squares slope of ``ys`` on ``xs`` and its standard error.

    ``xs`` and ``ys`` must be the same length. Pairs with a missing or non-finite
    member are skipped. With fewer than three
    usable points, or all ``xs`` equal, both are NaN: a slope from two points has
    no error estimate, and the callers test significance, not sign.
    """
    pts = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=True)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    n = len(pts)
    if n < 3:
        return math.nan, math.nan
    try:
        return _ols(pts)
    except (OverflowError, ValueError):  # losses near the float limit: no usable trend
        return math.nan, math.nan


def _ols(pts: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(pts)
    # Centre first: steps can be ~1e7 and the raw sums would lose the slope to rounding.
    mx = math.fsum(x for x, _ in pts) / n
    my = math.fsum(y for _, y in pts) / n
    sxx = math.fsum((x - mx) * (x - mx) for x, _ in pts)
    if not sxx > 0.0:
        return math.nan, math.nan
    sxy = math.fsum((x - mx) * (y - my) for x, y in pts)
    slope = sxy / sxx
    ssr = math.fsum((y - my - slope * (x - mx)) ** 2 for x, y in pts)
    return slope, math.sqrt(ssr / (n - 2) / sxx)


def t_stat(estimate: float | None, stderr: float | None) -> float:
    """``estimate / stderr``; NaN when either is missing.

    A zero standard error (points exactly on a line) gives ``±inf`` for a
    non-zero estimate and 0 for a zero one: an exactly flat line is not a trend.
    """
    if estimate is None or stderr is None or math.isnan(estimate) or math.isnan(stderr):
        return math.nan
    if stderr == 0.0:
        return 0.0 if estimate == 0.0 else math.copysign(math.inf, estimate)
    return estimate / stderr


def lined_up(alignments: Sequence[float], above: float, at_least: int) -> bool:
    """Whether the updates kept lining up with the next gradient: at least ``at_least``
    alignments (``cos(g, -update)``, one sampled step per report), their median above
    ``above``, and no more than a fifth of them at or below 0.

    The alignment is the hypergradient's sign (Baydin et al. 2018, "Online Learning Rate
    Adaptation with Hypergradient Descent"): above 0, the gradient where a step landed
    still points along the step, so the loss of the next batch kept falling over the
    whole step. A run whose loss rises while nearly every step lines up is not overshooting
    on its LR; what it is fitting moves (a policy-gradient loss as the returns grow, a
    drifting stream). One sampled step spreads a tuned run's alignment by +-0.3, hence
    the median and the fifth.

    >>> lined_up([0.2, 0.3, 0.25], 0.15, 3), lined_up([0.2, 0.3, -0.1], 0.15, 3)
    (True, False)
    """
    if len(alignments) < at_least:
        return False
    against = sum(1 for a in alignments if a <= 0.0)
    return statistics.median(alignments) > above and against <= len(alignments) // 5
