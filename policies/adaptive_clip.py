"""Adaptive clipping: the clip threshold follows the job's own gradient-norm history.

The rule, once ``warmup_reports`` reports with a gradient norm have come in, on every
report (``mode="zscore"``, after ZClip: Kumar et al. 2025, "ZClip: Adaptive Spike
Mitigation for LLM Pre-Training"): fold each report's mean gradient norm into an
exponentially weighted mean ``m`` and variance (weight ``alpha``), each first clipped to
the threshold in force before it, as ZClip does, so a spike cannot inflate the statistics
that are meant to catch it; the per-step spread adds the EW mean of the windows' own
variance (``grad_norm_std**2``; an outlier window's spread is not learnt either). The
threshold is ``m + z * std``. With ``mode="percentile"`` (after AutoClip: Seetharaman
et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks")
it is the ``percentile``-th percentile of the reports' mean gradient norms in the
history. (AutoClip takes the percentile of every step's norm and suggests a low one,
p=10, which clips most steps; reports give window means, so the default here is a high
percentile and clipping stays a guard against outliers.)

It proposes that absolute ``clip`` value when it differs from the one in force by more
than ``deadband`` (relative), or when clipping is off. Everything is measured on the
job's own norms, so the same configuration serves a model and one ten times wider.

>>> AdaptiveClip({"z": 3.0}).config.mode
'zscore'
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal, Sample, ema_var

__all__ = ["AdaptiveClip", "AdaptiveClipConfig", "zclip_threshold", "percentile"]


class AdaptiveClipConfig(BaseModel):
    """AdaptiveClip's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``"zscore"`` (ZClip: EW mean + z x EW std) or ``"percentile"`` (AutoClip).
    mode: Literal["zscore", "percentile"] = "zscore"
    #: Weight of the newest report in the EW mean and variance (ZClip's 1 - 0.97 per step
    #: is about 0.3 per 10-step report; a smaller weight smooths more).
    alpha: float = Field(0.1, gt=0.0, le=1.0)
    #: Standard deviations above the mean (ZClip's default z_thresh is 2.5).
    z: float = Field(2.5, gt=0.0, allow_inf_nan=False)
    #: The percentile of the history's mean norms, in ``mode="percentile"``.
    percentile: float = Field(90.0, gt=0.0, le=100.0)
    #: Reports with a gradient norm before any threshold is proposed.
    warmup_reports: int = Field(10, ge=2)
    #: A relative change smaller than this is not proposed (no chatter).
    deadband: float = Field(0.1, ge=0.0, lt=1.0)


def zclip_threshold(samples: list[Sample], alpha: float, z: float, warmup: int) -> float | None:
    """ZClip's threshold ``m + z * std`` from the samples' mean norms and window spreads;
    ``None`` before ``warmup`` samples. Each mean is clipped to the threshold before it.

    >>> from trimtab.controller.state import Sample
    >>> s = [Sample(10 * i, 10, grad_norm_mean=1.0, grad_norm_std=0.1) for i in range(20)]
    >>> round(zclip_threshold(s, 0.1, 2.0, 5), 3)
    1.2
    """
    mean = var = within = None
    n = 0
    for s in samples:
        x = s.grad_norm_mean
        if x is None or not math.isfinite(x):
            continue
        a = max(alpha, 1.0 / (n + 1))  # 1/n at first, as the job's own EMAs do
        w = (s.grad_norm_std or 0.0) ** 2
        if n >= warmup and mean is not None:
            thr = mean + z * math.sqrt(var + within)
            if x > thr:  # an outlier window: its mean is clipped, its spread not learnt
                x, w = thr, within
        mean, var = ema_var(mean, var, x, a)
        within = w if within is None else within + a * (w - within)
        n += 1
    if n < warmup or mean is None:
        return None
    return mean + z * math.sqrt(max(var, 0.0) + within)


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``xs``, linearly interpolated.

    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50)
    3.0
    """
    ys = sorted(xs)
    k = (len(ys) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)


class AdaptiveClip(Policy):
    """Clip threshold from the gradient-norm history (ZClip z-score or AutoClip percentile)."""

    name: ClassVar[str] = "adaptive_clip"
    Config: ClassVar[type[BaseModel]] = AdaptiveClipConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: AdaptiveClipConfig = self.config  # type: ignore[assignment]
        # Windows with steps at the loop's own clip carry that threshold, not the norm.
        samples = [s for s in view.history if s.grad_norm_mean is not None
                   and not s.user_clipped]
        if cfg.mode == "zscore":
            thr = zclip_threshold(samples, cfg.alpha, cfg.z, cfg.warmup_reports)
            how = f"EW mean + {cfg.z:g} std of the gradient norm"
        else:
            thr = (percentile([s.grad_norm_mean for s in samples], cfg.percentile)  # type: ignore[misc]
                   if len(samples) >= cfg.warmup_reports else None)
            how = f"{cfg.percentile:g}th percentile of the gradient norm"
        if thr is None or not math.isfinite(thr) or thr <= 0.0:
            return []
        current = view.pending.clip if view.pending is not None and view.pending.clip else None
        current = current if current is not None else view.knobs.clip
        if current is not None and abs(thr / current - 1.0) <= cfg.deadband:
            return []
        reason = f"clip threshold {thr:.4g}: {how} over {len(samples)} reports"
        return [Proposal("clip", value=thr, reason=reason)]
