"""What a policy proposes: four kinds, each with only the fields it carries.

* :class:`Proposal`: a change to one knob: a ``factor`` on the value in force, an
  absolute ``value``, or ``hold=True`` (no change); a schedule policy's proposal also
  carries its base trajectory (``schedule``).
* :class:`Rollback`: a rollback to the newest stable checkpoint for a ``cause``, with the
  LR cut to make instead when none can be made; or, with ``to_step``, a *planned*
  rollback to that checkpoint with the LR set to ``value`` (a measurement phase's return).
* :class:`Sweep`: one absolute value of a measurement sweep (the first opens the phase);
  with ``ends_phase``, the phase's last value: the phase ends where the run is, with no
  rollback.
* :class:`Advice`: advice to the run, no knob: ``"stop"``.

Every kind has a ``reason`` and may carry ``detail`` (JSON-serialisable facts journaled
with it). The engine reads every kind through the same attributes (``knob``, ``factor``,
``value``, ``hold``, ``rollback``, ``to_step``, ``sweep``, ``ends_phase``, ``advice``,
``schedule``, ``detail``): a kind answers None or False for what it does not carry. The
constructors :meth:`Proposal.roll_back`, :meth:`Proposal.sweep_value`,
:meth:`Proposal.end_in_place` and :meth:`Proposal.advise_stop` build the other kinds.

>>> Proposal("lr", factor=0.5, reason="loss plateau").factor
0.5
>>> p = Proposal.roll_back("nonfinite", "NaN loss")
>>> (type(p).__name__, p.rollback, p.knob, p.factor)
('Rollback', 'nonfinite', 'lr', 0.5)
>>> Proposal.roll_back("lr_range_test", "sweep done", to_step=0, value=0.03).to_step
0
>>> Proposal.sweep_value("lr", 1e-4, "range test at step 10").sweep
True
>>> Proposal.end_in_place("lr", 0.03, "sweep done, the run kept where it is").ends_phase
True
>>> a = Proposal.advise_stop("validation loss flat for 5 evaluations")
>>> (a.advice, a.knob)
('stop', None)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from trimtab.protocol import wire

__all__ = ["ADVICE", "Proposal", "Rollback", "Sweep", "Advice", "KINDS"]

_CAUSE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: A proposal's reason is cut to this many characters (a command's reasons are as long).
MAX_REASON = 1024
#: Advice a proposal may carry instead of a knob change.
ADVICE: tuple[str, ...] = ("stop",)


class _Kind:
    """What every kind answers, and its journal record."""

    knob: Any = None
    factor: float | None = None
    value: float | None = None
    hold: bool = False
    rollback: str | None = None
    to_step: int | None = None
    sweep: ClassVar[bool] = False
    ends_phase: bool = False
    advice: str | None = None
    schedule: wire.SchedulePiece | None = None
    detail: dict[str, Any] | None = None
    reason: str

    def _check_common(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(f"a proposal for {self.knob or 'the run'} needs a non-empty reason")
        if len(self.reason) > MAX_REASON:
            # A command carries each reason within this many characters: the journal keeps
            # what was sent, not a policy's essay (a frozen dataclass: set as it is built).
            object.__setattr__(self, "reason", self.reason[:MAX_REASON - 3] + "...")
        if self.detail is not None and not isinstance(self.detail, dict):
            raise ValueError(f"detail must be a dict or None, got {type(self.detail).__name__}")
        if self.detail is not None:
            # Journaled with the decision: a detail the journal cannot write would leave a
            # command sent with no record of it.
            try:
                json.dumps(self.detail, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError("detail must be JSON: str, int, float (finite), bool, None, "
                                 f"lists and dicts with str keys; {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (the journal's; the same keys for every kind)."""
        out: dict[str, Any] = {
            "knob": self.knob, "factor": self.factor, "value": self.value,
            "hold": self.hold, "reason": self.reason, "rollback": self.rollback,
        }
        if self.advice is not None:
            out["advice"] = self.advice
        if self.to_step is not None:
            out["to_step"] = self.to_step
        if self.sweep:
            out["sweep"] = True
        if self.ends_phase:
            out["ends_phase"] = True
        if self.detail is not None:
            out["detail"] = self.detail
        if self.schedule is not None:
            out["schedule"] = self.schedule.model_dump(mode="json")
        return out


