"""The guard's host time where it matters on a GPU, measured anywhere: the snapshot step
and the per-step work, on a GPT-2-shaped model.

    python -m bench.host_time [--device cpu|cuda] [--layers 12] [--width 8] [--repeats 40]

The host cost of both is Python and op dispatch over the state's tensors, whose COUNT is
GPT-2 124M's (148 parameters, 149 state_dict entries, 3 AdamW state tensors each: ~600
tensors) whatever their size: ``--width 8`` keeps every tensor tiny so that the figures
are the host's, not the copies' or the kernels'. On a CPU the CUDA snapshot path (pinned
buffers from the pool, copies queued per stream, events) is what runs: ``_staged`` and
the stream helpers are swapped for CPU stand-ins, as ``tests/client/test_snapshots.py``
does.

Printed (medians over ``--repeats``, in ms or us of host time):

- snapshot (``CheckpointStore.take``): the two ``state_dict()`` calls; the walk over the
  state (the cached copy plan, and the generic walk it replaces, forced for comparison);
  queueing the copies; the whole ``take``.
- snapshot step: the host time between the window's one read (the sync; on a GPU the
  device is idle from there on) and ``guard.step``'s return, on snapshot steps and on
  report steps without one: what a snapshot step leaves exposed on a GPU.
- per step (``guard.step`` on non-report steps, the optimizer's own step stubbed out):
  the guard's own host time and the top-level aten ops it dispatches, fused AdamW with
  two param groups and ``clip``. On a CPU each op also computes (tiny tensors, but the
  CPU foreach kernels loop per tensor), so the op count is the portable figure; the same
  on a model of 4 tensors shows the host's cost of dispatching them and of the guard's
  Python.

Nothing here is asserted; the tests pin behaviour and op counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from typing import Any

import torch


class _Event:
    """A CUDA event's stand-in on the CPU: done once the 'device' ran (see ``_simulated``)."""

    done = False

    def query(self) -> bool:
        return _Event.done


@contextlib.contextmanager
def _simulated(copy_mod: Any):
    """The CUDA snapshot path on the CPU: every strided tensor staged into pooled buffers,
    copies queued in one ``_foreach_copy_`` per stream, events that complete on demand
    (``copy_mod``: :mod:`trimtab.client._host_copy`, where the copy functions live)."""
    saved = {n: getattr(copy_mod, n) for n in ("_staged", "_current_copy", "_fence")}
    copy = copy_mod._CopyStreams.copy
    copy_mod._staged = lambda t: t.layout == torch.strided
    copy_mod._current_copy = lambda device, pairs: (copy_mod._copy_all(pairs), _Event())[1]
    copy_mod._fence = lambda device, event: None
    copy_mod._CopyStreams.copy = lambda self, device, pairs: (copy_mod._copy_all(pairs),
                                                              _Event())[1]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(copy_mod, name, value)
        copy_mod._CopyStreams.copy = copy


def _model(device: str, layers: int, width: int):
    from bench.gpu import _gpt

    torch.manual_seed(0)
    model = _gpt(64, 16, width, layers, 2).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    idx = torch.randint(0, 64, (2, 16), device=device)
    return model, opt, idx


def _median_ms(fn, repeats: int) -> float:
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e3


def snapshot(device: str, layers: int, width: int, repeats: int) -> list[tuple[str, float]]:
    """Host ms of a snapshot and its parts: state_dicts, plan or walk, queueing."""
    from trimtab.client import _checkpoint as ckpt_mod
    from trimtab.client import _host_copy as copy_mod

    model, opt, idx = _model(device, layers, width)
    model(idx, idx).backward()
    opt.step()
    cuda = device.startswith("cuda")
    with contextlib.nullcontext() if cuda else _simulated(copy_mod):
        store = ckpt_mod.CheckpointStore(keep=3)
        store.prepare(model, opt)
        while not store._pool.ready():
            time.sleep(0.01)
        step = [0]

        def take() -> None:
            _Event.done = False
            step[0] += 1
            assert store.take(step[0], model, opt, clip=1.0, counters={"calls": step[0]},
                              controls={"lr_scale": 1.0}) is not None

        def settle() -> None:  # outside the timing: copies done, older snapshots released
            _Event.done = True
            if cuda:
                torch.cuda.synchronize()
            store.poll()

        def timed(fn) -> float:
            xs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                xs.append(time.perf_counter() - t0)
                settle()
            return statistics.median(xs) * 1e3

        rows = [("state_dict() x2", _median_ms(lambda: (model.state_dict(),
                                                         opt.state_dict()), repeats))]
        real_copy, real_flatten = copy_mod._copy_all, ckpt_mod.flatten
        whole = {}
        for label, flatten in (("generic walk (before)", lambda *a: None),
                               ("cached copy plan", real_flatten)):
            ckpt_mod.flatten = flatten
            try:
                for _ in range(3):
                    take()
                    settle()
                with_copies = timed(take)
                copy_mod._copy_all = lambda pairs: None
                try:
                    without = timed(take)
                finally:
                    copy_mod._copy_all = real_copy
            finally:
                ckpt_mod.flatten = real_flatten
            whole[label] = with_copies
            rows += [(f"{label}: take() without queueing the copies", without),
                     (f"{label}: queueing the copies (_foreach_copy_)", with_copies - without),
                     (f"{label}: take() in all", with_copies)]
        n = sum(1 for _ in model.state_dict()) + sum(len(s) for s in opt.state.values())
        rows.append((f"tensors in a snapshot: {n}", float("nan")))
        return rows


