"""Checkpoints of a training run: a ring in host memory, optionally mirrored on disk.

A :class:`Checkpoint` holds everything needed to put a run back where it was: the
model's and optimizer's state (host copies), the LR scheduler's state, the RNG states
(torch CPU, every CUDA device, numpy's global generator, Python's ``random``), the
clipping threshold (the other knobs live in the optimizer's param groups) and the
guard's step counters.

A :class:`CheckpointStore` keeps the ``keep`` newest checkpoints in host memory plus,
always, the newest one marked stable. Copies never stall the device: CPU tensors are
cloned; CUDA tensors are copied into pinned host buffers with ``non_blocking=True`` and
a CUDA event is recorded; the checkpoint becomes usable (listed, restorable, written)
only once :meth:`CheckpointStore.poll`, called at later step boundaries, sees its events
completed with ``event.query()`` — the training thread never synchronizes.

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
import copy
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import wire
from ._checkpoint_files import CheckpointFiles, read_payload, scan
from ._knobs import knobs_of

__all__ = ["Checkpoint", "CheckpointStore", "load_stable", "capture_rng", "restore_rng",
           "reseed_rng"]

log = logging.getLogger("trimtab.client")

_PAYLOAD_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "clip", "counters",
                 "scheduler_stepped", "controls")


# -- RNG -------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training step may draw from, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = None
    # Only once CUDA is in use: asking earlier would initialize it. get_rng_state_all reads
    # the generators' seed and offset on the host; it does not wait for the device.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        # As a tensor and plain numbers, so a file loads with weights_only=True.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("trimtab checkpoint has CUDA RNG states for %d devices, this process "
                        "sees %d; CUDA RNG states not restored", len(cuda),
                        torch.cuda.device_count())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def reseed_rng(salt: int) -> None:
    """Re-seed every RNG :func:`capture_rng` covers from its own state and ``salt``.

    After a rollback the restored RNG states would draw exactly what they drew the first
    time: a loop that takes its batches from torch's RNG (nanoGPT's ``torch.randint``)
    would meet the batches that led to the fault again. Each generator draws one number
    from its restored state, mixes ``salt`` (the rollback count) in and is seeded with the
    result: deterministic for a given run and rollback, different from the first pass and
    from one rollback to the next. Host arithmetic and a seed per CUDA device; no sync.
    """
    mix = 0x9E3779B97F4A7C15 * (salt + 1)

    def seed(x: int) -> int:
        return (x ^ mix) % (2**63 - 1)

    torch.manual_seed(seed(int(torch.randint(2**62, (1,)).item())))  # CPU generator, host
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            # The Philox generator's seed and offset, read on the host (no device work).
            state = tuple(torch.cuda.get_rng_state(device).tolist())
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed(hash(state) & (2**62 - 1)))
    np.random.seed(seed(int(np.random.randint(0, 2**31 - 1))) % 2**32)
    random.seed(seed(random.getrandbits(62)))


# -- host copies -----------------------------------------------------------------------------


class _PinnedPool:
    """Pinned host buffers of evicted checkpoints, reused by the next snapshot."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = collections.defaultdict(list)

    def get(self, like: torch.Tensor) -> torch.Tensor:
        free = self._free.get((tuple(like.shape), like.dtype))
        if free:
            return free.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def give(self, buffers: list[torch.Tensor]) -> None:
        for b in buffers:
            self._free[(tuple(b.shape), b.dtype)].append(b)

    def trim(self) -> None:
        """Free what the last snapshot did not reuse: the pool never outgrows one snapshot."""
        self._free.clear()


class _HostCopier:
    """Copies nested state (dicts, lists, tuples, tensors) to the host without a sync."""

    def __init__(self, pool: _PinnedPool) -> None:
        self.pool = pool
        self.pinned: list[torch.Tensor] = []
        self.devices: set[torch.device] = set()
        self._memo: dict[tuple, torch.Tensor] = {}

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self(v)
            if hasattr(obj, "_metadata"):  # module versions, read by load_state_dict
                out._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
            return out
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        key = None
        if t.layout == torch.strided and t.numel():
            # Tied weights appear once per name in a state_dict: copy each storage view once.
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key in self._memo:
                return self._memo[key]
        if t.is_cuda and t.layout == torch.strided:
            buf = self.pool.get(t)
            # Asynchronous device->pinned-host copy, queued on t's device's current stream
            # behind the optimizer step that produced t and ahead of the next one that will
            # change it in place: stream order makes the copy exact without a host sync.
            buf.copy_(t, non_blocking=True)
            self.pinned.append(buf)
            self.devices.add(t.device)
            out = buf
        elif t.device.type == "cpu":
            out = t.clone()
        else:
            # Other devices and layouts (sparse, MPS, XLA): a plain copy, which may wait.
            out = t.to("cpu", copy=True)
        if key is not None:
            self._memo[key] = out
        return out

    def events(self) -> list[Any]:
        """One event per CUDA device copied from, recorded after its copies."""
        events = []
        for device in self.devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return events


