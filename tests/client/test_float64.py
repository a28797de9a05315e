"""A model in float64 (``model.double()``: pytorch/examples' time_sequence_prediction, many
scientific loops). An examples trial: ``guard.step`` crashed the loop at its first step
(``_foreach_norm(..., dtype=float32)`` refuses to narrow float64 gradients), and with
``hooks=True`` every step logged 'trimtab step hook failed; the step goes on unguarded'
with a traceback while the controller heard nothing. Both ways now train as the
unattached loop does, with reports of the gradient norms."""

from __future__ import annotations

import math

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

from ..integration.support import optimizer_step


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).double()


def _train(model, opt, steps: int, guard=None, hooks: bool = False) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, dtype=torch.float64, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        optimizer_step(opt, loss, guard, hooks)


@pytest.mark.parametrize("hooks", [False, True], ids=["guard.step", "hooks"])
def test_a_float64_model_trains_as_unattached_and_is_reported(fake_controller, hooks, caplog):
    bare = _model()
    _train(bare, torch.optim.SGD(bare.parameters(), lr=0.05, momentum=0.9), 20)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, opt, job=f"f64-{hooks}", endpoint=fake_controller.endpoint,
                   report_every=5, hooks=hooks, heartbeat_s=0.05)
    with caplog.at_level("WARNING", logger="trimtab.client"):
        _train(model, opt, 20, guard, hooks)
        guard.close()
    assert "step hook failed" not in caplog.text
    assert guard.global_step == 20
    for p, q in zip(model.parameters(), bare.parameters(), strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 4)
    norms = [r.grad_norm_mean for r in fake_controller.of_type(wire.Report)]
    assert all(n is not None and math.isfinite(n) and n > 0 for n in norms)