def after_read(device: str, layers: int, width: int, repeats: int) -> list[tuple[str, float]]:
    """Host ms between the window's one read (the sync: on a GPU the device is idle from
    there on) and ``guard.step``'s return, on snapshot steps and on report steps without a
    snapshot: the host work a snapshot step leaves exposed on a GPU."""
    from trimtab.client import _host_copy as copy_mod
    from trimtab.client import attach

    model, opt, idx = _model(device, layers, width)
    cuda = device.startswith("cuda")
    snap: list[float] = []
    plain: list[float] = []
    with contextlib.nullcontext() if cuda else _simulated(copy_mod):
        guard = attach(model, opt, job="host-time-read", endpoint="tcp://127.0.0.1:9",
                       report_every=10, checkpoint_every=20, keep=3)
        try:
            read = [0.0]
            collect = guard._probe.collect

            def timed_collect():
                stats = collect()
                read[0] = time.perf_counter()
                return stats

            guard._probe.collect = timed_collect
            step = 0
            while len(snap) < repeats and step < 40 * repeats + 200:
                step += 1
                loss = model(idx, idx)
                loss.backward()
                report, last = guard._probe.full, guard._ckpts.last
                _Event.done = True  # the "device" finished the earlier copies
                guard.step(loss)
                end = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if not report or step < 40:  # after the buffers' allocation settled
                    continue
                (snap if guard._ckpts.last != last else plain).append((end - read[0]) * 1e3)
        finally:
            guard.close()
    return [(f"host ms after the window's read, snapshot steps ({guard.nonfinite_mode} mode)",
             statistics.median(snap) if snap else float("nan")),
            ("host ms after the window's read, report steps without a snapshot",
             statistics.median(plain) if plain else float("nan"))]


def _small(device: str):
    """Two linear layers (4 tensors) in two groups, fused AdamW: the per-step work without
    the per-tensor loops of the CPU's foreach kernels, i.e. op dispatch and Python."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).to(device)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    biases = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}],
                            lr=1e-3, fused=True)
    x = torch.randn(8, 4, device=device)
    return model, opt, lambda: model(x).pow(2).mean()


def per_step(device: str, layers: int, width: int, repeats: int,
             small: bool = False) -> list[tuple[str, float]]:
    """The guard's own host us per non-report step, and its top-level aten ops (``small``:
    on :func:`_small`'s model, host time only)."""
    from torch.profiler import ProfilerActivity, profile

    from trimtab.client import attach

    if small:
        model, opt, forward = _small(device)
    else:
        model, opt, idx = _model(device, layers, width)

        def forward() -> torch.Tensor:
            return model(idx, idx)
    guard = attach(model, opt, job="host-time", endpoint="tcp://127.0.0.1:9", clip=1.0,
                   report_every=10, checkpoint_every=0)
    try:
        loss = forward()
        loss.backward()
        guard.step(loss)
        real, opt.step = opt.step, lambda *a, **k: None  # the guard's own work only
        xs = []
        while len(xs) < repeats * (50 if small else 5):
            report = guard._probe.full
            t0 = time.perf_counter()
            guard.step(loss)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if not report:
                xs.append(time.perf_counter() - t0)
        while guard._probe.full:
            guard.step(loss)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            guard.step(loss)
        opt.step = real
    finally:
        guard.close()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    counts = collections.Counter(top)
    ops = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in sorted(counts.items()))
    n = sum(1 for p in model.parameters())
    host = (f"guard's own host us per non-report step ({guard.nonfinite_mode}, clip, "
            f"{len(opt.param_groups)} groups, {n} tensors)", statistics.median(xs) * 1e6)
    if small:
        return [host]
    return [host, (f"top-level aten ops: {len(top)} ({ops})", float("nan"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args(argv)
    from bench._standalone import ensure_trimtab

    ensure_trimtab()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    print(f"# guard host time, GPT-2-shaped ({args.layers} layers, width {args.width}), "
          f"{args.device}, torch {torch.__version__}\n")
    print("| what | host |\n|---|---|")
    for what, value in snapshot(args.device, args.layers, args.width, args.repeats):
        print(f"| snapshot: {what} | {'' if value != value else f'{value:.2f} ms'} |")
    for what, value in after_read(args.device, args.layers, args.width, args.repeats):
        print(f"| snapshot step: {what} | {'' if value != value else f'{value:.2f} ms'} |")
    for what, value in (per_step(args.device, args.layers, args.width, args.repeats)
                        + per_step(args.device, 0, 0, args.repeats, small=True)):
        print(f"| step: {what} | {'' if value != value else f'{value:.0f} us'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
