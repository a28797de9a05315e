"""One benchmark run: a task, a contender, a starting LR, a seed and a step budget.

The budget counts iterations (batches drawn and gradients computed), the same for every
contender: steps that trimtab redoes after a rollback come out of it.

A run may carry a fault (:mod:`bench.faults`): it starts at iteration
``fault_start(steps)`` (the data position, so a rollback does not replay it) and the run
records its per-iteration training loss and LR for the plots.

A task's user schedule (``Task.schedule``) is applied here as the user's loop applies it,
unless the contender owns a schedule (``Contender.owns_schedule``): a ``"loop"`` schedule
writes each group's LR before the step from this loop's iteration counter; a torch
scheduler (``stepper.user_scheduler``) is stepped right after ``stepper.step(loss)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench import contenders, faults
from bench.tasks import Task, UserSchedule

__all__ = ["RunSpec", "RunResult", "train", "fault_start", "FAULT_FRACTION"]

#: Where in the budget a fault starts.
FAULT_FRACTION = 0.5


def fault_start(steps: int) -> int:
    """The iteration at which a run of ``steps`` iterations meets its fault."""
    return max(1, round(FAULT_FRACTION * steps))


@dataclass(frozen=True)
class RunSpec:
    task: str
    contender: str
    lr: float
    seed: int
    steps: int
    width: int | None = None
    #: A fault of :data:`bench.faults.FAULTS`, or None for a clean run.
    fault: str | None = None

    @property
    def key(self) -> tuple:
        return (self.task, self.contender, self.lr, self.seed, self.steps, self.width,
                self.fault)

    def clean(self) -> RunSpec:
        """The same run without its fault."""
        return RunSpec(self.task, self.contender, self.lr, self.seed, self.steps, self.width)

    def job(self) -> str:
        w = f"-w{self.width}" if self.width else ""
        f = f"-{self.fault}" if self.fault else ""
        return f"bench-{self.task}{w}-{self.contender}-lr{self.lr:g}-s{self.seed}{f}"


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
    #: Faulted runs: the training loss and the LR (group 0) at every iteration.
    loss_trace: list[float] = field(default_factory=list)
    lr_trace: list[float] = field(default_factory=list)

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


class LoopSchedule:
    """A user's loop that writes its LR itself (kind ``"loop"``): before optimizer step
    ``t`` (from 0) every group's LR becomes its own peak times ``schedule.factor(t)``.

    The peaks are the groups' LRs when the loop starts (so the groups keep their ratios);
    ``t`` is the loop's own iteration counter, which a trimtab rollback does not rewind.
    """

    def __init__(self, schedule: UserSchedule, optimizer: torch.optim.Optimizer,
                 steps: int) -> None:
        self.schedule, self.optimizer, self.steps = schedule, optimizer, steps
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]

    def write(self, t: int) -> None:
        f = self.schedule.factor(t, self.steps)
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            group["lr"] = peak * f

    def scale(self, factor: float) -> None:
        """The user's code multiplies its LR (the ``lr_100x`` fault): the peaks it writes from."""
        self.peaks = [p * factor for p in self.peaks]


def _user_schedule(task: Task, contender: contenders.Contender) -> UserSchedule | None:
    return None if contender.owns_schedule else task.schedule


def train(task: Task, spec: RunSpec, endpoint: str | None = None,
          journal: str | None = None) -> RunResult:
    """Train ``spec`` to its budget, evaluating ``task.evals`` times; stops early once the
    weights are non-finite (nothing can come back from there). ``journal`` (the trimtab
    controller's) puts a trimtab run in lockstep (:mod:`bench._lockstep`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    run = task.make(spec.seed, spec.width)
    contender = contenders.get(spec.contender)
    with torch.no_grad():
        init_val = run.val_loss(run.model)
    schedule = _user_schedule(task, contender)
    stepper = contender.build(contenders.Setup(task, run, spec.lr, spec.steps, endpoint,
                                               spec.job(), journal, schedule))
    loop_lr = None
    if schedule is not None and schedule.kind == "loop":
        loop_lr = LoopSchedule(schedule, stepper.optimizer, spec.steps)
    elif schedule is not None and stepper.user_scheduler is None:
        raise RuntimeError(f"contender {spec.contender!r} keeps the user's schedule but "
                           f"built no scheduler for it (kind {schedule.kind!r})")
    every = max(1, spec.steps // task.evals)
    curve: list[tuple[int, float]] = [(0, init_val)]
    losses: list[float] = []
    lrs: list[float] = []
    kind, at = spec.fault, fault_start(spec.steps)
    batches = run.batches()
    run.model.train()
    val = init_val
    try:
        for it in range(1, spec.steps + 1):
            batch, scale = faults.poison_batch(kind, it, next(batches), at, spec.seed)
            if kind == "lr_100x" and it == at:
                stepper.scale_lr(faults.LR_FACTOR)  # a bug in the user's own code
                if loop_lr is not None:
                    loop_lr.scale(faults.LR_FACTOR)
            if loop_lr is not None:
                loop_lr.write(it - 1)
            loss = run.train_loss(run.model, batch)
            if scale != 1.0:
                loss = loss * scale
            stepper.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            faults.poison_grad(kind, it, run.model, at)
            stepper.step(loss)
            if kind is not None:
                # A host read per step, faulted runs only; 6 digits keep the runs file small.
                losses.append(float(f"{float(loss.detach()):.6g}"))
                lrs.append(float(f"{stepper.lr_used():.6g}"))
            if stepper.user_scheduler is not None:
                stepper.user_scheduler.step()
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
                     dict(info), time.process_time() - c0, losses, lrs)
