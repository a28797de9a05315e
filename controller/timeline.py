"""A job's journal as rows a person reads (``trimtab decisions``).

The journal records everything, for machines: every report, every ack of every resend, a
stable mark at the checkpoint's step. A person asks what changed, when and why. So
:class:`Timeline` turns events into :class:`Row` s: one per knob a decision changed (from
-> to, by which policy, why), per command, per rollback and restore, per stable mark (at
the step the mark was made, not the checkpoint's: the steps never seem to go back), per
alert, and per shadow decision (marked as such: nothing was sent). An ack is shown only
when it says something its command did not: an error, or values other than the ones
commanded; an ack repeating an already acknowledged command is never shown.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from trimtab.controller.journal import EVENT_KINDS, Event
from trimtab.controller.limits import MULTIPLIERS

__all__ = ["DEFAULT_KINDS", "Row", "Timeline", "knob_text", "parse_kinds", "parse_since"]

#: What ``trimtab decisions`` shows unless ``--kind`` says otherwise: what acted, what was
#: sent and what came of it (reports and proposals are many; ``--kind`` names them).
DEFAULT_KINDS = frozenset({
    "decision", "shadow", "command", "ack", "rollback", "restored", "restore_failed",
    "stable", "alert",
    "policy_error", "advice", "register", "bye", "lost", "manual", "validation",
    "data_moved", "withdrawn",
})

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
#: A command's reason that describes a knob change (:meth:`KnobDecision.describe
#: <trimtab.controller.decision.KnobDecision.describe>`): the decision's rows show it.
_KNOB_LINE = re.compile(r"^(lr|momentum|weight_decay|clip) \S+ -> \S+ by ")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_kinds(text: str) -> frozenset[str]:
    """``--kind``: ``all``, or event kinds separated by commas.

    >>> sorted(parse_kinds("proposal,report"))
    ['proposal', 'report']
    >>> parse_kinds("all") == frozenset(EVENT_KINDS)
    True
    """
    names = [k.strip() for k in text.split(",") if k.strip()]
    if names == ["all"]:
        return frozenset(EVENT_KINDS)
    unknown = [k for k in names if k not in EVENT_KINDS]
    if unknown or not names:
        raise ValueError(f"--kind {text!r}: {', '.join(map(repr, unknown)) or 'nothing'} is "
                         f"not an event kind; allowed: all, or a comma-separated list of "
                         f"{', '.join(EVENT_KINDS)}")
    return frozenset(names)


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO
    time (local unless it names its zone); returns a Unix time.

    >>> parse_since("10m", now=1000.0)
    400.0
    """
    now = time.time() if now is None else now
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: not a duration or a time; allowed: a number "
                         "with s, m, h or d (10m, 2h, 1d), or an ISO time "
                         "(2026-01-31T14:00:00)") from None


@dataclass(frozen=True)
class Row:
    """One line of ``trimtab decisions``."""

    id: int
    ts: float
    job: str
    step: int | None
    kind: str
    policy: str = ""
    knob: str = ""
    change: str = ""
    why: str = ""
    seq: int | None = None

    @property
    def when(self) -> str:
        """Local time, ISO, to the second."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.ts))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "time": self.when}, allow_nan=False)


def knob_text(knob: str, value: float | None) -> str:
    """A knob's value as trimtab holds it: lr and weight decay as multipliers (``x0.5``)."""
    if value is None:
        return "off" if knob == "clip" else "none"
    return f"{'x' if knob in MULTIPLIERS else ''}{value:.6g}"


def knob_change(knob: str, record: dict[str, Any]) -> str:
    """A journaled decision's change of one knob, from the value the run was using (a
    rollback's ``in_force``; else ``current``) to the one commanded: ``x1 -> x0.5``."""
    before = record.get("in_force", record.get("current"))
    return f"{knob_text(knob, before)} -> {knob_text(knob, record.get('commanded'))}"


