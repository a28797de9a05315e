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
import itertools
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trimtab.protocol import wire

from ._checkpoint_files import CheckpointFiles, read_payload, scan
from ._copy_plan import CopyPlan, Flat, flatten
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

#: A pinned buffer's kind: (shape, dtype).
_Key = tuple


def _key(t: torch.Tensor) -> _Key:
    return tuple(t.shape), t.dtype


def _staged(t: torch.Tensor) -> bool:
    """Whether ``t`` is copied into a pooled pinned buffer (asynchronously) or cloned."""
    return t.is_cuda and t.layout == torch.strided


def _empty_host(key: _Key) -> torch.Tensor:
    shape, dtype = key
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


class _PinnedPool:
    """Pinned host buffers for snapshots: allocated ahead of need by a background thread,
    reused from one snapshot to the next, never allocated on the training thread.

    :meth:`reserve` says how many buffers of each kind (shape, dtype) to hold in all;
    a background thread, ``trimtab-pinned-alloc``, allocates the missing ones (pinning
    memory is slow: ~1 s per GB, and it must not stall a step). :meth:`get` hands out a
    free one or ``None``; :meth:`give` takes one back. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[_Key, list[torch.Tensor]] = collections.defaultdict(list)
        self._want: collections.Counter[_Key] = collections.Counter()
        self._have: collections.Counter[_Key] = collections.Counter()
        self._thread: threading.Thread | None = None
        #: Bytes of pinned host memory allocated so far (free and in use).
        self.nbytes = 0

    def reserve(self, layout: collections.Counter[_Key], copies: int) -> None:
        """Hold ``copies`` snapshots' worth of ``layout`` (never less than asked before)."""
        with self._lock:
            for key, n in layout.items():
                self._want[key] = max(self._want[key], n * copies)
            short = any(self._have[k] < n for k, n in self._want.items())
            if short and self._thread is None:
                self._thread = threading.Thread(target=self._allocate, daemon=True,
                                                name="trimtab-pinned-alloc")
                self._thread.start()

    def ready(self) -> bool:
        """Whether every buffer reserved is allocated."""
        with self._lock:
            return all(self._have[k] >= n for k, n in self._want.items())

    def _allocate(self) -> None:
        while True:
            with self._lock:
                key = next((k for k, n in self._want.items() if self._have[k] < n), None)
                if key is None:
                    self._thread = None
                    return
            try:
                buf = _empty_host(key)  # torch.empty releases the GIL while it pins
            except Exception:  # out of pinned memory: snapshots wait, training goes on
                log.exception("trimtab could not allocate pinned host memory for snapshots")
                with self._lock:
                    self._want.clear()
                    self._thread = None
                return
            with self._lock:
                self._free[key].append(buf)
                self._have[key] += 1
                self.nbytes += buf.numel() * buf.element_size()

    def get(self, key: _Key, block: bool = False) -> torch.Tensor | None:
        """A free buffer of ``key``; ``None`` when none is (``block``: allocate one here)."""
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            if not block:
                return None
            self._have[key] += 1
            self._want[key] = max(self._want[key], self._have[key])
        buf = _empty_host(key)
        with self._lock:
            self.nbytes += buf.numel() * buf.element_size()
        return buf

    def get_many(self, keys: list[_Key], block: bool = False) -> list[torch.Tensor] | None:
        """A free buffer of each of ``keys`` (one lock), or ``None`` and none taken when any
        is missing (``block``: allocate the missing ones here)."""
        out: list[Any] = []
        with self._lock:
            pop = {k: free.pop for k, free in self._free.items() if free}
            try:
                for key in keys:
                    out.append(pop[key]())
            except (KeyError, IndexError):  # one missing
                if not block:
                    for k, b in zip(keys, out, strict=False):
                        self._free[k].append(b)
                    return None
                for key in keys[len(out):]:
                    free = self._free.get(key)
                    out.append(free.pop() if free else None)
        if block:
            out = [self.get(k, True) if b is None else b for k, b in zip(keys, out, strict=True)]
        return out

    def give(self, buffers: list[torch.Tensor], keys: list[_Key] | None = None) -> None:
        """Take buffers back for the next snapshots (``keys``: theirs, when known)."""
        if keys is None or len(keys) != len(buffers):
            keys = [_key(b) for b in buffers]
        with self._lock:
            for k, b in zip(keys, buffers, strict=True):
                self._free[k].append(b)


