"""The loss-against-LR curve of a sweep: smoothing it, reading when to stop, picking an LR.

The conventions of fastai's ``lr_find`` and torch-lr-finder's ``LRFinder`` (Smith 2017,
"Cyclical Learning Rates for Training Neural Networks", sec. 3.3): a bias-corrected EMA of
the loss, a stop once the smoothed loss passes a multiple of its lowest, and the pick at
the minimum (divided down) or at the steepest fall. Pure functions over ``(lr, loss)``
points; the ``lr_range_test`` policy uses them, and so can any plugin that sweeps.
"""

from __future__ import annotations

import math

__all__ = ["smooth", "stop_reason", "pick_lr", "fell_below", "past", "past_bar"]

# Losses need not be positive (a noise or likelihood term can take them below 0), and a
# ratio to a lowest loss at or below 0 says nothing (every loss is "4x" a negative one):
# the tests "past ratio x the lowest" go through :func:`past`, which measures a rise off a
# lowest at or below 0 in units of the fall to it, and a fall by a fraction is measured on
# the first value's magnitude (:func:`fell_below`).


def past(value: float, low: float, first: float, ratio: float) -> bool:
    """Whether ``value`` lies past ``ratio`` x the lowest loss ``low`` of a curve that
    began at ``first``: ``value > ratio * low`` for a positive ``low``; off a lowest at or
    below 0, a rise above it of more than ``ratio - 1`` times the fall from ``first`` to it
    (the same bar for a curve that fell from ``first`` to ``low > 0`` when ``first = 2 *
    low``; False when there was no fall).

    >>> past(4.5, 1.0, 3.0, 4.0), past(2.0, -0.5, 1.5, 1.5), past(0.4, -0.5, 1.5, 1.5)
    (True, True, False)
    """
    if low > 0:
        return value > ratio * low
    fall = first - low
    return fall > 0 and value - low > (ratio - 1.0) * fall


def past_bar(low: float, first: float, ratio: float, lowest: str = "its lowest") -> str:
    """The words for the bar :func:`past` tests against (``lowest`` names the low).

    >>> past_bar(1.0, 3.0, 4.0), past_bar(-0.5, 1.5, 1.5, "its lowest report")
    ('4 x its lowest 1', 'its lowest report + 0.5 x its fall from 1.5 to -0.5')
    """
    if low > 0:
        return f"{ratio:g} x {lowest} {low:.4g}"
    return f"{lowest} + {ratio - 1:g} x its fall from {first:.4g} to {low:.4g}"


def fell_below(first: float, fraction: float) -> float:
    """The value a loss that began at ``first`` has fallen ``fraction`` of it below:
    ``first * (1 - fraction)`` for a positive one, further below 0 for a negative one.

    >>> fell_below(2.0, 0.02), fell_below(-2.0, 0.02)
    (1.96, -2.04)
    """
    return first - fraction * abs(first)


def smooth(points: list[tuple[float, float, int]], beta: float) -> list[tuple[float, float]]:
    """``(lr, smoothed loss)`` from ``(lr, mean loss, steps in its window)`` per report:
    a bias-corrected EMA with ``beta ** window`` per report (a non-finite loss stays so).

    >>> smooth([(0.1, 2.0, 10), (0.2, 1.0, 10)], 0.0)
    [(0.1, 2.0), (0.2, 1.0)]
    """
    out: list[tuple[float, float]] = []
    avg, kept = 0.0, 1.0  # kept: the product of the betas, for the bias correction
    for lr, loss, window in points:
        b = beta ** max(window, 1)
        avg = b * avg + (1.0 - b) * loss
        kept *= b
        out.append((lr, avg / (1.0 - kept)))
    return out


def stop_reason(curve: list[tuple[float, float]], diverge_factor: float) -> str | None:
    """Why the sweep stops at the last point of ``curve`` (None: it goes on)."""
    if not curve:
        return None
    last = curve[-1][1]
    if not math.isfinite(last):
        return f"non-finite loss at lr x{curve[-1][0]:.3g}"
    best = min(loss for _, loss in curve)
    if past(last, best, curve[0][1], diverge_factor):
        bar = past_bar(best, curve[0][1], diverge_factor)
        return f"smoothed loss {last:.4g} > {bar} at lr x{curve[-1][0]:.3g}"
    return None


def pick_lr(curve: list[tuple[float, float]], how: str, divisor: float) -> float:
    """The LR ``how`` (``"min"`` or ``"steepest"``) picks from a finite ``curve``."""
    i_min = min(range(len(curve)), key=lambda i: curve[i][1])
    if how == "min" or i_min == 0:
        return curve[i_min][0] / (divisor if how == "min" else 1.0)
    # The slope against log lr between neighbours, up to the minimum; the steepest fall wins.
    slopes = []
    for i in range(1, i_min + 1):
        (a, la), (b, lb) = curve[i - 1], curve[i]
        if b > a:
            slopes.append(((lb - la) / math.log(b / a), b))
    return min(slopes)[1] if slopes else curve[i_min][0]
