"""One job's state: what the controller knows of a training run, in one object.

:class:`JobState` folds reports into running signals (EMAs, variances, z-scores,
the loss slope), remembers the knobs in force, the commands sent and acknowledged,
and the governor's per-knob memory. Policies never see it: they read the frozen
:class:`JobView` it hands out.

>>> from trimtab.protocol import wire
>>> facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
...                         dtype="float32", device="cpu")
>>> reg = wire.Register(job="demo", run_id="r1", report_every=10, facts=facts,
...                     knobs=wire.Knobs(lr=1e-3))
>>> st = JobState.register(reg)
>>> st.observe(wire.Report(job="demo", seq=1, step=10, window=10, loss_mean=2.0,
...                        knobs=wire.Knobs(lr=5e-4), base=wire.Knobs(lr=1e-3),
...                        scale=wire.Scale(lr=0.5)))
>>> st.view().signals.loss_ema
2.0

The knob model: for ``lr`` and ``weight_decay`` the controller steers trimtab's
*multiplier* on the user's own value (1.0: the user's schedule untouched), for
``momentum`` and ``clip`` the value itself. :attr:`JobState.knobs` holds these controlled
values; :attr:`JobState.effective` the values the optimizer used, as reported.

>>> st.knobs.lr, st.effective.lr, st.base.lr
(0.5, 0.0005, 0.001)
"""

from __future__ import annotations

import copy
import dataclasses
from collections import deque
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from trimtab.controller.governor import KnobMemory
from trimtab.controller.persist import Persisted
from trimtab.controller.rollback import RollbackState
from trimtab.controller.tracker import SignalConfig, SignalTracker
from trimtab.controller.view import JobView, Phase, Sample, Signals
from trimtab.protocol import wire

if TYPE_CHECKING:

    from trimtab.controller.health import Unhealthy
    from trimtab.controller.rollback import Observation, RollbackConfig

__all__ = ["JobState", "controls_of", "command_controls", "base_of", "resumed_at"]



def controls_of(knobs: wire.Knobs, scale: wire.Scale) -> wire.Knobs:
    """The controlled values of a report, ack or registration: the lr and weight-decay
    multipliers (where the optimizer has the setting), the momentum and clip in force.

    >>> controls_of(wire.Knobs(lr=0.05, momentum=0.9), wire.Scale(lr=0.5))
    Knobs(lr=0.5, momentum=0.9, weight_decay=None, clip=None)
    """
    return wire.Knobs(
        lr=None if knobs.lr is None else scale.lr, momentum=knobs.momentum,
        weight_decay=None if knobs.weight_decay is None else scale.weight_decay,
        clip=knobs.clip,
    )


def command_controls(command: wire.Command) -> wire.Knobs:
    """The controlled values a command sets (``None``: unchanged)."""
    return wire.Knobs(lr=command.scale.lr, momentum=command.knobs.momentum,
                      weight_decay=command.scale.weight_decay, clip=command.knobs.clip)


def base_of(msg: wire.Register | wire.Report | wire.Ack) -> wire.Knobs:
    """The user's own values a message carries (its effective ones where it has none)."""
    return msg.base if msg.base.lr is not None else msg.knobs


def resumed_at(msg: wire.Register) -> int:
    """The step a resume registration resumes the run at: its ``resume_step`` (never past
    the step it registers at), else that step."""
    return msg.step if msg.resume_step is None else min(msg.resume_step, msg.step)


def _step_of(x: Sample | tuple[int, float]) -> int:
    return x.step if isinstance(x, Sample) else x[0]


#: Changes remembered per knob (:attr:`JobState.change_steps`).
_CHANGES_KEPT = 16


