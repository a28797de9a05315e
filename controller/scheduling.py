"""Schedules and corrections: the engine's rules for a knob that follows a trajectory.

Schedules and corrections. A schedule policy's proposal (one carrying
:attr:`Proposal.schedule`) is the *base trajectory* of its knob, not a rival of the
other policies: the target is ``schedule(step) x correction x f``, where ``f`` is the
arbitrated factor proposed now by the other policies (largest decrease, else smallest
increase) and ``correction`` the product of the factors taken before, kept per job and
knob in :attr:`JobState.corrections` (so a plateau's cut holds under a cosine instead of
being undone at the next decision; a rollback's LR cut joins it too). Absolute values and
holds of other policies are then arbitrated against that target as above, as one-offs.
Several schedules of one knob compose as torch's ``ChainedScheduler`` with closed forms:
the first one's value times the others' factors (a ``warmup`` after a ``cosine`` in the
config ramps the cosine), see :func:`compose_pieces`.

Live schedules (``live_schedules=True``, the controller's default): the trajectory goes
to the client as a :class:`~trimtab.protocol.wire.LiveSchedule` (formula, parameters,
correction, the governor's bounds), which it evaluates before every optimizer step, so
the knob follows the schedule at every step rather than once per report; it is sent in
reply to the registration (:meth:`Engine.decide_schedules`) and again only when it
changes. The governor still bounds it: the client clamps to the bounds sent; a new
trajectory's jump from the value in force, and every correction, pass
:meth:`Governor.govern` as any change does; and the schedule's own per-step moves up to
two report windows ahead must stay within ``max_step_ratio`` per step and
``slew_ratio`` with the slew window's history -- where they would not (a 10x step decay
under a x2 limit), the knob falls back to governed values per report until the
trajectory is within reach again. Cooldown, deadband and hysteresis judge decisions,
not the steps of one agreed trajectory. A rollback, a measurement phase, or another
policy's absolute value or hold winning stops the live schedule for that decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from trimtab.controller.decision import GOVERNOR, Decision, KnobDecision, arbitrate
from trimtab.controller.governor import KnobMemory
from trimtab.controller.policy import Proposal
from trimtab.controller.state import JobState
from trimtab.protocol import schedules, wire

__all__ = ["ScheduleRules", "compose_pieces"]


class ScheduleRules:
    """The :class:`~trimtab.controller.engine.Engine`'s schedule rules (a mixin: ``self``
    is the engine, with its governor and ``live_schedules``)."""

    def decide_schedules(self, state: JobState) -> Decision:
        """A decision on the scheduled knobs only, for a job that just registered: its live
        schedules (or first scheduled values) before its first report. Pure, as
        :meth:`decide`."""
        state = state.fork()
        # Only schedules are asked: the other policies have nothing to go on before a report.
        asked = [p for p in self.policies if getattr(p, "formula", None) is not None]
        proposals, errors = self._ask(state, asked)
        scheduled = [(n, p) for n, p in proposals if p.schedule is not None]
        knobs = {}
        for knob in dict.fromkeys(p.knob for _, p in scheduled):
            mine = [(n, p) for n, p in scheduled if p.knob == knob]
            kd = self._decide_knob(state, knob, mine, state.memory[knob])
            if kd is not None:
                knobs[knob] = kd
        decision = Decision(step=state.step, proposals=tuple(scheduled), knobs=knobs,
                            errors=tuple(errors), shadow=self.shadow, draft=state)
        if self.shadow:
            return decision
        for knob, value in decision.commands.items():
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.note_change(knob, knobs[knob].policy or GOVERNOR, knobs[knob].current, value,
                              window)
        return self._settle_schedules(state, decision)

    def _scheduled_knob(
        self, state: JobState, knob: str, mine: list[tuple[str, Proposal]], memory: KnobMemory,
    ) -> KnobDecision:
        """A knob with a schedule: target = schedule x correction x the factor proposed now,
        arbitrated with the absolute and hold proposals; live when the governor allows."""
        current, initial = state.current(knob), getattr(state.initial, knob)
        scheds = [(n, p) for n, p in mine if p.schedule is not None and not p.sweep]
        pieces = compose_pieces(knob, [p.schedule for _, p in scheds])  # type: ignore[misc]
        lo, hi = self.governor.bounds(knob, initial)  # type: ignore[arg-type]
        corr = state.corrections.get(knob, 1.0)
        spec = wire.LiveSchedule(knob=knob, pieces=pieces, scale=corr, lo=lo,  # type: ignore[arg-type]
                                 hi=None if math.isinf(hi) else hi)
        base = spec.model_copy(update={"scale": 1.0, "lo": 0.0, "hi": None}).value(state.step)
        factors = [(n, p) for n, p in mine if p.schedule is None and p.factor is not None]
        fa = arbitrate(1.0, factors)
        f = 1.0 if fa.target is None else fa.target
        name = scheds[0][0] if f == 1.0 else fa.policy
        reason = "; ".join(p.reason for _, p in scheds)
        if f != 1.0:
            reason = f"{fa.reason} (correction x{corr * f:.6g} on {reason})"
        elif corr != 1.0:
            reason = f"{reason} (correction x{corr:.6g})"
        candidate = min(max(base * corr * f, lo), hi)
        rest = [(n, p) for n, p in mine if (p.schedule is None or p.sweep) and p.factor is None]
        arb = arbitrate(current, [(name, Proposal(knob, value=candidate, reason=reason)), *rest])  # type: ignore[arg-type]
        if arb.policy != name or arb.target not in (None, candidate):
            # Another policy's absolute value or hold wins: a one-off, per decision.
            return self._governed(state, knob, arb.target, arb.policy, arb.reason, memory)
        running = state.live.get(knob)
        if f == 1.0 and self.live_schedules and running == spec and self._live_ok(state, spec):
            return KnobDecision(knob, current, candidate, None, name, reason, live=spec)
        gov = self.governor.govern(knob, memory, current, initial, candidate, state.step)  # type: ignore[arg-type]
        taken = gov.value is not None and math.isclose(gov.value, candidate, rel_tol=1e-12)
        correction = None
        if f != 1.0 and gov.value is not None:
            # With the schedule live, the governor limited the correction's jump alone.
            live_before = running is not None and self.live_schedules
            correction = (corr * f if taken or not live_before or base <= 0.0
                          else gov.value / base)
            spec = spec.model_copy(update={"scale": correction})
            taken = taken or live_before
        elif f != 1.0 and running is not None and self.live_schedules:
            # The correction waits (cooldown, deadband...); the schedule goes on as it was.
            return KnobDecision(knob, current, candidate, None, name, reason, gov.limits,
                                live=running)
        quiet = gov.value is None and set(gov.limits) <= {"deadband", "hysteresis"}
        live = (spec if self.live_schedules and (taken or quiet) and self._live_ok(state, spec)
                else None)
        commanded = gov.value
        if live is not None and commanded is None and running != live:
            commanded = candidate  # a new trajectory: its value now goes with it
        return KnobDecision(knob, current, candidate, commanded, name, reason, gov.limits,
                            live=live, correction=correction)

    def _governed(
        self, state: JobState, knob: str, target: float | None, policy: str | None, reason: str,
        memory: KnobMemory,
    ) -> KnobDecision:
        current = state.current(knob)
        if target is None:
            return KnobDecision(knob, current, None, None, policy, reason)
        gov = self.governor.govern(
            knob, memory, current, getattr(state.initial, knob), target, state.step)  # type: ignore[arg-type]
        return KnobDecision(knob, current, target, gov.value, policy, reason, gov.limits)

    def _live_ok(self, state: JobState, spec: wire.LiveSchedule) -> bool:
        """Whether ``spec``'s own steps, up to two report windows ahead (the next decision
        and a lost one), stay within ``max_step_ratio`` per step and ``slew_ratio`` with
        the slew window's history; bounds are clamped by the client itself."""
        lim = self.governor.limits(spec.knob)
        if lim.max_step_ratio is None and lim.slew_ratio is None:
            return True
        horizon = min(2 * state.report_every, 20_000)
        values = [spec.value(state.step + i) for i in range(horizon + 1)]
        if lim.max_step_ratio is not None and not _within(values, lim.max_step_ratio, True):
            return False
        if lim.slew_ratio is not None:
            # The history holds the live schedule's value at each decision (see
            # _settle_schedules) besides the changes commanded.
            start = state.step - lim.slew_window_steps
            seen = [v for s, v in state.memory[spec.knob].history if s > start]
            return _within(seen + values, lim.slew_ratio, False)
        return True

    def _settle_schedules(self, state: JobState, decision: Decision) -> Decision:
        """Record corrections and live schedules in the job's state; the decision carries the
        live schedules when they change. A rollback's cut becomes part of the correction of
        a scheduled knob, and stops live schedules until the next decision."""
        for knob, kd in decision.knobs.items():
            if kd.correction is not None:
                state.corrections[knob] = kd.correction
        live = {k: kd.live for k, kd in decision.knobs.items() if kd.live is not None}
        # A measurement phase owns the knobs: only its own sweep may be live meanwhile, and
        # it stays live through a decision that says nothing of its knob (the schedules
        # sent in reply to a re-registration mid-sweep).
        if state.phase is not None:
            live = {k: kd.live for k, kd in decision.knobs.items()
                    if kd.live is not None and kd.policy == state.phase.policy}
            live = {**{k: s for k, s in state.live.items() if k not in decision.knobs}, **live}
        restarting = (decision.rollback is not None and decision.rollback.planned
                      and state.phase is not None
                      and state.phase.start_step == decision.rollback.target_step)
        if decision.rollback is not None and not restarting:
            scheduled = {p.knob for _, p in decision.proposals if p.schedule is not None}
            for knob, kd in decision.knobs.items():
                if decision.rollback.planned:
                    # A phase's return sets a measured value: the schedules' new reference
                    # (found_lr), not a correction on top of them.
                    state.corrections.pop(knob, None)
                elif knob in scheduled and kd.commanded is not None:
                    # The cut is relative to the value in force at the fault, not to the
                    # one the restore brings back.
                    at_fault = decision.rollback.in_force.get(knob) or kd.current
                    if at_fault:
                        state.corrections[knob] = (state.corrections.get(knob, 1.0)
                                                   * kd.commanded / at_fault)
            live = {}
        for knob, spec in live.items():
            # The client follows it between decisions: its points count in the slew window.
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.memory[knob].observe(state.step, spec.value(state.step), window,
                                       state.memory_from)
        if not self.live_schedules and not state.live:
            return decision
        if live == state.live:
            return decision
        state.live = dict(live)
        return dataclasses.replace(decision, schedules=tuple(live[k] for k in wire.KNOBS
                                                             if k in live))


