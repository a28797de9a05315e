"""The snapshot's copy plan: the walk over a model's and an optimizer's state, done once.

A snapshot of a GPT-2-sized run copies ~600 tensors (parameters, buffers, two Adam
moments and a step count per parameter). Walking the nested ``state_dict()`` containers,
working out for each tensor whether it is tied to one already seen, which pooled buffer it
goes to and on which stream, cost milliseconds of Python on the snapshot step. None of
that changes from one snapshot to the next while the state holds the same tensors, so a
:class:`CopyPlan` works it out once and each snapshot only checks that it still holds.

What it checks (every snapshot, a few C-level passes over the tensors): the containers'
keys, the type of every value, and each tensor's data pointer, dtype, shape, strides and
device, plus the data pointers of the model's parameters (which decide the stream). Those
say everything the plan depends on: which entries are tied (one copy per storage view, as
the walk's memo did), each copy's buffer kind and stream. The plan holds no tensor, so it
keeps no replaced state alive; a plan that no longer matches (a rollback loaded new
optimizer state, a param group was added, ``param.data`` was swapped) is built again.

It covers the usual shape: a model ``state_dict`` (name -> tensor, or any other value)
and an optimizer ``state_dict``'s ``"state"`` (index -> plain dict of name -> value).
Anything else returns ``None`` from :func:`flatten` and takes the generic walk. Values
that are not tensors are not planned: the caller copies them at every snapshot.
"""

from __future__ import annotations

import collections
import itertools
import operator
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CopyPlan", "Flat", "flatten", "STAGE", "CLONE", "TO_CPU"]

#: A slot's copy: into a pooled pinned buffer (queued), a CPU clone, a plain copy.
STAGE, CLONE, TO_CPU = range(3)

_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_device = operator.attrgetter("device")


class Flat:
    """A model state_dict and an optimizer's state, flattened: their structure, every value
    in order (model first), which are tensors, and the tensors."""

    __slots__ = ("model_sd", "state", "structure", "values", "mask", "tensors", "n_model",
                 "inner_lens")

    def __init__(self, model_sd: dict[str, Any], state: dict[Any, dict[str, Any]],
                 inner: list[dict[str, Any]]) -> None:
        self.model_sd, self.state = model_sd, state
        values = list(model_sd.values())
        self.n_model = len(values)
        for d in inner:
            values.extend(d.values())
        self.values = values
        types = tuple(map(type, values))
        self.inner_lens = [len(d) for d in inner]
        self.structure = (type(model_sd), tuple(model_sd), tuple(state),
                          [tuple(d) for d in inner], types)
        self.mask = [issubclass(t, torch.Tensor) for t in types]
        self.tensors = (values if all(self.mask)
                        else list(itertools.compress(values, self.mask)))

    def fingerprint(self, params: frozenset[int]) -> tuple | None:
        """What the plan depends on; ``None`` when a tensor has no storage (sparse)."""
        ts = self.tensors
        try:
            ptrs = tuple(map(torch.Tensor.data_ptr, ts))
        except RuntimeError:
            return None
        return (self.structure, ptrs, tuple(map(_dtype, ts)), tuple(map(_shape, ts)),
                tuple(map(torch.Tensor.stride, ts)), tuple(map(_device, ts)), params)


def flatten(model_sd: Any, state: Any) -> Flat | None:
    """:class:`Flat` for the usual shape of state, else ``None`` (the generic walk)."""
    if not isinstance(model_sd, dict) or not isinstance(state, dict):
        return None
    inner = list(state.values())
    # Plain dicts only: a dict subclass may carry attributes (_metadata) the walk copies.
    if not all(type(d) is dict for d in inner):
        return None
    return Flat(model_sd, state, inner)


class CopyPlan:
    """Slots (one per distinct storage view), what each copy is, and where every tensor of
    a :class:`Flat` goes; see the module docstring."""

    def __init__(self, flat: Flat, fingerprint: tuple, params: frozenset[int],
                 staged: Callable[[torch.Tensor], bool], pool_key: Callable[[torch.Tensor], Any],
                 side_streams: bool) -> None:
        self.fingerprint = fingerprint
        slot_of: dict[tuple, int] = {}
        #: Per tensor of the Flat, in order: its slot.
        self.leaf_slot: list[int] = []
        #: Per slot: the index of the first tensor that has it, its kind, and its memo key.
        self.slot_leaf: list[int] = []
        self.kinds: list[int] = []
        self.memo_keys: list[tuple | None] = []
        #: Pool keys of the STAGE slots, in slot order, and their count per key.
        self.pool_keys: list[Any] = []
        self.layout: collections.Counter = collections.Counter()
        groups: dict[tuple[torch.device, bool], list[int]] = collections.defaultdict(list)
        n_model_tensors = sum(flat.mask[: flat.n_model])
        for i, t in enumerate(flat.tensors):
            key = None
            if t.layout == torch.strided and t.numel():
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if key in slot_of:
                    self.leaf_slot.append(slot_of[key])
                    continue
                slot_of[key] = len(self.slot_leaf)
            slot = len(self.slot_leaf)
            self.leaf_slot.append(slot)
            self.slot_leaf.append(i)
            self.memo_keys.append(key)
            if staged(t):
                self.kinds.append(STAGE)
                self.pool_keys.append(pool_key(t))
                # Parameters and optimizer state change only in the optimizer step (the
                # side stream); buffers may change in a forward (the training stream).
                side = side_streams and (i >= n_model_tensors or t.data_ptr() in params)
                groups[(t.device, side)].append(slot)
            else:
                self.kinds.append(CLONE if t.device.type == "cpu" else TO_CPU)
        self.layout.update(self.pool_keys)
        self.all_staged = all(k == STAGE for k in self.kinds)
        self.identity = self.leaf_slot == list(range(len(self.slot_leaf)))
        #: (device, side stream) -> the STAGE slots copied there, and their positions
        #: among the STAGE slots (the buffers' order).
        stage_pos = {s: j for j, s in enumerate(s for s, k in enumerate(self.kinds)
                                                 if k == STAGE)}
        self.groups = {g: (slots, [stage_pos[s] for s in slots]) for g, slots in groups.items()}

    def outputs(self, flat: Flat, buffers: list[torch.Tensor]) -> list[Any]:
        """The host copy of every slot: pooled ``buffers`` (STAGE slots, in order), clones."""
        if self.all_staged:
            return buffers
        outs: list[Any] = []
        staged = iter(buffers)
        tensors = flat.tensors
        for leaf, kind in zip(self.slot_leaf, self.kinds, strict=True):
            if kind == STAGE:
                outs.append(next(staged))
            else:
                t = tensors[leaf].detach()
                outs.append(t.clone() if kind == CLONE else t.to("cpu", copy=True))
        return outs

    def pairs(self, flat: Flat, buffers: list[torch.Tensor]) -> dict[tuple, list]:
        """(device, side stream) -> the (buffer, source) pairs to queue there."""
        out = {}
        tensors = flat.tensors
        for group, (slots, positions) in self.groups.items():
            srcs = [tensors[self.slot_leaf[s]] for s in slots]
            srcs = [t.detach() if t.requires_grad else t for t in srcs]
            out[group] = list(zip([buffers[j] for j in positions], srcs, strict=True))
        return out

    def leaves(self, slot_outs: list[Any]) -> list[Any]:
        """The host copy of every tensor of the Flat (tied ones share a slot's)."""
        if self.identity:
            return slot_outs
        return [slot_outs[s] for s in self.leaf_slot]
