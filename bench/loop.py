"""One benchmark run: a task, a contender, a starting LR, a seed and a step budget.

The budget counts iterations (batches drawn and gradients computed), the same for every
contender: steps that trimtab redoes after a rollback come out of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench import contenders
from bench.tasks import Task

__all__ = ["RunSpec", "RunResult", "train"]


@dataclass(frozen=True)
class RunSpec:
    task: str
    contender: str
    lr: float
    seed: int
    steps: int
    width: int | None = None

    @property
    def key(self) -> tuple:
        return (self.task, self.contender, self.lr, self.seed, self.steps, self.width)

    def job(self) -> str:
        w = f"-w{self.width}" if self.width else ""
        return f"bench-{self.task}{w}-{self.contender}-lr{self.lr:g}-s{self.seed}"


@dataclass
class RunResult:
    spec: RunSpec
    init_val: float
    final_val: float
    #: (iteration, validation loss) at every evaluation, starting with iteration 0.
    curve: list[tuple[int, float]]
    wall_s: float
    n_params: int
    info: dict[str, Any] = field(default_factory=dict)
    #: CPU seconds of this process for the run (what a quiet machine's wall time tracks).
    cpu_s: float = math.nan

    @property
    def diverged(self) -> bool:
        """Non-finite, or ended worse than it started."""
        return not math.isfinite(self.final_val) or self.final_val > self.init_val

    def steps_to(self, target: float) -> int | None:
        """First evaluated iteration with validation loss at or below ``target``."""
        return next((s for s, v in self.curve if math.isfinite(v) and v <= target), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["diverged"] = self.diverged
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        d = dict(d)
        d.pop("diverged", None)
        d["spec"] = RunSpec(**d["spec"])
        d["curve"] = [tuple(p) for p in d["curve"]]
        return cls(**d)


def _finite_params(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(task: Task, spec: RunSpec, endpoint: str | None = None) -> RunResult:
    """Train ``spec`` to its budget, evaluating ``task.evals`` times; stops early once the
    weights are non-finite (nothing can come back from there)."""
    t0, c0 = time.perf_counter(), time.process_time()
    run = task.make(spec.seed, spec.width)
    contender = contenders.get(spec.contender)
    with torch.no_grad():
        init_val = run.val_loss(run.model)
    stepper = contender.build(contenders.Setup(task, run, spec.lr, spec.steps, endpoint,
                                               spec.job()))
    every = max(1, spec.steps // task.evals)
    curve: list[tuple[int, float]] = [(0, init_val)]
    batches = run.batches()
    run.model.train()
    val = init_val
    try:
        for it in range(1, spec.steps + 1):
            loss = run.train_loss(run.model, next(batches))
            stepper.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stepper.step(loss)
            if it % every == 0 or it == spec.steps:
                stepper.eval_mode()
                run.model.eval()
                with torch.no_grad():
                    val = run.val_loss(run.model)
                run.model.train()
                stepper.train_mode()
                if not math.isfinite(val) or not _finite_params(run.model):
                    val = math.inf
                    curve.append((it, val))
                    break
                stepper.after_eval(val)
                curve.append((it, val))
    finally:
        info = stepper.close()
    final = val if math.isfinite(val) else math.inf
    return RunResult(spec, init_val, final, curve, time.perf_counter() - t0, run.n_params(),
                     dict(info), time.process_time() - c0)
