"""Live schedules: knob trajectories the controller hands over, evaluated before every step.

A command may carry :class:`~trimtab.protocol.wire.LiveSchedule` s (lr, and momentum for
OneCycle). From the step boundary that applies it until a newer command replaces them,
:meth:`LiveSchedules.values` gives each scheduled knob's value for the coming optimizer
step -- the same closed form (:mod:`trimtab.protocol.schedules`) the controller's policy
proposes, times the controller's correction, clamped to the governor's bounds -- so a
schedule follows torch's at every step, not once per report.

An lr schedule's value is trimtab's lr *multiplier* (the knob model, see
:mod:`trimtab.client._knobs`): it multiplies the user's own lr, so a trimtab schedule and
the user's compose as two chained schedulers do. A momentum schedule's value is the
momentum. It is host float math: no device read, no socket, no allocation that grows.

>>> from trimtab.protocol import wire
>>> live = LiveSchedules()
>>> live.replace([wire.LiveSchedule(knob="lr", pieces=[wire.SchedulePiece(
...     name="cosine", params={"lr": 1.0, "t_max": 100})], lo=0.1)])
>>> live.values(50), live.values(100)
({'lr': 0.5}, {'lr': 0.1})
"""

from __future__ import annotations

import logging

from trimtab.protocol import wire

__all__ = ["LiveSchedules"]

log = logging.getLogger("trimtab.client")


class LiveSchedules:
    """The live schedules in force on one client (none at first)."""

    def __init__(self) -> None:
        self.schedules: tuple[wire.LiveSchedule, ...] = ()
        #: The values of the last :meth:`values` call, by knob.
        self.last: dict[str, float] = {}

    def replace(self, schedules: list[wire.LiveSchedule] | None) -> None:
        """Take a command's schedules (``None``: keep those in force; ``[]``: none)."""
        if schedules is not None:
            self.schedules = tuple(schedules)
            self.last = {}

    def values(self, step: int) -> dict[str, float]:
        """Each scheduled knob's value for the optimizer step after ``step`` steps.

        A schedule that fails to evaluate, or gives a momentum out of ``[0, 1)`` or a
        negative lr multiplier, is dropped with a logged error; the knob's
        commanded value then holds.
        """
        if not self.schedules:
            return {}
        out: dict[str, float] = {}
        for schedule in self.schedules:
            try:
                value = schedule.value(step)
                if schedule.knob == "momentum" and not 0.0 <= value < 1.0:
                    raise ValueError(f"momentum={value!r} is out of range; allowed: 0 <= m < 1")
                if schedule.knob == "lr" and not value >= 0.0:
                    raise ValueError(f"lr multiplier {value!r} is out of range; allowed: >= 0")
                out[schedule.knob] = value
            except (ArithmeticError, ValueError) as exc:
                log.error(
                    "trimtab live %s schedule dropped at step %d: %s", schedule.knob, step, exc
                )
                self.schedules = tuple(s for s in self.schedules if s is not schedule)
        self.last = out
        return out
