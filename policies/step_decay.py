"""Step decay: multiply the lr by ``gamma`` every ``step_size`` steps.

The rule: ``lr(t) = base x gamma ** (t // step_size)``, where ``base`` is ``lr``
(default: the job's registered lr) and ``t`` the optimizer steps taken; ``lr(t)`` is
what the ``(t+1)``-th optimizer step uses. This is
``torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)`` after ``t`` scheduler
steps. Step decay is the schedule of the classic ImageNet recipes (Krizhevsky et al.
2012; He et al. 2016, "Deep Residual Learning": lr / 10 at fixed epochs).

>>> StepDecay({"step_size": 100, "gamma": 0.5}).lr_at(250, 0.1)
0.025
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import JobView, LrField, ScheduleConfig, SchedulePolicy

__all__ = ["StepDecay", "StepDecayConfig"]


class StepDecayConfig(ScheduleConfig):
    """Step decay's settings."""

    #: The lr before the first decay; None: the job's registered lr.
    lr: float | None = LrField
    #: Optimizer steps between decays.
    step_size: int = Field(ge=1)
    #: The multiplier at each decay.
    gamma: float = Field(0.1, gt=0.0, allow_inf_nan=False)


class StepDecay(SchedulePolicy):
    """``lr x gamma ** (step // step_size)``."""

    name: ClassVar[str] = "step_decay"
    Config: ClassVar[type[BaseModel]] = StepDecayConfig
    formula: ClassVar[str] = "step_decay"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: StepDecayConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "step_size": cfg.step_size, "gamma": cfg.gamma}
