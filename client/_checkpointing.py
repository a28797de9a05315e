"""The guard's checkpoints of its run: taken on schedule, marked stable, rolled back to.

The store (:class:`~trimtab.client._checkpoint.CheckpointStore`, or the sharded one) keeps
the snapshots; this part decides when one is taken and what a rollback puts back around
the store's restore: the knobs in force at the checkpoint, the step counts (the open
report window is discarded), the RNGs re-seeded, the loop's ``on_rollback``, and the
scheduler held back one step where the snapshot was taken after it stepped. A weight
average (``attach(..., ema=...)``, see :mod:`trimtab.client._ema`) and the loop's own
objects (``attach(..., extra_state={name: obj})``: their ``state_dict()``) are snapshotted and
restored with the model.

With ``checkpoint_every=0`` there is no store: nothing is taken, and a command's
``mark_stable`` or ``rollback_to`` is answered with an error saying checkpoints are off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ._checkpoint import Checkpoint, CheckpointStore, reseed_rng
from ._ema import Ema
from ._knobs import Actuator
from ._options import _invalid
from ._report import Reporter
from ._scheduler_hold import ScheduleHold
from ._sharded import ShardedStore
from ._step import Step

__all__ = ["Checkpointing", "open_store"]

log = logging.getLogger("trimtab.client")


def open_store(keep: int, directory: str | os.PathLike | None, memory_keep: int | None,
               sharded: bool) -> CheckpointStore:
    """The store for a guard's snapshots (sharded: DCP directories, see ``_sharded``)."""
    try:
        return (ShardedStore(keep, directory) if sharded
                else CheckpointStore(keep, directory, memory_keep))
    except OSError as exc:
        raise _invalid("checkpoint_dir", directory,
                       f"a directory that can be created and written ({exc})") from None


