"""The contenders: each one wraps (optimizer, schedule or clipping, per-step hook) for a task.

A :class:`Contender` has a ``name``, a one-line ``settings`` string (printed with the
results) and ``build(setup) -> Stepper``; the training loop (:mod:`bench.loop`) calls,
for every batch, ``loss.backward()`` then ``stepper.step(loss)``; around every
validation ``stepper.eval_mode()`` / ``stepper.train_mode()`` and then
``stepper.after_eval(val)``; at the end ``stepper.close()``, which returns what the run
should record (a range test's LR, trimtab's rollbacks, ...).

Every contender starts from the same starting LR (the LR-robustness grid point), except
Prodigy, whose ``lr`` is a multiplier of its own estimate: it gets ``lr / task.ref_lr``,
so the grid's centre is Prodigy's default ``lr=1`` and the grid spans 1e-2..1e2 for it.

A task may carry its users' own LR schedule (``Task.schedule``, a
:class:`bench.tasks.UserSchedule`). A contender either brings its own schedule and so
*replaces* the user's (``owns_schedule = True``: warmup_cosine, step_decay, plateau,
onecycle_rangetest, schedulefree), or *keeps* it (constant, zclip, prodigy, trimtab and
its sets): the loop passes it in ``Setup.schedule``; the contender builds a torch
scheduler on its optimizer with :func:`user_scheduler` and exposes it as
``Stepper.user_scheduler`` (trimtab also hands it to ``attach``), and the loop steps it
after every ``stepper.step(loss)``; a ``"loop"`` schedule has no scheduler: the loop
writes the LR itself (:mod:`bench.loop`). On tasks without a schedule nothing differs.

trimtab candidate policy sets run as contenders named ``trimtab:NAME`` (see
:func:`trimtab_set`), each against its own controller.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench.tasks import Run, Task, UserSchedule

__all__ = ["CONTENDERS", "ORACLE_SCHEDULES", "Contender", "Setup", "Stepper", "get",
           "trimtab_set", "is_trimtab", "user_scheduler"]

#: Linear warm-up share of the run for warmup_cosine and Schedule-Free.
WARMUP_FRACTION = 0.05
#: trimtab's client settings (the controller runs its default configuration).
TRIMTAB_REPORT_EVERY = 5


@dataclass
class Setup:
    """What a contender needs to build its stepper for one run."""

    task: Task
    run: Run
    lr: float
    steps: int
    endpoint: str | None = None
    job: str = "bench"
    #: The controller's journal: when set, a trimtab run goes in lockstep (bench._lockstep).
    journal: str | None = None
    #: The user's schedule the contender keeps (``None``: none, or the contender owns one).
    schedule: UserSchedule | None = None


def user_scheduler(s: Setup, optimizer: torch.optim.Optimizer):
    """The user's torch scheduler for this run, built on ``optimizer`` as the user builds
    it; ``None`` without a kept schedule or for a ``"loop"`` one (the loop writes the LR)."""
    return None if s.schedule is None else s.schedule.scheduler(optimizer, s.steps)


def _scale_schedule(scheduler, optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale a scheduler's reference LRs (base_lrs, OneCycle's per-group max_lr, ...) by
    ``factor``, as the group LRs were (see :mod:`bench._user_lr`)."""
    from bench._user_lr import scale_schedule

    scale_schedule(scheduler, optimizer, factor)


class Stepper:
    """Drives one run's optimizer; the base class is a plain ``optimizer.step()``.

    ``user_scheduler`` is the user's own torch scheduler when the run keeps one: the loop
    calls its ``step()`` right after :meth:`step`, as the user's loop does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, user_scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.user_scheduler = user_scheduler
        self.info: dict[str, Any] = {}

    def step(self, loss: torch.Tensor) -> None:
        """Called after ``loss.backward()``: clip, step, advance any schedule."""
        self.optimizer.step()

    def after_eval(self, val: float) -> None:
        """Called with each validation loss."""

    def eval_mode(self) -> None:
        """Called before validation (Schedule-Free swaps in its averaged weights)."""

    def train_mode(self) -> None:
        """Called after validation."""

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def lr_used(self) -> float:
        """The LR (group 0) the last :meth:`step` used; read right after it, before the
        user's scheduler steps."""
        return self.lr()

    def scale_lr(self, factor: float) -> None:
        """The user's code multiplies the LR by ``factor`` (the ``lr_100x`` fault); a
        schedule's reference LRs scale with it, so the fault persists under any schedule
        (a ``"loop"`` schedule's peaks are the loop's: :mod:`bench.loop` scales them)."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        if self.user_scheduler is not None:
            _scale_schedule(self.user_scheduler, self.optimizer, factor)

    def close(self) -> dict[str, Any]:
        """Ends the run; returns what it should record."""
        return self.info


class ScheduledStepper(Stepper):
    """The contender's own schedule, stepped after every optimizer step."""

    def __init__(self, optimizer, scheduler) -> None:
        super().__init__(optimizer)
        self.scheduler = scheduler
        self._used = self.lr()

    def step(self, loss):
        self._used = self.lr()
        self.optimizer.step()
        self.scheduler.step()

    def lr_used(self):
        return self._used

    def scale_lr(self, factor):
        super().scale_lr(factor)
        _scale_schedule(self.scheduler, self.optimizer, factor)


