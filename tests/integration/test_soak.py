"""A soak, bounded in time and on loopback only: 50 simulated jobs and two real training
runs against one controller that is killed (SIGKILL) and restarted on its journal twice,
while one training run is killed and started again. At the end every real run completed
its steps, no command was lost or applied twice, every knob value the journal holds stayed
within the governor's bounds, every ack matches a command, and the controller's memory
stayed flat.

``SOAK_SECONDS`` sets the soak's length in seconds (default 90; the test takes about
20 s more); every phase scales with it, so ``SOAK_SECONDS=1800`` soaks for half an hour.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from bench.scenario_policies import python_path
from trimtab.controller.config import load_config
from trimtab.controller.governor import Governor
from trimtab.controller.journal import Journal

from .support import Serve, assert_applied_in_order, free_port, start_serve, wait_for

SOAK_S = float(os.environ.get("SOAK_SECONDS", "90"))
SIM_JOBS = 50
SIM_RATE = 1.0  # reports per second per simulated job (20 steps each)
REAL_STEP_S = 0.02  # the real runs' pace: about 40 steps/s

# Generous: on a loaded host the runs start and step slowly; the soak itself is SOAK_S.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3 * SOAK_S + 240)]

CONFIG = """
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "divergence_guard"

[[policies]]
name = "plateau"

[[policies]]
name = "bench.scenario_policies:Nudge"

