"""trimtab on one GPU: every figure of issue 14 in one command (under 5 minutes on an H200).

    python -m bench.gpu [--device auto|cuda|cpu] [--quick] [--sections LIST] [--out FILE]

Sections (``--sections env,overhead,snapshots,faults,writer``; each one that fails prints
its traceback and the others still run):

- ``env``: device, driver, torch, CUDA and Python versions, CPUs, the commit.
- ``overhead``: step time bare vs attached to a live ``trimtab serve`` (default policies,
  loopback), bare and attached alternating in ABAB pairs on the same model, for three
  model sizes: an MLP with SGD (a few ms per step), a 4-layer GPT (~11 ms) and a GPT-2
  124M (bf16 autocast, fused AdamW, batch 16 x 1024); on CUDA the 4-layer GPT once more
  with torch's default (foreach) AdamW, whose non-finite handling is the guard's "zero"
  mode; on the CPU the three sizes scaled down.
  Step times are the intervals between CUDA events recorded at each step's start (no sync
  inside the timed loop). Also: the host time of ``guard.step`` against ``optimizer.step``
  on non-report steps, synchronizing calls per step (``torch.cuda.set_sync_debug_mode``)
  on non-report and on report/snapshot steps, and the ops a non-report ``guard.step``
  launches (``torch.profiler``: CUDA kernels, or aten ops on the CPU).
- ``snapshots``: per-step time around snapshots on the largest model, snapshots every 20
  steps: median, p95, max, and the snapshot steps (and the steps just after them, which
  wait on the device for the copies) against the median, without and with
  ``checkpoint_dir``.
- ``faults``: :mod:`bench.faults`' task on this device, a fault (``scaled_inputs``)
  injected, a live controller: whether trimtab rolled back and recovered, steps redone.
- ``writer``: how much a checkpoint file write (torch.save + SHA-256 + fsync on the writer
  thread) slows a Python loop on the training thread: the GIL's share; the time to load
  the file back with its checksum checked, and the checksum's share; and the small files
  the training thread writes itself (a sharded step's ``trimtab.pt``, a rollback's
  restated state).
- ``tail`` (CUDA only): an experiment for the per-step host time, not trimtab's code path:
  the guard's per-step ops on GPT-2 124M's count of gradients (tiny ones: the host's cost),
  eager as the guard runs them against the part after the norms captured once in a CUDA
  graph and replayed (5 host calls instead of 10), host us per step and whether both give
  the same results.

The results go to ``bench/results/gpu.md`` (CUDA) or ``bench/results/gpu-cpu.md`` (CPU),
written after every section, and, when ``OUT`` is set, to ``$OUT/`` under the same name;
everything written is printed as well. Runs from a plain checkout too (see
:mod:`bench._standalone`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "overhead", "snapshots", "faults", "writer", "tail")
#: Stop starting sections after this long (s): the whole run must fit a short device lease.
BUDGET_S = 270.0


# -- models ----------------------------------------------------------------------------------


def _gpt(*shape: int) -> torch.nn.Module:
    """``examples/train_gpt.py``'s GPT-2-style decoder (tied embeddings, GPT-2's init):
    ``_gpt(50304, 1024, 768, 12, 12)`` (vocab, context, width, layers, heads) is 124M."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trimtab_example_gpt",
                                                  ROOT / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT(*shape)


@dataclass
class Spec:
    name: str
    kind: str  # "mlp" or "gpt"
    shape: tuple
    batch: int
    steps: int
    warmup: int = 10
    #: The GPT's AdamW: "fused" (found_inf on the device: "fused" mode) or "foreach"
    #: (torch's default on CUDA; the guard's "zero" mode: one nan_to_num_ per gradient).
    adamw: str = "fused"


