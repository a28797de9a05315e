"""Sparse gradients: ``nn.Embedding(sparse=True)`` stepped by SparseAdam, SGD or Adagrad,
as torch's docs pair them. An optimizer trial: ``guard.step`` crashed the loop at its first
step (no sparse kernel for ``linalg_vector_norm``), and with ``hooks=True`` every step
logged 'trimtab step hook failed; the step goes on unguarded' with a traceback, nothing
guarded. Both ways now train as the unattached loop does, report the gradient's norm (of
its coalesced values) and clip it when a threshold is in force."""

from __future__ import annotations

import math

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

from ..integration.support import optimizer_step

V, D = 200, 8

OPTIMIZERS = {
    "sparse_adam": lambda ps: torch.optim.SparseAdam(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(V, D, sparse=True),
                                "head": torch.nn.Linear(D, 1)})


def _train(model, opt, steps: int, guard=None, hooks: bool = False) -> list[float]:
    """Train the embedding (the head stays fixed); each step's gradient norm before it."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(V, generator=g)
    norms = []
    for _ in range(steps):
        idx = torch.randint(0, V, (32,), generator=g)
        loss = (model["head"](model["emb"](idx)).squeeze(1) - target[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(float(model["emb"].weight.grad.coalesce().values().norm()))
        optimizer_step(opt, loss, guard, hooks)
    return norms


@pytest.mark.parametrize("hooks", [False, True], ids=["guard.step", "hooks"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_sparse_gradient_trains_as_unattached_and_is_reported(fake_controller, name, hooks,
                                                                caplog):
    bare = _model()
    _train(bare, OPTIMIZERS[name](list(bare["emb"].parameters())), 20)

    model = _model()
    opt = OPTIMIZERS[name](list(model["emb"].parameters()))
    guard = attach(model, opt, job=f"sparse-{name}-{hooks}", endpoint=fake_controller.endpoint,
                   report_every=5, hooks=hooks, heartbeat_s=0.05)
    with caplog.at_level("WARNING", logger="trimtab.client"):
        norms = _train(model, opt, 20, guard, hooks)
        guard.close()
    assert "step hook failed" not in caplog.text
    assert guard.global_step == 20
    assert torch.equal(model["emb"].weight, bare["emb"].weight)
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 4)
    reports = fake_controller.of_type(wire.Report)
    assert reports[0].grad_norm_mean == pytest.approx(sum(norms[:5]) / 5, rel=1e-5)
    assert all(r.grad_norm_mean is not None and math.isfinite(r.grad_norm_mean)
               for r in reports)


def test_a_sparse_gradient_is_clipped_to_the_threshold_in_force(fake_controller):
    model = _model()
    opt = torch.optim.SGD(model["emb"].parameters(), lr=0.5)
    guard = attach(model, opt, job="sparse-clip", endpoint=fake_controller.endpoint,
                   report_every=5, clip=0.01, heartbeat_s=0.05)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        float(model["emb"].weight.grad.coalesce().values().norm())))
    with guard:
        before = _train(model, opt, 10, guard)
    assert min(before) > 0.01
    assert seen == pytest.approx([0.01] * 10, rel=1e-4)