@dataclass(frozen=True)
class Proposal(_Kind):
    """A change to one knob: exactly one of ``factor`` (on the value in force), ``value`` or
    ``hold=True``; with ``schedule`` (lr or momentum), a schedule's base trajectory whose
    value now is ``value`` (the engine multiplies it by the job's correction and may send
    it to the client to evaluate at every step)."""

    knob: wire.Knob
    _: KW_ONLY
    reason: str
    factor: float | None = None
    value: float | None = None
    hold: bool = False
    schedule: wire.SchedulePiece | None = None
    detail: dict[str, Any] | None = None

    @staticmethod
    def roll_back(cause: str, reason: str, *, fallback_factor: float | None = 0.5,
                  to_step: int | None = None, value: float | None = None,
                  detail: dict[str, Any] | None = None) -> Rollback:
        """Roll back to the newest stable checkpoint for ``cause``; where no rollback can be
        made, cut the LR by ``fallback_factor`` (< 1) instead (None: nothing instead). With
        ``to_step``: a planned rollback to that checkpoint, the LR set to ``value`` (also
        where none can be made)."""
        if to_step is not None:
            return Rollback(cause, reason=reason, to_step=to_step, value=value, detail=detail)
        return Rollback(cause, reason=reason, factor=fallback_factor, detail=detail)

    @staticmethod
    def sweep_value(knob: wire.Knob, value: float, reason: str,
                    detail: dict[str, Any] | None = None,
                    schedule: wire.SchedulePiece | None = None) -> Sweep:
        """One value of a measurement sweep of ``knob`` (opens the policy's phase); with
        ``schedule``, the sweep's trajectory (``value`` is its value now), which the engine
        sends live for the client to follow step by step."""
        return Sweep(knob, value, reason=reason, detail=detail, schedule=schedule)

    @staticmethod
    def end_in_place(knob: wire.Knob, value: float, reason: str,
                     detail: dict[str, Any] | None = None) -> Sweep:
        """The last value of the proposing policy's measurement sweep: its phase ends now
        where the run is, with no rollback, and ``value`` is set (bounds only), as a
        planned rollback's would be; ``detail["found_lr"]`` becomes the job's ``found_lr``."""
        return Sweep(knob, value, reason=reason, detail=detail, ends_phase=True)

    @staticmethod
    def advise_stop(reason: str) -> Advice:
        """Recommend that the run stop, and why; no knob changes."""
        return Advice(reason=reason)

    def __post_init__(self) -> None:
        _check_knob(self.knob)
        self._check_common()
        given = [n for n in ("factor", "value") if getattr(self, n) is not None]
        if self.hold is not False:
            given.append("hold")
        if len(given) != 1:
            raise ValueError(
                f"a proposal for {self.knob} takes exactly one of factor, value or hold=True; "
                f"got {given or 'none'}")
        if self.hold is not False and self.hold is not True:
            raise ValueError(f"hold must be True or False, got {self.hold!r}")
        _check_number(self.knob, "factor", self.factor, strictly_positive=True)
        _check_number(self.knob, "value", self.value, strictly_positive=False)
        _check_schedule(self.knob, self.schedule, self.value)


@dataclass(frozen=True)
class Sweep(_Kind):
    """One absolute value of a measurement sweep: the first one opens the phase for its
    policy, and while the phase runs the engine takes that policy's proposals only and
    lets its values past every governor limit but the bounds (see
    :mod:`~trimtab.controller.phases`). With ``ends_phase``, the sweep's last value: the
    phase ends with it where the run is, no rollback (it opens no phase, and takes no
    schedule)."""

    knob: wire.Knob
    value: float
    _: KW_ONLY
    reason: str
    schedule: wire.SchedulePiece | None = None
    detail: dict[str, Any] | None = None
    ends_phase: bool = False
    sweep: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_knob(self.knob)
        self._check_common()
        if self.value is None:
            raise ValueError(f"a sweep proposal for {self.knob} takes an absolute value")
        if self.ends_phase is not False and self.ends_phase is not True:
            raise ValueError(f"ends_phase must be True or False, got {self.ends_phase!r}")
        if self.ends_phase and self.schedule is not None:
            raise ValueError(f"a sweep's last value (ends_phase) for {self.knob} is a value, "
                             "not a schedule; got a schedule")
        _check_number(self.knob, "value", self.value, strictly_positive=False)
        _check_schedule(self.knob, self.schedule, self.value)


