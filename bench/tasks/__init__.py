"""The benchmark's tasks: one small protocol, one file per task.

A task is a :class:`Task` subclass instance named ``TASK`` in a module of this package;
:func:`load_tasks` finds every one, sorted by name, so a new task is one new file::

    # bench/tasks/my_task.py
    from bench.tasks import Run, Task

    class MyTask(Task):
        def make(self, seed, width=None):
            ...  # build the model and data from ``seed`` only
            return Run(model, param_groups, batches, train_loss, val_loss)

    TASK = MyTask(name="my_task", family="sgd", steps={"quick": 300, "full": 1000},
                  ref_lr=0.03, target=0.5)

A module may define ``TASKS``, a tuple of tasks, instead (variants sharing one builder).

A task may declare the LR schedule its users run (``schedule``, a :class:`UserSchedule`):
contenders that keep the user's schedule train under it, applied as the user's loop
applies it; contenders that bring their own schedule replace it (see :mod:`bench.contenders`).

Everything is built from the seed and data shipped with Python, torch or scikit-learn;
nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Run", "Task", "UserSchedule", "SCHEDULE_KINDS", "load_tasks"]

Batch = Any


@dataclass
class Run:
    """One seeded instance of a task, ready to train.

    ``batches()`` returns a new iterator over the same seeded, endless batch stream each
    time it is called (a range test can use its own copy without moving the run's).
    ``train_loss(model, batch)`` is the differentiable mini-batch loss;
    ``val_loss(model)`` the validation loss as a float (called under ``no_grad``).
    """

    model: torch.nn.Module
    param_groups: list[dict[str, Any]]
    batches: Callable[[], Iterator[Batch]]
    train_loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    val_loss: Callable[[torch.nn.Module], float]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


#: How a user's loop applies its schedule: see :class:`UserSchedule`.
SCHEDULE_KINDS = ("loop", "lambda", "onecycle")


@dataclass(frozen=True)
class UserSchedule:
    """The LR schedule a task's users run, and how their loop applies it.

    ``factor(t, steps)`` is a linear warm-up over the first ``warmup`` share of the steps
    to 1, then a half cosine down to ``min_ratio`` at the last step; ``t`` counts optimizer
    steps from 0. Each param group's LR is its own peak (its starting LR) times the
    factor, so the groups keep their ratios. ``kind`` says who applies it:

    - ``"loop"``: the loop writes ``group["lr"] = peak * factor(t)`` before every
      optimizer step, from its own iteration counter (:meth:`scheduler` gives ``None``);
    - ``"lambda"``: ``LambdaLR(optimizer, factor)``, stepped after every optimizer step;
    - ``"onecycle"``: ``OneCycleLR(optimizer, max_lr=each group's peak, total_steps=steps)``
      with torch's defaults (it cycles momentum, AdamW's beta1, too); ``factor`` unused.

    >>> s = UserSchedule("lambda", warmup=0.1, min_ratio=0.1)
    >>> [round(s.factor(t, 100), 3) for t in (0, 9, 10, 99)]
    [0.1, 1.0, 1.0, 0.1]
    """

    kind: str
    warmup: float = 0.1
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"UserSchedule kind={self.kind!r} is invalid; allowed: "
                             f"{', '.join(SCHEDULE_KINDS)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"UserSchedule warmup={self.warmup!r} is out of range; "
                             "allowed: 0 <= warmup < 1 (a share of the steps)")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"UserSchedule min_ratio={self.min_ratio!r} is out of range; "
                             "allowed: 0 <= min_ratio <= 1")

    def warmup_steps(self, steps: int) -> int:
        return max(1, round(self.warmup * steps)) if self.warmup > 0 else 0

    def factor(self, t: int, steps: int) -> float:
        """The LR multiplier at optimizer step ``t`` (from 0) of a ``steps``-step run."""
        warm = self.warmup_steps(steps)
        if t < warm:
            return (t + 1) / warm
        done = min(1.0, (t - warm) / max(1, steps - 1 - warm))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))

    def scheduler(self, optimizer: torch.optim.Optimizer, steps: int):
        """The torch scheduler a ``"lambda"`` or ``"onecycle"`` user builds on ``optimizer``
        (each group's current LR is its peak); ``None`` for ``"loop"``."""
        if self.kind == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                     lambda t: self.factor(t, steps))
        if self.kind == "onecycle":
            peaks = [float(g["lr"]) for g in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks,
                                                       total_steps=steps)
        return None

    def describe(self) -> str:
        if self.kind == "onecycle":
            return ("OneCycleLR(max_lr = starting LR, total_steps = steps), torch defaults, "
                    "stepped after each step")
        how = ("the loop writes each group's LR before each step from its own iteration "
               "counter" if self.kind == "loop" else "LambdaLR stepped after each step")
        return (f"linear warm-up over {self.warmup:.0%} of the steps, cosine to "
                f"{self.min_ratio:g} x the starting LR; {how}")


@dataclass(frozen=True)
class Task:
    """What every task declares; subclasses implement :meth:`make` only.

    ``family`` picks the base optimizer: ``"sgd"`` (SGD with ``momentum``) or ``"adam"``
    (AdamW). ``ref_lr`` is the task's sensible default LR; the LR grid is ``ref_lr x
    10**k`` for k in -2..2 (four decades) and the oracle's finer grid takes half-decade
    steps over the same span. ``target`` is the validation loss for time to target.
    ``widths`` (optional) lists the widths of a width sweep, smallest first.
    ``schedule`` (optional) is the users' own LR schedule, peaking at the starting LR.
    """

    name: str
    family: str
    steps: dict[str, int]
    ref_lr: float
    target: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    widths: tuple[int, ...] = ()
    #: Validation evaluations per run (time-to-target resolution is steps / evals).
    evals: int = 20
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schedule: UserSchedule | None = None

    def make(self, seed: int, width: int | None = None) -> Run:
        """Build one seeded run (model, param groups, batches, losses)."""
        raise NotImplementedError

    @property
    def lr_grid(self) -> tuple[float, ...]:
        """Starting LRs of the robustness scenario: five points over four decades."""
        return tuple(_round(self.ref_lr * 10.0 ** k) for k in range(-2, 3))

    @property
    def oracle_grid(self) -> tuple[float, ...]:
        """The oracle's LRs: half-decade steps over the same four decades."""
        return tuple(_round(self.ref_lr * 10.0 ** (k / 2)) for k in range(-4, 5))


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


def _module_tasks(name: str, module: Any) -> tuple[Task, ...]:
    """A module's ``TASK``, or its ``TASKS`` tuple; anything else is refused by name."""
    if hasattr(module, "TASKS"):
        tasks = module.TASKS
        if not isinstance(tasks, tuple) or not tasks or \
                not all(isinstance(t, Task) for t in tasks):
            raise TypeError(f"bench.tasks.{name}: TASKS must be a non-empty tuple of "
                            f"bench.tasks.Task, got {tasks!r:.80}")
        return tasks
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise TypeError(f"bench.tasks.{name}: TASK must be a bench.tasks.Task, "
                        f"got {type(task).__name__}")
    return (task,)


def load_tasks() -> dict[str, Task]:
    """Every ``TASK`` (or ``TASKS``) in this package's modules, by name, in sorted order."""
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for task in _module_tasks(info.name, module):
            if task.name in found:
                raise ValueError(f"bench.tasks.{info.name}: task name {task.name!r} is "
                                 "taken; allowed: a name no other task has")
            found[task.name] = task
    return dict(sorted(found.items()))
