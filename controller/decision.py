"""What the engine decides, as data: the arbiter's pick for one knob, a knob's governed
decision, and the whole decision for one job at one step (what the controller journals,
exports and turns into a command).

The arbiter: for each knob, any decrease beats a hold, a hold beats an increase; among
decreases the largest wins, among increases the smallest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trimtab.controller.limits import MULTIPLIERS
from trimtab.controller.policy import Proposal
from trimtab.controller.rollback import RollbackPlan
from trimtab.controller.view import Phase
from trimtab.protocol import wire

if TYPE_CHECKING:
    from trimtab.controller.state import JobState

__all__ = ["GOVERNOR", "Arbitration", "arbitrate", "KnobDecision", "Decision"]

#: The policy name given when the governor acts on its own (a knob found outside its bounds).
GOVERNOR = "governor"


@dataclass(frozen=True)
class Arbitration:
    """The arbiter's pick for one knob: the target (None: no change), who asked, and why."""

    target: float | None
    policy: str | None = None
    reason: str = ""
    #: Proposals that could not be turned into a target (a factor with no value in force).
    unusable: tuple[str, ...] = ()


def arbitrate(current: float | None, proposals: Sequence[tuple[str, Proposal]]) -> Arbitration:
    """Merge ``(policy, proposal)`` pairs for one knob: largest decrease, else hold, else
    smallest increase.

    >>> arbitrate(1.0, [("a", Proposal("lr", factor=2.0, reason="up")),
    ...                 ("b", Proposal("lr", factor=0.5, reason="down"))]).target
    0.5
    """
    downs: list[tuple[float, str, str]] = []
    ups: list[tuple[float, str, str]] = []
    holds: list[tuple[str, str]] = []
    unusable: list[str] = []
    for name, p in proposals:
        if p.hold:
            holds.append((name, p.reason))
            continue
        if p.factor is not None:
            if current is None:
                unusable.append(name)
                continue
            target = current * p.factor
        else:
            target = float(p.value)  # type: ignore[arg-type]
        if current is None or target > current:
            ups.append((target, name, p.reason))
        elif target < current:
            downs.append((target, name, p.reason))
        else:
            holds.append((name, p.reason))
    if downs:
        target, name, reason = min(downs, key=lambda d: d[0])
        return Arbitration(target, name, reason, tuple(unusable))
    if holds:
        return Arbitration(None, holds[0][0], holds[0][1], tuple(unusable))
    if ups:
        target, name, reason = min(ups, key=lambda u: u[0])
        return Arbitration(target, name, reason, tuple(unusable))
    return Arbitration(None, None, "", tuple(unusable))


@dataclass(frozen=True)
class KnobDecision:
    """What happened to one knob in one decision."""

    knob: str
    current: float | None
    #: What the arbiter picked (None: hold, or nothing usable).
    target: float | None
    #: What the governor let through (None: nothing to send).
    commanded: float | None
    policy: str | None
    reason: str
    limits: tuple[str, ...] = ()
    #: The live schedule this knob follows from this decision on (None: per-decision values).
    live: wire.LiveSchedule | None = None
    #: The job's new correction factor for this knob (None: unchanged).
    correction: float | None = None
    #: A rollback's: the value in force when it was decided, where ``current`` is the value
    #: the restore brings back (the checkpoint's), which the command's value replaces.
    in_force: float | None = None

    @property
    def before(self) -> float | None:
        """The value the optimizer was using when this was decided."""
        return self.current if self.in_force is None else self.in_force

    def describe(self) -> str:
        """One line for a Command's reasons and the log; lr and weight decay as trimtab's
        multipliers on the user's own values (``lr x1 -> x0.5``)."""
        x = "x" if self.knob in MULTIPLIERS else ""
        before = self.before
        line = f"{self.knob} {x}{before:.6g} -> {x}{self.commanded:.6g}" if (
            before is not None and self.commanded is not None
        ) else f"{self.knob} {before} -> {self.commanded}"
        line += f" by {self.policy}: {self.reason}"
        if self.in_force is not None and self.current != self.in_force:
            restored = "none" if self.current is None else f"{x}{self.current:.6g}"
            line += f" (the restore brings back {restored}, which this replaces)"
        if self.limits:
            line += f" [limited: {', '.join(self.limits)}]"
        return line


