"""A checkpoint of a training run: what it holds and how it puts the run back.

A :class:`Checkpoint` holds everything needed to put a run back where it was: the
model's and optimizer's state (host copies), the LR scheduler's state, the RNG states
(torch CPU, every CUDA device, numpy's global generator, Python's ``random``), the
clipping threshold and trimtab's other knobs in force, the guard's step counters and, with
``attach(..., ema=...)``, the weight average's state (see :mod:`trimtab.client._ema`), with
``attach(..., extra_state={name: obj})`` each of the loop's own objects' ``state_dict()``.
The copies are made by :mod:`trimtab.client._host_copy`; the ring of checkpoints, their
files and their stable marks are :class:`~trimtab.client._checkpoint.CheckpointStore`'s.

>>> import torch
>>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> ckpt = Checkpoint(step=0, model=model.state_dict(), optimizer=opt.state_dict(),
...                   scheduler=None, rng=capture_rng())
>>> ckpt.knobs.lr, sorted(Checkpoint.from_payload(ckpt.payload()).rng)
(0.1, ['cuda', 'numpy', 'python', 'torch'])
"""

from __future__ import annotations

import collections
import copy
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from trimtab.protocol import wire

from . import _host_copy
from ._knobs import knobs_of

__all__ = ["Checkpoint", "Unrestorable", "PartlyRestored", "capture_rng", "restore_rng",
           "reseed_rng"]

log = logging.getLogger("trimtab.client")

_PAYLOAD_KEYS = ("step", "model", "optimizer", "scheduler", "rng", "clip", "counters",
                 "scheduler_stepped", "controls", "ema", "extra", "run")


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
    #: The weight average's ``state_dict`` (``AveragedModel``'s: ``n_averaged`` and the
    #: ``module.`` entries); ``None``: the run kept none.
    ema: dict[str, Any] | None = None
    #: The loop's own objects' ``state_dict()`` by name (``attach(..., extra_state=...)``);
    #: ``None``: the run handed over none.
    extra: dict[str, dict[str, Any]] | None = None
    #: The guard's state to resume from at this step, but for what the snapshot holds
    #: itself (the step, the step count, ``controls``, the weight average): see
    #: :attr:`guard_state`.
    #: None: a snapshot of a sharded model, or a file of an older trimtab.
    run: dict[str, Any] | None = None
    #: After a rollback restored it: the guard's state to resume from it with, the
    #: rollback's values and counts (``{"run": ..., "controls": ...}``), which
    #: :attr:`guard_state` gives instead of those of when it was taken. Kept in a file
    #: beside its own; a rollback still restores ``controls``.
    resume: dict[str, Any] | None = None
    stable: bool = False
    #: The frozen parameters' shared host copies by name (their tensors are in
    #: :attr:`model` too; see :mod:`trimtab.client._frozen`); ``None``: none, or a file's.
    frozen: dict[str, Any] | None = field(default=None, repr=False)
    #: Set while the writer thread serializes it (read under the writer's lock).
    writing: bool = field(default=False, repr=False)
    #: (device, event, copied on the side stream) per group of copies in flight.
    _events: list[Any] = field(default_factory=list, repr=False)
    _pinned: list[torch.Tensor] = field(default_factory=list, repr=False)
    _pinned_keys: list[Any] = field(default_factory=list, repr=False)
    #: The device tensors its copies read, alive until the copies are done.
    _sources: list[torch.Tensor] = field(default_factory=list, repr=False)
    _fenced: bool = field(default=False, repr=False)
    #: Taken before its step was known for sure: never admitted until
    #: :meth:`~trimtab.client._checkpoint.CheckpointStore.settle` labels or drops it.
    _provisional: bool = field(default=False, repr=False)

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
                _host_copy._fence(device, event)

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
        # Files written before the knob model have no controls (the user's values held),
        # those written before weight averaging no ema, before extra_state no extra.
        return cls(**{k: payload[k] for k in (*_PAYLOAD_KEYS, "resume") if k in payload})

    @property
    def guard_state(self) -> dict[str, Any] | None:
        """What ``guard.load_state_dict`` takes to resume from this checkpoint as the same
        run (its run id on the controller, step counters, trimtab's multipliers and live
        schedules, the last command applied), as ``guard.state_dict()`` would have given at
        this step: ``ckpt.restore(model, optimizer, scheduler)``, then
        ``guard.load_state_dict(ckpt.guard_state)``. None where the snapshot holds none (a
        sharded model's, or an older trimtab's file)."""
        if self.run is None:
            return None
        resume = self.resume or {}
        return {**self.run, **resume.get("run", {}), "step": self.step,
                "calls": max(self.step, int(self.counters.get("calls", self.step))),
                "controls": dict(resume.get("controls", self.controls)), "ema": self.ema,
                "scheduler_stepped": self.scheduler_stepped}

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any = None, ema: AveragedModel | None = None,
                extra_state: dict[str, Any] | None = None) -> None:
        """Load model, optimizer, scheduler and RNG states (the checkpoint stays reusable).

        ``ema``: the weight average to put back too (``guard.ema_model``, or an
        ``AveragedModel`` of your own). A checkpoint that holds none restarts it: the next
        step taken copies the restored weights.

        ``extra_state``: the loop's own objects by name, as the run was attached with them;
        each gets its state back with ``load_state_dict`` (see :meth:`_restore_extra`). An
        object whose ``load_state_dict`` raises does not stop the rest: everything else is
        restored, then :class:`PartlyRestored` says which did not.
        """
        # Checked before anything is touched: a checkpoint that does not fit the optimizer's
        # param groups restores nothing (Unrestorable), the model included.
        optim_sd = _fit_groups(optimizer, self.optimizer, self.step)
        # Loading copies into the live tensors (a host-to-device copy that waits on CUDA:
        # a rollback is rare and the run is going nowhere until it is done).
        if self.frozen:
            self._load_model(model)
        else:
            model.load_state_dict(self.model)
        _load_optimizer(optimizer, optim_sd)
        if scheduler is not None and self.scheduler is not None:
            # load_state_dict adopts the dict's lists: give it a copy, keep ours intact.
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        if ema is not None:
            if self.ema is not None:
                ema.load_state_dict(self.ema)  # copies into its tensors: ours stay intact
            else:
                log.info("trimtab checkpoint at step %d holds no weight average; the average "
                         "restarts from the restored weights", self.step)
                ema.n_averaged.zero_()
        failed = self._restore_extra(extra_state) if extra_state else []
        restore_rng(self.rng)
        if failed:
            raise PartlyRestored(
                f"the checkpoint at step {self.step} was restored but for "
                + "; ".join(f"{what} (it may hold part of the checkpoint's state)"
                            for what, _ in failed)) from failed[0][1]

    def _load_model(self, model: torch.nn.Module) -> None:
        """The model's state, but for the frozen parameters still as their copy holds them
        (nothing to put back: a LoRA base is not copied onto itself at every rollback) and
        those changed where torch did not count it (their copy cannot be trusted: left as
        they are, with a WARNING, and copied into every snapshot from then on)."""
        assert self.frozen is not None
        live = model.state_dict()
        skip = set()
        untrusted = []
        for name, held in self.frozen.items():
            t = live.get(name)
            if t is None:
                continue  # load_state_dict names it
            unchanged = held.unchanged(t)
            if unchanged is None:
                continue  # moved since: put back from the copy
            skip.add(name)
            if not unchanged:
                held.stale = True
                untrusted.append(name)
        if untrusted:
            log.warning(
                "trimtab: rollback to step %d: frozen parameter(s) %s changed since they were "
                "copied without torch counting it (an in-place change through .data): left "
                "as they are, not put back; they are copied into every snapshot from now on",
                self.step, ", ".join(untrusted[:5]) + (" ..." if len(untrusted) > 5 else ""))
        state = collections.OrderedDict((k, v) for k, v in self.model.items() if k not in skip)
        if hasattr(self.model, "_metadata"):  # module versions, read by load_state_dict
            state._metadata = self.model._metadata  # type: ignore[attr-defined]
        result = model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys) - skip
        if missing or result.unexpected_keys:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: "
                               f"missing keys {sorted(missing)}, unexpected keys "
                               f"{sorted(result.unexpected_keys)}")

    def _restore_extra(self, objects: dict[str, Any]) -> list[tuple[str, Exception]]:
        """Put back each object's state: a module's ``load_state_dict`` copies into its
        tensors (ours stay intact), any other object gets a copy (a scheduler's adopts the
        dict's lists, others their tensors: training must not write into the checkpoint).
        A name the checkpoint holds no state for leaves its object as it is, with a warning.
        What failed, as ``(what, the exception)``."""
        held = self.extra or {}
        lacked = [name for name in objects if name not in held]
        if lacked:
            log.warning("trimtab checkpoint at step %d holds no extra state for %s (written "
                        "without it): not restored, left as it was", self.step,
                        ", ".join(map(repr, lacked)))
        failed = []
        for name, obj in objects.items():
            if name not in held:
                continue
            state = held[name]
            try:
                obj.load_state_dict(state if isinstance(obj, torch.nn.Module)
                                    else copy.deepcopy(state))
            except Exception as exc:
                failed.append((f"extra_state[{name!r}]: load_state_dict raised "
                               f"{type(exc).__name__}: {exc}", exc))
        return failed


