"""Client overhead on compiled, mixed-precision loops: step time attached vs bare.

    python -m bench.mixed [--setups fp32,bf16,fp16] [--repeats 5] [--steps 150]
                          [--backend inductor] [--device cpu|cuda]

The model is ``bench.overhead``'s ``mlp``, compiled once per setup with ``--backend``;
each setup is the loop a user of that precision writes, as docs/adapters.md recommends:

- ``fp32``: the compiled model, ``guard.step(loss)``;
- ``bf16``: autocast to bf16, ``guard.step(loss)`` (no scaler: bf16 has fp32's range);
- ``fp16``: autocast to fp16 with a ``GradScaler`` and a fused AdamW, the loop's own
  ``scaler.step(optimizer); scaler.update()`` and ``attach(..., hooks=True)``.

Bare and attached runs alternate (ABBA) on the same compiled module, its weights reset
before each run (so nothing recompiles); each run times ``--steps`` steps after a
warm-up. The printed ratio is the median over pairs of attached / bare median step time.
The controller is a real ``trimtab serve`` on loopback with its default policies.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import torch

from bench._serve import Controller
from bench.overhead import make_task
from trimtab.client import attach

SETUPS = ("fp32", "bf16", "fp16")


def _run(setup: str, model: torch.nn.Module, init: dict, batch, loss_fn, device: str,
         steps: int, warmup: int, endpoint: str | None, report_every: int) -> float:
    """Median step time (s) of one run of ``setup``, bare (``endpoint=None``) or attached."""
    model.load_state_dict(init)
    fp16 = setup == "fp16"
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) if fp16
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup)
    kind = torch.device(device).type
    scaler = torch.amp.GradScaler(kind, enabled=fp16)
    guard = None
    if endpoint is not None:
        guard = attach(model, opt, job=f"mixed-{setup}-{os.getpid()}", endpoint=endpoint,
                       report_every=report_every, hooks=fp16, checkpoint_every=0)
    batches = [batch() for _ in range(16)]
    times = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if fp16:
            if guard is not None:
                guard.observe_loss(loss)
            scaler.step(opt)
            scaler.update()
        elif guard is not None:
            guard.step(loss)
        else:
            opt.step()
        if kind == "cuda":
            torch.cuda.synchronize()  # timing only: bare and attached pay it alike
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if guard is not None:
        guard.close()
    return statistics.median(times)


def measure(setups: list[str], repeats: int = 5, steps: int = 150, warmup: int = 20,
            report_every: int = 10, backend: str = "inductor", device: str = "cpu",
            seed: int = 0) -> list[tuple]:
    """One row per setup: ``(setup, bare median s, attached median s, ratio median, ratio
    min, ratio max)``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp)
        try:
            for setup in setups:
                model, _, batch, loss_fn = make_task("mlp", device, seed)
                init = copy.deepcopy(model.state_dict())
                compiled = torch.compile(model, backend=backend)
                init = {f"_orig_mod.{k}": v for k, v in init.items()}
                ratios, bare, att = [], [], []
                for r in range(repeats):
                    order = (None, ctl.endpoint) if r % 2 == 0 else (ctl.endpoint, None)
                    res = {ep: _run(setup, compiled, init, batch, loss_fn, device, steps,
                                    warmup, ep, report_every) for ep in order}
                    ratios.append(res[ctl.endpoint] / res[None])
                    bare.append(res[None])
                    att.append(res[ctl.endpoint])
                rows.append((setup, statistics.median(bare), statistics.median(att),
                             statistics.median(ratios), min(ratios), max(ratios)))
        finally:
            ctl.stop()
    return rows


def format_table(rows: list[tuple], repeats: int, steps: int, warmup: int, report_every: int,
                 backend: str, device: str) -> str:
    lines = [
        f"# compiled mixed-precision overhead: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {device}, backend {backend}",
        f"# model mlp, report_every={report_every} steps={steps} warmup={warmup} "
        f"repeats={repeats}",
        "| setup | bare step (ms) | attached step (ms) | ratio (median) | ratio range |",
        "|---|---|---|---|---|",
    ]
    for setup, b, a, r, lo, hi in rows:
        lines.append(f"| {setup} | {b * 1e3:.3f} | {a * 1e3:.3f} | {r:.3f} | {lo:.3f}-{hi:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    setups = args.setups.split(",")
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        ap.error(f"--setups={args.setups!r} is invalid; allowed: a comma list of "
                 f"{', '.join(SETUPS)}")
    rows = measure(setups, args.repeats, args.steps, args.warmup, args.report_every,
                   args.backend, args.device)
    print(format_table(rows, args.repeats, args.steps, args.warmup, args.report_every,
                       args.backend, args.device))


if __name__ == "__main__":
    main()
