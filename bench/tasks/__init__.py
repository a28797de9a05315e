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

__all__ = ["Run", "Task", "load_tasks"]

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


@dataclass(frozen=True)
class Task:
    """What every task declares; subclasses implement :meth:`make` only.

    ``family`` picks the base optimizer: ``"sgd"`` (SGD with ``momentum``) or ``"adam"``
    (AdamW). ``ref_lr`` is the task's sensible default LR; the LR grid is ``ref_lr x
    10**k`` for k in -2..2 (four decades) and the oracle's finer grid takes half-decade
    steps over the same span. ``target`` is the validation loss for time to target.
    ``widths`` (optional) lists the widths of a width sweep, smallest first.
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


def load_tasks() -> dict[str, Task]:
    """Every ``TASK`` in this package's modules, by name, in sorted order."""
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if not isinstance(task, Task):
            raise TypeError(f"bench.tasks.{info.name}: TASK must be a bench.tasks.Task, "
                            f"got {type(task).__name__}")
        found[task.name] = task
    return dict(sorted(found.items()))
