"""The weight average's cost per step: its update against the ``guard.step`` it follows.

    python -m bench.ema [--models mlp,transformer,wide_mlp] [--steps 200] [--device cpu|cuda]

The models are :mod:`bench.overhead`'s. For each, one attached run (no average) times
``--steps`` calls of ``guard.step`` after a warm-up; then the average's own update
(:meth:`trimtab.client._ema.Ema.update`, what ``attach(..., ema=0.999)`` adds after each
step taken: one ``_foreach_lerp_`` per device and dtype and a few scalar ops) is timed
``--steps`` times on the trained model. Both are printed as the minimum and the median
per call: the minimum is the cost itself, the median what a loaded machine makes of it
(on a shared CPU the two differ a lot; the minimum is the figure to compare). The guard
points at an endpoint nobody listens on (the step never waits on a controller) and takes
no checkpoints (a snapshot copies the average as it copies the model: one more model's
worth of tensors). On CUDA each update is timed to its completion (a synchronize after
it, for the timing only) and the updates also run once under
``torch.cuda.set_sync_debug_mode("warn")``; the synchronizing calls seen are printed (zero
expected).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from bench.overhead import make_task
from trimtab.client import attach
from trimtab.client._ema import Ema


def _unused_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _step_times(name: str, device: str, steps: int, warmup: int) -> tuple[list[float], Any]:
    """``guard.step`` times (s) of one attached run, and its trained model."""
    model, make_opt, batch, loss_fn = make_task(name, device, 0)
    opt = make_opt(model.parameters())
    batches = [batch() for _ in range(16)]
    guard = attach(model, opt, job=f"ema-{name}-{os.getpid()}", endpoint=_unused_endpoint(),
                   report_every=10, checkpoint_every=0)
    cuda = device.startswith("cuda")
    times = []
    try:
        for i in range(warmup + steps):
            loss = loss_fn(model, batches[i % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            guard.step(loss)
            if cuda:
                torch.cuda.synchronize()  # timing only
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        guard.close()
    return times, model


def _update_times(model: torch.nn.Module, device: str, steps: int) -> tuple[list[float], int]:
    """``Ema.update`` times (s) on ``model``, and synchronizing calls seen (CUDA)."""
    ema = Ema(model, 0.999)
    cuda = device.startswith("cuda")
    taken = torch.ones((), dtype=torch.bool, device=device)  # a device flag, as "zero" mode
    times, syncs = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        ema.update(taken)
        if cuda:
            torch.cuda.synchronize()  # timing only
        times.append(time.perf_counter() - t0)
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for _ in range(10):
                ema.update(taken)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    return times, syncs


def measure(models: list[str], steps: int, warmup: int, device: str) -> Iterator[tuple]:
    """Per model, as each is done: ``(name, parameters, guard.step min s, median s,
    update min s, median s, syncs)``."""
    for name in models:
        steps_t, model = _step_times(name, device, steps, warmup)
        update_t, syncs = _update_times(model, device, steps)
        params = sum(p.numel() for p in model.parameters())
        yield (name, params, min(steps_t), statistics.median(steps_t), min(update_t),
               statistics.median(update_t), syncs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,transformer,wide_mlp")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"# weight average cost: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {args.device}, load average "
          f"{os.getloadavg()[0]:.1f}; steps={args.steps} warmup={args.warmup}")
    print("| model | parameters | guard.step min / median (us) | average's update min / "
          "median (us) | update / step (min) | syncs in the update |")
    print("|---|---|---|---|---|---|", flush=True)
    for name, params, s_min, s_med, u_min, u_med, syncs in measure(
            args.models.split(","), args.steps, args.warmup, args.device):
        sync = str(syncs) if args.device.startswith("cuda") else "n/a on cpu"
        print(f"| {name} | {params:,} | {s_min * 1e6:.0f} / {s_med * 1e6:.0f} | "
              f"{u_min * 1e6:.0f} / {u_med * 1e6:.0f} | {u_min / s_min:.2f} | {sync} |",
              flush=True)


if __name__ == "__main__":
    main()
