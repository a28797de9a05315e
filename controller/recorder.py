"""What the controller records of each hop: the journal, the logs and the counters.

The handler (:mod:`~trimtab.controller.handler`) decides what happened (through
:mod:`~trimtab.controller.advance`); :class:`Recorder` writes it down, in one place: a
report's new checkpoints, a report not observed (stale or abandoned), an applied command
settled, a decision with its proposals and its command, a shadow decision. Nothing here
changes a job's state.
"""

from __future__ import annotations

import dataclasses
import logging

from trimtab.controller.advance import Settled
from trimtab.controller.config import ControllerConfig
from trimtab.controller.decision import Decision
from trimtab.controller.journal import Journal
from trimtab.controller.manual import Outcome
from trimtab.controller.metrics import ControllerMetrics
from trimtab.controller.rollback import Observation
from trimtab.controller.state import JobState
from trimtab.protocol import wire

__all__ = ["Recorder"]

log = logging.getLogger("trimtab.controller")

#: A job's resends are logged at most this often: a backlog of reports arriving at once
#: (a client flushing its queue after a pause) resends a command several times in
#: milliseconds, and each line would say the same.
RESEND_LOG_EVERY_S = 10.0
#: Jobs whose last resend line is remembered; past this, lines older than the interval go.
_RESEND_JOBS = 4096


