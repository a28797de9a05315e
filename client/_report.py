"""The reporter: one wire ``Report`` per closed report window, from the probe's stats.

The probe reduces a window's device rows to :class:`~trimtab.client._probe.WindowStats`
on the host (the one sync per window); the reporter adds what the host knows (the step,
the knobs the window's last step used, the link's state, the checkpoints held, a
validation result handed in since the last report) and numbers the reports. Building a
report reads nothing from the device and never waits on the controller: the transport
queues it.

>>> from trimtab.client._probe import WindowStats
>>> from trimtab.protocol import wire
>>> class Link:  # the transport's fields a report states
...     offline, link, dropped = False, 1, 0
>>> reporter = Reporter("demo")
>>> reporter.validation = (1.5, 8)
>>> report = reporter.report(
...     WindowStats(steps=10, loss_mean=2.0), step=10, knobs=wire.Knobs(lr=0.1),
...     base=wire.Knobs(lr=0.1), scale=wire.Scale(), micro_counts=[], applied_seq=0,
...     checkpoints=[0], stable_step=None, transport=Link())
>>> report.seq, report.loss_mean, report.validation, reporter.validation
(1, 2.0, 1.5, None)
"""

from __future__ import annotations

import time
from typing import Any

from trimtab.protocol import wire

from ._probe import WindowStats

__all__ = ["Reporter"]


class Reporter:
    """Numbers and builds one job's reports; the window's clock starts here."""

    def __init__(self, job: str) -> None:
        self.job = job
        #: The last report's sequence number (0: none yet).
        self.seq = 0
        #: A validation result (value, step) waiting for the next report...
        self.validation: tuple[float, int] | None = None
        #: ...and the weight average's result at that step (None: none).
        self.validation_ema: float | None = None
        self._window_start = time.perf_counter()

    def restart(self, step: int | None = None) -> None:
        """The open window was discarded (a rollback to ``step``): its time does not count,
        and a validation result measured after ``step`` waiting for the next report is
        dropped: it is of the path rolled back from (the controller drops those it has)."""
        self._window_start = time.perf_counter()
        if step is not None and self.validation is not None and self.validation[1] > step:
            self.validation = self.validation_ema = None

    def report(
        self, stats: WindowStats, *, step: int, knobs: wire.Knobs, base: wire.Knobs,
        scale: wire.Scale, micro_counts: list[int], applied_seq: int, checkpoints: list[int],
        stable_step: int | None, transport: Any,
        lr_range: tuple[float | None, float | None] = (None, None),
        replica_spread: float | None = None, replicas_identical: bool | None = None,
    ) -> wire.Report:
        """The report of a window of ``stats.steps >= 1`` steps that ended at ``step``;
        ``transport`` (the link to the controller) supplies the link's fields; ``lr_range``
        the lowest and highest lr put in for the window's steps; ``replica_spread`` how far
        apart the ranks' parameter norms stand and ``replicas_identical`` whether their bytes
        are the same (None: one process, or sharded)."""
        now = time.perf_counter()
        step_time, self._window_start = (now - self._window_start) / stats.steps, now
        validation, vstep = self.validation if self.validation is not None else (None, None)
        counts = micro_counts
        micro_batches = round(sum(counts) / len(counts)) if counts else None
        self.seq += 1
        report = wire.Report(
            job=self.job, seq=self.seq, step=step, window=stats.steps,
            loss_mean=stats.loss_mean, loss_last=stats.loss_last, loss_min=stats.loss_min,
            loss_max=stats.loss_max, grad_norm_mean=stats.grad_norm_mean,
            grad_norm_max=stats.grad_norm_max, grad_norm_std=stats.grad_norm_std,
            group_grad_norms=stats.group_grad_norms, update_ratio=stats.update_ratio,
            update_alignment=stats.update_alignment,
            nonfinite_losses=stats.nonfinite_losses, nonfinite_grads=stats.nonfinite_grads,
            skipped_steps=stats.nonfinite_grads, step_time_s=step_time, knobs=knobs,
            base=base, scale=scale, user_clipped_steps=stats.user_clipped_steps,
            user_clip=stats.user_clip, offline=transport.offline, link=transport.link,
            dropped_reports=transport.dropped, applied_seq=applied_seq,
            checkpoints=checkpoints, stable_step=stable_step,
            validation=validation, validation_step=vstep,
            validation_ema=None if validation is None else self.validation_ema,
            micro_sq_norm_mean=stats.micro_sq_norm_mean if counts else None,
            micro_batches=micro_batches, lr_window_min=lr_range[0], lr_window_max=lr_range[1],
            replica_spread=replica_spread, replicas_identical=replicas_identical,
        )
        self.validation = self.validation_ema = None
        return report