def base_optimizer(task: Task, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The task family's optimizer: SGD with momentum or AdamW, with the task's decay."""
    if task.family == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=task.momentum,
                               weight_decay=task.weight_decay)
    if task.family == "adam":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999),
                                 weight_decay=task.weight_decay)
    raise ValueError(f"task {task.name}: family must be 'sgd' or 'adam', got {task.family!r}")


@dataclass
class Contender:
    """A named way to train; subclasses override :meth:`build`."""

    name: str
    settings: str
    #: Part of the oracle's grid of hand-tuned schedules.
    oracle: bool = False
    packages: tuple[str, ...] = field(default=())
    #: Brings its own LR schedule, which replaces the task's user schedule; otherwise the
    #: contender keeps the user's (``Setup.schedule``) and must build it.
    owns_schedule: ClassVar[bool] = False

    def build(self, s: Setup) -> Stepper:
        raise NotImplementedError

    def applies_to(self, task: Task) -> bool:
        return True


class Constant(Contender):
    def build(self, s):
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        return Stepper(opt, user_scheduler(s, opt))


def _lambda(opt, fn):
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


class WarmupCosine(Contender):
    owns_schedule = True

    def build(self, s):
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        warm = max(1, round(WARMUP_FRACTION * s.steps))

        def factor(t):
            if t < warm:
                return (t + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, s.steps - warm))))

        return ScheduledStepper(opt, _lambda(opt, factor))


class StepDecay(Contender):
    owns_schedule = True

    def build(self, s):
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        milestones = [s.steps // 2, (3 * s.steps) // 4]
        return ScheduledStepper(opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1))


@dataclass
class ConstantCooldown(Contender):
    """The starting LR held, then a straight line to 0 over the last ``fraction`` of the
    steps (a warm-up-stable-decay schedule without the warm-up): what a loop with a
    constant LR would get from a cooldown, for ``python -m bench.ceiling``. Not one of the
    quality benchmark's contenders; only for tasks without a schedule of their own."""

    fraction: float = 0.1
    owns_schedule = True

    def build(self, s):
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        start = round((1.0 - self.fraction) * s.steps)

        def factor(t):  # after t scheduler steps: the (t+1)-th optimizer step's factor
            return 1.0 if t < start else max(0.0, (s.steps - t) / max(1, s.steps - start))

        return ScheduledStepper(opt, _lambda(opt, factor))

    def applies_to(self, task: Task) -> bool:
        return task.schedule is None


class PlateauStepper(Stepper):
    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=2)

    def scale_lr(self, factor):
        super().scale_lr(factor)
        self.scheduler.min_lrs = [x * factor for x in self.scheduler.min_lrs]

    def after_eval(self, val):
        self.scheduler.step(val if math.isfinite(val) else float("inf"))


class Plateau(Contender):
    owns_schedule = True

    def build(self, s):
        return PlateauStepper(base_optimizer(s.task, s.run.param_groups, s.lr))


class _LossModel(torch.nn.Module):
    """Presents ``train_loss(model, batch)`` as ``model(batch)`` to torch-lr-finder."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.inner = run.model
        self._loss = run.train_loss

    def forward(self, batch):
        return self._loss(self.inner, batch)


def range_test(s: Setup, num_iter: int = 100, end_lr: float = 10.0) -> tuple[float, dict]:
    """torch-lr-finder's exponential range test from ``s.lr`` to ``end_lr`` on a copy of the
    batch stream; returns the steepest-descent LR (the package's suggestion rule, with its
    ``plot()`` defaults skip_start=10, skip_end=5) and a record. Model and optimizer are
    restored afterwards (``LRFinder.reset``). Smith 2017, "Cyclical Learning Rates for
    Training Neural Networks", section 3.3."""
    import numpy as np
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    class Batches(TrainDataLoaderIter):
        def __init__(self, it) -> None:  # no DataLoader: the task's own stream
            self._it = it

        def __next__(self):
            return next(self._it), None

    opt = base_optimizer(s.task, s.run.param_groups, s.lr)
    finder = LRFinder(_LossModel(s.run), opt, lambda loss, _: loss)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finder.range_test(Batches(s.run.batches()), end_lr=end_lr, num_iter=num_iter)
    finder.reset()
    lrs, losses = finder.history["lr"], finder.history["loss"]
    lrs_c, losses_c = lrs[10:-5], losses[10:-5]
    ok = len(lrs_c) >= 2 and all(math.isfinite(x) for x in losses_c)
    suggested = float(lrs_c[int(np.gradient(np.array(losses_c)).argmin())]) if ok else s.lr
    return suggested, {"range_test_iters": len(lrs), "range_test_fallback": not ok}


