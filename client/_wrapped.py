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
leaves the stepping to the wrapper:

- ``hooks=True``: the loop's ``optimizer.step()`` on the wrapper steps the torch optimizer
  only when accelerate syncs (through the scaler with fp16), and the hooks on the torch
  optimizer fire then: a micro-batch is not a step, and a ``GradScaler``'s overflow step
  never reaches them (see :mod:`trimtab.client._step`).
- ``guard.step(loss)`` in place of the wrapper's ``step()``: on a micro-batch the wrapper
  would not step (:func:`syncs` False) the guard only adds the loss to the step's mean;
  on the others it does what it always does, and steps through the wrapper. A wrapper
  holding a ``GradScaler`` is refused (``guard.step`` would measure and clip scaled
  gradients and count overflow steps as its own non-finite skips): with fp16, attach
  with ``hooks=True``.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([p], lr=0.1)
>>> unwrap(opt) is opt, syncs(opt)
(True, True)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["unwrap", "syncs", "check_wrapper"]

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


def syncs(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` steps now: False only on an accelerate micro-batch
    whose gradients are not synced (inside ``accelerator.accumulate``)."""
    state = getattr(optimizer, "gradient_state", None)
    return bool(getattr(state, "sync_gradients", True))


def check_wrapper(optimizer: Any, hooks: bool) -> None:
    """Refuse a wrapper that steps through a ``GradScaler`` without ``hooks=True``, and an
    optimizer whose ``step()`` needs a closure (``LBFGS``) without them: ``guard.step(loss)``
    calls ``step()`` with none, and the step hooks wrap the loop's own closure."""
    if not hooks and _needs_closure(unwrap(optimizer)):
        raise ValueError(
            f"optimizer={type(unwrap(optimizer)).__name__} is invalid with guard.step(loss): "
            "its step() needs a closure, which guard.step cannot pass; allowed: "
            "attach(..., hooks=True) and the loop's own optimizer.step(closure) (the guard "
            "acts after the closure's first call, before the update)"
        )
    if hooks or unwrap(optimizer) is optimizer:
        return
    if getattr(optimizer, "scaler", None) is not None:
        raise ValueError(
            f"optimizer={type(optimizer).__name__} holding a GradScaler is invalid with "
            "guard.step(loss); allowed: attach(..., hooks=True) and the loop's own "
            "optimizer.step() (the wrapper unscales and skips overflow steps inside it)"
        )


def _needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` has a ``closure`` parameter without a default (LBFGS)."""
    try:
        param = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty
