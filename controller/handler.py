"""The controller's message handling, with no sockets: frames in, replies out.

:class:`Controller` keeps the live job table, runs the engine on each report, journals
every hop and counts everything; :mod:`trimtab.controller.server` is the thin ZeroMQ
adapter around it. Tests drive it with raw frames.

>>> from prometheus_client import CollectorRegistry
>>> from trimtab.controller.config import ControllerConfig
>>> from trimtab.controller.journal import Journal
>>> ctl = Controller(ControllerConfig(), Journal(":memory:"), registry=CollectorRegistry())
>>> replies = ctl.handle(b"peer-1", b"not json")
>>> replies[0][1][:40]
b'{"type":"error","v":2,"code":"malformed"'
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from trimtab.controller.advance import (
    advance,
    commit,
    settle_ack,
    settle_from_report,
)
from trimtab.controller.budget import PolicyBudget
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.engine import Decision, Engine
from trimtab.controller.governor import Governor
from trimtab.controller.journal import Journal
from trimtab.controller.manual import Outcome, operate
from trimtab.controller.metrics import ControllerMetrics
from trimtab.controller.policy import Policy, ignored, load_policy
from trimtab.controller.recorder import Recorder
from trimtab.controller.scale import ScaleContext, derive_limits, explicit_fields
from trimtab.controller.state import JobState, resumed_at
from trimtab.protocol import wire

__all__ = ["Controller", "Reply"]

log = logging.getLogger("trimtab.controller")

#: Ended jobs whose series are kept for the metrics grace at most (the oldest go first).
_MAX_ENDED = 10_000
#: People waiting on one job's commands at most (``Operate.wait``; the oldest go first).
_MAX_WAITING = 16

#: (peer identity, frame) to send.
Reply = tuple[bytes, bytes]

#: The time :meth:`Controller.save_due` spends on one call at most (one save at least).
_SAVE_SLICE_S = 0.005


def _kept_now(state: JobState) -> tuple:
    """What a report changes only along with something a restarted controller must not
    lose (a command's sequence, what was applied, a settled rollback or mark, a policy
    disabled, stop advice, a measurement phase): a report that changes any of it saves the
    state at once."""
    rb = state.rollback
    return (state.command_seq, state.applied_seq, state.awaiting_ack, state.branch_seq,
            state.pending_since, len(state.disabled_policies), state.stop_advice, id(state.phase),
            rb.pending is None, rb.pending_mark, rb.stable[-1:], rb.alert,
            id(rb.history[-1]) if rb.history else None)


def _unheld(step: int, listed: list[int]) -> bool:
    """Whether a registration's listing ``listed`` shows the client no longer holds the
    checkpoint at ``step`` (a full listing, :data:`~trimtab.protocol.wire.MAX_LISTED` long,
    names only the newest: an older step may still be held)."""
    if not listed or step in listed:
        return False
    return len(listed) < wire.MAX_LISTED or step > min(listed)


def build_policies(config: ControllerConfig) -> list[tuple[PolicySpec, Policy]]:
    """The configured policies, in order; a bad or not allowed one stops the start with its
    name and cause. An installed entry point that another of its name wins over (a plugin
    named as a built-in) is logged, never loaded."""
    for lost, used in ignored():
        log.warning("policy entry point %s = %r is ignored: the name is %r's", lost.name,
                    lost.value, used.value)
    return [(spec, load_policy(spec.name, spec.config, allow=config.allow_plugins))
            for spec in config.policies]


@dataclass
class Unheard:
    """A job the journal has live (its controller stopped while it ran) that this controller
    has not heard from since it started."""

    #: When this controller began to wait for it: its lost timeout counts from there.
    since: float
    #: Its state as the journal has it (None: unreadable, written by an older controller),
    #: exported as live meanwhile, so that a job killed while no controller ran is seen
    #: going silent on /metrics too.
    state: JobState | None
    #: When it was last heard from (its last journaled event), on this controller's clock.
    heard: float


@dataclass
class LiveJob:
    """One live job: its state, and what the controller keeps beside it."""

    state: JobState
    #: The connection its commands go to, and when it was last heard from.
    peer: bytes
    last_seen: float
    #: When its last report came (or it registered): its training's progress, which
    #: heartbeats (sent by the client's thread whatever the loop does) never show.
    last_report: float | None = None
    #: Connections a later registration replaced: a late message from one of those never
    #: takes the job back.
    retired: collections.deque[bytes] = field(
        default_factory=lambda: collections.deque(maxlen=8))
    #: With CURVE keys: the key (z85 public key, the ZAP User-Id) the job is bound to.
    owner: str | None = None
    #: Connections whose registration of another run under this job's name was refused
    #: (``conflict``): nothing they send is taken as this job's.
    conflicting: collections.deque[bytes] = field(
        default_factory=lambda: collections.deque(maxlen=8))
    #: Its governor, with the limits derived from its scale facts (None: the shared one),
    #: and its engine (the shared engine it was copied from, the copy).
    governor: Governor | None = None
    engine: tuple[Engine, Engine] | None = None


class Controller:
    """Per-job state, engine, governor, journal and metrics behind one ``handle()`` call."""

    def __init__(
        self,
        config: ControllerConfig,
        journal: Journal,
        *,
        registry: CollectorRegistry,
        clock=time.monotonic,
    ) -> None:
        self.config = config
        self.journal = journal
        self.clock = clock
        self._policies = build_policies(config)
        self._governor = Governor(config.governor)
        #: One time budget for every policy call (None: inline), shared by all engines.
        self.budget = (PolicyBudget(config.policy_budget_ms / 1000.0)
                       if config.policy_budget_ms > 0 else None)
        self._engines: dict[tuple[int, ...], Engine] = {}
        #: The engine of a job no ``jobs``-restricted policy entry matches.
        self.engine = self.engine_for(None)
        #: The live jobs, by name: each one's state and connection, in one record.
        self._jobs: dict[str, LiveJob] = {}
        #: Jobs the journal has live that this controller has not heard from since it
        #: started: marked lost, as a silent live job is, if they stay silent
        #: ``job_timeout_s`` (a job that ended while no controller ran would otherwise be
        #: live in ``trimtab jobs`` for good).
        self._unheard: dict[str, Unheard] = {}
        for job, stored in journal.states(live_only=True).items():
            try:
                state: JobState | None = JobState.from_state_dict(stored)
            except (ValueError, KeyError, TypeError):  # written by an older controller
                state = None
            heard = journal.last_heard(job)  # on the journal's (wall) clock: in ours
            ago = 0.0 if heard is None else max(journal.clock() - heard, 0.0)
            self._unheard[job] = Unheard(clock(), state, clock() - ago)
        #: Jobs that ended (bye, lost) within ``metrics_grace_s``: their state and when they
        #: were last heard from; their series stay on /metrics until the grace ends.
        self._ended: dict[str, tuple[JobState, float, str]] = {}
        # The journal's next compaction (wall time: the journal's timestamps are), and the
        # rows the one under way has deleted so far.
        self._compact_at = journal.clock()
        self._compacted: dict[str, int] = {}
        #: Live jobs whose state reports changed since it was last saved, and since when
        #: (oldest first): :meth:`save_due` saves them ``state_save_s`` later.
        self._unsaved: dict[str, float] = {}
        self.metrics = ControllerMetrics(registry=registry,
                                         jobs=self._exported_jobs,
                                         age=self.silent_for,
                                         report_age=self.reported_for, bounds=self._bounds,
                                         ended=lambda: [(s, how) for s, _, how
                                                        in self._ended.values()],
                                         policies=self._policy_names)
        journal.on_commit = self.metrics.journal_commit.observe
        #: Journal entries, log lines and counters of what each message did.
        self.recorder = Recorder(config, journal, self.metrics)
        # (code, job) pairs whose refusal was logged at WARNING (see _refuse).
        self._refusals_said: set[tuple[str, str | None]] = set()
        #: With CURVE keys: the z85 public keys allowed to steer jobs (``trimtab set`` and the
        #: like), mapped to their names; set by the server from ``curve_operators``. None:
        #: none may (without keys, every peer may: the socket is loopback-only).
        self.operators: Callable[[], dict[str, str]] | None = None
        #: With CURVE keys: the z85 public keys allowed to report as jobs
        #: (``curve_allowed_clients``), set by the server. A key that is only an operator's
        #: may steer jobs, never register or report as one. None: not checked (no keys).
        self.clients: Callable[[], dict[str, str]] | None = None
        #: People waiting to hear that a command of theirs is applied (``Operate.wait``):
        #: job -> [(seq, their connection, their request id)], the newest few per job.
        self._waiting: dict[str, list[tuple[int, bytes, str]]] = {}
        self.metrics.job_timeout.set(config.job_timeout_s)

    # -- entry points -------------------------------------------------------------------
    def handle(self, peer: bytes, frame: bytes, user: str | None = None) -> list[Reply]:
        """Take one frame from ``peer``; return the frames to send back.

        ``user`` is the CURVE key the frame was authenticated with (None: no keys); a job
        is bound to the key that registered it, and any other key is refused ``forbidden``.
        """
        t0 = time.perf_counter()
        try:
            msg = wire.decode(frame)
        except wire.WireError as exc:
            return [self._refuse(peer, exc.code, exc.detail, exc.job)]
        self.metrics.messages.labels(type=msg.type).inc()
        handler = getattr(self, "_on_" + msg.type, None)
        if handler is None:
            return [self._refuse(peer, "unexpected",
                                 f"a client may not send {msg.type!r} messages", msg.job)]
        if (msg.type != "operate" and user is not None and self.clients is not None
                and user not in self.clients()):
            return [self._refuse(peer, "forbidden",
                                 "this key is an operator's (curve_operators), not a client "
                                 "key (curve_allowed_clients): it may steer jobs, not report "
                                 "as one", msg.job)]
        if msg.type != "operate" and self._forbidden(user, msg):
            return [self._refuse(peer, "forbidden",
                                 f"job {msg.job!r} is bound to another client key", msg.job)]
        with self.journal.batch():
            # Registration binds the job to the key it came with; an operator's key decides
            # what it may do.
            replies = (handler(peer, msg, user) if msg.type in ("register", "operate")
                       else handler(peer, msg))
        if msg.type == "report":  # every report is decided on, with a command or none
            self.metrics.decision_latency.observe(time.perf_counter() - t0)
        return replies

    def tick(self) -> list[Reply]:
        """Periodic work: mark silent jobs lost, end the metrics grace of ended ones, save the
        states due (:meth:`save_due`), compact the journal when due (a slice per call).
        Returns the answers to people waiting on a job it marked lost."""
        self.save_due()
        self._compact_slice()
        now = self.clock()
        replies: list[Reply] = []
        for job in [j for j, (_, ended, _) in self._ended.items()
                    if now - ended > self.config.metrics_grace_s]:
            self._drop_series(job)
        for job, unheard in [(j, u) for j, u in self._unheard.items()
                             if now - u.since > self.config.job_timeout_s]:
            del self._unheard[job]
            since = unheard.since
            stored = self.journal.states(live_only=True).get(job)
            if job in self._jobs or stored is None:
                continue
            log.warning("job %s lost: not heard from since this controller started, %.1f s "
                        "ago", job, now - since)
            with self.journal.batch():
                self.journal.append(job, "lost", step=stored.get("step"),
                                    data={"silent_s": now - since, "unheard": True})
                self.journal.save_state(job, stored, live=False)
            self.metrics.jobs_lost.inc()
            if unheard.state is not None and self.config.metrics_grace_s > 0:
                self._end_series(job, unheard.state, "lost")
        for job, rec in [(j, r) for j, r in self._jobs.items()
                         if now - r.last_seen > self.config.job_timeout_s]:
            state = rec.state
            log.warning("job %s lost: silent for %.1f s", job, now - rec.last_seen)
            with self.journal.batch():
                self.journal.append(job, "lost", step=state.step,
                                    data={"silent_s": now - rec.last_seen})
                self._save(state, live=False)
            replies += self._never_applied(job, "the job was lost (silent) before applying it")
            self._forget(job, "lost")
            self.metrics.jobs_lost.inc()
        return replies

    # -- messages -----------------------------------------------------------------------
    def _on_register(self, peer: bytes, msg: wire.Register, user: str | None = None
                     ) -> list[Reply]:
        rec = self._jobs.get(msg.job)
        if rec is not None and peer != rec.peer and peer not in rec.retired:
            silent = self.clock() - rec.last_seen
            if rec.state.run_id != msg.run_id and silent < self.config.takeover_after_s:
                # Another live run under this name (two trials of a sweep named alike): it
                # would take over the job's state and commands. Refused until the run here
                # ends, or is silent for takeover_after_s (crashed: its replacement goes on).
                if peer not in rec.conflicting:
                    rec.conflicting.append(peer)
                    log.warning("job %s: a registration of run %s refused: the job is live as "
                                "run %s on another connection", msg.job, msg.run_id,
                                rec.state.run_id)
                return [self._refuse(
                    peer, "conflict",
                    f"job {msg.job!r} is live as run {rec.state.run_id} on another "
                    f"connection (heard {silent:.1f} s ago): two runs may not share a job "
                    "name; give this run another job, or end that one (a run silent for "
                    f"{self.config.takeover_after_s:g} s is taken over)", msg.job)]
            if peer in rec.conflicting:
                rec.conflicting.remove(peer)
        state = None if rec is None else rec.state
        self._ended.pop(msg.job, None)  # live again: its series are the live job's
        self._unheard.pop(msg.job, None)
        resumed = "live"
        # The process's own first registration, made at attach, which its load_state_dict
        # then replaced with the run it resumes before any step (one link, no report).
        replaces = (state.run_id if rec is not None and state is not None
                    and rec.peer == peer and state.run_id != msg.run_id
                    and not state.reports_seen and msg.resume > 0 else None)
        if state is None or state.run_id != msg.run_id:
            self._retire(msg.job, msg.run_id, state)
            self.metrics.new_run(msg.job)
            stored = self.journal.load_run_state(msg.job, msg.run_id)
            state = None
            if stored is not None:
                try:
                    state = JobState.from_state_dict(stored)
                    resumed = "journal"
                except ValueError as exc:  # e.g. written by an older controller
                    log.warning("job %s: journaled state not resumed (%s); starting afresh",
                                msg.job, exc)
            if state is None:
                state = JobState.from_register(msg, self.config.signals)
                resumed = "new"
        if rec is None:
            rec = self._jobs[msg.job] = LiveJob(state, peer, self.clock())
        else:
            rec.state = state
            if rec.peer != peer:
                rec.retired.append(rec.peer)
        if user is not None:
            rec.owner = user
        if peer in rec.retired:
            rec.retired.remove(peer)
        rec.last_report = self.clock()  # registered: progress counts from here
        self._touch(rec, peer)
        # A resume is journaled (and logged) at the step it resumes at: the process may
        # register a step or two later (its link ready after its first steps).
        at = msg.step
        if state.is_new_resume(msg):
            resumed = "resume"  # the run, resumed in a new process from the user's checkpoint
            at = resumed_at(msg)
            log.warning("job %s resumed at step %d (resume %d): %d steps the controller saw "
                        "after it set aside", msg.job, at, msg.resume, max(state.step - at, 0))
        # A resume sets aside the command the old process had not applied: it never will be.
        unapplied = state.pending_command
        listing = state.on_register(msg)
        ended, state.dropped_phase = state.dropped_phase, None
        self.journal.append(msg.job, "register", step=at, data={
            "resumed": resumed, "key": rec.owner,
            **({} if replaces is None else {"replaces": replaces}),
            **({} if ended is None else {"phase_ended": dataclasses.asdict(ended)}),
            **msg.model_dump(mode="json", exclude={"type", "v", "job", "step"})})
        if ended is not None:
            log.warning("job %s: %s's phase ended in place at step %d, nothing found: the "
                        "client dropped its sweep while it heard no controller, and went back "
                        "to the lr in force before it", msg.job, ended.policy, state.step)
        replies_dropped = (
            self._withdraw_resumed(state, msg, unapplied)
            if resumed == "resume" and unapplied is not None
            and unapplied.seq > msg.applied_seq else [])
        if listing is not None:
            self.recorder.listed(state, msg, listing)
        self._save(state)
        log.info("job %s registered (%s), step %d", msg.job, resumed, at)
        self._derive_limits(state)
        replies = [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step))),
                   *replies_dropped]
        pending = state.pending_command
        if pending is not None and pending.seq > msg.applied_seq:
            pending = self._void_unheld(state, msg, pending, replies)
            if pending is not None:
                replies.append((peer, wire.encode(pending)))  # lost with the old connection
        if pending is None and state.paused is None:
            # Schedules start at the run's first step, not after its first report window.
            replies += self._act(peer, state, self.engine_for(state.job).decide_schedules(state))
            self._save(state)
        return replies

    def _withdraw_resumed(self, state: JobState, msg: wire.Register,
                          dropped: wire.Command) -> list[Reply]:
        """The run was resumed from a save made before ``dropped`` (pending, unapplied) was
        applied: the resume set it aside (:meth:`JobState.on_resumed`) and it is never sent.
        Journaled as withdrawn, and the people waiting on it told so."""
        at = resumed_at(msg)
        why = (f"the run was resumed at step {at} in a new process, from a save made before "
               "it: the resumed run never applies it (the old process may have, unacknowledged)")
        self.journal.append(state.job, "withdrawn", step=at, seq=dropped.seq,
                            data={"why": why, **dropped.model_dump(
                                mode="json", exclude={"type", "v", "job", "seq"},
                                exclude_none=True)})
        log.info("job %s: command %d withdrawn, never sent: %s", state.job, dropped.seq, why)
        return self._never_applied(state.job, f"withdrawn: {why}")

    def _void_unheld(self, state: JobState, msg: wire.Register, pending: wire.Command,
                     replies: list[Reply]) -> wire.Command | None:
        """``pending`` was lost with the old connection. One that rolls back to a checkpoint
        this registration no longer lists is withdrawn whole (:meth:`_void_unheld_rollback`).
        One that marks such a checkpoint (the client's ring moved past it meanwhile: a
        controller down for a while, a link lost) can only fail to: the mark is void (its
        checkpoint is not proposed again), and a command that carries nothing else is
        withdrawn, journaled as such, rather than sent for the client to refuse; one that
        carries more goes as it is (its ack says the mark failed). Returns the command
        still to send (None: withdrawn)."""
        held = ", ".join(map(str, msg.checkpoints))
        target = pending.rollback_to
        if target is not None and _unheld(target, msg.checkpoints):
            return self._void_unheld_rollback(state, msg, pending, held, replies)
        mark = pending.mark_stable
        if mark is None or not _unheld(mark, msg.checkpoints):
            return pending
        state.rollback.mark_failed(mark)
        if (pending.rollback_to is not None or pending.knobs.set() or pending.scale.set()
                or pending.schedules is not None or pending.stop_advice is not None):
            return pending
        why = (f"it marks checkpoint {mark} stable, which the client no longer holds "
               f"(it lists {held})")
        state.pending_command = None
        self.journal.append(state.job, "withdrawn", step=msg.step, seq=pending.seq,
                            data={"why": why, "mark_stable": mark})
        log.info("job %s: command %d withdrawn, never sent again: %s", state.job, pending.seq,
                 why)
        replies += self._never_applied(state.job, f"withdrawn: {why}")
        return None

    def _void_unheld_rollback(self, state: JobState, msg: wire.Register,
                              pending: wire.Command, held: str, replies: list[Reply]) -> None:
        """``pending``, lost with the old connection, rolls back to a checkpoint this
        registration no longer lists: the client moved on meanwhile (a controller stopped
        or stalled, which decided on the reports queued before it stopped, a link lost for
        long), and the restore can only fail. A re-trial's client got such a rollback ~2,150
        steps late: nothing restored, but the phase's pick applied to a run that had trained
        on at another lr since. It is withdrawn whole, never sent: the rollback never
        happened (not in the history that escalates or spends the budget), its checkpoint
        is not targeted again, and the run is decided on afresh from its next report, at
        the values this registration says are in force."""
        target = pending.rollback_to
        why = (f"it rolls back to step {target}, whose checkpoint the client no longer holds "
               f"(it lists {held}): decided on reports from before its link was lost, it "
               f"reached the client at step {msg.step} at the earliest; the run goes on from "
               "there, at the values in force, and is decided on afresh")
        state.rollback.note_withdrawn(why)
        if pending.mark_stable is not None:
            state.rollback.mark_failed(pending.mark_stable)
        state.pending_command = None
        self.journal.append(state.job, "withdrawn", step=msg.step, seq=pending.seq, data={
            "why": why, "unheld_rollback": target, **pending.model_dump(
                mode="json", exclude={"type", "v", "job", "seq"}, exclude_none=True)})
        log.warning("job %s: command %d withdrawn, never sent again: %s", state.job,
                    pending.seq, why)
        replies += self._never_applied(state.job, f"withdrawn: {why}")
        return None

    def _retire(self, job: str, run_id: str, live: JobState | None) -> None:
        """Another run of ``job`` registers: keep the state of the one it replaces (the live
        one, else the journal's), should that run be resumed later from the user's
        checkpoint (``guard.load_state_dict``). A run that never reported is not kept."""
        if live is not None:
            if live.reports_seen:
                self.journal.retire_state(job, live.run_id, live.state_dict())
            return
        stored = self.journal.load_state(job)
        if (stored is not None and stored.get("reports_seen")
                and stored.get("run_id") != run_id):
            self.journal.retire_state(job, str(stored.get("run_id")), stored)

    def _on_report(self, peer: bytes, msg: wire.Report) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        last = state.last_report
        if last is not None and msg.seq <= last.seq:  # replayed or out of order: no state change
            return [self._refuse(peer, "stale", f"report seq {msg.seq} after seq {last.seq}",
                                 msg.job)]
        if msg.applied_seq > state.command_seq:
            return [self._refuse(peer, "invalid", f"applied_seq {msg.applied_seq}: no such "
                                 f"command was sent (newest {state.command_seq})", msg.job)]
        self.metrics.reports.inc()
        self._jobs[msg.job].last_report = self.clock()
        if state.is_stale(msg):
            self.recorder.stale(state, msg)
            return []
        self.recorder.observed(msg.job)
        kept = _kept_now(state)
        self.recorder.settled(state, settle_from_report(state, msg, self.config.rollback))
        told: list[Reply] = []
        if msg.job in self._waiting:  # someone waits on a command: is it applied?
            last = state.last_command
            rolled = (last.rollback_to if last is not None and last.seq == msg.applied_seq
                      else None)
            told = self._tell_applied(msg.job, msg.applied_seq, msg.step, msg.knobs,
                                      msg.scale, rolled, None, "its report (the ack was lost)")
        if msg.applied_seq < state.branch_seq:
            self.recorder.abandoned(state, msg)
            return told
        self.journal.append(msg.job, "report", step=msg.step, seq=msg.seq,
                            data=msg.model_dump(exclude={"type", "v", "job"}))
        step = advance(state, msg, self.engine_for(state.job))
        self.recorder.checkpoints(state, msg, step.observation)
        # A command sent now replaces the one pending: that one is not sent again.
        replies = told + ([] if step.command is not None
                          else self._resend_if_lost(peer, state, msg))
        if step.decision is not None:
            if step.decision.shadowed is not None:
                self.recorder.shadow(state.job, step.decision.shadowed)
            replies += self._send(peer, state, step.decision, step.command, step.superseded)
        decided = step.decision is not None and (step.decision.proposals or step.decision.errors)
        if replies or decided or _kept_now(state) != kept:
            self._save(state)  # a command sent or settled, a decision: saved before replying
        elif msg.job not in self._unsaved:
            self._unsaved[msg.job] = self.clock()  # signals only: saved when due
        if state.phase is not None and "lr" in state.live:
            # Seen, after what it decided: the client runs a sweep at most a few windows
            # past the newest step it is told was seen (it never climbs far unwatched: a
            # controller stopped or behind holds it).
            replies.append((peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step))))
        return replies

    def _on_ack(self, peer: bytes, msg: wire.Ack) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        if msg.seq > state.command_seq:  # an older seq is a repeat ack: taken, not applied
            return [self._refuse(peer, "invalid", f"ack seq {msg.seq}: no such command was "
                                 f"sent (newest {state.command_seq})", msg.job)]
        done = settle_ack(state, msg, self.config.rollback)
        self.journal.append(msg.job, "ack", step=msg.step, seq=msg.seq, data={
            "knobs": msg.knobs.model_dump(), "base": msg.base.model_dump(),
            "scale": msg.scale.model_dump(), "restored_step": msg.restored_step,
            "rolled_back_from": msg.rolled_back_from, "error": msg.error})
        if msg.error is not None:
            log.warning("job %s: command %d not wholly applied: %s", msg.job, msg.seq, msg.error)
        self.recorder.settled(state, done)
        self._save(state)
        return self._tell_applied(msg.job, msg.seq, msg.step, msg.knobs, msg.scale,
                                  msg.restored_step, msg.error, "its ack")

    def _on_heartbeat(self, peer: bytes, msg: wire.Heartbeat) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        return [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step)))]

    def _on_validation(self, peer: bytes, msg: wire.Validation) -> list[Reply]:
        """A validation result no report carried, sent as the run ends: kept with the job's
        results (policies, the metrics) and journaled; nothing is decided on it. One naming
        its run (``run_id``) was sent after close on a link of its own, which waits for an
        answer (a heartbeat): that link never becomes the job's."""
        if msg.run_id is not None:  # sent on a link of its own, after the run said Bye
            rec = self._jobs.get(msg.job)
            if rec is None:
                return self._validation_after_end(peer, msg)
            if rec.state.run_id != msg.run_id:
                return [self._refuse(peer, "unknown_job", f"run {msg.run_id!r} of job "
                                     f"{msg.job!r} is not the live one", msg.job)]
            state = rec.state  # its Bye not in yet: that link stays the job's
        else:
            state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        self._note_validation(state, msg)
        if msg.run_id is not None:  # its link waits for an answer
            return [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step)))]
        return []

    def _note_validation(self, state: JobState, msg: wire.Validation,
                         after_end: bool = False) -> None:
        """Keep a validation result with the run's results and journal it."""
        state.note_validation(msg.step, msg.value, msg.ema)
        data = {"value": msg.value, "ema": msg.ema, **({"after_end": True} if after_end else {})}
        self.journal.append(msg.job, "validation", step=msg.step, data=data)

    def _validation_after_end(self, peer: bytes, msg: wire.Validation) -> list[Reply]:
        """A validation result sent after its run said Bye (``trainer.evaluate()`` after
        ``train()``), on a link of its own: added to that run's results -- kept state,
        journal, and its series while they are exported -- when it is the job's newest run
        and no other run of the job is live; otherwise refused (``unknown_job``)."""
        stored = None if msg.run_id is None else self.journal.load_state(msg.job)
        if stored is None or stored.get("run_id") != msg.run_id:
            return [self._refuse(peer, "unknown_job", (
                f"job {msg.job!r} is not registered, and this validation names "
                + ("no run that ended" if msg.run_id is None else
                   f"run {msg.run_id!r}, which is not the job's newest")), msg.job)]
        ended = self._ended.get(msg.job)
        state = ended[0] if ended is not None and ended[0].run_id == msg.run_id else None
        if state is None:
            try:
                state = JobState.from_state_dict(stored)
            except ValueError as exc:  # written by an older controller
                return [self._refuse(peer, "unknown_job", f"job {msg.job!r}: the state of "
                                     f"run {msg.run_id!r} cannot be read ({exc})", msg.job)]
        self._note_validation(state, msg, after_end=True)
        self._save(state, live=False)
        log.info("job %s: validation %.6g at step %d, sent after the run ended", msg.job,
                 msg.value, msg.step)
        return [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step)))]

    def _on_bye(self, peer: bytes, msg: wire.Bye) -> list[Reply]:
        state = self._live(peer, msg)
        if state is not None:
            self.journal.append(msg.job, "bye", step=msg.step, data={"reason": msg.reason})
            self._save(state, live=False)
            self._forget(msg.job, "bye")
            log.info("job %s said bye at step %d (%s)", msg.job, msg.step, msg.reason)
            return self._never_applied(msg.job, f"the job ended ({msg.reason}) before "
                                                "applying it")
        return []

    def _on_operate(self, peer: bytes, msg: wire.Operate, user: str | None = None
                    ) -> list[Reply]:
        """A person steers a job (:mod:`~trimtab.controller.manual`): carried out through the
        job's governor, journaled with who and why, answered with what came of it."""
        rec = self._jobs.get(msg.job)
        key = None
        if user is not None:  # CURVE: only operator keys may steer
            key = None if self.operators is None else self.operators().get(user)
            if key is None:
                out = Outcome(False, "this client key is not an operator key (the controller's "
                                     "curve_operators directory lists those allowed to steer)")
                return self._answer(peer, msg, out, None, rec)
        if rec is None:
            ended = self._ended.get(msg.job)
            why = (f"job {msg.job!r} ended (step {ended[0].step}); only a live job can be "
                   "steered" if ended is not None else
                   f"job {msg.job!r} is not live on this controller (see `trimtab jobs`)")
            return self._answer(peer, msg, Outcome(False, why), key, None)
        state = rec.state
        out = operate(state, msg, self.engine_for(msg.job), self.config.rollback)
        replies = self._answer(peer, msg, out, key, rec)
        if out.command is not None:
            replies += self._send(rec.peer, state, out.decision or Decision(state.step, ()),
                                  out.command, out.superseded)
            if msg.wait:
                waiting = self._waiting.setdefault(msg.job, [])
                waiting.append((out.command.seq, peer, msg.request))
                del waiting[:-_MAX_WAITING]
        if out.ok:
            self._save(state)
        return replies

    def _answer(self, peer: bytes, msg: wire.Operate, out: Outcome, key: str | None,
                rec: LiveJob | None) -> list[Reply]:
        step = None if rec is None else rec.state.step
        self.recorder.manual(msg.job, step, msg, out, key)
        return [(peer, wire.encode(wire.Operated(
            job=msg.job, request=msg.request, ok=out.ok, detail=out.detail[:1024],
            seq=None if out.command is None else out.command.seq)))]

    def _tell_applied(self, job: str, seq: int, step: int, knobs: wire.Knobs,
                      scale: wire.Scale, restored: int | None, error: str | None,
                      source: str) -> list[Reply]:
        """Answer the people waiting on commands up to ``seq``, which the job now says it
        applied (``source``: its ack, or a report when the ack was lost): the values the
        job used, as it says them."""
        waiting = self._waiting.get(job)
        if not waiting or waiting[0][0] > seq:
            return []
        done = [w for w in waiting if w[0] <= seq]
        rest = [w for w in waiting if w[0] > seq]
        if rest:
            self._waiting[job] = rest
        else:
            del self._waiting[job]
        used = ", ".join(
            f"{k} {v:.6g}" + (f" (x{getattr(scale, k):.6g} of yours)"
                              if k in ("lr", "weight_decay") and getattr(scale, k) is not None
                              else "")
            for k, v in knobs.set().items())
        replies = []
        for mine, peer, request in done:
            if error is not None:
                ok, detail = False, f"command {seq} not wholly applied: {error}"
            elif restored is not None and mine < seq:
                ok, detail = False, (f"replaced by command {seq}, a rollback to step "
                                     f"{restored}: the knobs in force there came back ({used})")
            else:
                ok = True
                carried = f" (carried by command {seq})" if mine < seq else ""
                back = f", rolled back to step {restored}" if restored is not None else ""
                detail = f"applied after step {step}{back}{carried}, as {source} says: {used}"
            replies.append((peer, wire.encode(wire.Operated(
                job=job, request=request, ok=ok, detail=detail[:1024], seq=mine, applied=ok,
                step=step, knobs=knobs, scale=scale))))
        return replies

    def _never_applied(self, job: str, why: str) -> list[Reply]:
        """Answer the people waiting on ``job``'s commands: they will not be applied."""
        return [(peer, wire.encode(wire.Operated(
                    job=job, request=request, ok=False, seq=seq,
                    detail=f"command {seq} not applied: {why}")))
                for seq, peer, request in self._waiting.pop(job, [])]

    # -- helpers ------------------------------------------------------------------------
    def _save(self, state: JobState, *, live: bool = True) -> None:
        """Save ``state`` in the journal now (in the transaction of the message at hand)."""
        self.journal.save_state(state.job, state.state_dict(), live=live)
        self._unsaved.pop(state.job, None)

    def save_due(self, slice_s: float = _SAVE_SLICE_S) -> int:
        """Save the live states that reports changed ``state_save_s`` ago or longer, oldest
        first, for about ``slice_s`` at most (one at least), so a backlog is spread over
        calls rather than stalling every job at once; returns how many were saved."""
        if not self._unsaved:
            return 0
        due = self.clock() - self.config.state_save_s
        t0, saved = time.perf_counter(), 0
        with self.journal.batch():
            while self._unsaved:
                job, since = next(iter(self._unsaved.items()))
                if since > due or (saved and time.perf_counter() - t0 > slice_s):
                    break
                rec = self._jobs.get(job)
                if rec is None:  # ended meanwhile (its end saved it)
                    del self._unsaved[job]
                    continue
                self._save(rec.state)
                saved += 1
        return saved

    def _bounds(self, job: str, knob: str, initial: float | None) -> tuple[float, float]:
        """``job``'s bounds on ``knob``: its own governor's (limits derived from its scale)."""
        rec = self._jobs.get(job)
        governor = rec.governor if rec is not None and rec.governor is not None else self._governor
        return governor.bounds(knob, initial)  # type: ignore[arg-type]

    def _policy_names(self, job: str) -> tuple[list[str], list[str]]:
        """The names of ``job``'s live and shadow policies (for its counters' zeros). Called
        from the metrics thread: it reads the configured policies, builds no engine."""
        picked: dict[str, tuple[PolicySpec, Policy]] = {}
        for spec, policy in self._policies:
            if spec.applies_to(job):
                picked.setdefault(spec.name, (spec, policy))
        return ([p.name for spec, p in picked.values() if not spec.shadow],
                [p.name for spec, p in picked.values() if spec.shadow])

    def engine_for(self, job: str | None) -> Engine:
        """The engine with the policies configured for ``job`` (None: those for every job),
        live and shadow; for a job two entries of one name match, the first wins."""
        picked: dict[str, int] = {}
        for i, (spec, _) in enumerate(self._policies):
            if spec.jobs is None or (job is not None and spec.applies_to(job)):
                picked.setdefault(spec.name, i)
        key = tuple(sorted(picked.values()))
        if key not in self._engines:
            chosen = [self._policies[i] for i in key]
            self._engines[key] = Engine(
                [p for spec, p in chosen if not spec.shadow], self._governor,
                rollback=self.config.rollback,
                shadow_policies=[p for spec, p in chosen if spec.shadow], budget=self.budget,
                live_schedules=self.config.live_schedules)
        engine = self._engines[key]
        rec = self._jobs.get(job) if job is not None else None
        if rec is None or rec.governor is None:
            return engine
        if rec.engine is None or rec.engine[0] is not engine:
            per_job = copy.copy(engine)  # the same policies, the job's own governor
            per_job.governor = rec.governor
            rec.engine = (engine, per_job)
        return rec.engine[1]

    def _derive_limits(self, state: JobState) -> None:
        """Give the job a governor whose defaults follow its scale facts (see
        :func:`~trimtab.controller.scale.derive_limits`), and log what was derived."""
        explicit = explicit_fields(self.config.governor)
        derived = derive_limits(ScaleContext.from_facts(state.facts), self.config.governor,
                                explicit, state.registered, state.lr_spread)
        rec = self._jobs[state.job]
        rec.governor, rec.engine = Governor(derived.config), None
        for note in derived.notes:
            log.info("job %s: governor limit derived from its scale: %s", state.job, note)
        if not derived.notes:
            why = ("set in the configuration" if any(f.startswith("lr.") for f in explicit)
                   else f"no sane range known for optimizer {state.facts.optimizer!r}")
            log.info("job %s: lr bounds not derived from its scale (%s)", state.job, why)

    def _act(self, peer: bytes, state: JobState, decision: Decision) -> list[Reply]:
        """Commit a decision made outside a report (at registration) and record it."""
        superseded = state.pending_command
        command = commit(state, decision, self.engine_for(state.job).governor.limits("lr").max)
        return self._send(peer, state, decision, command, superseded)

    def _send(self, peer: bytes, state: JobState, decision: Decision,
              command: wire.Command | None, superseded: wire.Command | None) -> list[Reply]:
        """Record a committed decision; the reply that sends its command (if any)."""
        self.recorder.decision(state, decision, command, superseded)
        return [] if command is None else [(self._peer_of(state.job, peer), wire.encode(command))]

    def _resend_if_lost(self, peer: bytes, state: JobState, msg: wire.Report) -> list[Reply]:
        pending = state.pending_command
        if pending is None:  # none sent, or the report says it is applied (observe saw)
            return []
        sent_at = state.pending_since if state.pending_since is not None else state.reports_seen
        if state.reports_seen - sent_at >= self.config.resend_after_reports:
            state.pending_since = state.reports_seen
            self.recorder.resent(state.job, pending.seq, self.clock())
            return [(self._peer_of(state.job, peer), wire.encode(pending))]
        return []

    def _live(self, peer: bytes, msg: wire.Report | wire.Ack | wire.Heartbeat | wire.Bye):
        rec = self._jobs.get(msg.job)
        if rec is None or peer in rec.conflicting:  # another run under its name: not its
            return None
        if peer in rec.retired:  # a replaced connection's late message
            rec.last_seen = self.clock()
        else:
            self._touch(rec, peer)
        return rec.state

    def _forbidden(self, user: str | None, msg: wire.Message) -> bool:
        """Whether ``msg`` names a job bound to a key other than ``user``. The binding of a
        job that is not live is read from its journaled registrations, so it outlives the
        run and a controller restart."""
        if user is None:
            return False
        rec = self._jobs.get(msg.job)
        owner = None if rec is None else rec.owner
        if owner is None and msg.type in ("register", "validation"):
            for event in self.journal.iter_events(msg.job, "register"):
                owner = event.data.get("key") or owner
        return owner is not None and owner != user

    def _touch(self, rec: LiveJob, peer: bytes) -> None:
        rec.peer, rec.last_seen = peer, self.clock()
        self.metrics.jobs_connected.set(len(self._jobs))

    def _peer_of(self, job: str, peer: bytes) -> bytes:
        """The connection ``job``'s messages go to (``peer`` when it is not live)."""
        rec = self._jobs.get(job)
        return peer if rec is None else rec.peer

    def _forget(self, job: str, how: str) -> None:
        """The job ended (``how``: bye, or lost): no longer live; its series stay for the
        grace."""
        rec = self._jobs.pop(job, None)
        if rec is not None and self.config.metrics_grace_s > 0:
            self._end_series(job, rec.state, how)
        else:
            self.metrics.forget(job)
        self.metrics.jobs_connected.set(len(self._jobs))

    def _end_series(self, job: str, state: JobState, how: str) -> None:
        """``job`` ended (``how``): its series stay on /metrics for the grace, from now."""
        self._ended[job] = (state, self.clock(), how)
        while len(self._ended) > _MAX_ENDED:  # bounded: the oldest ends go first
            self._drop_series(next(iter(self._ended)))

    def _compact_slice(self) -> None:
        """The journal's retention (:mod:`~trimtab.controller.retention`), applied every
        ``compact_every_s`` in slices of ``batch_rows`` rows, one per call."""
        cfg = self.config.retention
        if not cfg.compact_every_s or self.journal.clock() < self._compact_at:
            return
        deleted = self.journal.compact(cfg, limit=cfg.batch_rows)
        for what, n in deleted.items():
            self._compacted[what] = self._compacted.get(what, 0) + n
        if sum(deleted.values()) < cfg.batch_rows:  # nothing more due: done until next time
            total = sum(self._compacted.values())
            if total:
                log.info("journal compacted: %d rows deleted (%s)", total, ", ".join(
                    f"{what} {n}" for what, n in self._compacted.items() if n))
            self._compacted = {}
            self._compact_at = self.journal.clock() + cfg.compact_every_s

    def _drop_series(self, job: str) -> None:
        self._ended.pop(job, None)
        if job not in self._jobs:
            self.metrics.forget(job)

    def refuse_frames(self, peer: bytes, payload_frames: int) -> Reply:
        """The reply to a multi-part (or empty) message: one frame per message is the rule."""
        return self._refuse(peer, "malformed",
                            f"expected 1 payload frame, got {payload_frames}", None)

    def refuse(self, peer: bytes, code: str, detail: str, job: str | None = None) -> Reply:
        """An error reply to ``peer``, counted under ``code`` (refusals made by the server)."""
        return self._refuse(peer, code, detail, job)

    def _unknown(self, peer: bytes, job: str) -> Reply:
        return self._refuse(peer, "unknown_job", f"job {job!r} is not registered; register first",
                            job)

    def _refuse(self, peer: bytes, code: str, detail: str, job: str | None) -> Reply:
        self.metrics.message_errors.labels(code=code).inc()
        key = (code, job)
        if code in ("invalid", "version") and key not in self._refusals_said:
            # Said once per job and code (the set is bounded): a client on another trimtab
            # release has every report refused, and the runs go on uncontrolled.
            if len(self._refusals_said) < 1000:
                self._refusals_said.add(key)
            log.warning("refused a message for job %s: %s: %s (said once per job and code; "
                        "counted in trimtab_message_errors_total)", job, code, detail)
        else:
            log.debug("refused a message from %r: %s: %s", peer, code, detail)
        return (peer, wire.encode(wire.Error(code=code, detail=detail, job=job)))

    def silent_for(self, job: str) -> float | None:
        """Seconds since ``job`` was last heard from (None: not live)."""
        rec = self._jobs.get(job)
        if rec is None:
            unheard = self._unheard.get(job)
            if unheard is None or unheard.state is None:
                return None
            return max(self.clock() - unheard.heard, 0.0)
        return self.clock() - rec.last_seen

    def reported_for(self, job: str) -> float | None:
        """Seconds since ``job``'s last report, or its registration (None: not live)."""
        rec = self._jobs.get(job)
        return None if rec is None or rec.last_report is None else (
            self.clock() - rec.last_report)

    def _exported_jobs(self) -> list[JobState]:
        """The live jobs' states, and those of jobs the journal has live that this
        controller has not heard from yet (until they register or are marked lost)."""
        return [r.state for r in self._jobs.values()] + [
            u.state for job, u in self._unheard.items()
            if u.state is not None and job not in self._jobs]

    def live_jobs(self) -> Iterable[str]:
        return list(self._jobs)

    @property
    def jobs(self) -> dict[str, JobState]:
        """The live jobs' states, by name (a new dict: read it, do not change it)."""
        return {job: rec.state for job, rec in self._jobs.items()}

    def close(self) -> list[tuple[str, int]]:
        """Save every live job's state in the journal and close it; returns the jobs saved
        and their steps (the shutdown line names them)."""
        saved = []
        with self.journal.batch():
            for job, rec in self._jobs.items():
                self._save(rec.state)
                saved.append((job, rec.state.step))
        self.journal.close()
        if self.budget is not None:
            self.budget.close()
        return saved
