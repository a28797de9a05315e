"""Gradient noise: noisy gradients -> more conservative steps; quiet ones -> a small raise.

The rule, over the last ``reports`` reports (none of them before the controller's last
LR change, so the window measures the LR in force):

* with gradient accumulation (reports carrying ``micro_sq_norm_mean`` and
  ``micro_batches >= 2``), the noise measure is ``B_simple / B``: the simple noise scale
  of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A.1)
  relative to the batch in use. From ``|G_small|^2`` (micro-batch gradients,
  ``micro_sq_norm_mean``) and ``|G_big|^2`` (the accumulated gradient, mean of
  ``grad_norm**2``) over ``n`` micro-batches, ``|G|^2 = (n|G_big|^2 - |G_small|^2)/(n-1)``
  and ``tr(S)/B_small = n(|G_small|^2 - |G_big|^2)/(n-1)``, so
  ``B_simple / B = (|G_small|^2 - |G_big|^2) / (n|G_big|^2 - |G_small|^2)``. A batch far
  below the noise scale takes steps dominated by noise, where the paper's optimal LR,
  ``lr_max / (1 + B_noise/B)``, is lower;
* otherwise it is the coefficient of variation of the per-step gradient norm (pooled
  window spread over pooled mean), a dimensionless proxy for the same thing.

Above ``high`` it proposes ``lr *= down``; below ``low``, ``lr *= up`` while trimtab's lr
multiplier is under ``max_lr_rel`` (the user's own lr times that). Both measures are
ratios of the job's own signals, so one configuration serves models of any width.

Gradients the loop clips itself before the guard sees them (its own ``clip_grad_norm_``
under ``hooks=True``, a trainer's ``max_grad_norm``) have the clip's norm, not their
own: a window with steps at that ceiling (``Sample.user_clipped``) says nothing of the
noise, and the policy proposes nothing from it.

>>> GradNoise({"high": 0.8}).config.low
0.1
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.policies.sdk import JobView, Policy, Proposal, Sample

__all__ = ["GradNoise", "GradNoiseConfig", "pooled_cv", "noise_to_batch"]


class GradNoiseConfig(BaseModel):
    """GradNoise's settings; ``low``/``high`` bound the coefficient of variation and
    ``noise_low``/``noise_high`` bound ``B_simple / B``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Reports pooled for one judgement, all after the last LR change.
    reports: int = Field(5, ge=2)
    low: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    high: float = Field(0.5, gt=0.0, allow_inf_nan=False)
    noise_low: float = Field(0.25, ge=0.0, allow_inf_nan=False)
    noise_high: float = Field(4.0, gt=0.0, allow_inf_nan=False)
    #: The LR multiplier on noisy gradients.
    down: float = Field(0.8, gt=0.0, lt=1.0)
    #: The LR multiplier on quiet gradients; small.
    up: float = Field(1.1, gt=1.0, le=1.5)
    #: No raise past this multiple of the job's initial LR.
    max_lr_rel: float = Field(2.0, ge=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> GradNoiseConfig:
        for lo, hi in (("low", "high"), ("noise_low", "noise_high")):
            if getattr(self, lo) >= getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} must be below {hi}={getattr(self, hi)}")
        return self


def pooled_cv(samples: list[Sample]) -> float | None:
    """Per-step grad-norm std over mean, pooling the windows (law of total variance).

    >>> from trimtab.controller.state import Sample
    >>> pooled_cv([Sample(10, 10, grad_norm_mean=2.0, grad_norm_std=0.5)] * 3)
    0.25
    """
    rows = [(s.window, s.grad_norm_mean, s.grad_norm_std or 0.0) for s in samples
            if s.grad_norm_mean is not None]
    n = sum(w for w, _, _ in rows)
    if not rows or n == 0:
        return None
    mean = math.fsum(w * m for w, m, _ in rows) / n
    var = math.fsum(w * (sd * sd + (m - mean) ** 2) for w, m, sd in rows) / n
    return math.sqrt(var) / mean if mean > 0 else None


def noise_to_batch(samples: list[Sample]) -> float | None:
    """``B_simple / B`` from micro-batch statistics (McCandlish et al. 2018); ``inf`` when
    the true-gradient estimate is not positive; ``None`` without micro-batch data.

    >>> from trimtab.controller.state import Sample
    >>> s = Sample(10, 10, grad_norm_mean=1.0, grad_norm_std=0.0, micro_sq_norm_mean=2.0,
    ...            micro_batches=4)
    >>> noise_to_batch([s])
    0.5
    """
    rows = [s for s in samples if s.micro_sq_norm_mean is not None and s.micro_batches
            and s.micro_batches >= 2 and s.grad_norm_mean is not None]
    if not rows or len(rows) < len(samples):
        return None
    small = math.fsum(s.micro_sq_norm_mean for s in rows) / len(rows)  # type: ignore[misc]
    big = math.fsum(s.grad_norm_mean ** 2 + (s.grad_norm_std or 0.0) ** 2  # type: ignore[operator]
                    for s in rows) / len(rows)
    n = math.fsum(s.micro_batches for s in rows) / len(rows)  # type: ignore[misc]
    signal = n * big - small  # (n - 1) |G|^2
    if signal <= 0.0:
        return math.inf
    return max(small - big, 0.0) / signal


class GradNoise(Policy):
    """High gradient noise -> ``lr *= down``; low -> ``lr *= up`` (bounded)."""

    name: ClassVar[str] = "grad_noise"
    Config: ClassVar[type[BaseModel]] = GradNoiseConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: GradNoiseConfig = self.config  # type: ignore[assignment]
        recent = view.since_change("lr")
        if len(recent) < cfg.reports:
            return []
        window = recent[-cfg.reports:]
        if any(s.user_clipped for s in window):
            return []  # clipped norms are the loop's threshold, not the gradient's spread
        rho = noise_to_batch(window)
        if rho is not None:
            measure, lo, hi, what = rho, cfg.noise_low, cfg.noise_high, "noise scale B_simple/B"
        else:
            cv = pooled_cv(window)
            if cv is None:
                return []
            measure, lo, hi, what = cv, cfg.low, cfg.high, "grad-norm coefficient of variation"
        span = f"over {cfg.reports} reports"
        if measure > hi:
            return [Proposal("lr", factor=cfg.down, reason=f"{what} {measure:.3g} > {hi:g} {span}")]
        lr, initial = view.knobs.lr, view.initial.lr
        if measure < lo and lr is not None and initial is not None:
            factor = min(cfg.up, cfg.max_lr_rel * initial / lr) if lr > 0 else cfg.up
            if factor > 1.0 + 1e-9:
                return [Proposal("lr", factor=factor,
                                 reason=f"{what} {measure:.3g} < {lo:g} {span}")]
        return []
