"""The observability scenario, and the per-job dashboard drawn from it.

    python -m bench.dashboard_png [--out docs/img/job-dashboard.png]

A real ``trimtab serve`` steers five real training runs (bench.faults' ReLU MLP, SGD with
momentum) while a real Prometheus scrapes it every second with the shipped scrape config
(``deploy/prometheus/prometheus.yml``: only the target, the intervals and the rule file's
path are changed) and the shipped alert rules (``deploy/prometheus/rules.yml``, each
``for:`` set to 0s so that a short run can fire them). Each alert gets a scenario:

- ``spike-1`` meets three poisoned batches once, at iteration 400: one rollback, after
  which it recovers (it runs only the divergence guard live, so that no other command is
  pending when the spike is reported; the controller decides nothing while one is);
- ``rb-1`` meets the same poisoned batches (inputs x1e3) at step 400 after every rollback,
  so the rollback budget (2 here) runs out: TrimtabRollbackBudgetExhausted;
- ``churn-1`` runs a policy that halves and doubles the LR in turn (TrimtabDecisionChurn;
  nothing else live that could hold the LR down) and one that raises (a policy error),
  with a client queue of 4 reports;
- the controller is stopped (SIGSTOP) for 3 s: TrimtabControllerDown, and ``churn-1``'s
  client drops reports (TrimtabReportsDropped);
- ``silent-1``, a training process of its own, stalls after 60 steps (its client's thread
  goes on sending heartbeats): TrimtabJobStalled (its threshold cut to 10 s here); then it
  is killed (SIGKILL): TrimtabJobSilent, then, after the controller's ``job_timeout_s``,
  TrimtabJobLost;
- a person pauses ``spike-1`` after its rollback (``trimtab pause``): the operator
  annotation and the fleet table's paused column.
- ``ddp-1``, a DDP job of two processes (``torchrun``, gloo), whose rank 1 alone writes
  its own lr x3 for three steps once a checkpoint is stable: its replicas part, the
  report's ``replica_spread`` says so, and the job is rolled back (reason ``replicas``).

``rb-1`` and ``spike-1`` also run the alternating policy in shadow mode, so that between
the three jobs every series of the per-job dashboard has data.

The picture is matplotlib, drawn by :func:`render` from the same PromQL as the Grafana
panels (read from ``deploy/grafana/dashboards/trimtab-job.json``, ``$job`` = ``spike-1``)
over Prometheus' HTTP API, with the dashboard's annotation queries (rollbacks red, knob
changes grey, a person's actions blue). ``docs/img/job-dashboard.png`` was made so, with
``python -m bench.dashboard_png`` on a 2-core VM. The test
``tests/integration/test_prometheus.py`` runs the same scenario and checks every panel and
alert rule against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from bench._serve import free_port
from bench.faults import FAULT_AT, Task
from bench.scenario_policies import python_path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
RULES = DEPLOY / "prometheus" / "rules.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"

#: The controller's config: a budget of 2 rollbacks, a job timeout of 6 s.
CONFIG = """
job_timeout_s = 6
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "divergence_guard"

[[policies]]
name = "plateau"
jobs = ["rb-*"]

[[policies]]
name = "bench.scenario_policies:Seesaw"
jobs = ["churn-*"]

[[policies]]
name = "bench.scenario_policies:Raising"
jobs = ["churn-*"]

[[policies]]
name = "bench.scenario_policies:Seesaw"
shadow = true
jobs = ["rb-*", "spike-*"]

[rollback]
stable_window_steps = 60
budget = 2
"""

#: TrimtabJobStalled's threshold in the scenario (the rule's is 900 s).
STALLED_S = 10

#: A training process of its own: after 60 steps its loop stalls (its client's thread
#: goes on sending heartbeats: TrimtabJobStalled), then it is killed to make the job go
#: silent.
SILENT_CLIENT = """
import sys, time, torch
from trimtab.client import attach
from bench.faults import Task
task = Task(3)
opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
guard = attach(task.model, opt, job=sys.argv[2], endpoint=sys.argv[1], report_every=5,
               heartbeat_s=0.2)
