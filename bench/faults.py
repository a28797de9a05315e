"""Fault recovery: inject a real fault into a real training run, with and without trimtab.

    python -m bench.faults [--seeds 5] [--schedules constant,warmup_cosine]

Faults (all at the same data position, iteration 400 of 900 optimizer steps):

- ``scaled_inputs``: three batches with their inputs multiplied by 1e3;
- ``corrupt_targets``: twenty batches whose targets are replaced by noise x 1e3;
- ``nan_grad``: a NaN written into one gradient;
- ``lr_100x``: the user's own code multiplies the LR by 100, once.

The task is a ReLU MLP (16-64-1) regressing a noisy linear rule with SGD + momentum
(its validation loss floor is the noise variance, 0.09), under one of two schedules: a
constant LR of 0.05, or ``warmup_cosine``, the loop writing ``param_group['lr']`` itself
at every iteration as nanoGPT does (linear warm-up over 50 iterations to 0.05, cosine to
0.005 at iteration 900; keyed on the loop's iteration counter, which a rollback does not
rewind). There ``lr_100x`` is one iteration's LR written 100x too high (the loop rewrites
it at the next), where under the constant LR it stays.

Each seed trains four runs: attached without the fault (the reference), attached with it,
bare with it, and bare without it. Printed per fault: runs where the bare run was damaged
(non-finite, or validation loss over 1.5x the reference), runs trimtab recovered (finite
and at most 10% above the reference), optimizer steps redone after rollbacks by the
faulted run and, beside them, by the reference, and the faulted run's final loss over the
attached reference and over the bare clean run.

The attached runs go in lockstep with the controller (each report waits for its answer,
:mod:`bench._lockstep`), so a seed's row repeats whatever the machine's load;
``--no-lockstep`` lets commands land whenever they arrive, as in a real run.

The same harness is used by ``tests/integration/test_rollback.py``. The same four faults
meet every contender of ``python -m bench run`` on its tasks (the ``faults`` scenario,
:mod:`bench.recovery`), through :func:`poison_batch` and :func:`poison_grad`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench._serve import Controller

FAULTS = ("scaled_inputs", "corrupt_targets", "nan_grad", "lr_100x")
FAULT_AT = 400
TOTAL = 900
CHECKPOINT_EVERY = 50
REPORT_EVERY = 5
#: The controller settings the benchmark and the tests run with (small task, small windows).
CONTROLLER_CONFIG = """
[rollback]
stable_window_steps = 60
"""


class Task:
    """A ReLU MLP regressing ``y = x w + 0.3 noise``; ReLU so poisoned batches really hurt."""

    def __init__(self, seed: int, n: int = 512, dim: int = 16, hidden: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ self.w + 0.3 * torch.randn(n, 1, generator=g)
        self.g = g
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, 1))
        gv = torch.Generator().manual_seed(10_000 + seed)
        self.xv = torch.randn(1024, dim, generator=gv)
        self.yv = self.xv @ self.w + 0.3 * torch.randn(1024, 1, generator=gv)

    def batch(self, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.x), (size,), generator=self.g)
        return self.x[idx], self.y[idx]

    def validation_loss(self) -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(self.model(self.xv), self.yv).item()


#: Batches a fault touches from its first iteration on (the others touch one iteration).
SPAN = {"scaled_inputs": 3, "corrupt_targets": 20}
#: What ``lr_100x`` multiplies the LR by.
LR_FACTOR = 100.0
SCHEDULES = ("constant", "warmup_cosine")
PEAK_LR, MIN_LR, WARMUP = 0.05, 0.005, 50


def scheduled_lr(schedule: str, it: int) -> float:
    """The LR a loop with ``schedule`` writes at iteration ``it``.

    >>> [round(scheduled_lr("warmup_cosine", i), 4) for i in (0, 49, 50, 475, 900, 2000)]
    [0.001, 0.05, 0.05, 0.0275, 0.005, 0.005]
    >>> scheduled_lr("constant", 123)
    0.05
    """
    if schedule == "constant":
        return PEAK_LR
    if schedule != "warmup_cosine":
        raise ValueError(f"schedule {schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if it < WARMUP:
        return PEAK_LR * (it + 1) / WARMUP
    frac = min(1.0, (it - WARMUP) / (TOTAL - WARMUP))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * frac)) * (PEAK_LR - MIN_LR)


def poison(kind: str | None, it: int, opt: torch.optim.Optimizer, xb, yb, at: int = FAULT_AT):
    """Apply fault ``kind`` at data position ``it`` (before the forward pass); the fault
    starts at iteration ``at``."""
    if kind == "scaled_inputs" and at <= it < at + SPAN[kind]:
        xb = xb * 1e3
    elif kind == "corrupt_targets" and at <= it < at + SPAN[kind]:
        yb = 1e3 * torch.randn_like(yb)
    elif kind == "lr_100x" and it == at:
        for group in opt.param_groups:
            group["lr"] *= LR_FACTOR  # a bug in the user's own code
    return xb, yb


def poison_grad(kind: str | None, it: int, model: torch.nn.Module, at: int = FAULT_AT) -> None:
    """Apply a gradient fault at data position ``it`` (after backward)."""
    if kind == "nan_grad" and it == at:
        p = next(p for p in model.parameters() if p.grad is not None)
        p.grad.view(-1)[0] = float("nan")


def poison_batch(kind: str | None, it: int, batch, at: int, seed: int = 0):
    """The benchmark tasks' version of :func:`poison` for an ``(inputs, targets)`` batch:
    returns ``(batch, loss_scale)``.

    ``scaled_inputs`` multiplies floating-point inputs by 1e3; token inputs cannot be
    scaled, so there the batch's loss (hence its gradient) is scaled by 1e3 instead.
    ``corrupt_targets`` replaces floating-point targets by noise x 1e3, as :func:`poison`
    does, and shuffles integer targets (class labels, next tokens) across the batch: every
    label stays a valid class, most are wrong. The gradient fault is :func:`poison_grad`;
    the LR fault is the contender's ``Stepper.scale_lr`` (its schedule scales too).
    """
    if kind not in SPAN or not at <= it < at + SPAN[kind]:
        return batch, 1.0
    x, y = batch
    if kind == "scaled_inputs":
        return ((x * 1e3, y), 1.0) if x.is_floating_point() else ((x, y), 1e3)
    if y.is_floating_point():
        return (x, 1e3 * torch.randn_like(y)), 1.0
    g = torch.Generator().manual_seed(7919 * seed + it)
    flat = y.reshape(-1)
    return (x, flat[torch.randperm(flat.numel(), generator=g)].view_as(y)), 1.0


@dataclass
class Outcome:
    val: float
    iterations: int
    steps: int
    restored: list[int] = field(default_factory=list)

    @property
    def steps_lost(self) -> int:
        return self.iterations - self.steps


def train(kind: str | None, endpoint: str | None, job: str, seed: int = 0,
          total: int = TOTAL, fault_every_attempt: bool = False,
          hook: Callable[[object], None] | None = None,
          journal: str | None = None, schedule: str = "constant",
          device: str = "cpu", lr_scale: float = 1.0, fault_at: int = FAULT_AT) -> Outcome:
    """Train to ``total`` optimizer steps with fault ``kind`` on ``device``; attached when
    ``endpoint``; the loop writes its LR at every iteration unless ``schedule`` is
    ``constant``; ``lr_scale`` multiplies the loop's LR throughout (a run started hot).

    ``fault_every_attempt`` keys the fault on the optimizer step instead of the data
    position, so it recurs after every rollback. With ``journal`` (the controller's), an
    attached run goes in lockstep with the controller (:mod:`bench._lockstep`), so it
    repeats exactly; without, commands land whenever they arrive, as in a real run.
    ``device``: where the model trains (the data is drawn on the CPU, as always).
    ``fault_at``: the iteration (or step) the fault starts at.
    """
    from trimtab.client import attach

    task = Task(seed)
    task.model.to(device)
    opt = torch.optim.SGD(task.model.parameters(), lr=lr_scale * scheduled_lr(schedule, 0),
                          momentum=0.9)
    restored: list[int] = []
    guard = None
    if endpoint is not None:
        guard = attach(task.model, opt, job=job, endpoint=endpoint, report_every=REPORT_EVERY,
                       heartbeat_s=0.2, checkpoint_every=CHECKPOINT_EVERY,
                       on_rollback=restored.append)
    lockstep = None
    if guard is not None and journal is not None:
        from bench._lockstep import Lockstep

        lockstep = Lockstep(journal, guard)
    it = 0
    while (guard.global_step if guard else it) < total and it < 6 * total:
        where = guard.global_step if (guard and fault_every_attempt) else it
        if schedule != "constant":
            for group in opt.param_groups:
                group["lr"] = lr_scale * scheduled_lr(schedule, it)
        xb, yb = (t.to(device) for t in task.batch())
        xb, yb = poison(kind, where, opt, xb, yb, fault_at)
        loss = torch.nn.functional.mse_loss(task.model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        poison_grad(kind, where, task.model, fault_at)
        if guard is None:
            opt.step()
        else:
            guard.step(loss)
            if lockstep is not None:
                lockstep.after_step()
        it += 1
    steps = it
    if guard is not None:
        if hook is not None:
            hook(guard)
        steps = guard.global_step
        guard.close()
    task.model.cpu()
    return Outcome(task.validation_loss(), it, steps, restored)


def damaged(run: Outcome, clean: Outcome) -> bool:
    return not math.isfinite(run.val) or run.val > 1.5 * clean.val


def recovered(run: Outcome, clean: Outcome) -> bool:
    """Finite and at most 10% above the reference (ending lower than the reference is
    recovery too: the attached runs' LR paths differ with when commands arrive)."""
    return math.isfinite(run.val) and run.val <= 1.10 * clean.val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--no-lockstep", dest="lockstep", action="store_false",
                    help="let commands land whenever they arrive, as in a real run (the "
                         "runs then move with the machine's load); by default each report "
                         "waits for its answer (bench/_lockstep.py) and the runs repeat")
    ap.add_argument("--fault-at", type=int, default=FAULT_AT,
                    help=f"the iteration the fault starts at (default {FAULT_AT}; the health "
                         "judgement reads spikes from the 21st report, iteration 100, on)")
    args = ap.parse_args()
    if not 0 < args.fault_at < TOTAL:
        ap.error(f"--fault-at {args.fault_at}: allowed 1..{TOTAL - 1} (the run's iterations)")
    schedules = args.schedules.split(",")
    for name in schedules:
        try:
            scheduled_lr(name, 0)  # a bad name is refused before anything runs
        except ValueError as e:
            ap.error(f"--schedules: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "trimtab.toml")
        with open(cfg, "w") as f:
            f.write(CONTROLLER_CONFIG)
        ctl = Controller(tmp, cfg)
        endpoint = ctl.endpoint
        journal = ctl.journal if args.lockstep else None
        rows = []
        try:
            for sched in schedules:
                for kind in args.faults.split(","):
                    rows.append((sched, kind, *_fault_row(kind, sched, args.seeds, endpoint,
                                                          args.fault_at, journal)))
        finally:
            ctl.stop()
    print(f"# fault recovery: {platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, python {platform.python_version()}; seeds 0..{args.seeds - 1}; "
          f"{TOTAL} steps, fault at iteration {args.fault_at}, checkpoint every "
          f"{CHECKPOINT_EVERY}; lockstep {'on' if args.lockstep else 'off'}")
    print("| schedule | fault | runs | bare runs damaged | trimtab runs recovered "
          "| steps redone (median) | steps redone (max) | reference's steps redone (median) "
          "| ratio to attached clean (median) | (best) | (worst) "
          "| ratio to bare clean (median) | (worst) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sched, kind, n, dmg, rec, lmed, lmax, pmed, rmed, rmin, rmax, bmed, bmax in rows:
        print(f"| {sched} | {kind} | {n} | {dmg}/{n} | {rec}/{n} | {lmed:.0f} | {lmax} "
              f"| {pmed:.0f} | {rmed:.3f} | {rmin:.3f} | {rmax:.3f} | {bmed:.3f} | {bmax:.3f} |")


def _fault_row(kind: str, sched: str, seeds: int, endpoint: str, at: int = FAULT_AT,
               journal: str | None = None) -> tuple:
    """One row of the table; with ``journal`` the attached runs go in lockstep."""
    dmg = rec = 0
    lost, planned, ratios, to_bare = [], [], [], []
    for seed in range(seeds):
        clean = train(None, endpoint, f"clean-{sched}-{kind}-{seed}", seed, schedule=sched,
                      journal=journal)
        bare_clean = train(None, None, "bare-clean", seed, schedule=sched)
        bare = train(kind, None, "bare", seed, schedule=sched, fault_at=at)
        run = train(kind, endpoint, f"{sched}-{kind}-{seed}", seed, schedule=sched,
                    fault_at=at, journal=journal)
        dmg += damaged(bare, clean)
        rec += recovered(run, clean)
        lost.append(run.steps_lost)
        planned.append(clean.steps_lost)
        ratios.append(run.val / clean.val if math.isfinite(run.val) else math.inf)
        to_bare.append(run.val / bare_clean.val if math.isfinite(run.val) else math.inf)
    return (seeds, dmg, rec, statistics.median(lost), max(lost), statistics.median(planned),
            statistics.median(ratios), min(ratios), max(ratios), statistics.median(to_bare),
            max(to_bare))

if __name__ == "__main__":
    main()
