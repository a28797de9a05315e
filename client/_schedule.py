"""How trimtab's lr changes compose with the user's own LR scheduler.

A trimtab command scales each param group's lr by a factor ``f`` (see
:mod:`._knobs`). :func:`scale_schedule` scales the scheduler's reference values by
the same ``f``, so every later lr is "the user's schedule x trimtab's cumulative
factor", whichever way the scheduler computes it:

* closed-form schedulers read references: ``scheduler.base_lrs`` (LambdaLR,
  MultiplicativeLR's closed form, CosineAnnealingLR's closed form, PolynomialLR, ...),
  the per-group ``initial_lr`` / ``max_lr`` / ``min_lr`` (OneCycleLR), CyclicLR's
  ``base_lrs`` / ``max_lrs``;
* chainable schedulers (StepLR, ExponentialLR, CosineAnnealingLR's recursive form)
  read ``group["lr"]``, which the command already scaled; absolute floors they mix in
  (``eta_min``, ReduceLROnPlateau's ``min_lrs``) are scaled too;
* composite schedulers (SequentialLR, ChainedScheduler) are handled child by child.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([p], lr=1.0)
>>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
>>> opt.param_groups[0]["lr"] = 0.5  # what a command halving lr does to the group
>>> scale_schedule(sched, opt, [0.5])
>>> opt.step(); sched.step(); opt.param_groups[0]["lr"]  # 0.5 x (1.0 / 2)
0.25
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["scale_schedule", "ScheduleHold"]

#: Per-group reference values a scheduler computes lr from (OneCycleLR, LRScheduler).
_GROUP_REFS = ("initial_lr", "max_lr", "min_lr")
#: Scheduler attributes holding one reference lr per group.
_LIST_REFS = ("base_lrs", "max_lrs", "min_lrs")
#: Group keys schedulers write each step; a hold puts them back.
_SCHEDULED_KEYS = ("lr", "momentum", "betas", *_GROUP_REFS)


def _children(scheduler: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """The scheduler and, for SequentialLR / ChainedScheduler, every child, once each."""
    seen = set() if seen is None else seen
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    yield scheduler
    for child in getattr(scheduler, "_schedulers", None) or ():
        yield from _children(child, seen)


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor
    return value * factor if isinstance(value, (int, float)) else value


def scale_schedule(
    scheduler: Any, optimizer: torch.optim.Optimizer, factors: list[float | None]
) -> None:
    """Scale ``scheduler``'s reference lrs by the per-group ``factors`` a command applied."""
    for group, factor in zip(optimizer.param_groups, factors, strict=False):
        if factor is None:
            continue
        for key in _GROUP_REFS:
            if key in group:
                value = group[key]
                if isinstance(value, torch.Tensor):
                    value.mul_(factor)  # in place: a fused or captured step keeps its tensor
                else:
                    group[key] = _times(value, factor)
    known = [f for f in factors if f is not None]
    # eta_min is one floor for every group; it scales when the groups' factors agree.
    common = known[0] if known and all(f == known[0] for f in known) else None
    for sched in _children(scheduler):
        for attr in _LIST_REFS:
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) == len(factors):
                setattr(sched, attr, [v if f is None else _times(v, f)
                                      for v, f in zip(values, factors, strict=True)])
        eta_min = getattr(sched, "eta_min", None)
        if common is not None and isinstance(eta_min, (int, float)):
            sched.eta_min = eta_min * common
        if isinstance(getattr(sched, "_last_lr", None), list):
            sched._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                              for g in optimizer.param_groups]


def _put(group: dict[str, Any], key: str, value: Any) -> None:
    live = group.get(key)
    if isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor):
        live.copy_(value)
    else:
        group[key] = value


class ScheduleHold:
    """A scheduler's state and the group values it writes, to be put back once.

    A rollback happens inside ``guard.step()``; the loop's ``scheduler.step()`` still
    follows. For a checkpoint taken *after* a scheduler step (the one at attach time)
    that step is one too many, so the guard holds the schedule as restored and puts it
    back at the next ``guard.step()``.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> hold = ScheduleHold(sched, opt)
    >>> opt.step(); sched.step(); opt.param_groups[0]["lr"]
    0.5
    >>> hold.put_back(sched, opt); opt.param_groups[0]["lr"], sched.last_epoch
    (1.0, 0)
    """

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        self.state = copy.deepcopy(scheduler.state_dict())
        self.groups = [{k: copy.deepcopy(g[k]) for k in _SCHEDULED_KEYS if k in g}
                       for g in optimizer.param_groups]

    def put_back(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        """Load the held state (a copy: the hold is not aliased by the scheduler)."""
        scheduler.load_state_dict(copy.deepcopy(self.state))
        for group, saved in zip(optimizer.param_groups, self.groups, strict=False):
            for key, value in saved.items():
                _put(group, key, copy.deepcopy(value))
