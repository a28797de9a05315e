"""The user's LR scheduler around a rollback: :class:`ScheduleHold`.

trimtab never changes a user's scheduler (the knob model: its lr multiplier goes around
the optimizer step, see :mod:`._knobs`); a rollback restores the scheduler's state with
the model and optimizer. One case needs care: the snapshot taken at attach is taken after
the scheduler's first step, unlike every later one, so restoring it would let the loop's
next ``scheduler.step()`` count one step too many. The hold puts that step back.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["ScheduleHold"]

#: Group keys schedulers write each step; a hold puts them back.
_SCHEDULED_KEYS = ("lr", "momentum", "betas", "initial_lr", "max_lr", "min_lr")


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
