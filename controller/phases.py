"""Measurement phases: the engine's rules for a policy that holds the run for a while.

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
``found_lr``; or in place (``Proposal.end_in_place(knob, value, ...)``, the sweep's
last value): no rollback, the value set with the bounds only and the phase recorded as
ended in place at that step and value (:attr:`Decision.phase_end`, ``Phase.in_place``).
Its policy may also start the phase over from its checkpoint while it is open (a sweep
value with ``detail["restart_from"]`` that checkpoint): a planned rollback there, with
the sweep, and the phase goes on (``Phase.restarts`` counts them; the range test does so
while the data its sweep meets is bad).
A return that cannot be made (no restorable checkpoint) ends the phase in place too,
and is recorded so. A policy that fails mid-phase ends it with the return to the
checkpoint at the LR that was in force there (cause ``phase_aborted``); so does a phase
whose checkpoint the client no longer lists (a run resumed in a new process from the
user's checkpoint): the return cannot restore it, and sets that LR only.

Safety outranks a phase: persistent non-finite values and parted replicas (:data:`SAFETY`)
end any phase at once, with its return, also when its policy proposes to end it in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from trimtab.controller.decision import KnobDecision
from trimtab.controller.health import DAMAGE
from trimtab.controller.policy import Proposal
from trimtab.controller.rollback import RollbackPlan
from trimtab.controller.rollback_rules import stable_to_mark, why_no_rollback
from trimtab.controller.state import JobState
from trimtab.protocol import wire

__all__ = ["SAFETY", "PhaseRules"]


#: Rollback causes that override every phase, sweep, schedule and cooldown.
SAFETY: tuple[str, ...] = DAMAGE


class PhaseRules:
    """The :class:`~trimtab.controller.engine.Engine`'s measurement-phase rules (a mixin:
    ``self`` is the engine, with its governor and rollback config)."""

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
            first = next((n for n, p in proposals if p.sweep and not p.ends_phase
                          and n not in state.phases_done and p.advice is None), None)
            if first is None or ckpt is None:  # a sweep value outside its phase is dropped
                return [(n, p) for n, p in proposals if not p.sweep], None, None
            # A phase that starts over from an earlier checkpoint opens there: the decision
            # that opens it rolls the run back there and sends the sweep (see _decide).
            restart = self._restart_from(state, first, proposals)
            ckpt = ckpt if restart is None else restart
            asked = next(p for n, p in proposals if n == first and p.sweep)
            phase, opened = state.begin_phase(
                first, ckpt, start=restart, sweep_from=asked.value,
                opened=None if asked.detail is None else dict(asked.detail)), ckpt
        mine = [(n, p) for n, p in proposals if n == phase.policy]
        ending = next((p for _, p in mine if p.to_step is not None or p.ends_phase), None)
        in_place = ending is not None and ending.ends_phase
        safety = _safety(proposals, phase.policy)
        failed = phase.policy in state.disabled_policies
        # The client no longer holds the phase's checkpoint (it always keeps a stable one):
        # a new process resumed from the user's own checkpoint. The phase cannot end with
        # its return, so it ends now, at the LR it had there (an end in place needs none).
        lost = (phase.checkpoint not in state.rollback.checkpoints
                and state.rollback.pending is None and not in_place)
        if failed or lost or (safety and (ending is None or in_place)):
            # Its policy failed mid-phase, or the run went persistently non-finite during
            # it (an end in place would keep the non-finite run): return to the checkpoint
            # with the LR it had there (the phase's values are what went wrong, not the
            # run's own), and the phase is over.
            seen = state.rollback.at_checkpoint.get(phase.checkpoint, {}).get("knobs", {})
            lr = seen.get("lr") or state.initial.lr
            if lr is None:  # nothing to return to: the phase just ends
                state.end_phase(None)
                return [(n, p) for n, p in proposals if not p.sweep], None, None
            cause, why = (("phase_aborted", f"{phase.policy} failed during its phase")
                          if failed else
                          ("phase_aborted", f"the run no longer holds the checkpoint at step "
                           f"{phase.checkpoint} that {phase.policy}'s phase returns to "
                           "(resumed in a new process)")
                          if lost and not safety else
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

    def _restarts_phase(self, state: JobState,
                        proposals: Sequence[tuple[str, Proposal]]) -> bool:
        """Whether the open phase's policy asks to start its phase over from the phase's
        checkpoint (a sweep value, not its last, with ``detail["restart_from"]`` that
        checkpoint), and a planned rollback there can be made: the engine then rolls the
        run back there with the sweep, and the phase goes on (``Phase.restarts``)."""
        phase = state.phase
        if phase is None:
            return False
        p = next((p for n, p in proposals
                  if n == phase.policy and p.sweep and not p.ends_phase), None)
        want = None if p is None else (p.detail or {}).get("restart_from")
        rb = state.rollback
        if (want != phase.checkpoint or isinstance(want, bool) or want >= state.step
                or want not in rb.checkpoints or want in rb.unusable):
            return False
        return why_no_rollback(rb, self.rollback, phase.policy, want) is None

    def _phase_knob(
        self, state: JobState, knob: str, mine: list[tuple[str, Proposal]]
    ) -> KnobDecision | None:
        """The open phase's sweep value for ``knob``, bounds only (None: it sent none)."""
        sweep = [(n, p) for n, p in mine if p.sweep]
        if not sweep:
            return None
        # The phase's last value, when it sends one, is the value it ends with.
        name, p = next(((n, p) for n, p in sweep if p.ends_phase), sweep[-1])
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
    ) -> tuple[int, str] | None:
        """The checkpoint to mark stable with this decision, and why: a phase's, at its
        opening and again with its return (the client restores stable checkpoints only, and
        keeps the newest one); none during a phase; else one healthy for a full window. The
        why goes into the command's reasons and the journal as chosen here, never guessed
        afterwards."""
        if shadow:
            return None
        rb = state.rollback
        target = "the rollback's target (the client restores stable ones only)"
        if opened is not None or (plan is not None and plan.planned):
            step = opened if opened is not None else plan.target_step  # type: ignore[union-attr]
            if step in rb.stable or rb.pending_mark is not None:
                return None
            if plan is not None and plan.target_step == step:
                return step, target
            owner = state.phase.policy if state.phase is not None else "a measurement"
            return step, f"{owner}'s phase returns to it"
        if plan is not None and plan.target_step == rb.pending_mark:
            return rb.pending_mark, target  # sent again with the rollback to it
        if plan is not None and plan.target_step not in rb.stable:
            # A run gone non-finite with nothing stable goes back to the checkpoint taken at
            # attach; the client restores stable checkpoints only: mark it in the same command.
            return plan.target_step, target
        if plan is not None or state.phase is not None:
            return None
        last = next((s for s in rb.last_resort
                     if s in rb.checkpoints and s not in rb.unusable), None)
        spiking = state.health is not None and state.health.cause not in DAMAGE
        if last is not None and not rb.stable and rb.pending_mark is None and not spiking:
            # The checkpoint at the registration, or taken at attach (or of the state a
            # resumed process loaded), holds the run as this controller met it or its user
            # handed it over, before any step trimtab saw: the rollback target of last
            # resort, marked at the first report so that the client keeps it until a newer
            # one is stable (a run too hot from its first steps, or soon after a resume, has
            # nothing else worth returning to). Not with a report judged a spike or climb
            # against the run's history from before it (a resume, a controller that took
            # the run back up): the run was already in it there (a save made during a
            # burst of bad batches), and rollbacks to it replay the burst's aftermath and
            # cut the LR each time; marked with the first report that is not. Non-finite
            # values keep it a target: the weights there were finite.
            return last, ("the run as this controller met it or its user handed it over, "
                          "the rollback target of last resort while nothing else is stable")
        mark = stable_to_mark(rb, self.rollback, state.checkpoint_keep)
        if mark is None:
            return None
        seen, steps = rb.judged_after(mark), state.step - mark
        why = f"{seen} healthy report{'s' if seen != 1 else ''} after it ({steps} steps)"
        if steps < self.rollback.stable_window_steps:
            why += (f", short of the {self.rollback.stable_window_steps}-step window: the "
                    "client's next snapshot drops it from its ring")
        return mark, why


def _safety(proposals: Sequence[tuple[str, Proposal]], phase_policy: str
            ) -> tuple[str, Proposal] | None:
    """The first safety rollback (:data:`SAFETY`) another policy than the phase's asks for."""
    return next(((n, p) for n, p in proposals if p.rollback in SAFETY and p.to_step is None
                 and n != phase_policy), None)

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
