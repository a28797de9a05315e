"""Weight averaging (Polyak / EMA) of the guarded model: on the device, without a sync.

``attach(..., ema=0.999)`` keeps an exponential moving average of the model's weights
beside the run: after every optimizer step that was taken, ``ema <- decay * ema + (1 -
decay) * weights`` (the rule of :func:`torch.optim.swa_utils.get_ema_multi_avg_fn`; the
first step taken copies the weights, as ``AveragedModel`` does). The average is a
:class:`torch.optim.swa_utils.AveragedModel` (``guard.ema_model``): evaluate it like the
model, hand its validation loss to ``guard.report_validation(value, ema=...)``, save it with
its ``state_dict()``; ``torch.optim.swa_utils.update_bn`` and the rest of ``swa_utils`` take
it as they take any ``AveragedModel``.

Why not ``AveragedModel.update_parameters``: it reads its step counter on the host at every
call (``bool(self.n_averaged == 0)``; with the counter on the host instead, moving it to the
device is a blocking copy), which on an accelerator is a sync per step, and its averaging
function's weight is a Python float, so a step that the device skipped (non-finite
gradients, see :mod:`trimtab.client._step`) would be averaged in all the same unless the host
read the skip flag. :meth:`Ema.update` applies the same rule with the weight as a device
tensor: ``1`` for the first step taken, ``1 - decay`` after it, times the step's finiteness
flag where only the device knows it, so a skipped step moves neither the average nor
``n_averaged`` (which counts the steps averaged in, as ``global_step`` counts the steps
taken). One ``torch._foreach_lerp_`` per device and dtype, a few scalar ops, no host read.

``use_buffers=True``: the buffers (batch-norm running statistics) are averaged with the
weights rather than copied from the model, so that the averaged weights are evaluated with
statistics that match them, without an ``update_bn`` pass over the data before each
validation (torch's documentation notes either way works; this one costs only the buffers'
share of the update).
Integer buffers (``num_batches_tracked``) are counters, not averaged: they are copied at
each step averaged in.

The parameters and buffers are gathered once, at attach (as an optimizer holds its
parameters): a buffer the model replaces by another tensor, rather than updating in place,
is not followed. A model wrapped in ``DistributedDataParallel`` is averaged through its
``module`` (every rank keeps the same average: the weights are the same on every rank).

>>> import torch
>>> model = torch.nn.Linear(1, 1, bias=False)
>>> ema = Ema(model, decay=0.5)
>>> with torch.no_grad():
...     _ = model.weight.fill_(2.0)
>>> ema.update()  # the first step taken: a copy
>>> with torch.no_grad():
...     _ = model.weight.fill_(4.0)
>>> ema.update(torch.tensor(True)); ema.update(torch.tensor(False))  # False: not averaged in
>>> ema.model.module.weight.item(), int(ema.model.n_averaged)
(3.0, 2)
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["Ema", "check_decay"]

log = logging.getLogger("trimtab.client")


def check_decay(decay: object) -> None:
    """``attach``'s ``ema``: ``None`` (off) or a decay strictly between 0 and 1."""
    ok = decay is None or (
        isinstance(decay, (int, float)) and not isinstance(decay, bool)
        and math.isfinite(decay) and 0.0 < decay < 1.0
    )
    if not ok:
        raise ValueError(f"ema={decay!r} is invalid; allowed: None (no weight averaging) or "
                         "a decay strictly between 0 and 1, e.g. 0.999")


def averaged_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights are averaged: a DDP wrapper's ``module``, else ``model``."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


class Ema:
    """The exponential moving average of ``model``'s weights and buffers (see the module).

    ``model`` is the :class:`~torch.optim.swa_utils.AveragedModel`; :meth:`update` after
    each optimizer step; :meth:`state_dict` / :meth:`load_state_dict` for checkpoints and
    resumes (``AveragedModel``'s own: ``n_averaged`` and the ``module.`` entries).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        check_decay(decay)
        source = averaged_module(model)
        self.decay = float(decay)
        #: The average: evaluate it (``guard.ema_model``); ``update_parameters`` would apply
        #: the same rule (its ``multi_avg_fn``), with a host read per call.
        self.model = AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                   use_buffers=True)
        self.model.requires_grad_(False)  # evaluated, never trained: no autograd graph
        first = next(itertools.chain(source.parameters(), source.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        # The counter lives with the weights, so that counting a step is a device op.
        self.model.n_averaged = self.model.n_averaged.to(device)
        mine = list(itertools.chain(self.model.module.parameters(), self.model.module.buffers()))
        theirs = list(itertools.chain(source.parameters(), source.buffers()))
        if len(mine) != len(theirs):  # deepcopy keeps ties: the lists always match
            raise RuntimeError("ema: the averaged copy's tensors do not match the model's")
        #: (device, dtype) -> (averaged tensors, the model's): averaged with one lerp.
        self._groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = (
            collections.defaultdict(lambda: ([], [])))
        #: Integer buffers (counters): copied at each step averaged in, not averaged.
        self._copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        for avg, live in zip(mine, theirs, strict=True):
            if avg.is_floating_point() or avg.is_complex():
                group = self._groups[(avg.device, avg.dtype)]
                group[0].append(avg)
                group[1].append(live)
            else:
                self._copied.append((avg, live))
        self._groups = dict(self._groups)
        self._one = torch.ones((), device=device)
        self._rate = torch.full((), 1.0 - self.decay, device=device)
        #: An update raised: the average is left as it was and no longer updated.
        self.failed = False

    def after_step(self, taken: torch.Tensor | bool | None) -> None:
        """The guard's call after each optimizer step: :meth:`update` unless the host knows
        the step was skipped (``taken`` is ``False``; see ``Step.taken``). An error is
        logged once and ends the averaging: it never stops the run."""
        if taken is False or self.failed:
            return
        try:
            self.update(taken if isinstance(taken, torch.Tensor) else None)
        except Exception:
            self.failed = True
            log.exception("trimtab could not update the weight average; it stays as it was "
                          "and is no longer updated")

    @torch.no_grad()
    def update(self, taken: torch.Tensor | None = None) -> None:
        """Average the model's weights in after an optimizer step.

        ``taken``: the step's finiteness as a device bool tensor where only the device knows
        whether the step was skipped (``False``: nothing is averaged in, ``n_averaged`` stays);
        ``None``: the step was taken. Device ops only: no host read, no wait.
        """
        n = self.model.n_averaged
        # AveragedModel's rule: the first step averaged in is copied, later ones lerped.
        weight = torch.where(n == 0, self._one, self._rate)
        if taken is None:
            n.add_(1)
        else:
            taken = taken.to(n.device, non_blocking=True)
            weight = weight * taken
            n.add_(taken)
        for (device, dtype), (avg, live) in self._groups.items():
            w = weight.to(device=device, dtype=dtype, non_blocking=True)
            torch._foreach_lerp_(avg, live, [w] * len(avg))
        for avg, live in self._copied:
            if taken is None:
                avg.copy_(live, non_blocking=True)
            else:  # as of the last step averaged in, like the weights
                avg.copy_(torch.where(taken.to(avg.device, non_blocking=True), live, avg))

    def state_dict(self) -> dict[str, Any]:
        """The average's state (live tensors: copy them to keep them)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state_dict` (copied into the live tensors, in place)."""
        self.model.load_state_dict(state)

    def restart(self) -> None:
        """Start the average again: the next step taken is copied (``n_averaged`` = 0)."""
        self.model.n_averaged.zero_()
