"""The engine: asks the policies, arbitrates per knob, and passes the result to the governor.

Safety first: a rollback beats everything; then, for each knob, any decrease beats a
hold, a hold beats an increase; among decreases the largest wins, among increases the
smallest. A policy that raises, returns nonsense or overruns its time budget
(:mod:`~trimtab.controller.budget`) is disabled for that job and the others go on.

A rollback proposal (:meth:`Proposal.roll_back`) becomes a rollback to the newest
stable checkpoint when :func:`~trimtab.controller.rollback.plan_rollback` gives a plan:
the decision then carries it in :attr:`Decision.rollback`, its knob targets governed by
:meth:`Governor.govern_rollback` (bounds always, ``max_step_ratio ** level``; never the
cooldown) and recorded at the checkpoint's step in the governor memory, so ordinary
changes wait out their cooldown after it; every other proposal waits. Without a plan
the proposal is an ordinary governed LR decrease by its fallback factor. When nothing
is rolled back, a checkpoint healthy for a full window is marked stable
(:attr:`Decision.mark_stable`).

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

A measurement phase (:class:`~trimtab.controller.state.Phase`; the LR range test's
sweep) opens with a policy's first sweep proposal (:meth:`Proposal.sweep_value`), once
per policy per job and only when the client lists a checkpoint at or before the step;
that checkpoint is marked stable with the same decision, so that the client keeps it
and can restore it. While the phase is open the engine takes that policy's proposals
only (the others are journaled with the decision, not acted on: a divergence guard
would read the sweep's rising loss as a divergence, a schedule would fight it), marks
nothing else stable, and governs its sweep values with the bounds only
(:meth:`Governor.govern_phase`). The phase ends with that policy's planned rollback
(``Proposal.roll_back(..., to_step=checkpoint, value=lr)``): level 0, the LR bounded
only, no escalation, budget or cooldown, its ``detail["found_lr"]`` kept as the job's
``found_lr``. A policy that fails mid-phase ends it with the return to the checkpoint
at the LR that was in force there (cause ``phase_aborted``).

>>> from trimtab.protocol import wire
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
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.rollback import (
    RollbackConfig,
    RollbackPlan,
    RollbackState,
    plan_rollback,
    stable_to_mark,
    why_no_rollback,
)
from trimtab.controller.scale import decay_is_lr_times_wd
from trimtab.controller.state import JobState
from trimtab.protocol import schedules, wire

__all__ = ["Arbitration", "arbitrate", "KnobDecision", "Decision", "Engine"]


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
        :data:`SAFETY`). A shadow engine sends nothing: None. Otherwise a decision, with
        no knobs when no rollback is asked for or can be made (it may still carry policy
        errors to journal, and its draft the policies they disabled). Pure, as
        :meth:`decide`."""
        if self.shadow:
            return None
        draft = state.fork()
        decision = self._decide(draft, self.policies, False, draft.memory, urgent=True)
        if decision.rollback is not None:
            decision = self._settle_schedules(draft, decision)
        return dataclasses.replace(decision, draft=draft)

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
        memory: dict[str, KnobMemory], *, urgent: bool = False,
    ) -> Decision:
        heard, errors = self._ask(state, policies)
        proposals, opened, ending = heard, None, None
        if not shadow and state.phase is not None and _safety(heard, state.phase.policy):
            # Safety first: persistent non-finite values end any phase, at once.
            proposals, opened, ending = self._phase_filter(state, heard)
        elif urgent:  # rollbacks to the newest stable checkpoint, nothing else
            proposals = [(n, p) for n, p in heard if p.rollback is not None
                         and p.to_step is None and p.advice is None]
        elif not shadow:
            proposals, opened, ending = self._phase_filter(state, heard)
        advice = [(n, p) for n, p in proposals if p.advice == "stop"]
        stop = "; ".join(f"{n}: {p.reason}" for n, p in advice)[:1024] or None
        phase = state.phase
        restart = None
        if opened is not None and phase is not None and phase.start_step < state.step:
            # A phase opened to start over from an earlier checkpoint: a planned rollback
            # there, with the phase's sweep (it is not the phase's end: the phase goes on).
            sweep = next(p for n, p in proposals if n == phase.policy and p.sweep)
            restart = plan_rollback(phase.policy, sweep.reason, state.rollback, self.rollback,
                                    phase.start_step, sweep.value,
                                    in_force=state.knobs.model_dump())
            if restart is not None:
                restart = dataclasses.replace(restart, policy=phase.policy)
        # Advice changes no knob, so it never reaches the arbiter (a hold would block raises).
        if restart is not None:
            plan, alert, usable = restart, None, proposals
        else:
            plan, alert, usable = self._plan_rollback(
                state, [(n, p) for n, p in proposals if p.advice is None])
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
        mark = self._stable_mark(state, plan, opened, shadow)
        decision = Decision(
            step=state.step, proposals=tuple(heard), knobs=knobs, errors=tuple(errors),
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
            if plan is not None and plan.planned:
                # The slew window starts afresh at the measured value: the value restored
                # and the one set are not two points of one trajectory.
                state.memory[knob].history = [(at, value)]
        if ending is not None:
            state.end_phase(_found_lr(ending), ending.to_step)
        return decision

    def _phase_filter(
        self, state: JobState, proposals: list[tuple[str, Proposal]]
    ) -> tuple[list[tuple[str, Proposal]], int | None, Proposal | None]:
        """``(proposals that count, checkpoint of a phase opened now, the proposal ending
        the open phase)``; see the module docstring for the rules of a phase."""
        phase, opened = state.phase, None
        if phase is None and _safety(proposals, ""):
            # Safety first: no phase opens while a safety rollback is asked for.
            return [(n, p) for n, p in proposals if not p.sweep], None, None
        if phase is None:
            ckpt = _phase_checkpoint(state)
            first = next((n for n, p in proposals if p.sweep and n not in state.phases_done
                          and p.advice is None), None)
            if first is None or ckpt is None:  # a sweep value outside its phase is dropped
                return [(n, p) for n, p in proposals if not p.sweep], None, None
            # A phase that starts over from an earlier checkpoint opens there: the decision
            # that opens it rolls the run back there and sends the sweep (see _decide).
            restart = self._restart_from(state, first, proposals)
            ckpt = ckpt if restart is None else restart
            phase, opened = state.begin_phase(first, ckpt, start=restart), ckpt
        mine = [(n, p) for n, p in proposals if n == phase.policy]
        ending = next((p for _, p in mine if p.to_step is not None), None)
        safety = _safety(proposals, phase.policy)
        failed = phase.policy in state.disabled_policies
        if failed or (safety and ending is None):
            # Its policy failed mid-phase, or the run went persistently non-finite during
            # it: return to the checkpoint with the LR it had there (the phase's values are
            # what went wrong, not the run's own), and the phase is over.
            seen = state.rollback.at_checkpoint.get(phase.checkpoint, {}).get("knobs", {})
            lr = seen.get("lr") or state.initial.lr
            if lr is None:  # nothing to return to: the phase just ends
                state.end_phase(None)
                return [(n, p) for n, p in proposals if not p.sweep], None, None
            cause, why = (("phase_aborted", f"{phase.policy} failed during its phase")
                          if failed else
                          (safety[1].rollback, f"{safety[0]}: {safety[1].reason} during "
                           f"{phase.policy}'s phase"))
            back = Proposal.roll_back(cause, why, to_step=phase.checkpoint, value=lr)  # type: ignore[arg-type]
            return [(phase.policy, back)], opened, back
        return mine, opened, ending

    def _restart_from(self, state: JobState, name: str,
                      proposals: list[tuple[str, Proposal]]) -> int | None:
        """The checkpoint a phase opening now asks to start over from (``detail
        ["restart_from"]`` of its first sweep proposal: the steps since ran too hot), when
        the client lists it, it lies before the current step and a planned rollback to it
        can be made; else None (the phase starts where the run is)."""
        p = next(p for n, p in proposals if n == name and p.sweep)
        want = (p.detail or {}).get("restart_from")
        rb = state.rollback
        if (not isinstance(want, int) or isinstance(want, bool) or want >= state.step
                or want not in rb.checkpoints or want in rb.unusable):
            return None
        if why_no_rollback(rb, self.rollback, name, want) is not None:
            return None
        return want

    def _phase_knob(
        self, state: JobState, knob: str, mine: list[tuple[str, Proposal]]
    ) -> KnobDecision | None:
        """The open phase's sweep value for ``knob``, bounds only (None: it sent none)."""
        sweep = [(n, p) for n, p in mine if p.sweep]
        if not sweep:
            return None
        name, p = sweep[-1]
        current = state.current(knob)
        initial = getattr(state.initial, knob)
        gov = self.governor.govern_phase(knob, initial, p.value)  # type: ignore[arg-type]
        if p.schedule is None or not self.live_schedules:
            return KnobDecision(knob, current, p.value, gov.value, name, p.reason, gov.limits)
        # The sweep goes live: the client follows it at every step, clamped to the bounds;
        # sent once, and again only if the policy's trajectory changes.
        lo, hi = self.governor.bounds(knob, initial)  # type: ignore[arg-type]
        spec = wire.LiveSchedule(knob=knob, pieces=[p.schedule], lo=lo,  # type: ignore[arg-type]
                                 hi=None if math.isinf(hi) else hi)
        commanded = None if state.live.get(knob) == spec else gov.value
        return KnobDecision(knob, current, p.value, commanded, name, p.reason, gov.limits,
                            live=spec)

    def _stable_mark(
        self, state: JobState, plan: RollbackPlan | None, opened: int | None, shadow: bool,
    ) -> int | None:
        """The checkpoint to mark stable with this decision: a phase's, at its opening and
        again with its return (the client restores stable checkpoints only, and keeps the
        newest one); none during a phase; else one healthy for a full window."""
        if shadow:
            return None
        rb = state.rollback
        if opened is not None or (plan is not None and plan.planned):
            step = opened if opened is not None else plan.target_step  # type: ignore[union-attr]
            return None if step in rb.stable or rb.pending_mark is not None else step
        if plan is not None and plan.target_step == rb.pending_mark:
            return rb.pending_mark  # sent again with the rollback to it (_with_pending_mark)
        if plan is not None and plan.target_step not in rb.stable:
            # A run gone non-finite with nothing stable goes back to the checkpoint taken at
            # attach; the client restores stable checkpoints only: mark it in the same command.
            return plan.target_step
        if plan is not None or state.phase is not None:
            return None
        if state.reports_seen == 1 and not rb.stable and rb.pending_mark is None:
            # The checkpoint taken at attach holds the run as its user handed it over, before
            # any step trimtab saw: the rollback target of last resort, marked at the first
            # report so that the client keeps it until a newer one is stable (a run too hot
            # from its first steps has nothing else worth returning to).
            attach = min(rb.in_force_at, default=None)
            if attach is not None and attach in rb.checkpoints and attach not in rb.unusable:
                return attach
        return stable_to_mark(rb, self.rollback)

    def _plan_rollback(
        self, state: JobState, proposals: list[tuple[str, Proposal]]
    ) -> tuple[RollbackPlan | None, str | None, list[tuple[str, Proposal]]]:
        """``(plan, alert, proposals for the knobs)``: a rollback for the first rollback
        proposal, or none and those proposals turned into ordinary LR decreases."""
        phase = state.phase
        proposals = [
            (n, p) if p.to_step is None or (phase is not None and n == phase.policy)
            else (n, dataclasses.replace(p, rollback=None, to_step=None, reason=(
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
            last = dataclasses.replace(first, rollback=None, to_step=None, sweep=True,
                                       reason=f"{first.reason} (no rollback: {why})")
            return None, None, [(name, last)]
        reason = "; ".join(p.reason for _, p in asks)
        rb = _with_pending_mark(state.rollback)
        plan = plan_rollback(first.rollback, reason, rb, self.rollback,  # type: ignore[arg-type]
                             in_force=state.knobs.model_dump())
        if plan is not None:
            return dataclasses.replace(plan, policy=name), None, proposals
        code, why = why_no_rollback(rb, self.rollback, first.rollback) or ("", "")
        alert = why if code == "budget" else None
        usable = [
            (n, dataclasses.replace(p, rollback=None, reason=f"{p.reason} (no rollback: {why})"))
            if p.rollback is not None else (n, p)
            for n, p in proposals
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
                knob, reference, getattr(state.initial, knob), target, plan.level  # type: ignore[arg-type]
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
                out = policy.propose(view) if self.budget is None else self.budget.call(
                    policy, view)
                problem = _nonsense(out)
            except PolicyTimeout as exc:  # hung: cut off, its thread abandoned
                problem = str(exc)
            except Exception as exc:  # a plugin's bug must not take the controller down
                problem = f"raised {type(exc).__name__}: {exc}"
            if problem is not None:
                state.disable(policy.name, problem)
                errors.append((policy.name, problem))
                continue
            proposals.extend((policy.name, p) for p in out)
        return proposals, errors

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


    # -- schedules and corrections ----------------------------------------------------------

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
            state.memory[knob].observe(state.step, spec.value(state.step), window)
        if not self.live_schedules and not state.live:
            return decision
        if live == state.live:
            return decision
        state.live = dict(live)
        return dataclasses.replace(decision, schedules=tuple(live[k] for k in wire.KNOBS
                                                             if k in live))


#: Rollback causes that override every phase, sweep, schedule and cooldown.
SAFETY: tuple[str, ...] = ("nonfinite",)


def _safety(proposals: Sequence[tuple[str, Proposal]], phase_policy: str
            ) -> tuple[str, Proposal] | None:
    """The first safety rollback (:data:`SAFETY`) another policy than the phase's asks for."""
    return next(((n, p) for n, p in proposals if p.rollback in SAFETY and p.to_step is None
                 and n != phase_policy), None)


def _with_pending_mark(rb: RollbackState) -> RollbackState:
    """``rb`` as the client will see it once a rollback command is applied: a mark sent and
    not yet acknowledged counts as done (a copy; ``rb`` is unchanged). The client may have
    applied it already, and then it keeps that checkpoint as its newest stable one and lets
    the one before go; or it may never (a newer command supersedes one not yet taken). A
    rollback ordered now targets the marked checkpoint and carries the mark again, which
    holds either way (see :meth:`Engine._stable_mark`)."""
    mark = rb.pending_mark
    if mark is None or mark not in rb.checkpoints or mark in rb.unusable:
        return rb
    view = dataclasses.replace(rb)
    view.note_marked(mark)
    return view


def _phase_checkpoint(state: JobState) -> int | None:
    """The checkpoint a phase opened now returns to: the newest the client lists at or
    before the current step (None: none, or a rollback is under way)."""
    rb = state.rollback
    if rb.pending is not None:
        return None
    ok = [s for s in rb.checkpoints if s <= state.step and s not in rb.unusable]
    return max(ok, default=None)


def _found_lr(p: Proposal) -> float | None:
    """``detail["found_lr"]`` of a phase's ending proposal, when a positive finite number."""
    x = (p.detail or {}).get("found_lr")
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
    return float(x) if ok else None


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
