"""Linear warm-up: ramp the lr from ``start_factor`` x its reference value up to it, then hold.

The rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in
1 Hour", sec. 2.2, gradual warm-up)::

    lr(t) = base x (s + (1 - s) x min(t, w) / w),   w = warmup_steps, s = start_factor

where ``base`` is ``lr`` (default: the job's registered lr) and ``t`` the optimizer
steps taken; ``lr(t)`` is what the ``(t+1)``-th optimizer step uses. Its torch
counterpart is ``LambdaLR(optimizer, lambda t: s + (1 - s) * min(t, w) / w)`` (or
``LinearLR(optimizer, s, 1.0, w)`` for ``s > 0``) after ``t`` scheduler steps.

``start_factor`` left unset is Goyal et al.'s recipe when ``scale_with_batch`` is on:
``1 / k`` for the batch-size factor ``k`` (so the run starts at the lr tuned for the
reference batch and reaches the scaled one after ``w`` steps; 1 when ``k <= 1``), and
0 otherwise (a warm-up from zero, as in BERT's and most transformer recipes; the first
step then makes no update, and a governor that refuses a zero lr holds it back).

>>> Warmup({"warmup_steps": 100}).lr_at(25, 0.1)
0.025
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import (
    JobView,
    LrField,
    ScheduleConfig,
    SchedulePolicy,
    batch_factor,
    schedules,
)

__all__ = ["Warmup", "WarmupConfig", "warmup_factor"]


class WarmupConfig(ScheduleConfig):
    """Warm-up's settings."""

    #: The lr reached after ``warmup_steps`` and held; None: the job's registered lr.
    lr: float | None = LrField
    #: Steps of the ramp.
    warmup_steps: int = Field(ge=1)
    #: Factor at step 0; None: 1 / batch factor with ``scale_with_batch``, else 0.
    start_factor: float | None = Field(None, ge=0.0, le=1.0)


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """``s + (1 - s) x min(step, w) / w``."""
    return schedules.warmup_factor(step, warmup_steps, start_factor)


class Warmup(SchedulePolicy):
    """A straight ramp from ``start_factor x lr`` to ``lr`` over ``warmup_steps``, then ``lr``."""

    name: ClassVar[str] = "warmup"
    Config: ClassVar[type[BaseModel]] = WarmupConfig
    formula: ClassVar[str] = "warmup"

    def start_factor(self, view: JobView | None) -> float:
        """The factor at step 0 for ``view``'s job (see the module docstring)."""
        cfg: WarmupConfig = self.config  # type: ignore[assignment]
        if cfg.start_factor is not None:
            return cfg.start_factor
        if cfg.scale_with_batch and view is not None:
            return min(1.0, 1.0 / batch_factor(cfg, view))
        return 0.0

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: WarmupConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "warmup_steps": cfg.warmup_steps,
                "start_factor": self.start_factor(view)}

    def lr_at(self, step: int, base_lr: float, start_factor: float | None = None) -> float:
        cfg: WarmupConfig = self.config  # type: ignore[assignment]
        if start_factor is None:
            start_factor = self.start_factor(None)
        return schedules.warmup(step, base_lr, cfg.warmup_steps, start_factor)

    def lr_for(self, view: JobView) -> tuple[float, float]:
        base = self.base_lr(view)
        step = max(view.step - self.step_origin(view), 0)
        return self.lr_at(step, base, self.start_factor(view)), base
