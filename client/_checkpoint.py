"""Checkpoints of a training run: a ring in host memory, optionally mirrored on disk.

A :class:`Checkpoint` holds everything needed to put a run back where it was: the
model's and optimizer's state (host copies), the LR scheduler's state, the RNG states
(torch CPU, every CUDA device, numpy's global generator, Python's ``random``), the
clipping threshold and trimtab's other knobs in force, the guard's step counters, its
weight average, if it keeps one, and the state of the loop's own objects handed over as
``extra_state`` (see :mod:`trimtab.client._snapshot`; it and the RNG functions are
importable from here).

A :class:`CheckpointStore` keeps the ``keep`` newest checkpoints in host memory plus,
always, the newest one marked stable. Copies never stall the device: CPU tensors are
cloned; CUDA tensors are copied into pinned host buffers with ``non_blocking=True`` and
a CUDA event is recorded (see :mod:`trimtab.client._host_copy`); the checkpoint becomes
usable (listed, restorable, written) only once :meth:`CheckpointStore.poll`, called at
later step boundaries, sees its events completed with ``event.query()`` — the training
thread never synchronizes.

With a ``directory``, every checkpoint that becomes usable is also written to disk by a
background thread (see :mod:`._checkpoint_files`: atomic, fsynced, SHA-256 checked on
load); the ``keep`` newest files plus the newest stable one are kept.

>>> import torch
>>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> store = CheckpointStore(keep=2)
>>> _ = store.take(0, model, opt)
>>> store.mark_stable(0), store.steps(), store.stable_step
(True, [0], 0)
>>> with torch.no_grad():
...     _ = model.weight.fill_(5.0)
>>> restored, note = store.restore(0, model, opt)
>>> restored.step, bool((model.weight != 5.0).all())
(0, True)
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from trimtab.protocol.ring import kept

from . import _host_copy
from ._checkpoint_files import CheckpointFiles, read_payload, scan
from ._copy_plan import CopyPlan, Flat, flatten
from ._frozen import FrozenParts
from ._host_copy import _CopyStreams, _HostCopier, _PinnedPool
from ._snapshot import (
    Checkpoint,
    PartlyRestored,
    Unrestorable,
    capture_rng,
    reseed_rng,
    restore_rng,
)

__all__ = ["Checkpoint", "CheckpointStore", "PartlyRestored", "load_stable", "capture_rng",
           "restore_rng", "reseed_rng"]

log = logging.getLogger("trimtab.client")


class CheckpointStore:
    """The ``keep`` newest checkpoints in host memory, plus the newest stable one.

    With ``directory``, every checkpoint is also written there off the training thread
    once its host copy is complete; the ``keep`` newest files plus the newest stable
    one are kept. ``memory_keep`` (default ``keep``; fewer only with a ``directory``)
    bounds the snapshots held in host memory: older ones, once written, live on disk
    only, and a rollback to them reads their file. All methods are for the training
    thread.

    CUDA state is copied into pinned host buffers that a background thread allocates
    ahead of need (:meth:`prepare`, and every :meth:`take` for the next one) and that are
    reused from snapshot to snapshot: about ``memory_keep + 2`` snapshots' worth of
    (model + optimizer state) pinned bytes (:attr:`host_bytes`). A :meth:`take` whose
    buffers are not all there yet takes nothing and returns ``None`` (counted in
    :attr:`deferred`); the guard tries again at its next chance.

    >>> store = CheckpointStore(keep=3, directory=None)
    >>> store.steps(), store.stable_step
    ([], None)
    """

    def __init__(self, keep: int = 3, directory: str | os.PathLike | None = None,
                 memory_keep: int | None = None) -> None:
        if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= 255):
            raise ValueError(f"keep={keep!r} is invalid; allowed: an int from 1 to 255")
        memory_keep = keep if memory_keep is None else memory_keep
        if not (isinstance(memory_keep, int) and not isinstance(memory_keep, bool)
                and 1 <= memory_keep <= keep) or (memory_keep < keep and directory is None):
            raise ValueError(f"memory_keep={memory_keep!r} is invalid; allowed: an int from 1 "
                             f"to keep={keep} (below keep only with a checkpoint directory)")
        self.keep = keep
        self.memory_keep = memory_keep
        self.files = None if directory is None else CheckpointFiles(directory, keep)
        self._held: dict[int, Checkpoint] = {}
        self._pending: collections.deque[Checkpoint] = collections.deque()
        self._retired: list[Checkpoint] = []  # left the ring while the writer reads them
        self._stable: set[int] = set()
        self._pool = _PinnedPool()
        self._streams = _CopyStreams()
        self._plan: CopyPlan | None = None  # the snapshots' copy plan, see _copy_plan
        # Frozen parameters (a LoRA base): one host copy for every snapshot, see _frozen.
        self._frozen = FrozenParts()
        #: Snapshots not taken because their pinned buffers were not allocated yet.
        self.deferred = 0

    @property
    def host_bytes(self) -> int:
        """Pinned host memory allocated for snapshots (0 when nothing is on CUDA)."""
        return self._pool.nbytes

    @property
    def frozen_bytes(self) -> int:
        """Host memory of the frozen parameters' copies, held once for every snapshot."""
        return self._frozen.nbytes

    @property
    def _copies(self) -> int:
        # The ring, the newest stable one and one snapshot in flight.
        return self.memory_keep + 2

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                ema: dict[str, Any] | None = None,
                extra: dict[str, dict[str, Any]] | None = None) -> None:
        """Start allocating the pinned buffers that snapshots of this state will need (in
        the background; shapes and dtypes only, no device work). Call once the optimizer
        state exists (after the first step); :meth:`take` does it too. ``ema``: the weight
        average's state_dict, ``extra``: the loop's objects' (by name), snapshotted with
        them."""
        model_sd = model.state_dict()
        frozen = self._frozen.names(model, optimizer, model_sd)  # held once, not pooled
        layout = _host_copy.staged_layout({k: v for k, v in model_sd.items() if k not in frozen},
                                          optimizer.state_dict()["state"], ema, extra)
        self._pool.reserve(layout, self._copies)

    def take(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: Any = None, *, clip: float | None = None,
        counters: dict[str, int] | None = None, scheduler_stepped: bool = False,
        controls: dict[str, Any] | None = None, block: bool = False,
        ema: dict[str, Any] | None = None, extra: dict[str, dict[str, Any]] | None = None,
        provisional: bool = False, run: dict[str, Any] | None = None,
    ) -> Checkpoint | None:
        """Snapshot the run at ``step``; usable once its copies are done (see :meth:`poll`).

        ``None``: the pinned buffers it needs are still being allocated (``block``:
        allocate them here instead, as the guard does once at attach). ``ema``: the weight
        average's state_dict (see :mod:`trimtab.client._ema`), snapshotted with the model;
        ``extra``: the state_dicts of the loop's own objects by name (``extra_state``).
        ``provisional``: ``step`` is only a bound, the snapshot stays out of the ring until
        :meth:`settle` gives its step (or drops it). ``run``: the guard's state to resume
        from (:attr:`Checkpoint.run`)."""
        copier = _HostCopier(self._pool, self._streams, block=block)
        model_sd, opt = model.state_dict(), optimizer.state_dict()
        full_sd, frozen_names = model_sd, self._frozen.names(model, optimizer, model_sd)
        if frozen_names:  # copied once (see _frozen); the rest as always
            model_sd = collections.OrderedDict(
                (k, v) for k, v in full_sd.items() if k not in frozen_names)
            if hasattr(full_sd, "_metadata"):
                model_sd._metadata = full_sd._metadata  # type: ignore[attr-defined]
        flat = flatten(model_sd, opt.get("state"))
        planned = None if flat is None else self._planned(copier, model, flat, block)
        if planned is None:  # an unusual shape of state: the generic walk
            # Parameters and optimizer state change only in the optimizer step: their copies
            # run on the side stream. Buffers (batch-norm statistics) may change in a forward.
            params = {p.data_ptr() for p in model.parameters()}
            model_sd = copier(model_sd, side=lambda t: t.data_ptr() in params)
            optim_sd = {k: copier(v, side=(lambda t: True) if k == "state" else None)
                        for k, v in opt.items()}
        else:
            model_sd, state = planned
            optim_sd = {k: state if k == "state" else copier(v) for k, v in opt.items()}
        sched = None if scheduler is None else copier(scheduler.state_dict())
        # The average changes only right after the optimizer step, as the parameters do (and
        # after the fence before it): its copies run on the side stream too.
        ema_sd = None if ema is None else copier(ema, side=lambda t: True)
        # The loop's own objects may change right after guard.step() (an SWA average, its
        # schedule), before the fence of the next optimizer step: their copies run on the
        # training stream, in order before whatever the loop queues next.
        extra_sd = None if extra is None else {name: copier(state)
                                               for name, state in extra.items()}
        self._pool.reserve(copier.layout, self._copies)
        if copier.missing:
            self._pool.give(copier.pinned, copier.pinned_keys)
            self.deferred += 1
            return None
        frozen = None
        if frozen_names:
            frozen = self._frozen.copies(full_sd, frozen_names, copier.queue_owned)
            merged = type(full_sd)()
            for key in full_sd:
                merged[key] = frozen[key].host if key in frozen else model_sd[key]
            if hasattr(model_sd, "_metadata"):
                merged._metadata = model_sd._metadata  # type: ignore[attr-defined]
            model_sd = merged
        events = copier.start()
        if frozen:
            for made in self._frozen.queued:
                made.events = list(events)
            # A copy an earlier snapshot queued and that is still in flight: this one is
            # usable only once it is done too.
            for held in {id(c): c for c in frozen.values()}.values():
                if held not in self._frozen.queued and held.pending():
                    events = [*events, *held.events]
        ckpt = Checkpoint(
            step=step, model=model_sd, optimizer=optim_sd, scheduler=sched,
            rng=capture_rng(), clip=clip, counters=dict(counters or {}),
            scheduler_stepped=scheduler_stepped, controls=dict(controls or {}), ema=ema_sd,
            extra=extra_sd, run=run, _provisional=provisional, frozen=frozen,
        )
        return self._admit(ckpt, copier, events)

    def settle(self, ckpt: Checkpoint, step: int | None,
               counters: dict[str, int] | None = None,
               run: dict[str, Any] | None = None) -> None:
        """Label a provisional snapshot with the step it was taken at, and the guard's
        counters then (it joins the ring once its copies are done); ``step=None``: drop it
        (its buffers go back to the pool, ordered after its copies)."""
        if ckpt not in self._pending:
            return
        if step is None:
            self._pending.remove(ckpt)
            ckpt.fence()  # the next copy into its buffers is ordered after this one
            self._pool.give(ckpt._pinned, ckpt._pinned_keys)
            ckpt._pinned = []
            return
        ckpt.step = step
        ckpt.counters.update(counters or {})
        if run is not None:
            ckpt.run = run
        ckpt._provisional = False
        self.poll()

    def _planned(self, copier: _HostCopier, model: torch.nn.Module, flat: Flat,
                 block: bool) -> tuple[Any, Any] | None:
        """The copies of the model's and the optimizer's state (``"state"``) made with the
        cached :class:`CopyPlan` (built again when the state no longer matches it): the
        same copies as the walk, without walking. Non-tensor values go through ``copier``.
        ``None``: the walk must do it (a tensor without storage)."""
        params = frozenset(p.data_ptr() for p in model.parameters())
        fingerprint = flat.fingerprint(params)
        if fingerprint is None:
            return None
        plan = self._plan
        if plan is None or plan.fingerprint != fingerprint:
            plan = self._plan = CopyPlan(flat, fingerprint, params, _host_copy._staged,
                                         _host_copy._key, side_streams=copier.streams is not None)
        buffers = self._pool.get_many(plan.pool_keys, block)
        copier.layout.update(plan.layout)
        if buffers is None:  # not allocated yet: the snapshot waits (see take)
            copier.missing += len(plan.pool_keys)
            return {}, {}
        copier.pinned.extend(buffers)
        copier.pinned_keys.extend(plan.pool_keys)
        for group, pairs in plan.pairs(flat, buffers).items():
            copier._pairs[group].extend(pairs)
        slots = plan.outputs(flat, buffers)
        # A tensor the walk meets later (in the param groups, the scheduler) that is tied
        # to one planned is not copied twice.
        copier.memo_later = (plan.memo_keys, slots)
        leaves = plan.leaves(slots)
        if all(flat.mask):
            values = leaves
        else:
            it = iter(leaves)
            values = [next(it) if m else copier(v) for v, m in
                      zip(flat.values, flat.mask, strict=True)]
        n = flat.n_model
        src = flat.model_sd
        model_copy = (collections.OrderedDict if isinstance(src, collections.OrderedDict)
                      else dict)(zip(src, values[:n], strict=True))
        if hasattr(src, "_metadata"):  # module versions, read by load_state_dict
            model_copy._metadata = _host_copy._copy_metadata(src._metadata)  # type: ignore[attr-defined]
        state: dict[Any, Any] = {}
        rest = iter(values[n:])
        for (key, inner), size in zip(flat.state.items(), flat.inner_lens, strict=True):
            state[key] = dict(zip(inner, itertools.islice(rest, size), strict=True))
        return model_copy, state

    def _admit(self, ckpt: Checkpoint, copier: _HostCopier,
               events: list[Any] | None = None) -> Checkpoint:
        """Queue ``ckpt``, whose copies ``copier`` started; it counts once they are done."""
        ckpt._events = copier.start() if events is None else events
        ckpt._pinned, ckpt._sources = copier.pinned, copier.sources() if ckpt._events else []
        ckpt._pinned_keys = copier.pinned_keys
        self._pending.append(ckpt)
        self.poll()
        return ckpt

    def fence(self) -> None:
        """Before parameters or optimizer state change in place (the optimizer step, a
        restore): the training streams wait on the device for snapshot copies in flight."""
        for ckpt in self._pending:
            ckpt.fence()

    def poll(self) -> None:
        """Admit the checkpoints whose copies completed, oldest first; never waits."""
        while self._pending and not self._pending[0]._provisional and self._pending[0].ready():
            ckpt = self._pending.popleft()
            old = self._held.pop(ckpt.step, None)
            if old is not None:
                self._stable.discard(old.step)  # a new trajectory's snapshot at the same step
                self._release(old)
            self._held[ckpt.step] = ckpt
            if self.files is not None:
                self.files.write(ckpt)
            self._evict()
        if self.memory_keep < self.keep and len(self._held) > self.memory_keep:
            self._evict()  # files written since: their host copies may go
        if self._retired:
            retired, self._retired = self._retired, []
            for ckpt in retired:
                self._release(ckpt)

    def _release(self, ckpt: Checkpoint, cancel: bool = True) -> None:
        """``ckpt`` left memory: its buffers go back to the pool once the writer is done."""
        free = self.files.forget(ckpt, cancel) if self.files is not None else True
        if not free:
            self._retired.append(ckpt)
        elif ckpt._pinned:
            self._pool.give(ckpt._pinned, ckpt._pinned_keys)
            ckpt._pinned = []

    def _evict(self) -> None:
        steps = sorted(self._held)
        keep = kept(steps, self.stable_step, self.keep)
        for step in steps:
            if step not in keep:
                self._release(self._held.pop(step))
        if self.memory_keep < self.keep and self.files is not None:
            # Fewer in memory than on disk: the older ones stay as files once written.
            written = [s for s in sorted(self._held) if self.files.has(s)]
            for step in written[: max(0, len(self._held) - self.memory_keep)]:
                self._release(self._held.pop(step), cancel=False)

    def steps(self) -> list[int]:
        """Steps of the usable checkpoints, memory and disk, oldest first (at most 256)."""
        disk = self.files.steps() if self.files is not None else []
        return sorted(set(self._held) | set(disk))[-256:]

    def stable_steps(self) -> list[int]:
        """Steps marked stable that are still held (memory or disk), oldest first."""
        disk = set(self.files.steps()) if self.files is not None else set()
        self._stable = {s for s in self._stable if s in self._held or s in disk}
        return sorted(self._stable)

    @property
    def stable_step(self) -> int | None:
        """The newest stable checkpoint's step (``None``: none)."""
        stable = self.stable_steps()
        return stable[-1] if stable else None

    def mark_stable(self, step: int) -> bool:
        """Mark the checkpoint at ``step`` stable; False when no such checkpoint is held."""
        if step in self._held:
            self._held[step].stable = True
        elif self.files is None or not self.files.has(step):
            return False
        self._stable.add(step)
        if self.files is not None:
            self.files.mark(step)
        self._evict()  # an older stable one may no longer need keeping
        return True

    def _load(self, step: int) -> Checkpoint | None:
        if step in self._held:
            return self._held[step]
        payload = self.files.load(step) if self.files is not None else None
        return None if payload is None else Checkpoint.from_payload(payload)

    def stable(self, at_most: int | None = None) -> Checkpoint | None:
        """The newest stable checkpoint (at or before ``at_most``) that loads: from memory,
        else from disk with its checksum checked; a file that fails is skipped."""
        for step in reversed(self.stable_steps()):
            if at_most is None or step <= at_most:
                ckpt = self._load(step)
                if ckpt is not None:
                    ckpt.stable = True
                    return ckpt
        return None

    def restore(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: Any = None, ema: AveragedModel | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> tuple[Checkpoint | None, str | None]:
        """Restore the stable checkpoint at ``step`` into the run (``ema``: and its weight
        average; ``extra_state``: and the loop's own objects, by name); drop every newer one.

        Returns the checkpoint restored (``None``: nothing was touched) and a note saying
        why not, that an unreadable file made it fall back to an older stable one, or that
        an object of ``extra_state`` could not be put back (the rest was).
        """
        stable = self.stable_steps()
        if step not in stable:
            held = ", ".join(map(str, stable)) or "none"
            return None, f"rollback_to={step}: no stable checkpoint at that step (stable: {held})"
        ckpt = self.stable(at_most=step)
        if ckpt is None:
            return None, f"rollback_to={step}: no stable checkpoint at or before it loads"
        self.fence()  # copies still reading the live tensors finish before they are overwritten
        # A sharded checkpoint's restore takes neither an average nor extra state.
        own: dict[str, Any] = {} if ema is None else {"ema": ema}
        if extra_state:
            own["extra_state"] = extra_state
        notes = []
        try:
            ckpt.restore(model, optimizer, scheduler, **own)
        except Unrestorable as exc:  # raised before anything was touched
            return None, f"rollback_to={step}: {exc}"
        except PartlyRestored as exc:  # the rest restored: the rollback stands, and says so
            notes.append(f"rollback_to={step}: {exc}")
        self._drop_after(ckpt.step)
        if ckpt.step not in self._held:  # loaded from disk: keep it at hand for next time
            self._held[ckpt.step] = ckpt
            self._evict()
        if ckpt.step != step:
            notes.insert(0, f"rollback_to={step}: that checkpoint did not load (see the log); "
                            f"restored the stable one at step {ckpt.step}")
        return ckpt, "; ".join(notes) or None

    def restate(self, step: int, run: dict[str, Any], controls: dict[str, Any]) -> None:
        """A rollback restored the checkpoint at ``step``, and the run goes on from it with
        the rollback's values: a process resumed from its file must too (the cut, the
        rollback counted, its command applied), not with those of when it was taken. The
        checkpoint keeps ``controls`` for a later rollback to it; its :attr:`guard_state`
        and its manifest say the state after the rollback."""
        ckpt = self._held.get(step)
        if ckpt is None or ckpt.run is None:
            return
        ckpt.resume = {"run": {k: v for k, v in run.items() if k != "scheduler_follows"},
                       "controls": dict(controls)}
        if self.files is not None:
            self.files.restate(ckpt)

    def hold(self) -> bool:
        """Queue file writes without doing them until :meth:`release` (see
        :meth:`CheckpointFiles.hold`); False when there are no files to hold."""
        if self.files is None:
            return False
        self.files.hold()
        return True

    def release(self) -> None:
        """Write what was held, and what comes after."""
        if self.files is not None:
            self.files.release()

    def adopt(self, run_id: str, step: int) -> bool:
        """Take over the files run ``run_id``'s earlier processes left, as it resumes at
        ``step`` in this one (see :meth:`CheckpointFiles.adopt`); True when the file at
        ``step`` itself is stable (the snapshot of the resumed state is then marked stable:
        the registration tells the controller so). An older stable file counts for none:
        it would send a fault soon after the resume further back than the state resumed
        from (a preemption trial: a Trainer resumed at step 200 from its own checkpoint was
        rolled back to step 0, the old process's stable file); the controller marks the
        resumed state itself."""
        if self.files is None:
            return False
        return any(e.stable and e.step == step for e in self.files.adopt(run_id, step))

    def drop_all(self) -> None:
        """Forget every snapshot, stable or not, and delete the files this store wrote."""
        self.fence()
        self._drop_after(-1)

    def _drop_after(self, step: int) -> None:
        # Later snapshots belong to the trajectory just abandoned.
        for s in [s for s in self._held if s > step]:
            self._release(self._held.pop(s))
        for ckpt in [c for c in self._pending if c.step > step]:
            ckpt.fence()  # the next copy into its buffers is ordered after this one
            self._pool.give(ckpt._pinned, ckpt._pinned_keys)
            ckpt._pinned = []
        self._pending = collections.deque(c for c in self._pending if c.step <= step)
        self._stable = {s for s in self._stable if s <= step}
        if self.files is not None:
            self.files.drop_after(step)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued file writes are done (for tests and shutdown)."""
        return True if self.files is None else self.files.flush(timeout_s)

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Finish queued file writes (at most ``timeout_s``) and stop the writer."""
        self.fence()  # copies in flight finish before their sources may be freed
        if self.files is not None:
            self.files.close(timeout_s)


def load_stable(directory: str | os.PathLike, *, ranks_agree: bool = False
                ) -> Checkpoint | None:
    """The newest stable checkpoint in ``directory`` whose file passes its checksum.

    Files that fail are skipped with a WARNING naming them, and the next older stable
    one is tried; ``None`` when none loads. Use it to resume a run after a crash, after
    ``attach``: ``ckpt = load_stable(d); ckpt.restore(model, optimizer, scheduler);
    guard.load_state_dict(ckpt.guard_state)``. The last makes it the same run on the
    controller, at ``ckpt.step``, with trimtab's multipliers as they were. ``restore``
    with ``ema=guard.ema_model`` (or an ``AveragedModel`` of your own) puts the weight
    average back too, and with ``extra_state={name: obj}`` the objects the run was
    attached with as its ``extra_state``.

    ``ranks_agree=True`` (DDP, each rank resuming from its own directory): every rank of
    the initialised default process group calls it, and every rank loads the same step.
    Each rank writes and marks its own files, so a job killed between them (a preemption
    while a stable mark was being written) may leave rank 0's newest stable checkpoint at
    step 300 and rank 1's at 200: loaded as is, the replicas would start apart. The ranks
    take the newest step that every rank holds a file of and that is stable on at least
    one (the controller marks a step stable on every rank at once; only the writing lags),
    whose file every rank loads; ``None`` on every rank when there is none.

    "Newest" is the most recently written or marked, not the highest step: a directory may
    also hold an earlier run's files, or those of a trajectory a process left behind when
    it resumed from an older save of yours, at higher steps (a WARNING names them). Two small
    collectives, and one more per step tried. Without a process group of more than one
    rank it is the plain load.
    """
    if ranks_agree:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _load_agreed(directory, dist)
    stable = _newest_first([e for e in scan(directory) if e.stable])
    if stable and stable[0].step != max(e.step for e in stable):
        log.warning("trimtab: %s holds stable checkpoints at higher steps (%s) than the newest "
                    "one marked (%d), of an earlier run or of a trajectory a resume left "
                    "behind; the newest marked is the one loaded", directory,
                    sorted(e.step for e in stable if e.step > stable[0].step), stable[0].step)
    for entry in stable:
        if (payload := read_payload(directory, entry.step)) is not None:
            ckpt = Checkpoint.from_payload(payload)
            ckpt.stable = True
            return ckpt
    return None


def _newest_first(entries: list[Any]) -> list[Any]:
    """Checkpoints, the most recently written or marked first (then the higher step)."""
    return sorted(entries, key=lambda e: (e.written, e.step), reverse=True)


#: Checkpoints of one directory compared across ranks (the newest of them).
_AGREE_MAX = 256


def _load_agreed(directory: str | os.PathLike, dist: Any) -> Checkpoint | None:
    """:func:`load_stable` with ``ranks_agree``: see there."""
    entries = _newest_first(scan(directory))[:_AGREE_MAX]
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    mine = torch.full((3, _AGREE_MAX), -1, dtype=torch.int64)
    for i, e in enumerate(entries):
        mine[0, i], mine[1, i], mine[2, i] = e.step, int(e.stable), e.written
    mine = mine.to(device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    rows = [t.tolist() for t in every]
    held = [{s: bool(f) for s, f in zip(r[0], r[1], strict=True) if s >= 0} for r in rows]
    written: dict[int, int] = {}
    for r in rows:
        for s, w in zip(r[0], r[2], strict=True):
            if s >= 0:
                written[s] = max(written.get(s, 0), w)
    common = set.intersection(*(set(h) for h in held))
    # The most recently written or marked first, on every rank alike (the same table).
    tried = sorted((s for s in common if any(h[s] for h in held)),
                   key=lambda s: (written[s], s), reverse=True)
    newest = [max((s for s, f in h.items() if f), default=None) for h in held]
    if len(set(newest)) > 1:
        log.warning("trimtab: the ranks' newest stable checkpoints differ (%s, by rank): "
                    "a job stopped while a stable mark was being written; every rank loads "
                    "the newest step they all hold and one marked stable", newest)
    for step in tried:
        payload = read_payload(directory, step)
        ok = torch.tensor([int(payload is not None)], dtype=torch.int64, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() == 1:
            ckpt = Checkpoint.from_payload(payload)
            ckpt.stable = True
            return ckpt
    if tried or any(n is not None for n in newest):
        log.warning("trimtab: no checkpoint step loads on every rank (newest stable by rank: "
                    "%s); none loaded", newest)
    return None
