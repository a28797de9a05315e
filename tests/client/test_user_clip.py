"""A loop that clips its own gradients before the guard sees them (nanoGPT's
``clip_grad_norm_`` under ``hooks=True``, a trainer's ``max_grad_norm``): the reports say
which steps sat at that ceiling, so that no policy reads the clip as the gradient's norm.
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

from ..integration.support import optimizer_step

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def _run(endpoint: str, clip_at, steps: int = 40, hooks: bool = True):
    """Train with the loop clipping at ``clip_at(step)`` (None: not that step); return the
    guard and, per step, the norm before the loop's clip and whether the clip acted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = attach(model, opt, job="clip", endpoint=endpoint, hooks=hooks, report_every=10,
                   heartbeat_s=0.05, checkpoint_every=0)
    seen = []
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.randn(16, 8, generator=g) * (1 + (t % 5))  # norms that vary step to step
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        limit = clip_at(t)
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        if limit is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        seen.append((norm, limit is not None and norm > limit))
        optimizer_step(opt, loss, guard, hooks)
    guard.close()
    return guard, seen


def _reports(controller, n: int) -> list[wire.Report]:
    controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= n)
    return controller.of_type(wire.Report)


@pytest.mark.parametrize("hooks", [True, False])
def test_steps_at_the_loops_own_clip_are_counted_and_the_clip_is_named(fake_controller, hooks):
    _, seen = _run(fake_controller.endpoint, lambda t: 1.0, hooks=hooks)
    reports = _reports(fake_controller, 4)
    clipped = [sum(c for _, c in seen[i * 10:(i + 1) * 10]) for i in range(4)]
    assert min(clipped) >= 3  # the test's own check that the loop's clip acted
    assert [r.user_clipped_steps for r in reports] == clipped
    assert all(r.user_clip == pytest.approx(1.0, rel=1e-5) for r in reports)
    assert all(r.grad_norm_max == pytest.approx(1.0, rel=1e-5) for r in reports)


def test_a_loop_that_does_not_clip_reports_no_ceiling(fake_controller):
    _run(fake_controller.endpoint, lambda t: None)
    reports = _reports(fake_controller, 4)
    assert [(r.user_clipped_steps, r.user_clip) for r in reports] == [(0, None)] * 4


def test_a_clip_that_acts_rarely_is_found_and_a_clip_dropped_is_forgotten(fake_controller):
    # Clipping at the 80th percentile of the norms for 20 steps, then no clipping.
    _, bare = _run(fake_controller.endpoint, lambda t: None)
    # Every message of the first run in before the second's are counted: its last reports
    # may still be on their way when close() returns.
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 4 and c.of_type(wire.Bye))
    fake_controller.messages.clear()
    cut = sorted(n for n, _ in bare[:20])[15]
    _, seen = _run(fake_controller.endpoint, lambda t: cut if t < 20 else None)
    reports = _reports(fake_controller, 4)
    acted = [sum(c for _, c in seen[i * 10:(i + 1) * 10]) for i in range(4)]
    assert acted[:2] != [0, 0] and acted[2:] == [0, 0]
    found = [r.user_clipped_steps for r in reports]
    # Once the ceiling has shown (two steps at it in two windows, or three in one), every
    # step at it counts; without a clip nothing does.
    assert found[2:] == [0, 0] and sum(found[:2]) >= max(acted[:2])
    assert reports[3].user_clip is None
