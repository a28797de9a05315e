"""Controller capacity: how many reporting jobs one ``trimtab serve`` handles on loopback.

    python -m bench.capacity [--jobs 1,10,50,100,200,400] [--rate 2] [--seconds 10] [--procs 2]
                             [--pin]

For each job count N a fresh controller starts (default config: the default policy set,
journal on, metrics off), then ``--procs`` generator
processes (multiprocessing, spawn) share the N simulated jobs. Each job has its own ZeroMQ
DEALER on 127.0.0.1, registers with realistic scale facts and knobs, then sends a Report at
``--rate`` Hz (20 optimizer steps per report; healthy, slowly falling, noisy loss and
gradient norms, seeded per job; a checkpoint listed every 100 steps, the last three kept),
each followed at once by a Heartbeat on the same socket. It answers every Command with an
Ack carrying the commanded knobs, and reports ``stable_step`` after a ``mark_stable``.

Measured over the ``--seconds`` window (after every job has registered):

- reports/s handled: heartbeat replies (one per report, so the report before it was
  handled) received within the window, per second; offered = N x rate;
- heartbeat RTT: report send -> reply to the heartbeat sent right after it. The controller
  handles one socket's messages in order on one thread, so this bounds the report's
  handling time plus queueing (it answers a report only when it decides something);
- report -> command: report send -> the Command it produced, when one comes;
- controller CPU (``/proc/PID/stat`` utime+stime over the window, % of one core) and RSS
  (``/proc/PID/status`` VmRSS, before registration and at the end of the window).

``--pin`` runs the controller alone on one CPU and the generators on the others
(``sched_setaffinity``), so that its latencies are not the generators' queueing; unpinned,
the scheduler shares every core among them.

Bounded: each job sends at most ``ceil(seconds x rate) + 1`` reports, replies are awaited
for at most ``GRACE_S`` after the window, every generator process is joined or killed and
every controller stopped. ``largest N with p99 < 10 ms`` is read off the heartbeat RTT.
"""

from __future__ import annotations

import argparse
import heapq
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from bench._serve import Controller

__all__ = ["Row", "measure", "run_sweep", "format_report", "header", "main"]

STEPS_PER_REPORT = 20
CHECKPOINT_EVERY = 100
KEEP = 3
GRACE_S = 3.0
P99_TARGET_MS = 10.0
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results" / "capacity.md"


