"""Constant: hold the lr at a fixed value, optionally at ``factor`` x it for the first steps.

The rule: ``lr(t) = base x factor`` for ``t < total_iters``, ``base`` after, where
``base`` is ``lr`` (default: the job's registered lr) and ``t`` the optimizer steps
taken; ``lr(t)`` is what the ``(t+1)``-th optimizer step uses. This is
``torch.optim.lr_scheduler.ConstantLR(optimizer, factor, total_iters)`` after ``t``
scheduler steps; with the default ``factor=1`` it is no scheduler at all. The constant
learning rate is the baseline of every schedule study since Robbins & Monro (1951).

Through the arbiter a proposal equal to the value in force counts as a hold, so a
constant schedule also holds back other policies' increases (never their decreases).

>>> Constant({"factor": 0.5, "total_iters": 10}).lr_at(9, 0.1), Constant().lr_at(9, 0.1)
(0.05, 0.1)
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import JobView, LrField, ScheduleConfig, SchedulePolicy

__all__ = ["Constant", "ConstantConfig"]


class ConstantConfig(ScheduleConfig):
    """Constant's settings."""

    #: The lr to hold; None: the job's registered lr.
    lr: float | None = LrField
    #: Multiplier on ``lr`` for the first ``total_iters`` steps (torch's ConstantLR).
    factor: float = Field(1.0, gt=0.0, le=1.0)
    #: Steps run at ``lr x factor``.
    total_iters: int = Field(0, ge=0)


class Constant(SchedulePolicy):
    """``lr x factor`` before ``total_iters`` steps, ``lr`` after."""

    name: ClassVar[str] = "constant"
    Config: ClassVar[type[BaseModel]] = ConstantConfig
    formula: ClassVar[str] = "constant"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: ConstantConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "factor": cfg.factor, "total_iters": cfg.total_iters}
