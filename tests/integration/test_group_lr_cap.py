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

The same runs show that an absolute lr relates to the head's lr, not group 0's (the
client registers ``lr_spread``): the sweep spans the family's sane range on the head,
and a cosine configured with ``lr = 2e-3`` runs the head at 2e-3. Related to group 0's,
the sweep ran to x500, the head held at the cap (5e-3) from x5 on, 43% of the sweep;
and the cosine's multiplier was 200: the head climbed past 2e-3 to 4e-3 within 150 steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trimtab.client import attach
from trimtab.controller.scale import ScaleContext
from trimtab.protocol import wire

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFIG = """
[[policies]]
name = "lr_range_test"
config = { when = "always", sweep_steps = 60 }
"""


def _layer_decay_run(srv, job: str, steps: int) -> list[list[float]]:
    """A small AdamW run, its input layer at 1% of the head's lr (as timm's layer decay
    writes them), attached to ``srv``; each step's group lrs, after trimtab put its
    multiplier in, as a step pre-hook saw them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-5},
                             {"params": model[2].parameters(), "lr": 1e-3}],
                            weight_decay=0.0)
    x = torch.randn(512, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    guard = attach(model, opt, job=job, endpoint=srv.endpoint, report_every=5,
                   batch_size=64, checkpoint_every=20)
    ran: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: ran.append([float(g["lr"]) for g in o.param_groups]))
    with guard:
        for i in range(steps):
            b = slice((i * 64) % 512, (i * 64) % 512 + 64)
            loss = nn.functional.mse_loss(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    wait_for(lambda: srv.journal().events(job, "bye"))
    return ran


def test_the_lr_cap_holds_for_every_param_group(serve_factory, one_thread):
    srv = serve_factory(CONFIG)
    job = "layer-decay-cap"
    ran = _layer_decay_run(srv, job, 120)
    journal = srv.journal()
    assert journal.events(job, "register")[0].data["lr_spread"] == pytest.approx(100)
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


def _family_range() -> tuple[float, float]:
    facts = wire.ScaleFacts(param_count=321, group_sizes=[288, 33], optimizer="AdamW",
                            dtype="float32", device="cpu", batch_size=64)
    rng = ScaleContext.from_facts(facts).lr_range()
    assert rng is not None
    return rng


def test_the_sweep_spans_the_family_range_on_the_head(serve_factory, one_thread):
    srv = serve_factory(CONFIG)
    job = "layer-decay-sweep"
    _layer_decay_run(srv, job, 120)
    lo, hi = _family_range()
    opened = [p["detail"]["range"] for e in srv.journal().events(job, "decision")
              for p in e.data["proposals"] if (p.get("detail") or {}).get("range")]
    assert opened, "no sweep opened"
    m_lo, m_hi = opened[0]
    # The sweep's range as multipliers on the user's lr: the head (1e-3) from the family's
    # bottom to its top or 10x, the higher (related to group 0's 1e-5: x0.01 to x500,
    # the head held at the cap from x5 on).
    assert m_lo * 1e-3 == pytest.approx(lo, rel=1e-6), (m_lo, m_hi, lo, hi)
    assert m_hi == pytest.approx(max(10.0, hi / 1e-3), rel=1e-6), (m_lo, m_hi, lo, hi)


COSINE = """
[[policies]]
name = "cosine"
config = { lr = 2e-3, t_max = 100000 }
"""


def test_an_absolute_lr_is_the_heads(serve_factory, one_thread):
    srv = serve_factory(COSINE)
    ran = _layer_decay_run(srv, "layer-decay-cosine", 150)
    head = [r[1] for r in ran]
    # The cosine's reference, 2e-3, is the head's lr (related to group 0's, a multiplier
    # of 200 took the head to 4e-3 within these steps, on its way to the cap).
    assert max(head) == pytest.approx(2e-3, rel=0.01), max(head)
    assert head[-1] > 1.9e-3, head[-20:]
    assert all(r[0] == pytest.approx(r[1] / 100) for r in ran)