class Unrestorable(ValueError):
    """A checkpoint that does not fit the run any more; raised before anything is touched."""


class PartlyRestored(RuntimeError):
    """A checkpoint restored but for some of the loop's own objects (``extra_state``), whose
    ``load_state_dict`` raised; raised once everything else is restored."""


def _fit_groups(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                step: int) -> dict[str, Any]:
    """The checkpoint's optimizer ``state`` to load into ``optimizer`` as its param groups
    are now.

    A loop that unfreezes layers as it goes (progressive unfreezing) adds param groups
    with ``add_param_group`` after checkpoints were taken. Such a checkpoint holds the
    groups it knew, which are the optimizer's first ones (``add_param_group`` appends):
    those get its state; the groups added since keep the settings the loop gave them, and
    their parameters no optimizer state, which is what they had at the checkpoint (the
    model's ``state_dict`` restores their values). Any other difference (a group removed,
    one whose parameters changed) raises :class:`Unrestorable`.
    """
    saved = [len(g["params"]) for g in state["param_groups"]]
    live = [len(g["params"]) for g in optimizer.param_groups]
    if saved == live:
        return state
    if len(live) > len(saved) and live[: len(saved)] == saved:
        added = optimizer.state_dict()["param_groups"][len(saved):]
        log.warning("trimtab checkpoint at step %d was taken with %d param group(s), the "
                    "optimizer has %d now: the %d added since keep their settings, and their "
                    "parameters restart without optimizer state", step, len(saved), len(live),
                    len(live) - len(saved))
        return {**state, "param_groups": [*state["param_groups"], *added]}
    raise Unrestorable(
        f"the checkpoint at step {step} does not fit the optimizer's param groups (parameters "
        f"per group then: {saved}, now: {live}); only groups added since, after the others, "
        "can be restored around")


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
