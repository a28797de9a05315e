"""Prometheus metrics for the controller (the adapter; the engine never imports this).

Controller-wide metrics are ordinary prometheus-client metrics on an injected registry.
Per-job series come from :class:`JobCollector`, which reads the live job table at scrape
time, so a job's series end when the job does. Names follow Prometheus' conventions:
a ``trimtab_`` prefix, base units (seconds), ``_total`` on counters, and label values from
bounded sets (knobs, limits, policies, causes) beside the ``job`` label.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> m = ControllerMetrics(registry=CollectorRegistry(), jobs=lambda: [])
>>> m.message_errors.labels(code="malformed").inc()
>>> b"trimtab_message_errors_total" in generate_latest(m.registry)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trimtab.controller.decision import GOVERNOR
from trimtab.controller.governor import LIMIT_NAMES
from trimtab.controller.health import CAUSES
from trimtab.controller.limits import MULTIPLIERS
from trimtab.protocol.wire import ERROR_CODES, KNOBS, OPERATOR_ACTIONS

if TYPE_CHECKING:
    from trimtab.controller.engine import Decision
    from trimtab.controller.state import JobState

__all__ = ["ControllerMetrics", "JobCollector"]

#: ``(name, help, extra labels)`` of every per-job family; ``_total`` is added to counters.
_GAUGES = {
    "trimtab_job_live": (
        "1 while the job is live; 0 during the grace period after it ended (said bye or was "
        "lost), when its series stay so that a scrape sees how it ended "
        "(the metrics_grace_s setting).",
        (),
    ),
    "trimtab_job_lost": (
        "1 during the grace period after the controller marked the job lost (silent for "
        "job_timeout_s: killed, hung or cut off), 0 while it is live or after it said bye.",
        (),
    ),
    "trimtab_job_step": ("Optimizer steps the job has taken.", ()),
    "trimtab_job_last_seen_age_seconds": ("Seconds since the job's last message.", ()),
    "trimtab_job_last_report_age_seconds": (
        "Seconds since the job's last report (or its registration): its training's progress. "
        "Heartbeats keep last_seen fresh while a loop is stuck (a hung collective); this "
        "grows.",
        (),
    ),
    "trimtab_job_healthy": (
        "1 when the latest report passed the divergence checks (no persistent "
        "non-finite values -- a short burst the guard skipped is healthy --, no spike or "
        "climb; spikes and climbs are judged after the health warm-up, 20 reports by "
        "default), else 0.",
        (),
    ),
    "trimtab_job_loss": ("Mean training loss over the last report's window.", ()),
    "trimtab_job_loss_ema": ("Exponential moving average of the reported loss.", ()),
    "trimtab_job_grad_norm": ("Mean global gradient norm (before clipping), last report.", ()),
    "trimtab_job_grad_norm_max": ("Largest global gradient norm in the last report.", ()),
    "trimtab_job_grad_norm_std": (
        "Standard deviation of the global gradient norm over the last report's window.",
        (),
    ),
    "trimtab_job_update_ratio": ("Update-to-weight ratio ||dtheta||/||theta||, last report.", ()),
    "trimtab_job_update_alignment": (
        "cos(g, -dtheta): a window's first gradient against the update before it, last report "
        "(the hypergradient's sign: clearly positive when the LR is too low).",
        (),
    ),
    "trimtab_job_step_time_seconds": ("Mean training step time, last report.", ()),
    "trimtab_job_validation": (
        "The newest validation result the job reported (guard.report_validation; lower is "
        "better).", ()),
    "trimtab_job_validation_ema": (
        "The same validation measured on the job's weight average (report_validation's ema).",
        ()),
    "trimtab_job_lr_window": (
        "The lowest (bound=min) and highest (bound=max) lr the optimizer was given over the "
        "last report's window (param group 0's: the user's own times trimtab's multiplier).",
        ("bound",),
    ),
    "trimtab_job_replica_spread": (
        "How far apart the ranks' parameter norms (their sum) stood at the last report's "
        "end, (max - min) / max(|max|, |min|): 0 while DDP replicas are identical (no series "
        "for one process or a sharded model); the rollback's reason says when their bytes "
        "differ.",
        (),
    ),
    "trimtab_job_loss_slope": (
        "Least-squares slope of the loss per optimizer step over the slope window.",
        (),
    ),
    "trimtab_job_loss_slope_t": ("t-statistic of the loss slope (slope / standard error).", ()),
    "trimtab_job_zscore": ("z-score of the latest value against its EW history.", ("signal",)),
    "trimtab_knob_value": (
        "The value the optimizer used at the last reported or acknowledged step (for lr and "
        "weight_decay: the user's own value times trimtab's multiplier).",
        ("knob",),
    ),
    "trimtab_knob_base": (
        "The user's own value (what the loop or its scheduler set) at that step.",
        ("knob",),
    ),
    "trimtab_knob_multiplier": (
        "trimtab's multiplier on the user's lr or weight decay (1: the user's schedule as is).",
        ("knob",),
    ),
    "trimtab_knob_bound": (
        "The governor's bound on what it steers for this job: the multiplier for lr and "
        "weight_decay, the value for momentum and clip.",
        ("knob", "side"),
    ),
    "trimtab_rollback_alert": (
        "1 when the job's rollback budget is exhausted (no more rollbacks, LR cuts only).",
        (),
    ),
    "trimtab_checkpoints_stable_step": ("Step of the newest checkpoint marked stable.", ()),
    "trimtab_job_paused": (
        "1 while a person has paused the job's policies (trimtab pause; the safety net acts).",
        (),
    ),
}
_COUNTERS = {
    "trimtab_job_reports": ("Reports received from the job.", ()),
    "trimtab_job_dropped_reports": ("Reports the job's client dropped (queue full).", ()),
    "trimtab_job_nonfinite": ("Non-finite losses or gradient steps reported.", ("kind",)),
    "trimtab_decisions": (
        "Knob changes commanded, by policy, knob and direction.",
        ("policy", "knob", "direction"),
    ),
    "trimtab_shadow_decisions": (
        "Knob changes shadow policies would have commanded (never "
        "sent), by policy, knob and direction.",
        ("policy", "knob", "direction"),
    ),
    "trimtab_governor_clamps": (
        "Proposals the governor cut or held back, by knob and the limit that acted.",
        ("knob", "limit"),
    ),
    "trimtab_knob_reversals": (
        "Commanded knob changes that reversed the knob's previous commanded direction.",
        ("knob",),
    ),
    "trimtab_policy_errors": (
        "Policies disabled for a job after raising or misbehaving.",
        ("policy",),
    ),
    "trimtab_rollbacks": ("Rollbacks ordered, by cause.", ("reason",)),
    "trimtab_rollback_steps_lost": ("Optimizer steps undone by acknowledged rollbacks.", ()),
    "trimtab_rollback_failures": ("Rollbacks ordered that the client could not restore "
                                 "(nothing restored; that checkpoint is not targeted again).",
                                 ()),
    "trimtab_checkpoints": ("Checkpoints taken, as listed in the job's reports.", ()),
    "trimtab_checkpoints_marked_stable": ("Checkpoints marked stable.", ()),
    "trimtab_operator_actions": (
        "What people did to the job (trimtab set, pause, resume, rollback), carried out.",
        ("action",),
    ),
}

#: Why a peer is refused at the socket: a failed CURVE handshake, or a key not allowed.
REJECT_REASONS = ("handshake", "unknown_key")

#: Per-job family names, as scraped (counters with ``_total``).
JOB_METRICS = tuple(_GAUGES) + tuple(f"{n}_total" for n in _COUNTERS)


class JobCollector(Collector):
    """Per-job series over the live job table: signals, knobs and their bounds, decisions,
    governor clamps, policy errors, checkpoints and rollbacks.

    ``ended()`` gives the jobs that ended within the grace period and how (``"bye"`` or
    ``"lost"``): their series stay, with ``trimtab_job_live`` 0 and ``trimtab_job_lost``
    1 for a lost one; ``age(job)`` gives the seconds since a job was last heard
    from (None: unknown);
    ``bounds(job, knob, initial)`` the job governor's ``(lo, hi)`` for a knob (infinite ones are
    left out).
    """

    def __init__(
        self,
        jobs: Callable[[], Iterable[JobState]],
        *,
        age: Callable[[str], float | None] | None = None,
        report_age: Callable[[str], float | None] | None = None,
        bounds: Callable[[str, str, float | None], tuple[float, float]] | None = None,
        ended: Callable[[], Iterable[tuple[JobState, str]]] | None = None,
        policies: Callable[[str], tuple[Iterable[str], Iterable[str]]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._ended = ended
        self._policies = policies
        self._age = age
        self._report_age = report_age
        self._bounds = bounds
        #: job -> {(knob, limit): count}, kept by :meth:`ControllerMetrics.note_decision`.
        self.clamps: dict[str, dict[tuple[str, str], int]] = {}
        #: job -> {knob: reversals}, and job -> {knob: last commanded direction (+1/-1)}.
        self.reversals: dict[str, dict[str, int]] = {}
        self.directions: dict[str, dict[str, int]] = {}

    def collect(self) -> Iterator[Metric]:  # the Collector protocol's one method
        fam: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, (doc, labels) in _GAUGES.items():
            fam[name] = GaugeMetricFamily(name, doc, labels=["job", *labels])
        for name, (doc, labels) in _COUNTERS.items():
            fam[name] = CounterMetricFamily(name, doc, labels=["job", *labels])

        def put(name: str, labels: list[str], value: float | None) -> None:
            if value is not None and math.isfinite(value):
                fam[name].add_metric(labels, value)

        ended = [] if self._ended is None else [(s, how) for s, how in self._ended()]
        for state, how in [(s, None) for s in self._jobs()] + ended:
            job = state.job
            put("trimtab_job_live", [job], 1.0 if how is None else 0.0)
            put("trimtab_job_lost", [job], 1.0 if how == "lost" else 0.0)
            self._signals(put, job, state)
            for knob in KNOBS:
                put("trimtab_knob_value", [job, knob], getattr(state.effective, knob))
                if knob != "clip":
                    put("trimtab_knob_base", [job, knob], getattr(state.base, knob))
                if knob in MULTIPLIERS:
                    put("trimtab_knob_multiplier", [job, knob], getattr(state.knobs, knob))
                if self._bounds is not None and getattr(state.knobs, knob) is not None:
                    lo, hi = self._bounds(job, knob, getattr(state.initial, knob))
                    put("trimtab_knob_bound", [job, knob, "lower"], lo)
                    put("trimtab_knob_bound", [job, knob, "upper"], hi)
            # Counters a job can have start at zero for every label set it can come to have
            # (each policy on the knobs in force, both ways; each governor limit), so that
            # increase() and rate() see their first count: a series born at 1 has none.
            live, shadow = self._policies(job) if self._policies is not None else ((), ())
            knobs = [k for k in KNOBS if getattr(state.knobs, k) is not None]
            for (policy, knob, direction), n in {
                **_zeros((*live, GOVERNOR, "manual"), knobs, ("up", "down")),
                **state.decision_counts,
            }.items():
                put("trimtab_decisions", [job, policy, knob, direction], n)
            for (policy, knob, direction), n in {
                **_zeros(shadow, knobs, ("up", "down")), **state.shadow_counts,
            }.items():
                put("trimtab_shadow_decisions", [job, policy, knob, direction], n)
            for (knob, limit), n in {
                **{(k, lim): 0 for k in knobs for lim in LIMIT_NAMES},
                **self.clamps.get(job, {}),
            }.items():
                put("trimtab_governor_clamps", [job, knob, limit], n)
            for knob, n in {**{k: 0 for k in knobs}, **self.reversals.get(job, {})}.items():
                put("trimtab_knob_reversals", [job, knob], n)
            for policy in dict(state.disabled_policies):
                put("trimtab_policy_errors", [job, policy], 1)
            rb = state.rollback
            # Every cause from zero, so that the first rollback is an increase, not a new series.
            for cause, n in {**dict.fromkeys((*CAUSES, "manual"), 0), **rb.rollbacks}.items():
                put("trimtab_rollbacks", [job, cause], n)
            put("trimtab_rollback_steps_lost", [job], rb.steps_lost)
            put("trimtab_rollback_failures", [job], rb.failed)
            put("trimtab_job_paused", [job], 0.0 if state.paused is None else 1.0)
            for action, n in {**dict.fromkeys(OPERATOR_ACTIONS, 0),
                              **state.operator_actions}.items():
                put("trimtab_operator_actions", [job, action], n)
            put("trimtab_rollback_alert", [job], 1.0 if rb.alert is not None else 0.0)
            put("trimtab_checkpoints_stable_step", [job], rb.stable_step)
            put("trimtab_checkpoints", [job], rb.checkpoints_seen)
            put("trimtab_checkpoints_marked_stable", [job], rb.marked_stable)
            put(
                "trimtab_job_healthy",
                [job],
                0.0
                if rb.last_unhealthy_step is not None and rb.last_unhealthy_step >= rb.step
                else 1.0,
            )
        yield from fam.values()

    def _signals(self, put: Callable[..., None], job: str, state: JobState) -> None:
        """What the job's last report and signal state say."""
        put("trimtab_job_step", [job], state.step)
        put("trimtab_job_reports", [job], state.reports_seen)
        put("trimtab_job_dropped_reports", [job], state.dropped_reports)
        put("trimtab_job_nonfinite", [job, "loss"], state.nonfinite_losses)
        put("trimtab_job_nonfinite", [job, "grad"], state.nonfinite_grads)
        if self._age is not None:
            put("trimtab_job_last_seen_age_seconds", [job], self._age(job))
        if self._report_age is not None:
            put("trimtab_job_last_report_age_seconds", [job], self._report_age(job))
        last = state.last_report
        if last is not None:
            put("trimtab_job_loss", [job], last.loss_mean)
            put("trimtab_job_grad_norm", [job], last.grad_norm_mean)
            put("trimtab_job_grad_norm_max", [job], last.grad_norm_max)
            put("trimtab_job_grad_norm_std", [job], last.grad_norm_std)
            put("trimtab_job_update_ratio", [job], last.update_ratio)
            put("trimtab_job_update_alignment", [job], last.update_alignment)
            put("trimtab_job_step_time_seconds", [job], last.step_time_s)
            put("trimtab_job_lr_window", [job, "min"], last.lr_window_min)
            put("trimtab_job_lr_window", [job, "max"], last.lr_window_max)
            put("trimtab_job_replica_spread", [job], last.replica_spread)
        if state.validations:
            put("trimtab_job_validation", [job], state.validations[-1][1])
        if state.validations_ema:
            put("trimtab_job_validation_ema", [job], state.validations_ema[-1][1])
        sig = state.signals()
        put("trimtab_job_loss_ema", [job], sig.loss_ema)
        put("trimtab_job_loss_slope", [job], sig.slope)
        put("trimtab_job_loss_slope_t", [job], sig.slope_t)
        put("trimtab_job_zscore", [job, "loss"], sig.loss_z)
        put("trimtab_job_zscore", [job, "grad_norm"], sig.grad_norm_z)


