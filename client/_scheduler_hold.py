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


class SchedulePattern:
    """Whether the loop steps its scheduler right after a given optimizer step, from what
    it did after the ones before.

    A snapshot is taken inside ``guard.step()``, before the loop's own
    ``scheduler.step()`` of that step: a rollback restores it there, and the loop's call
    follows. A run resumed from a snapshot's file starts before the next step instead, so
    the call the loop made after the saved step must be made for it. Observed at each
    optimizer step (host values only: the scheduler's ``last_epoch``): the optimizer steps
    after which the loop stepped the scheduler; when the last three are evenly spaced
    (every step, or every ``k``: an epoch's worth), a step ``k`` after the last one is
    followed by one.

    >>> p = SchedulePattern()
    >>> for call, epoch in [(1, 0), (2, 1), (3, 2), (4, 3)]:
    ...     p.observe(call, epoch)
    >>> p.follows(4), SchedulePattern().follows(4)
    (True, False)
    >>> q = SchedulePattern()
    >>> for call in range(1, 14):
    ...     q.observe(call, (call - 1) // 4)
    >>> q.follows(16), q.follows(14)
    (True, False)
    """

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._after: list[int] = []  # optimizer steps (calls) the loop's scheduler.step followed

    def observe(self, calls: int, epoch: Any) -> None:
        """At optimizer step ``calls`` (after it), the scheduler at ``epoch``."""
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            self._epoch, self._after = None, []
            return
        if self._epoch is not None and epoch != self._epoch:
            if epoch == self._epoch + 1:
                self._after = [*self._after[-2:], calls - 1]
            else:  # restored (a rollback), or stepped more than once: start over
                self._after = []
        self._epoch = epoch

    def follows(self, calls: int) -> bool:
        """Whether the loop steps the scheduler right after optimizer step ``calls``."""
        if len(self._after) < 3:
            return False
        a, b, c = self._after
        return b - a == c - b > 0 and calls - c == c - b
