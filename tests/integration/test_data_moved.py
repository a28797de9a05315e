"""A loss that rises because the data moved is rolled back once, not again and again.

A regression whose target's scale grows with the loop's own iteration count (1 -> 3 over
the run, its noise growing with it, as a value loss grows with the returns): its loss
climbs while every step trains, and the health judgement's climb verdict rolls it back.
The restored checkpoint then scores as high as the run did before the rollback (the loop's
count is not rewound: the same weights meet the larger target), which no divergence of
the weights would do: the controller journals ``data_moved`` and gives the job no more
climb verdicts. Against a real ``trimtab serve`` with its default policies; the bare run
is the reference. Before: 3-4 climb rollbacks and the budget's alert in a trial (a 2-rank
FSDP2 run of this loop ended 0.089-0.113 against bare's 0.065).
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STEPS = 1500


def _run(endpoint: str | None, job: str) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    f = torch.tanh(x @ w) + 0.5 * torch.sin(x[:, :1] * 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = None if endpoint is None else attach(model, opt, job=job, endpoint=endpoint,
                                                  report_every=10)
    data = torch.Generator().manual_seed(100)
    for t in range(STEPS):
        scale = 1.0 + 2.0 * t / STEPS  # the loop's own count: a rollback does not rewind it
        idx = torch.randint(0, len(x), (64,), generator=data)
        noise = torch.randn(64, 1, generator=data)
        loss = torch.nn.functional.mse_loss(model(x[idx]), scale * (f[idx] + 0.3 * noise))
        opt.zero_grad()
        loss.backward()
        if guard is None:
            opt.step()
        else:
            guard.step(loss)
    rollbacks = 0
    if guard is not None:
        rollbacks = guard.rollbacks
        guard.close()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), 3.0 * f).item(), rollbacks


def test_a_climb_the_data_made_is_rolled_back_once(serve_factory, one_thread):
    srv = serve_factory()
    job = "moving-target"
    bare, _ = _run(None, "bare")
    final, rollbacks = _run(srv.endpoint, job)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    causes = [e.data["reason"] for e in journal.events(job, "rollback")]
    moved = journal.events(job, "data_moved")
    assert causes.count("climb") == 1 and len(moved) == 1, (causes, [e.data for e in moved])
    assert "no more climb verdicts" in moved[0].data["why"]
    assert not journal.events(job, "alert")
    # After it (in the journal's order), nothing is rolled back for the loss's rise.
    assert not [e.data["reason"] for e in journal.events(job, "rollback")
                if e.id > moved[0].id and e.data["reason"] in ("climb", "loss_spike")]
    assert final <= 1.25 * bare, (final, bare, rollbacks)