# -- the simulated jobs (run in the generator processes) ----------------------------------
class _Job:
    """One simulated training job: its socket, its knobs and its synthetic signals."""

    def __init__(self, ctx: zmq.Context, endpoint: str, index: int, seed: int,
                 rate: float) -> None:
        from trimtab.protocol import wire

        self.wire = wire
        self.name = f"cap-{index:05d}"
        self.rng = random.Random(seed * 1_000_003 + index)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.connect(endpoint)
        self.step = 0
        self.seq = 0
        self.applied_seq = 0
        self.stable_step: int | None = None
        self.knobs = {"lr": 3e-4 * (1 + 0.5 * self.rng.random()), "momentum": 0.9,
                      "weight_decay": 0.1, "clip": 1.0}
        self.loss0 = 2.0 + self.rng.random()
        self.tau = 4000.0 + 4000.0 * self.rng.random()  # steps for the loss to fall by 1/e
        self.step_time = 1.0 / (rate * STEPS_PER_REPORT)
        self.pending: deque[float] = deque()  # send times of reports awaiting a heartbeat
        self.registered_at: float | None = None
        self.commands: list[str] = []

    def register(self) -> None:
        w = self.wire
        params = self.rng.choice([124_000_000, 350_000_000, 1_300_000_000])
        facts = w.ScaleFacts(param_count=params, group_sizes=[params * 9 // 10, params // 10],
                             world_size=self.rng.choice([1, 8, 64]), optimizer="AdamW",
                             dtype="bfloat16", device="cuda", batch_size=512)
        self.sock.send(w.encode(w.Register(job=self.name, run_id=f"run-{self.name}",
                                           report_every=STEPS_PER_REPORT, facts=facts,
                                           knobs=w.Knobs(**self.knobs))))

    def report(self) -> None:
        """Send the next Report, then a Heartbeat, and remember when."""
        w, r = self.wire, self.rng
        self.step += STEPS_PER_REPORT
        self.seq += 1
        floor = 1.2
        mean = floor + (self.loss0 - floor) * math.exp(-self.step / self.tau)
        mean *= 1.0 + 0.01 * r.gauss(0.0, 1.0)
        spread = 0.03 * mean
        gn = 0.8 * (0.6 + 0.4 * math.exp(-self.step / (2 * self.tau))) * (1 + 0.05 * r.gauss(0, 1))
        first = max(CHECKPOINT_EVERY, self.step - (KEEP - 1) * CHECKPOINT_EVERY)
        ckpts = [s for s in range(first - first % CHECKPOINT_EVERY, self.step + 1,
                                  CHECKPOINT_EVERY) if s > 0][-KEEP:]
        msg = w.Report(
            job=self.name, seq=self.seq, step=self.step, window=STEPS_PER_REPORT,
            loss_mean=mean, loss_last=mean + spread * r.gauss(0, 0.5),
            loss_min=mean - spread, loss_max=mean + spread,
            grad_norm_mean=gn, grad_norm_max=gn * 1.3, grad_norm_std=0.1 * gn,
            group_grad_norms=[gn * 0.95, gn * 0.3], update_ratio=1e-3 * (1 + 0.1 * r.random()),
            step_time_s=self.step_time * (1 + 0.02 * r.random()), knobs=w.Knobs(**self.knobs),
            applied_seq=self.applied_seq, checkpoints=ckpts, stable_step=self.stable_step)
        now = time.monotonic()
        self.sock.send(w.encode(msg))
        self.sock.send(w.encode(w.Heartbeat(job=self.name, step=self.step)))
        self.pending.append(now)

    def on_command(self, cmd) -> None:
        """Apply a Command as the guard would, and acknowledge it; a repeat (the controller
        resends a command whose ack is late) is acknowledged again, not applied again."""
        w = self.wire
        restored = None
        if cmd.seq <= self.applied_seq:
            self.sock.send(w.encode(w.Ack(job=self.name, seq=cmd.seq, step=self.step,
                                          knobs=w.Knobs(**self.knobs))))
            self.commands.append("repeat")
            return
        if cmd.mark_stable is not None:
            self.stable_step = cmd.mark_stable
            self.commands.append("mark_stable")
        if cmd.rollback_to is not None:
            restored = self.step = cmd.rollback_to
            self.commands.append("rollback")
        targets = cmd.knobs.set()
        if targets:
            self.knobs.update(targets)
            self.commands.append("knobs:" + ",".join(sorted(targets)))
        self.applied_seq = max(self.applied_seq, cmd.seq)
        self.sock.send(w.encode(w.Ack(job=self.name, seq=cmd.seq, step=self.step,
                                      knobs=w.Knobs(**self.knobs), restored_step=restored)))

    def bye(self) -> None:
        try:
            self.sock.send(self.wire.encode(self.wire.Bye(job=self.name, step=self.step,
                                                          reason="bench done")), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def _generator(endpoint: str, indices: list[int], seed: int, rate: float, seconds: float,
               ready, go, start_at, out, cpus: set[int] | None = None) -> None:
    """One generator process: register its jobs, run the report schedule, send results."""
    from trimtab.protocol import wire

    if cpus:
        os.sched_setaffinity(0, cpus)

    ctx = zmq.Context()
    jobs = [_Job(ctx, endpoint, i, seed, rate) for i in indices]
    by_sock = {j.sock: j for j in jobs}
    poller = zmq.Poller()
    for j in jobs:
        poller.register(j.sock, zmq.POLLIN)
    hb_rtt: list[float] = []
    cmd_rtt: list[float] = []
    errors: dict[str, int] = {}
    late = in_window = 0
    window_end = math.inf

    def drain(timeout_ms: int) -> None:
        nonlocal late, in_window
        for sock, _ in poller.poll(timeout_ms):
            job = by_sock[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic()
                msg = wire.decode(frame)
                if msg.type == "heartbeat":
                    if job.registered_at is None:
                        job.registered_at = now  # the reply to Register
                    elif job.pending:
                        hb_rtt.append(now - job.pending.popleft())
                        if now <= window_end:
                            in_window += 1
                        else:
                            late += 1
                elif msg.type == "command":
                    if job.pending:  # replies come in order: this report is the oldest
                        cmd_rtt.append(now - job.pending[0])
                    job.on_command(msg)
                elif msg.type == "error":
                    errors[msg.code] = errors.get(msg.code, 0) + 1

    try:
        for j in jobs:
            j.register()
        deadline = time.monotonic() + 60.0
        while any(j.registered_at is None for j in jobs) and time.monotonic() < deadline:
            drain(100)
        ready.put(sum(j.registered_at is not None for j in jobs))
        go.wait(120.0)
        t0 = start_at.value
        window_end = t0 + seconds
        n_reports = math.ceil(seconds * rate)
        period = 1.0 / rate
        # Stagger the jobs over one period so the load is smooth, not in bursts.
        offset = {j: (k + 0.5) / len(jobs) * period for k, j in enumerate(jobs)}
        sent = {j: 0 for j in jobs}
        due = sorted((t0 + offset[j], k) for k, j in enumerate(jobs))
        heapq.heapify(due)
        while due:
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, k = heapq.heappop(due)
                j = jobs[k]
                j.report()
                sent[j] += 1
                if sent[j] < n_reports:
                    heapq.heappush(due, (t0 + offset[j] + sent[j] * period, k))
            wait = (due[0][0] - time.monotonic()) if due else 0.0
            drain(max(0, int(wait * 1000)))
        grace_end = max(time.monotonic(), window_end) + GRACE_S
        while any(j.pending for j in jobs) and time.monotonic() < grace_end:
            drain(50)
        commands: dict[str, int] = {}
        for j in jobs:
            for c in j.commands:
                commands[c] = commands.get(c, 0) + 1
        out.put({"hb": hb_rtt, "cmd": cmd_rtt, "sent": sum(sent.values()),
                 "in_window": in_window, "late": late,
                 "unanswered": sum(len(j.pending) for j in jobs),
                 "jobs_answered": sum(1 for j in jobs if j.seq > len(j.pending)),
                 "jobs": len(jobs), "errors": errors, "commands": commands,
                 "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else []})
        for j in jobs:
            j.bye()
    finally:
        for j in jobs:
            j.sock.close(linger=0)
        ctx.term()


# -- the parent: controllers, processes, /proc, the table ----------------------------------
def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return math.nan


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


@dataclass
class Row:
    jobs: int
    rate: float
    seconds: float
    offered: float  # reports/s sent
    handled: float  # reports/s answered within the window
    answered: float  # fraction of all reports answered, grace included
    hb_p50_ms: float
    hb_p99_ms: float
    cmd_p50_ms: float
    cmd_p99_ms: float
    cmd_n: int
    cpu_pct: float
    rss_mb: float
    kb_per_job: float
    jobs_answered: int
    errors: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)
    #: The CPUs the generator processes ran on.
    generator_cpus: list = field(default_factory=list)

    @property
    def us_per_report(self) -> float:
        return self.cpu_pct / 100.0 / self.handled * 1e6 if self.handled else math.nan


def pinning() -> tuple[set[int], set[int]] | None:
    """``(controller CPUs, generator CPUs)`` for ``--pin``: the controller alone on the
    first CPU this process may use, the generators on the others (None: fewer than 2)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    return ({mine[0]}, set(mine[1:])) if len(mine) >= 2 else None


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (the controller's, started already) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def measure(n_jobs: int, rate: float, seconds: float, procs: int, seed: int = SEED,
            pin: bool = False) -> Row:
    """One fresh controller, ``n_jobs`` simulated jobs at ``rate`` Hz for ``seconds``; with
    ``pin``, the controller on one CPU and the generators on the others."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, n_jobs))
    cpus = pinning() if pin else None
    if pin and cpus is None:
        raise RuntimeError("--pin needs at least 2 CPUs this process may run on")
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp)
        workers: list = []
        try:
            pid = ctl.proc.pid
            if cpus is not None:
                _pin_process(pid, cpus[0])
            rss0 = _rss_mb(pid)
            ready, out = ctx.Queue(), ctx.Queue()
            go, start_at = ctx.Event(), ctx.Value("d", 0.0)
            for p in range(procs):
                w = ctx.Process(target=_generator, daemon=True, args=(
                    ctl.endpoint, list(range(p, n_jobs, procs)), seed, rate, seconds,
                    ready, go, start_at, out, cpus[1] if cpus else None))
                w.start()
                workers.append(w)
            registered = sum(ready.get(timeout=120) for _ in workers)
            if registered != n_jobs:
                raise RuntimeError(f"only {registered} of {n_jobs} jobs registered")
            start_at.value = time.monotonic() + 0.3
            go.set()
            time.sleep(max(0.0, start_at.value - time.monotonic()))
            cpu0 = _cpu_s(pid)
            time.sleep(max(0.0, start_at.value + seconds - time.monotonic()))
            cpu1 = _cpu_s(pid)
            rss1 = _rss_mb(pid)
            results = [out.get(timeout=seconds + GRACE_S + 60) for _ in workers]
            for w in workers:
                w.join(timeout=10)
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)
            ctl.stop()
    hb = [x for r in results for x in r["hb"]]
    cmd = [x for r in results for x in r["cmd"]]
    sent = sum(r["sent"] for r in results)
    errors: dict[str, int] = {}
    commands: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["commands"].items():
            commands[k] = commands.get(k, 0) + v
    return Row(
        jobs=n_jobs, rate=rate, seconds=seconds, offered=sent / seconds,
        handled=sum(r["in_window"] for r in results) / seconds,
        answered=len(hb) / sent if sent else math.nan,
        hb_p50_ms=1e3 * _pct(hb, 0.50), hb_p99_ms=1e3 * _pct(hb, 0.99),
        cmd_p50_ms=1e3 * _pct(cmd, 0.50), cmd_p99_ms=1e3 * _pct(cmd, 0.99), cmd_n=len(cmd),
        cpu_pct=100.0 * (cpu1 - cpu0) / seconds, rss_mb=rss1,
        kb_per_job=1024.0 * (rss1 - rss0) / n_jobs,
        jobs_answered=sum(r["jobs_answered"] for r in results), errors=errors,
        commands=commands,
        generator_cpus=sorted({c for r in results for c in r.get("cpus", ())}))


def run_sweep(jobs: list[int], rate: float, seconds: float, procs: int,
              seed: int = SEED, log=None, pin: bool = False) -> list[Row]:
    rows = []
    for n in jobs:
        row = measure(n, rate, seconds, procs, seed, pin)
        if log is not None:
            log(f"N={n}: {row.handled:.0f} reports/s, hb p99 {row.hb_p99_ms:.2f} ms, "
                f"cpu {row.cpu_pct:.0f}%")
        rows.append(row)
    return rows


def header(jobs: list[int], rate: float, seconds: float, procs: int, seed: int,
           pin: bool = False) -> list[str]:
    """The report's first lines: machine, versions and settings."""
    import pydantic

    try:
        from trimtab.client import __version__ as tv
    except ImportError:  # pragma: no cover
        tv = "?"
    pins = pinning() if pin else None
    where = (f"the controller pinned to CPU {sorted(pins[0])}, the generators to CPUs "
             f"{sorted(pins[1])}" if pins else "unpinned")
    return [
        f"# controller capacity: {platform.machine()}, {os.cpu_count()} cpus, "
        f"{platform.system()} {platform.release()}, python {platform.python_version()}, "
        f"trimtab {tv}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), "
        f"pydantic {pydantic.__version__}",
        f"# jobs={','.join(map(str, jobs))} rate={rate} Hz seconds={seconds} procs={procs} "
        f"seed={seed}; {STEPS_PER_REPORT} steps/report, checkpoint every "
        f"{CHECKPOINT_EVERY} steps (last {KEEP} listed), a Heartbeat after every Report; "
        f"default config ({' + '.join(_default_policies())}), journal on, metrics off; loopback "
        f"tcp://127.0.0.1; generators on the same machine as the controller, {where}",
    ]


def _default_policies() -> list[str]:
    from trimtab.controller.config import ControllerConfig

    return [p.name for p in ControllerConfig().policies]


def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_report(rows: list[Row], header: list[str]) -> str:
    lines = list(header)
    lines += [
        "| N | rate (Hz) | offered reports/s | reports/s handled | answered | heartbeat RTT "
        "p50 (ms) | p99 (ms) | report->command p50 (ms) | p99 (ms) | commands | controller "
        "CPU (% of one core) | CPU us/report | RSS (MB) | KB per job |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.jobs} | {r.rate:g} | {r.offered:.0f} | {r.handled:.0f} | "
            f"{100 * r.answered:.1f}% | {_f(r.hb_p50_ms)} | {_f(r.hb_p99_ms)} | "
            f"{_f(r.cmd_p50_ms)} | {_f(r.cmd_p99_ms)} | {r.cmd_n} | {r.cpu_pct:.0f} | "
            f"{_f(r.us_per_report, '.0f')} | {r.rss_mb:.1f} | {r.kb_per_job:.0f} |")
    ok = [r.jobs for r in rows if r.hb_p99_ms < P99_TARGET_MS and r.answered > 0.999]
    lines.append("")
    lines.append(f"largest N with p99 < {P99_TARGET_MS:g} ms: "
                 f"{max(ok) if ok else 'none measured'}")
    rate = rows[0].rate if rows else math.nan
    # Capacity: CPU cost per report at the busiest well-served point extrapolated to one
    # full core, or the handled rate if the controller already saturated.
    busiest = max(rows, key=lambda r: r.handled) if rows else None
    saturated = busiest is not None and (busiest.cpu_pct >= 90.0
                                         or busiest.handled < 0.95 * busiest.offered)
    if (busiest is not None and busiest.handled > 0 and not saturated
            and busiest.us_per_report <= 0):
        # A short window at a low rate: the controller's CPU rounds to 0 clock ticks.
        lines.append("scale-out: not estimated (the controller's CPU over the window was "
                     "below the clock's resolution; run longer or with more jobs)")
    elif busiest is not None and busiest.handled > 0:
        per_s = busiest.handled if saturated else 1e6 / busiest.us_per_report
        how = ("measured at saturation" if saturated else
               f"extrapolated to one full core from {busiest.us_per_report:.0f} us CPU/report "
               f"at N={busiest.jobs}")
        k = int(per_s / rate)
        lines.append(
            f"scale-out: one controller handles about {per_s:.0f} reports/s ({how}) => about "
            f"{per_s:.0f} / {rate:g} Hz = {k} jobs at {rate:g} Hz (each report followed by a "
            f"heartbeat, as here). Beyond that, shard jobs by id across controllers "
            f"(shard_endpoint: rendezvous hashing of the job id): n_controllers = "
            f"ceil(N_jobs / {k}), "
            f"e.g. {2 * k} jobs need 2; keep each below ~70% of that for p99 headroom.")
    for r in rows:
        extra = []
        if r.commands:
            extra.append("commands applied " + ", ".join(
                f"{k} {v}" for k, v in sorted(r.commands.items())))
        if r.errors:
            extra.append("error replies " + ", ".join(f"{k} {v}" for k, v in r.errors.items()))
        if r.jobs_answered != r.jobs:
            extra.append(f"only {r.jobs_answered}/{r.jobs} jobs got a heartbeat reply")
        if extra:
            lines.append(f"- N={r.jobs}: " + "; ".join(extra))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="1,10,50,100,200,400")
    ap.add_argument("--rate", type=float, default=2.0, help="reports per second per job")
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window per N")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--pin", action="store_true",
                    help="the controller alone on one CPU, the generators on the others")
    ap.add_argument("--out", default=None,
                    help="also write the report here (e.g. bench/results/capacity.md)")
    args = ap.parse_args(argv)
    jobs = [int(x) for x in args.jobs.split(",") if x]
    if not jobs or min(jobs) < 1 or args.rate <= 0 or args.seconds <= 0 or args.procs < 1:
        ap.error("jobs, rate, seconds and procs must be positive")
    rows = run_sweep(jobs, args.rate, args.seconds, args.procs, args.seed,
                     log=lambda s: print(s, file=sys.stderr, flush=True), pin=args.pin)
    text = format_report(rows, header(jobs, args.rate, args.seconds, args.procs, args.seed,
                                      args.pin))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