# -- the checkpoint --------------------------------------------------------------------------


@dataclass(eq=False)
class Checkpoint:
    """One restorable state of a run, in host memory.

    ``scheduler_stepped`` says the snapshot was taken after the scheduler stepped for
    the coming optimizer step (the snapshot at attach time), not before (all others).
    """

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]
    clip: float | None = None
    counters: dict[str, int] = field(default_factory=dict)
    scheduler_stepped: bool = False
    #: trimtab's knobs in force: multipliers, commanded momentum (see ``Actuator``).
    controls: dict[str, Any] = field(default_factory=dict)
    stable: bool = False
    #: Set while the writer thread serializes it (read under the writer's lock).
    writing: bool = field(default=False, repr=False)
    _events: list[Any] = field(default_factory=list, repr=False)
    _pinned: list[torch.Tensor] = field(default_factory=list, repr=False)

    def ready(self) -> bool:
        """Whether its host copies are complete (never waits: ``event.query()``)."""
        if self._events and all(e.query() for e in self._events):
            self._events = []
        return not self._events

    @property
    def knobs(self) -> wire.Knobs:
        """The user's own knob values when it was taken (the optimizer's param groups hold
        them between steps) and the clip; :attr:`controls` has trimtab's multipliers."""
        return knobs_of(self.optimizer["param_groups"], self.clip)

    def payload(self) -> dict[str, Any]:
        """What goes into its file: containers, numbers, strings and tensors only."""
        return {"format": 1, **{k: getattr(self, k) for k in _PAYLOAD_KEYS}}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Checkpoint:
        # Files written before the knob model have no controls: the user's values held.
        return cls(**{k: payload[k] for k in _PAYLOAD_KEYS if k in payload})

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any = None) -> None:
        """Load model, optimizer, scheduler and RNG states (the checkpoint stays reusable)."""
        # Loading copies into the live tensors (a host-to-device copy that waits on CUDA:
        # a rollback is rare and the run is going nowhere until it is done).
        model.load_state_dict(self.model)
        _load_optimizer(optimizer, self.optimizer)
        if scheduler is not None and self.scheduler is not None:
            # load_state_dict adopts the dict's lists: give it a copy, keep ours intact.
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        restore_rng(self.rng)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    # Optimizer.load_state_dict keeps tensors already on the param's device and dtype
    # rather than copying them: without the deepcopy, training would write into ours.
    live = [{k: v for k, v in g.items() if isinstance(v, torch.Tensor)}
            for g in optimizer.param_groups]
    optimizer.load_state_dict(copy.deepcopy(state))
    # A tensor lr (capturable or fused steps) stays the same tensor, on its device.
    for group, tensors in zip(optimizer.param_groups, live, strict=False):
        for key, tensor in tensors.items():
            if isinstance(group.get(key), torch.Tensor):
                tensor.copy_(group[key])
                group[key] = tensor


# -- the store -------------------------------------------------------------------------------


