"""Optimizer wrappers: accelerate's ``AcceleratedOptimizer`` and the like.

``accelerator.prepare(model, optimizer, ...)`` (and the Hugging Face Trainer, which runs
on accelerate) hands the loop an ``AcceleratedOptimizer``: a ``torch.optim.Optimizer``
subclass that skips ``Optimizer.__init__`` and holds the real optimizer as
``.optimizer``, passing ``param_groups``, ``state`` and ``state_dict`` through. It has no
step hooks of its own, and its ``step()`` decides whether a step happens at all: inside
``accelerator.accumulate(model)`` it does nothing on a micro-batch whose gradients are not
synced (``optimizer.gradient_state.sync_gradients`` False), and with fp16 it steps through
its ``GradScaler`` (``scaler.step(optimizer)``, which unscales and skips overflow steps).

So a guard attached to a wrapper works on the torch optimizer under it -- the step hooks,
the knobs, the probe, the snapshots, the optimizer's name the controller is told -- and
leaves the stepping to the wrapper (``guard.step`` steps through it). With ``hooks=True``
the loop's ``optimizer.step()`` on the wrapper steps the torch optimizer only when
accelerate syncs (through the scaler with fp16), and the hooks on the torch optimizer fire
then: a micro-batch is not a step, and a ``GradScaler``'s overflow step never reaches them
(see :mod:`trimtab.client._step`).

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([p], lr=0.1)
>>> unwrap(opt) is opt
True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap"]

#: Wrappers of wrappers followed at most (a loop that never ends is not an optimizer).
_DEPTH = 8


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer under ``optimizer``'s wrappers (each holding the next as
    ``.optimizer``); ``optimizer`` itself when it wraps none."""
    for _ in range(_DEPTH):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer

