"""Cosine: anneal the lr from its reference value to ``eta_min`` along half a cosine.

The rule (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
Restarts", eq. 5, without restarts)::

    lr(t) = eta_min + (base - eta_min) x (1 + cos(pi x t / t_max)) / 2

where ``base`` is ``lr`` (default: the job's registered lr) and ``t`` the optimizer
steps taken; ``lr(t)`` is what the ``(t+1)``-th optimizer step uses. This is
``torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min)`` after
``t`` scheduler steps, past ``t_max`` included: like torch, the lr then rises again
along the same cosine (period ``2 x t_max``); set ``t_max`` to the run's length to end
at ``eta_min``. ``eta_min`` is an absolute lr, never batch-scaled; as trimtab steers a
multiplier on the user's lr (the knob model), it goes to the client as ``eta_min / the
lr the user's scheduler scales`` (see :func:`reference_multiplier`).

>>> Cosine({"t_max": 100}).lr_at(50, 0.1)
0.05
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from trimtab.policies.sdk import (
    JobView,
    LrField,
    ScheduleConfig,
    SchedulePolicy,
    as_multiplier,
    schedules,
)

__all__ = ["Cosine", "CosineConfig", "cosine_lr"]


class CosineConfig(ScheduleConfig):
    """Cosine's settings."""

    #: The lr at step 0; None: the job's registered lr.
    lr: float | None = LrField
    #: Steps from the reference lr down to ``eta_min`` (torch's ``T_max``).
    t_max: int = Field(ge=1)
    #: The lr reached at ``t_max``.
    eta_min: float = Field(0.0, ge=0.0, allow_inf_nan=False)


def cosine_lr(step: int, base_lr: float, t_max: int, eta_min: float) -> float:
    """SGDR's eq. 5 at ``step``, in torch's CosineAnnealingLR's closed-form arithmetic."""
    return schedules.cosine(step, base_lr, t_max, eta_min)


class Cosine(SchedulePolicy):
    """Half a cosine from the reference lr to ``eta_min`` over ``t_max`` steps."""

    name: ClassVar[str] = "cosine"
    Config: ClassVar[type[BaseModel]] = CosineConfig
    formula: ClassVar[str] = "cosine"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: CosineConfig = self.config  # type: ignore[assignment]
        return {"lr": base_lr, "t_max": cfg.t_max, "eta_min": as_multiplier(cfg.eta_min, view)}
