"""Helpers for the integration tests: a real ``trimtab serve`` subprocess, small real tasks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from trimtab.controller.journal import Journal


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``trimtab ARGS...`` in a subprocess, as a person types it; output captured."""
    return subprocess.run([sys.executable, "-m", "trimtab.controller", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Serve:
    """A running controller: its endpoint, metrics URL, journal path and process."""

    proc: subprocess.Popen
    endpoint: str
    metrics_url: str
    journal_path: Path
    log_path: Path

    def journal(self) -> Journal:
        return Journal(str(self.journal_path))

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text()


def start_serve(tmp_path: Path, port: int | None = None, mport: int | None = None,
                config: str = "", journal: Path | None = None) -> Serve:
    """A ``trimtab serve`` subprocess, ready. A port left as None is picked here, and picked
    again if another process takes it first: :func:`free_port` hands its port back before
    the serve binds it, and on a busy machine something else can bind it in between ("cannot
    serve metrics on ...: Address already in use"). A port the caller names is used as is."""
    for attempt in range(3):
        try:
            return _start_serve(tmp_path, port or free_port(), mport or free_port(), config,
                                journal)
        except RuntimeError as e:
            said = str(e)
            named = ((mport is not None and "cannot serve metrics" in said)
                     or (port is not None and "cannot start on" in said))
            if "Address already in use" not in said or named or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_serve(tmp_path: Path, port: int, mport: int, config: str,
                 journal: Path | None) -> Serve:
    cfg = tmp_path / "trimtab.toml"
    cfg.write_text(textwrap.dedent(config))
    journal = journal or tmp_path / "journal.db"
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    logf = open(log_path, "w")  # noqa: SIM115 - handed to the subprocess
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimtab.controller", "serve",
         "--bind", f"tcp://127.0.0.1:{port}", "--metrics-port", str(mport),
         "--journal", str(journal), "--config", str(cfg), "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=logf, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"trimtab serve did not start: {line!r}\n{log_path.read_text()}")
    return Serve(proc, f"tcp://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics",
                 journal, log_path)


class Regression:
    """A small real task: noisy linear regression that converges, then plateaus."""

    def __init__(self, seed: int = 0, n: int = 512, dim: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.3 * torch.randn(n, 1, generator=g)
        self.g = g
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.Tanh(),
                                         torch.nn.Linear(32, 1))

    def batch(self, size: int = 64):
        idx = torch.randint(0, len(self.x), (size,), generator=self.g)
        return self.x[idx], self.y[idx]

    def loss(self, xb, yb):
        return torch.nn.functional.mse_loss(self.model(xb), yb)


def optimizer_step(opt, loss, guard=None, hooks: bool = False) -> None:
    """The loop's optimizer step as a user writes it: bare (``guard`` None), through
    ``guard.step(loss)``, or with ``hooks=True``: the loss handed over, then the loop's own
    ``opt.step()``."""
    if guard is None:
        opt.step()
    elif hooks:
        guard.observe_loss(loss)
        opt.step()
    else:
        guard.step(loss)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; returns it (or the last falsy)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


#: A controller config whose ``step_decay`` halves the lr every 30 steps with no cooldown:
#: its command (a live schedule) goes out as soon as a job registers.
STEP_DECAY = """
[[policies]]
name = "step_decay"
config = { step_size = 30, gamma = 0.5 }

[governor.lr]
cooldown_steps = 0
"""


def assert_applied_in_order(commands: list, applied: list[int], who: str) -> None:
    """``applied`` (the seqs a run applied, in the order it applied them) takes each of the
    journal's ``commands`` once and in order. A command may be missing in two cases only: a
    newer command superseded it before the client took it (the journal's ``supersedes``: an
    urgent rollback replaces a command still awaiting its ack, and the client keeps only the
    newest it received), or it is the last, sent when the run was about to end."""
    seqs = [c.seq for c in commands]
    assert applied == sorted(set(applied)), f"{who}: applied out of order or twice: {applied}"
    unsent = sorted(set(applied) - set(seqs))
    assert not unsent, f"{who}: applied {unsent}, never sent"
    superseded = {c.data.get("supersedes") for c in commands} - {None}
    missing = [s for s in seqs if s not in applied]
    lost = [s for s in missing if s not in superseded and s != seqs[-1]]
    assert not lost, f"{who}: commands {lost} were never applied (applied {applied}, sent {seqs})"
