"""Update-to-weight ratio: keep ``||delta theta|| / ||theta||`` per step inside a band.

The rule: over the reports since the controller's last LR change (at least
``min_reports`` of them carrying ``update_ratio``), take the exponentially weighted mean
``r`` of the ratio (weight ``alpha``), so one noisy sample moves nothing. Below ``low``
propose ``lr *= f``, above ``high`` ``lr *= f``, with ``f = sqrt(low * high) / r`` (the
step size is about proportional to the LR, so ``f`` aims at the band's geometric
middle) clamped to ``[1/max_factor, max_factor]``; no raise past ``max_lr_rel`` times the
initial LR.

Where it comes from: Karpathy's rule of thumb ("A Recipe for Training Neural Networks",
2019, and CS231n's "ratio of weights:updates", ~1e-3): much lower and the LR is probably
too low, much higher and it is probably too high. LARS and LAMB (You et al. 2017,
"Large Batch Training of Convolutional Networks"; 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes") set each layer's step relative to its weight norm
through a trust ratio, the same quantity made a per-layer control. The ratio is
dimensionless, so the band does not depend on the model's width.

>>> UpdateRatio({"low": 2e-4, "high": 5e-3}).config.max_factor
1.25
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.policies.sdk import JobView, Policy, Proposal, ema

__all__ = ["UpdateRatio", "UpdateRatioConfig"]


class UpdateRatioConfig(BaseModel):
    """UpdateRatio's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The band for the smoothed ratio (Karpathy's ~1e-3 in the middle).
    low: float = Field(5e-4, gt=0.0, allow_inf_nan=False)
    high: float = Field(2e-3, gt=0.0, allow_inf_nan=False)
    #: Weight of the newest report in the EW mean of the ratio.
    alpha: float = Field(0.3, gt=0.0, le=1.0)
    #: Reports with a ratio since the last LR change before it judges.
    min_reports: int = Field(5, ge=1)
    #: The largest LR factor either way per proposal.
    max_factor: float = Field(1.25, gt=1.0, le=2.0)
    #: No raise past this multiple of the job's initial LR.
    max_lr_rel: float = Field(10.0, ge=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> UpdateRatioConfig:
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class UpdateRatio(Policy):
    """Smoothed update-to-weight ratio outside ``[low, high]`` -> nudge the LR toward it."""

    name: ClassVar[str] = "update_ratio"
    Config: ClassVar[type[BaseModel]] = UpdateRatioConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: UpdateRatioConfig = self.config  # type: ignore[assignment]
        ratios = [s.update_ratio for s in view.since_change("lr") if s.update_ratio is not None]
        if len(ratios) < cfg.min_reports:
            return []
        r: float | None = None
        for x in ratios:
            r = ema(r, x, cfg.alpha)
        assert r is not None
        if cfg.low <= r <= cfg.high:
            return []
        target = math.sqrt(cfg.low * cfg.high)
        factor = min(max(target / r, 1.0 / cfg.max_factor), cfg.max_factor) if r > 0 \
            else cfg.max_factor
        where = "below" if r < cfg.low else "above"
        reason = (f"update/weight ratio {r:.3g} (EW over {len(ratios)} reports) {where} "
                  f"[{cfg.low:g}, {cfg.high:g}]")
        if factor > 1.0:
            lr, initial = view.knobs.lr, view.initial.lr
            if lr is None or initial is None or lr <= 0:
                return []
            factor = min(factor, cfg.max_lr_rel * initial / lr)
            if factor <= 1.0 + 1e-9:
                return []
        return [Proposal("lr", factor=factor, reason=reason)]
