"""Plateau: cut the learning rate when the loss has stopped falling measurably.

The rule: over a full slope window (the job's ``slope_window`` reports; a job
whose window is shorter than ``min_reports`` is never judged) with no lr change
inside it and at least ``patience_steps`` since the last one, if the loss is on a clear
plateau, propose ``lr *= factor``. A clear plateau is two things at once: the
least-squares slope of the loss is not significantly below zero (``t = slope / se >
-t_crit``), and the fall it shows over the window is under ``min_fall`` of the loss (a
loss that still falls, if noisily, at t = -1.6 and 3% a window, is no plateau).

The run's own schedule owns its lr (the knob model): while the lr the run set itself
moved by more than ``schedule_moves`` over the window (a warm-up, a cosine, a step
decay), the loss is following that schedule, and the policy proposes nothing
(``defer_to_schedule=False`` judges such a run too).

Compared with ``torch.optim.lr_scheduler.ReduceLROnPlateau``: that scheduler
keeps the best loss so far and decays when ``patience`` epochs pass without
beating it by ``threshold``; one lucky noisy minimum resets nothing and one
unlucky epoch counts against progress, so its threshold must be tuned to the
noise. Here the question is a significance test on the trend over the window:
a loss that still falls, however noisily, has a clearly negative t and keeps
its lr; a flat or rising one does not, whatever its scale or noise level.

>>> Plateau({"t_crit": 3.0, "factor": 0.7}).config.factor
0.7
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal

__all__ = ["Plateau", "PlateauConfig"]


class PlateauConfig(BaseModel):
    """Plateau's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Fewest points for the test to be trusted. The job's ``signals.slope_window`` sets
    #: the window; one shorter than this is never judged.
    min_reports: int = Field(3, ge=3)
    #: The slope must have t below -t_crit to count as still falling.
    t_crit: float = Field(2.0, gt=0.0, allow_inf_nan=False)
    #: The lr multiplier on a plateau.
    factor: float = Field(0.5, gt=0.0, lt=1.0)
    #: Fewest steps since the last lr change; 0 means one slope window of steps.
    patience_steps: int = Field(0, ge=0)
    #: A fall over the window at least this fraction of the loss EMA is no plateau.
    min_fall: float = Field(0.01, ge=0.0, allow_inf_nan=False)
    #: Leave a run alone while its own lr moves (the user's schedule owns it).
    defer_to_schedule: bool = True
    #: How much the run's own lr may move over the window (max/min - 1) and still count
    #: as not scheduled.
    schedule_moves: float = Field(0.02, ge=0.0, allow_inf_nan=False)


class Plateau(Policy):
    """Loss slope not significantly below zero over a clean window -> ``lr *= factor``."""

    name: ClassVar[str] = "plateau"
    Config: ClassVar[type[BaseModel]] = PlateauConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: PlateauConfig = self.config  # type: ignore[assignment]
        sig = view.signals
        if not view.loss_trend:
            return []  # a loss not expected to fall has no plateau to read
        if sig.slope is None or sig.slope_t is None or sig.slope_since_step is None:
            return []
        if sig.slope_n < max(cfg.min_reports, sig.slope_window):
            return []
        last = view.last_change_step.get("lr")
        patience = cfg.patience_steps or sig.slope_window * view.report_every
        # A window that spans an lr change measures two regimes, not this one.
        if last is not None and (sig.slope_since_step <= last or view.step - last < patience):
            return []
        if sig.slope_t < -cfg.t_crit:
            return []
        span = view.step - sig.slope_since_step
        fall = -sig.slope * span / abs(sig.loss_ema) if sig.loss_ema else 0.0
        if fall >= cfg.min_fall:
            return []  # not significant, but the estimate still falls a good deal: wait
        if cfg.defer_to_schedule and _own_lr_moves(view, sig.slope_since_step,
                                                   cfg.schedule_moves):
            return []
        reason = (
            f"loss plateau: slope {sig.slope:.3g}/step, t={sig.slope_t:.2f} > -{cfg.t_crit:g}, "
            f"{fall:+.2%} over {sig.slope_n} reports ({span} steps)"
        )
        return [Proposal("lr", factor=cfg.factor, reason=reason)]


def _own_lr_moves(view: JobView, since: int, moves: float) -> bool:
    """Whether the lr the run set itself (the lr used over trimtab's multiplier) moved by
    more than ``moves`` over the reports since ``since``."""
    own = [s.lr_used / s.lr for s in view.history
           if s.step >= since and s.lr_used is not None and s.lr]
    if len(own) < 2 or min(own) <= 0.0:
        return bool(own) and max(own) > 0.0 and min(own) <= 0.0
    return max(own) / min(own) > 1.0 + moves