class CheckpointStore:
    """The ``keep`` newest checkpoints in host memory, plus the newest stable one.

    With ``directory``, every checkpoint is also written there off the training thread
    once its host copy is complete; the ``keep`` newest files plus the newest stable
    one are kept. All methods are for the training thread.

    >>> store = CheckpointStore(keep=3, directory=None)
    >>> store.steps(), store.stable_step
    ([], None)
    """

    def __init__(self, keep: int = 3, directory: str | os.PathLike | None = None) -> None:
        if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= 255):
            raise ValueError(f"keep={keep!r} is invalid; allowed: an int from 1 to 255")
        self.keep = keep
        self.files = None if directory is None else CheckpointFiles(directory, keep)
        self._held: dict[int, Checkpoint] = {}
        self._pending: collections.deque[Checkpoint] = collections.deque()
        self._stable: set[int] = set()
        self._pool = _PinnedPool()

    def take(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: Any = None, *, clip: float | None = None,
        counters: dict[str, int] | None = None, scheduler_stepped: bool = False,
        controls: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Snapshot the run at ``step``; usable once its copies are done (see :meth:`poll`)."""
        copier = _HostCopier(self._pool)
        ckpt = Checkpoint(
            step=step, model=copier(model.state_dict()), optimizer=copier(optimizer.state_dict()),
            scheduler=None if scheduler is None else copier(scheduler.state_dict()),
            rng=capture_rng(), clip=clip, counters=dict(counters or {}),
            scheduler_stepped=scheduler_stepped, controls=dict(controls or {}),
        )
        return self._admit(ckpt, copier)

    def _admit(self, ckpt: Checkpoint, copier: _HostCopier) -> Checkpoint:
        """Queue ``ckpt``, whose copies ``copier`` started; it counts once they are done."""
        ckpt._events, ckpt._pinned = copier.events(), copier.pinned
        self._pool.trim()
        self._pending.append(ckpt)
        self.poll()
        return ckpt

    def poll(self) -> None:
        """Admit the checkpoints whose copies completed, oldest first; never waits."""
        while self._pending and self._pending[0].ready():
            ckpt = self._pending.popleft()
            old = self._held.pop(ckpt.step, None)
            if old is not None:
                self._stable.discard(old.step)  # a new trajectory's snapshot at the same step
            self._held[ckpt.step] = ckpt
            if self.files is not None:
                self.files.write(ckpt)
            self._evict()

    def _evict(self) -> None:
        steps = sorted(self._held)
        keep = set(steps[-self.keep:])
        stable = self.stable_steps()
        if stable and stable[-1] in self._held:
            keep.add(stable[-1])
        for step in steps:
            if step not in keep:
                ckpt = self._held.pop(step)
                free = self.files.forget(ckpt) if self.files is not None else True
                if free and ckpt._pinned:
                    self._pool.give(ckpt._pinned)

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
        scheduler: Any = None,
    ) -> tuple[Checkpoint | None, str | None]:
        """Restore the stable checkpoint at ``step`` into the run; drop every newer one.

        Returns the checkpoint restored (``None``: nothing was touched) and a note saying
        why not, or that an unreadable file made it fall back to an older stable one.
        """
        stable = self.stable_steps()
        if step not in stable:
            held = ", ".join(map(str, stable)) or "none"
            return None, f"rollback_to={step}: no stable checkpoint at that step (stable: {held})"
        ckpt = self.stable(at_most=step)
        if ckpt is None:
            return None, f"rollback_to={step}: no stable checkpoint at or before it loads"
        ckpt.restore(model, optimizer, scheduler)
        self._drop_after(ckpt.step)
        if ckpt.step not in self._held:  # loaded from disk: keep it at hand for next time
            self._held[ckpt.step] = ckpt
            self._evict()
        if ckpt.step != step:
            return ckpt, (f"rollback_to={step}: that checkpoint did not load (see the log); "
                          f"restored the stable one at step {ckpt.step}")
        return ckpt, None

    def _drop_after(self, step: int) -> None:
        # Later snapshots belong to the trajectory just abandoned.
        for s in [s for s in self._held if s > step]:
            ckpt = self._held.pop(s)
            if self.files is not None:
                self.files.forget(ckpt)
        self._pending = collections.deque(c for c in self._pending if c.step <= step)
        self._stable = {s for s in self._stable if s <= step}
        if self.files is not None:
            self.files.drop_after(step)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued file writes are done (for tests and shutdown)."""
        return True if self.files is None else self.files.flush(timeout_s)

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Finish queued file writes (at most ``timeout_s``) and stop the writer."""
        if self.files is not None:
            self.files.close(timeout_s)


def load_stable(directory: str | os.PathLike) -> Checkpoint | None:
    """The newest stable checkpoint in ``directory`` whose file passes its checksum.

    Files that fail are skipped with a WARNING naming them, and the next older stable
    one is tried; ``None`` when none loads. Use it to resume a run after a crash:
    ``ckpt = load_stable(d); ckpt.restore(model, optimizer, scheduler)``.
    """
    for entry in reversed(scan(directory)):
        if entry.stable and (payload := read_payload(directory, entry.step)) is not None:
            ckpt = Checkpoint.from_payload(payload)
            ckpt.stable = True
            return ckpt
    return None
