"""The engine: asks the policies, arbitrates per knob, and passes the result to the governor.

Safety first: a rollback beats everything; then, for each knob, any decrease beats a
hold, a hold beats an increase; among decreases the largest wins, among increases the
smallest. A policy that raises or returns nonsense is disabled for that job and the
others go on.

A rollback proposal (:meth:`Proposal.roll_back`) becomes a rollback to the newest
stable checkpoint when :func:`~trimtab.controller.rollback.plan_rollback` gives a plan:
the decision then carries it in :attr:`Decision.rollback`, its knob targets governed by
:meth:`Governor.govern_rollback` (bounds always, ``max_step_ratio ** level``; never the
cooldown) and recorded at the checkpoint's step in the governor memory, so ordinary
changes wait out their cooldown after it; every other proposal waits. Without a plan
the proposal is an ordinary governed LR decrease by its fallback factor. When nothing
is rolled back, a checkpoint healthy for a full window is marked stable
(:attr:`Decision.mark_stable`).

>>> from trimtab.client import wire
>>> from trimtab.controller.governor import Governor
>>> from trimtab.controller.policy import Policy, Proposal
>>> from trimtab.controller.state import JobState
>>> class Halve(Policy):
...     name = "halve"
...     def propose(self, view):
...         return [Proposal("lr", factor=0.5, reason="demo")]
>>> facts = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
...                         dtype="float32", device="cpu")
>>> st = JobState.register(wire.Register(job="j", run_id="r", step=100, report_every=10,
...                                      facts=facts, knobs=wire.Knobs(lr=0.1)))
>>> decision = Engine([Halve()], Governor()).decide(st)
>>> decision.commands
{'lr': 0.05}
>>> decision.reasons()
['lr 0.1 -> 0.05 by halve: demo']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trimtab.client import wire
from trimtab.controller.governor import Governor, KnobMemory
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.rollback import (
    RollbackConfig,
    RollbackPlan,
    plan_rollback,
    stable_to_mark,
    why_no_rollback,
)
from trimtab.controller.state import JobState

__all__ = ["Arbitration", "arbitrate", "KnobDecision", "Decision", "Engine"]

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

    def describe(self) -> str:
        """One line for a Command's reasons and the log."""
        line = f"{self.knob} {self.current:.6g} -> {self.commanded:.6g}" if (
            self.current is not None and self.commanded is not None
        ) else f"{self.knob} {self.current} -> {self.commanded}"
        line += f" by {self.policy}: {self.reason}"
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
    #: Why the job went into rollback alert with this decision; None: it did not.
    alert: str | None = None
    #: What the engine's shadow policies would have done (``shadow=True``; never sent).
    shadowed: Decision | None = None
    #: ``"policy: reason"`` of the policies advising the run to stop; None: none did.
    stop_advice: str | None = None

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
                }
                for k, d in self.knobs.items()
            },
            "errors": [{"policy": n, "error": e} for n, e in self.errors],
            "commands": self.commands,
            "rollback": None if self.rollback is None else self.rollback.to_dict(),
            "mark_stable": self.mark_stable,
            "alert": self.alert,
            "stop_advice": self.stop_advice,
        }

    def reasons(self) -> list[str]:
        """One line per commanded knob, for ``wire.Command.reasons`` (each within 1024 chars),
        led by the rollback's."""
        lead = [self.rollback.describe()] if self.rollback is not None else []
        return lead + [
            self.knobs[k].describe()[:1024] for k in wire.KNOBS if k in self.would_command
        ]


