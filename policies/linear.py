"""Linear: move the lr in a straight line from ``start_factor`` x to ``end_factor`` x it.

The rule: ``lr(t) = base x (start_factor + (end_factor - start_factor) x min(t, T) / T)``
with ``T = total_iters``, ``base`` the ``lr`` (default: the job's registered lr) and
``t`` the optimizer steps taken; ``lr(t)`` is what the ``(t+1)``-th optimizer step
uses, and the lr holds at ``base x end_factor`` after ``T`` steps. This is
``torch.optim.lr_scheduler.LinearLR(optimizer, start_factor, end_factor, total_iters)``
after ``t`` scheduler steps. The defaults (1 -> 0) give the linear decay to zero of
BERT's recipe (Devlin et al. 2019), shown by Defazio et al. 2023 ("When, Why and How
Much? Adaptive Learning Rate Scheduling by Refinement") to match or beat cosine.

>>> Linear({"total_iters": 100}).lr_at(25, 2.0)
1.5
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import JobView, LrField, ScheduleConfig, SchedulePolicy, schedules

__all__ = ["Linear", "LinearConfig", "linear_factor"]


class LinearConfig(ScheduleConfig):
    """Linear's settings."""

    #: The lr the factors multiply; None: the job's registered lr.
    lr: float | None = LrField
    #: Factor at step 0 (torch's LinearLR allows (0, 1]).
    start_factor: float = Field(1.0, gt=0.0, le=1.0)
    #: Factor from ``total_iters`` on (torch's LinearLR allows [0, 1]).
    end_factor: float = Field(0.0, ge=0.0, le=1.0)
    #: Steps from start to end.
    total_iters: int = Field(ge=1)


def linear_factor(step: int, start: float, end: float, total: int) -> float:
    """``start + (end - start) x min(step, total) / total``, in torch's LinearLR's
    arithmetic (its closed form)."""
    return schedules.linear_factor(step, start, end, total)


class Linear(SchedulePolicy):
    """``lr x`` a straight line from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    name: ClassVar[str] = "linear"
    Config: ClassVar[type[BaseModel]] = LinearConfig
    formula: ClassVar[str] = "linear"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: LinearConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "total_iters": cfg.total_iters, "start_factor": cfg.start_factor,
                "end_factor": cfg.end_factor}