def _num(value: Any, spec: str = ".4g") -> str:
    """A number a report or event may leave out or send as null (a window with no finite
    loss: ``loss_mean`` null), as text: ``none`` then, never a format error.

    >>> _num(0.123456), _num(None), _num(2.0, ".1f")
    ('0.1235', 'none', '2.0')
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "none" if value is None else str(value)
    return format(value, spec)


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _command_what(data: dict[str, Any]) -> str:
    what = [f"{k} {knob_text(k, v)}" for k, v in data.get("scale", {}).items()]
    what += [f"{k} {knob_text(k, v)}" for k, v in data.get("knobs", {}).items()
             if k not in data.get("scale", {})]
    if data.get("mark_stable") is not None:
        what.append(f"mark {data['mark_stable']} stable")
    if data.get("rollback_to") is not None:
        what.append(f"roll back to {data['rollback_to']}")
    if data.get("supersedes") is not None:
        what.append(f"replaces #{data['supersedes']}")
    if data.get("schedules"):
        what.append(" and ".join(s.get("knob", "?") for s in data["schedules"])
                    + " live schedule")
    if data.get("stop_advice") is not None:
        what.append("stop advised")
    if not what and data.get("schedules") == []:
        what.append("live schedules stopped")
    return ", ".join(what) or "nothing"


class Timeline:
    """Events in, rows out, in journal order; remembers what each job's rows depend on (its
    commands, the acks seen, the step the job was last heard at). Feed it every event, of
    every kind and time, so that its memory is right; :meth:`feed` returns only the rows
    of the ``kinds`` asked for, at or after ``since``."""

    def __init__(self, kinds: frozenset[str] = DEFAULT_KINDS, since: float | None = None,
                 every_ack: bool = False):
        #: ``every_ack``: a row for every ack (asked for by name), not only for those that
        #: differ from their command or carry an error (the default view's).
        self.kinds, self.since, self.every_ack = kinds, since, every_ack
        self._commands: dict[tuple[str, int], dict[str, Any]] = {}
        self._acked: set[tuple[str, int]] = set()
        self._at: dict[str, int | None] = {}

    def feed(self, ev: Event) -> list[Row]:
        """The rows ``ev`` makes (none for most events)."""
        at = self._at.get(ev.job)
        if ev.kind not in ("stable", "checkpoint"):  # those carry the checkpoint's step
            self._at[ev.job] = ev.step
        rows = self._rows(ev, at)  # always: the memory of commands and acks must be kept
        if ev.kind not in self.kinds or (self.since is not None and ev.ts < self.since):
            return []
        return rows

    def _rows(self, ev: Event, at: int | None) -> list[Row]:
        d, make = ev.data, self._maker(ev)
        if ev.kind in ("decision", "shadow"):
            return self._decision(ev, make)
        if ev.kind == "command":
            self._commands[(ev.job, ev.seq)] = d
            reasons = d.get("reasons") or []
            if "decision" in self.kinds:  # its knob changes have rows of their own
                reasons = [r for r in reasons if not _KNOB_LINE.match(r)]
            return [make(change=_command_what(d), why="; ".join(reasons))]
        if ev.kind == "ack":
            return self._ack(ev, make)
        if ev.kind == "rollback":
            return [make(policy=d.get("policy", ""), change=f"step {d.get('from_step')} -> "
                         f"{d.get('target')}", why=f"{d.get('reason')}: {d.get('why')} "
                         f"(level {d.get('level')})")]
        if ev.kind == "restored":
            return [make(change=f"step {d.get('from_step')} -> {d.get('restored_step')}",
                         why=f"restored: {d.get('steps_lost')} steps lost ({d.get('reason')}, "
                             f"level {d.get('level')})")]
        if ev.kind == "restore_failed":
            return [make(change=f"step {d.get('from_step')} -> {d.get('target')}",
                         why=f"not restored: {d.get('why')} ({d.get('reason')}, level "
                             f"{d.get('level')}; checkpoint {d.get('target')} is not "
                             "targeted again)")]
        if ev.kind == "stable":
            return [Row(ev.id, ev.ts, ev.job, at if at is not None else ev.step, ev.kind,
                        change=f"checkpoint {d.get('step')}", seq=ev.seq,
                        why=f"checkpoint {d.get('step')} marked stable ({d.get('source')})")]
        if ev.kind == "alert":
            return [make(why=f"rollback alert: {d.get('why')}")]
        if ev.kind == "data_moved":
            return [make(why=f"climb verdicts off: {d.get('why')}")]
        if ev.kind == "withdrawn":
            return [make(change=f"command {ev.seq}",
                         why=f"withdrawn: {d.get('why')}")]
        if ev.kind == "validation":
            ema = "" if d.get("ema") is None else f", weight average {d.get('ema'):.6g}"
            when = ("sent after the run ended (an evaluation after training)"
                    if d.get("after_end") else "sent as the run ended (after its last report)")
            return [make(why=f"validation {d.get('value'):.6g}{ema}, {when}")]
        if ev.kind == "manual":
            return self._manual(make, d)
        if ev.kind == "proposal":
            return [self._proposal(make, d)]
        if ev.kind == "policy_error":
            return [make(policy=d.get("policy", ""), why=f"disabled: {d.get('error')}"
                         + (" (shadow)" if d.get("shadow") else ""))]
        if ev.kind == "advice":
            return [make(change=str(d.get("advice")), why=str(d.get("reason")))]
        if ev.kind == "report":
            return [self._report(make, d)]
        if ev.kind == "register":
            key = f", key {d['key']}" if d.get("key") else ""
            replaced = (f"; this process registered as run {d['replaces']} when it attached"
                        " and took no step as it" if d.get("replaces") else "")
            if isinstance(d.get("phase_ended"), dict):
                replaced += (f"; {d['phase_ended'].get('policy')}'s phase ended in place, "
                             "nothing found: the client dropped its sweep while it heard no "
                             "controller, and went back to the lr in force before it")
            return [make(why=f"registered ({d.get('resumed', 'new')}, run {d.get('run_id')}"
                             f"{key}){replaced}")]
        if ev.kind == "bye":
            return [make(why=f"ended: {d.get('reason')}")]
        if ev.kind == "lost":
            if d.get("unheard"):
                return [make(why=f"lost: not heard from since the controller started "
                                 f"{_num(d.get('silent_s'), '.1f')} s before")]
            return [make(why=f"lost: silent for {_num(d.get('silent_s'), '.1f')} s")]
        return [make(why=json.dumps(d, separators=(",", ":"))[:200])]

    @staticmethod
    def _manual(make, d: dict[str, Any]) -> list[Row]:
        """A person's request: one row per knob a ``set`` asked for, else one row."""
        # --who is the person's word; the key (CURVE) is what the controller checked.
        key = f" (key {d['key']})" if d.get("key") else ""
        who = f"{d.get('who')}{key}: {d.get('reason')}"
        outcome = "" if d.get("ok") else f" (refused: {d.get('detail')})"
        if d.get("action") == "set" and d.get("ok") and d.get("asked"):
            return [make(policy="manual", knob=k, change=f"set {knob_text(k, v)}",
                         why=who) for k, v in d["asked"].items()]
        change = str(d.get("action"))
        if d.get("action") == "rollback" and d.get("to_step") is not None:
            change += f" to {d['to_step']}"
        if d.get("action") == "set":
            asked = {**d.get("knobs", {}), **{k: f"x{v:g}" for k, v in d.get("scale", {}).items()}}
            change += " " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in asked.items())
        return [make(policy="manual", change=change, why=who + outcome)]

    @staticmethod
    def _report(make, d: dict[str, Any]) -> Row:
        """A report: its mean loss (``none finite``: every loss of its window was NaN or
        infinite, or none was handed over), its non-finite values, gradient norm and lr."""
        loss = d.get("loss_mean")
        bad = [f"{d[k]} non-finite {what}" for k, what in (("nonfinite_losses", "losses"),
                                                           ("nonfinite_grads", "gradients"))
               if d.get(k)]
        why = [*bad, f"grad norm {_num(d.get('grad_norm_mean'))}",
               f"lr {_num((d.get('knobs') or {}).get('lr'))}"]
        return make(change="loss none finite" if loss is None else f"loss {_num(loss)}",
                    why=", ".join(why))

    @staticmethod
    def _maker(ev: Event):
        def make(**kw: Any) -> Row:
            return Row(ev.id, ev.ts, ev.job, ev.step, ev.kind, seq=ev.seq, **kw)
        return make

    @staticmethod
    def _proposal(make, d: dict[str, Any]) -> Row:
        knob = d.get("knob") or ""
        if d.get("hold"):
            change = "hold"
        elif d.get("rollback"):
            change = f"roll back ({d['rollback']})"
        elif d.get("factor") is not None:
            change = f"x{d['factor']:.6g}"
        elif d.get("value") is not None:
            change = f"to {knob_text(knob, d['value'])}"
        else:
            change = str(d.get("advice") or "")
        return make(policy=d.get("policy", ""), knob=knob, change=change, why=d.get("reason", ""))

    @staticmethod
    def _decision(ev: Event, make) -> list[Row]:
        """One row per knob the decision changed; a shadow decision's rows say so (and,
        when no knob would have changed, show what its policies proposed)."""
        shadow = ev.kind == "shadow"
        mark = " (shadow)" if shadow else ""
        rows = []
        for knob, k in ev.data.get("knobs", {}).items():
            if k.get("commanded") is None or _close(k["commanded"], k.get("current")):
                continue
            limits = f" [limited: {', '.join(k['limits'])}]" if k.get("limits") else ""
            rows.append(make(policy=f"{k.get('policy') or '?'}{mark}", knob=knob,
                             change=knob_change(knob, k),
                             why=f"{k.get('reason', '')}{limits}"))
        if shadow and not rows:
            for p in ev.data.get("proposals", []):
                row = Timeline._proposal(make, p)
                rows.append(Row(**{**asdict(row), "policy": f"{row.policy}{mark}",
                                   "why": f"would propose: {row.why}"}))
        return rows

    def _ack(self, ev: Event, make) -> list[Row]:
        key = (ev.job, ev.seq)
        if ev.seq is None or key in self._acked:
            return []  # a command acknowledged again (resent, or a report carrying it)
        self._acked.add(key)
        d = ev.data
        if d.get("error"):
            return [make(change=f"#{ev.seq} error", why=str(d["error"]))]
        cmd = self._commands.get(key)
        if cmd is None:
            return [make(change=f"#{ev.seq} applied", why="")] if self.every_ack else []
        live = set(cmd.get("live") or ())  # on a live schedule: its value where it applied
        off = [f"{k} {knob_text(k, v)} asked, {knob_text(k, d.get('scale', {}).get(k))} applied"
               for k, v in cmd.get("scale", {}).items()
               if k not in live and not _close(v, d.get("scale", {}).get(k))]
        off += [f"{k} {knob_text(k, v)} asked, {knob_text(k, d.get('knobs', {}).get(k))} applied"
                for k, v in cmd.get("knobs", {}).items()
                if k not in cmd.get("scale", {}) and not _close(v, d.get("knobs", {}).get(k))]
        if cmd.get("rollback_to") is not None and d.get("restored_step") != cmd["rollback_to"]:
            off.append(f"rollback to {cmd['rollback_to']} asked, "
                       f"restored {d.get('restored_step')}")
        if off:
            return [make(change=f"#{ev.seq} differs", why="; ".join(off))]
        if not self.every_ack:
            return []
        applied = [f"{k} {knob_text(k, d.get('scale', {}).get(k))}"
                   + (" (its live schedule's value at the step it applied)" if k in live else "")
                   for k in cmd.get("scale", {})]
        applied += [f"{k} {knob_text(k, d.get('knobs', {}).get(k))}"
                    for k in cmd.get("knobs", {}) if k not in cmd.get("scale", {})]
        if d.get("restored_step") is not None:
            applied.append(f"restored step {d['restored_step']}")
        return [make(change=f"#{ev.seq} applied", why="as asked" + (
            f": {', '.join(applied)}" if applied else ""))]