def _zeros(policies: Iterable[str], knobs: Iterable[str],
           directions: Iterable[str]) -> dict[tuple[str, str, str], int]:
    return {(p, k, d): 0 for p in policies for k in knobs for d in directions}


class ControllerMetrics:
    """The controller's own metrics, registered on ``registry``, and the per-job collector.

    ``age``, ``bounds``, ``ended`` (the jobs in their grace period after they ended) and
    ``policies`` (a job's live and shadow policy names) go to :class:`JobCollector`.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        jobs: Callable[[], Iterable[JobState]],
        age: Callable[[str], float | None] | None = None,
        report_age: Callable[[str], float | None] | None = None,
        bounds: Callable[[str, str, float | None], tuple[float, float]] | None = None,
        ended: Callable[[], Iterable[tuple[JobState, str]]] | None = None,
        policies: Callable[[str], tuple[Iterable[str], Iterable[str]]] | None = None,
    ) -> None:
        self.registry = registry
        self.jobs_connected = Gauge(
            "trimtab_jobs_connected", "Jobs currently live.", registry=registry
        )
        self.reports = Counter("trimtab_reports", "Reports handled, all jobs.", registry=registry)
        self.messages = Counter(
            "trimtab_messages", "Messages received, by type.", ["type"], registry=registry
        )
        self.message_errors = Counter(
            "trimtab_message_errors",
            "Messages refused with an error reply, by error code.",
            ["code"],
            registry=registry,
        )
        self.reports_abandoned = Counter(
            "trimtab_reports_abandoned",
            "Reports sent before the rollback their client had applied since (they describe "
            "the path rolled back from): journaled, not observed.",
            registry=registry,
        )
        self.reports_stale = Counter(
            "trimtab_reports_stale",
            "Reports of steps before their job's current registration (queued while no "
            "controller heard the run): journaled, not observed, never evidence.",
            registry=registry,
        )
        self.commands = Counter("trimtab_commands", "Commands sent, all jobs.", registry=registry)
        self.decision_latency = Histogram(
            "trimtab_decision_latency_seconds",
            "Time from a report's arrival to the end of its handling, the policies' decision "
            "included, whether it brought a command or none.",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25),
            registry=registry,
        )
        self.journal_commit = Histogram(
            "trimtab_journal_commit_seconds",
            "Time to commit one batch of journal writes (one SQLite transaction).",
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5),
            registry=registry,
        )
        self.job_timeout = Gauge(
            "trimtab_job_timeout_seconds",
            "Silence after which a job is marked lost (the job_timeout_s setting).",
            registry=registry,
        )
        self.jobs_lost = Counter(
            "trimtab_jobs_lost", "Jobs marked lost after going silent.", registry=registry
        )
        self.operator_requests = Counter(
            "trimtab_operator_requests",
            "Requests people sent (trimtab set, pause, resume, rollback), by action and "
            "outcome (done, refused).",
            ["action", "outcome"],
            registry=registry,
        )
        self.rejected_peers = Counter(
            "trimtab_rejected_peers",
            "Peers refused at the socket, by reason.",
            ["reason"],
            registry=registry,
        )
        # Known label values start at zero, so that rates and alerts see the first one.
        for code in ERROR_CODES:
            self.message_errors.labels(code=code)
        for reason in REJECT_REASONS:
            self.rejected_peers.labels(reason=reason)
        for action in OPERATOR_ACTIONS:
            for outcome in ("done", "refused"):
                self.operator_requests.labels(action=action, outcome=outcome)
        self.collector = JobCollector(jobs, age=age, report_age=report_age, bounds=bounds,
                                      ended=ended,
                                      policies=policies)
        registry.register(self.collector)

    def note_decision(self, job: str, decision: Decision) -> None:
        """Count the governor's limits that acted on ``decision`` (a live one, about to be
        sent) and the knob changes it commands against the previous change's direction."""
        col = self.collector
        counts = col.clamps.setdefault(job, {})
        for knob, kd in decision.knobs.items():
            for limit in kd.limits:
                counts[(knob, limit)] = counts.get((knob, limit), 0) + 1
        directions = col.directions.setdefault(job, {})
        for knob, value in decision.commands.items():
            # Against the value the optimizer was using: a rollback's command replaces the
            # checkpoint's value, but the run goes from what it ran at (the range test's
            # return to its pick is a cut from the sweep's top, not a raise).
            current = decision.knobs[knob].before
            if current is None or value == current:
                continue
            way = 1 if value > current else -1
            if directions.get(knob, way) != way:
                reversals = col.reversals.setdefault(job, {})
                reversals[knob] = reversals.get(knob, 0) + 1
            directions[knob] = way

    def new_run(self, job: str) -> None:
        """Another run of ``job`` registered: its knob changes are no reversals of the last
        run's (the counts go on, as counters do)."""
        self.collector.directions.pop(job, None)

    def forget(self, job: str) -> None:
        """The job ended: drop what is kept for it here."""
        for table in (self.collector.clamps, self.collector.reversals, self.collector.directions):
            table.pop(job, None)
