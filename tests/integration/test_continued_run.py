"""A model trained to its floor and attached fresh (a fine-tune on the same data, a run
continued from weights without trimtab's state) is left alone.

With a fresh optimizer, its loss does not fall 2% over the first 20 reports, as a run
far too cold does not; but its batches spread the loss so widely that a 2% fall would not
show, so that is no evidence. A real ``trimtab serve`` with the default policies and a
real regression: before the noise bar, the range test swept it from its own LR up to x10
and rolled it back (a trial: 1.08-1.15x worse than bare at the end).

With the optimizer's state loaded too (the run continued from its own checkpoint): its LR
has run before, and the client says so at registration (``warm_start``); the range test
then looks for no evidence, as for a run met past its start. Before, such a run at its
floor was swept on noise ("the loss rose" 7% in a window of batches spread 2x) and ended
1.07x worse than bare.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from bench.nonstationary import curriculum_task
from trimtab.client import attach

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB = "continued"


def _trained(lr: float):
    """The curriculum's model trained bare to its floor on the easy data, a function
    drawing a batch's loss, and the optimizer that trained it."""
    x, y, _, model = curriculum_task()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, 8192, (32,))
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])

    first = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(1000):
        loss = batch_loss()
        first.zero_grad()
        loss.backward()
        first.step()
    return model, batch_loss, first


def _continue(srv, model, batch_loss, opt) -> list[dict]:
    """300 steps attached to ``srv``; the reports journaled."""
    torch.manual_seed(5)
    with attach(model, opt, job=JOB, endpoint=srv.endpoint) as guard:
        for _ in range(300):
            loss = batch_loss()
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            time.sleep(0.002)  # a step's time: decisions land near the report they answer
    journal = srv.journal()
    wait_for(lambda: journal.events(JOB, "bye"))
    return [e.data for e in journal.events(JOB, "report")]


def test_a_run_continued_at_its_floor_is_not_swept(serve_factory, one_thread):
    srv = serve_factory()
    model, batch_loss, _ = _trained(1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a fresh optimizer, a new run
    reports = _continue(srv, model, batch_loss, opt)[:20]
    means = [r["loss_mean"] for r in reports]
    # Flat as the range test reads it: the last three reports' mean not 2% below the
    # first three's, or the first report's lowest loss (the trial's reading: swept).
    start = min(sum(means[:3]) / 3, reports[0]["loss_min"])
    assert len(means) == 20 and sum(means[-3:]) / 3 > 0.98 * start
    journal = srv.journal()
    assert journal.events(JOB, "decision") == [] and journal.events(JOB, "rollback") == []


def test_a_run_continued_with_its_optimizer_state_is_past_its_start(serve_factory,
                                                                    one_thread):
    srv = serve_factory()
    model, batch_loss, first = _trained(3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # saved and loaded
    opt.load_state_dict(copy.deepcopy(first.state_dict()))
    means = [r["loss_mean"] for r in _continue(srv, model, batch_loss, opt)][:20]
    journal = srv.journal()
    (reg,) = journal.events(JOB, "register")
    assert reg.data["warm_start"] is True
    assert max(means[1:]) > 1.05 * means[0]  # a 5% rise of noise: "the loss rose" before
    assert journal.events(JOB, "decision") == [] and journal.events(JOB, "rollback") == []