@dataclass(frozen=True)
class Decision:
    """The engine's returned value for one job at one step."""

    step: int
    proposals: tuple[tuple[str, Proposal], ...]
    knobs: dict[str, KnobDecision] = field(default_factory=dict)
    #: ``(policy, error)`` for every policy disabled by this decision.
    errors: tuple[tuple[str, str], ...] = ()
    #: Shadow decisions are logged and exported, never sent.
    shadow: bool = False
    #: The rollback ordered (its governed knob targets are in ``knobs``); None: none.
    rollback: RollbackPlan | None = None
    #: The checkpoint step to mark stable now; None: none.
    mark_stable: int | None = None
    #: Why that checkpoint is marked, as the engine chose it (None with no mark).
    mark_reason: str | None = None
    #: Why the job went into rollback alert with this decision; None: it did not.
    alert: str | None = None
    #: What the engine's shadow policies would have done (``shadow=True``; never sent).
    shadowed: Decision | None = None
    #: ``"policy: reason"`` of the policies advising the run to stop; None: none did.
    stop_advice: str | None = None
    #: The live schedules from this decision on, when they change (``()``: none); None: the
    #: ones sent before stay.
    schedules: tuple[wire.LiveSchedule, ...] | None = None
    #: The measurement phase this decision ended, as it ended (``in_place``: no rollback;
    #: else with the return in ``rollback``); None: it ended none.
    phase_end: Phase | None = None
    #: The job's state as this decision leaves it (a draft, :meth:`JobState.fork
    #: <trimtab.controller.state.JobState.fork>`): deciding changes nothing, and
    #: :func:`~trimtab.controller.advance.commit` adopts it. Not part of the decision's value.
    draft: JobState | None = field(default=None, compare=False, repr=False)

    @property
    def would_command(self) -> dict[str, float]:
        """Knobs the governor let through with a new value, shadow or not."""
        return {
            k: d.commanded for k, d in self.knobs.items()
            if d.commanded is not None and d.commanded != d.current
        }

    @property
    def commands(self) -> dict[str, float]:
        """The knobs to send now (empty in shadow mode)."""
        return {} if self.shadow else self.would_command

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record for the journal (non-finite numbers become None)."""
        return {
            "step": self.step,
            "shadow": self.shadow,
            "proposals": [{"policy": n, **p.to_dict()} for n, p in self.proposals],
            "knobs": {
                k: {
                    "current": _json_num(d.current), "target": _json_num(d.target),
                    "commanded": _json_num(d.commanded), "policy": d.policy,
                    "reason": d.reason, "limits": list(d.limits),
                    **({} if d.in_force is None else {"in_force": _json_num(d.in_force)}),
                }
                for k, d in self.knobs.items()
            },
            "errors": [{"policy": n, "error": e} for n, e in self.errors],
            "commands": self.commands,
            "rollback": None if self.rollback is None else self.rollback.to_dict(),
            "mark_stable": self.mark_stable,
            "mark_reason": self.mark_reason,
            "alert": self.alert,
            "stop_advice": self.stop_advice,
            "schedules": None if self.schedules is None else [
                s.model_dump(mode="json") for s in self.schedules],
            "phase_end": None if self.phase_end is None else dataclasses.asdict(self.phase_end),
        }

    def reasons(self) -> list[str]:
        """One line per commanded knob, for ``wire.Command.reasons`` (each within 1024 chars),
        led by the rollback's."""
        lr = self.knobs.get("lr")
        lead = [] if self.rollback is None else [self.rollback.describe(
            *(() if lr is None else (lr.commanded, lr.limits)))]
        live = [] if self.schedules is None else [_describe_live(s) for s in self.schedules]
        if self.schedules == ():
            live = ["live schedules stopped: values per decision"]
        return lead + [
            self.knobs[k].describe()[:1024] for k in wire.KNOBS if k in self.would_command
        ] + live


def _json_num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _describe_live(s: wire.LiveSchedule) -> str:
    """One line for a live schedule sent."""
    pieces = " x ".join(f"{p.name}(from step {p.origin})" for p in s.pieces)
    hi = "inf" if s.hi is None else f"{s.hi:.6g}"
    what = "multiplier" if s.knob == "lr" else "value"
    return (f"{s.knob} live {what}: {pieces} x {s.scale:.6g} in [{s.lo:.6g}, {hi}], "
            "every step")[:1024]
