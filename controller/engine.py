"""The engine: asks the policies, arbitrates per knob, and passes the result to the governor.

Safety first: a rollback beats everything; then, for each knob, any decrease beats a
hold, a hold beats an increase; among decreases the largest wins, among increases the
smallest. A policy that raises, returns nonsense or overruns its time budget
(:mod:`~trimtab.controller.budget`) is disabled for that job and the others go on.

A rollback proposal (:meth:`Proposal.roll_back`) becomes a rollback to the newest
stable checkpoint when :func:`~trimtab.controller.rollback_rules.plan_rollback` gives a plan:
the decision then carries it in :attr:`Decision.rollback`, its knob targets governed by
:meth:`Governor.govern_rollback` (bounds always, ``max_step_ratio ** level``; never the
cooldown) and recorded at the checkpoint's step in the governor memory, so ordinary
changes wait out their cooldown after it; every other proposal waits. Without a plan
the proposal is an ordinary governed LR decrease by its fallback factor. When nothing
is rolled back, a checkpoint healthy for a full window is marked stable
(:attr:`Decision.mark_stable`).

Schedules and corrections are :mod:`~trimtab.controller.scheduling`'s part of the
engine, measurement phases :mod:`~trimtab.controller.phases`'s: the :class:`Engine` is
made of the three.

>>> from trimtab.protocol import wire
>>> from trimtab.controller.governor import Governor
>>> from trimtab.controller.policy import KINDS, Policy, Proposal, Rollback, Sweep
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
>>> decision.commands  # the lr multiplier on the job's own lr (the knob model)
{'lr': 0.5}
>>> decision.reasons()
['lr x1 -> x0.5 by halve: demo']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from trimtab.controller.budget import PolicyBudget, PolicyTimeout
from trimtab.controller.decision import (
    GOVERNOR,
    Arbitration,
    Decision,
    KnobDecision,
    arbitrate,
)
from trimtab.controller.governor import Governor, KnobMemory
from trimtab.controller.health import UNCUT
from trimtab.controller.phases import PhaseRules, _found_lr, _safety
from trimtab.controller.policy import KINDS, Policy, Proposal, Rollback, Sweep
from trimtab.controller.rollback import RollbackConfig, RollbackPlan
from trimtab.controller.rollback_rules import plan_rollback, why_no_rollback, with_pending_mark
from trimtab.controller.scale import decay_is_lr_times_wd
from trimtab.controller.scheduling import ScheduleRules
from trimtab.controller.state import JobState
from trimtab.protocol import wire

__all__ = ["Arbitration", "arbitrate", "KnobDecision", "Decision", "Engine"]


class Engine(PhaseRules, ScheduleRules):
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
        budget: PolicyBudget | None = None, live_schedules: bool = False,
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
        #: Runs each ``propose`` under a time budget; None: called inline, unbounded.
        self.budget = budget
        #: Send schedules to the client to evaluate at every step (see the module docstring).
        self.live_schedules = live_schedules

    def decide(self, state: JobState) -> Decision:
        """Ask, arbitrate and govern every knob for ``state`` at its current step.

        Pure as far as the job goes: ``state`` is untouched. The decision is made on a draft
        (:meth:`JobState.fork <trimtab.controller.state.JobState.fork>`) and carries it
        (:attr:`Decision.draft`); :func:`~trimtab.controller.advance.commit` adopts it and
        builds the command. (Policies are called: one that keeps state of its own, or
        fails and is disabled in the draft, is the policy's business.)
        """
        draft = state.fork()
        # The shadow pass goes first, so that both passes see the same state.
        shadowed = self._shadow_pass(draft) if self.shadow_policies else None
        decision = self._decide(draft, self.policies, self.shadow, draft.memory)
        if not self.shadow:
            decision = self._settle_schedules(draft, decision)
        return dataclasses.replace(decision, shadowed=shadowed, draft=draft)

    def decide_urgent(self, state: JobState) -> Decision | None:
        """The decision to send while an earlier command still awaits its ack: a rollback
        only. Ordinary changes wait for the ack (they are governed against the values in
        force), but a run that has diverged must not go on for another report window: the
        live policies are asked, and a rollback one of them asks for is planned and ordered
        as :meth:`decide` would (the newer command supersedes the pending one); an open
        measurement phase ends with its return when non-finite values persist (see
        :data:`~trimtab.controller.phases.SAFETY`). A shadow engine sends nothing: None.
        Otherwise a decision, with no knobs when no rollback is asked for or can be made
        (it may still carry policy errors to journal, and its draft the policies they
        disabled). Pure, as :meth:`decide`."""
        if self.shadow:
            return None
        draft = state.fork()
        decision = self._decide(draft, self.policies, False, draft.memory, urgent=True)
        if decision.rollback is not None:
            decision = self._settle_schedules(draft, decision)
        return dataclasses.replace(decision, draft=draft)

    def _shadow_pass(self, state: JobState) -> Decision:
        """The shadow policies' decision, recorded in the shadow memory only.

        A shadow policy's measurement phase (the range test's sweep) cannot run in shadow:
        its later proposals read the run's own sweep. Its opening is journaled once as live
        would command it (the sweep's first value, bounds only, not the governor's step
        limits), with what live would then do, and the policy is asked nothing more in
        shadow for this job (``state.shadow_phases``): asked again, it would propose the
        same opening at every report, a row each, governed as an ordinary change."""
        asked = [p for p in self.shadow_policies if p.name not in state.shadow_phases]
        d = self._decide(state, asked, True, state.shadow_memory)
        # A knob the governor brings back into bounds is the live pass's business.
        knobs = {k: kd for k, kd in d.knobs.items() if kd.policy != GOVERNOR}
        opening = self._shadow_phase(state, d.proposals)
        if opening is not None:
            knobs[opening.knob] = opening
        d = dataclasses.replace(d, knobs=knobs)
        for knob, value in d.would_command.items():
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.note_shadow(knob, knobs[knob].policy or GOVERNOR, knobs[knob].current, value,
                              window)
        return d

    def _shadow_phase(self, state: JobState,
                      heard: Sequence[tuple[str, Proposal]]) -> KnobDecision | None:
        """A shadow policy's sweep that live would open a phase with (a checkpoint listed
        at or before the step to return to), as live would govern it (bounds only); the
        policy is marked in ``state.shadow_phases``. None: no such proposal."""
        opening = next(((n, p) for n, p in heard if p.sweep and p.knob is not None), None)
        if opening is None or not any(s <= state.step for s in state.rollback.checkpoints):
            return None
        name, p = opening
        knob = p.knob
        initial = getattr(state.initial, knob)
        gov = self.governor.govern_phase(knob, initial, p.value)  # type: ignore[arg-type]
        state.shadow_phases = {**state.shadow_phases, name: state.step}
        why = (f"{p.reason}; live, the run would sweep, and the phase end with a return to "
               "the checkpoint it began from or in place; a sweep cannot run in shadow, so "
               f"{name} proposes nothing more in shadow for this job")
        return KnobDecision(knob, state.current(knob), p.value, gov.value, name, why, gov.limits)

    def _decide(
        self, state: JobState, policies: Sequence[Policy], shadow: bool,
        memory: dict[str, KnobMemory], *, urgent: bool = False,
    ) -> Decision:
        heard, errors = self._ask(state, policies)
        # Paused by a person: only the safety net acts (the others are journaled, not acted on).
        acting = heard if shadow or state.paused is None else _while_paused(state, heard)
        proposals, opened, ending = acting, None, None
        if not shadow and state.phase is not None and _safety(acting, state.phase.policy):
            # Safety first: persistent non-finite values end any phase, at once.
            proposals, opened, ending = self._phase_filter(state, acting)
        elif urgent:  # rollbacks to the newest stable checkpoint, nothing else
            proposals = [(n, p) for n, p in acting if _asks_safety_rollback(p)]
        elif not shadow:
            proposals, opened, ending = self._phase_filter(state, acting)
        advice = [(n, p) for n, p in proposals if p.advice == "stop"]
        stop = "; ".join(f"{n}: {p.reason}" for n, p in advice)[:1024] or None
        phase = state.phase
        restart = None
        again = (not shadow and opened is None and ending is None
                 and self._restarts_phase(state, proposals))
        if phase is not None and (again or (opened is not None
                                            and phase.start_step < state.step)):
            # A phase opened to start over from an earlier checkpoint, or its policy starts
            # it over from its checkpoint: a planned rollback there, with the phase's sweep
            # (it is not the phase's end: the phase goes on).
            sweep = next(p for n, p in proposals if n == phase.policy and p.sweep)
            restart = plan_rollback(phase.policy, sweep.reason, state.rollback, self.rollback,
                                    phase.checkpoint if again else phase.start_step,
                                    sweep.value, in_force=state.knobs.model_dump())
            if restart is not None:
                restart = dataclasses.replace(restart, policy=phase.policy)
                if again:
                    state.phase = phase = dataclasses.replace(
                        phase, start_step=phase.checkpoint, restarts=phase.restarts + 1)
        # Advice changes no knob, so it never reaches the arbiter (a hold would block raises).
        if restart is not None:
            plan, alert, usable = restart, None, proposals
        else:
            plan, alert, usable = self._plan_rollback(
                state, [(n, p) for n, p in proposals if p.advice is None])
        parted = state.health is not None and state.health.cause in UNCUT
        if alert is not None and (state.rollback.stranded(self.rollback) or parted):
            # Rollbacks did not cure it and no step can (a stranded run), or every rank goes
            # on training a model of its own (parted replicas): the run should end (or be
            # looked at).
            stop = stop or alert[:1024]
        if urgent and plan is None:
            return Decision(step=state.step, proposals=(), knobs={}, errors=tuple(errors),
                            shadow=False)
        if restart is not None:
            kd = self._phase_knob(state, "lr", [(n, p) for n, p in proposals
                                                if n == phase.policy])  # type: ignore[union-attr]
            knobs = {} if kd is None else {"lr": kd}
        elif plan is not None:
            knobs = self._rollback_knobs(state, plan)
        else:
            knobs = {}
            for knob in wire.KNOBS:
                mine = [(n, p) for n, p in usable if p.knob == knob]
                kd = self._phase_knob(state, knob, mine) if state.phase and not shadow else None
                if kd is None:
                    kd = self._decide_knob(state, knob, mine, memory[knob])
                if kd is not None:
                    knobs[knob] = kd
            self._couple_weight_decay(state, knobs)
        marking = self._stable_mark(state, plan, opened, shadow)
        mark, mark_why = (None, None) if marking is None else marking
        decision = Decision(
            step=state.step, proposals=tuple(heard), knobs=knobs, errors=tuple(errors),
            shadow=shadow, rollback=plan, mark_stable=mark, mark_reason=mark_why,
            alert=alert, stop_advice=stop,
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
            state.rollback.note_ordered(plan, seq=state.command_seq + 1)  # the next command
        if mark is not None:
            state.rollback.note_mark(
                mark, short=state.step - mark < self.rollback.stable_window_steps)
        for knob, value in decision.commands.items():
            kd = knobs[knob]
            window = self.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
            state.note_change(knob, kd.policy or GOVERNOR, kd.current, value, window, step=at,
                              ran=kd.in_force)
            if plan is not None and plan.planned:
                # The slew window starts afresh at the measured value: the value restored
                # and the one set are not two points of one trajectory.
                state.memory[knob].history = [(at, value)]
        if ending is not None:
            decision = self._end_phase(state, decision, ending)
        return decision

    def _end_phase(self, state: JobState, decision: Decision, ending: Proposal) -> Decision:
        """End the open phase with ``decision``: with its return when the decision rolls the
        run back, else in place (the phase's last value, or a return that could not be
        made); recorded in the job's phases and as :attr:`Decision.phase_end`."""
        in_place = decision.rollback is None
        kd = decision.knobs.get("lr")
        lr = None if kd is None else kd.commanded if kd.commanded is not None else kd.target
        if in_place:
            for knob, value in decision.commands.items():
                # The measured value is the knob's new reference, as a return's would be:
                # no correction on top of it, and a slew window that starts afresh there.
                state.corrections.pop(knob, None)
                state.memory[knob].history = [(state.step, value)]
        done = state.end_phase(_found_lr(ending), None if in_place else ending.to_step,
                               in_place=in_place, lr=lr)
        return dataclasses.replace(decision, phase_end=done)

    def _plan_rollback(
        self, state: JobState, proposals: list[tuple[str, Proposal]]
    ) -> tuple[RollbackPlan | None, str | None, list[tuple[str, Proposal]]]:
        """``(plan, alert, proposals for the knobs)``: a rollback for the first rollback
        proposal, or none and those proposals turned into ordinary LR decreases."""
        phase = state.phase
        proposals = [
            (n, p) if p.to_step is None or (phase is not None and n == phase.policy)
            else (n, Proposal("lr", value=p.value, detail=p.detail, reason=(
                f"{p.reason} (no rollback: a rollback to a named checkpoint ends a measurement "
                f"phase, and {n} holds none)")))
            for n, p in proposals
        ]
        asks = [(n, p) for n, p in proposals if p.rollback is not None]
        if not asks:
            return None, None, proposals
        name, first = asks[0]
        if first.to_step is not None:
            plan = plan_rollback(first.rollback, first.reason, state.rollback,  # type: ignore[arg-type]
                                 self.rollback, first.to_step, first.value,
                                 in_force=state.knobs.model_dump())
            if plan is not None:
                return dataclasses.replace(plan, policy=name), None, proposals
            _, why = why_no_rollback(state.rollback, self.rollback, first.rollback,
                                     first.to_step) or ("", "")
            # The measured value still applies, as the phase's last (bounds-only) value.
            last = Sweep("lr", first.value, detail=first.detail,  # type: ignore[arg-type]
                         reason=f"{first.reason} (no rollback: {why})")
            return None, None, [(name, last)]
        reason = "; ".join(p.reason for _, p in asks)
        rb = with_pending_mark(state.rollback)
        plan = plan_rollback(first.rollback, reason, rb, self.rollback,  # type: ignore[arg-type]
                             in_force=state.knobs.model_dump())
        if plan is not None:
            return dataclasses.replace(plan, policy=name), None, proposals
        code, why = why_no_rollback(rb, self.rollback, first.rollback) or ("", "")
        alert = why if code == "budget" else None
        usable = [
            (n, _as_change(p, f"{p.reason} (no rollback: {why})"))
            if p.rollback is not None else (n, p)
            for n, p in proposals
            # A rollback with no fallback (parted replicas: no lr cut mends them) is none.
            if p.rollback is None or p.to_step is not None or p.factor is not None
        ]
        return None, alert, usable

    def _rollback_knobs(self, state: JobState, plan: RollbackPlan) -> dict[str, KnobDecision]:
        """The plan's knob targets through :meth:`Governor.govern_rollback`, relative to the
        values in force at the fault; a knob whose governed value is what the restore brings
        back anyway is not sent."""
        knobs = {}
        why = f"rollback to step {plan.target_step} (level {plan.level}): {plan.reason}"
        for knob, target in plan.targets.items():
            restored = plan.restored.get(knob)
            reference = plan.in_force.get(knob, restored)
            gov = self.governor.govern_rollback(
                knob, reference, getattr(state.initial, knob), target, plan.level,  # type: ignore[arg-type]
                restored=restored,
            )
            knobs[knob] = KnobDecision(knob, restored, target, gov.value, plan.policy, why,
                                       gov.limits, in_force=plan.in_force.get(knob))
        return knobs

    def _ask(
        self, state: JobState, policies: Sequence[Policy]
    ) -> tuple[list[tuple[str, Proposal]], list[tuple[str, str]]]:
        """Every enabled policy's proposals; a failing policy is disabled for this job."""
        view = state.view()
        proposals: list[tuple[str, Proposal]] = []
        errors: list[tuple[str, str]] = []
        asked = [p for p in policies if p.name not in state.disabled_policies]
        # Under a budget, all of them in one hand-over to its worker and one back.
        outcomes = (self.budget.call_each(asked, view) if self.budget is not None
                    else [_inline(p, view) for p in asked])
        for policy, (ok, out) in zip(asked, outcomes, strict=True):
            if ok:
                problem = _nonsense(out) or self._unallowed(out)
            elif isinstance(out, PolicyTimeout):  # hung: cut off, its thread abandoned
                problem = str(out)
            else:  # a plugin's bug must not take the controller down
                problem = f"raised {type(out).__name__}: {out}"
            if problem is not None:
                state.disable(policy.name, problem)
                errors.append((policy.name, problem))
                continue
            proposals.extend((policy.name, p) for p in out)
        return proposals, errors

    def _unallowed(self, out: Sequence[Proposal]) -> str | None:
        """Why a valid proposal asks for a value its knob can never take (zero where the
        knob's limits do not allow it), or None. The governor would refuse it at every
        decision, and the policy would go on asking, its every wish lost without a word."""
        for p in out:
            # A schedule's value may reach 0 at its end (a cosine to eta_min = 0, as torch's):
            # the client follows the schedule within the bounds; only a bare value is refused.
            if (p.value is not None and p.knob in wire.KNOBS and p.schedule is None
                    and not self.governor.allows(p.knob, p.value)):
                return (f"proposed {p.knob} value {p.value:g}, which the {p.knob}'s limits do "
                        f"not allow ([governor.{p.knob}] allow_zero = false)")
        return None

    def _couple_weight_decay(self, state: JobState, knobs: dict[str, KnobDecision]) -> None:
        """With ``wd_coupling="keep_product"``, an lr change by ``f`` that leaves wd alone
        divides wd by ``f`` in the same command, within wd's bounds, for optimizers whose
        decay per step is ``lr x wd`` (see :class:`GovernorConfig`); a rollback's lr cut
        is never coupled (decay slows with it, as the AdamW schedule multiplier does), nor
        a phase's sweep (its rollback restores both)."""
        lr = knobs.get("lr")
        wd = state.current("weight_decay")
        if (self.governor.config.wd_coupling != "keep_product" or lr is None or state.phase
                or lr.commanded is None or not lr.current or lr.commanded == lr.current
                or not wd or "weight_decay" in knobs
                or not decay_is_lr_times_wd(state.facts.optimizer)):
            return
        target = wd * lr.current / lr.commanded
        lo, hi = self.governor.bounds("weight_decay", state.initial.weight_decay)
        value = min(max(target, lo), hi)
        why = (f"wd_coupling=keep_product: lr x wd stays {lr.current * wd:.6g} as lr "
               f"goes {lr.current:.6g} -> {lr.commanded:.6g}")
        knobs["weight_decay"] = KnobDecision("weight_decay", wd, target, value, GOVERNOR, why,
                                             ("bounds",) if value != target else ())

    def _decide_knob(
        self, state: JobState, knob: str, mine: list[tuple[str, Proposal]], memory: KnobMemory,
    ) -> KnobDecision | None:
        current = state.current(knob)
        initial = getattr(state.initial, knob)
        out_of_bounds = self.governor.out_of_bounds(knob, current, initial)  # type: ignore[arg-type]
        if not mine and not out_of_bounds:
            return None
        if not out_of_bounds and any(p.schedule is not None and not p.sweep for _, p in mine):
            return self._scheduled_knob(state, knob, mine, memory)
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
            knob, memory, current, initial, target, state.step,  # type: ignore[arg-type]
            grad_norm=state.grad_norm_scale(),
        )
        return KnobDecision(knob, current, target, gov.value, policy, reason, gov.limits)



