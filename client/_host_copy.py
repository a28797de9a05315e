"""Host copies of a run's state for snapshots, without a sync.

CUDA tensors are copied into pinned host buffers with ``non_blocking=True``: the buffers
come from a pool (:class:`_PinnedPool`) that a background thread fills ahead of need and
that snapshots reuse; the copies of parameters and optimizer state run on a side stream
per device (:class:`_CopyStreams`), the rest on the training stream, and each group of
copies records a CUDA event that the store later asks with ``event.query()``. CPU
tensors are cloned. :class:`_HostCopier` walks nested state (dicts, lists, tuples,
tensors) and queues the copies; :mod:`trimtab.client._copy_plan` replaces the walk for
the usual shape of state. The store that uses all this is
:class:`~trimtab.client._checkpoint.CheckpointStore`.

Tests and benchmarks replace the device-facing functions here (``_staged``,
``_empty_host``, ``_current_copy``, ``_fence``, ``_copy_all``) to drive the CUDA path on
the CPU; the other client modules call them through this module, so one patch here
reaches them all.

>>> import torch
>>> copier = _HostCopier(_PinnedPool())
>>> state = {"w": torch.ones(2), "step": 3}
>>> host = copier(state)
>>> host["w"] is state["w"], torch.equal(host["w"], state["w"]), copier.start()
(False, True, [])
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__: list[str] = []

log = logging.getLogger("trimtab.client")


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

    def queue_owned(self, t: torch.Tensor, host: torch.Tensor) -> None:
        """Queue ``host.copy_(t)`` with the snapshot's copies, into a buffer the pool does
        not own (a frozen parameter's, see :mod:`trimtab.client._frozen`), on the side
        stream: the optimizer step never changes it."""
        self._pairs[(t.device, self.streams is not None)].append((host, t.detach()))

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


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested containers."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def staged_layout(*states: Any) -> collections.Counter[_Key]:
    """The pinned buffers, by kind, that snapshots of ``states`` need: one per distinct
    staged tensor (a storage view shared by several names counts once)."""
    layout: collections.Counter[_Key] = collections.Counter()
    seen: set[tuple] = set()
    for sd in states:
        for t in _tensors(sd):
            if _staged(t) and t.numel():
                mark = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if mark not in seen:
                    seen.add(mark)
                    layout[_key(t)] += 1
    return layout
