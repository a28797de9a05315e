"""A curriculum's next stage is no divergence: a real ``trimtab serve`` with the default
policies, a real regression whose data gets harder at step 400 (a second, sharper target
function added), its loss jumping 7x and then falling as the model adapts. Over the
health judgement's slope window that jump reads as a significant climb; before the
level-shift check, the run was rolled back 255 steps with its LR halved, into the same
harder data. Attached, it must run through untouched.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.nonstationary import curriculum_task
from trimtab.client import attach

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB = "curriculum"


def test_a_curriculum_stage_is_no_climb(serve_factory, one_thread):
    srv = serve_factory()
    x, easy, hard, model = curriculum_task()  # python -m bench.nonstationary's
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with attach(model, opt, job=JOB, endpoint=srv.endpoint) as guard:
        for i in range(1000):
            y = easy if i < 400 else hard  # the loop's own stage counter
            idx = torch.randint(0, 8192, (32,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            time.sleep(0.002)  # a step's time: decisions land near the report they answer
        rolled = guard.rollbacks
    journal = srv.journal()
    wait_for(lambda: journal.events(JOB, "bye"))
    means: dict[int, float] = {}
    for e in journal.events(JOB, "report"):  # as first reported (a rollback repeats steps)
        means.setdefault(e.step, e.data["loss_mean"])
    assert means[410] > 4 * means[400]  # the stage's jump, as reported
    assert min(v for s, v in means.items() if s > 410) < means[410]  # then adapting
    assert rolled == 0
    assert journal.events(JOB, "rollback") == [] and journal.events(JOB, "decision") == []
