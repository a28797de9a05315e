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
b'{"type":"error","v":1,"code":"malformed"'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from trimtab.client import wire
from trimtab.controller.config import ControllerConfig
from trimtab.controller.engine import Decision, Engine
from trimtab.controller.governor import Governor
from trimtab.controller.journal import Journal
from trimtab.controller.metrics import ControllerMetrics
from trimtab.controller.policy import Policy, load_policy
from trimtab.controller.state import JobState

__all__ = ["Controller", "Reply"]

log = logging.getLogger("trimtab.controller")

#: (peer identity, frame) to send.
Reply = tuple[bytes, bytes]


def build_policies(config: ControllerConfig) -> list[Policy]:
    """The configured policies, in order; a bad one stops the start with its name and cause."""
    return [load_policy(spec.name, spec.config) for spec in config.policies]


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
        self.engine = Engine(build_policies(config), Governor(config.governor))
        self.jobs: dict[str, JobState] = {}
        self._peer: dict[str, bytes] = {}
        self._last_seen: dict[str, float] = {}
        self._pending_since: dict[str, int] = {}
        self.metrics = ControllerMetrics(registry=registry, jobs=lambda: self.jobs.values())

    # -- entry points -------------------------------------------------------------------
    def handle(self, peer: bytes, frame: bytes) -> list[Reply]:
        """Take one frame from ``peer``; return the frames to send back."""
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
        with self.journal.batch():
            replies = handler(peer, msg)
        if msg.type == "report" and replies:
            self.metrics.decision_latency.observe(time.perf_counter() - t0)
        return replies

    def tick(self) -> list[Reply]:
        """Periodic work: mark silent jobs lost. Returns nothing to send today."""
        now = self.clock()
        for job in [j for j, t in self._last_seen.items()
                    if now - t > self.config.job_timeout_s]:
            state = self.jobs[job]
            log.warning("job %s lost: silent for %.1f s", job, now - self._last_seen[job])
            with self.journal.batch():
                self.journal.append(job, "lost", step=state.step,
                                    data={"silent_s": now - self._last_seen[job]})
                self.journal.save_state(job, state.state_dict(), live=False)
            self._forget(job)
            self.metrics.jobs_lost.inc()
        return []

    # -- messages -----------------------------------------------------------------------
    def _on_register(self, peer: bytes, msg: wire.Register) -> list[Reply]:
        state = self.jobs.get(msg.job)
        resumed = "live"
        if state is None or state.run_id != msg.run_id:
            stored = self.journal.load_state(msg.job)
            if stored is not None and stored.get("run_id") == msg.run_id:
                state = JobState.from_state_dict(stored)
                resumed = "journal"
            else:
                state = JobState.from_register(msg, self.config.signals)
                resumed = "new"
        self.jobs[msg.job] = state
        self._touch(msg.job, peer)
        self.journal.append(msg.job, "register", step=msg.step, data={
            "run_id": msg.run_id, "resumed": resumed, "facts": msg.facts.model_dump(),
            "knobs": msg.knobs.model_dump(), "applied_seq": msg.applied_seq})
        state.on_register(msg)
        self.journal.save_state(msg.job, state.state_dict())
        log.info("job %s registered (%s), step %d", msg.job, resumed, msg.step)
        replies = [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step)))]
        pending = state.pending_command
        if pending is not None and pending.seq > msg.applied_seq:
            replies.append((peer, wire.encode(pending)))  # lost with the old connection
        return replies

    def _on_report(self, peer: bytes, msg: wire.Report) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        self.metrics.reports.inc()
        state.observe(msg)
        self.journal.append(msg.job, "report", step=msg.step, seq=msg.seq,
                            data=msg.model_dump(exclude={"type", "v", "job"}))
        replies = self._resend_if_lost(peer, state, msg)
        if state.pending_command is None:
            decision = self.engine.decide(state)
            replies += self._act(peer, state, decision)
        self.journal.save_state(msg.job, state.state_dict())
        return replies

    def _on_ack(self, peer: bytes, msg: wire.Ack) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        state.on_ack(msg)
        self.journal.append(msg.job, "ack", step=msg.step, seq=msg.seq,
                            data={"knobs": msg.knobs.model_dump()})
        self.journal.save_state(msg.job, state.state_dict())
        return []

    def _on_heartbeat(self, peer: bytes, msg: wire.Heartbeat) -> list[Reply]:
        state = self._live(peer, msg)
        if state is None:
            return [self._unknown(peer, msg.job)]
        return [(peer, wire.encode(wire.Heartbeat(job=msg.job, step=state.step)))]

    def _on_bye(self, peer: bytes, msg: wire.Bye) -> list[Reply]:
        state = self._live(peer, msg)
        if state is not None:
            self.journal.append(msg.job, "bye", step=msg.step, data={"reason": msg.reason})
            self.journal.save_state(msg.job, state.state_dict(), live=False)
            self._forget(msg.job)
            log.info("job %s said bye at step %d (%s)", msg.job, msg.step, msg.reason)
        return []

    # -- helpers ------------------------------------------------------------------------
    def _act(self, peer: bytes, state: JobState, decision: Decision) -> list[Reply]:
        for policy, proposal in decision.proposals:
            self.journal.append(state.job, "proposal", step=decision.step, data={
                "policy": policy, **proposal.to_dict()})
        for policy, error in decision.errors:
            log.error("policy %s disabled for job %s: %s", policy, state.job, error)
            self.journal.append(state.job, "policy_error", step=decision.step,
                                data={"policy": policy, "error": error})
        if not decision.proposals:
            return []
        self.journal.append(state.job, "decision", step=decision.step,
                            data=decision.to_dict())
        targets = decision.commands
        if not targets:
            return []
        command = wire.Command(job=state.job, seq=state.next_command_seq(),
                               knobs=wire.Knobs(**targets), reasons=decision.reasons())
        state.pending_command = command
        self._pending_since[state.job] = state.reports_seen
        self.journal.append(state.job, "command", step=decision.step, seq=command.seq,
                            data={"knobs": targets, "reasons": command.reasons})
        self.metrics.commands.inc()
        log.info("job %s: command %d %s (%s)", state.job, command.seq, targets,
                 "; ".join(command.reasons))
        return [(peer, wire.encode(command))]

    def _resend_if_lost(self, peer: bytes, state: JobState, msg: wire.Report) -> list[Reply]:
        pending = state.pending_command
        if pending is None:
            return []
        if msg.applied_seq >= pending.seq:  # applied, its ack still on the way or lost
            state.on_applied(msg.applied_seq, msg.knobs)
            return []
        sent_at = self._pending_since.get(state.job, state.reports_seen)
        if state.reports_seen - sent_at >= self.config.resend_after_reports:
            self._pending_since[state.job] = state.reports_seen
            log.info("job %s: command %d not applied yet; sending it again", state.job,
                     pending.seq)
            return [(peer, wire.encode(pending))]
        return []

    def _live(self, peer: bytes, msg: wire.Report | wire.Ack | wire.Heartbeat | wire.Bye):
        state = self.jobs.get(msg.job)
        if state is not None:
            self._touch(msg.job, peer)
        return state

    def _touch(self, job: str, peer: bytes) -> None:
        self._peer[job] = peer
        self._last_seen[job] = self.clock()
        self.metrics.jobs_connected.set(len(self.jobs))

    def _forget(self, job: str) -> None:
        for table in (self.jobs, self._peer, self._last_seen, self._pending_since):
            table.pop(job, None)
        self.metrics.jobs_connected.set(len(self.jobs))

    def refuse_frames(self, peer: bytes, payload_frames: int) -> Reply:
        """The reply to a multi-part (or empty) message: one frame per message is the rule."""
        return self._refuse(peer, "malformed",
                            f"expected 1 payload frame, got {payload_frames}", None)

    def _unknown(self, peer: bytes, job: str) -> Reply:
        return self._refuse(peer, "unknown_job", f"job {job!r} is not registered; register first",
                            job)

    def _refuse(self, peer: bytes, code: str, detail: str, job: str | None) -> Reply:
        self.metrics.message_errors.labels(code=code).inc()
        log.debug("refused a message from %r: %s: %s", peer, code, detail)
        return (peer, wire.encode(wire.Error(code=code, detail=detail, job=job)))

    def live_jobs(self) -> Iterable[str]:
        return list(self.jobs)

    def close(self) -> None:
        with self.journal.batch():
            for job, state in self.jobs.items():
                self.journal.save_state(job, state.state_dict())
        self.journal.close()