for _ in range(60):
    xb, yb = task.batch()
    loss = torch.nn.functional.mse_loss(task.model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    guard.step(loss)
    time.sleep(0.01)
while True:  # stuck, as a loop in a hung collective is
    time.sleep(1.0)
"""

#: A DDP job of two ranks (``torchrun --nproc_per_node=2``, gloo): once a checkpoint is
#: stable, rank 1 alone writes its own lr x3 for three steps and its replica parts from
#: rank 0's; the report's replica check rolls both back. It ends 150 iterations later.
DDP_CLIENT = """
import sys, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from trimtab.client import attach
from bench.faults import Task
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
task = Task(4 + rank)  # each rank its own batches; DDP makes the replicas rank 0's
model = DistributedDataParallel(task.model)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
guard = attach(model, opt, job=sys.argv[2], endpoint=sys.argv[1], report_every=5,
               checkpoint_every=25, heartbeat_s=0.2)
fault = after = None
for it in range(3000):
    if fault is None and guard.stable_step is not None:
        fault = it  # the same iteration on every rank: the mark reaches all at once
    if rank == 1 and fault is not None and guard.rollbacks == 0:
        opt.param_groups[0]["lr"] = 0.15 if it - fault < 3 else 0.05
    xb, yb = task.batch()
    loss = torch.nn.functional.mse_loss(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    guard.step(loss)
    time.sleep(0.01)
    if guard.rollbacks and after is None:
        after = it
    if after is not None and it - after >= 150:
        break
guard.close()
del guard, opt, model
dist.barrier()
dist.destroy_process_group()
"""

ALERTS = (
    "TrimtabControllerDown",
    "TrimtabRollbackBudgetExhausted",
    "TrimtabJobSilent",
    "TrimtabJobStalled",
    "TrimtabJobLost",
    "TrimtabDecisionChurn",
    "TrimtabReportsDropped",
    "TrimtabJobPausedLong",
)


def missing_binaries() -> str | None:
    """Why the scenario cannot run here (None: it can)."""
    absent = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
    if absent:
        return (
            f"{' and '.join(absent)} not on PATH (Debian: apt-get install prometheus; "
            ".ci/run installs it)"
        )
    return None


def _get(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


class Prometheus:
    """A Prometheus server on loopback scraping ``target`` every second, with the shipped
    rules (``for:`` set to 0s); its TSDB in ``tmp``."""

    def __init__(self, tmp: Path, target: str) -> None:
        import yaml

        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
                if rule["alert"] == "TrimtabJobStalled":  # 15 minutes: a short run's 10 s
                    if "> 900" not in rule["expr"]:
                        raise RuntimeError(f"TrimtabJobStalled's threshold moved: {rule['expr']}")
                    rule["expr"] = rule["expr"].replace("> 900", f"> {STALLED_S}")
        (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        cfg = yaml.safe_load(SCRAPE.read_text())
        cfg["global"] = {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "scrape_timeout": "900ms",
        }
        cfg["rule_files"] = [str(tmp / "rules.yml")]
        (scrape,) = cfg["scrape_configs"]
        scrape["static_configs"] = [{"targets": [target]}]
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "w"),
        )  # noqa: SIM115
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "prometheus did not start:\n" + self.log_path.read_text()
                    ) from None
                time.sleep(0.2)

    def api(self, path: str, **params: Any) -> Any:
        """``/api/v1/<path>``'s data; a failed query raises with Prometheus' error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            body = _get(url)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path} {params}: {exc.read().decode()}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series now."""
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0):
        """A range query's series."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def fired(self, window_s: int = 600) -> set[str]:
        """Alerts that fired in the last ``window_s`` seconds."""
        got = self.query(
            f'count by (alertname) (max_over_time(ALERTS{{alertstate="firing"}}[{window_s}s]))'
        )
        return {s["metric"]["alertname"] for s in got}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Serve:
    """``trimtab serve`` with the scenario's config and policies, metrics on a free port."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "trimtab.toml").write_text(CONFIG)
        port, self.metrics_port = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.log_path = tmp / "serve.log"
        path = python_path(os.environ.get("PYTHONPATH"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trimtab.controller",
                "serve",
                "--bind",
                self.endpoint,
                "--metrics-port",
                str(self.metrics_port),
                "--journal",
                str(tmp / "journal.db"),
                "--config",
                str(tmp / "trimtab.toml"),
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"),
            text=True,  # noqa: SIM115
            env={
                **os.environ,
                "PYTHONPATH": path,
                "PYTHONUNBUFFERED": "1",
                "TRIMTAB_METRICS_ADDR": "127.0.0.1",
            },
        )
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            raise RuntimeError(
                f"trimtab serve did not start: {line!r}\n" + self.log_path.read_text()
            )

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def value(self, name: str, **labels: str) -> float | None:
        """One sample of the controller's /metrics now (None: no such series)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and (
                not want or all(f"{kv}" in head for kv in want.split(","))
            ):
                return float(value)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def train(
    endpoint: str,
    job: str,
    stop: threading.Event,
    *,
    seed: int,
    fault: str | None = None,
    pace_s: float = 0.002,
    queue_size: int = 64,
    clip: float | None = None,
) -> None:
    """Train bench.faults' MLP attached to ``endpoint`` until ``stop``. ``fault="once"``
    scales the inputs of iterations FAULT_AT..FAULT_AT+2 by 1e3; ``"recurring"`` those of
    optimizer steps FAULT_AT..FAULT_AT+2, so the fault comes back after every rollback.
    Every 50 iterations the validation loss of the model and of its weight average
    (``ema=0.99``) goes to ``guard.report_validation``."""
    from trimtab.client import attach

    task = Task(seed)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    with attach(
        task.model,
        opt,
        job=job,
        endpoint=endpoint,
        report_every=5,
        heartbeat_s=0.2,
        checkpoint_every=50,
        clip=clip,
        queue_size=queue_size,
        ema=0.99,
    ) as guard:
        it = 0
        while not stop.is_set():
            xb, yb = task.batch()
            where = {"once": it, "recurring": guard.global_step}.get(fault or "", -1)
            if FAULT_AT <= where < FAULT_AT + 3:
                xb = xb * 1e3
            it += 1
            loss = torch.nn.functional.mse_loss(task.model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            if it % 50 == 0:
                with torch.no_grad():
                    averaged = torch.nn.functional.mse_loss(guard.ema_model(task.xv),
                                                            task.yv).item()
                guard.report_validation(task.validation_loss(), ema=averaged)
            time.sleep(pace_s)


def wait_until(what: str, predicate, timeout: float) -> Any:
    """Poll ``predicate`` every 0.25 s; its truthy value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


#: The per-job dashboard's lr panel (the user's lr, trimtab's multiplier, the lr used).
LR_PANEL = "LR: yours, trimtab's multiplier, what ran"


class Scenario:
    """Runs the scenario of the module docstring; ``with Scenario(tmp) as s:`` leaves the
    controller, Prometheus and jobs ``rb-1`` and ``churn-1`` running inside the block."""

    RB, SPIKE, CHURN, SILENT, DDP = "rb-1", "spike-1", "churn-1", "silent-1", "ddp-1"

    def __init__(self, tmp: Path, log=print) -> None:
        self.tmp, self.log = Path(tmp), log
        self.serve: Serve | None = None
        self.prom: Prometheus | None = None
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.silent: subprocess.Popen | None = None
        self.ddp: subprocess.Popen | None = None

    def __enter__(self) -> Scenario:
        try:
            self._run()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _run(self) -> None:
        self.serve = srv = Serve(self.tmp)
        self.prom = Prometheus(self.tmp, f"127.0.0.1:{srv.metrics_port}")
        # Series a job starts at 0 must be scraped at 0 once, or changes() misses the
        # first increment: the jobs start only once Prometheus scrapes the controller.
        wait_until("Prometheus to scrape the controller", lambda: self.prom.query("up == 1"), 60)
        self.start = time.time()
        self.silent = subprocess.Popen(
            [sys.executable, "-c", SILENT_CLIENT, srv.endpoint, self.SILENT],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        script = self.tmp / "ddp_client.py"
        script.write_text(DDP_CLIENT)
        self.ddp = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(script), srv.endpoint, self.DDP],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": python_path(os.environ.get("PYTHONPATH"))},
        )
        for job, kw in (
            (self.RB, {"seed": 0, "fault": "recurring"}),
            (self.SPIKE, {"seed": 2, "fault": "once", "clip": 5.0, "pace_s": 0.01}),
            (self.CHURN, {"seed": 1, "queue_size": 4, "pace_s": 0.004, "clip": 5.0}),
        ):
            t = threading.Thread(
                target=train, args=(srv.endpoint, job, self.stop), kwargs=kw, daemon=True
            )
            t.start()
            self.threads.append(t)
        self._send_garbage()
        wait_until(
            "rb-1's rollback budget to run out",
            lambda: srv.value("trimtab_rollback_alert", job=self.RB) == 1.0,
            120,
        )
        wait_until(
            "spike-1's rollback",
            lambda: srv.value("trimtab_rollback_steps_lost_total", job=self.SPIKE),
            120,
        )
        wait_until(
            "churn-1's LR to reverse 6 times",
            lambda: (
                (srv.value("trimtab_knob_reversals_total", job=self.CHURN, knob="lr") or 0) >= 6
            ),
            120,
        )
        wait_until("silent-1 to report", lambda: srv.value("trimtab_job_step", job=self.SILENT), 60)
        wait_until(
            "ddp-1's rollback of its parted replicas",
            lambda: (srv.value("trimtab_rollbacks_total", job=self.DDP, reason="replicas")
                     or 0) >= 1,
            120,
        )
        # It ends by itself; before the controller is stopped, so that its Bye is heard.
        wait_until("ddp-1 to end", lambda: self.ddp.poll() is not None, 60)
        wait_until(
            "Prometheus to scrape spike-1's rollback",
            lambda: self.prom.query(f'trimtab_rollback_steps_lost_total{{job="{self.SPIKE}"}} > 0'),
            30,
        )
        # A person pauses spike-1 after its rollback (trimtab pause, as a person would):
        # the operator annotation and the jobs table's paused column have it.
        out = subprocess.run(
            [sys.executable, "-m", "trimtab.controller", "pause", self.SPIKE, "--reason",
             "looking at its spike", "--who", "oncall", "--endpoint", srv.endpoint],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"trimtab pause {self.SPIKE} failed: {out.stderr}")
        wait_until(
            "Prometheus to scrape spike-1's pause",
            lambda: self.prom.query(f'trimtab_job_paused{{job="{self.SPIKE}"}} > 0'),
            30,
        )
        self.log("rollback alert, churn and the silent job in place; stopping the controller")
        srv.proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        srv.proc.send_signal(signal.SIGCONT)
        wait_until(
            "churn-1 to report dropped reports",
            lambda: (srv.value("trimtab_job_dropped_reports_total", job=self.CHURN) or 0) > 0,
            60,
        )
        wait_until(
            "silent-1's stalled loop to fire TrimtabJobStalled",
            lambda: "TrimtabJobStalled" in self.prom.fired(), 60,
        )
        self.log("controller back; killing silent-1")
        self.silent.kill()
        self.silent.wait()
        wait_until("every alert rule to fire", lambda: self.prom.fired() >= set(ALERTS), 90)
        self.end = time.time()
        self.log(f"every alert fired, {self.end - self.start:.0f} s after the start")

    def _send_garbage(self) -> None:
        """One malformed frame, as a confused peer would send (an error reply, counted)."""
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.serve.endpoint)
        sock.send(b"not json")
        sock.poll(5000)
        sock.close()
        ctx.term()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        if self.silent is not None and self.silent.poll() is None:
            self.silent.kill()
            self.silent.wait()
        if self.ddp is not None:
            try:
                self.ddp.wait(timeout=60)  # it ends by itself, 150 iterations after
            except subprocess.TimeoutExpired:
                self.ddp.kill()
                self.ddp.wait()
        if self.prom is not None:
            self.prom.stop()
        if self.serve is not None:
            self.serve.stop()


def dashboard(name: str) -> dict[str, Any]:
    """A shipped Grafana dashboard, parsed."""
    return json.loads((DASHBOARDS / name).read_text())


def substitute(expr: str, job: str, rate: str = "10s", interval: str = "5s") -> str:
    """A panel's PromQL with Grafana's variables replaced by concrete values."""
    out = expr.replace("$__rate_interval", rate).replace("$__interval", interval)
    out = out.replace("$__range", "10m")
    return re.sub(r"\$\{?job\}?", job, out)


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with queries (rows' nested panels included)."""
    out = []
    for p in board["panels"]:
        out.extend([p, *p.get("panels", [])])
    return [p for p in out if p.get("targets")]


def _legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if not fmt or fmt == "__auto":
        return expr
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def render(prom: Prometheus, job: str, start: float, end: float, out: Path) -> None:
    """Draw the per-job dashboard's main panels for ``job`` from ``prom`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = dashboard("trimtab-job.json")
    wanted = [
        "Loss, validation and LR",
        "Gradient norm and clip threshold",
        LR_PANEL,
        "Loss slope t and z-scores",
        "Knob changes by policy",
        "Rollbacks and checkpoints",
    ]
    by_title = {p["title"]: p for p in panels(board)}
    marks = {}
    for ann in board["annotations"]["list"]:
        if "expr" in ann:
            got = prom.query_range(substitute(ann["expr"], job), start, end)
            times = sorted({float(t) - start for s in got for t, _ in s["values"]})
            # A change stays inside the ``[$__interval]`` window for several steps: mark
            # its first one only.
            marks[ann["name"]] = [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 5]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    for ax, title in zip(axes.flat, wanted, strict=True):
        panel = by_title[title]
        right = [
            o["matcher"]["options"]
            for o in panel["fieldConfig"]["overrides"]
            if {"id": "custom.axisPlacement", "value": "right"} in o["properties"]
        ]
        twin = None
        for target in panel["targets"]:
            for series in prom.query_range(substitute(target["expr"], job), start, end):
                t = [float(x) - start for x, _ in series["values"]]
                y = [float(v) for _, v in series["values"]]
                label = _legend(target.get("legendFormat", ""), series["metric"], target["expr"])
                on = ax
                if any(re.fullmatch(rx, label) for rx in right):  # the panel's right axis
                    twin = twin or ax.twinx()
                    on = twin
                    if label == "lr":
                        on.set_yscale("log")
                        on.set_ylabel("lr")
                style = "--" if "bound" in label or label == "clip" else "-"
                on.plot(
                    t,
                    y,
                    style,
                    lw=1.2,
                    label=label,
                    color="black" if label == "lr" and on is twin else None,
                    drawstyle="steps-post" if "bound" in label or "lr" in label else None,
                )
        if title == LR_PANEL:
            ax.set_yscale("log")
        if title in ("Loss, validation and LR", "Gradient norm and clip threshold"):
            ax.set_yscale("log")
        if title == "Loss slope t and z-scores":
            ax.set_yscale("symlog")
        for x in marks.get("Knob changes", []):
            ax.axvline(x, color="0.8", lw=0.6, zorder=0)
        for x in marks.get("Rollbacks", []):
            ax.axvline(x, color="red", lw=1.0, alpha=0.6, zorder=0)
        for x in marks.get("Operator actions", []):
            ax.axvline(x, color="blue", lw=1.0, alpha=0.6, ls=":", zorder=0)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="upper right")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the controller started")
    fig.suptitle(
        f"trimtab / job = {job}: panels of deploy/grafana/dashboards/trimtab-job.json "
        "from a real run (red: rollbacks, grey: knob changes, blue: a person's action)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=textwrap.dedent(__doc__.split("\n\n")[0]))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "job-dashboard.png")
    args = ap.parse_args(argv)
    why = missing_binaries()
    if why:
        sys.exit(f"bench.dashboard_png: {why}")
    with tempfile.TemporaryDirectory() as tmp, Scenario(Path(tmp)) as s:
        render(s.prom, s.SPIKE, s.start, s.end, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
