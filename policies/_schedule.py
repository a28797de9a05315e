"""What every schedule policy shares: the config base, the reference lr, the proposal.

A schedule policy is a pure function of the job's step: at a decision taken when
``view.step`` optimizer steps have been taken, it proposes the *absolute* lr (and,
for OneCycle, momentum) the next optimizer step should use. That is torch's
convention too: after ``t`` calls of ``scheduler.step()`` the lr in force is the one
the ``(t+1)``-th ``optimizer.step()`` uses, so ``lr_at(t)`` here equals
``scheduler.get_last_lr()[0]`` after ``t`` scheduler steps.

The reference lr (``lr``, or ``max_lr`` for OneCycle) defaults to the lr the job
registered with; with ``scale_with_batch`` it is multiplied by the batch-size rule of
:class:`~trimtab.controller.scale.ScaleContext` (linear for SGD, square root for the
Adam family), taking ``reference_batch_size`` as the batch the lr was tuned at.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.scale import BatchScaling, ScaleContext
from trimtab.controller.state import JobView

__all__ = [
    "LrField", "ScheduleConfig", "SchedulePolicy", "reference_lr", "batch_factor", "anneal_cos",
    "anneal_linear",
]

#: The reference lr of a schedule; None: the lr the job registered with.
LrField = Field(None, gt=0.0, allow_inf_nan=False)


class ScheduleConfig(BaseModel):
    """Settings every schedule has: batch-size scaling of its reference lr (off by default,
    so that the schedule is exactly torch's).

    >>> ScheduleConfig(scale_with_batch=True, reference_batch_size=256).batch_scaling
    'auto'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Multiply the reference lr by the batch-size rule (see :mod:`trimtab.controller.scale`).
    scale_with_batch: bool = False
    #: The global batch size the reference lr was tuned at; needed with ``scale_with_batch``.
    reference_batch_size: int | None = Field(None, ge=1)
    #: ``"auto"``: linear for SGD, square root for the Adam family; or force one.
    batch_scaling: BatchScaling = "auto"

    @model_validator(mode="after")
    def _reference_given(self) -> ScheduleConfig:
        if self.scale_with_batch and self.reference_batch_size is None:
            raise ValueError("scale_with_batch=True needs reference_batch_size (the global "
                             "batch size the lr was tuned at)")
        return self


def reference_lr(configured: float | None, cfg: ScheduleConfig, view: JobView) -> float:
    """``configured`` or the job's registered lr, times the batch-size factor if asked."""
    lr = configured if configured is not None else view.initial.lr
    if lr is None:
        raise ValueError("no lr configured and the job registered none")
    return lr * batch_factor(cfg, view)


def batch_factor(cfg: ScheduleConfig, view: JobView) -> float:
    """The batch-size factor ``cfg`` applies to ``view`` (1 when scaling is off)."""
    if not cfg.scale_with_batch:
        return 1.0
    ctx = ScaleContext.from_facts(view.facts)
    return ctx.batch_lr_factor(cfg.reference_batch_size, cfg.batch_scaling)  # type: ignore[arg-type]


def anneal_cos(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), written as torch's OneCycleLR does."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def anneal_linear(start: float, end: float, pct: float) -> float:
    """Straight line from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR."""
    return (end - start) * pct + start


class SchedulePolicy(Policy):
    """A policy that proposes ``lr = lr_at(view.step, reference lr)``; subclasses give
    ``lr_at`` and the name of their reference-lr field.

    >>> class Halving(SchedulePolicy):
    ...     name = "halving"
    ...     class Config(ScheduleConfig):
    ...         lr: float | None = LrField
    ...     def lr_at(self, step, base_lr):
    ...         return base_lr * 0.5 ** (step // 100)
    >>> Halving().lr_at(250, 0.1)
    0.025
    """

    #: The config field holding the reference lr.
    lr_field: ClassVar[str] = "lr"

    @abc.abstractmethod
    def lr_at(self, step: int, base_lr: float) -> float:
        """The lr for the optimizer step after ``step`` steps, given the reference lr."""

    def base_lr(self, view: JobView) -> float:
        """The reference lr for ``view``'s job."""
        cfg: ScheduleConfig = self.config  # type: ignore[assignment]
        return reference_lr(getattr(cfg, self.lr_field), cfg, view)

    def lr_for(self, view: JobView) -> tuple[float, float]:
        """``(lr, reference lr)`` for ``view``'s job at its step."""
        base = self.base_lr(view)
        return self.lr_at(view.step, base), base

    def propose(self, view: JobView) -> list[Proposal]:
        lr, base = self.lr_for(view)
        return [Proposal("lr", value=lr, reason=f"{self.name} at step {view.step}: "
                                                f"{lr:.6g} (reference lr {base:.6g})")]
