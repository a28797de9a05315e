"""The signal math, each function alone."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from trimtab.controller.signals import ema, ema_var, ols_slope, t_stat, zscore


def test_ema_first_value_seeds_then_moves_by_alpha():
    assert ema(None, 3.0, 0.1) == 3.0
    assert ema(3.0, 5.0, 0.25) == pytest.approx(3.5)
    assert ema(3.0, 5.0, 1.0) == 5.0


def test_ema_var_seeds_with_zero_variance():
    assert ema_var(None, None, 2.5, 0.1) == (2.5, 0.0)


def test_ema_var_with_alpha_one_over_n_is_the_running_population_moments():
    rng = random.Random(1)
    xs = [rng.gauss(3.0, 2.0) for _ in range(50)]
    mean = var = None
    for n, x in enumerate(xs, start=1):
        mean, var = ema_var(mean, var, x, 1.0 / n)
    assert mean == pytest.approx(statistics.fmean(xs))
    assert var == pytest.approx(statistics.pvariance(xs))


def test_ema_var_matches_the_exponentially_weighted_definition():
    # Weights alpha*(1-alpha)^k on x_{n-k}, and (1-alpha)^(n-1) on the seed x_0.
    rng = random.Random(2)
    xs = [rng.gauss(0.0, 1.0) for _ in range(30)]
    alpha = 0.2
    mean = var = None
    for x in xs:
        mean, var = ema_var(mean, var, x, alpha)
    n = len(xs)
    w = [alpha * (1 - alpha) ** (n - 1 - i) for i in range(1, n)]
    w.insert(0, (1 - alpha) ** (n - 1))
    m = sum(wi * xi for wi, xi in zip(w, xs, strict=True))
    v = sum(wi * (xi - m) ** 2 for wi, xi in zip(w, xs, strict=True))
    assert mean == pytest.approx(m)
    assert var == pytest.approx(v)


def test_zscore_and_its_guards():
    assert zscore(5.0, 3.0, 1.0, 0.0) == 2.0
    assert zscore(1.0, 3.0, 4.0, 0.0) == -1.0
    assert zscore(None, 3.0, 1.0, 0.0) is None
    assert zscore(1.0, None, 1.0, 0.0) is None
    assert zscore(math.nan, 3.0, 1.0, 0.0) is None
    # A flat history gives a large but finite score, not a division by zero.
    assert zscore(3.001, 3.0, 0.0, 1e-12) == pytest.approx(1e3)


def test_ols_slope_of_an_exact_line_has_zero_error():
    slope, se = ols_slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
    assert (slope, se) == (2.0, 0.0)


def test_ols_slope_matches_the_textbook_standard_error():
    rng = np.random.default_rng(3)
    xs = np.arange(40, dtype=float) * 10
    ys = 2.0 - 0.003 * xs + rng.normal(0, 0.1, xs.size)
    slope, se = ols_slope(list(xs), list(ys))
    fit, cov = np.polyfit(xs, ys, 1, cov="unscaled")
    resid = ys - np.polyval(fit, xs)
    expected_se = math.sqrt(resid @ resid / (xs.size - 2) * cov[0, 0])
    assert slope == pytest.approx(fit[0])
    assert se == pytest.approx(expected_se)


def test_ols_slope_keeps_precision_at_large_step_numbers():
    xs = [1e9 + 10 * i for i in range(20)]
    slope, _ = ols_slope(xs, [5.0 - 1e-4 * 10 * i for i in range(20)])
    assert slope == pytest.approx(-1e-4, rel=1e-9)


def test_ols_slope_skips_missing_points_and_needs_three():
    slope, se = ols_slope([0, 1, 2, 3, 4], [1.0, None, math.nan, 4.0, 5.0])
    assert slope == pytest.approx(ols_slope([0, 3, 4], [1.0, 4.0, 5.0])[0])
    assert all(math.isnan(v) for v in ols_slope([0, 1, 2], [1.0, None, 2.0]))
    assert all(math.isnan(v) for v in ols_slope([], []))
    assert all(math.isnan(v) for v in ols_slope([5, 5, 5], [1.0, 2.0, 3.0]))


def test_t_stat():
    assert t_stat(-2.0, 0.5) == -4.0
    assert t_stat(-1.0, 0.0) == -math.inf
    assert t_stat(0.0, 0.0) == 0.0
    assert math.isnan(t_stat(math.nan, 1.0))
    assert math.isnan(t_stat(1.0, None))
