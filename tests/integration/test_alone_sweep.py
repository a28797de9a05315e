"""A controller that dies during a range test's sweep leaves the run neither climbing nor
stranded.

The sweep is a live schedule the client follows step by step: an lr multiplier rising
exponentially to where runs blow up, which only the controller ends (it reads the loss
curve and rolls the run back). With the controller killed mid-sweep, a user's run went on
climbing to the sweep's top and stayed there (x10 its own lr, uncontrolled); held at the
sweep's start instead, a trial's run stayed at 1/400 of its own lr for 1,770 steps, and
jumped to the sweep's x10 when a controller came back. Now a client that hears no
controller drops the sweep and goes back to the lr in force before it; a controller back
on its journal sees a run with no sweep, ends the phase in place and journals why. A real
``trimtab serve``, SIGKILLed and restarted on its journal.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from trimtab.client import attach

from .support import Regression

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LR = 1e-3
CONFIG = """
[[policies]]
name = "lr_range_test"
config = { when = "always", sweep_steps = 2000 }
"""


class _Sweeping:
    """A small SGD run attached to ``srv`` (a heartbeat every 0.1 s), recording the lr every
    optimizer step ran with (``ran``, as the optimizer saw it)."""

    def __init__(self, srv, job: str, liveness: int) -> None:
        self.task = Regression()
        self.opt = torch.optim.SGD(self.task.model.parameters(), lr=LR)
        self.ran: list[float] = []
        self.opt.register_step_pre_hook(
            lambda o, a, k: self.ran.append(float(o.param_groups[0]["lr"])))
        self.guard = attach(self.task.model, self.opt, job=job, endpoint=srv.endpoint,
                            report_every=5, heartbeat_s=0.1, liveness=liveness)

    def step(self) -> None:
        loss = self.task.loss(*self.task.batch())
        self.opt.zero_grad()
        loss.backward()
        self.guard.step(loss)
        time.sleep(0.005)

    def until_past(self, times: float) -> float:
        """Step until the sweep has begun and risen past ``times`` its start; the start (the
        multiplier the sweep's command set)."""
        start = None
        for _ in range(3000):
            self.step()
            if start is None and self.guard._act.live.schedules:
                start = self.guard._act.lr_scale
            if start is not None and self.ran[-1] > times * start * LR:
                return start
        raise AssertionError(f"no sweep past x{times} its start: {start}, {self.ran[-5:]}")


def test_a_sweep_alone_is_dropped_for_the_lr_before_it_and_its_phase_ends_in_place(
        serve_factory, one_thread):
    srv = serve_factory(CONFIG)
    run = _Sweeping(srv, "alone-sweep", liveness=3)
    guard, ran, step = run.guard, run.ran, run.step
    with guard:
        # The sweep runs: its multiplier rises from its start, past 2x it.
        start = run.until_past(2)
        climbed = ran[-1]

        srv.kill()  # SIGKILL: no goodbye
        while guard.connected:
            step()
        for _ in range(40):
            step()
        # Alone: the sweep dropped, back at the lr before it (x1: the run's own); what the
        # guard says is what ran.
        assert ran[-20:] == pytest.approx([LR] * 20)
        assert guard.knobs.lr == pytest.approx(LR) and guard.scale.lr == pytest.approx(1.0)
        assert not guard._act.live.schedules

        back = serve_factory(CONFIG, port=int(srv.endpoint.rsplit(":", 1)[1]),
                             journal=srv.journal_path)
        assert back.endpoint == srv.endpoint
        for _ in range(3000):
            step()
            if guard.connected:
                break
        assert guard.connected
        for _ in range(20):
            step()
        # Nothing taken up again: the run stays at its own lr, and the controller ended the
        # phase in place, saying why.
        assert max(ran[-20:]) == pytest.approx(LR)
    events = back.journal().events("alone-sweep", "register")
    ended = [e for e in events if e.data.get("phase_ended")]
    assert ended and ended[-1].data["phase_ended"]["policy"] == "lr_range_test"
    assert climbed > 2 * start * LR


def test_a_sweep_under_a_stopped_controller_is_held_and_its_late_rollback_withdrawn(
        serve_factory, one_thread):
    """A re-trial: a controller SIGSTOPped mid-sweep. The client, within its liveness window,
    climbed on unwatched (x2.5 to x764 in one run: its weights went non-finite); after
    SIGCONT the controller decided on the reports queued before the stop and its planned
    rollback reached the client thousands of steps late, to a checkpoint long gone
    (restore_failed, the pick applied). Now the sweep is held three report windows past the
    last step the controller said it had seen, then dropped as the link is lost; and a late
    rollback to a checkpoint the client no longer holds is withdrawn, never sent."""
    srv = serve_factory(CONFIG)
    run = _Sweeping(srv, "stopped-sweep", liveness=5)
    guard, ran, step = run.guard, run.ran, run.step
    with guard:
        run.until_past(4)
        (schedule,) = guard._act.live.schedules
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            swept: list[float] = []  # the steps that ran the sweep (not the one dropping it)
            while guard.connected:
                step()
                if guard._act.live.schedules:
                    swept.append(ran[-1])
            seen = guard._transport.controller_step
            # Never past the schedule's value three windows after the step seen.
            assert swept and max(swept) <= LR * schedule.value(seen + 15) * (1 + 1e-9), (
                seen, swept)
            assert guard._act.held_steps > 0
            for _ in range(400):  # the ring moves past every checkpoint of the sweep
                step()
            assert max(ran[-20:]) == pytest.approx(LR)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        for _ in range(3000):
            step()
            if guard.connected:
                break
        assert guard.connected
        for _ in range(100):
            step()
        assert max(ran[-20:]) == pytest.approx(LR)
    journal = srv.journal()
    assert journal.events("stopped-sweep", "restore_failed") == []
    for row in journal.events("stopped-sweep", "withdrawn"):
        assert "no longer holds" in row.data["why"]
