"""Prometheus metrics for the controller (the adapter; the engine never imports this).

Controller-wide counters are ordinary prometheus-client metrics on an injected registry.
Per-job series come from :class:`JobCollector`, which reads the live job table at scrape
time, so a job's series end when the job does.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> m = ControllerMetrics(registry=CollectorRegistry(), jobs=lambda: [])
>>> m.message_errors.labels(code="malformed").inc()
>>> b"trimtab_message_errors_total" in generate_latest(m.registry)
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from trimtab.client.wire import KNOBS

if TYPE_CHECKING:
    from trimtab.controller.state import JobState

__all__ = ["ControllerMetrics", "JobCollector"]


class JobCollector(Collector):
    """Per-job series over the live job table: signals, knobs, decisions, policy errors,
    checkpoints and rollbacks."""

    def __init__(self, jobs: Callable[[], Iterable[JobState]]) -> None:
        self._jobs = jobs

    def collect(self):  # noqa: D102 - the Collector protocol's one method
        knob = GaugeMetricFamily(
            "trimtab_knob_value", "Knob value in force, as last acknowledged or reported.",
            labels=["job", "knob"])
        step = GaugeMetricFamily("trimtab_job_step", "Optimizer steps the job has taken.",
                                 labels=["job"])
        loss = GaugeMetricFamily("trimtab_job_loss", "Mean training loss of the last report.",
                                 labels=["job"])
        gnorm = GaugeMetricFamily("trimtab_job_grad_norm",
                                  "Mean global gradient norm (before clipping), last report.",
                                  labels=["job"])
        reports = CounterMetricFamily("trimtab_job_reports", "Reports received from the job.",
                                      labels=["job"])
        dropped = CounterMetricFamily("trimtab_job_dropped_reports",
                                      "Reports the job's client dropped (queue full).",
                                      labels=["job"])
        decisions = CounterMetricFamily(
            "trimtab_decisions", "Knob changes commanded, by policy, knob and direction.",
            labels=["job", "policy", "knob", "direction"])
        shadow = CounterMetricFamily(
            "trimtab_shadow_decisions",
            "Knob changes shadow policies would have commanded (never sent), by policy, knob "
            "and direction.", labels=["job", "policy", "knob", "direction"])
        perrors = CounterMetricFamily("trimtab_policy_errors",
                                      "Policies disabled for a job after raising or misbehaving.",
                                      labels=["job", "policy"])
        rollbacks = CounterMetricFamily("trimtab_rollbacks", "Rollbacks ordered, by cause.",
                                        labels=["job", "reason"])
        lost = CounterMetricFamily("trimtab_rollback_steps_lost",
                                   "Optimizer steps undone by acknowledged rollbacks.",
                                   labels=["job"])
        alert = GaugeMetricFamily("trimtab_rollback_alert",
                                  "1 when the job's rollback budget is exhausted (no more "
                                  "rollbacks, LR cuts only).", labels=["job"])
        stable = GaugeMetricFamily("trimtab_checkpoints_stable_step",
                                   "Step of the newest checkpoint marked stable.",
                                   labels=["job"])
        taken = CounterMetricFamily("trimtab_checkpoints",
                                    "Checkpoints taken, as listed in the job's reports.",
                                    labels=["job"])
        marked = CounterMetricFamily("trimtab_checkpoints_marked_stable",
                                     "Checkpoints marked stable.", labels=["job"])
        for state in list(self._jobs()):
            job = state.job
            for name in KNOBS:
                value = getattr(state.knobs, name)
                if value is not None:
                    knob.add_metric([job, name], value)
            step.add_metric([job], state.step)
            last = state.last_report
            if last is not None and last.loss_mean is not None:
                loss.add_metric([job], last.loss_mean)
            if last is not None and last.grad_norm_mean is not None:
                gnorm.add_metric([job], last.grad_norm_mean)
            reports.add_metric([job], state.reports_seen)
            dropped.add_metric([job], state.dropped_reports)
            for (policy, kname, direction), n in dict(state.decision_counts).items():
                decisions.add_metric([job, policy, kname, direction], n)
            for (policy, kname, direction), n in dict(state.shadow_counts).items():
                shadow.add_metric([job, policy, kname, direction], n)
            for policy in dict(state.disabled_policies):
                perrors.add_metric([job, policy], 1)
            rb = state.rollback
            for cause, n in dict(rb.rollbacks).items():
                rollbacks.add_metric([job, cause], n)
            lost.add_metric([job], rb.steps_lost)
            alert.add_metric([job], 1.0 if rb.alert is not None else 0.0)
            if rb.stable_step is not None:
                stable.add_metric([job], rb.stable_step)
            taken.add_metric([job], rb.checkpoints_seen)
            marked.add_metric([job], rb.marked_stable)
        yield from (knob, step, loss, gnorm, reports, dropped, decisions, shadow, perrors,
                    rollbacks, lost, alert, stable, taken, marked)


class ControllerMetrics:
    """The controller's own metrics, registered on ``registry``."""

    def __init__(self, *, registry: CollectorRegistry,
                 jobs: Callable[[], Iterable[JobState]]) -> None:
        self.registry = registry
        self.jobs_connected = Gauge("trimtab_jobs_connected", "Jobs currently live.",
                                    registry=registry)
        self.reports = Counter("trimtab_reports", "Reports handled, all jobs.", registry=registry)
        self.messages = Counter("trimtab_messages", "Messages received, by type.", ["type"],
                                registry=registry)
        self.message_errors = Counter(
            "trimtab_message_errors", "Messages refused with an error reply, by error code.",
            ["code"], registry=registry)
        self.commands = Counter("trimtab_commands", "Commands sent, all jobs.", registry=registry)
        self.decision_latency = Histogram(
            "trimtab_decision_latency_seconds",
            "Time from a report's arrival to its decision being sent.",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25),
            registry=registry)
        self.jobs_lost = Counter("trimtab_jobs_lost", "Jobs marked lost after going silent.",
                                 registry=registry)
        registry.register(JobCollector(jobs))