class Recorder:
    """Journal entries, log lines and metrics for one controller."""

    def __init__(self, config: ControllerConfig, journal: Journal,
                 metrics: ControllerMetrics) -> None:
        self.config, self.journal, self.metrics = config, journal, metrics
        # Per job: when its last resend line went out, and the resends since, unsaid.
        self._resends: dict[str, tuple[float, int]] = {}
        # Jobs whose stale reports were logged since their last observed one.
        self._stale_said: set[str] = set()

    def resent(self, job: str, seq: int, now: float) -> None:
        """Log (DEBUG) that a command not yet applied is sent again: at most one line per
        job per :data:`RESEND_LOG_EVERY_S`, counting the resends it stood for."""
        last, unsaid = self._resends.get(job, (float("-inf"), 0))
        if now - last < RESEND_LOG_EVERY_S:
            self._resends[job] = (last, unsaid + 1)
            return
        if len(self._resends) >= _RESEND_JOBS:
            self._resends = {j: v for j, v in self._resends.items()
                             if now - v[0] < RESEND_LOG_EVERY_S}
        self._resends[job] = (now, 0)
        more = f" ({unsaid} more resends since the last line)" if unsaid else ""
        log.debug("job %s: command %d not applied yet; sending it again%s", job, seq, more)

    def checkpoints(self, state: JobState, msg: wire.Report | wire.Register,
                    obs: Observation) -> None:
        """Journal the checkpoints a report (or a registration) lists for the first time,
        and adopted marks."""
        rb = state.rollback
        source = "report" if isinstance(msg, wire.Report) else "register"
        for step in obs.new_checkpoints:
            data = {"step": step, "reported_at": msg.step, "candidate": step in rb.candidates,
                    "knobs": msg.knobs.model_dump()}
            if source == "register":
                data["source"] = source
            if step in obs.disqualified:
                data["why_not"] = f"unhealthy at step {rb.last_unhealthy_step}: {rb.last_unhealthy}"
            self.journal.append(state.job, "checkpoint", step=step, data=data)
        if obs.adopted_stable is not None:
            self.journal.append(state.job, "stable", step=obs.adopted_stable,
                                data={"step": obs.adopted_stable, "source": source})
        if obs.data_moved is not None:
            self.journal.append(state.job, "data_moved", step=msg.step,
                                data={"why": obs.data_moved})
            log.warning("job %s: %s", state.job, obs.data_moved)

    #: The checkpoints a registration lists (a controller that starts, restarts or follows
    #: a resume learns them before the first report).
    listed = checkpoints

    def abandoned(self, state: JobState, msg: wire.Report) -> None:
        """A report the client sent before it applied the last rollback (it was in flight,
        or queued, when the restore happened): its signals, checkpoints and stable mark
        describe the path rolled back from. It is journaled and counted, never observed —
        observed, its non-finite values would order a second rollback, and its checkpoint
        list and stable mark would resurrect checkpoints the client no longer has."""
        self.metrics.reports_abandoned.inc()
        self.journal.append(msg.job, "abandoned", step=msg.step, seq=msg.seq, data={
            **msg.model_dump(exclude={"type", "v", "job"}), "branch_seq": state.branch_seq})
        log.info("job %s: report %d (step %d) predates rollback command %d: not observed",
                 msg.job, msg.seq, msg.step, state.branch_seq)

    def stale(self, state: JobState, msg: wire.Report) -> None:
        """A report made while its client heard no controller (this one started after the
        run, or restarted), or under a link before its registration's, then sent. It is
        journaled and counted, never observed: a decision, a phase or a checkpoint list
        taken from it would act on a past the run has left (only reports seen live are
        evidence)."""
        self.metrics.reports_stale.inc()
        self.journal.append(msg.job, "stale", step=msg.step, seq=msg.seq, data={
            **msg.model_dump(exclude={"type", "v", "job"})})
        # One line per run of them (a restart after downtime brings a queue of dozens):
        # the first at INFO, the rest at DEBUG until a report is observed again.
        said = msg.job in self._stale_said
        self._stale_said.add(msg.job)
        log.log(logging.DEBUG if said else logging.INFO,
                "job %s: report %d (step %d) was made while its client heard no controller: "
                "not observed%s", msg.job, msg.seq, msg.step,
                "" if said else " (the next ones like it are journaled and counted, "
                "trimtab_reports_stale_total, not logged)")

    def observed(self, job: str) -> None:
        """A report of ``job`` was observed: its next stale one is logged again."""
        self._stale_said.discard(job)

    def settled(self, state: JobState, done: Settled | None) -> None:
        """Journal and log what settling an applied command recorded."""
        if done is None:
            return
        command, job = done.command, state.job
        if done.marked is not None:
            self.journal.append(job, "stable", step=done.marked, seq=command.seq, data={
                "step": done.marked, "source": "report" if done.inferred else "ack"})
        if done.mark_failed is not None:
            log.warning("job %s: checkpoint %d not marked stable", job, done.mark_failed)
        rec = done.rollback
        if rec is not None and done.restored is not None:
            self.journal.append(job, "restored", step=done.restored, seq=command.seq, data={
                "restored_step": done.restored, "from_step": rec.from_step,
                "steps_lost": done.steps_lost, "reason": rec.cause, "level": rec.level,
                "inferred": done.inferred})
            # A planned one (level 0: a measurement phase's start or return) at INFO: a
            # sweep trial's 1000-trial study logged two WARNINGs per range test.
            log.log(logging.WARNING if rec.level else logging.INFO,
                    "job %s: rolled back from step %d to %d (%s, level %d)", job,
                    rec.from_step, done.restored, rec.cause, rec.level)
        elif rec is not None:
            # Nothing was restored: the journal says so (the rollback event says only that
            # one was ordered), and that checkpoint is never targeted again.
            self.journal.append(job, "restore_failed", step=state.step, seq=command.seq, data={
                "target": rec.to_step, "from_step": rec.from_step, "reason": rec.cause,
                "level": rec.level, "why": done.failed, "inferred": done.inferred})
            log.error("job %s: rollback to step %d failed, nothing restored: %s", job,
                      rec.to_step, done.failed)

    def shadow(self, job: str, decision: Decision) -> None:
        """Journal and log what the shadow policies would have done; nothing is sent."""
        for policy, error in decision.errors:
            log.error("shadow policy %s disabled for job %s: %s", policy, job, error)
            self.journal.append(job, "policy_error", step=decision.step,
                                data={"policy": policy, "error": error, "shadow": True})
        if decision.proposals:
            self.journal.append(job, "shadow", step=decision.step, data=decision.to_dict())
        for line in decision.reasons():
            log.info("job %s: shadow, not sent: %s", job, line)

    def manual(self, job: str, step: int | None, msg: wire.Operate, outcome: Outcome,
               key: str | None) -> None:
        """Journal, log and count a person's request and what came of it."""
        asked = msg.model_dump(include={"knobs", "scale"}, exclude_none=True)
        self.journal.append(job, "manual", step=step,
                            seq=None if outcome.command is None else outcome.command.seq, data={
            "action": msg.action, "who": msg.who, "reason": msg.reason, "key": key,
            "ok": outcome.ok, "detail": outcome.detail,
            **{k: v for k, v in asked.items() if v}, "to_step": msg.to_step,
            **outcome.record})
        done = "done" if outcome.ok else "refused"
        self.metrics.operator_requests.labels(action=msg.action, outcome=done).inc()
        (log.warning if outcome.ok else log.info)(
            "job %s: %s by %s (%s): %s: %s", job, msg.action, msg.who, msg.reason, done,
            outcome.detail)

    def decision(self, state: JobState, decision: Decision, command: wire.Command | None,
                 superseded: wire.Command | None) -> None:
        """Journal, log and count a committed decision and the command it sends."""
        job = state.job
        for policy, proposal in decision.proposals:
            self.journal.append(job, "proposal", step=decision.step, data={
                "policy": policy, **proposal.to_dict()})
        for policy, error in decision.errors:
            log.error("policy %s disabled for job %s: %s", policy, job, error)
            self.journal.append(job, "policy_error", step=decision.step,
                                data={"policy": policy, "error": error})
        if decision.alert is not None and not decision.shadow:
            log.error("job %s: rollback alert, no more rollbacks: %s", job, decision.alert)
            self.journal.append(job, "alert", step=decision.step, data={
                "why": decision.alert, "budget": self.config.rollback.budget,
                "rollbacks": [dataclasses.asdict(r) for r in state.rollback.history]})
        if decision.proposals:
            self.journal.append(job, "decision", step=decision.step, data=decision.to_dict())
        self.metrics.note_decision(job, decision)
        end = decision.phase_end
        if end is not None and end.in_place and not decision.shadow:
            lr = "unchanged" if end.end_lr is None else f"x{end.end_lr:.6g}"
            log.warning("job %s: %s's measurement phase ended in place at step %d, no rollback "
                        "(lr %s)", job, end.policy, decision.step, lr)
        if command is None:
            return
        if command.stop_advice is not None:
            self.journal.append(job, "advice", step=decision.step,
                                data={"advice": "stop", "reason": command.stop_advice})
            log.warning("job %s: advising the run to stop: %s", job, command.stop_advice)
        scale = command.scale.model_dump(exclude_none=True)
        absolute = command.knobs.model_dump(exclude_none=True)
        plan = None if decision.shadow else decision.rollback
        if plan is not None:
            self.journal.append(job, "rollback", step=decision.step, seq=command.seq, data={
                "reason": plan.cause, "why": plan.reason, "level": plan.level,
                "target": plan.target_step, "from_step": plan.from_step, "policy": plan.policy,
                "cut": plan.cut, "cooldown_steps": plan.cooldown_steps, "scale": scale,
                "knobs": absolute})
            log.log(logging.INFO if plan.planned else logging.WARNING, "job %s: %s", job,
                    plan.describe())
        self.journal.append(job, "command", step=decision.step, seq=command.seq, data={
            "scale": scale, "knobs": absolute, "lr_max": command.lr_max,
            "reasons": command.reasons, "mark_stable": command.mark_stable,
            "rollback_to": command.rollback_to,
            # The knobs it puts on a live schedule: the client applies the schedule's value
            # at the step it takes the command, not the one computed here.
            "live": [sched.knob for sched in command.schedules or []],
            "supersedes": None if superseded is None else superseded.seq})
        self.metrics.commands.inc()
        log.info("job %s: command %d %s (%s)", job, command.seq, decision.commands,
                 "; ".join(command.reasons))
