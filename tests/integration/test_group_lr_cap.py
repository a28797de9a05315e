"""The cap on the effective lr holds for every param group, not only the first.

Layer-wise LR decay (timm's ``create_optimizer_v2(..., layer_decay=0.65)``, BEiT/ViT
fine-tuning recipes) gives each layer a param group of its own, ordered from the input:
the first group runs at a small fraction of the head's lr (0.65^13 = 0.0037 for a
12-block ViT). A multiplier above 1 (the range test's sweep) may take the effective lr
only up to the cap the controller sends (``lr_max``: by default the top of the optimizer
family's sane range); measured on the first group's lr, the cap let the head run 1/0.0037
= 270x past it (a timm ViT trial: head lr 0.87 against a cap of 0.005).

A real ``trimtab serve`` with the range test forced on (``when = "always"``) sweeps a
small AdamW run whose first group runs at 1% of the head's lr; every step any group ran
with is recorded by a step pre-hook and held against the commanded cap.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trimtab.client import attach

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFIG = """
[[policies]]
name = "lr_range_test"
config = { when = "always", sweep_steps = 60 }
"""


def test_the_lr_cap_holds_for_every_param_group(serve_factory, one_thread):
    srv = serve_factory(CONFIG)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    # As timm's layer decay writes them: the input layer at 1% of the head's lr.
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-5},
                             {"params": model[2].parameters(), "lr": 1e-3}],
                            weight_decay=0.0)
    x = torch.randn(512, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    job = "layer-decay-cap"
    guard = attach(model, opt, job=job, endpoint=srv.endpoint, report_every=5,
                   batch_size=64, checkpoint_every=20)
    ran: list[list[float]] = []  # each step's group lrs, after trimtab put its multiplier in
    opt.register_step_pre_hook(lambda o, a, k: ran.append([float(g["lr"]) for g in o.param_groups]))
    with guard:
        for i in range(120):
            b = slice((i * 64) % 512, (i * 64) % 512 + 64)
            loss = nn.functional.mse_loss(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    caps = [e.data["lr_max"] for e in journal.events(job, "command") if e.data["lr_max"]]
    assert caps, "the range test swept with no cap sent"
    cap = min(caps)
    # The sweep ran far enough that the cap mattered: the uncapped multiplier (own lr 1e-5
    # against the family's top) would have taken the head past it.
    scales = [e.data["scale"].get("lr") or 1.0 for e in journal.events(job, "ack")]
    assert max(ran, key=lambda r: r[1])[1] >= 0.5 * cap, (cap, max(r[1] for r in ran), scales)
    over = [(i, r) for i, r in enumerate(ran) if max(r) > cap * (1 + 1e-9)]
    assert not over, f"{len(over)} steps ran a group past the cap {cap:g}: first {over[:3]}"
    # The groups kept their ratio (the cap lowers the multiplier, not one group).
    assert all(r[0] == pytest.approx(r[1] / 100) for r in ran)
