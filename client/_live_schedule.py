"""Live schedules: knob trajectories the controller hands over, evaluated before every step.

A command may carry :class:`~trimtab.client.wire.LiveSchedule` s (lr, and momentum for
OneCycle). From the step boundary that applies it until a newer command replaces them,
:meth:`LiveSchedules.apply` sets each scheduled knob before every optimizer step to the
schedule's value at the step -- the same closed form (:mod:`trimtab.client.schedules`)
the controller's policy proposes, times the controller's correction, clamped to the
governor's bounds -- so a schedule follows torch's at every step, not once per report.

It is host float math on param-group entries: no device read, no socket, no allocation
that grows. The lr is written as a command's is (group 0 gets the value, the other
groups keep their ratios to it); momentum is set in every group that has one. A user's
own LR scheduler for the same knob would be overridden at every step: use one or the
other.

>>> import torch
>>> from trimtab.client import wire
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> live = LiveSchedules()
>>> live.replace([wire.LiveSchedule(knob="lr", pieces=[wire.SchedulePiece(
...     name="cosine", params={"lr": 0.1, "t_max": 100})], lo=0.01)])
>>> live.apply(opt, 50); opt.param_groups[0]["lr"]
0.05
>>> live.apply(opt, 100); opt.param_groups[0]["lr"]
0.01
"""

from __future__ import annotations

import logging

import torch

from . import wire
from ._knobs import _scale_groups, _set_momentum

__all__ = ["LiveSchedules"]

log = logging.getLogger("trimtab.client")


class LiveSchedules:
    """The live schedules in force on one client (none at first)."""

    def __init__(self) -> None:
        self.schedules: tuple[wire.LiveSchedule, ...] = ()

    def replace(self, schedules: list[wire.LiveSchedule] | None) -> None:
        """Take a command's schedules (``None``: keep those in force; ``[]``: none)."""
        if schedules is not None:
            self.schedules = tuple(schedules)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every scheduled knob to its value for the optimizer step after ``step`` steps.

        A schedule that fails to evaluate is dropped with a logged error; training goes on
        at the values in force.
        """
        if not self.schedules:
            return
        groups = optimizer.param_groups
        for schedule in self.schedules:
            try:
                value = schedule.value(step)
                if schedule.knob == "lr":
                    _scale_groups(groups, "lr", value)
                elif value < 1.0:
                    _set_momentum(groups, value)
                else:
                    raise ValueError(f"momentum={value!r} is out of range; allowed: 0 <= m < 1")
            except (ArithmeticError, ValueError) as exc:
                log.error(
                    "trimtab live %s schedule dropped at step %d: %s", schedule.knob, step, exc
                )
                self.schedules = tuple(s for s in self.schedules if s is not schedule)
