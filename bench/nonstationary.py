"""Loops whose loss is not one fixed objective, attached to a default controller: do no harm.

    python -m bench.nonstationary [--seeds 3] [--quick] [--out bench/results/nonstationary.md]

Two kinds of loop where the loss rises while the run is healthy, each run bare and
attached (a live ``trimtab serve`` with its defaults, no flag on ``attach``), same seed,
the benchmark's lockstep so that a run repeats:

* **curriculum**: a small MLP regression whose data gets harder at a step of the loop's
  own counter (a second, sharper target function added: its loss jumps 5-7x, then falls
  as the model adapts), at four (switch step, LR) settings. ``guard.step``; the loop runs
  its own number of iterations (a rollback costs steps, not extra compute). Measured: the
  mean squared error on the harder data after the last iteration.
* **growing**: a regression whose target's scale grows from 1 to 3 with the loop's own
  counter, its noise with it, as a value loss grows with the returns (AdamW 3e-3): its
  loss climbs while every step trains, and a climb verdict's rollback replays into the
  same rise. Measured: the mean squared error against the last target.
* **gan**: the toy GAN of 8 Gaussians in a ring (two 2-layer MLPs, Adam 1e-3, betas
  0.5/0.999), two guards with ``hooks=True`` and ``observe_loss``, one job per net.
  Measured: the share of 2000 generated points within 0.15 of a mode, times the share
  of the 8 modes those cover (higher is better: a generator collapsed onto one mode
  scores an eighth of its share); the modes covered are shown beside it.

Printed per run: the bare and attached values, their ratio, the rollbacks each attached
run took and the decisions its controller journaled. The aim: attached equal to bare (a
tuned loop is left alone), with no rollback.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench._lockstep import Lockstep
from bench._serve import Controller
from trimtab.client import attach

__all__ = ["main"]

#: (switch step, LR, iterations): where the harder data comes in, the run's tuned LR.
CURRICULA = ((250, 1e-2, 1000), (300, 1e-3, 1000), (400, 3e-3, 1000), (600, 3e-3, 1500))
#: The growing target's iterations and LR.
GROWING = (1500, 3e-3)
BATCH = 128


@dataclass
class Row:
    scenario: str
    setting: str
    bare: float
    attached: float
    rollbacks: int
    decisions: int
    extra: str = ""

    def ratio(self) -> float:
        return self.attached / self.bare if self.bare else math.nan


class _Attached:
    """One guard on the shared controller, stepped in lockstep."""

    def __init__(self, ctl: Controller, model, opt, job: str, hooks: bool) -> None:
        self.guard = attach(model, opt, job=job, endpoint=ctl.endpoint, hooks=hooks)
        self.lock = Lockstep(ctl.journal, self.guard)

    def close(self) -> int:
        rolled = self.guard.rollbacks
        self.guard.close()
        return rolled


def _decisions(journal: str, jobs: list[str]) -> int:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(jobs))
        return db.execute(f"SELECT count(*) FROM events WHERE kind = 'decision' "
                          f"AND job IN ({marks})", jobs).fetchone()[0]
    finally:
        db.close()


def _regressor() -> torch.nn.Module:
    """The regression tasks' MLP, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))


def curriculum_task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The curriculum's inputs, its easy and harder targets (a second, sharper function
    added), and its model (seeded): shared with the tests that run it against a serve."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 16, generator=g)
    w1, w2 = torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)
    easy = torch.tanh(x @ w1) + 0.1 * torch.randn(8192, 1, generator=g)
    hard = easy + 0.5 * torch.sin(3 * (x @ w2))
    return x, easy, hard, _regressor()


def curriculum(switch: int, lr: float, iterations: int, ctl: Controller | None,
               job: str) -> tuple[float, int]:
    """The regression's error on the harder data after ``iterations`` of the loop, and the
    rollbacks taken (attached to ``ctl``; None: bare)."""
    x, easy, hard, model = curriculum_task()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    on = _Attached(ctl, model, opt, job, hooks=False) if ctl else None
    for i in range(iterations):
        y = easy if i < switch else hard  # the loop's own counter: the stage stays
        idx = torch.randint(0, 8192, (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if on:
            on.guard.step(loss)
            on.lock.after_step()
        else:
            opt.step()
    rolled = on.close() if on else 0
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), hard).item(), rolled


def growing_task() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The growing target's inputs, its unscaled target, and its model (seeded): shared
    with the test that runs it against a serve."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    f = torch.tanh(x @ w) + 0.5 * torch.sin(x[:, :1] * 2)
    return x, f, _regressor()


def growing(iterations: int, lr: float, ctl: Controller | None, job: str,
            lockstep: bool = True) -> tuple[float, int]:
    """The growing target's error against its last target after ``iterations`` of the
    loop, and the rollbacks taken (attached to ``ctl``; None: bare; ``lockstep`` False: a
    plain guard on ``ctl.endpoint``, any controller's, commands landing when they arrive,
    as in a real run)."""
    x, f, model = growing_task()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    guard, lock = None, None
    if ctl is not None and lockstep:
        on = _Attached(ctl, model, opt, job, hooks=False)
        guard, lock = on.guard, on.lock
    elif ctl is not None:
        guard = attach(model, opt, job=job, endpoint=ctl.endpoint, report_every=10)
    data = torch.Generator().manual_seed(100)
    for t in range(iterations):
        scale = 1.0 + 2.0 * t / iterations  # the loop's own count: a rollback keeps it
        idx = torch.randint(0, len(x), (BATCH,), generator=data)
        noise = torch.randn(BATCH, 1, generator=data)
        loss = torch.nn.functional.mse_loss(model(x[idx]), scale * (f[idx] + 0.3 * noise))
        opt.zero_grad()
        loss.backward()
        if guard is None:
            opt.step()
            continue
        guard.step(loss)
        if lock is not None:
            lock.after_step()
    rolled = 0
    if guard is not None:
        rolled = guard.rollbacks
        guard.close()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), 3.0 * f).item(), rolled


