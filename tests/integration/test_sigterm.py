"""A run stopped with SIGTERM (a sweep pruning a trial, a scheduler ending a job) ends as a
run, not as a crash: the guard says Bye before the process dies of the signal.

A fleet trial: with the default SIGTERM action the process died without its Bye, and each
pruned trial was marked lost 30 s later and fired TrimtabJobSilent and TrimtabJobLost (49
and 41 alerts in an hour of a sweep). ``attach`` now hooks SIGTERM where nothing else
handles it: the open guards close (Bye, reason ``terminated (SIGTERM)``), and the signal's
default action then ends the process, with its usual exit status. A handler of the user's
is left alone. Real subprocesses and a real ``trimtab serve``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent("""
    import signal, sys, time
    import torch
    from trimtab.client import attach

    if sys.argv[2] == "own":  # the user's own handler: left alone
        signal.signal(signal.SIGTERM, lambda *a: (print("own handler", flush=True),
                                                  sys.exit(3)))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = attach(model, opt, job=sys.argv[3], endpoint=sys.argv[1], report_every=5,
                   heartbeat_s=0.1)
    while True:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
        if guard.global_step == 20:
            print("stepping", flush=True)
        time.sleep(0.005)
""")


@pytest.mark.parametrize("handler", ["default", "own"])
def test_sigterm_ends_the_run_with_its_bye_and_the_signals_exit_status(tmp_path, handler):
    from .support import start_serve

    srv = start_serve(tmp_path, None, None, "")
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    job = f"sigterm-{handler}"
    try:
        proc = subprocess.Popen([sys.executable, str(script), srv.endpoint, handler, job],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout.readline().strip() == "stepping"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        byes = []
        deadline = time.monotonic() + 10
        while not byes and time.monotonic() < deadline:
            byes = srv.journal().events(job, "bye")
            time.sleep(0.1)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
    if handler == "default":
        assert proc.returncode == -signal.SIGTERM, err[-2000:]
        assert [e.data["reason"] for e in byes] == ["terminated (SIGTERM)"]
    else:
        assert proc.returncode == 3 and "own handler" in out, err[-2000:]
        # Its handler ran, the process exited through Python: the guard's exit Bye.
        assert [e.data["reason"] for e in byes] == ["exit"]
