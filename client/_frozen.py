"""Frozen parameters, copied once for every snapshot.

A LoRA fine-tune steps a few million adapter weights on a base of billions that never
change; a fine-tune of a head steps the head on a frozen backbone. Copied into every
snapshot, the base filled ``memory_keep + 2`` host copies (a 7B model in bf16: 14 GB
each) and every snapshot step copied it again. A parameter is *frozen* here when it does
not require grad and no param group of the guard's optimizer holds it: nothing the
optimizer does can change it. Its host copy is made once and every snapshot refers to it
while the tensor stays the same: the same storage (``data_ptr``) at the same
``_version``, a counter torch bumps at every in-place change made through the parameter
or its ``detach()``-ed views (``load_state_dict``, ``mul_`` under ``no_grad``, ``lerp_`` on
a state_dict's tensor). A change bumps it, and the next snapshot copies the tensor again.

In-place changes made through ``param.data`` do not bump it (a teacher network updated
as ``p.data.mul_(m).add_(...)`` inside the attached model, with its own parameters left
out of the optimizer). So each copy also keeps a checksum of a sample of the tensor (at
most 4096 elements, taken on the device when the copy is made), and a rollback that
finds a frozen parameter at the same storage and version but with another checksum does
not put the copy back (it may be older than the snapshot): it leaves the tensor as it is,
says so in a WARNING, and copies that parameter into every snapshot from then on. A
parameter whose storage or version moved since is put back from the copy, which was its
value at the snapshot.

Files hold the frozen part like the rest: each checkpoint file is whole.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _host_copy

__all__ = ["FrozenCopy", "FrozenParts"]

#: Elements of a frozen tensor summed for its checksum (evenly spaced), at most.
_SAMPLE = 4096


def _signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride()), t.device)


def _sample_sum(t: torch.Tensor) -> torch.Tensor:
    """A float64 sum of at most :data:`_SAMPLE` evenly spaced elements, on ``t``'s device
    (queued, never read here)."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    return flat[::stride].to(torch.float64).sum()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float64 scalars hold the same bits (a NaN equals itself)."""
    return bool(torch.equal(a.reshape(1).view(torch.int64).cpu(),
                            b.reshape(1).view(torch.int64).cpu()))


class FrozenCopy:
    """One frozen tensor's host copy, shared by every snapshot taken while it holds."""

    __slots__ = ("sig", "host", "events", "source", "checksum", "stale")

    def __init__(self, t: torch.Tensor, host: torch.Tensor) -> None:
        self.sig = _signature(t)
        self.host = host
        #: The copy's events while it is in flight ((device, event, side), as a snapshot's).
        self.events: list[Any] = []
        self.source: torch.Tensor | None = t
        self.checksum = _sample_sum(t)
        #: Found changed behind ``_version`` by a rollback: never shared again.
        self.stale = False

    def pending(self) -> bool:
        """Whether its copy is still in flight (never waits)."""
        if self.events and all(e.query() for _, e, _ in self.events):
            self.events, self.source = [], None
        return bool(self.events)

    def unchanged(self, t: torch.Tensor) -> bool | None:
        """Whether ``t`` (the live tensor) is what the copy holds: True (same storage,
        version and checksum: nothing to put back), None (its storage or version moved
        since: the copy is put back), False (same storage and version, another checksum: a
        change torch did not count; the copy cannot be trusted). Reads the device."""
        if _signature(t) != self.sig:
            return None
        return _same_bits(_sample_sum(t), self.checksum)


class FrozenParts:
    """A store's frozen copies by state_dict name (see the module's docstring)."""

    def __init__(self) -> None:
        self._copies: dict[str, FrozenCopy] = {}
        #: Names found changed behind ``_version``: copied into every snapshot.
        self._unfrozen: set[str] = set()
        self.queued: list[FrozenCopy] = []

    @property
    def nbytes(self) -> int:
        """Host bytes held by the current copies."""
        unique = {id(c): c for c in self._copies.values()}.values()  # tied: one copy
        return sum(c.host.numel() * c.host.element_size() for c in unique)

    def names(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              model_sd: dict[str, Any]) -> set[str]:
        """The names of ``model_sd`` that hold frozen parameters."""
        for name, copy in list(self._copies.items()):
            if copy.stale:
                self._unfrozen.add(name)
                del self._copies[name]
        frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
        if not frozen:
            self._copies.clear()
            return set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                frozen.discard(p.data_ptr())
        names = {name for name, t in model_sd.items()
                 if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel()
                 and t.data_ptr() in frozen and name not in self._unfrozen}
        for name in [n for n in self._copies if n not in names]:
            del self._copies[name]  # unfrozen, or gone: its snapshots keep their copy
        return names

    def copies(self, model_sd: dict[str, Any], names: set[str],
               queue: Any) -> dict[str, FrozenCopy]:
        """The copy of each of ``names``: the one held where the tensor is unchanged, else
        a new one, whose copy ``queue(tensor, host)`` queues with the snapshot's (CUDA;
        CPU tensors are cloned here). Tensors tied under several names are copied once."""
        out: dict[str, FrozenCopy] = {}
        made: dict[tuple, FrozenCopy] = {}
        #: The copies made by the last call whose device copy is queued (their events are
        #: the snapshot's: the caller sets them once it started the copies).
        self.queued: list[FrozenCopy] = []
        for name in names:
            t = model_sd[name].detach()
            sig = _signature(t)
            held = self._copies.get(name)
            if held is not None and held.sig == sig:
                out[name] = held
                continue
            copy = made.get(sig)
            if copy is None:
                staged = _host_copy._staged(t)
                if staged:
                    # Pinned, allocated here: at attach (the snapshot taken then), and again
                    # only for a tensor that changed in place (rare: a reload of the base).
                    host = _host_copy._empty_host(_host_copy._key(t))
                    queue(t, host)
                elif t.device.type == "cpu":
                    host = t.clone()
                else:
                    host = t.to("cpu", copy=True)
                copy = made[sig] = FrozenCopy(t, host)
                if staged:
                    self.queued.append(copy)
                else:
                    copy.source = None
            out[name] = self._copies[name] = copy
        return out