_MODES = torch.tensor([[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)]
                       for k in range(8)])


def _hooked_step(loss: torch.Tensor, opt: torch.optim.Optimizer, on: _Attached | None) -> None:
    """One step of a loop that calls ``optimizer.step()`` itself (``hooks=True``)."""
    opt.zero_grad()
    loss.backward()
    if on:
        on.guard.observe_loss(loss)
    opt.step()
    if on:
        on.lock.after_step()


def gan(seed: int, steps: int, ctl: Controller | None,
        job: str) -> tuple[float, int, int]:
    """The toy GAN's score (the share of generated points near a mode times the share of
    modes they cover), the modes covered, and the rollbacks of both nets (attached to
    ``ctl``; None: bare)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def mlp(i: int, o: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(i, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, o))

    net_g, net_d = mlp(8, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=1e-3, betas=(0.5, 0.999))
    on_d = _Attached(ctl, net_d, opt_d, f"{job}-D", hooks=True) if ctl else None
    on_g = _Attached(ctl, net_g, opt_g, f"{job}-G", hooks=True) if ctl else None
    bce = torch.nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    for _ in range(steps):
        real = _MODES[torch.randint(0, 8, (64,), generator=g)] + 0.05 * torch.randn(
            64, 2, generator=g)
        fake = net_g(torch.randn(64, 8, generator=g))
        _hooked_step(bce(net_d(real), ones) + bce(net_d(fake.detach()), zeros), opt_d, on_d)
        _hooked_step(bce(net_d(fake), ones), opt_g, on_g)
    rolled = (on_d.close() + on_g.close()) if on_d and on_g else 0
    with torch.no_grad():
        pts = net_g(torch.randn(2000, 8, generator=torch.Generator().manual_seed(99)))
    dist, mode = torch.cdist(pts, _MODES).min(1)
    near = dist < 0.15
    covered = len(set(mode[near].tolist()))
    return near.float().mean().item() * covered / len(_MODES), covered, rolled


def _table(rows: list[Row]) -> list[str]:
    out = ["| scenario | setting | bare | attached | attached / bare | rollbacks | decisions |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.scenario} | {r.setting} | {r.bare:.4f} | {r.attached:.4f}"
                   f"{r.extra} | {r.ratio():.3f} | {r.rollbacks} | {r.decisions} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nonstationary",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="GAN seeds (1..N)")
    ap.add_argument("--quick", action="store_true",
                    help="one curriculum setting, one GAN seed, short runs (CI)")
    ap.add_argument("--config", default=None, help="TOML for trimtab serve (default: none)")
    ap.add_argument("--out", type=Path, default=None, help="write the table (Markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    curricula = CURRICULA[2:3] if args.quick else CURRICULA
    seeds = range(1, 2 if args.quick else args.seeds + 1)
    gan_steps = 400 if args.quick else 3000
    shrink = 4 if args.quick else 1
    rows: list[Row] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp, config=args.config)
        try:
            for switch, lr, iters in curricula:
                switch, iters = switch // shrink, iters // shrink
                job = f"curriculum-{switch}-{os.getpid()}"
                bare, _ = curriculum(switch, lr, iters, None, job)
                att, rolled = curriculum(switch, lr, iters, ctl, job)
                rows.append(Row("curriculum", f"switch at {switch}, lr {lr:g}, {iters} steps",
                                bare, att, rolled, _decisions(ctl.journal, [job])))
                print("  ".join(_table(rows[-1:])[-1:]), flush=True)
            iters, lr = GROWING[0] // shrink, GROWING[1]
            job = f"growing-{os.getpid()}"
            bare, _ = growing(iters, lr, None, job)
            att, rolled = growing(iters, lr, ctl, job)
            rows.append(Row("growing", f"target x1 -> x3 over {iters} steps, lr {lr:g}",
                            bare, att, rolled, _decisions(ctl.journal, [job])))
            print("  ".join(_table(rows[-1:])[-1:]), flush=True)
            for seed in seeds:
                job = f"gan-s{seed}-{os.getpid()}"
                bare, bare_modes, _ = gan(seed, gan_steps, None, job)
                att, att_modes, rolled = gan(seed, gan_steps, ctl, job)
                rows.append(Row("gan", f"seed {seed}, {gan_steps} steps (modes {bare_modes})",
                                bare, att, rolled,
                                _decisions(ctl.journal, [f"{job}-D", f"{job}-G"]),
                                extra=f" (modes {att_modes})"))
                print("  ".join(_table(rows[-1:])[-1:]), flush=True)
        finally:
            ctl.stop()
    head = (f"# bench.nonstationary: {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} cpus, torch {torch.__version__}, Python "
            f"{platform.python_version()}; {len(rows)} runs in {time.perf_counter() - t0:.0f} s; "
            f"trimtab config: {args.config or 'defaults'}")
    legend = ("curriculum: mean squared error on the harder data after the loop's last "
              "iteration (lower is better); growing: mean squared error against the last "
              "target (lower is better); gan: the share of generated points near a mode "
              "times the share of modes covered (higher is better). Each attached run on a "
              "live `trimtab serve`, lockstep; `python -m bench.nonstationary`.")
    text = "\n".join([head, "", legend, "", *_table(rows), ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
