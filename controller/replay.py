"""Offline replay: run any policy over a recorded trace and see what it would have decided.

A trace is one job's registration, reports and acks as the journal holds them.
:func:`trace_records` reads them from a journal, :func:`write_trace` writes them as JSON
lines (``trimtab export JOB``), and :func:`read_trace` reads either back. :func:`replay`
rebuilds the job's :class:`~trimtab.controller.state.JobState` from the registration,
feeds the reports in order and, after each, runs the engine and governor as the live
controller does.

The run itself is not simulated: losses and gradient norms are the recorded ones, and a
value the replayed policies command is assumed applied at the next report (from then on
it replaces the recorded value of that knob: an lr or weight-decay multiplier scales the
user's own value the report recorded, the knob model). A rollback is reported, not
rewound.

>>> from trimtab.protocol import wire
>>> from trimtab.controller.policy import Policy, Proposal
>>> class Halve(Policy):
...     name = "halve"
...     def propose(self, view):
...         return [Proposal("lr", factor=0.5, reason="demo")] if view.step == 20 else []
>>> facts = {"param_count": 1, "group_sizes": [1], "optimizer": "SGD", "dtype": "float32",
...          "device": "cpu"}
>>> trace = [TraceRecord("register", 0, None, {"job": "j", "run_id": "r", "facts": facts,
...                      "knobs": {"lr": 0.1}, "report_every": 10})]
>>> trace += [TraceRecord("report", s, s // 10, {"step": s, "window": 10, "loss_mean": 1.0,
...           "knobs": {"lr": 0.1}}) for s in (10, 20, 30)]
>>> result = replay(trace, [Halve()])
>>> result.lines()
['step 20: lr x1 -> x0.5 by halve: demo']
>>> [p.knobs["lr"] for p in result.points]
[0.1, 0.1, 0.05]
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from trimtab.controller.advance import advance
from trimtab.controller.budget import PolicyBudget
from trimtab.controller.config import ControllerConfig
from trimtab.controller.engine import Decision, Engine
from trimtab.controller.governor import Governor
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal, named_jobs, no_such_job
from trimtab.controller.limits import MULTIPLIERS
from trimtab.controller.policy import Policy
from trimtab.controller.scale import ScaleContext, derive_limits, explicit_fields
from trimtab.controller.state import JobState
from trimtab.protocol import wire

__all__ = [
    "TRACE_KINDS", "TraceError", "TraceRecord", "ReplayPoint", "ReplayResult",
    "trace_records", "write_trace", "read_trace", "parse_sets", "replay", "rerun", "plot", "paths",
]

#: The journal events a trace keeps: what the client sent (reports the controller did not
#: observe, ``stale`` and ``abandoned``, included: a re-run classifies them again), and what
#: people asked (``manual``: ``trimtab set`` and the like; a re-run asks it again).
TRACE_KINDS = ("register", "report", "ack", "stale", "abandoned", "manual")

_SQLITE_MAGIC = b"SQLite format 3\x00"


class TraceError(ValueError):
    """A trace cannot be read or replayed; says which file, line or job, and why."""


@dataclass(frozen=True)
class TraceRecord:
    """One line of a trace: a registration, report or ack, with the journal's fields."""

    kind: str
    step: int | None
    seq: int | None
    data: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "step": self.step, "seq": self.seq,
                           "data": self.data}, allow_nan=False)


def trace_records(journal: Journal, job: str) -> list[TraceRecord]:
    """The trace of ``job`` in ``journal``: its registrations, reports and acks, in order."""
    out = []
    for ev in journal.iter_events(job):
        if ev.kind in TRACE_KINDS:
            data = {"job": job, **ev.data} if ev.kind == "register" else ev.data
            out.append(TraceRecord(ev.kind, ev.step, ev.seq, data))
    if not out and not journal.has_job(job):
        raise TraceError(no_such_job(journal, job))
    if not any(r.kind == "register" for r in out):
        raise TraceError(f"journal {journal.path!r} has no registration of job {job!r}")
    return out


def write_trace(records: Iterable[TraceRecord], out: IO[str]) -> int:
    """Write ``records`` as JSON lines; returns how many."""
    n = 0
    for rec in records:
        out.write(rec.to_json() + "\n")
        n += 1
    return n


