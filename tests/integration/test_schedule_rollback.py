"""A rollback under each kind of user schedule, ordered by a real ``trimtab serve``.

The loop runs at trimtab's multiplier x0.8 (a policy's one decrease) when NaN gradients
(a whole report window of them) make divergence_guard roll it back: the controller cuts
from the multiplier in force at the fault (x0.4, half of x0.8), the client restores the
schedule's position with the checkpoint -- the scheduler's state, or the loop's own lr
read from ``guard.global_step`` -- and every step after the restore runs at the
schedule's own value there, times 0.4.
"""

from __future__ import annotations

import os

import pytest

from bench._lockstep import Lockstep
from bench.scenario_policies import python_path

from ..client.test_knob_model import Loop, own_lrs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.usefixtures("one_thread")]

CONFIG = """
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "divergence_guard"

[[policies]]
name = "bench.scenario_policies:Nudge"
config = { factor = 0.8 }

[governor.lr]
cooldown_steps = 1000

[rollback]
stable_window_steps = 20

# Every report judged from the first: the fault comes at step 50, inside the default health
# warm-up (20 reports of 5 steps), whose reports are no evidence for a stable mark; this
# test is about the schedule restored to a checkpoint's position, after the first one.
[rollback.health]
warmup_reports = 0
"""

FAULT = 50


@pytest.mark.parametrize("kind", ["loop", "lambda", "onecycle", "steplr"])
def test_the_cut_multiplies_the_schedule_restored_to_its_position(kind, serve_factory,
                                                                 monkeypatch):
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    srv = serve_factory(CONFIG)
    run = Loop(kind, srv.endpoint, checkpoint_every=10, keep=3)
    # In lockstep with the controller (the benchmark's harness): each command lands at the
    # step after the report that caused it, so the run's course does not hang on timing.
    lockstep = Lockstep(str(srv.journal_path), run.guard)
    own = own_lrs(kind, 60)
    with run.guard:
        for it in range(70):
            # Bad batches from FAULT on until the rollback: a whole report window of them is
            # persistent (a shorter burst is skipped, no rollback).
            run.step(poison=FAULT <= it and run.guard.rollbacks == 0)
            lockstep.after_step()
    lockstep.close()
    assert lockstep.timeouts == 0
    journal = srv.journal()
    (rollback,) = journal.events(run.guard.job, "rollback")
    target = rollback.data["target"]
    assert rollback.data["reason"] == "nonfinite" and 10 <= target < FAULT
    assert rollback.data["scale"] == {"lr": pytest.approx(0.4)}  # half of x0.8, at the fault
    # The steps that ran: up to the restore, then from the checkpoint's position on, where
    # the schedule gives its own value for that step again (the skipped NaN step moved a
    # scheduler on without moving the run: the restore puts both back in step).
    back = next(i for i in range(1, len(run.ran)) if run.ran[i][0] < run.ran[i - 1][0])
    assert run.ran[back][0] == target and run.own[back] == pytest.approx(own[target])
    for (p, lrs), mine in zip(run.ran[back:], run.own[back:], strict=True):
        assert lrs == [pytest.approx(0.4 * o, rel=1e-9) for o in mine], (kind, p)
    # Before it: the user's schedule, then x0.8 from the nudge on, until the fault.
    ratios = [lrs[0] / mine[0] for (_, lrs), mine in zip(run.ran[:back], run.own, strict=False)]
    first = ratios.index(pytest.approx(0.8))
    assert ratios[:first] == [pytest.approx(1.0)] * first and 0 < first <= 10
    assert ratios[first:] == [pytest.approx(0.8)] * (back - first)
