"""examples/train_gpt.py, a nanoGPT-style loop that writes its own lr every iteration,
accumulates gradients and clips them itself, attached to a real ``trimtab serve`` whose
policy moves the lr both ways: every ack and every report in the journal states the lr
the optimizer really ran with, step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.scenario_policies import REPO, python_path

from .support import start_serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Seesaw halves the lr multiplier at or above 1 and doubles it below: decreases and
# increases, spaced by the cooldown, on top of the loop's own warm-up and cosine.
CONFIG = """
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "bench.scenario_policies:Seesaw"

[governor.lr]
cooldown_steps = 10
"""


def _match(trace: list[dict], step: int, start: int) -> int:
    """The index of the first optimizer step at or after ``start`` that ran at ``step``."""
    return next(i for i in range(start, len(trace)) if trace[i]["step"] == step)


def test_every_ack_and_report_states_the_lr_the_optimizer_ran_with(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    srv = start_serve(tmp_path, None, None, CONFIG)
    try:
        out = tmp_path / "trace.json"
        proc = subprocess.run(
            [sys.executable, str(REPO / "examples" / "train_gpt.py"), "--job", "gpt",
             "--endpoint", srv.endpoint, "--iters", "80", "--warmup-iters", "10",
             "--eval-interval", "1000", "--report-every", "5", "--checkpoint-every", "20",
             "--trace", str(out)],
            capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trace = json.loads(out.read_text())["steps"]
        assert len(trace) == 80
        journal = srv.journal()
        acks = wait_for(lambda: journal.events("gpt", "ack"))
        reports = wait_for(lambda: len(journal.events("gpt", "report")) == 16
                           and journal.events("gpt", "report"))
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
    # Both groups ran with the loop's lr times the same multiplier at every step.
    assert all(t["lrs"][0] == t["lrs"][1] for t in trace)
    ratios = [t["lrs"][0] / t["own"] for t in trace]
    moves = [b / a for a, b in zip(ratios, ratios[1:], strict=False)]
    # The controller lowered and raised the lr relative to the loop's own, several times.
    assert sum(m < 0.99 for m in moves) >= 2 and sum(m > 1.01 for m in moves) >= 1, ratios
    assert min(ratios) < 0.99

    assert len(acks) >= 3
    i, starts = 0, []
    for ack in acks:  # each states the step that first ran with its command
        i = _match(trace, ack.step, i)
        starts.append(i)
        ran = trace[i]
        assert ack.data["knobs"]["lr"] == pytest.approx(ran["lrs"][0], rel=1e-12), ack
        assert ack.data["base"]["lr"] == pytest.approx(ran["own"], rel=1e-12), ack
    # Each command's multiplier holds, under the loop's rewrites, until the next one.
    for ack, a, b in zip(acks, starts, [*starts[1:], len(trace)], strict=True):
        m = ack.data["scale"]["lr"]
        assert [t["lrs"][0] for t in trace[a:b]] == [
            pytest.approx(t["own"] * m, rel=1e-12) for t in trace[a:b]], (ack.seq, m)
    i = 0
    for report in reports:  # each states the window's last step
        i = _match(trace, report.step - 1, i)
        ran = trace[i]
        assert report.data["knobs"]["lr"] == pytest.approx(ran["lrs"][0], rel=1e-12), report
        assert report.data["base"]["lr"] == pytest.approx(ran["own"], rel=1e-12), report
        assert ran["lrs"][0] == pytest.approx(ran["own"] * report.data["scale"]["lr"],
                                              rel=1e-12)


# Nudge asks for x0.9 at every report; the governor's defaults (bounds derived from the
# job's scale, step ratio, slew window, cooldown) are all in force.
NUDGE = """
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "bench.scenario_policies:Nudge"
config = { factor = 0.9 }

[governor.lr]
cooldown_steps = 10
"""


def test_no_bound_or_slew_limit_lifts_the_tail_of_the_users_schedule(tmp_path, monkeypatch):
    """A loop whose own cosine falls 1000x, far below the SGD family's sane range at its
    batch, under a controller that only ever lowers the lr: every step runs at or below
    the loop's own lr, the multiplier never rises, and the governor never steps in."""
    import math
    import time

    import torch

    from trimtab.client import attach

    from .support import Regression

    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    srv = start_serve(tmp_path, None, None, NUDGE)
    try:
        task = Regression(seed=2)
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
        guard = attach(task.model, opt, job="tail", endpoint=srv.endpoint, report_every=5,
                       heartbeat_s=0.05, batch_size=64)
        ran: list[tuple[float, float]] = []
        opt.register_step_pre_hook(lambda o, a, k: ran.append((o.param_groups[0]["lr"], own)))
        assert wait_for(lambda: guard.connected)
        steps = 240
        for t in range(steps):
            own = 5e-5 + (0.05 - 5e-5) * 0.5 * (1 + math.cos(math.pi * t / steps))
            opt.param_groups[0]["lr"] = own
            x, y = task.batch()
            loss = task.loss(x, y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            time.sleep(0.003)  # a step long enough for the controller to answer in a few
        guard.close()
        decisions = srv.journal().events("tail", "decision")
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
    ratios = [lr / own for lr, own in ran]
    assert max(ratios) <= 1.0 + 1e-12
    assert all(b <= a * (1 + 1e-12) for a, b in zip(ratios, ratios[1:], strict=False))
    assert ratios[-1] < 0.8  # the controller did act, all the way down the tail
    assert ran[-1][0] < 5e-5  # below the family's range, where the old bounds lifted it
    assert not [d for d in decisions
                if any(k.get("policy") == "governor" for k in d.data["knobs"].values())]
