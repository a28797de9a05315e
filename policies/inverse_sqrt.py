"""Inverse square root: a linear warm-up, then decay as one over the square root of the step.

The rule (Vaswani et al. 2017, "Attention Is All You Need", sec. 5.3, with the
``d_model ** -0.5`` constant folded into a peak lr)::

    lr(t) = base x min(n / w, sqrt(w / n)),   n = t + 1, w = warmup_steps

where ``base`` is ``lr`` (default: the job's registered lr), the peak reached at
``n = w``, and ``t`` the optimizer steps taken: ``lr(t)`` is what the ``(t+1)``-th
optimizer step -- Vaswani's ``step_num = n`` -- uses. torch has no class for it; its
counterpart is ``LambdaLR(optimizer, lambda t: min((t + 1) / w, (w / (t + 1)) ** 0.5))``
after ``t`` scheduler steps. ``warmup_steps=1`` gives the plain ``base / sqrt(n)``.

>>> InverseSqrt({"warmup_steps": 100}).lr_at(399, 0.1)
0.05
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import JobView, LrField, ScheduleConfig, SchedulePolicy, schedules

__all__ = ["InverseSqrt", "InverseSqrtConfig", "inverse_sqrt_factor"]


class InverseSqrtConfig(ScheduleConfig):
    """Inverse square root's settings."""

    #: The peak lr, reached after ``warmup_steps``; None: the job's registered lr.
    lr: float | None = LrField
    #: Steps of linear warm-up to the peak (Vaswani et al. used 4000); 1: none.
    warmup_steps: int = Field(ge=1)


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """``min(n / w, sqrt(w / n))`` with ``n = step + 1``."""
    return schedules.inverse_sqrt_factor(step, warmup_steps)


class InverseSqrt(SchedulePolicy):
    """Linear warm-up to the peak over ``warmup_steps``, then ``peak x sqrt(w / n)``."""

    name: ClassVar[str] = "inverse_sqrt"
    Config: ClassVar[type[BaseModel]] = InverseSqrtConfig
    formula: ClassVar[str] = "inverse_sqrt"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: InverseSqrtConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "warmup_steps": cfg.warmup_steps}