def compose_pieces(knob: str, pieces: Sequence[wire.SchedulePiece]) -> list[wire.SchedulePiece]:
    """Several schedules of one knob as one trajectory, as torch's ``ChainedScheduler``: the
    first one's value times the others' factors (their reference lr set to 1). Momentum
    has no reference to take a factor of: the first schedule's alone.

    >>> a = wire.SchedulePiece(name="cosine", params={"lr": 0.1, "t_max": 100})
    >>> b = wire.SchedulePiece(name="warmup", params={"lr": 0.1, "warmup_steps": 10})
    >>> [p.params.get("lr") for p in compose_pieces("lr", [a, b])]
    [0.1, 1.0]
    """
    if knob != "lr":
        return list(pieces[:1])
    out = list(pieces[:1])
    for piece in pieces[1:]:
        ref = schedules.REFERENCE[piece.name]
        out.append(piece.model_copy(update={"params": {**piece.params, ref: 1.0}}))
    return out

def _within(values: Sequence[float], ratio: float, consecutive: bool) -> bool:
    """Whether consecutive ``values`` (else all of them) stay within ``ratio`` of each other."""
    pairs = (zip(values[:-1], values[1:], strict=True) if consecutive
             else [(min(values), max(values))])
    for a, b in pairs:
        low, high = min(a, b), max(a, b)
        if high > 0.0 and (low <= 0.0 or high / low > ratio * (1 + 1e-12)):
            return False
    return True
