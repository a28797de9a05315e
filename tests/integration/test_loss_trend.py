"""``attach(loss_trend=False)``: a loss that rises as the run learns is no evidence.

cleanrl's PPO, attached to a default controller, ended 5 of 5 tuned CartPole runs at a
tenth of bare's return: its value loss grows with the returns, and the range test read
that as "the loss rose" (then picked x0.002-x0.14), the health judgement as a climb (10 of
10 runs rolled back with the range test in shadow). A real ``trimtab serve`` with the
default policies; a real regression run whose reported loss grows 1% a step, as a
policy-gradient loss grows with the returns: judged and acted on by default, left alone
with ``loss_trend=False`` -- whose non-finite values are still skipped and rolled back.
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach

from .support import Regression, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _run(srv, job: str, loss_trend: bool, nan_from: int | None = None) -> None:
    task = Regression()
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    with attach(task.model, opt, job=job, endpoint=srv.endpoint, report_every=10,
                loss_trend=loss_trend, checkpoint_every=50) as guard:
        for i in range(400):
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            reported = loss.detach() * (1.0 + 0.01 * i)  # grows as the "returns" do
            if nan_from is not None and i >= nan_from:
                reported = reported * float("nan")  # stranded: every step non-finite
            guard.step(reported)


def test_a_loss_not_expected_to_fall_is_left_alone(serve_factory, one_thread):
    srv = serve_factory()
    _run(srv, "supervised", loss_trend=True)
    _run(srv, "ppo-like", loss_trend=False)
    journal = srv.journal()
    wait_for(lambda: journal.events("ppo-like", "bye") and journal.events("supervised", "bye"))
    # By default the rise is read as an LR far off: acted on.
    acted = journal.events("supervised", "decision")
    assert acted and any("rose" in str(e.data) or "climb" in str(e.data) for e in acted)
    # Registered as not expected to fall: no decision, no rollback.
    (reg,) = journal.events("ppo-like", "register")
    assert reg.data["loss_trend"] is False
    assert journal.events("ppo-like", "decision") == []
    assert journal.events("ppo-like", "rollback") == []


def test_a_loss_not_expected_to_fall_is_still_rolled_back_when_non_finite(serve_factory,
                                                                          one_thread):
    srv = serve_factory()
    _run(srv, "ppo-nan", loss_trend=False, nan_from=250)
    journal = srv.journal()
    wait_for(lambda: journal.events("ppo-nan", "bye"))
    rollbacks = journal.events("ppo-nan", "rollback")
    assert rollbacks and rollbacks[0].data["reason"] == "nonfinite"