@dataclass(frozen=True)
class Rollback(_Kind):
    """A rollback for ``cause`` (a short identifier, e.g. ``"nonfinite"``; it becomes a
    metric label). Without ``to_step``: to the newest stable checkpoint, ``factor`` (< 1)
    the LR cut to make instead where none can be made (None: none). With ``to_step``: a planned
    rollback to the checkpoint listed at that step, stable or not, the LR set to
    ``value``: the return at the end of a measurement phase, which the engine orders only
    for the policy holding that phase; it neither escalates nor counts against the
    rollback budget. Always for the lr."""

    cause: str
    _: KW_ONLY
    reason: str
    factor: float | None = None
    to_step: int | None = None
    value: float | None = None
    detail: dict[str, Any] | None = None
    knob: ClassVar[str] = "lr"

    @property
    def rollback(self) -> str:  # type: ignore[override]
        return self.cause

    def __post_init__(self) -> None:
        self._check_common()
        if not isinstance(self.cause, str) or not _CAUSE.match(self.cause):
            raise ValueError(f"a rollback cause must match {_CAUSE.pattern}, got {self.cause!r}")
        if self.to_step is not None:
            if (isinstance(self.to_step, bool) or not isinstance(self.to_step, int)
                    or self.to_step < 0):
                raise ValueError(f"to_step must be a checkpoint step (an int >= 0), "
                                 f"got {self.to_step!r}")
            if self.value is None or self.factor is not None:
                raise ValueError(
                    "a planned rollback (to_step) takes the LR to set after the restore as its "
                    f"value, and no factor; got value={self.value!r} factor={self.factor!r}")
            _check_number("lr", "value", self.value, strictly_positive=False)
            return
        if self.value is not None or (self.factor is not None and not self.factor < 1):
            raise ValueError(
                "a rollback proposal takes a fallback factor < 1 or None (a planned one, with "
                f"to_step, a value); got factor={self.factor!r} value={self.value!r}")
        if self.factor is not None:
            _check_number("lr", "factor", self.factor, strictly_positive=True)


@dataclass(frozen=True)
class Advice(_Kind):
    """Advice to the run instead of a knob change: one of :data:`ADVICE`. The engine
    carries it in the decision and the controller passes it on (``Command.stop_advice``)."""

    _: KW_ONLY
    reason: str
    advice: str = "stop"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._check_common()
        if self.advice not in ADVICE:
            raise ValueError(f"advice must be one of {', '.join(ADVICE)}, got {self.advice!r}")


#: Every kind of proposal a policy may return.
KINDS: tuple[type, ...] = (Proposal, Rollback, Sweep, Advice)


def _check_knob(knob: Any) -> None:
    if knob not in wire.KNOBS:
        raise ValueError(f"knob {knob!r} is not one of {', '.join(wire.KNOBS)}")


def _check_schedule(knob: str, schedule: Any, value: float | None) -> None:
    if schedule is not None and (not isinstance(schedule, wire.SchedulePiece) or value is None
                                 or knob not in ("lr", "momentum")):
        raise ValueError(f"a schedule proposal is a wire.SchedulePiece with a value, for lr "
                         f"or momentum; got {knob} schedule={schedule!r:.80} value={value!r}")


def _check_number(knob: str, what: str, x: Any, strictly_positive: bool) -> None:
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{knob} {what} must be a finite number, got {x!r}")
    if x < 0 or (strictly_positive and x == 0):
        allowed = "> 0" if strictly_positive else ">= 0"
        raise ValueError(f"{knob} {what} must be {allowed}, got {x!r}")