def specs(device: str, quick: bool) -> list[Spec]:
    """The three model sizes on ``device`` (scaled down on the CPU)."""
    if device.startswith("cuda"):
        return [
            Spec("mlp (SGD, fp32)", "mlp", (2048, 4), 2048, 200),
            Spec("gpt 4-layer (bf16, fused AdamW)", "gpt", (50304, 1024, 512, 4, 8), 8, 100),
            Spec("gpt 4-layer (bf16, default foreach AdamW)", "gpt",
                 (50304, 1024, 512, 4, 8), 8, 100, adamw="foreach"),
            Spec("gpt-2 124M (bf16, fused AdamW)", "gpt", (50304, 1024, 768, 12, 12), 16, 60),
        ]
    n = 0.5 if quick else 1.0
    return [
        Spec("mlp (SGD), scaled", "mlp", (128, 4), 128, int(120 * n), 5),
        Spec("gpt 2-layer, scaled", "gpt", (256, 32, 32, 2, 4), 4, int(60 * n), 5),
        Spec("gpt 4-layer, scaled", "gpt", (512, 64, 64, 4, 4), 4, int(60 * n), 5),
    ]


class Task:
    """A model, its optimizer and a few fixed batches on the device; ``loss()`` runs one
    forward and backward and returns the loss."""

    def __init__(self, spec: Spec, device: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        cuda = device.startswith("cuda")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and spec.kind ==
                         "gpt" else contextlib.nullcontext())
        if spec.kind == "mlp":
            width, depth = spec.shape
            layers: list[torch.nn.Module] = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.model = torch.nn.Sequential(*layers[:-1]).to(device)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
            self.batches = [(torch.randn(spec.batch, width, device=device),
                             torch.randn(spec.batch, width, device=device)) for _ in range(4)]
            self._forward = lambda b: F.mse_loss(self.model(b[0]), b[1])
        else:
            vocab, ctx = spec.shape[:2]
            self.model = _gpt(*spec.shape).to(device)
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            other = [p for p in self.model.parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": 0.1},
                      {"params": other, "weight_decay": 0.0}]
            try:
                self.opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95),
                                             fused=spec.adamw == "fused" or None)
            except (RuntimeError, TypeError):  # no fused AdamW for this device here
                self.opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
            self.batches = []
            for _ in range(4):
                tok = torch.randint(0, vocab, (spec.batch, ctx + 1), device=device)
                self.batches.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
            self._forward = lambda b: self.model(*b)
        self.i = 0

    def loss(self) -> torch.Tensor:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.autocast:
            loss = self._forward(b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss


# -- timing ----------------------------------------------------------------------------------


class Clock:
    """Step start marks: CUDA events on the current stream (read once, at the end), or
    ``perf_counter`` on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Time from each mark to the next (ms); one sync here, after the loop."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in itertools.pairwise(self.marks)]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(self.marks)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Run:
    step_ms: list[float]
    host_us: list[float]  # host time of guard.step / optimizer.step, non-report steps
    snapshot_at: list[int]  # indexes (into step_ms) of steps that took a snapshot
    rollback_at: list[int]
    deferred: int = 0
    host_bytes: int = 0
    written: int = 0
    report_at: list[int] | None = None  # indexes of the steps that closed a report window


def run_steps(task: Task, steps: int, warmup: int, device: str, guard=None) -> Run:
    """``warmup`` untimed steps, then ``steps`` timed ones (step time: start to start)."""
    clock = Clock(device)
    host, snaps, rolls, reports = [], [], [], []
    every = guard.report_every if guard is not None else 10
    for i in range(warmup + steps + 1):
        if i >= warmup:
            clock.mark()
        if i == warmup + steps:
            break
        loss = task.loss()
        report = guard is not None and guard._probe.full
        last, rollbacks = (guard._last_checkpoint, guard.rollbacks) if guard else (0, 0)
        t0 = time.perf_counter()
        if guard is None:
            task.opt.step()
        else:
            guard.step(loss)
        dt = time.perf_counter() - t0
        if i >= warmup:
            if not report and (guard is not None or (i + 1) % every):
                host.append(dt * 1e6)
            if report:
                reports.append(i - warmup)
            if guard is not None and guard._last_checkpoint != last:
                snaps.append(i - warmup)
            if guard is not None and guard.rollbacks != rollbacks:
                rolls.append(i - warmup)
    run = Run(clock.intervals_ms(), host, snaps, rolls, report_at=reports)
    if guard is not None and guard._store is not None:
        run.deferred, run.host_bytes = guard._store.deferred, guard._store.host_bytes
    return run


#: Where the synchronizing calls on non-report steps came from (thread, step, stack).
SYNC_ORIGINS: list[str] = []


def count_syncs(task: Task, guard, steps: int) -> tuple[float, float, int, int]:
    """Synchronizing calls per non-report step and per report step, and how many of each.

    Each one on a non-report step also goes to :data:`SYNC_ORIGINS` with the thread that
    made it (the warnings filter is process-wide: a background thread's count too), the
    step and the innermost frames of its stack."""
    if not torch.cuda.is_available() or not next(task.model.parameters()).is_cuda:
        return math.nan, math.nan, 0, 0
    counts = {False: [0, 0], True: [0, 0]}
    for i in range(steps):
        loss = task.loss()
        report = guard._probe.full
        seen: list[str] = []

        def show(message, category, filename, lineno, file=None, line=None, _seen=seen, _i=i):
            if "synchroniz" in str(message):
                stack = "".join(traceback.format_stack(limit=8)[:-1])
                _seen.append(f"thread {threading.current_thread().name}, step {_i} of the "
                             f"count ({guard._calls} guard calls):\n{stack}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                guard.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[report][0] += len(seen)
        counts[report][1] += 1
        if not report:
            SYNC_ORIGINS.extend(seen)
    (a, n), (b, m) = counts[False], counts[True]
    return a / max(n, 1), b / max(m, 1), n, m


def count_ops(task: Task, guard) -> tuple[int, int]:
    """Device kernels (CUDA) and top-level aten ops one non-report ``guard.step`` launches,
    the optimizer step itself left out."""
    from torch.profiler import ProfilerActivity, profile

    while guard._probe.full or guard._probe.row == 0:
        guard.step(task.loss())
    loss = task.loss()
    _sync(str(loss.device))
    real = task.opt.step
    task.opt.step = lambda *a, **k: None  # the guard's own work only
    cuda = loss.is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=acts) as prof:
            guard.step(loss)
            _sync(str(loss.device))
    finally:
        task.opt.step = real
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    kernels = 0
    if cuda:
        on_device = sum(1 for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                        and "Memcpy" not in e.name and "Memset" not in e.name)
        launches = sum(1 for e in events if "LaunchKernel" in e.name)
        kernels = max(on_device, launches)
    return kernels, aten


# -- the report ------------------------------------------------------------------------------


class Report:
    """Lines printed as they come and written to the result files after every section."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n".join(self.lines) + "\n")
            except OSError as exc:
                print(f"(could not write {path}: {exc})", flush=True)

    def section(self, title: str) -> None:
        self()
        self(f"## {title}")
        self()
        self(f"_started at +{time.monotonic() - self.t0:.1f} s_")
        self()


def section_env(out: Report, device: str) -> None:
    out("| what | value |")
    out("|---|---|")
    rows = [("python", platform.python_version()), ("torch", torch.__version__),
             ("torch CUDA", str(torch.version.cuda)), ("cpus", str(os.cpu_count())),
             ("platform", platform.platform())]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        rows += [("device", torch.cuda.get_device_name(0)),
                 ("memory", f"{props.total_memory / 2**30:.0f} GiB"),
                 ("capability", f"{props.major}.{props.minor}")]
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            driver = f"unknown ({exc})"
        rows.append(("driver", driver or "unknown"))
    else:
        rows.append(("device", f"cpu ({platform.processor() or platform.machine()}), "
                               f"torch threads {torch.get_num_threads()}"))
    # A copy of the tree sent to another machine can carry stale git metadata: the sender
    # names the commit it sent in BENCH_GPU_COMMIT.
    commit = os.environ.get("BENCH_GPU_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    rows.append(("trimtab commit", commit or "unknown"))
    for k, v in rows:
        out(f"| {k} | {v} |")


def _attach(task: Task, endpoint: str, job: str, **kw):
    from trimtab.client import attach

    kw.setdefault("report_every", 10)
    return attach(task.model, task.opt, job=job, endpoint=endpoint, **kw)


def section_overhead(out: Report, device: str, quick: bool, endpoint: str) -> None:
    pairs = 2 if quick or not device.startswith("cuda") else 3
    out(f"Bare and attached runs alternate (ABAB, {pairs} pairs) on the same model; "
        "attached: report_every=10, checkpoint_every=10000 (only the attach snapshot: "
        "between checkpoints; snapshots are the next section). Step time: median interval "
        "between step starts. Host us: median host time of `guard.step` (attached) and of "
        "`optimizer.step` (bare) on non-report steps; the guard's own is their difference.")
    out()
    out("| model | params | bare step (ms) | attached step (ms) | ratio (median) | ratio range "
        "| guard.step host (us) | optimizer.step host (us) | guard's own host (us) "
        "| syncs / non-report step | syncs / report step | kernels / non-report guard.step "
        "| aten ops / non-report guard.step |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in specs(device, quick):
        if time.monotonic() - out.t0 > BUDGET_S / 2:
            out(f"| {spec.name} | skipped: past half the run's budget |")
            continue
        try:
            task = Task(spec, device)
            params = sum(p.numel() for p in task.model.parameters())
            run_steps(task, 0, spec.warmup, device)  # compile-free warm-up: kernels, cuBLAS
            bare, att, ratios, g_host, o_host = [], [], [], [], []
            for r in range(pairs):
                order = (False, True) if r % 2 == 0 else (True, False)
                res = {}
                for attached in order:
                    guard = (_attach(task, endpoint, f"gpu-overhead-{r}",
                                     checkpoint_every=10_000) if attached else None)
                    try:
                        res[attached] = run_steps(task, spec.steps, spec.warmup, device, guard)
                    finally:
                        if guard is not None:
                            guard.close()
                b, a = (statistics.median(res[k].step_ms) for k in (False, True))
                bare.append(b)
                att.append(a)
                ratios.append(a / b)
                g_host.append(statistics.median(res[True].host_us))
                o_host.append(statistics.median(res[False].host_us))
            guard = _attach(task, endpoint, "gpu-overhead-syncs", checkpoint_every=20)
            nonrep = rep = math.nan
            kernels: Any = "error"
            aten: Any = "error"
            try:
                nonrep, rep, _, _ = count_syncs(task, guard, 40)
            except Exception:
                traceback.print_exc()
            try:
                kernels, aten = count_ops(task, guard)
            except Exception:
                traceback.print_exc()
            finally:
                guard.close()
            gh, oh = statistics.median(g_host), statistics.median(o_host)
            fmt = (lambda x: "n/a (cpu)") if not device.startswith("cuda") else "{:.2f}".format
            out(f"| {spec.name} | {params / 1e6:.1f}M | {statistics.median(bare):.3f} "
                f"| {statistics.median(att):.3f} | {statistics.median(ratios):.4f} "
                f"| {min(ratios):.4f}-{max(ratios):.4f} | {gh:.0f} | {oh:.0f} | {gh - oh:.0f} "
                f"| {fmt(nonrep)} | {fmt(rep)} "
                f"| {kernels if device.startswith('cuda') else 'n/a (cpu)'} | {aten} |")
        except Exception:
            out(f"| {spec.name} | failed: see the traceback below |")
            out("```")
            out(traceback.format_exc().rstrip())
            out("```")
        finally:
            task = None  # noqa: F841 -- free the device memory before the next model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if SYNC_ORIGINS:
        out()
        out(f"Synchronizing calls on non-report steps, where from ({len(SYNC_ORIGINS)}; the "
            "first 3):")
        out("```")
        for origin in SYNC_ORIGINS[:3]:
            out(origin.rstrip())
        out("```")


def _snapshot_row(label: str, run: Run) -> str:
    if not run.snapshot_at:
        return f"| {label} | no snapshot taken (deferred {run.deferred}) |"
    first = run.snapshot_at[0]
    bad = set(run.rollback_at) | {i + 1 for i in run.rollback_at}
    steps = [t for i, t in enumerate(run.step_ms) if i >= first and i not in bad]
    med = statistics.median(steps)
    snap = [run.step_ms[i] for i in run.snapshot_at if i not in bad]
    after = [run.step_ms[i + 1] for i in run.snapshot_at
             if i + 1 < len(run.step_ms) and i + 1 not in bad]
    worst = max(snap + after) if snap + after else math.nan
    early = max(run.step_ms[:first]) if first else math.nan
    taken = set(run.snapshot_at)
    plain = [run.step_ms[i] for i in run.report_at or []
             if first <= i < len(run.step_ms) and i not in taken and i not in bad]
    return (f"| {label} | {len(run.step_ms)} | {len(run.snapshot_at)} | {run.deferred} "
            f"| {early:.2f} "
            f"| {med:.2f} | {_pct(steps, 0.95):.2f} | {max(steps):.2f} "
            f"| {statistics.median(plain) if plain else math.nan:.2f} "
            f"| {max(snap):.2f} | {max(after) if after else math.nan:.2f} "
            f"| {worst / med:.3f} | {run.host_bytes / 2**30:.2f} | {len(run.rollback_at)} |")


def section_snapshots(out: Report, device: str, quick: bool, endpoint: str) -> None:
    spec = specs(device, quick)[-1]
    steps = 200 if device.startswith("cuda") else (60 if quick else 120)
    out(f"Model: {spec.name}; attached with checkpoint_every=20, report_every=10, keep=3, "
        f"{steps} timed steps after {spec.warmup} of warm-up; step time from CUDA events at "
        "each step start (start to start; perf_counter on the CPU). Statistics from the "
        "first snapshot on; "
        "'snapshot step' is the step whose end takes the snapshot (host work: state_dict, "
        "queueing the copies; a report step too: its window's one read follows), 'report "
        "step' one that closes a window without a snapshot (the read, a sync, alone), "
        "'next step' the one whose optimizer step waits on the "
        "device for the copies. Steps around a rollback (the default policies may order "
        "one) are left out and counted.")
    out()
    out("| run | steps | snapshots | deferred (buffers not ready) | max before the first "
        "snapshot (ms) | median (ms) | p95 (ms) | max (ms) | median report step without a "
        "snapshot (ms) | max snapshot step (ms) "
        "| max next step (ms) | worst / median | pinned host (GiB) | rollbacks |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    task = Task(spec, device)
    run_steps(task, 0, spec.warmup, device)
    for label, use_dir in (("memory ring", False), ("memory ring + checkpoint_dir", True)):
        with tempfile.TemporaryDirectory(prefix="trimtab-gpu-ckpt-") as tmp:
            guard = _attach(task, endpoint, f"gpu-snapshots-{int(use_dir)}",
                            checkpoint_every=20, keep=3,
                            checkpoint_dir=tmp if use_dir else None)
            try:
                run = run_steps(task, steps, spec.warmup, device, guard)
            finally:
                t0 = time.perf_counter()
                guard.close(checkpoint_timeout_s=30.0)
                closed = time.perf_counter() - t0
            run.written = len([p for p in Path(tmp).glob("ckpt-*.pt")])
        out(_snapshot_row(label, run))
        if use_dir:
            out()
            out(f"(with checkpoint_dir: close() waited {closed:.1f} s for the queued writes; "
                f"{run.written} files kept)")


def section_faults(out: Report, device: str, quick: bool) -> None:
    from bench import faults
    from bench._serve import Controller

    out(f"bench.faults' task (ReLU MLP 16-64-1, SGD + momentum) on {device}; fault "
        f"`scaled_inputs` at iteration {faults.FAULT_AT} of {faults.TOTAL}; live controller "
        "(default policies, faults' controller config), commands land as they arrive.")
    out()
    out("| run | validation loss | iterations | optimizer steps | steps redone "
        "| rollbacks to | recovered (<= 1.10 x clean) |")
    out("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "trimtab.toml")
        Path(cfg).write_text(faults.CONTROLLER_CONFIG)
        ctl = Controller(tmp, cfg)
        try:
            clean = faults.train(None, ctl.endpoint, "gpu-clean", 0, device=device)
            bare = faults.train("scaled_inputs", None, "bare", 0, device=device)
            hit = faults.train("scaled_inputs", ctl.endpoint, "gpu-fault", 0, device=device)
        finally:
            ctl.stop()
    for label, o in (("attached, no fault", clean), ("bare, fault", bare),
                     ("attached, fault", hit)):
        rec = "-" if o is clean else ("yes" if faults.recovered(o, clean) else "no")
        out(f"| {label} | {o.val:.4f} | {o.iterations} | {o.steps} | {o.steps_lost} "
            f"| {', '.join(map(str, o.restored)) or '-'} | {rec} |")


def section_writer(out: Report, device: str, quick: bool) -> None:
    from trimtab.client._checkpoint_files import CheckpointFiles, data_name, read_payload

    mb = 512 if device.startswith("cuda") else (64 if quick else 256)

    class Writable:
        def __init__(self, payload: dict) -> None:
            self.step, self.stable, self.writing, self._p = 1, False, False, payload
            self.run = self.resume = None

        def payload(self) -> dict:
            return {"format": 1, "step": self.step, **self._p}

    n = mb * 2**20 // 4 // 64
    state = {"model": {f"w{i}": torch.randn(n) for i in range(64)}}

    def loop(seconds: float, stop: threading.Event | None = None) -> tuple[list[float], float]:
        ts, t_start = [], time.perf_counter()
        end = t_start + seconds
        while time.perf_counter() < end and not (stop is not None and stop.is_set()):
            t = time.perf_counter()
            sum(range(3000))  # ~40 us of Python: what a training loop's host side needs
            ts.append(time.perf_counter() - t)
        return ts, time.perf_counter() - t_start

    base, base_s = loop(1.0)
    with tempfile.TemporaryDirectory(prefix="trimtab-gpu-writer-") as tmp:
        files = CheckpointFiles(tmp, keep=1)
        done = threading.Event()
        t0 = time.perf_counter()
        files.write(Writable(state))
        threading.Thread(target=lambda: (files.flush(), done.set()), daemon=True).start()
        during, during_s = loop(120.0, done)
        wall = time.perf_counter() - t0
        # Loading it back (a rollback from disk, a resume): read, size and SHA-256 checked,
        # torch.load; and the checksum alone, over the same bytes.
        t = time.perf_counter()
        loaded = read_payload(tmp, 1)
        load_s = time.perf_counter() - t
        if loaded is None:
            raise RuntimeError("the checkpoint just written did not load back")
        raw = (Path(tmp) / data_name(1)).read_bytes()
        t = time.perf_counter()
        hashlib.sha256(raw).hexdigest()
        sha_s = time.perf_counter() - t
        del raw, loaded
        files.close()
    rate = (len(during) / during_s) / (len(base) / base_s)
    out(f"A {mb} MB checkpoint written by the writer thread (torch.save + SHA-256 + fsync) "
        "while the main thread runs ~40 us chunks of Python; the main loop's throughput "
        f"during the write against before it. {os.cpu_count()} cpus.")
    out()
    out("| | chunks | median (us) | p99 (us) | max (ms) |")
    out("|---|---|---|---|---|")
    for label, ts in (("no write", base), ("write in progress", during)):
        out(f"| {label} | {len(ts)} | {statistics.median(ts) * 1e6:.0f} "
            f"| {_pct(ts, 0.99) * 1e6:.0f} | {max(ts) * 1e3:.1f} |")
    out()
    out(f"write: {wall:.2f} s ({mb / wall:.0f} MB/s); main-loop throughput during it: "
        f"{rate:.2f} of before (1.00: the write takes none of the GIL the loop needs)")
    out()
    out(f"load (read_payload: read, size and SHA-256 checked, torch.load): {load_s:.2f} s; "
        f"the SHA-256 alone: {sha_s:.2f} s ({mb / sha_s:.0f} MB/s)")
    out()
    _small_writes(out, quick)


def _small_writes(out: Report, quick: bool) -> None:
    """The files written on the training thread itself: a sharded step's ``trimtab.pt`` (rank
    0, every snapshot) and a rollback's restated state (``ckpt-<s>.resume.json``)."""
    from bench._serve import free_port
    from trimtab.client import attach
    from trimtab.client._checkpoint_files import CheckpointFiles
    from trimtab.client._sharded_files import ShardedFiles

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))
    guard = attach(model, opt, job="gpu-small-writes", scheduler=sched,
                   endpoint=f"tcp://127.0.0.1:{free_port()}")
    try:
        run = guard.state_dict()
        controls = guard._act.state_dict()
    finally:
        guard.close()
    resume = {"format": 1, "step": 100, "run": run, "counters": {"calls": 100},
              "controls": controls, "clip": 1.0, "scheduler": sched.state_dict(),
              "scheduler_stepped": True, "resume": None}

    class Restated:
        step, stable, writing = 100, True, False

        def __init__(self) -> None:
            self.run, self.resume = run, {**run, "rollbacks": 1}

        def payload(self) -> dict:
            return {}

    n = 10 if quick else 30
    rows = []
    with tempfile.TemporaryDirectory(prefix="trimtab-gpu-small-") as tmp:
        sharded = ShardedFiles(Path(tmp) / "sharded", keep=2)
        files = CheckpointFiles(Path(tmp) / "files", keep=2)
        for label, write in (
                ("sharded step's trimtab.pt, the training thread's share (serialized, "
                 "queued; rank 0, each snapshot)", lambda: sharded.write_resume(100, resume)),
                ("the same written through (rank 0's I/O thread: write, fsync, rename)",
                 lambda: sharded.write_resume(100, resume, wait=True)),
                ("rollback's ckpt-<s>.resume.json (each rollback)",
                 lambda: files.restate(Restated()))):
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                write()
                ts.append((time.perf_counter() - t) * 1e3)
            rows.append((label, ts))
            sharded.flush()
        sharded.close()
        files.close()
    out("Small files of the training thread (torch.save or JSON, fsync, rename), "
        f"{n} writes each:")
    out()
    out("| file | median (ms) | max (ms) |")
    out("|---|---|---|")
    for label, ts in rows:
        out(f"| {label} | {statistics.median(ts):.2f} | {max(ts):.2f} |")


def section_tail(out: Report, device: str, quick: bool) -> None:
    if not device.startswith("cuda"):
        out("CUDA only (a CUDA graph): nothing to measure on the CPU.")
        return
    dev = torch.device(device)
    tensors, split = 148, 100  # GPT-2 124M's gradients: two groups (decay, no decay)
    torch.manual_seed(0)
    grads = [torch.randn(256, device=dev) * 3 for _ in range(tensors)]
    mask = torch.zeros(3, tensors, device=dev)
    mask[0] = 1.0
    mask[1, :split] = 1.0
    mask[2, split:] = 1.0
    loss, clip = torch.tensor(2.0, device=dev), torch.tensor(1.0, device=dev)
    row, found = torch.zeros(4, device=dev), torch.zeros((), device=dev)
    loss_at, norms, total = row[0], row[1:], row[1]  # views made once, as the probe does
    per, coef = torch.zeros(tensors, device=dev), torch.zeros((), device=dev)

    def eager() -> None:  # the guard's ten ops (fused mode, clip, two groups)
        per_tensor = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        torch.linalg.vector_norm(per_tensor * mask, dim=1, out=norms)
        loss_at.copy_(loss)
        factor = clip / torch.maximum(total, clip)
        torch.logical_not(torch.isfinite(total), out=found)
        torch._foreach_mul_(grads, factor)

    def after_norms() -> None:  # static tensors in and out only: what the graph holds
        torch.linalg.vector_norm(per * mask, dim=1, out=norms)
        coef.copy_(clip / torch.maximum(total, clip))
        torch.logical_not(torch.isfinite(total), out=found)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            after_norms()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        after_norms()

    def graphed() -> None:
        torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32), out=per)
        loss_at.copy_(loss)
        graph.replay()
        torch._foreach_mul_(grads, coef)

    # Both give the same row, flag and scaled gradients from the same gradients.
    start = [g.clone() for g in grads]
    results = []
    for fn in (eager, graphed):
        for g, s0 in zip(grads, start, strict=True):
            g.copy_(s0)
        fn()
        torch.cuda.synchronize()
        results.append((row.clone(), found.clone(), [g.clone() for g in grads]))
    (r1, f1, g1), (r2, f2, g2) = results
    same = (torch.allclose(r1, r2, rtol=1e-6) and bool(torch.equal(f1, f2))
            and all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(g1, g2, strict=True)))

    def host_us(fn, chunks: int = 10 if quick else 30, per_chunk: int = 100) -> float:
        xs = []
        for _ in range(chunks):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(per_chunk):
                fn()
            xs.append((time.perf_counter() - t0) / per_chunk * 1e6)
        torch.cuda.synchronize()
        return statistics.median(xs)

    for fn in (eager, graphed):  # warm
        host_us(fn, chunks=2)
    rows = [(name, calls, host_us(fn)) for name, calls, fn in
            (("eager (the guard's ops)", 10, eager), ("norms eager, the rest a CUDA graph", 5,
                                                      graphed), ("eager, again", 10, eager))]
    out(f"{tensors} gradients of 256 floats in two groups, clip and the fused skip flag; host "
        "time per step from perf_counter over 100-step chunks (median of the chunks), a sync "
        "between chunks only. Same results from both: " + ("yes" if same else "NO") + ".")
    out()
    out("| version | host calls | host us per step |")
    out("|---|---|---|")
    for name, calls, us in rows:
        out(f"| {name} | {calls} | {us:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default=None, help="result file (default: bench/results/...)")
    args = ap.parse_args(argv)
    from bench._standalone import ensure_trimtab

    ensure_trimtab()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "gpu.md" if device.startswith("cuda") else "gpu-cpu.md"
    paths = [Path(args.out) if args.out else ROOT / "bench" / "results" / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    out = Report(paths)
    out(f"# trimtab on {'a GPU' if device.startswith('cuda') else 'the CPU (no GPU here)'}: "
        "`python -m bench.gpu" + (" --quick" if args.quick else "") + f" --device {device}`")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # one core per process: steady CPU timings
    from bench._serve import Controller

    wanted = [s for s in args.sections.split(",") if s]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        ctl = None
        try:
            for section in wanted:
                if time.monotonic() - out.t0 > BUDGET_S:
                    out(f"\n## {section}\n\nskipped: the run is past its {BUDGET_S:.0f} s budget")
                    continue
                out.section(section)
                try:
                    if section == "env":
                        section_env(out, device)
                    elif section in ("overhead", "snapshots"):
                        if ctl is None:
                            ctl = Controller(tmp)
                        fn = section_overhead if section == "overhead" else section_snapshots
                        fn(out, device, args.quick, ctl.endpoint)
                    elif section == "faults":
                        section_faults(out, device, args.quick)
                    elif section == "writer":
                        section_writer(out, device, args.quick)
                    elif section == "tail":
                        section_tail(out, device, args.quick)
                    else:
                        out(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
                        failed += 1
                except Exception:
                    failed += 1
                    out("```")
                    out(traceback.format_exc().rstrip())
                    out("```")
                out.save()
        finally:
            if ctl is not None:
                ctl.stop()
    out()
    out(f"_done in {time.monotonic() - out.t0:.1f} s; {failed} section(s) failed_")
    out.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
