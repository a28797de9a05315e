"""The whole path, for real: a training job attached to a ``trimtab serve`` subprocess."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch
import zmq

from trimtab.client import attach
from trimtab.protocol import wire

from .support import Regression, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Small windows so the plateau shows within a few hundred steps of a tiny model.
PLATEAU_ONLY = """
[[policies]]
name = "plateau"

[signals]
slope_window = 8

[governor.lr]
cooldown_steps = 40
"""

STEP_S = 0.003  # a realistic, if short, step: the controller answers within a few steps


def train(guard, task, opt, steps, stop=None):
    for _ in range(steps):
        xb, yb = task.batch()
        loss = task.loss(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
        time.sleep(STEP_S)
        if stop is not None and stop():
            break


def test_plateau_decision_reaches_the_optimizer_and_is_journaled(serve_factory):
    srv = serve_factory(PLATEAU_ONLY)
    task = Regression(seed=1)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    with attach(task.model, opt, job="plateau-e2e", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.2) as guard:
        # guard.knobs: what the last step ran with (the group holds the loop's own 0.05).
        train(guard, task, opt, 1500, stop=lambda: guard.knobs.lr < 0.05)
        lr_after = guard.knobs.lr
        step_seen = guard.global_step
        train(guard, task, opt, 10)  # let the ack go out
    assert lr_after == pytest.approx(0.025), "plateau should have halved the LR"

    journal = srv.journal()
    acked = wait_for(lambda: journal.events("plateau-e2e", "ack"))
    commands = journal.events("plateau-e2e", "command")
    decisions = journal.events("plateau-e2e", "decision")
    assert commands and decisions and acked
    first = next(c for c in commands if "lr" in c.data["scale"])  # marks may come first
    assert first.data["scale"]["lr"] == pytest.approx(0.5)
    assert any("plateau" in r for r in first.data["reasons"])
    ack = next(a for a in acked if a.seq == first.seq)
    assert ack.data["knobs"]["lr"] == pytest.approx(0.025)
    # Applied within a bounded number of steps of the report that caused it.
    assert ack.step - first.step <= 50
    assert step_seen - first.step <= 50


def test_training_survives_sigkill_and_reconnects_after_restart(serve_factory, tmp_path):
    port = free_port()
    srv = serve_factory(PLATEAU_ONLY, port=port)
    task = Regression(seed=2)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    with attach(task.model, opt, job="kill-e2e", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.2) as guard:
        train(guard, task, opt, 60)
        assert wait_for(lambda: srv.journal().events("kill-e2e", "report"))
        srv.kill()
        lr_at_kill = guard.knobs.lr
        train(guard, task, opt, 200)
        assert guard.global_step == 260
        assert guard.knobs.lr == lr_at_kill, "knobs stay at their last applied values"
        assert not guard.connected

        last_id = max(e.id for e in srv.journal().events())
        srv2 = serve_factory(PLATEAU_ONLY, port=port, journal=srv.journal_path)

        def reported_again():
            train(guard, task, opt, 5)
            return [e for e in srv2.journal().events("kill-e2e", after_id=last_id)
                    if e.kind == "report"]

        assert wait_for(reported_again, timeout=30)
        assert guard.connected
        reg = srv2.journal().events("kill-e2e", "register", after_id=last_id)
        assert reg and reg[-1].data["resumed"] == "journal"
    loss = task.loss(task.x, task.y).item()
    assert math.isfinite(loss)


def _request(sock: zmq.Socket, frame: bytes) -> wire.Message:
    sock.send(frame)
    assert sock.poll(5000), "no reply from the controller"
    return wire.decode(sock.recv())


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "")
                                            for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def test_bad_messages_get_error_replies_and_are_counted(serve_factory):
    srv = serve_factory(PLATEAU_ONLY)
    ctx = zmq.Context()
    bad = ctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(srv.endpoint)
    task = Regression(seed=3)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    report = json.loads(wire.encode(wire.Report(job="x", seq=1, step=1, window=1,
                                                knobs=wire.Knobs(lr=0.1))))
    wrong_version = dict(report, v=1)  # the protocol before the knob model
    nonfinite = json.dumps(dict(report, loss_mean=1e999)).encode()
    nan = json.dumps(dict(report, loss_mean=float("nan"))).encode()
    cases = [
        (b"\xff\x00 not json", "malformed"),
        (json.dumps(wrong_version).encode(), "version"),
        (b"{" + b" " * (wire.MAX_MESSAGE_BYTES + 10) + b"}", "oversized"),
        (nonfinite, "nonfinite"),
        (nan, "nonfinite"),
        (json.dumps(dict(report, extra_field=1)).encode(), "invalid"),
        (wire.encode(wire.Report(job="never-registered", seq=1, step=1, window=1,
                                 knobs=wire.Knobs(lr=0.1))), "unknown_job"),
    ]
    with attach(task.model, opt, job="good-neighbour", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.2) as guard:
        train(guard, task, opt, 20)
        for frame, code in cases:
            reply = _request(bad, frame)
            assert isinstance(reply, wire.Error) and reply.code == code, (code, reply)
            assert reply.detail
        before = len(srv.journal().events("good-neighbour", "report"))
        train(guard, task, opt, 40)
        assert wait_for(lambda: len(srv.journal().events("good-neighbour", "report")) > before)
        assert guard.connected
    text = srv.metrics()
    for code in ("malformed", "version", "oversized", "invalid", "unknown_job"):
        assert _metric(text, "trimtab_message_errors_total", code=code) == 1.0, code
    assert _metric(text, "trimtab_message_errors_total", code="nonfinite") == 2.0
    assert srv.proc.poll() is None
    bad.close()
    ctx.term()


def test_a_controller_restarted_with_its_journal_deleted_takes_the_job_over(serve_factory,
                                                                             tmp_path):
    """The controller dies after it cut the lr, its journal is lost, and a new one starts
    empty on the same endpoint while the run goes on: it takes the job over from the
    registration the client sends on reconnecting. The lr cut the run carries stays in
    force (the new controller starts from the values the client says are in force, and
    never sets the lr back); its commands continue the client's sequence (none is taken
    for one already applied); reports the client made while no controller was there are
    journaled as stale, never observed."""
    port = free_port()
    first = tmp_path / "first"
    first.mkdir()
    srv = serve_factory(PLATEAU_ONLY, port=port, journal=first / "journal.db")
    task = Regression(seed=1)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    with attach(task.model, opt, job="amnesia", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.05) as guard:
        train(guard, task, opt, 1500, stop=lambda: guard.knobs.lr < 0.05)
        train(guard, task, opt, 10)  # the ack goes out
        assert guard.knobs.lr == pytest.approx(0.025), "plateau should have halved the LR"
        applied = guard.applied_seq
        assert applied >= 1
        srv.kill()
        for f in first.iterdir():  # the journal is lost, WAL and all
            f.unlink()
        train(guard, task, opt, 100)  # no controller: reports queue up
        second = tmp_path / "second"
        second.mkdir()
        srv2 = serve_factory(PLATEAU_ONLY, port=port, journal=second / "journal.db")

        def reported_live():
            train(guard, task, opt, 5)
            return [e for e in srv2.journal().events("amnesia", "report")]

        assert wait_for(lambda: len(reported_live()) >= 20, timeout=60)
        train(guard, task, opt, 200)
        lr_after = guard.knobs.lr
    journal = srv2.journal()
    regs = journal.events("amnesia", "register")
    assert regs and regs[0].data["resumed"] == "new"
    # The first registration it heard (a loaded host may flap the link and register again
    # later, after the new controller's own commands).
    assert regs[0].data["applied_seq"] == applied
    reports = journal.events("amnesia", "report")
    # The new controller saw the run's lr cut as in force, from its first live report on.
    assert reports[0].data["scale"]["lr"] == pytest.approx(0.5)
    assert not any(r.data["offline"] for r in reports)
    assert all(r.step >= regs[0].step for r in reports)
    commands = journal.events("amnesia", "command")
    assert commands and all(c.seq > applied for c in commands)
    # The reports made while no controller ran arrived, and were set aside as stale.
    assert journal.events("amnesia", "stale")
    # The client's stable checkpoint, which the lost journal knew, is adopted from its
    # registration: a rollback can go back to it without waiting for a new one to prove
    # itself, or even for a report.
    adopted = [e for e in journal.events("amnesia", "stable") if e.data["source"] == "register"]
    assert adopted and adopted[0].id < reports[0].id
    assert adopted[0].step in regs[0].data["checkpoints"]
    # Nothing lifted the cut: every lr multiplier commanded is at most the one in force.
    assert all(c.data["scale"].get("lr", 0.5) <= 0.5 + 1e-12 for c in commands)
    assert lr_after <= 0.025 + 1e-12


#: A script that never calls guard.close(): its guard's finalizer says Bye at exit.
NO_CLOSE = """
import sys, torch
from trimtab.client import attach
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
hooks = sys.argv[2] == "hooks"
guard = attach(model, opt, job=sys.argv[3], endpoint=sys.argv[1], report_every=10,
               heartbeat_s=0.1, hooks=hooks)
for _ in range(23):
    loss = model(torch.randn(16, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    if hooks:
        guard.observe_loss(loss)
        opt.step()
    else:
        guard.step(loss)
print(guard.global_step, flush=True)
"""


@pytest.mark.parametrize("mode", ["step", "hooks"])
def test_a_script_that_never_closes_says_bye_at_its_last_step_with_its_last_window(
    serve_factory, mode
):
    """Without ``guard.close()`` the guard's finalizer ends the run at exit as close() would:
    the journal's bye is at the step the run ended at (not at 0, the step when it
    attached), and the last, partial window (steps 21-23) is reported."""
    srv = serve_factory("")
    job = f"noclose-{mode}"
    out = subprocess.run([sys.executable, "-c", NO_CLOSE, srv.endpoint, mode, job],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 23
    journal = srv.journal()
    (bye,) = wait_for(lambda: journal.events(job, "bye"))
    assert (bye.step, bye.data["reason"]) == (23, "exit")
    reports = journal.events(job, "report")
    assert [r.step for r in reports] == [10, 20, 23]
    assert reports[-1].data["window"] == 3
