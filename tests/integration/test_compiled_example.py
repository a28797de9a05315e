"""examples/train_compiled_fp16.py, a torch.compile'd model (the default inductor backend)
trained with fp16 autocast, a fused AdamW and a ``GradScaler`` whose first scale is far too
large, attached to a real ``trimtab serve`` with the default policies: the scaler skips
its overflow steps, and the controller sees every report without a non-finite gradient
and neither cuts the lr nor rolls the run back for them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.scenario_policies import REPO, python_path

from .support import start_serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ITERS, REPORT_EVERY = 120, 5


def test_compiled_fp16_example_runs_attached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    srv = start_serve(tmp_path, None, None)
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "examples" / "train_compiled_fp16.py"),
             "--job", "fp16", "--endpoint", srv.endpoint, "--steps", str(ITERS),
             "--precision", "fp16", "--init-scale", str(2.0**30),
             "--report-every", str(REPORT_EVERY), "--checkpoint-every", "20"],
            capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = dict(re.findall(r"(\w+)=(\S+)", proc.stdout.splitlines()[-1]))
        journal = srv.journal()
        wait_for(lambda: journal.events("fp16", "bye"))
        events = journal.events("fp16")
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
    assert done["precision"] == "torch.float16" and done["backend"] == "inductor"
    steps, skips = int(done["global_step"]), int(done["scaler_skips"])
    assert skips >= 5 and steps + skips == ITERS  # the scaler skipped its overflow steps
    assert int(done["graph_breaks"]) == 0
    assert float(done["accuracy"]) > 0.7  # it trained
    kinds = [e.kind for e in events]
    assert kinds[0] == "register" and "bye" in kinds  # the controller heard the run
    reports = [e for e in events if e.kind == "report"]
    assert reports and reports[-1].step == steps
    assert sum(r.data["nonfinite_grads"] + r.data["skipped_steps"] for r in reports) == 0
    assert all(r.data["grad_norm_max"] is None or r.data["grad_norm_max"] < 1e3
               for r in reports)  # unscaled norms
    # No policy proposed anything; the controller's only commands mark checkpoints stable.
    assert not {"proposal", "decision", "rollback", "alert"} & set(kinds), kinds
    for command in (e for e in events if e.kind == "command"):
        assert command.data["rollback_to"] is None and command.data["mark_stable"] is not None
        assert not command.data["scale"] and not command.data["knobs"], command.data
