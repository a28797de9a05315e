"""The governor: the last word on every knob value the controller sends.

Whatever a policy asks for, the governor holds each knob within absolute and
relative bounds, moves it at most ``max_step_ratio`` per decision and
``slew_ratio`` per window (the momentum's on ``1 / (1 - momentum)``), waits
``cooldown_steps`` between changes, ignores changes inside a ``deadband`` and refuses
small reversals (hysteresis). It is
pure: the per-knob :class:`KnobMemory` it reads lives in the job's state, and the
engine records into it only what is actually sent.

The knob model: ``lr`` and ``weight_decay`` are trimtab's *multipliers* on the user's own
values (:data:`MULTIPLIERS`; 1.0 leaves the user's schedule as it is), so every limit
but one acts on the multiplier -- the bounds ``[min_rel, max_rel]`` (relative to 1.0),
the step ratio, the slew window -- and a falling user schedule is never lifted by them.
The one absolute limit is the lr's ``max``: a cap the client puts on the effective lr
when the multiplier is above 1 (it never lowers the user's own lr).

>>> gov = Governor()
>>> mem = KnobMemory()
>>> out = gov.govern("lr", mem, current=1.0, initial=1.0, target=1000.0, step=100)
>>> (out.value, out.limits)
(2.0, ('max_step_ratio',))

``limits`` names the limits the value stopped at: x1000 is past the bounds and the slew
range too, but the step ratio, the tightest, set it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trimtab.controller.limits import MULTIPLIERS, GovernorConfig, KnobLimits
from trimtab.protocol import wire

__all__ = [
    "LIMIT_NAMES",
    "KnobMemory",
    "Governed",
    "Governor",
]

#: Names a :class:`Governed` outcome may give for the limits that acted.
LIMIT_NAMES: tuple[str, ...] = (
    "invalid", "cooldown", "bounds", "max_step_ratio", "slew", "deadband", "hysteresis",
)

@dataclass
class KnobMemory:
    """What the governor remembers of one knob for one job.

    ``history`` holds ``(step, value)`` of commanded values in the slew window,
    led by the value that was in force when the window opened.
    """

    history: list[tuple[int, float]] = field(default_factory=list)
    last_change_step: int | None = None
    #: +1 up, -1 down, 0 never changed.
    last_direction: int = 0

    def copy(self) -> KnobMemory:
        """A copy with its own history list."""
        return KnobMemory(list(self.history), self.last_change_step, self.last_direction)

    def record(self, step: int, previous: float | None, value: float, window_steps: int,
               keep_from: int | None = None) -> None:
        """Remember that ``value`` was commanded at ``step`` (replacing ``previous``).
        ``keep_from``: the oldest step the run may be rolled back to (the oldest checkpoint
        listed): the window behind it is kept too, so that after a rollback there the slew
        limit still sees the values that ran before it on the run's path."""
        if not self.history and previous is not None:
            # The value this change started from is part of the slew window too.
            self.history.append((step, previous))
        self.history.append((step, value))
        self.history = _window(self.history, _oldest(step, keep_from, window_steps),
                               window_steps)
        if previous is not None and value != previous:
            self.last_direction = 1 if value > previous else -1
        self.last_change_step = step

    def observe(self, step: int, value: float, window_steps: int,
                keep_from: int | None = None) -> None:
        """Remember that the knob was at ``value`` at ``step`` with no change decided (a point
        of a live schedule): it counts in the slew window, not for cooldown or direction."""
        self.history.append((step, value))
        self.history = _window(self.history, _oldest(step, keep_from, window_steps),
                               window_steps)

    def rewind(self, step: int) -> None:
        """Forget changes after ``step`` (the run is rolled back to it)."""
        self.history = [(s, v) for s, v in self.history if s <= step]
        if self.last_change_step is not None and self.last_change_step > step:
            self.last_change_step = step

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "history": [[s, v] for s, v in self.history],
            "last_change_step": self.last_change_step,
            "last_direction": self.last_direction,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; unknown or missing keys are an error."""
        _check_keys("KnobMemory", sd, {"history", "last_change_step", "last_direction"})
        self.history = [(int(s), float(v)) for s, v in sd["history"]]
        self.last_change_step = sd["last_change_step"]
        self.last_direction = int(sd["last_direction"])


def _check_keys(what: str, sd: dict[str, Any], expected: set[str]) -> None:
    missing, unexpected = expected - sd.keys(), sd.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{what} state_dict: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)}"
        )


def _to_horizon(momentum: float) -> float:
    """``1 / (1 - momentum)``: the steps a gradient is averaged over (inf at 1 and above)."""
    return math.inf if momentum >= 1.0 else 1.0 / (1.0 - momentum)


def _from_horizon(h: float) -> float:
    return 1.0 if math.isinf(h) else 1.0 - 1.0 / h


#: How far behind the current step the memory reaches for a rollback target, in slew
#: windows: bounded, so that a checkpoint held for the whole run (the last resort of one
#: that never gets a stable mark) never makes the memory grow with the run.
_MAX_BACK_WINDOWS = 10


def _oldest(step: int, keep_from: int | None, window_steps: int) -> int:
    if keep_from is None:
        return step
    return max(min(step, keep_from), step - _MAX_BACK_WINDOWS * window_steps)


def _window(
    history: list[tuple[int, float]], step: int, window_steps: int
) -> list[tuple[int, float]]:
    """Entries after ``step - window_steps``, led by the last one at or before it."""
    start = step - window_steps
    keep = list(history)
    while len(keep) >= 2 and keep[1][0] <= start:
        keep.pop(0)
    return keep


@dataclass(frozen=True)
class Governed:
    """A governed outcome: the value to command (``None``: nothing) and the limits that acted."""

    value: float | None
    limits: tuple[str, ...] = ()


class Governor:
    """Applies a :class:`GovernorConfig`; see the module docstring for an example."""

    def __init__(self, config: GovernorConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = GovernorConfig()
        elif isinstance(config, dict):
            config = GovernorConfig.model_validate(config)
        self.config = config

    def limits(self, knob: wire.Knob) -> KnobLimits:
        """The limits for ``knob``."""
        return getattr(self.config, knob)

    def allows(self, knob: wire.Knob, value: float) -> bool:
        """Whether ``knob`` can ever take ``value`` (finite, not negative, and 0 only where
        its limits allow zero): a value it cannot is refused as ``invalid`` every time."""
        return _valid(value, self.limits(knob))

    def bounds(self, knob: wire.Knob, initial: float | None) -> tuple[float, float]:
        """``(lo, hi)`` for ``knob`` given its value at registration.

        Absolute bounds are hard; if the relative range lies wholly outside them
        the bound nearest to it is used.
        """
        lim = self.limits(knob)
        abs_lo = lim.min if lim.min is not None else 0.0
        abs_hi = lim.max if lim.max is not None else math.inf
        if knob in MULTIPLIERS:  # the lr's max caps the effective lr, on the client
            abs_lo, abs_hi = 0.0, math.inf
        lo, hi = abs_lo, abs_hi
        if initial is not None:
            if lim.min_rel is not None:
                lo = max(lo, lim.min_rel * initial)
            if lim.max_rel is not None:
                hi = min(hi, lim.max_rel * initial)
        if lo > hi:
            lo = hi = min(max(lo, abs_lo), abs_hi)
        return lo, hi

    def grad_norm_range(
        self, knob: wire.Knob, grad_norm: float | None
    ) -> tuple[float, float] | None:
        """``(lo, hi)`` a target for ``knob`` is clamped to given the job's gradient-norm
        scale (None: no such limit, or no scale yet).

        >>> Governor().grad_norm_range("clip", 2.0)
        (0.2, 20.0)
        """
        lim = self.limits(knob)
        if grad_norm is None or not math.isfinite(grad_norm) or grad_norm <= 0.0:
            return None
        if lim.min_rel_grad_norm is None and lim.max_rel_grad_norm is None:
            return None
        lo = 0.0 if lim.min_rel_grad_norm is None else lim.min_rel_grad_norm * grad_norm
        hi = math.inf if lim.max_rel_grad_norm is None else lim.max_rel_grad_norm * grad_norm
        return lo, hi

    def out_of_bounds(self, knob: wire.Knob, current: float | None, initial: float | None) -> bool:
        """Whether the value in force lies outside the bounds (the engine then corrects it)."""
        if current is None:
            return False
        lo, hi = self.bounds(knob, initial)
        return not lo <= current <= hi

    def govern(
        self,
        knob: wire.Knob,
        memory: KnobMemory,
        current: float | None,
        initial: float | None,
        target: float,
        step: int,
        grad_norm: float | None = None,
    ) -> Governed:
        """The value to command for ``knob`` when ``target`` is asked at ``step``;
        ``grad_norm`` is the job's gradient-norm scale (see :meth:`grad_norm_range`)."""
        lim = self.limits(knob)
        lo, hi = self.bounds(knob, initial)
        if current is not None and not lo <= current <= hi:
            # Bounds always win: move to the nearest bound, whatever else applies; the
            # policy's own target can be taken up at the next decision.
            return Governed(min(max(current, lo), hi), ("bounds",))
        if not _valid(target, lim):
            return Governed(None, ("invalid",))
        last = memory.last_change_step
        if last is not None and step - last < lim.cooldown_steps:
            return Governed(None, ("cooldown",))
        scaled = self.grad_norm_range(knob, grad_norm)
        if scaled is not None and not scaled[0] <= target <= scaled[1]:
            out = self.govern(knob, memory, current, initial,
                              min(max(target, scaled[0]), scaled[1]), step)
            return Governed(out.value, ("bounds", *(a for a in out.limits if a != "bounds")))
        if current is None:
            # Nothing to take a ratio of (e.g. clipping off): bounds only.
            value = min(max(target, lo), hi)
            return Governed(value, ("bounds",) if value != target else ())
        value, acted = self._clamp(lim, memory, current, lo, hi, target, step,
                                   horizon=knob == "momentum")
        if value is None or value == current:
            return Governed(None, acted)
        return self._filter(lim, memory, current, value, step, acted)

    def govern_rollback(
        self,
        knob: wire.Knob,
        reference: float | None,
        initial: float | None,
        target: float,
        level: int,
        restored: float | None = None,
    ) -> Governed:
        """The value to command for ``knob`` with a rollback at escalation ``level``;
        ``reference`` is the value the cut is measured from (the one in force at the fault),
        ``restored`` the one the restore brings back (the checkpoint's): the step ratio
        never keeps a knob from it, which the run already ran at on this path.

        A rollback is a safety action: the cooldown does not hold it back, and slew,
        deadband and hysteresis, which judge small steps along one trajectory, do not
        apply to a jump back to an older one. What does apply: the bounds, always, and
        ``max_step_ratio ** level`` around ``reference`` (a first rollback moves a knob as
        far as one decision may from where the fault found it, each escalation one decision
        further). ``level`` 0 is a planned rollback (the return at the end of
        an LR range test, to a value it measured): the bounds only.

        >>> gov = Governor()
        >>> gov.govern_rollback("lr", reference=1.0, initial=1.0, target=0.1, level=1)
        Governed(value=0.5, limits=('max_step_ratio',))
        >>> gov.govern_rollback("lr", reference=1.0, initial=1.0, target=0.1, level=3).value
        0.125
        """
        lim = self.limits(knob)
        if not _valid(target, lim):
            return Governed(None, ("invalid",))
        lo, hi = self.bounds(knob, initial)
        value, acted = target, []
        if reference is not None and lim.max_step_ratio is not None and level > 0:
            r = lim.max_step_ratio ** level
            low, high = reference / r, reference * r
            if restored is not None:
                low, high = min(low, restored), max(high, restored)
            if not low <= value <= high:
                value, acted = min(max(value, low), high), ["max_step_ratio"]
        if not lo <= value <= hi:
            value = min(max(value, lo), hi)
            acted.append("bounds")
        return Governed(value, tuple(acted))

    def govern_phase(self, knob: wire.Knob, initial: float | None, target: float) -> Governed:
        """The value to command for ``knob`` in a measurement phase (an LR range test's
        sweep): the bounds, always; not the step ratio, slew, cooldown, deadband or
        hysteresis, which would stretch an exponential sweep over thousands of steps. The
        engine allows it to one policy per job, once (see :mod:`~trimtab.controller.engine`).

        >>> Governor().govern_phase("lr", initial=1.0, target=50.0)
        Governed(value=10.0, limits=('bounds',))
        """
        lim = self.limits(knob)
        if not _valid(target, lim):
            return Governed(None, ("invalid",))
        lo, hi = self.bounds(knob, initial)
        value = min(max(target, lo), hi)
        return Governed(value, ("bounds",) if value != target else ())

    def _clamp(
        self, lim: KnobLimits, memory: KnobMemory, current: float,
        lo: float, hi: float, target: float, step: int, horizon: bool = False,
    ) -> tuple[float | None, tuple[str, ...]]:
        """Clamp into the intersection of bounds, step-ratio and slew ranges. ``horizon``
        (the momentum): the ratios are taken on ``1 / (1 - momentum)``, the number of steps
        a gradient is averaged over, which scales the step as the lr does (0.9 -> 0.999 is
        100x, not 1.11x); the value is mapped back."""
        if horizon:
            out, acted = self._clamp(lim, KnobMemory(
                [(s, _to_horizon(v)) for s, v in memory.history], memory.last_change_step,
                memory.last_direction), _to_horizon(current), _to_horizon(lo), _to_horizon(hi),
                _to_horizon(target), step)
            if out is None:
                return None, acted
            # The ends exactly (a round trip through 1 / (1 - m) moves the last digit).
            back = (target if out == _to_horizon(target) else
                    current if out == _to_horizon(current) else _from_horizon(out))
            return min(max(back, min(current, target)), max(current, target)), acted
        ranges = [("bounds", lo, hi)]
        if lim.max_step_ratio is not None:
            r = lim.max_step_ratio
            ranges.append(("max_step_ratio", current / r, current * r))
        if lim.slew_ratio is not None:
            seen = [v for _, v in _window(memory.history, step, lim.slew_window_steps)]
            seen.append(current)
            ranges.append(("slew", max(seen) / lim.slew_ratio, min(seen) * lim.slew_ratio))
        acted = tuple(name for name, a, b in ranges if not a <= target <= b)
        low = max(a for _, a, _ in ranges)
        high = min(b for _, _, b in ranges)
        if low > high:
            # Only when the value in force moved outside the slew range on its own.
            return None, acted or ("slew",)
        value = min(max(target, low), high)
        if not min(current, target) <= value <= max(current, target):
            # The value in force left the slew range on its own (the user's schedule moved
            # it): the range would turn the change asked into one the other way. None.
            return None, acted or ("slew",)
        # The limits that set the value: those whose edge it stopped at, not every range
        # the target fell outside (a 4x move under max_step_ratio 2 is not slew-limited
        # because slew, looser, would also have stopped it somewhere).
        binding = tuple(name for name, a, b in ranges
                        if (target < low and a == value) or (target > high and b == value))
        return value, binding

    def _filter(
        self, lim: KnobLimits, memory: KnobMemory, current: float, value: float,
        step: int, acted: tuple[str, ...],
    ) -> Governed:
        """Drop changes too small to matter (deadband) or too small to reverse (hysteresis)."""
        rel = abs(value - current) / current if current > 0 else math.inf
        if rel < lim.deadband:
            return Governed(None, (*acted, "deadband"))
        direction = 1 if value > current else -1
        last = memory.last_change_step
        reversing = (
            memory.last_direction == -direction
            and last is not None
            and step - last <= lim.reversal_window_steps
        )
        if reversing and rel < lim.reversal_min_change:
            return Governed(None, (*acted, "hysteresis"))
        return Governed(value, acted)


def _valid(target: float, lim: KnobLimits) -> bool:
    if not isinstance(target, (int, float)) or not math.isfinite(target) or target < 0.0:
        return False
    return target > 0.0 or lim.allow_zero