class Checkpointing:
    """Snapshots of one run every ``every`` steps into ``store`` (``None``: off), and
    rollbacks to them; the parts a rollback resets are handed in."""

    def __init__(
        self, store: CheckpointStore | None, every: int, *, model: torch.nn.Module,
        optimizer: torch.optim.Optimizer, scheduler: Any, act: Actuator, step: Step,
        reporter: Reporter, on_rollback: Callable[[int], None] | None, reseed: bool,
        ema: Ema | None = None, extra: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.every = every
        #: ``checkpoint_every`` as set; :attr:`every` grows from it (at most 8x) while the
        #: controller's stable marks come after their checkpoints left the ring.
        self.every_set = every
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._act, self._step, self._reporter = act, step, reporter
        self._on_rollback = on_rollback
        self._on_rollback_due: int | None = None
        #: The weight average, snapshotted and restored with the model (None: none kept).
        self.ema = ema
        #: The loop's own objects by name (``extra_state``), snapshotted and restored with it.
        self.extra = dict(extra or {})
        #: Re-seed the restored RNGs after a rollback (see :func:`reseed_rng`).
        self.reseed = reseed
        #: The step of the last snapshot taken (or restored).
        self.last = 0
        self._files_held = False
        #: The guard's state for each snapshot (set by the guard once its parts exist).
        self.run_state: Callable[[], dict[str, Any]] | None = None
        #: Rollbacks carried out so far.
        self.rollbacks = 0
        #: The step of the snapshot of the run as its user handed it over: taken at attach,
        #: or of the state a resumed process loaded (:meth:`replace_all`); the controller
        #: marks it stable with the first report, as the rollback target of last resort
        #: (None: none taken).
        self.origin: int | None = None
        self._hold: ScheduleHold | None = None

    @property
    def step_now(self) -> int:
        """The run's ``global_step`` as the host knows it now."""
        return self._step.host_step

    # -- around the step ----------------------------------------------------------------------

    def before_step(self) -> None:
        """At a step boundary: admit finished snapshots (never waits) and put back a
        schedule held since a rollback."""
        if self.store is not None:
            if self._files_held:  # the first step: the snapshot taken at attach is written now
                self._files_held = False
                self.store.release()
            self.store.poll()  # admits snapshots whose device copies completed; never waits
        if self._hold is not None:
            self._hold.put_back(self.scheduler, self.optimizer)
            self._hold = None

    def fence(self) -> None:
        """Before the optimizer step: it changes what snapshot copies in flight read, so the
        training stream waits for them on the device (no host wait; see CheckpointStore)."""
        if self.store is not None and self.store._pending:
            self.store.fence()

    def take_if_due(self) -> None:
        """Take a snapshot when ``global_step`` passed the next multiple of ``every``; call
        where the host knows it exactly (every step in "skip" mode, else at window ends)."""
        if self.due():
            self.take()

    def due(self) -> bool:
        """Whether a snapshot is due at the step the host knows (exact after a window's
        read): one taken before the read is settled at it, one after is taken then."""
        return (self.store is not None
                and self._step.host_step // self.every > self.last // self.every)

    def may_be_due(self) -> bool:
        """Whether a snapshot may be due at this window's end, before its skipped steps are
        known (``global_step`` is at most the host's count then): see :meth:`take_early`."""
        return self.due() and not isinstance(self.store, ShardedStore)

    def take_early(self) -> Checkpoint | None:
        """Snapshot the run at a window's end before the window's rows are read, the one
        sync per window: its host work (state dicts, queueing the copies) then runs while
        the device still works through the step, instead of after the sync with the device
        idle. Its step is only a bound until :meth:`settle`, after the read, labels it (or
        drops it, when skipped steps put ``global_step`` back before the multiple of
        ``every``); until then it is never listed, marked or restored. ``None``: none was
        taken (deferred, or failed: logged)."""
        return self.take(provisional=True)

    def settle(self, ckpt: Checkpoint | None) -> None:
        """After the window's read: label or drop the snapshot :meth:`take_early` took."""
        if ckpt is None or self.store is None:
            return  # deferred (tried again at the next chance) or failed (logged)
        step = self._step.host_step
        if step // self.every > self.last // self.every:
            # The guard's state once this window's report is queued, as a state_dict() after
            # this step would be.
            self.store.settle(ckpt, step, {"calls": self._step.calls}, run=self._run())
            self.last = step
        else:
            self.store.settle(ckpt, None)

    def take(self, scheduler_stepped: bool = False, block: bool = False,
             provisional: bool = False) -> Checkpoint | None:
        """Snapshot the run at the step the host knows (exact where this is called, a bound
        when ``provisional``); the snapshot, ``None`` when none was taken."""
        assert self.store is not None
        step = self._step.host_step
        try:
            taken = self.store.take(step, self.model, self.optimizer, self.scheduler,
                                    clip=self._act.clip, counters={"calls": self._step.calls},
                                    scheduler_stepped=scheduler_stepped,
                                    controls=self._act.state_dict(), block=block,
                                    **({"provisional": True} if provisional else {}),
                                    **self._own_state(), **self._run_kw(provisional))
        except Exception:  # a failed snapshot costs a rollback target, never the run
            log.exception("trimtab could not take a checkpoint at step %d", step)
            self.last = step
            return None
        if taken is None:
            # Its pinned buffers are still being allocated: tried again at the next chance
            # rather than stalling this step.
            if self.store.deferred == 1:
                log.info("trimtab snapshot at step %d deferred: pinned host buffers are "
                         "still being allocated", step)
            return None
        if not provisional:
            self.last = step
        return taken

    def replace_all(self, run_id: str | None = None) -> None:
        """Drop every snapshot held (and its file) and take one of the run as it is now: the
        state a resumed run starts from (:mod:`trimtab.client._resume`) replaces the one
        snapshotted at attach. The scheduler has stepped for the coming step, as at attach.
        ``run_id``: the run resumed, whose files from its earlier processes this store takes
        over (see :meth:`CheckpointStore.adopt`)."""
        if self.store is None:
            return
        self.store.drop_all()
        step = self._step.host_step
        stable = run_id is not None and self.store.adopt(run_id, step)
        self.last = step
        self.origin = None
        self.take_origin()
        if stable and self.origin == step:
            # The state resumed from is the file marked stable at this step, kept as it is.
            self.store.mark_stable(step)

    def take_origin(self) -> None:
        """Snapshot the run as its user hands it over (at attach, or a resumed state); its
        pinned buffers are allocated here, before training starts (later ones are
        allocated ahead of need by a background thread). The scheduler has already stepped
        for the coming step here, unlike at every later snapshot: see
        :meth:`hold_schedule`."""
        if self._step.calls == 0 and self.store is not None and self.store.hold():
            # Not written before the first step: see CheckpointFiles.hold.
            self._files_held = True
        if self.take(scheduler_stepped=True, block=True) is not None:
            self.origin = self._step.host_step

    def prepare(self) -> None:
        """After the first step (the optimizer state exists now): allocate the snapshots'
        pinned buffers in the background, well before the first snapshot needs them."""
        if self.store is None:
            return
        try:
            self.store.prepare(self.model, self.optimizer, **self._own_state())
        except Exception:
            log.exception("trimtab could not prepare snapshot buffers")

    def _run(self) -> dict[str, Any] | None:
        """The guard's state to resume from (:func:`~trimtab.client._resume.run_state`;
        None: not set up, or it failed, logged: a snapshot never fails for it)."""
        if self.run_state is None:
            return None
        try:
            return self.run_state()
        except Exception:
            log.exception("trimtab could not read the guard's state for a snapshot")
            return None

    def _run_kw(self, provisional: bool) -> dict[str, Any]:
        """``run=`` for the store (not for a provisional snapshot, which gets it with its
        step: :meth:`settle`)."""
        if provisional:
            return {}
        return {"run": self._run()}

    def _own_state(self) -> dict[str, Any]:
        """The weight average's state and the loop's objects' (``extra_state``) for the store,
        as keywords (none without them: the sharded store takes neither)."""
        own: dict[str, Any] = {} if self.ema is None else {"ema": self.ema.state_dict()}
        if self.extra:
            own["extra"] = {name: obj.state_dict() for name, obj in self.extra.items()}
        return own

    # -- commands -----------------------------------------------------------------------------

    def mark_stable(self, step: int) -> list[str]:
        """A command's ``mark_stable``; the errors for its ack."""
        if self.store is None:
            return [f"mark_stable={step}: checkpoints are off (checkpoint_every=0)"]
        if self.store.mark_stable(step):
            return []
        steps = self.store.steps()
        self._mark_came_late(step, steps)
        held = ", ".join(map(str, steps)) or "none"
        return [f"mark_stable={step}: no checkpoint at that step (held: {held})"]

    def _mark_came_late(self, step: int, held: list[int]) -> None:
        """A stable mark for a checkpoint the ring already dropped (older than every one
        held but the stable one, newer than that): the controller's marks take longer than
        the ring keeps a checkpoint (a fast loop, a loaded controller). Snapshots are then
        taken twice as far apart (up to 8x ``checkpoint_every``), so that each stays long
        enough to be marked. A controller trial: at ~1 ms a step, 13 marks in a row missed,
        and the only stable checkpoint stayed at step 700 of 40,000, the one a fault would
        have gone back to."""
        stable = self.store.stable_step  # (only called with a store)
        unmarked = [s for s in held if s != stable]
        if (not unmarked or step >= min(unmarked) or step % self.every
                or (stable is not None and step <= stable) or self.every >= 8 * self.every_set
                # Dropped lately, by the ring's last turn: a mark much older was decided on
                # long-stale reports (a controller stopped, then working off its backlog),
                # which no interval mends (a re-trial: a mark for 200 at step 2364).
                or step < min(unmarked) - self.every * max(self.store.keep, 1)):
            return
        self.every *= 2
        log.warning("trimtab: the controller's stable mark for step %d came after that "
                    "checkpoint left the ring (held: %s): snapshots are now taken every %d "
                    "steps (checkpoint_every=%d), so that one stays until it is marked; set "
                    "keep or checkpoint_every higher to choose yourself", step,
                    ", ".join(map(str, held)), self.every, self.every_set)

    def rollback(self, step: int) -> tuple[Checkpoint | None, list[str]]:
        """A command's ``rollback_to``: the checkpoint restored (``None``: nothing was) and
        the notes for its ack."""
        if self.store is None:
            return None, [f"rollback_to={step}: checkpoints are off (checkpoint_every=0); "
                          "nothing restored"]
        own: dict[str, Any] = {} if self.ema is None else {"ema": self.ema.model}
        if self.extra:
            own["extra_state"] = self.extra
        ckpt, note = self.store.restore(step, self.model, self.optimizer, self.scheduler,
                                        **own)
        if ckpt is None:
            return None, [f"{note}; nothing restored"]
        notes = [] if note is None else [note]
        # The multipliers, momentum and clip in force at the checkpoint; the user's own
        # values come back with the optimizer's (and the scheduler's) state.
        self._act.load_state_dict({**ckpt.controls, "clip": ckpt.clip})
        self._step.restart(ckpt.counters.get("calls", ckpt.step), ckpt.step)
        self._reporter.restart(ckpt.step)
        self.last = ckpt.step
        self.rollbacks += 1
        if self.reseed:  # no replay of the batches that led here
            reseed_rng(self.rollbacks)
        log.warning("trimtab rolled job %s back to step %d (rollback %d)", self._reporter.job,
                    ckpt.step, self.rollbacks)
        # The loop's on_rollback runs once the rollback's values are in force and its file
        # says so (see :meth:`call_on_rollback`).
        self._on_rollback_due = ckpt.step
        return ckpt, notes

    def call_on_rollback(self) -> str | None:
        """The loop's ``on_rollback(step)`` for the rollback just carried out, last: after
        the command's values are in force and the restored checkpoint's file says so
        (:meth:`restate`), so that a process killed while it runs (a loader seeking for
        seconds) resumes with them (a preemption trial killed it the moment on_rollback
        ran, and the resumed run went on with the values of before the rollback). A note
        for the ack when it raised."""
        step, self._on_rollback_due = self._on_rollback_due, None
        if step is None or self._on_rollback is None:
            return None
        try:
            self._on_rollback(step)
        except Exception as exc:
            log.exception("on_rollback(%d) raised; training goes on", step)
            return f"on_rollback raised {type(exc).__name__}: {exc}"
        return None

    def restate(self, run: dict[str, Any] | None, controls: dict[str, Any]) -> None:
        """After a rollback: the restored checkpoint (at :attr:`last`) resumes as the run
        now goes on (see :meth:`CheckpointStore.restate`)."""
        if self.store is not None and run is not None:
            self.store.restate(self.last, run, controls)

    def hold_schedule(self, restored: Checkpoint) -> None:
        """After a rollback's command is carried out: the loop's scheduler.step() still
        follows this guard.step(); for a snapshot taken after the scheduler stepped that is
        one step too many, so the schedule as restored is put back at the next step."""
        if restored.scheduler_stepped and self.scheduler is not None:
            self._hold = ScheduleHold(self.scheduler, self.optimizer)