def read_trace(path: str | Path, job: str | None = None) -> list[TraceRecord]:
    """A trace from a JSONL export, or from a journal (``job`` needed if it holds several)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise TraceError(f"cannot read trace {str(path)!r}: {exc.strerror}") from None
    if head == _SQLITE_MAGIC:
        journal = Journal(str(path), readonly=True)
        try:
            if job is None:
                jobs = journal.jobs()
                if len(jobs) != 1:
                    raise TraceError(f"journal {str(path)!r} holds {len(jobs)} jobs "
                                     f"({named_jobs(jobs)}); pick one with --job")
                job = jobs[0]
            return trace_records(journal, job)
        finally:
            journal.close()
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            rec = TraceRecord(raw["kind"], raw.get("step"), raw.get("seq"), dict(raw["data"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(
                f"{path}:{i}: not a trace line ({type(exc).__name__}: {exc})") from None
        if rec.kind in TRACE_KINDS:
            records.append(rec)
    return records


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as a config dict; each value JSON if it parses, else a string.

    >>> parse_sets(["rise=0.1", "mode=fast", "knobs=[\\"lr\\"]"])
    {'rise': 0.1, 'mode': 'fast', 'knobs': ['lr']}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TraceError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


@dataclass(frozen=True)
class ReplayPoint:
    """One report as replayed: the values the optimizer would have used in the replay, and
    the ones it used in the recorded run."""

    step: int
    loss: float | None
    grad_norm: float | None
    knobs: dict[str, float | None]
    recorded: dict[str, float | None]


@dataclass
class ReplayResult:
    """What the replayed policies would have decided over a trace."""

    job: str
    points: list[ReplayPoint] = field(default_factory=list)
    #: Every decision with something to show: a change, a rollback, a policy disabled, or
    #: a wish a hold or the governor kept from changing (shown with ``lines(holds=True)``).
    decisions: list[Decision] = field(default_factory=list)

    @property
    def acted(self) -> list[Decision]:
        """The decisions that changed a knob or rolled back."""
        return [d for d in self.decisions if d.commands or d.rollback is not None]

    def summary(self) -> str:
        """``N decisions``, and the holds and policies disabled besides, if any."""
        held = sum(1 for d in self.decisions for k in _held(d))
        errors = sum(len(d.errors) for d in self.decisions)
        extra = "".join(f", {n} {what}" for n, what in ((held, "held"),
                                                        (errors, "policies disabled")) if n)
        return f"{len(self.acted)} decisions{extra}"

    def lines(self, *, holds: bool = False) -> list[str]:
        """One line per decision: step, knob, old -> new, reason, limits; a rollback's
        first. With ``holds``, also the wishes the governor or a hold kept from changing."""
        out = []
        for d in self.decisions:
            if d.rollback is not None:
                out.append(f"step {d.step}: {d.rollback.describe()} (not rewound in a replay)")
            for knob in wire.KNOBS:
                kd = d.knobs.get(knob)
                if kd is None:
                    continue
                if knob in d.would_command:
                    out.append(f"step {d.step}: {kd.describe()}")
                elif holds and knob in _held(d):
                    x = "x" if knob in MULTIPLIERS else ""  # as describe() shows them
                    held = "off" if kd.current is None else f"{x}{kd.current:.6g}"
                    wanted = "" if kd.target is None else f", wanted {x}{kd.target:.6g}"
                    limits = f" [limited: {', '.join(kd.limits)}]" if kd.limits else ""
                    out.append(f"step {d.step}: {knob} held at {held}{wanted} by "
                               f"{kd.policy}: {kd.reason}{limits}")
            for policy, error in d.errors:
                out.append(f"step {d.step}: policy {policy} disabled: {error}")
        return out


def _held(d: Decision) -> list[str]:
    """The knobs a policy wished to change in ``d`` that a hold or the governor kept."""
    return [k for k, kd in d.knobs.items() if kd.policy is not None and k not in d.would_command]


def replay(
    trace: Sequence[TraceRecord], policies: Sequence[Policy],
    config: ControllerConfig | None = None,
) -> ReplayResult:
    """Run ``policies`` over ``trace`` through the engine and governor of ``config``."""
    config = config or ControllerConfig()
    regs = [r for r in trace if r.kind == "register"]
    reports = [r for r in trace if r.kind == "report"]
    if not regs:
        raise TraceError("the trace has no registration to rebuild the job from")
    state = _rebuild(regs[0], reports, config)
    # The job's own limits, derived from its scale facts, as the live controller has them.
    limits = derive_limits(ScaleContext.from_facts(state.facts), config.governor,
                           explicit_fields(config.governor), state.registered,
                           state.lr_spread).config
    # Under the same time budget as live: a policy too slow for it is disabled here too
    # (inline, a slow one would make decisions the live controller never made).
    budget = (PolicyBudget(config.policy_budget_ms / 1000.0)
              if config.policy_budget_ms > 0 else None)
    engine = Engine(policies, Governor(limits), rollback=config.rollback, budget=budget)
    try:
        return _replay(trace, state, engine)
    finally:
        if budget is not None:
            budget.close()


def _replay(trace: Sequence[TraceRecord], state: JobState, engine: Engine) -> ReplayResult:
    result = ReplayResult(state.job)
    # What the replay commanded (controlled values), in force from the next report.
    applied: dict[str, float] = {k: v for k, v in state.knobs.set().items()
                                 if k in ("lr", "weight_decay")}
    for rec in trace:
        if rec.kind == "ack":
            state.on_applied(state.command_seq, state.knobs.model_copy(update=applied))
            continue
        if rec.kind != "report":
            continue
        recorded = dict(rec.data.get("knobs", {}))
        try:
            report = wire.Report.model_validate(_replayed(rec, state, applied))
        except ValueError as exc:
            raise TraceError(f"report at step {rec.step} is not a valid report: {exc}") from None
        # The report says every command so far is applied (applied_seq): none is pending,
        # so each report is decided in full, as the live controller does once acks came.
        decision = advance(state, report, engine).decision
        if decision is not None and (decision.commands or decision.rollback is not None
                                     or decision.errors or _held(decision)):
            result.decisions.append(decision)
        if decision is not None and decision.commands:
            applied.update(decision.commands)
        if decision is not None and decision.mark_stable is not None:
            state.rollback.note_marked(decision.mark_stable)  # assumed applied, like knobs
        result.points.append(ReplayPoint(
            report.step, _num(report.loss_mean), _num(report.grad_norm_mean),
            report.knobs.model_dump(), recorded))
    return result


def rerun(trace: Sequence[TraceRecord], config: ControllerConfig) -> list[wire.Command]:
    """The commands a fresh controller with ``config`` sends for ``trace``: every message the
    client sent, in the journal's order, taken by the live service's own code
    (:class:`~trimtab.controller.handler.Controller`: :func:`~trimtab.controller.advance.advance`
    for reports, :func:`~trimtab.controller.advance.settle_ack` for acks), with a scratch
    journal. With the live run's config these are the live run's commands: nothing else
    than the messages (a person's requests among them) and the config goes into a
    decision.

    Unlike :func:`replay`, the run's values are the recorded ones throughout: it re-runs
    the decisions the run actually met (and a changed policy's first different command is
    where its run would have parted from the recorded one).
    """
    regs = [r for r in trace if r.kind == "register"]
    if not regs:
        raise TraceError("the trace has no registration to rebuild the job from")
    job = regs[0].data["job"]
    peer, sent = b"rerun", []
    with tempfile.TemporaryDirectory() as scratch:
        journal = Journal(str(Path(scratch) / "rerun.db"))
        controller = Controller(config, journal, registry=CollectorRegistry())
        try:
            for rec in trace:
                try:
                    msg = _message(job, rec)
                except ValueError as exc:
                    raise TraceError(f"{rec.kind} at step {rec.step} is not a valid message: "
                                     f"{exc}") from None
                for _, frame in controller.handle(peer, wire.encode(msg)):
                    out = wire.decode(frame)
                    if isinstance(out, wire.Command):
                        sent.append(out)
        finally:
            controller.close()  # closes the scratch journal too
    return sent


def _message(job: str, rec: TraceRecord) -> wire.Message:
    """The client's message a trace record holds."""
    data = {k: v for k, v in rec.data.items() if k not in ("resumed", "key", "branch_seq")}
    if rec.kind == "register":
        return wire.Register.model_validate({**data, "job": job, "step": rec.step or 0})
    if rec.kind == "ack":
        return wire.Ack.model_validate({**data, "job": job, "seq": rec.seq, "step": rec.step})
    if rec.kind == "manual":
        return wire.Operate.model_validate({
            "job": job, **{k: data[k] for k in ("action", "who", "reason", "knobs", "scale",
                                                "to_step") if data.get(k) is not None}})
    return wire.Report.model_validate({**data, "job": job})


def _rebuild(reg: TraceRecord, reports: list[TraceRecord], config: ControllerConfig) -> JobState:
    d = reg.data
    # Journals written before report_every was recorded: a report's window is the same.
    every = d.get("report_every") or (reports[0].data.get("window") if reports else None) or 1
    try:
        return JobState.from_register(wire.Register(
            job=d["job"], run_id=d["run_id"], facts=wire.ScaleFacts.model_validate(d["facts"]),
            report_every=int(every), knobs=_knobs(d["knobs"]),
            base=_knobs(d.get("base") or d["knobs"]), step=int(reg.step or 0),
            applied_seq=int(d.get("applied_seq", 0)), keep=d.get("keep"),
            nominal_lr=d.get("nominal_lr"), origin=d.get("origin"),
            loss_trend=d.get("loss_trend"), warm_start=d.get("warm_start"),
            lr_spread=d.get("lr_spread")), config.signals)
    except (KeyError, ValueError) as exc:
        raise TraceError(f"the registration cannot rebuild a job: {type(exc).__name__}: "
                         f"{exc}") from None


def _knobs(raw: dict[str, Any]) -> wire.Knobs:
    return wire.Knobs.model_validate({k: v for k, v in raw.items() if k in wire.KNOBS})


def _replayed(rec: TraceRecord, state: JobState, applied: dict[str, float]) -> dict[str, Any]:
    """A recorded report with the replay's knobs in force: its multipliers on the user's
    own values the report recorded, its momentum and clip."""
    recorded = _knobs(rec.data.get("knobs", {}))
    base = _knobs(rec.data.get("base") or recorded.model_dump())
    scale = {"lr": applied.get("lr", 1.0), "weight_decay": applied.get("weight_decay", 1.0)}
    knobs = {
        "lr": None if base.lr is None else base.lr * scale["lr"],
        "weight_decay": (None if base.weight_decay is None
                         else base.weight_decay * scale["weight_decay"]),
        "momentum": applied.get("momentum", recorded.momentum),
        "clip": applied.get("clip", recorded.clip),
    }
    return {"seq": rec.seq, **rec.data, "job": state.job, "knobs": knobs,
            "base": base.model_dump(), "scale": scale, "applied_seq": state.command_seq}


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def paths(steps: list[int]) -> tuple[list[int], list[list[int]]]:
    """The lines to draw through the points at ``steps`` (their indices): a rollback sends
    the steps back, and one line must not join the path it left to the one it returned to.
    A point is abandoned when a later one is at its step or before (the recorded run went
    back over it). Returns the path kept, the points no later one went back over (their
    steps rise), and each abandoned stretch, from the point it left the path at.

    >>> paths([10, 20, 30, 40, 30, 40, 50])
    ([0, 1, 4, 5, 6], [[1, 2, 3]])
    """
    later = math.inf
    abandoned = [False] * len(steps)
    for i in range(len(steps) - 1, -1, -1):
        abandoned[i] = later <= steps[i]
        later = min(later, steps[i])
    kept = [i for i, gone in enumerate(abandoned) if not gone]
    stretches: list[list[int]] = []
    for i, gone in enumerate(abandoned):
        if not gone:
            continue
        if stretches and stretches[-1][-1] == i - 1 and steps[i] > steps[i - 1]:
            stretches[-1].append(i)
        else:  # from the point before it, where it left the path
            stretches.append([i - 1, i] if i and steps[i - 1] < steps[i] else [i])
    return kept, stretches


def plot(result: ReplayResult, path: str | Path) -> None:
    """Draw loss and gradient norm, the knobs (replayed, and recorded dashed) and the
    decisions over steps into ``path`` (needs matplotlib: ``pip install 'trimtab[plots]'``).
    The path a recorded rollback left is drawn faint, apart from the one it returned to."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraceError("--plot needs matplotlib: pip install 'trimtab[plots]'") from None
    points = result.points
    steps = [p.step for p in points]
    kept, stretches = paths(steps)
    knobs = [k for k in wire.KNOBS if any(p.knobs.get(k) is not None for p in points)]

    def draw(draw_fn: Any, values: list[Any], label: str, **kw: Any) -> None:
        draw_fn([steps[i] for i in kept], [values[i] for i in kept], label=label, **kw)
        for line in stretches:
            draw_fn([steps[i] for i in line], [values[i] for i in line],
                    **{**kw, "alpha": 0.3, "linewidth": 0.8})

    fig, axes = plt.subplots(1 + max(len(knobs), 1), 1, sharex=True,
                             figsize=(9, 2.2 * (1 + max(len(knobs), 1))), squeeze=False)
    ax = axes[0][0]
    draw(ax.plot, [p.loss for p in points], "loss", color="C0")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    draw(twin.plot, [p.grad_norm for p in points], "grad norm", color="C1", alpha=0.6)
    twin.set_ylabel("grad norm")
    ax.set_title(f"replay of {result.job}: {len(result.acted)} decisions")
    for row, knob in enumerate(knobs, 1):
        kax = axes[row][0]
        draw(kax.step, [p.knobs.get(knob) for p in points], f"{knob} (replay)",
             where="post", color="C2")
        draw(kax.step, [p.recorded.get(knob) for p in points], f"{knob} (recorded)",
             where="post", color="C7", linestyle="--")
        kax.set_ylabel(knob)
        if knob == "lr":
            kax.set_yscale("log")
        kax.legend(loc="best", fontsize="small")
    for d in result.acted:
        color = "k" if d.rollback is not None else "C3"
        for (a,) in axes:
            a.axvline(d.step, color=color, alpha=0.4, linewidth=1)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
