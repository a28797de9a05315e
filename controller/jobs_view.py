"""Every job of a journal, one line each (``trimtab jobs``, ``trimtab top``).

A line joins two sources: the job's saved state (the controller's own view: step, the
knobs in force, the rollback alert; ``job_state``, saved at once with a command, a rollback
or a job's start and end, else at most ``state_save_s`` after a report changed it, so the
step may lag the metrics by that much) and its events (when
it was last heard, whether it said goodbye or was lost, its last decision that acted and
why, its rollbacks). :class:`JobsView` reads the events incrementally — only those
journaled since its last read — so that ``trimtab top`` refreshing every second reads a
long journal once, not once a second.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

from trimtab.controller.journal import Event, Journal
from trimtab.controller.timeline import knob_change

__all__ = ["JobLine", "JobsView", "RECENT_S"]

#: ``trimtab jobs`` without ``--all``: live jobs, and jobs heard within this many seconds.
RECENT_S = 86400.0

_KNOBS = ("lr", "momentum", "weight_decay", "clip")


@dataclass
class JobLine:
    """What ``trimtab jobs`` says of one job."""

    job: str
    state: str = "?"
    step: int | None = None
    #: The knobs in force, as the optimizer has them (the effective values).
    knobs: dict[str, float | None] = field(default_factory=dict)
    last_decision: str = ""
    last_decision_step: int | None = None
    alert: str | None = None
    last_seen: float = 0.0
    #: Who paused the job's policies, and why (``trimtab pause``); None: not paused.
    paused: str | None = None
    #: The steps the run's rollbacks were ordered at (a resume sets aside those after it
    #: that its save had not applied), and their commands' seqs.
    rollback_steps: list[int] = field(default_factory=list, repr=False)
    rollback_seqs: list[int | None] = field(default_factory=list, repr=False)
    #: The command of the last decision shown (None: none, or not a command's).
    last_decision_seq: int | None = field(default=None, repr=False)

    @property
    def rollbacks(self) -> int:
        """Rollbacks on the run's path: one a resume from an earlier save set aside is gone."""
        return len(self.rollback_steps)

    def knobs_text(self) -> str:
        return " ".join(f"{k}={'off' if v is None else f'{v:.4g}'}"
                        for k, v in self.knobs.items() if k in _KNOBS)

    def to_json(self) -> str:
        shown: dict[str, object] = {}
        for k, v in asdict(self).items():
            if k not in ("rollback_steps", "rollback_seqs", "last_decision_seq"):
                shown[k] = v
            if k == "last_decision_step":
                shown["rollbacks"] = self.rollbacks
        return json.dumps({**shown, "last_seen_time": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.localtime(self.last_seen))}, allow_nan=False)


