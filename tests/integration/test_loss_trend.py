"""A loss that rises as the run learns is no evidence: under updates that each go
downhill by default, and under any with ``attach(loss_trend=False)``.

cleanrl's PPO, attached to a default controller, ended 5 of 5 tuned CartPole runs at a
tenth of bare's return: its value loss grows with the returns, and the range test read
that as "the loss rose" (then picked x0.002-x0.14), the health judgement as a climb (10 of
10 runs rolled back with the range test in shadow). Its updates lined up with the next
gradient all along (median ``cos(g, -update)`` +0.2): every step went downhill, the loss
rose anyway. A real ``trimtab serve`` with the default policies; a real regression run
whose reported loss grows 1% a step, as a policy-gradient loss grows with the returns:

* trained from scratch at a low LR, its updates line up: the rise is left alone;
* at its noise floor (trained first, bare), its updates spread around 0: the same rise
  reads as an LR far off and is acted on, unless it is registered with
  ``loss_trend=False`` -- whose non-finite values are still skipped and rolled back.

The range test's update-ratio gate (``rise_update_ratio``: a rise under updates this
small, 0.007-0.013 here, is no evidence either) is set off in these serves, so that what
is tested is the alignment check and the flag; the gate's own tests are in
tests/policies/test_lr_range_test.py and ``python -m bench.plateau``.
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach

from .support import Regression, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The default policies, with the range test's update-ratio gate off (TOML has no null).
_GATE_OFF = """
[[policies]]
name = "divergence_guard"

[[policies]]
name = "lr_range_test"
config = { rise_update_ratio = 1e-12 }
"""


def _run(srv, job: str, loss_trend: bool = True, nan_from: int | None = None,
         lr: float = 1e-3, trained: int = 0) -> None:
    task = Regression()
    if trained:  # bare, before attaching: to its noise floor
        first = torch.optim.Adam(task.model.parameters(), lr=lr)
        for _ in range(trained):
            loss = task.loss(*task.batch())
            first.zero_grad()
            loss.backward()
            first.step()
    # A fresh optimizer: one that had stepped registers a warm start, and the range test
    # looks for no evidence in a run past its start.
    opt = torch.optim.Adam(task.model.parameters(), lr=lr)
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


def _alignments(journal, job: str) -> list[float]:
    return [e.data["update_alignment"] for e in journal.events(job, "report")
            if e.data.get("update_alignment") is not None]


def _acted(journal, job: str) -> bool:
    return any("rose" in str(e.data) or "climb" in str(e.data)
               for e in journal.events(job, "decision"))


def test_a_rise_under_updates_that_each_go_downhill_is_left_alone(serve_factory,
                                                                 one_thread):
    srv = serve_factory(_GATE_OFF)
    _run(srv, "descending")  # from scratch at 1e-3: every update lines up
    _run(srv, "at-floor", lr=1e-2, trained=200)
    journal = srv.journal()
    wait_for(lambda: journal.events("descending", "bye") and journal.events("at-floor", "bye"))
    early = _alignments(journal, "descending")[:20]
    assert len(early) >= 15 and min(early) > 0.15
    assert journal.events("descending", "decision") == []
    assert journal.events("descending", "rollback") == []
    # The same rise at the noise floor, updates spread around 0: an LR far off, acted on.
    assert sum(1 for a in _alignments(journal, "at-floor")[:10] if a <= 0) >= 3
    assert _acted(journal, "at-floor")


def test_a_loss_not_expected_to_fall_is_left_alone(serve_factory, one_thread):
    srv = serve_factory(_GATE_OFF)
    _run(srv, "ppo-like", loss_trend=False, lr=1e-2, trained=200)
    journal = srv.journal()
    wait_for(lambda: journal.events("ppo-like", "bye"))
    # Registered as not expected to fall: no decision, no rollback (the same run without
    # the flag is acted on: the test above).
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
