"""Closing a report window: the probe's rows become one report on the send queue.

The guard closes the open window every ``report_every`` steps, and once more at close
for a partial one. Closing reads every part that holds some of the window: under
torch.distributed the rows first become their mean over ranks
(:meth:`~trimtab.client._dist.DistLink.reduce_rows`, one all-reduce); the
:class:`~trimtab.client._probe.Probe` reduces them to
:class:`~trimtab.client._probe.WindowStats` on the host (the one sync per window); with
``hooks=True`` a step without an observed loss is not counted as a bad loss
(:class:`~trimtab.client._hooks.StepHooks`); the :class:`~trimtab.client._step.Step`
learns the window's skipped steps; the :class:`~trimtab.client._report.Reporter` builds
the report from what the host knows (the knobs in force from
:class:`~trimtab.client._commands.Commands`, the checkpoints held) and the transport
queues it. The reporter itself stays a builder that knows none of these parts (the
checkpointing reads it, and the commands read the checkpointing): this part does the
gathering, so that no import goes round in a circle.

A report that cannot be built is logged and the window dropped: reporting must never
stop training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trimtab.protocol.ring import kept

if TYPE_CHECKING:
    import torch

    from ._checkpoint import CheckpointStore
    from ._commands import Commands
    from ._dist import DistLink
    from ._hooks import StepHooks
    from ._probe import Probe
    from ._report import Reporter
    from ._step import Step

__all__ = ["ReportWindow"]

log = logging.getLogger("trimtab.client")


class ReportWindow:
    """One guard's open report window and what closing it reads: the probe's rows, the
    step counts, the commands' values in force, the checkpoints held, the link. ``dist``
    (``None``: one process) averages the rows over ranks; ``hooks`` (``None``: no
    ``hooks=True``) corrects the loss counts of steps that saw no loss; ``checksum``
    (``None``: one process, or a sharded model) gives this rank's parameter checksum,
    compared over ranks."""

    def __init__(
        self, *, probe: Probe, step: Step, reporter: Reporter, commands: Commands,
        transport: Any, store: CheckpointStore | None, dist: DistLink | None,
        hooks: StepHooks | None, checksum: Callable[[], torch.Tensor | None] | None = None,
        snapshot_due: Callable[[], bool] | None = None,
    ) -> None:
        self._probe = probe
        self._step = step
        self._reporter = reporter
        self._commands = commands
        self._transport = transport
        self._store = store
        self._dist = dist
        self._hooks = hooks
        self._checksum = checksum
        self._snapshot_due = snapshot_due
        #: When the log last said the run is stuck alone (every step skipped, no controller
        #: heard); None: not stuck.
        self._stuck_said: float | None = None

    def _listing(self, store: CheckpointStore) -> list[int]:
        """The checkpoints the report lists: those the ring holds once this step's snapshot,
        when one is due, is in (it is taken or settled right after the report). Listed
        before it, the checkpoint it drops looked held to the controller, which marked it
        stable as 'the client's next snapshot drops it' and met an error (a WARNING in
        every Hugging Face run of a trial: mark_stable=100, held 0, 150, 200, 250)."""
        steps = store.steps()
        if self._snapshot_due is None or not self._snapshot_due():
            return steps
        step = self._step.host_step
        return sorted(kept([*steps, step], store.stable_step, store.keep) - {step})

    def _take_checksum(self) -> torch.Tensor | None:
        """This rank's parameter checksum; None (every rank goes on, the report without a
        replica comparison, a WARNING once) when it cannot be taken."""
        if self._checksum is None:
            return None
        try:
            return self._checksum()
        except Exception:
            log.warning("trimtab could not take a checksum of this rank's parameters; the "
                        "replicas are not compared", exc_info=True)
            self._checksum = None
            return None

    def _note_stuck(self, steps: int, skipped: int) -> None:
        """An ERROR when every step of a window was skipped (non-finite) while no controller
        answers, and again every 10 minutes while it lasts: the weights no longer move, and
        only a controller rolls the run back. A controller trial: a fault while the
        controller was gone left a run skipping every step for 5,400 iterations, its only
        log line the link's."""
        if skipped < steps or not self._transport.offline:
            self._stuck_said = None
            return
        now = time.monotonic()
        if self._stuck_said is not None and now - self._stuck_said < 600.0:
            return
        self._stuck_said = now
        log.error("trimtab: job %s: every step of the last window up to step %d was skipped "
                  "(non-finite gradients or loss) and no controller answers to roll the run "
                  "back: its weights no longer move. A controller that answers rolls it back; "
                  "else restore a checkpoint (guard.checkpoints; load_stable) or stop the run",
                  self._reporter.job, self._step.host_step)

    def close(self) -> None:
        """Reduce the open window's rows and queue its report (none for an empty window)."""
        try:
            lr_range = self._step.act.take_window_lr()
            spread = identical = None
            if self._dist is not None:  # the window's rows become their mean over ranks
                self._dist.reduce_rows(self._probe.buf[: self._probe.row])
                # ...its lrs every rank's, and the replicas' checksums compared
                lr_range, spread, identical = self._dist.reduce_window(
                    lr_range, self._take_checksum())
            stats = self._probe.collect()
            if self._hooks is not None:  # a step without an observed loss is not a bad loss
                stats = self._hooks.window_closed(stats)
            self._step.window_closed(stats.nonfinite_grads, stats.scaler_skips)
            if stats.steps == 0:
                return
            self._note_stuck(stats.steps, stats.nonfinite_grads)
            # What the window's last step used, the user's own values then, the multipliers.
            knobs, base, scale = self._commands.note_in_force()
            store = self._store
            report = self._reporter.report(
                stats, step=self._step.host_step, knobs=knobs, base=base, scale=scale,
                lr_range=lr_range, replica_spread=spread, replicas_identical=identical,
                micro_counts=self._step.take_micro_counts(),
                applied_seq=self._commands.applied_seq,
                checkpoints=[] if store is None else self._listing(store),
                stable_step=None if store is None else store.stable_step,
                transport=self._transport,
            )
        except Exception:  # a report that cannot be built must not stop training
            log.exception("trimtab could not build a report; window dropped")
            return
        self._transport.put_report(report)
