"""OneCycle: lr up from ``max_lr / div_factor`` to ``max_lr`` and down far below, with
momentum moving inversely between ``max_momentum`` and ``base_momentum``.

The rule (Smith & Topin 2018, "Super-Convergence: Very Fast Training of Neural
Networks Using Large Learning Rates"; Smith 2018, "A disciplined approach to neural
network hyper-parameters: Part 1" for the inverse momentum coupling), as torch's
``OneCycleLR`` computes it, with ``T = total_steps``, ``p = pct_start`` and
``t`` the optimizer steps taken:

* ``eta_min = max_lr / div_factor``, ``eta_final = eta_min / final_div_factor`` (torch's
  ``initial_lr`` and ``min_lr``: the final lr is ``max_lr / (div_factor x
  final_div_factor)``);
* phase 1, ``t`` in ``[0, pT - 1]``: lr ``eta_min -> max_lr``, momentum
  ``max_momentum -> base_momentum`` (0.95 -> 0.85 by default);
* phase 2, up to ``T - 1``: lr ``max_lr -> eta_final``, momentum ``base_momentum ->
  max_momentum``; with ``three_phase`` the lr first returns to ``eta_min`` by ``2pT - 2``
  (momentum back to ``max_momentum``) and then falls to ``eta_final`` at ``T - 1``;
* each segment is a half cosine (``anneal_strategy="cos"``) or a straight line, of
  ``pct = (t - start) / (end - start)``.

``lr(t)`` is what the ``(t+1)``-th optimizer step uses: torch's
``OneCycleLR(optimizer, max_lr, total_steps=T, ...)`` after ``t`` scheduler steps, lr
and momentum (SGD's ``momentum``, or the Adam family's ``beta1``, which is trimtab's
``momentum`` knob). Past ``T - 1`` the final values hold (torch raises after ``T``).
Momentum is proposed only for a job that has one, and when ``cycle_momentum``.

>>> lr, m = OneCycle({"total_steps": 100}).lr_momentum_at(29, 0.1)
>>> round(lr, 12), round(m, 12)
(0.1, 0.85)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from trimtab.policies.sdk import (
    JobView,
    LrField,
    Proposal,
    ScheduleConfig,
    SchedulePolicy,
    schedules,
)

__all__ = ["OneCycle", "OneCycleConfig"]


class OneCycleConfig(ScheduleConfig):
    """OneCycle's settings; the defaults are torch's."""

    #: The peak lr; None: the job's registered lr.
    max_lr: float | None = LrField
    #: Steps in the cycle.
    total_steps: int = Field(ge=2)
    #: Fraction of the cycle spent raising the lr.
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    #: Also move momentum (SGD's momentum, Adam's beta1) inversely to the lr.
    cycle_momentum: bool = True
    #: Momentum at the lr's peak (m_min).
    base_momentum: float = Field(0.85, ge=0.0, lt=1.0)
    #: Momentum at the ends of the cycle (m_max).
    max_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    #: ``max_lr / div_factor`` is the starting lr.
    div_factor: float = Field(25.0, gt=0.0, allow_inf_nan=False)
    #: The starting lr divided by this is the final lr.
    final_div_factor: float = Field(1e4, gt=0.0, allow_inf_nan=False)
    #: Return to the starting lr before annihilating it (torch's ``three_phase``).
    three_phase: bool = False

    @model_validator(mode="after")
    def _phases(self) -> OneCycleConfig:
        if self.base_momentum > self.max_momentum:
            raise ValueError(f"base_momentum={self.base_momentum} is above max_momentum="
                             f"{self.max_momentum}; base_momentum must be <= max_momentum")
        ends = [end for end, *_ in phase_table(self, 1.0)]
        starts = [0.0, *ends[:-1]]
        if any(end <= start for start, end in zip(starts, ends, strict=True)):
            raise ValueError(
                f"pct_start={self.pct_start} with total_steps={self.total_steps} gives phases "
                f"ending at steps {ends}; each must end after the previous one (and after 0)"
            )
        return self


def phase_table(
    cfg: OneCycleConfig, max_lr: float
) -> list[tuple[float, float, float, float, float]]:
    """``(end_step, start_lr, end_lr, start_momentum, end_momentum)`` per phase, as torch."""
    return schedules.one_cycle_phases(
        max_lr, cfg.total_steps, cfg.pct_start, cfg.div_factor, cfg.final_div_factor,
        cfg.three_phase, cfg.base_momentum, cfg.max_momentum)


class OneCycle(SchedulePolicy):
    """Smith & Topin's 1cycle, lr and inverse momentum, exactly as torch's OneCycleLR."""

    name: ClassVar[str] = "one_cycle"
    Config: ClassVar[type[BaseModel]] = OneCycleConfig
    lr_field: ClassVar[str] = "max_lr"

    formula: ClassVar[str] = "one_cycle"

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        cfg: OneCycleConfig = self.config  # type: ignore[assignment]
        return {"max_lr": base_lr, "total_steps": cfg.total_steps, "pct_start": cfg.pct_start,
                "anneal_strategy": cfg.anneal_strategy, "div_factor": cfg.div_factor,
                "final_div_factor": cfg.final_div_factor, "three_phase": cfg.three_phase,
                "base_momentum": cfg.base_momentum, "max_momentum": cfg.max_momentum}

    def lr_momentum_at(self, step: int, max_lr: float) -> tuple[float, float]:
        """``(lr, momentum)`` for the optimizer step after ``step`` steps."""
        return schedules.one_cycle(step, **self.formula_params(max_lr))

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: OneCycleConfig = self.config  # type: ignore[assignment]
        base = self.base_lr(view)
        lr, momentum = self.lr_momentum_at(max(view.step - self.step_origin(view), 0), base)
        piece = self.piece(view, base)
        where = f"{self.name} at step {view.step} of {cfg.total_steps}"
        out = [Proposal("lr", value=lr, schedule=piece,
                        reason=f"{where}: x{lr:.6g} (max_lr x{base:.6g})")]
        if cfg.cycle_momentum and view.knobs.momentum is not None:
            out.append(Proposal("momentum", value=momentum, schedule=piece,
                                reason=f"{where}: {momentum:.6g}"))
        return out
