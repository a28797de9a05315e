"""The loss-against-LR curve of a sweep: smoothing it, reading when to stop, picking an LR.

The conventions of fastai's ``lr_find`` and torch-lr-finder's ``LRFinder`` (Smith 2017,
"Cyclical Learning Rates for Training Neural Networks", sec. 3.3): a bias-corrected EMA of
the loss, a stop once the smoothed loss passes a multiple of its lowest, and the pick at
the minimum (divided down) or at the steepest fall. Pure functions over ``(lr, loss)``
points; the ``lr_range_test`` policy uses them, and so can any plugin that sweeps.
"""

from __future__ import annotations

import math

__all__ = ["smooth", "stop_reason", "pick_lr"]


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
    if last > diverge_factor * best:
        return (
            f"smoothed loss {last:.4g} > {diverge_factor:g} x its lowest {best:.4g} "
            f"at lr x{curve[-1][0]:.3g}"
        )
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
