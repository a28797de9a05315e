"""The guard's state as its loop and the benchmarks read it: one property per value, each
read from the part that keeps it.

:class:`~trimtab.client.Guard` inherits these from :class:`GuardState`, so that its own
body is the attach, the step and the close: the step counts come from
:class:`~trimtab.client._step.Step`, the command sequence and the stop advice from
:class:`~trimtab.client._commands.Commands`, the schedule of snapshots and the rollbacks
from :class:`~trimtab.client._checkpointing.Checkpointing`, the checkpoints held from the
:class:`~trimtab.client.CheckpointStore`, the knobs from
:class:`~trimtab.client._knobs.Actuator`, the link's counters from the
:class:`~trimtab.client._transport.Transport`. Reading one never waits on the controller;
only ``skipped_steps`` (and so ``global_step``) mid-window on the sync-free paths, and
``knobs`` for a tensor-valued setting, read the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trimtab.protocol import wire

from ._compiled import graph_breaks

if TYPE_CHECKING:
    from ._checkpoint import CheckpointStore
    from ._checkpointing import Checkpointing
    from ._commands import Commands
    from ._dist import RankTransport
    from ._knobs import Actuator
    from ._report import Reporter
    from ._step import Step
    from ._transport import Transport

__all__ = ["GuardState"]


class GuardState:
    """The read-only view (and ``reseed_on_rollback``'s setter) over a guard's parts; the
    guard sets the parts in its ``__init__``."""

    _step: Step
    _commands: Commands
    _ckpts: Checkpointing
    _reporter: Reporter
    _act: Actuator
    _store: CheckpointStore | None
    _transport: Transport | RankTransport  # the second under torch.distributed
    _closed: bool
    job: str
    run_id: str
    _resumes: int  # resumes of this run from a saved guard state (see _resume)
    _resumed_here: bool
    _resume_step: int | None
    _resume_id: str | None
    _ema: Any  # the weight average (None: off), see _ema
    _handed: tuple[Any, ...] | None  # the run as handed over, until the first step

    def _note_listing(self) -> None:  # the guard's: the checkpoints its registration lists
        raise NotImplementedError

    def _fingerprint(self) -> tuple[Any, ...]:  # the guard's: see Guard._handed_over_again
        raise NotImplementedError

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (mid-window on the sync-free paths: one sync)."""
        return self._step.skipped(self._closed)

    @property
    def applied_seq(self) -> int:
        """Sequence number of the last command applied (0: none)."""
        return self._commands.applied_seq

    @property
    def should_stop(self) -> bool:
        """The controller advises stopping (the validation metric stopped improving)."""
        return self._commands.should_stop

    @property
    def stop_reason(self) -> str | None:
        """Why it advises stopping (``None``: it does not)."""
        return self._commands.stop_reason

    @property
    def scheduler(self) -> Any:
        """The user's LR scheduler (``None``: none): its state is restored on rollback."""
        return self._ckpts.scheduler

    @property
    def checkpoint_every(self) -> int:
        """Steps between snapshots (0: checkpoints off)."""
        return self._ckpts.every

    @property
    def rollbacks(self) -> int:
        """Rollbacks carried out so far."""
        return self._ckpts.rollbacks

    @property
    def reseed_on_rollback(self) -> bool:
        """Re-seed the restored RNGs after a rollback (see
        :func:`~trimtab.client._checkpoint.reseed_rng`)."""
        return self._ckpts.reseed

    @reseed_on_rollback.setter
    def reseed_on_rollback(self, value: bool) -> None:
        self._ckpts.reseed = value

    @property
    def _last_checkpoint(self) -> int:
        # The step of the last snapshot taken or restored (bench/ watches it).
        return self._ckpts.last

    @property
    def _report_seq(self) -> int:
        # The last report's number (bench/ watches it to follow the reports).
        return self._reporter.seq

    @property
    def _calls(self) -> int:
        # Calls that reached the optimizer step, skipped ones included (bench/ reads it).
        return self._step.calls

    @property
    def graph_breaks(self) -> int:
        """Graph breaks ``torch.compile`` has met in this process so far (dynamo's count,
        see :mod:`trimtab.client._compiled`; 0 when nothing was compiled). No device read."""
        return graph_breaks()

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (skipped steps not counted)."""
        return self._step.calls - self.skipped_steps

    @property
    def clip(self) -> float | None:
        """The clipping threshold in force (``None``: off); a command may change it."""
        return self._act.clip

    @property
    def knobs(self) -> wire.Knobs:
        """The effective values the optimizer used at the last step: the user's lr and
        weight decay times trimtab's multipliers, the momentum, the clip (before the first
        step: what it would use now). Between steps the param groups hold the user's own
        values; a tensor-valued setting is read from its device here."""
        return self._act.used()

    @property
    def scale(self) -> wire.Scale:
        """trimtab's multipliers in force on the user's lr and weight decay (1.0: none)."""
        return self._act.scale()

    @property
    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints a rollback can restore (memory and disk), oldest first."""
        return [] if self._store is None else self._store.steps()

    @property
    def stable_step(self) -> int | None:
        """The newest checkpoint marked stable (``None``: none yet, or checkpoints off)."""
        return None if self._store is None else self._store.stable_step

    @property
    def dropped_reports(self) -> int:
        """Reports dropped because the send queue was full."""
        return self._transport.dropped

    @property
    def bad_frames(self) -> int:
        """Frames from the controller that did not decode and were ignored."""
        return self._transport.bad_frames

    @property
    def connected(self) -> bool:
        """Whether a controller answered within the last ``liveness`` heartbeats
        (``liveness x heartbeat_s`` seconds; any message from it counts).

        False until the first answer (a moment after attach when one is listening), while
        none is reachable (a wrong endpoint, a controller down or restarting, a CURVE key
        it does not list), and always on ranks other than 0 under ``torch.distributed``.
        Training runs the same either way: reports wait in the bounded queue, the last
        applied knobs stay in force. The transport thread logs a warning when the run
        is alone for a liveness window, a reminder every 10 minutes, and one line when a
        controller answers; a link that keeps dropping, one warning a minute (see
        :mod:`~trimtab.client._link_watch`). Reading it never waits on the link.
        """
        return self._transport.connected
