"""What a user's code does when it multiplies its own LR, scheduler included: the
benchmark's ``lr_100x`` fault (a bug in the user's code, not something trimtab does).

Every group's ``lr`` was multiplied by ``factor``; :func:`scale_schedule` multiplies the
scheduler's reference values the same way, so that the fault persists under any kind of
schedule: closed-form ones read ``base_lrs`` (LambdaLR, CosineAnnealingLR's closed form,
...) or the per-group ``initial_lr`` / ``max_lr`` / ``min_lr`` (OneCycleLR), CyclicLR its
``base_lrs`` / ``max_lrs``; chainable ones (StepLR, ExponentialLR) read ``group["lr"]``,
already multiplied, and the absolute floors they mix in (``eta_min``,
ReduceLROnPlateau's ``min_lrs``) are scaled too; SequentialLR and ChainedScheduler child
by child.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([p], lr=1.0)
>>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
>>> opt.param_groups[0]["lr"] = 100.0
>>> scale_schedule(sched, opt, 100.0)
>>> opt.step(); sched.step(); opt.param_groups[0]["lr"]  # 100 x (1.0 / 2)
50.0
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["scale_schedule"]

_GROUP_REFS = ("initial_lr", "max_lr", "min_lr")
_LIST_REFS = ("base_lrs", "max_lrs", "min_lrs")


def _children(scheduler: Any, seen: set[int] | None = None) -> Iterator[Any]:
    seen = set() if seen is None else seen
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    yield scheduler
    for child in getattr(scheduler, "_schedulers", None) or ():
        yield from _children(child, seen)


def _times(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, (int, float, torch.Tensor)) else value


def scale_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply ``scheduler``'s reference LRs by ``factor``, as the groups' LRs were."""
    for group in optimizer.param_groups:
        for key in _GROUP_REFS:
            if key in group:
                group[key] = _times(group[key], factor)
    for sched in _children(scheduler):
        for attr in _LIST_REFS:
            values = getattr(sched, attr, None)
            if isinstance(values, list):
                setattr(sched, attr, [_times(v, factor) for v in values])
        if isinstance(getattr(sched, "eta_min", None), (int, float)):
            sched.eta_min *= factor
        if isinstance(getattr(sched, "_last_lr", None), list):
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]