class _CopyStreams:
    """One side stream per CUDA device for snapshot copies.

    A copy starts after everything already queued on the training stream (the optimizer
    step just taken), runs beside the next steps' forward and backward, and the training
    stream waits for it (:func:`fence`, a device-side wait) only before the next step
    changes parameters or optimizer state in place. Nothing waits on the host.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def copy(self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Queue ``dst.copy_(src)`` for every pair on ``device``'s side stream; its event."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # after the step just queued
        with torch.cuda.stream(stream):
            _copy_all(pairs)
            done = torch.cuda.Event()
            done.record(stream)
        return done


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src, non_blocking=True)`` for every pair, in one call where torch has
    ``_foreach_copy_`` (its loop over the pairs runs in C++: hundreds of tensors cost one
    Python call on the snapshot step instead of one each)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and pairs:
        foreach([d for d, _ in pairs], [s for _, s in pairs], non_blocking=True)
        return
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)


def _current_copy(device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Queue the copies on the training stream itself (tensors a forward pass may change in
    place, such as batch-norm statistics): stream order keeps them exact."""
    with torch.cuda.device(device):
        _copy_all(pairs)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
    return done


def _fence(device: torch.device, event: Any) -> None:
    """Make the training stream of ``device`` wait for ``event`` (on the device, not here)."""
    torch.cuda.current_stream(device).wait_event(event)


#: Values copied as they are (immutable); exact types, not subclasses.
_ATOMIC = frozenset({type(None), bool, int, float, str, bytes})