def _json_num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class Engine:
    """Runs policies, the arbiter and the governor for a job; see the module docstring.

    ``shadow=True`` computes and returns decisions without recording them in the
    job's governor memory; their :attr:`Decision.commands` are empty.

    ``shadow_policies`` run beside the live ones, in a pass of their own (arbiter and
    governor) against the job's separate shadow governor memory, which records their
    would-be changes so their cooldowns and slew limits apply as if they were live; the
    result is :attr:`Decision.shadowed`, and nothing of it is ever sent.
    """

    def __init__(
        self, policies: Sequence[Policy], governor: Governor | None = None, shadow: bool = False,
        rollback: RollbackConfig | None = None, shadow_policies: Sequence[Policy] = (),
    ) -> None:
        for group in (policies, shadow_policies):
            names = [getattr(p, "name", None) for p in group]
            for policy, name in zip(group, names, strict=True):
                if not isinstance(policy, Policy) or not isinstance(name, str) or not name:
                    raise TypeError(f"{policy!r} is not a named trimtab Policy")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"policy names must be unique in one engine; repeated: {dupes}")
        self.policies = list(policies)
        self.shadow_policies = list(shadow_policies)
        self.governor = governor if governor is not None else Governor()
        self.shadow = shadow
        self.rollback = rollback if rollback is not None else RollbackConfig()

    def decide(self, state: JobState) -> Decision:
        """Ask, arbitrate and govern every knob for ``state`` at its current step."""
        # The shadow pass goes first, so that both passes see the same state.
        shadowed = self._shadow_pass(state) if self.shadow_policies else None
        decision = self._decide(state, self.policies, self.shadow, state.memory)
        return decision if shadowed is None else dataclasses.replace(decision, shadowed=shadowed)

    def _shadow_pass(self, state: JobState) -> Decision:
        """The shadow policies' decision, recorded in the shadow memory only."""
        d = self._decide(state, self.shadow_policies, True, state.shadow_memory)
        # A knob the governor brings back into bounds is the live pass's business.
        knobs = {k: kd for k, kd in d.knobs.items() if kd.policy != GOVERNOR}
        d = dataclasses.replace(d, knobs=knobs)
        for knob, value in d.would_command.items():
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.note_shadow(knob, knobs[knob].policy or GOVERNOR, knobs[knob].current, value,
                              window)
        return d

    def _decide(
        self, state: JobState, policies: Sequence[Policy], shadow: bool,
        memory: dict[str, KnobMemory],
    ) -> Decision:
        proposals, errors = self._ask(state, policies)
        advice = [(n, p) for n, p in proposals if p.advice == "stop"]
        stop = "; ".join(f"{n}: {p.reason}" for n, p in advice)[:1024] or None
        # Advice changes no knob, so it never reaches the arbiter (a hold would block raises).
        plan, alert, usable = self._plan_rollback(
            state, [(n, p) for n, p in proposals if p.advice is None])
        if plan is not None:
            knobs = self._rollback_knobs(state, plan)
        else:
            knobs = {}
            for knob in wire.KNOBS:
                mine = [(n, p) for n, p in usable if p.knob == knob]
                kd = self._decide_knob(state, knob, mine, memory[knob])
                if kd is not None:
                    knobs[knob] = kd
        mark = None if plan is not None or shadow else stable_to_mark(
            state.rollback, self.rollback)
        decision = Decision(
            step=state.step, proposals=tuple(proposals), knobs=knobs, errors=tuple(errors),
            shadow=shadow, rollback=plan, mark_stable=mark, alert=alert, stop_advice=stop,
        )
        if shadow:
            return decision
        # Recorded now because the caller sends what it gets back; shadow ones are not sent.
        if alert is not None:
            state.rollback.raise_alert(alert)
        at = None
        if plan is not None:
            # The run goes back to the checkpoint: changes after it never happened, and the
            # rollback's own ones count from it.
            at = plan.target_step
            state.rewind_controls(at)
            state.rollback.note_ordered(plan)
        if mark is not None:
            state.rollback.note_mark(mark)
        for knob, value in decision.commands.items():
            kd = knobs[knob]
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.note_change(knob, kd.policy or GOVERNOR, kd.current, value, window, step=at)
        return decision

    def _plan_rollback(
        self, state: JobState, proposals: list[tuple[str, Proposal]]
    ) -> tuple[RollbackPlan | None, str | None, list[tuple[str, Proposal]]]:
        """``(plan, alert, proposals for the knobs)``: a rollback for the first rollback
        proposal, or none and those proposals turned into ordinary LR decreases."""
        asks = [(n, p) for n, p in proposals if p.rollback is not None]
        if not asks:
            return None, None, proposals
        name, first = asks[0]
        reason = "; ".join(p.reason for _, p in asks)
        plan = plan_rollback(first.rollback, reason, state.rollback, self.rollback)  # type: ignore[arg-type]
        if plan is not None:
            return dataclasses.replace(plan, policy=name), None, proposals
        code, why = why_no_rollback(state.rollback, self.rollback, first.rollback) or ("", "")
        alert = why if code == "budget" else None
        usable = [
            (n, dataclasses.replace(p, rollback=None, reason=f"{p.reason} (no rollback: {why})"))
            if p.rollback is not None else (n, p)
            for n, p in proposals
        ]
        return None, alert, usable

    def _rollback_knobs(self, state: JobState, plan: RollbackPlan) -> dict[str, KnobDecision]:
        """The plan's knob targets through :meth:`Governor.govern_rollback`."""
        knobs = {}
        why = f"rollback to step {plan.target_step} (level {plan.level}): {plan.reason}"
        for knob, target in plan.targets.items():
            restored = plan.restored.get(knob)
            gov = self.governor.govern_rollback(
                knob, restored, getattr(state.initial, knob), target, plan.level  # type: ignore[arg-type]
            )
            knobs[knob] = KnobDecision(knob, restored, target, gov.value, plan.policy, why,
                                       gov.limits)
        return knobs

    def _ask(
        self, state: JobState, policies: Sequence[Policy]
    ) -> tuple[list[tuple[str, Proposal]], list[tuple[str, str]]]:
        """Every enabled policy's proposals; a failing policy is disabled for this job."""
        view = state.view()
        proposals: list[tuple[str, Proposal]] = []
        errors: list[tuple[str, str]] = []
        for policy in policies:
            if policy.name in state.disabled_policies:
                continue
            try:
                out = policy.propose(view)
                problem = _nonsense(out)
            except Exception as exc:  # a plugin's bug must not take the controller down
                problem = f"raised {type(exc).__name__}: {exc}"
            if problem is not None:
                state.disable(policy.name, problem)
                errors.append((policy.name, problem))
                continue
            proposals.extend((policy.name, p) for p in out)
        return proposals, errors

    def _decide_knob(
        self, state: JobState, knob: str, mine: list[tuple[str, Proposal]], memory: KnobMemory,
    ) -> KnobDecision | None:
        current = state.current(knob)
        initial = getattr(state.initial, knob)
        out_of_bounds = self.governor.out_of_bounds(knob, current, initial)  # type: ignore[arg-type]
        if not mine and not out_of_bounds:
            return None
        arb = arbitrate(current, mine)
        target, policy, reason = arb.target, arb.policy, arb.reason
        if out_of_bounds:
            lo, hi = self.governor.bounds(knob, initial)  # type: ignore[arg-type]
            target, policy = current, GOVERNOR
            reason = f"value in force {current:.6g} outside bounds [{lo:.6g}, {hi:.6g}]"
        if target is None:
            limits = ("invalid",) if arb.unusable and policy is None else ()
            if arb.unusable and policy is None:
                policy = arb.unusable[0]
                reason = "a factor cannot apply to a knob with no value in force"
            return KnobDecision(knob, current, None, None, policy, reason, limits)
        gov = self.governor.govern(
            knob, memory, current, initial, target, state.step  # type: ignore[arg-type]
        )
        return KnobDecision(knob, current, target, gov.value, policy, reason, gov.limits)


def _nonsense(out: object) -> str | None:
    """Why a policy's return value cannot be used, or None if it can."""
    if not isinstance(out, (list, tuple)):
        return f"returned {type(out).__name__}, not a list of Proposal"
    for i, p in enumerate(out):
        if not isinstance(p, Proposal):
            return f"returned item {i} of type {type(p).__name__}, not a Proposal"
        try:
            p.__post_init__()  # re-check: a frozen dataclass can still be forced
        except ValueError as exc:
            return f"returned an invalid proposal: {exc}"
        for x in (p.factor, p.value):
            if x is not None and not math.isfinite(x):
                return f"returned a non-finite number {x!r} for {p.knob}"
    return None
