"""Weight averaging through a rollback ordered by a real ``trimtab serve``.

A run with ``ema=0.9`` reports the validation loss of its raw weights and of their average
every 10 steps. Two NaN gradients in a row make divergence_guard roll it back to a stable
checkpoint: the average comes back as it was at that checkpoint (weights, batch-norm
statistics, count), the controller drops the validations of the abandoned path and keeps
those before the checkpoint, and the average's validations reported after the restore
reach the controller's state (journaled, as a restarted controller would resume it).
"""

from __future__ import annotations

import pytest
import torch

from bench._lockstep import Lockstep
from trimtab.client import attach

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.usefixtures("one_thread")]

CONFIG = """
[[policies]]
name = "divergence_guard"

[rollback]
stable_window_steps = 20
"""

FAULT = 45
JOB = "ema-rollback"


def test_the_average_and_its_validation_survive_a_rollback(serve_factory):
    srv = serve_factory(CONFIG)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    xv = torch.randn(256, 8, generator=data)
    yv = xv[:, :1].clone()

    def val(m: torch.nn.Module) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            out = (m(xv) - yv).pow(2).mean().item()
        m.train(was)
        return out

    guard = attach(model, opt, job=JOB, endpoint=srv.endpoint, report_every=5, ema=0.9,
                   checkpoint_every=10, keep=3, heartbeat_s=0.05)
    lockstep = Lockstep(str(srv.journal_path), guard)
    at: dict[int, dict[str, torch.Tensor]] = {}  # the average when each step was first reached
    reported: list[tuple[int, float, float, int]] = []  # (step, raw, ema, rollbacks then)
    restored_ok = None
    with guard:
        for it in range(90):
            x = torch.randn(32, 8, generator=data)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if FAULT <= it and guard.rollbacks == 0:
                # Until the rollback: a whole report window of them is persistent (a shorter
                # burst would only be skipped).
                model[0].weight.grad[0, 0] = float("nan")
            rollbacks = guard.rollbacks
            guard.step(loss)
            if guard.rollbacks > rollbacks:  # this step restored a checkpoint
                back = {k: v.clone() for k, v in guard.ema_model.state_dict().items()}
                expected = at[guard.global_step]
                restored_ok = (guard.global_step, back.keys() == expected.keys()
                               and all(torch.equal(back[k], expected[k]) for k in back))
            at.setdefault(guard.global_step,
                          {k: v.clone() for k, v in guard.ema_model.state_dict().items()})
            lockstep.after_step()
            # Validate right after a report went out: it travels with the next one, 5 steps
            # on, and a rollback (ordered on a report) never falls in between.
            if guard.global_step % 10 == 0 and guard.global_step and not FAULT <= it < FAULT + 14:
                raw, avg = val(model), val(guard.ema_model)
                guard.report_validation(raw, ema=avg)
                reported.append((guard.global_step, raw, avg, guard.rollbacks))
    lockstep.close()
    assert lockstep.timeouts == 0
    journal = srv.journal()
    # The state the job ended with (saved with its bye; a report's changes are saved up to
    # state_save_s later).
    assert wait_for(lambda: journal.events(JOB, "bye"))
    (rollback,) = journal.events(JOB, "rollback")
    target = rollback.data["target"]
    assert rollback.data["reason"] == "nonfinite" and 10 <= target < FAULT
    # The average came back exactly as it was at the checkpoint.
    assert restored_ok == (target, True)
    assert int(guard.ema_model.n_averaged) == guard.global_step

    # What the controller keeps: the validations before the checkpoint, none of the path
    # rolled back from, and every one reported after the restore; each beside its raw one.
    state = journal.load_state(JOB)
    kept = [(s, v) for s, v in state["validations_ema"]]
    expected = [(s, avg) for s, _, avg, n in reported if n == 1 or s <= target]
    assert kept == [(s, pytest.approx(v)) for s, v in expected]
    after = [(s, avg) for s, _, avg, n in reported if n == 1]
    assert len(after) >= 3 and after[0][0] > target
    assert [(s, pytest.approx(r)) for s, r, _, n in reported if n == 1 or s <= target] == \
        [(s, v) for s, v in state["validations"]]
    abandoned = [s for s, _, _, n in reported if n == 0 and s > target]
    assert abandoned, "no validation was reported on the path rolled back from"
    # The average is a different model: its results are not the raw ones.
    assert any(abs(r - a) > 1e-6 for _, r, a, _ in reported)