[governor.lr]
cooldown_steps = 100
"""

SIM = textwrap.dedent('''
    """Simulated jobs: each registers, reports at a fixed rate, applies each command once
    (by seq) and acks it; re-registers when the controller does not know it (restarted)."""
    import json, math, os, random, sys, time
    import zmq
    from trimtab.protocol import wire

    endpoint, n, stop, rate, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
        float(sys.argv[4]), sys.argv[5]
    STEPS = 20
    ctx = zmq.Context()

    class Job:
        def __init__(self, i):
            self.name, self.run_id, self.rng = f"sim-{i:03d}", f"run-{i}", random.Random(i)
            self.sock = ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(endpoint)
            self.step = self.seq = self.applied_seq = self.reacks = self.registers = 0
            self.applied, self.errors, self.stable = [], {}, None
            # The run's own values, trimtab's multipliers on lr and weight decay (the
            # knob model), and the momentum and clip commanded.
            self.base = {"lr": 3e-4 * (1 + self.rng.random()), "momentum": 0.9,
                         "weight_decay": 0.1}
            self.scale = {"lr": 1.0, "weight_decay": 1.0}
            self.absolute = {"momentum": 0.9, "clip": 1.0}
            self.loss0, self.tau = 2.0 + self.rng.random(), 3000 + 3000 * self.rng.random()

        def send(self, msg):
            try:
                self.sock.send(wire.encode(msg), zmq.NOBLOCK)
            except zmq.Again:  # the controller is down and the pipe full: a lost message
                pass

        def register(self):
            self.registers += 1
            facts = wire.ScaleFacts(param_count=10**8, group_sizes=[9 * 10**7, 10**7],
                                    optimizer="AdamW", dtype="bfloat16", device="cuda",
                                    batch_size=512)
            self.send(wire.Register(job=self.name, run_id=self.run_id, step=self.step,
                                    report_every=STEPS, facts=facts,
                                    **self.values(), applied_seq=self.applied_seq))

        def values(self):
            """knobs (what the optimizer used), base and scale, as a client reports them."""
            knobs = wire.Knobs(lr=self.base["lr"] * self.scale["lr"],
                               weight_decay=self.base["weight_decay"] * self.scale["weight_decay"],
                               **self.absolute)
            return {"knobs": knobs, "base": wire.Knobs(**self.base),
                    "scale": wire.Scale(**self.scale)}

        def report(self):
            r = self.rng
            self.step += STEPS
            self.seq += 1
            mean = 1.2 + (self.loss0 - 1.2) * math.exp(-self.step / self.tau)
            mean *= 1 + 0.01 * r.gauss(0, 1)
            gn = 0.8 * (1 + 0.05 * r.gauss(0, 1))
            ckpts = [s for s in range(100, self.step + 1, 100)][-3:]
            self.send(wire.Report(
                job=self.name, seq=self.seq, step=self.step, window=STEPS, loss_mean=mean,
                loss_last=mean, loss_min=mean * 0.97, loss_max=mean * 1.03,
                grad_norm_mean=gn, grad_norm_max=gn * 1.3, grad_norm_std=0.1 * gn,
                update_ratio=1e-3, step_time_s=0.05, **self.values(),
                applied_seq=self.applied_seq, checkpoints=ckpts, stable_step=self.stable))

        def on(self, msg):
            if msg.type == "command":
                restored = None
                if msg.seq > self.applied_seq:  # applied once; a repeat is only acked
                    if msg.mark_stable is not None:
                        self.stable = msg.mark_stable
                    if msg.rollback_to is not None:
                        restored = self.step = msg.rollback_to
                    self.scale.update(msg.scale.set())
                    self.absolute.update(msg.knobs.set())
                    self.applied_seq = msg.seq
                    self.applied.append(msg.seq)
                else:
                    self.reacks += 1
                self.send(wire.Ack(job=self.name, seq=msg.seq, step=self.step,
                                   **self.values(), restored_step=restored))
            elif msg.type == "error":
                self.errors[msg.code] = self.errors.get(msg.code, 0) + 1
                if msg.code == "unknown_job":  # the controller restarted: register again
                    self.register()

    jobs = [Job(i) for i in range(n)]
    poller = zmq.Poller()
    for j in jobs:
        poller.register(j.sock, zmq.POLLIN)
        j.register()
    by_sock = {j.sock: j for j in jobs}
    t0 = time.monotonic()
    due = {j: t0 + (k + 0.5) / n / rate for k, j in enumerate(jobs)}
    while not os.path.exists(stop):  # the test says when
        now = time.monotonic()
        for j in jobs:
            if due[j] <= now:
                j.report()
                due[j] += 1.0 / rate
        for sock, _ in poller.poll(20):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                by_sock[sock].on(wire.decode(frame))
    for j in jobs:
        j.send(wire.Bye(job=j.name, step=j.step, reason="soak done"))
    time.sleep(0.5)
    json.dump({j.name: {"applied": j.applied, "reacks": j.reacks, "registers": j.registers,
                        "reports": j.seq, "errors": j.errors} for j in jobs}, open(out, "w"))
''')

REAL = textwrap.dedent('''
    """A real training run attached to the controller: a small MLP regression."""
    import json, sys, time
    import torch
    from trimtab.client import attach

    endpoint, job, steps, step_s, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
        float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.3 * torch.randn(512, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    applied = []
    with attach(model, opt, job=job, endpoint=endpoint, report_every=10, heartbeat_s=0.25,
                checkpoint_every=50) as guard:
        for _ in range(3 * steps):  # rollbacks take steps back; the budget bounds them
            if guard.global_step >= steps:
                break
            idx = torch.randint(0, 512, (64,), generator=g)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            if guard.applied_seq != (applied[-1] if applied else 0):
                applied.append(guard.applied_seq)
            time.sleep(step_s)
        result = {"steps": guard.global_step, "applied": applied, "run_id": guard.run_id,
                  "lr": guard.knobs.lr}
    json.dump(result, open(out, "w"))
''')


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Soak:
    """The processes of the soak, each ended by its id when the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.procs: list[subprocess.Popen] = []
        self.serves: list[Serve] = []
        self.rss: list[tuple[float, int, int]] = []  # (t, pid, kB)
        self.t0 = time.monotonic()
        self._stop = threading.Event()

    def serve(self) -> Serve:
        journal = self.tmp / "journal.db"
        srv = start_serve(self.tmp, self.port, None, CONFIG, journal)
        self.serves.append(srv)
        return srv

    def spawn(self, script: str, *args: object, name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - handed to the subprocess
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)], stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def real(self, job: str, steps: int, seed: int, name: str) -> subprocess.Popen:
        return self.spawn(
            REAL,
            self.serves[-1].endpoint,
            job,
            steps,
            REAL_STEP_S,
            seed,
            self.tmp / f"{name}.json",
            name=name,
        )

    def at(self, fraction: float) -> None:
        """Sleep until ``fraction`` of the soak has passed."""
        time.sleep(max(0.0, self.t0 + fraction * SOAK_S - time.monotonic()))

    def sample_rss(self) -> None:
        while not self._stop.wait(2.0):
            srv = self.serves[-1]
            try:
                self.rss.append((time.monotonic() - self.t0, srv.proc.pid, _rss_kb(srv.proc.pid)))
            except (OSError, RuntimeError):  # between a kill and the restart
                pass

    def close(self) -> None:
        self._stop.set()
        for p in [*self.procs, *(s.proc for s in self.serves)]:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def soak(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    s = Soak(tmp_path)
    yield s
    s.close()


def _runs(journal: Journal, job: str) -> list[dict]:
    """A job's events cut into runs (a run starts at a register with a new run_id)."""
    runs: list[dict] = []
    for e in journal.events(job):
        if e.kind == "register" and (not runs or runs[-1]["run_id"] != e.data["run_id"]):
            runs.append(
                {
                    "run_id": e.data["run_id"],
                    # What the governor steers: multipliers (1 at registration) for lr
                    # and weight decay, momentum and clip as registered.
                    "initial": {**e.data["knobs"], "lr": 1.0, "weight_decay": 1.0},
                    "commands": [],
                    "acks": [],
                    "applied_seq": 0,
                    "registers": [],
                }
            )
        run = runs[-1]
        if e.kind == "register":
            run["registers"].append(e.data["resumed"])
        if e.kind in ("command", "ack"):
            run[e.kind + "s"].append(e)
        if e.kind in ("register", "report"):
            run["applied_seq"] = max(run["applied_seq"], e.data["applied_seq"])
    return runs


def test_soak_with_controller_and_client_kills(soak):
    sim_out = soak.tmp / "sim.json"
    real_steps = {
        "real-a": int(0.7 * SOAK_S / REAL_STEP_S / 1.25),
        "real-b": int(0.45 * SOAK_S / REAL_STEP_S / 1.25),
    }
    stop = soak.tmp / "stop"
    first = soak.serve()
    sim = soak.spawn(SIM, first.endpoint, SIM_JOBS, stop, SIM_RATE, sim_out, name="sim")
    real_a = soak.real("real-a", real_steps["real-a"], 1, "real-a")
    real_b1 = soak.real("real-b", 10**6, 2, "real-b1")  # killed long before it could end
    # The soak's clock starts once every job is attached (a loaded host starts them slowly).
    journal = first.journal()
    attached = wait_for(
        lambda: len({e.job for e in journal.events(kind="register")}) == SIM_JOBS + 2,
        timeout=120,
        interval=0.5,
    )
    assert attached, "not every job registered"
    soak.t0 = time.monotonic()
    sampler = threading.Thread(target=soak.sample_rss, daemon=True)
    sampler.start()

    soak.at(0.2)
    soak.serves[-1].kill()
    soak.serve()
    soak.at(0.3)
    real_b1.send_signal(signal.SIGKILL)
    real_b1.wait(10)
    real_b2 = soak.real("real-b", real_steps["real-b"], 3, "real-b2")
    soak.at(0.4)
    soak.serves[-1].kill()
    last = soak.serve()
    soak.at(0.55)  # the last controller has warmed up: every job re-registered, caches full
    rss_warm = _rss_kb(last.proc.pid)

    soak.at(1.0)
    stop.touch()
    assert sim.wait(60) == 0, (soak.tmp / "sim.log").read_text()[-2000:]
    for name, proc in (("real-a", real_a), ("real-b2", real_b2)):
        assert proc.wait(SOAK_S) == 0, (soak.tmp / f"{name}.log").read_text()[-2000:]
    # The last acks and byes: on a loaded host the controller may take a while to reach
    # them, and a SIGTERM before it does would lose one (the check below asserts each).
    names = [*json.loads(sim_out.read_text()), "real-a", "real-b"]
    said_bye = last.journal()
    wait_for(lambda: all(said_bye.events(j, "bye") for j in names), timeout=60, interval=0.5)
    time.sleep(1.0)  # and the acks that may trail them
    rss_end = _rss_kb(last.proc.pid)
    soak._stop.set()
    last.proc.send_signal(signal.SIGTERM)
    assert last.proc.wait(20) == 0

    print(
        f"\nsoak {SOAK_S:.0f} s: {SIM_JOBS} simulated jobs at {SIM_RATE} Hz, 2 real runs; "
        f"controller killed twice, real-b killed once"
    )
    print(
        f"controller RSS: {rss_warm / 1024:.1f} MiB after warm-up, {rss_end / 1024:.1f} MiB "
        f"at the end ({rss_end / rss_warm - 1:+.1%}); samples (s, pid, MiB): "
        + ", ".join(f"({t:.0f}, {p}, {kb / 1024:.1f})" for t, p, kb in soak.rss)
    )

    journal = Journal(str(soak.tmp / "journal.db"))
    governor = Governor(load_config(soak.tmp / "trimtab.toml", env={}).governor)
    sims = json.loads(sim_out.read_text())
    reals = {
        name: json.loads((soak.tmp / f"{name}.json").read_text()) for name in ("real-a", "real-b2")
    }
    checked = defaultdict(int)
    for name, r in reals.items():
        assert r["steps"] == real_steps[name.removesuffix("2")], name  # it completed

    for job in [*sims, "real-a", "real-b"]:
        runs = _runs(journal, job)
        for run in runs:
            seqs = [c.seq for c in run["commands"]]
            assert seqs == sorted(set(seqs)), f"{job}: a command seq reused"
            by_seq = {c.seq: c for c in run["commands"]}
            acked: dict[int, dict] = {}
            for a in run["acks"]:
                assert a.seq in by_seq, f"{job}: ack {a.seq} matches no command"
                # A resent command is acknowledged again with the same values, not re-applied.
                values = (a.data["knobs"], a.data["scale"])
                assert acked.setdefault(a.seq, values) == values, (job, a.seq)
            # Every command was applied: acked, or shown applied by a later registration or
            # report; only the last of a run may be left, if the run ended right after it.
            unsettled = [s for s in seqs if s not in acked and s > run["applied_seq"]]
            assert unsettled in ([], seqs[-1:]), f"{job}: commands {unsettled} lost"
            # Knob values commanded and in force stayed within the governor's bounds.
            for e in run["commands"] + run["acks"]:
                steered = {**e.data["knobs"], **e.data["scale"]}  # multipliers for lr, wd
                for knob, value in steered.items():
                    if value is None:
                        continue
                    lo, hi = governor.bounds(knob, run["initial"][knob])
                    assert lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9), (job, e.kind, knob, value)
                    checked[e.kind] += 1
        if job in sims:
            s = sims[job]
            (run,) = runs
            assert_applied_in_order(run["commands"], s["applied"], job)
            assert set(s["errors"]) <= {"unknown_job"}, (job, s["errors"])
            assert run["registers"].count("journal") >= 2, (job, run["registers"])
        else:
            assert len(runs) == (2 if job == "real-b" else 1), job
            trail = reals["real-a" if job == "real-a" else "real-b2"]["applied"]
            assert_applied_in_order(runs[-1]["commands"], trail, job)
        assert journal.events(job, "bye"), f"{job} never said bye"

    commands = sum(
        len(r["commands"]) for j in [*sims, "real-a", "real-b"] for r in _runs(journal, j)
    )
    reacks = sum(s["reacks"] for s in sims.values())
    print(
        f"journal: {commands} commands, {checked['ack']} ack knob values and "
        f"{checked['command']} commanded values within bounds; simulated re-acks {reacks}; "
        f"simulated re-registrations {sum(s['registers'] for s in sims.values()) - SIM_JOBS}"
    )
    assert checked["command"] > 50 and checked["ack"] > 50
    assert rss_end <= 1.25 * rss_warm, f"controller RSS grew {rss_warm} -> {rss_end} kB"