def _while_paused(state: JobState, heard: list[tuple[str, Proposal]]
                  ) -> list[tuple[str, Proposal]]:
    """The proposals acted on while a person has paused the job's policies (``trimtab
    pause``): the safety net's rollbacks (to the newest stable checkpoint, for a divergence
    or non-finite values), and a measurement phase under way, which runs to its return (cut
    off mid-sweep, it would leave the run at a sweep's lr). No other change, schedule, phase
    or advice; the governor's bounds and the stable marks go on as ever."""
    phase = state.phase
    return [(n, p) for n, p in heard
            if _asks_safety_rollback(p) or (phase is not None and n == phase.policy)]


def _asks_safety_rollback(p: Proposal) -> bool:
    """A rollback to the newest stable checkpoint (a divergence's, non-finite values'): what
    an urgent decision and a paused job still act on."""
    return p.rollback is not None and p.to_step is None and p.advice is None


def _as_change(p: Rollback, reason: str) -> Proposal:
    """A rollback that cannot be made, as the lr change it asks for instead: its fallback
    cut, or a planned one's value."""
    if p.to_step is None:
        return Proposal("lr", factor=p.factor, detail=p.detail, reason=reason)
    return Proposal("lr", value=p.value, detail=p.detail, reason=reason)


def _inline(policy: Policy, view: object) -> tuple[bool, object]:
    """``policy.propose(view)`` called here, as :meth:`PolicyBudget.call_each` reports it."""
    try:
        return True, policy.propose(view)
    except Exception as exc:
        return False, exc


def _nonsense(out: object) -> str | None:
    """Why a policy's return value cannot be used, or None if it can."""
    if not isinstance(out, (list, tuple)):
        return f"returned {type(out).__name__}, not a list of Proposal"
    for i, p in enumerate(out):
        if not isinstance(p, KINDS):
            return f"returned item {i} of type {type(p).__name__}, not a Proposal"
        try:
            p.__post_init__()  # re-check: a frozen dataclass can still be forced
        except ValueError as exc:
            return f"returned an invalid proposal: {exc}"
        for x in (p.factor, p.value):
            if x is not None and not math.isfinite(x):
                return f"returned a non-finite number {x!r} for {p.knob}"
    return None