class JobsView:
    """The lines of a journal's jobs, kept up to date by :meth:`update`."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lines: dict[str, JobLine] = {}
        self._after = 0
        #: Names something was heard from or saved for: not only people's requests (a
        #: refused request names whatever it was sent for, a typo or another shard's job).
        self._known: set[str] = set()
        #: Per job: the run its line shows, and what the line said of each earlier run (a
        #: name reused by another run, or an attach registration its process replaced with
        #: a resume: the line follows the run that registered last).
        self._run: dict[str, str] = {}
        #: When each job's step was last taken from an event.
        self._step_ts: dict[str, float] = {}
        self._runs: dict[tuple[str, str], tuple[list[int], list[int | None], str, int | None,
                                                int | None]] = {}

    def update(self) -> list[JobLine]:
        """Read what was journaled since the last call; every job's line, by name."""
        # A report's data is never read here: its step and time are the row's.
        for ev in self.journal.iter_events(after_id=self._after, bare=frozenset({"report"})):
            self._after = ev.id
            self._feed(self._lines.setdefault(ev.job, JobLine(ev.job)), ev)
            if ev.kind != "manual":
                self._known.add(ev.job)
        summaries = self.journal.state_summaries()
        live = {job for job, (is_live, _, _) in summaries.items() if is_live}
        for job, (_, saved, sd) in summaries.items():
            self._known.add(job)
            line = self._lines.setdefault(job, JobLine(job))
            if saved > self._step_ts.get(job, -1.0) and sd["step"] is not None:
                # The saved state is newer than the events' step (a state saved every
                # few seconds lags the reports: a controller killed at step 110 had saved
                # step 10; the reports say 110).
                line.step = sd["step"]
            line.knobs = dict(sd.get("effective") or {})
            line.alert = sd.get("alert")
            p = sd.get("paused")
            line.paused = None if not p else f"{p.get('who')} at step {p.get('step')}: " \
                                             f"{p.get('reason')}"
            if job in live and line.state in ("?", "live"):
                line.state = "live"
            elif job not in live and line.state in ("?", "live"):
                line.state = "ended"  # its bye or loss compacted away, or never journaled
        return [self._lines[j] for j in sorted(self._lines) if j in self._known]

    def lines(self, *, all_jobs: bool = False, now: float | None = None) -> list[JobLine]:
        """:meth:`update`, then the jobs to show: every one, or live and recent ones."""
        now = time.time() if now is None else now
        return [ln for ln in self.update()
                if all_jobs or ln.state == "live" or now - ln.last_seen <= RECENT_S]

    def _switch_run(self, line: JobLine, run: str) -> None:
        """A registration of ``run``: the line's rollbacks and last decision are that run's
        (none for a new one), not those of an earlier run under the same name."""
        was = self._run.get(line.job)
        if was == run:
            return
        if was is not None:
            self._runs[(line.job, was)] = (line.rollback_steps, line.rollback_seqs,
                                           line.last_decision, line.last_decision_step,
                                           line.last_decision_seq)
        (steps, seqs, line.last_decision, line.last_decision_step,
         line.last_decision_seq) = self._runs.pop((line.job, run), ([], [], "", None, None))
        line.rollback_steps, line.rollback_seqs = list(steps), list(seqs)
        self._run[line.job] = run

    def _feed(self, line: JobLine, ev: Event) -> None:
        if ev.kind != "manual":  # a person's request is not word from the job
            line.last_seen = max(line.last_seen, ev.ts)
        if ev.step is not None and ev.kind in ("report", "register", "ack", "bye", "lost"):
            # A job marked lost by a restarted controller is at the step its saved state
            # says, which may lag the reports journaled before the restart.
            line.step = (max(ev.step, line.step) if ev.kind == "lost" and line.step is not None
                         else ev.step)
            # A bye's step is where the run ended: the state saved with it holds the last
            # report's (a re-trial: 'step 140' for a bye at 144), until the job's next event.
            self._step_ts[line.job] = math.inf if ev.kind == "bye" else ev.ts
        d = ev.data
        if ev.kind == "register":
            line.state = "live"
            if isinstance(d.get("run_id"), str):
                self._switch_run(line, d["run_id"])
            at = d.get("resume_step")
            at = at if isinstance(at, int) else ev.step
            applied = d.get("applied_seq")
            applied = applied if isinstance(applied, int) else None

            def on_path(step: int | None, seq: int | None) -> bool:
                # Decided before the save, or applied by it (a rollback carried out, then
                # the loop saved at the restored step: decided after that step, in force).
                return ((step is not None and isinstance(at, int) and step <= at)
                        or (seq is not None and applied is not None and seq <= applied))

            if (d.get("resumed") == "resume" and isinstance(at, int)
                    and line.last_decision_step is not None
                    and not on_path(line.last_decision_step, line.last_decision_seq)):
                # Resumed from a save before it: what was decided after the save never was.
                line.last_decision = (f"resumed from the save at step {at}: the decisions "
                                      "after it set aside")
                line.last_decision_step, line.last_decision_seq = at, None
            if d.get("resumed") == "resume" and isinstance(at, int):
                kept = [(s, q) for s, q in zip(line.rollback_steps, line.rollback_seqs,
                                               strict=True) if on_path(s, q)]
                line.rollback_steps = [s for s, _ in kept]
                line.rollback_seqs = [q for _, q in kept]
        elif ev.kind == "bye":
            line.state = f"ended ({d.get('reason', 'bye')})"
        elif ev.kind == "lost":
            line.state = "lost"
        elif ev.kind == "rollback":
            line.rollback_steps.append(ev.step if ev.step is not None else 0)
            line.rollback_seqs.append(ev.seq)
            line.last_decision = (f"rollback {d.get('from_step')} -> {d.get('target')}: "
                                  f"{d.get('reason')}: {d.get('why')}")
            line.last_decision_step, line.last_decision_seq = ev.step, ev.seq
        elif ev.kind == "restore_failed" or (ev.kind == "withdrawn"
                                             and d.get("unheld_rollback") is not None):
            # Ordered, not done: the client restored nothing (or never got it).
            line.rollback_steps = line.rollback_steps[:-1]
            line.rollback_seqs = line.rollback_seqs[:-1]
            target = d.get("target", d.get("unheld_rollback"))
            line.last_decision = (f"rollback to {target} not restored: {d.get('why')}"
                                  if ev.kind == "restore_failed"
                                  else f"rollback to {target} withdrawn: {d.get('why')}")
            line.last_decision_step, line.last_decision_seq = ev.step, None
        elif ev.kind == "decision":
            acted = [f"{k} {knob_change(k, v)} by {v.get('policy')}: {v.get('reason')}"
                     for k, v in d.get("knobs", {}).items()
                     if v.get("commanded") is not None and v["commanded"] != v.get("current")]
            if acted:
                line.last_decision, line.last_decision_step = "; ".join(acted), ev.step
                line.last_decision_seq = None  # its command (if sent) follows
        elif ev.kind == "command":
            if line.last_decision_step == ev.step and line.last_decision_seq is None:
                line.last_decision_seq = ev.seq  # the command the decision shown was sent as
        elif ev.kind == "alert":
            line.alert = d.get("why")
        elif ev.kind == "manual" and d.get("ok"):
            line.last_decision = f"{d.get('action')} by {d.get('who')}: {d.get('reason')}"
            line.last_decision_step, line.last_decision_seq = ev.step, None