def _copy_metadata(metadata: Any) -> Any:
    """``copy.deepcopy`` of a state_dict's ``_metadata`` (a dict of small dicts of
    versions): the inner dicts of plain values are copied with ``dict()``, ~10x faster."""
    if type(metadata) not in (dict, collections.OrderedDict):
        return copy.deepcopy(metadata)
    out = type(metadata)()
    for k, v in metadata.items():
        if type(v) is dict and all(type(x) in _ATOMIC for x in v.values()):
            out[k] = dict(v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _HostCopier:
    """Copies nested state (dicts, lists, tuples, tensors) to the host without a sync.

    CUDA tensors go into pooled pinned buffers; the copies are queued by :meth:`start`
    once the whole state has buffers (``missing`` counts those it could not get: the
    snapshot is then abandoned, nothing was queued). ``side(t)`` says whether ``t`` only
    changes in the optimizer step (parameters, optimizer state): those are copied on the
    side stream, the rest on the training stream. CPU tensors are cloned here.
    """

    def __init__(self, pool: _PinnedPool, streams: _CopyStreams | None = None,
                 block: bool = False) -> None:
        self.pool = pool
        self.streams = streams
        self.block = block
        self.pinned: list[torch.Tensor] = []
        self.pinned_keys: list[_Key] = []  # their pool keys
        #: (memo keys, copies) of tensors copied outside the walk, put in the memo on
        #: the first tensor the walk meets (see CheckpointStore._planned).
        self.memo_later: tuple[list, list] | None = None
        #: Staged tensors by kind, for :meth:`_PinnedPool.reserve`.
        self.layout: collections.Counter[_Key] = collections.Counter()
        self.missing = 0
        self._pairs: dict[tuple[torch.device, bool], list] = collections.defaultdict(list)
        self._memo: dict[tuple, torch.Tensor | None] = {}
        self._side: Any = None

    def __call__(self, obj: Any, side: Any = None) -> Any:
        """The host copy of ``obj``; ``side``: a predicate on tensors (default: none)."""
        self._side = side
        return self._tree(obj)

    def _tree(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self._tree(v)
            if hasattr(obj, "_metadata"):  # module versions, read by load_state_dict
                out._metadata = _copy_metadata(obj._metadata)  # type: ignore[attr-defined]
            return out
        if isinstance(obj, list):
            if all(type(v) in _ATOMIC for v in obj):  # a param group's indices
                return list(obj)
            return [self._tree(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self._tree(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor | None:
        t = t.detach()
        key = None
        if self.memo_later is not None:
            keys, copies = self.memo_later
            self.memo_later = None
            self._memo.update((k, v) for k, v in zip(keys, copies, strict=True)
                              if k is not None)
        if t.layout == torch.strided and t.numel():
            # Tied weights appear once per name in a state_dict: copy each storage view once.
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key in self._memo:
                return self._memo[key]
        if _staged(t):
            kind = _key(t)
            self.layout[kind] += 1
            buf = self.pool.get(kind, self.block)
            if buf is None:
                self.missing += 1
            else:
                self.pinned.append(buf)
                self.pinned_keys.append(kind)
                side = self.streams is not None and self._side is not None and self._side(t)
                self._pairs[(t.device, side)].append((buf, t))
            out = buf
        elif t.device.type == "cpu":
            out = t.clone()
        else:
            # Other devices and layouts (sparse, MPS, XLA): a plain copy, which may wait.
            out = t.to("cpu", copy=True)
        if key is not None:
            self._memo[key] = out
        return out

    def start(self) -> list[tuple[torch.device, Any, bool]]:
        """Queue the copies; ``(device, event, on the side stream)`` per group of copies."""
        events = []
        for (device, side), pairs in self._pairs.items():
            if side:
                assert self.streams is not None
                events.append((device, self.streams.copy(device, pairs), True))
            else:
                events.append((device, _current_copy(device, pairs), False))
        return events

    def sources(self) -> list[torch.Tensor]:
        """The device tensors read by copies in flight (kept alive until they are done)."""
        return [src for pairs in self._pairs.values() for _, src in pairs]


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
    #: (device, event, copied on the side stream) per group of copies in flight.
    _events: list[Any] = field(default_factory=list, repr=False)
    _pinned: list[torch.Tensor] = field(default_factory=list, repr=False)
    _pinned_keys: list[Any] = field(default_factory=list, repr=False)
    #: The device tensors its copies read, alive until the copies are done.
    _sources: list[torch.Tensor] = field(default_factory=list, repr=False)
    _fenced: bool = field(default=False, repr=False)

    def ready(self) -> bool:
        """Whether its host copies are complete (never waits: ``event.query()``)."""
        if self._events and all(e.query() for _, e, _ in self._events):
            self._events, self._sources = [], []
        return not self._events

    def fence(self) -> None:
        """Make the training streams wait (on the device) for its side-stream copies, before
        anything changes their sources in place; once per checkpoint, never a host wait."""
        if self._fenced:
            return
        self._fenced = True
        for device, event, side in self._events:
            if side:
                _fence(device, event)

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


def _tensors(obj: Any):
    """Every tensor in nested containers."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# -- the store -------------------------------------------------------------------------------


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
        #: Snapshots not taken because their pinned buffers were not allocated yet.
        self.deferred = 0

    @property
    def host_bytes(self) -> int:
        """Pinned host memory allocated for snapshots (0 when nothing is on CUDA)."""
        return self._pool.nbytes

    @property
    def _copies(self) -> int:
        # The ring, the newest stable one and one snapshot in flight.
        return self.memory_keep + 2

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start allocating the pinned buffers that snapshots of this state will need (in
        the background; shapes and dtypes only, no device work). Call once the optimizer
        state exists (after the first step); :meth:`take` does it too."""
        layout: collections.Counter[_Key] = collections.Counter()
        seen: set[tuple] = set()
        for sd in (model.state_dict(), optimizer.state_dict()["state"]):
            for t in _tensors(sd):
                if _staged(t) and t.numel():
                    mark = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                    if mark not in seen:
                        seen.add(mark)
                        layout[_key(t)] += 1
        self._pool.reserve(layout, self._copies)

    def take(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: Any = None, *, clip: float | None = None,
        counters: dict[str, int] | None = None, scheduler_stepped: bool = False,
        controls: dict[str, Any] | None = None, block: bool = False,
    ) -> Checkpoint | None:
        """Snapshot the run at ``step``; usable once its copies are done (see :meth:`poll`).

        ``None``: the pinned buffers it needs are still being allocated (``block``:
        allocate them here instead, as the guard does once at attach)."""
        copier = _HostCopier(self._pool, self._streams, block=block)
        model_sd, opt = model.state_dict(), optimizer.state_dict()
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
        self._pool.reserve(copier.layout, self._copies)
        if copier.missing:
            self._pool.give(copier.pinned, copier.pinned_keys)
            self.deferred += 1
            return None
        events = copier.start()
        ckpt = Checkpoint(
            step=step, model=model_sd, optimizer=optim_sd, scheduler=sched,
            rng=capture_rng(), clip=clip, counters=dict(counters or {}),
            scheduler_stepped=scheduler_stepped, controls=dict(controls or {}),
        )
        return self._admit(ckpt, copier, events)

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
            plan = self._plan = CopyPlan(flat, fingerprint, params, _staged, _key,
                                         side_streams=copier.streams is not None)
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
            model_copy._metadata = _copy_metadata(src._metadata)  # type: ignore[attr-defined]
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
        while self._pending and self._pending[0].ready():
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
        keep = set(steps[-self.keep:])
        stable = self.stable_steps()
        if stable and stable[-1] in self._held:
            keep.add(stable[-1])
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
        self.fence()  # copies still reading the live tensors finish before they are overwritten
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