class OneCycleRangeTest(Contender):
    owns_schedule = True

    def build(self, s):
        max_lr, info = range_test(s, num_iter=min(100, max(20, s.steps // 3)))
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=s.steps)
        stepper = ScheduledStepper(opt, sched)
        stepper.info.update(info, max_lr=max_lr)
        return stepper


class ScheduleFreeStepper(Stepper):
    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        optimizer.train()

    def eval_mode(self):
        self.optimizer.eval()

    def train_mode(self):
        self.optimizer.train()


class ScheduleFree(Contender):
    owns_schedule = True

    def build(self, s):
        import schedulefree

        warm = max(1, round(WARMUP_FRACTION * s.steps))
        if s.task.family == "sgd":
            opt = schedulefree.SGDScheduleFree(s.run.param_groups, lr=s.lr,
                                               momentum=s.task.momentum,
                                               weight_decay=s.task.weight_decay,
                                               warmup_steps=warm)
        else:
            opt = schedulefree.AdamWScheduleFree(s.run.param_groups, lr=s.lr,
                                                 betas=(0.9, 0.999),
                                                 weight_decay=s.task.weight_decay,
                                                 warmup_steps=warm)
        return ScheduleFreeStepper(opt)


class Prodigy(Contender):
    def build(self, s):
        from prodigyopt import Prodigy as ProdigyOpt

        scale = s.lr / s.task.ref_lr
        with contextlib.redirect_stdout(io.StringIO()):  # it prints about weight decay
            opt = ProdigyOpt(s.run.param_groups, lr=scale, betas=(0.9, 0.999),
                             weight_decay=s.task.weight_decay, decouple=True)
        if s.schedule is not None:  # the user's schedule, on Prodigy's lr multiplier
            stepper = Stepper(opt, user_scheduler(s, opt))
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
            stepper = ScheduledStepper(opt, sched)
        stepper.info["prodigy_lr"] = scale
        return stepper


class ZClipStepper(Stepper):
    def __init__(self, optimizer, model, user_scheduler=None) -> None:
        super().__init__(optimizer, user_scheduler)
        from zclip import ZClip

        self.model = model
        self.zclip = ZClip()  # the package defaults, as its README shows them

    def step(self, loss):
        self.zclip.step(self.model)
        self.optimizer.step()


class ZClipConstant(Contender):
    def build(self, s):
        opt = base_optimizer(s.task, s.run.param_groups, s.lr)
        return ZClipStepper(opt, s.run.model, user_scheduler(s, opt))


class TrimtabStepper(Stepper):
    def __init__(self, optimizer, s: Setup) -> None:
        # The user's scheduler exists before attach, which takes it (a rollback restores
        # it); a "loop" schedule has none: the loop writes the LR from its own iteration
        # counter, and on_rollback leaves that counter alone, as nanoGPT's loop does.
        super().__init__(optimizer, user_scheduler(s, optimizer))
        from trimtab.client import attach

        #: (iteration, restored step) of each rollback.
        self.rollbacks: list[tuple[int, int]] = []
        self.guard = attach(s.run.model, optimizer, job=s.job, endpoint=s.endpoint,
                            report_every=TRIMTAB_REPORT_EVERY, heartbeat_s=0.2,
                            checkpoint_every=max(10, s.steps // 10),
                            scheduler=self.user_scheduler,
                            on_rollback=lambda step: self.rollbacks.append(
                                (self.iterations + 1, step)))
        self.lockstep = None
        if s.journal is not None:
            from bench._lockstep import Lockstep

            self.lockstep = Lockstep(s.journal, self.guard)
        self.iterations = 0
        #: trimtab's lr multiplier on the user's own lr, each time it changed.
        self.scales = [self.guard.scale.lr]

    def step(self, loss):
        self.guard.step(loss)
        self.iterations += 1
        if self.lockstep is not None:
            self.lockstep.after_step()
        m = self.guard.scale.lr
        if m != self.scales[-1]:
            self.scales.append(m)

    def lr_used(self):
        # trimtab applies its multiplier around the step and puts the user's value back
        # after it: the guard's knobs say what the step used.
        return float(self.guard.knobs.lr)

    def close(self):
        self.info.update(rollbacks=len(self.rollbacks), rollback_at=self.rollbacks,
                         skipped_or_redone=self.iterations - self.guard.global_step,
                         lr_changes=len(self.scales) - 1, final_lr=self.lr_used(),
                         final_lr_multiplier=self.scales[-1])
        if self.lockstep is not None:
            self.info.update(lockstep_timeouts=self.lockstep.timeouts,
                             lockstep_wait_s=round(self.lockstep.waited_s, 3))
            self.lockstep.close()
        self.guard.close()
        return self.info


class Trimtab(Contender):
    def build(self, s):
        if s.endpoint is None:
            raise RuntimeError("the trimtab contender needs a live controller endpoint")
        return TrimtabStepper(base_optimizer(s.task, s.run.param_groups, s.lr), s)


_WC = (f"base optimizer; linear warm-up over {WARMUP_FRACTION:.0%} of the steps, then cosine "
       "to 0 (LambdaLR)")
_SD = "base optimizer; MultiStepLR x0.1 at 50% and 75% of the steps"

CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Constant("constant", "bare: base optimizer at the starting LR under the task's own "
                         "schedule (none on most tasks), nothing else"),
    WarmupCosine("warmup_cosine", _WC, oracle=True),
    StepDecay("step_decay", _SD, oracle=True),
    Plateau("plateau", "base optimizer; torch ReduceLROnPlateau(mode=min, factor=0.5, "
                       "patience=2, threshold=1e-4 rel) stepped on each validation loss"),
    OneCycleRangeTest(
        "onecycle_rangetest",
        "torch-lr-finder LRFinder exponential range test from the starting LR to 10 over "
        "min(100, max(20, steps/3)) extra steps (not counted in the budget, model restored), "
        "smooth_f=0.05, diverge_th=5; max_lr = steepest-descent point (skip 10 first, 5 "
        "last); then torch OneCycleLR(max_lr, total_steps=steps) with its defaults "
        "(pct_start 0.3, cos, div 25, final_div 1e4, momentum/beta1 cycled 0.85-0.95)",
        packages=("torch-lr-finder",)),
    ScheduleFree("schedulefree",
                 f"SGDScheduleFree(momentum=0.9) or AdamWScheduleFree(betas=(0.9, 0.999)) at "
                 f"the starting LR, task weight decay, warmup_steps = {WARMUP_FRACTION:.0%} "
                 "of the steps; evaluated in eval() mode", packages=("schedulefree",)),
    Prodigy("prodigy",
            "Prodigy(lr = starting LR / task ref LR, betas=(0.9, 0.999), d_coef=1, "
            "decouple=True, task weight decay) + CosineAnnealingLR(T_max=steps), as its "
            "README recommends (a task's own schedule instead, where it has one); Adam-type "
            "on every task", packages=("prodigyopt",)),
    ZClipConstant("zclip", "base optimizer at the starting LR + ZClip() defaults (zscore, "
                           "adaptive_scaling, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, "
                           "warmup 25 steps)", packages=("zclip",)),
    Trimtab("trimtab",
            "base optimizer at the starting LR attached to a live `trimtab serve` with its "
            "default configuration (divergence_guard, lr_range_test sweeping on evidence, "
            f"its sweep fitted to the budget: sweep_steps=steps/5); report_every="
            f"{TRIMTAB_REPORT_EVERY}, checkpoint_every=max(10, steps/10), clip off"),
]}
ORACLE_SCHEDULES = tuple(n for n, c in CONTENDERS.items() if c.oracle)

#: Reference schedules measured outside the quality tables (``python -m bench.ceiling``).
REFERENCES: dict[str, Contender] = {c.name: c for c in [
    ConstantCooldown(f"cooldown{round(f * 100)}",
                     f"base optimizer at the starting LR, then linear to 0 over the last "
                     f"{f:.0%} of the steps (LambdaLR)", fraction=f)
    for f in (0.1, 0.2)
]}


_SETS: dict[str, Contender] = {}


def is_trimtab(name: str) -> bool:
    """Whether ``name`` is trimtab's contender or one of its candidate sets."""
    return name == "trimtab" or name.startswith("trimtab:")


def trimtab_set(name: str, policies: str) -> Contender:
    """The contender ``trimtab:NAME`` for a candidate policy set (``policies`` is how the
    set was written, for the settings table); its controller runs that set."""
    c = Trimtab(f"trimtab:{name}", "base optimizer at the starting LR attached to a live "
                f"`trimtab serve` whose policies are {policies}; otherwise as trimtab")
    _SETS[c.name] = c
    return c


def get(name: str) -> Contender:
    if name in CONTENDERS or name in _SETS or name in REFERENCES:
        return CONTENDERS.get(name) or _SETS.get(name) or REFERENCES[name]
    if name.startswith("trimtab:"):  # a worker process: the set lives in its controller
        return trimtab_set(name.split(":", 1)[1], "a candidate set")
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)} "
                     "and trimtab:NAME for a --trimtab-set") from None


def quiet_environment() -> None:
    """Silence progress bars and pick a headless plotting backend (for worker processes)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
