"""One report through the controller: fold it in, judge it, decide. The only such loop.

The live service (:mod:`~trimtab.controller.handler`), offline replay
(:mod:`~trimtab.controller.replay`) and the tests all take a report the same way, here:

1. :meth:`JobState.observe <trimtab.controller.state.JobState.observe>` folds it into the
   job's signals;
2. :func:`~trimtab.controller.health.assess` judges it, once, under ``[rollback.health]``:
   the verdict is the job's :attr:`~trimtab.controller.view.JobView.health`, read by the
   rollback manager and by the ``divergence_guard`` policy alike;
3. the rollback manager takes the checkpoints it lists
   (:meth:`RollbackState.observe <trimtab.controller.rollback.RollbackState.observe>`);
4. the engine decides, changing nothing (:meth:`Engine.decide
   <trimtab.controller.engine.Engine.decide>` works on a draft of the state): everything
   when no command awaits its ack, only an urgent rollback while an ordinary command does
   (ordinary changes are governed against the values in force, so they wait for the ack),
   nothing while a rollback command does;
5. :func:`commit` makes the decision the job's: its draft is adopted and the command it
   sends is built and becomes the job's pending command.

What the caller does with the command (journal it and send it, or assume it applied) is
the caller's: the service sends and journals, replay assumes the command applied.

>>> from trimtab.protocol import wire
>>> from trimtab.controller.engine import Engine
>>> from trimtab.controller.state import JobState
>>> from trimtab.policies.divergence_guard import DivergenceGuard
>>> facts = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
...                         dtype="float32", device="cpu")
>>> st = JobState.register(wire.Register(job="j", run_id="r", report_every=10, facts=facts,
...                                      knobs=wire.Knobs(lr=0.1)))
>>> engine = Engine([DivergenceGuard()])
>>> out = advance(st, wire.Report(job="j", seq=1, step=10, window=10, loss_mean=float(2),
...                               nonfinite_losses=10, knobs=wire.Knobs(lr=0.1)), engine)
>>> out.health.cause, st.view().health.cause
('nonfinite', 'nonfinite')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trimtab.controller.health import DivergenceThresholds, Unhealthy, assess
from trimtab.controller.limits import MULTIPLIERS
from trimtab.protocol import wire

if TYPE_CHECKING:
    from trimtab.controller.engine import Decision, Engine
    from trimtab.controller.rollback import Observation, RollbackConfig, RollbackRecord
    from trimtab.controller.state import JobState

__all__ = ["Taken", "Advanced", "Settled", "take", "advance", "commit", "settle",
           "settle_ack", "settle_from_report"]


@dataclass(frozen=True)
class Taken:
    """What folding one report in did: its health and what the rollback manager saw."""

    health: Unhealthy | None
    observation: Observation


@dataclass(frozen=True)
class Advanced(Taken):
    """...and the decision (None: none to record: a rollback command awaits its ack, or an
    ordinary one does and no rollback was needed), the command it sends (None: nothing to
    send) and the pending command that command replaces (an urgent rollback's)."""

    decision: Decision | None = None
    command: wire.Command | None = None
    superseded: wire.Command | None = None


def take(state: JobState, report: wire.Report, thresholds: DivergenceThresholds) -> Taken:
    """Steps 1-3 of the module docstring: fold ``report`` into ``state``, judge it under
    ``thresholds`` and let the rollback manager see it; no decision."""
    state.observe(report)
    view = state.view()
    verdict = assess(view, thresholds)
    state.health = verdict
    if verdict is not None and verdict.cause == "nonfinite":  # the most urgent cause
        state.nonfinite_faults += 1
    seen = state.rollback.observe(view, verdict,
                                  judged=view.reports_seen > thresholds.warmup_reports)
    if seen.data_moved is not None:
        state.tracker.restart_loss()  # the loss's history is of the data before the move
    return Taken(verdict, seen)


def advance(state: JobState, report: wire.Report, engine: Engine) -> Advanced:
    """Take ``report`` into ``state``, decide under ``engine`` and commit the decision (see
    the module docstring). ``engine.rollback.health`` holds the health thresholds."""
    taken = take(state, report, engine.rollback.health)
    pending = state.pending_command
    if pending is not None and pending.rollback_to is not None:
        return Advanced(taken.health, taken.observation)
    decision = engine.decide(state) if pending is None else engine.decide_urgent(state)
    if decision is None:  # a shadow engine, with a command pending
        return Advanced(taken.health, taken.observation)
    command = commit(state, decision, engine.governor.limits("lr").max)
    if pending is not None and decision.rollback is None and not decision.errors:
        decision = None  # nothing urgent: the pending command stands, nothing to record
    return Advanced(taken.health, taken.observation, decision, command, pending)


def commit(state: JobState, decision: Decision,
           lr_max: float | None = None) -> wire.Command | None:
    """The one place a decision changes the job: its draft becomes the job's state, and the
    command it sends, if any, is built and becomes the job's pending command (it replaces
    one still pending: the client keeps only the newest). Stop advice is sent once per job.
    ``lr_max`` is the governor's lr ceiling the command carries (the client clamps the lr
    it computes to it). Returns the command to send (None: the decision sends nothing)."""
    superseded = state.pending_command
    if decision.draft is not None:
        state.adopt(decision.draft)
    targets = decision.commands
    plan = None if decision.shadow else decision.rollback
    mark = decision.mark_stable
    advice = None
    if decision.stop_advice is not None and not decision.shadow and state.stop_advice is None:
        advice = state.stop_advice = decision.stop_advice
    if (not targets and plan is None and mark is None and advice is None
            and decision.schedules is None):
        return None
    schedules = decision.schedules
    if schedules is None and (plan is not None or (
            superseded is not None and superseded.schedules is not None)):
        # What the client follows after this command must be what the controller records
        # as live: a command it replaces may have been the one that changed them (stopped a
        # sweep, say), and a restore does not touch the schedules the client runs. So a
        # rollback, and any command replacing one that set schedules, says them.
        schedules = tuple(state.live[k] for k in wire.KNOBS if k in state.live)
    if advice is None and superseded is not None and superseded.stop_advice is not None:
        advice = superseded.stop_advice  # sent once per job: it must not be lost with it
    reasons = decision.reasons()
    if advice is not None:
        reasons.append(f"stop advised: {advice}"[:1024])
    if mark is not None:
        why = decision.mark_reason or "no reason given"
        reasons.append(f"checkpoint at step {mark} marked stable: {why}"[:1024])
    scale = {k: v for k, v in targets.items() if k in MULTIPLIERS}
    absolute = {k: v for k, v in targets.items() if k not in scale}
    command = wire.Command(
        job=state.job, seq=state.next_command_seq(), knobs=wire.Knobs(**absolute),
        scale=wire.ScaleTargets(**scale), lr_max=lr_max,
        reasons=reasons[:64], mark_stable=mark,
        rollback_to=plan.target_step if plan is not None else None, stop_advice=advice,
        schedules=None if schedules is None else list(schedules))
    state.pending_command = command
    state.pending_since = state.reports_seen
    return command


# -- what the client says it applied ----------------------------------------------------


@dataclass(frozen=True)
class Settled:
    """What settling an applied command recorded: the stable mark done (``marked``) or
    refused (``mark_failed``), and its rollback restored (``restored``, with the steps
    lost) or failed (``failed``, why); ``rollback`` is the rollback either way."""

    command: wire.Command
    inferred: bool = False
    marked: int | None = None
    mark_failed: int | None = None
    rollback: RollbackRecord | None = None
    restored: int | None = None
    steps_lost: int = 0
    failed: str | None = None


def settle(state: JobState, command: wire.Command, cfg: RollbackConfig, *,
           restored: int | None, marked: bool, why: str, inferred: bool = False,
           rolled_back_from: int | None = None) -> Settled:
    """The client applied ``command``: record its mark and rollback as done or failed (in
    the client's order: the mark first, so a rollback to the checkpoint the same command
    marks finds it stable). ``restored`` is the step the client restored (None: it did not,
    for ``why``; ``rolled_back_from``: the step it stood at then, as its ack says)."""
    rb = state.rollback
    out = Settled(command, inferred)
    if command.mark_stable is not None and rb.pending_mark == command.mark_stable:
        if marked:
            rb.note_marked(command.mark_stable)
            out = dataclasses.replace(out, marked=command.mark_stable)
        else:
            rb.mark_failed(command.mark_stable)
            out = dataclasses.replace(out, mark_failed=command.mark_stable)
    if command.rollback_to is not None and rb.pending is not None:
        rec = rb.pending
        if restored is not None:
            state.branch_seq = max(state.branch_seq, command.seq)
            lost = state.on_restored(restored, cfg, rolled_back_from)
            out = dataclasses.replace(out, rollback=rec, restored=restored, steps_lost=lost)
        else:
            rb.note_failed(why)
            out = dataclasses.replace(out, rollback=rec, failed=why)
    return out


def settle_ack(state: JobState, ack: wire.Ack, cfg: RollbackConfig) -> Settled | None:
    """Take an ack: the knobs now in force, and the command it acknowledges settled (None:
    an ack older than one seen, or of a command replaced since, settles nothing)."""
    last = state.last_command
    command = last if last is not None and last.seq == ack.seq else None
    fresh = state.on_ack(ack)
    if not fresh or command is None:
        return None
    if ack.error is None and command.rollback_to is None:
        _applied_at(state, [*command.knobs.set(), *command.scale.set()], ack.step)
    # The client says which part failed: a knob refused (an optimizer with no momentum, or
    # Rprop's lr) leaves the command's mark done.
    marked = ack.error is None or (f"mark_stable={command.mark_stable}:" not in ack.error
                                   and "client error" not in ack.error)
    return settle(state, command, cfg, restored=ack.restored_step, marked=marked,
                  why=ack.error or "the ack carries no restored_step",
                  rolled_back_from=ack.rolled_back_from)


def _applied_at(state: JobState, knobs: list[str], step: int) -> None:
    """The knobs a command changed took effect at ``step``: their cooldown and the samples
    since the change count from there, not from the report the command was decided on (a
    controller that fell behind, a slow policy, decided at 120 what the run applied at 252;
    counted from 120, the next change came 12 steps after it)."""
    for knob in knobs:
        mem = state.memory.get(knob)
        if mem is not None and mem.last_change_step is not None and step > mem.last_change_step:
            mem.last_change_step = step
        last = state.last_change_step.get(knob)
        if last is not None and step > last:
            state.last_change_step[knob] = step
            changes = state.change_steps.get(knob)
            if changes and changes[-1][1] == last:
                state.change_steps[knob] = [*changes[:-1], [changes[-1][0], step, changes[-1][2]]]


def settle_from_report(state: JobState, report: wire.Report,
                       cfg: RollbackConfig) -> Settled | None:
    """A report says the pending command is applied before its ack came (the ack was lost):
    settle its mark and rollback from what the report shows (None: nothing to settle)."""
    command = state.pending_command
    if command is None or report.applied_seq < command.seq:
        return None
    pending = state.rollback.pending
    restored = (command.rollback_to if pending is not None and report.step < pending.from_step
                else None)
    return settle(state, command, cfg, restored=restored,
                  marked=report.stable_step == command.mark_stable, inferred=True,
                  why=f"the report at step {report.step} shows no rollback")