class JobState(Persisted):
    """Everything the controller keeps for one job; see the module docstring for use."""

    def __init__(
        self,
        job: str,
        run_id: str,
        facts: wire.ScaleFacts,
        report_every: int,
        knobs: wire.Knobs,
        signal_cfg: SignalConfig | None = None,
        step: int = 0,
        applied_seq: int = 0,
        effective: wire.Knobs | None = None,
        base: wire.Knobs | None = None,
    ) -> None:
        self.job, self.run_id, self.facts = job, run_id, facts
        self.report_every = report_every
        self.signal_cfg = signal_cfg or SignalConfig()
        #: The controlled values with nothing changed (multipliers 1.0).
        self.initial = knobs.model_copy(update={
            "lr": None if knobs.lr is None else 1.0,
            "weight_decay": None if knobs.weight_decay is None else 1.0})
        #: The controlled values in force (see the module docstring).
        self.knobs = knobs
        #: The values the optimizer used and the user's own, as last reported or acked.
        self.effective = effective if effective is not None else knobs
        self.base = base if base is not None else self.effective
        #: The user's own values at registration (what absolute settings relate to).
        self.registered = self.base
        self.step = step
        #: The client's link its current registration came on: reports made under an
        #: earlier one predate it (a restarted or late controller), never evidence.
        self.link = 0
        self.reports_seen = 0
        #: The running signals (EW moments, z-scores, the loss slope) and their marks.
        self.tracker = SignalTracker(self.signal_cfg)
        self.history: deque[Sample] = deque(maxlen=self.signal_cfg.history)
        self.validations: deque[tuple[int, float]] = deque(maxlen=self.signal_cfg.history)
        #: The weight average's validation results (``Report.validation_ema``), likewise.
        self.validations_ema: deque[tuple[int, float]] = deque(maxlen=self.signal_cfg.history)
        #: The stop advice sent to the run (it is sent once per job); None: none yet.
        self.stop_advice: str | None = None
        #: The judgement of the latest report (:func:`~trimtab.controller.health.assess`),
        #: set by :func:`~trimtab.controller.advance.advance` after each report is folded in.
        self.health: Unhealthy | None = None
        self.nonfinite_losses = 0
        self.nonfinite_grads = 0
        #: Reports judged unhealthy for non-finite values (persistent ones; a burst of bad
        #: batches the client's skip absorbed is not: see controller.health).
        self.nonfinite_faults = 0
        self.dropped_reports = 0
        self.last_report: wire.Report | None = None
        self.memory: dict[str, KnobMemory] = {k: KnobMemory() for k in wire.KNOBS}
        self.last_change_step: dict[str, int | None] = {k: None for k in wire.KNOBS}
        #: Each knob's latest changes as ``[decided at, in force from, command seq]`` (at
        #: most :data:`_CHANGES_KEPT`, oldest first, whichever branch a rollback left; lists
        #: replaced whole, never changed in place): where a resume finds the last change on
        #: the path it resumes (:meth:`rewind_controls`).
        self.change_steps: dict[str, list[list[int]]] = {k: [] for k in wire.KNOBS}
        # Sequence numbers continue past what the client has applied, even without a journal.
        self.command_seq = applied_seq
        self.applied_seq = applied_seq
        self.last_command: wire.Command | None = None
        self.awaiting_ack = False
        #: The seq of the last command whose rollback the client applied: a report with an
        #: older ``applied_seq`` was sent before the restore and describes the abandoned path.
        self.branch_seq = 0
        self.disabled_policies: dict[str, str] = {}
        #: Commanded changes by (policy, knob, "up"/"down").
        self.decision_counts: dict[tuple[str, str, str], int] = {}
        #: Checkpoints, stable marks, rollbacks and alert.
        self.rollback = RollbackState(step=step)
        #: The governor memory of shadow policies' would-be changes (never the live one's).
        self.shadow_memory: dict[str, KnobMemory] = {k: KnobMemory() for k in wire.KNOBS}
        #: Shadow policies' would-be changes by (policy, knob, "up"/"down").
        self.shadow_counts: dict[tuple[str, str, str], int] = {}
        #: Shadow policies whose measurement phase live would have opened, and the step:
        #: asked nothing more in shadow (a sweep cannot run there; see ``Engine``).
        self.shadow_phases: dict[str, int] = {}
        #: Per scheduled knob, the product of the corrections made on top of its schedule
        #: (other policies' factors, rollback cuts); absent: 1.
        self.corrections: dict[str, float] = {}
        #: The live schedules last sent to the client, by knob.
        self.live: dict[str, wire.LiveSchedule] = {}
        #: The measurement phase open now, the ones that ended (by policy), and the LR
        #: the last one found.
        self.phase: Phase | None = None
        self.phases_done: dict[str, Phase] = {}
        #: A phase the latest registration ended (the client dropped its sweep while it
        #: heard no controller); the handler journals it and clears this. Not saved.
        self.dropped_phase: Phase | None = None
        self.found_lr: float | None = None
        #: ``reports_seen`` when the pending command was last sent (None: not this process's
        #: sending): it is sent again after ``resend_after_reports`` without being applied.
        self.pending_since: int | None = None
        #: Resumes of this run from a saved guard state that the controller has followed
        #: (:meth:`on_resumed`); a registration counting more is a new resume.
        self.resumes = 0
        #: The resume id of the process that resumed the run last (:attr:`wire.Register.
        #: resume_id`; None: none told): a registration with another one is a new resume.
        self.resume_id: str | None = None
        #: A person paused the policies (``trimtab pause``): who, why, at which step; None:
        #: not paused. See :mod:`~trimtab.controller.manual`.
        self.paused: dict[str, Any] | None = None
        #: What people did to this job, by action (set, pause, resume, rollback).
        self.operator_actions: dict[str, int] = {}
        #: How many newest checkpoints the client keeps besides the newest stable one, as
        #: it registered (None: not told).
        self.checkpoint_keep: int | None = None
        #: The lr the client's own scheduler scales, as it registered (None: not told).
        self.nominal_lr: float | None = None
        #: Whether the loss is expected to fall as the run learns (the client's
        #: ``attach(loss_trend=)``, as it registered).
        self.loss_trend = True
        #: Whether the client's optimizer held state when it attached (as it registered).
        self.warm_start = False
        #: The highest group lr over group 0's, as it registered (1: group 0's is highest).
        self.lr_spread = 1.0

    # -- what a decision changes --------------------------------------------------------

    #: The parts of the state a decision changes (:meth:`fork`, :meth:`adopt`): the governor
    #: memories and change records, the phases, the corrections and live schedules, the
    #: disabled policies and the rollback bookkeeping. Everything else is the reports' and
    #: the acks', and a decision only reads it.
    DECIDED = ("memory", "shadow_memory", "last_change_step", "change_steps", "decision_counts",
               "shadow_counts", "shadow_phases", "phase", "phases_done", "found_lr",
               "disabled_policies", "corrections", "live", "rollback")

    def fork(self) -> JobState:
        """A draft for a decision to work on: a copy whose :data:`DECIDED` parts are its own
        (new containers; their items are never changed in place), sharing the rest, which a
        decision only reads. The job's state is untouched until :meth:`adopt`."""
        draft = copy.copy(self)
        for name in self.DECIDED:
            value = getattr(self, name)
            if isinstance(value, RollbackState):
                value = value.copy()
            elif isinstance(value, dict):  # the governor memories are copied too
                value = {k: v.copy() if isinstance(v, KnobMemory) else v
                         for k, v in value.items()}
            setattr(draft, name, value)  # the phase and found_lr: immutable, shared
        return draft

    def adopt(self, draft: JobState) -> None:
        """Take the :data:`DECIDED` parts of a draft a decision was made on (:meth:`fork`)."""
        for name in self.DECIDED:
            setattr(self, name, getattr(draft, name))

    @classmethod
    def from_register(
        cls, msg: wire.Register, signal_cfg: SignalConfig | None = None
    ) -> JobState:
        """A fresh state for a job that just registered."""
        state = cls(
            msg.job, msg.run_id, msg.facts, msg.report_every, controls_of(msg.knobs, msg.scale),
            signal_cfg=signal_cfg, step=msg.step, applied_seq=msg.applied_seq,
            effective=msg.knobs, base=base_of(msg),
        )
        # The guard snapshots at attach: that checkpoint holds what is in force now, and no
        # signal yet.
        state.rollback.note_in_force(msg.step, {"knobs": state.knobs.model_dump(),
                                                "grad_norm_ema": None})
        state.rollback.note_origin(msg.step, msg.origin)
        state.tracker.mark(msg.step)
        state._note_client(msg)
        return state

    #: The same as :meth:`from_register`.
    register = from_register

    def _note_client(self, msg: wire.Register) -> None:
        """What each registration tells of the client as it is now: its link, its ring's
        size, the lr its scheduler scales."""
        self.link = msg.link
        self.checkpoint_keep = msg.keep
        self.nominal_lr = msg.nominal_lr
        self.loss_trend = msg.loss_trend is not False
        self.warm_start = msg.warm_start is True
        self.lr_spread = msg.lr_spread or 1.0

    def on_register(self, msg: wire.Register) -> Observation | None:
        """This run registered (maybe again, after a reconnect; or resumed, :meth:`on_resumed`):
        take its facts and the checkpoints it lists, keep signals. Returns what the listing
        told (:meth:`RollbackState.note_registered`; None: nothing to take, a run that
        starts afresh, which its first report lists)."""
        if (msg.job, msg.run_id) != (self.job, self.run_id):
            raise ValueError(
                f"register for {msg.job}/{msg.run_id} does not match the state of "
                f"{self.job}/{self.run_id}"
            )
        resumed = self.is_new_resume(msg)
        if resumed:
            self.on_resumed(msg)
        self.facts, self.report_every = msg.facts, msg.report_every
        self.knobs, self.effective = controls_of(msg.knobs, msg.scale), msg.knobs
        self.base = base_of(msg)
        # Reports carry the authoritative step; a bare re-register (step 0) must not undo it.
        self.step = max(self.step, msg.step)
        self._note_client(msg)
        self._applied(msg.applied_seq)
        self.command_seq = max(self.command_seq, msg.applied_seq)
        if msg.schedules is not None and self.pending_command is None:
            # What the client runs (none sent is on its way): the controller's record
            # follows it, e.g. after a resume from a save made under older schedules.
            dropped = set(self.live) - {s.knob for s in msg.schedules}
            self.live = {s.knob: s for s in msg.schedules}
            if dropped and self.phase is not None and not resumed:
                # The client dropped the phase's sweep: it heard no controller while the
                # sweep rose, and went back to the lr before it. The phase ends where the
                # run is, having found nothing (the run trained on since; a fault the sweep
                # caused is the safety net's, as any other).
                phase = self.end_phase(None, in_place=True)
                self.dropped_phase = phase
        # The listing is taken where the controller knows none of the run's checkpoints: a
        # resume (the new process's), or a run it takes over (it started or restarted without
        # its journal). A run starting afresh lists them with its first report; one the
        # controller already follows (a reconnect, a restart with the journal) keeps the state
        # it had, exactly, until its next report.
        fresh = self.reports_seen == 0 and msg.step == 0 and msg.stable_step is None
        if not msg.checkpoints or fresh or (self.rollback.checkpoints and not resumed):
            return None
        seen = {"knobs": self.knobs.model_dump(),
                "grad_norm_ema": self.tracker.signals().grad_norm_ema}
        return self.rollback.note_registered(msg.step, msg.checkpoints, msg.stable_step, seen)

    def is_new_resume(self, msg: wire.Register) -> bool:
        """Whether ``msg`` registers a resume of this run that the controller has not
        followed yet: more resumes than it has seen, or the same count from another process
        (two processes resumed from one save; told apart by their ``resume_id``). A
        reconnect of the process it follows is none."""
        if msg.resume > self.resumes:
            return True
        return (msg.resume > 0 and msg.resume_id is not None
                and msg.resume_id != self.resume_id)

    def on_resumed(self, msg: wire.Register) -> None:
        """This run was resumed in a new process from the user's checkpoint at
        ``msg.resume_step`` (``guard.load_state_dict``), maybe an older one than the
        controller last saw: what it saw after that step is set aside as it is after a
        rollback (the signals, reports and validation results; the knob changes, which now
        never happened), the reports' sequence starts again, the commands the process applied
        after its save are not in force (the registration tells what is) and none pending is
        sent again, the checkpoints, stable marks and a rollback under way are those of
        the new process (:meth:`RollbackState.note_resumed`), and a measurement phase that
        began after that step starts over at it (or, its checkpoint past it, never was).
        Sequence numbers keep growing: a new command is never mistaken for one the process
        already applied.
        """
        step = resumed_at(msg)
        self.resumes = max(self.resumes, msg.resume)
        self.resume_id = msg.resume_id
        self._go_back(step)
        self.rewind_controls(step, applied_seq=msg.applied_seq)
        self.last_report = None  # the resumed process numbers its reports from its save
        self.health = None
        self.applied_seq = msg.applied_seq
        self.branch_seq = min(self.branch_seq, msg.applied_seq)
        self.pending_command = None
        self.pending_since = None
        self.rollback.note_resumed(step, msg.origin, msg.applied_seq)
        # A save made in a healthy stretch: this controller saw the run up to it, and no
        # report of the last two before it was unhealthy. A spike soon after the resume came
        # after the save (a bad batch the loop replays), and goes back there.
        # (The history kept is up to the resumed step: _go_back set aside the rest.)
        unhealthy = self.rollback.last_unhealthy_step
        self.rollback.clean_resume = (
            step if self.history and (unhealthy is None
                                      or unhealthy <= step - 2 * self.report_every)
            else None)
        if self.phase is not None and self.phase.start_step > step:
            # A phase that began after the resumed step began on the path set aside: the
            # resumed process holds no sweep. With its checkpoint still behind the run, it
            # starts over at the resumed step (its policy sends the sweep from there);
            # without, it never happened. One under way at that step goes on: the resumed
            # state holds its sweep.
            self.phase = (dataclasses.replace(self.phase, start_step=step)
                          if self.phase.checkpoint <= step else None)

    # -- reports, commands, acks ------------------------------------------------

    def is_stale(self, report: wire.Report) -> bool:
        """Whether ``report`` was made after the client had heard no controller for a whole
        liveness window (the client says so: a controller started late, or restarted), or
        under an earlier link than the registration's (before the client reconnected):
        sent later, it describes a past no controller saw live, and is never evidence for
        a decision. (Not a report's step against the registration's: the client builds its
        registration when its link is ready, after reports it made in the meantime.)"""
        return report.offline or report.link < self.link

    def observe(self, report: wire.Report) -> None:
        """Fold one report into the signals (its health is judged after, by
        :func:`~trimtab.controller.advance.advance`)."""
        if report.job != self.job:
            raise ValueError(f"report for job {report.job!r} given to the state of {self.job!r}")
        self.health = None
        self.step = report.step
        self.reports_seen += 1
        self.nonfinite_losses += report.nonfinite_losses
        self.nonfinite_grads += report.nonfinite_grads
        self.dropped_reports = report.dropped_reports
        if report.applied_seq >= self.applied_seq:
            # Its values are those in force. A report made before a command it does not
            # count (an ack that overtook it: acks go before queued reports) holds the
            # values that command replaced; the ack's stand.
            self.knobs = controls_of(report.knobs, report.scale)
            self.effective, self.base = report.knobs, base_of(report)
        self._applied(report.applied_seq)
        self.tracker.fold(report.step, report.loss_mean, report.grad_norm_mean)
        self.history.append(Sample.of(report))
        if report.validation is not None:
            vstep = report.step if report.validation_step is None else report.validation_step
            self.note_validation(vstep, report.validation, report.validation_ema)
        self.last_report = report

    def grad_norm_scale(self) -> float | None:
        """The job's gradient-norm EMA once its z-score warm-up has passed (None before):
        what scale-relative limits (the clip's) are measured against."""
        return self.tracker.grad_norm_scale()

    def _applied(self, seq: int) -> None:
        if seq > self.applied_seq:
            self.applied_seq = seq
        if self.last_command is not None and self.applied_seq >= self.last_command.seq:
            self.awaiting_ack = False

    def next_command_seq(self) -> int:
        """A new command sequence number (strictly increasing for this job)."""
        self.command_seq += 1
        return self.command_seq

    @property
    def pending_command(self) -> wire.Command | None:
        """The last command sent and not yet applied, if any."""
        return self.last_command if self.awaiting_ack else None

    @pending_command.setter
    def pending_command(self, command: wire.Command | None) -> None:
        """Record a command as sent (awaiting its ack), or forget the pending one."""
        if command is not None:
            if command.job != self.job:
                raise ValueError(f"command for {command.job!r} set on the state of {self.job!r}")
            self.command_seq = max(self.command_seq, command.seq)
            self.last_command = command
        self.awaiting_ack = command is not None

    @property
    def pending(self) -> wire.Knobs | None:
        """The controlled values the pending command sets (None where it leaves a knob)."""
        cmd = self.pending_command
        return command_controls(cmd) if cmd is not None else None

    def current(self, knob: str) -> float | None:
        """The value ``knob`` will have at the next step: pending command first, else in force."""
        pending = self.pending
        if pending is not None and getattr(pending, knob) is not None:
            return getattr(pending, knob)
        return getattr(self.knobs, knob)

    def note_validation(self, step: int, value: float, ema: float | None = None) -> None:
        """A validation result measured at ``step`` (a report's, or one sent as the run
        ended: :class:`wire.Validation`), and its weight average's."""
        self.validations.append((step, value))
        if ema is not None:
            self.validations_ema.append((step, ema))

    def on_ack(self, ack: wire.Ack) -> bool:
        """Take the knobs now in force from an ack; False (ignored) if it is older than one seen."""
        if ack.job != self.job:
            raise ValueError(f"ack for job {ack.job!r} given to the state of {self.job!r}")
        if ack.seq < self.applied_seq:
            return False
        self.on_applied(ack.seq, controls_of(ack.knobs, ack.scale), ack.knobs, base_of(ack))
        return True

    def on_applied(
        self, applied_seq: int, knobs: wire.Knobs, effective: wire.Knobs | None = None,
        base: wire.Knobs | None = None,
    ) -> None:
        """The client says commands up to ``applied_seq`` are applied and the controlled
        values ``knobs`` are in force (``effective`` used, the user's ``base``)."""
        self.knobs = knobs
        if effective is not None:
            self.effective = effective
        if base is not None:
            self.base = base
        self._applied(applied_seq)

    def on_restored(self, step: int, cfg: RollbackConfig, from_step: int | None = None) -> int:
        """The client rolled back to the checkpoint at ``step`` (from ``from_step``, where it
        says it stood); returns the steps lost.

        The signals go back with the run: the EW moments, the z-score baselines and the
        loss slope window are those of the report that ended at the checkpoint's step (the
        newest one at or before it; afresh when none is kept), so that no decision after a
        rollback is made on statistics of the path rolled back from -- a spike's 1e5 loss
        in the loss EMA, or a measurement phase's sweep over decades of LR.
        """
        self._go_back(step)
        return self.rollback.note_restored(step, cfg, from_step)

    def _go_back(self, step: int) -> None:
        """The run is at ``step`` again (a restore, a resume): the signals are those of the
        report that ended at it, and the reports and validation results (raw and averaged)
        after it describe a path it left."""
        self.step = step
        self.tracker.rewind(step)
        for kept in (self.history, self.validations, self.validations_ema):
            survivors = [x for x in kept if _step_of(x) <= step]
            kept.clear()
            kept.extend(survivors)

    # -- what the engine records --------------------------------------------------

    def note_change(
        self, knob: str, policy: str, previous: float | None, value: float, window_steps: int,
        step: int | None = None, ran: float | None = None,
    ) -> None:
        """Record that ``value`` will be commanded for ``knob`` at ``step`` (default: now),
        replacing ``previous`` there; ``ran``: the value the run was using when this was
        decided, where a rollback's restore puts ``previous`` back first (the change's
        direction is counted from it)."""
        step = self.step if step is None else step
        self.memory[knob].record(step, previous, value, window_steps, self.memory_from)
        self.last_change_step[knob] = step
        # The command that carries it is the next one made (see next_command_seq).
        self.change_steps[knob] = [*self.change_steps.get(knob, []),
                                   [self.step, step, self.command_seq + 1]][-_CHANGES_KEPT:]
        previous = previous if ran is None else ran
        direction = "up" if previous is None or value > previous else "down"
        key = (policy, knob, direction)
        self.decision_counts[key] = self.decision_counts.get(key, 0) + 1

    @property
    def memory_from(self) -> int | None:
        """The oldest step the governor's memory must reach back to: the oldest checkpoint
        the client lists (a rollback may go there; None: none listed)."""
        return min(self.rollback.checkpoints, default=None)

    def rewind_controls(self, step: int, applied_seq: int | None = None) -> None:
        """Forget knob changes after ``step``. A rollback to it is being ordered: a knob
        changed after it counts as changed at it, since the restore changes it back. The
        run was resumed at it in a new process (``applied_seq``: the last command the save
        had applied): its last change is the newest of those the save had applied in force
        by ``step``; the others never happened on the path it resumes (a preemption trial:
        the old process's climb rollback, decided after the save and cutting the lr from its
        earlier target, counted as a change inside the replayed climb's window; no climb
        was judged for a full window, and the run ended ruined). Newer than the true last
        change at worst (a change a later rollback undid): a window judged later, never one
        across a change."""
        for knob, mem in self.memory.items():
            mem.rewind(step)
            last = self.last_change_step[knob]
            if applied_seq is not None:
                changes = self.change_steps.get(knob, [])
                kept = [c for c in changes if c[2] <= applied_seq and c[1] <= step]
                self.change_steps[knob] = kept
                if len(kept) < len(changes):
                    # Older changes than those listed may have been dropped: then, at the step.
                    known = bool(kept) or len(changes) < _CHANGES_KEPT
                    self.last_change_step[knob] = (max(c[1] for c in kept) if kept
                                                   else None if known else step)
                    continue
            if last is not None and last > step:
                self.last_change_step[knob] = step

    def note_shadow(
        self, knob: str, policy: str, previous: float | None, value: float, window_steps: int,
    ) -> None:
        """Record that a shadow policy would have commanded ``value`` for ``knob`` now."""
        self.shadow_memory[knob].record(self.step, previous, value, window_steps)
        direction = "up" if previous is None or value > previous else "down"
        key = (policy, knob, direction)
        self.shadow_counts[key] = self.shadow_counts.get(key, 0) + 1

    def begin_phase(self, policy: str, checkpoint: int, start: int | None = None,
                    sweep_from: float | None = None,
                    opened: dict[str, Any] | None = None) -> Phase:
        """``policy`` opens its measurement phase now, returning to ``checkpoint`` at its end;
        it starts at ``start`` (default: the current step; an earlier checkpoint's step when
        the phase starts over from it); ``sweep_from``: the value its opening proposal asked,
        ``opened``: that proposal's detail."""
        if self.phase is not None or policy in self.phases_done:
            raise ValueError(f"policy {policy!r} cannot open a phase: "
                             f"{'one is open' if self.phase else 'it had its phase'}")
        self.phase = Phase(policy, self.step if start is None else start, checkpoint,
                           restarted=start is not None and start < self.step,
                           sweep_from=sweep_from, opened=opened)
        return self.phase

    def end_phase(self, found_lr: float | None, back_to: int | None = None, *,
                  in_place: bool = False, lr: float | None = None) -> Phase | None:
        """The open phase ends now, having found ``found_lr`` (None: nothing), returning
        to the checkpoint at ``back_to`` (None: the one it opened with), or, ``in_place``,
        where the run is; ``lr``: the lr multiplier set with its end."""
        if self.phase is None:
            return None
        done = dataclasses.replace(self.phase, end_step=self.step, found_lr=found_lr,
                                   in_place=in_place, end_lr=lr)
        if back_to is not None:
            done = dataclasses.replace(done, checkpoint=back_to)
        self.phases_done[done.policy] = done
        self.phase = None
        if found_lr is not None:
            self.found_lr = found_lr
        return done

    def disable(self, policy: str, reason: str) -> None:
        """Stop asking ``policy`` for this job."""
        self.disabled_policies[policy] = reason

    # -- what policies read -------------------------------------------------------

    def signals(self) -> Signals:
        """The signals now, as :meth:`view` hands them to policies."""
        return self.tracker.signals()

    def view(self) -> JobView:
        """A frozen snapshot for policies."""
        signals = self.signals()
        return JobView(
            job=self.job, run_id=self.run_id, step=self.step, report_every=self.report_every,
            facts=self.facts, initial=self.initial, knobs=self.knobs, pending=self.pending,
            reports_seen=self.reports_seen, signals=signals, last=self.last_report,
            nonfinite_losses_total=self.nonfinite_losses,
            nonfinite_grads_total=self.nonfinite_grads,
            nonfinite_faults=self.nonfinite_faults,
            last_change_step=MappingProxyType(dict(self.last_change_step)),
            history=tuple(self.history), validations=tuple(self.validations),
            validations_ema=tuple(self.validations_ema),
            phase=self.phase, phases_done=tuple(self.phases_done.values()),
            found_lr=self.found_lr, effective=self.effective, base=self.base,
            registered=self.registered, health=self.health,
            checkpoint_keep=self.checkpoint_keep, nominal_lr=self.nominal_lr,
            loss_trend=self.loss_trend, warm_start=self.warm_start, lr_spread=self.lr_spread,
            climb_moved=self.rollback.climb_moved,
            climb_checking=self.rollback.climb_check is not None,
        )
