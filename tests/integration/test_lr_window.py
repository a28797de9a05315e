"""A report says the lowest and highest lr its window's steps were given, not only the
last step's: a loop that writes another lr for a few steps mid-window shows it.

Two user trials (minGPT, timm) wrote an lr 1000x for a few steps in the middle of a
report window; the divergence it caused was rolled back, but no report, journal row or
metric ever showed that lr: a report's ``knobs`` are its last step's. A real
``trimtab serve``, a real SGD run whose loop raises its own lr 3x for two steps in the
second and the last window, with ``guard.step`` and with ``hooks=True``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from trimtab.client import attach

from .support import optimizer_step, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LR = 0.01
SPIKED = {13, 14, 33, 34}  # optimizer steps 14-15 and 34-35 (0-based iterations)


def _run(srv, job: str, hooks: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    guard = attach(model, opt, job=job, endpoint=srv.endpoint, report_every=10,
                   hooks=hooks)
    for i in range(40):
        opt.param_groups[0]["lr"] = 3 * LR if i in SPIKED else LR  # the loop's own writes
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        optimizer_step(opt, loss, guard, hooks)
    # The last window's report (the guard still open) sets the metrics: read once the
    # controller has taken it (its step) -- its journal row is written just before.

    def window() -> dict[str, float] | None:
        text = srv.metrics()
        if not re.search(rf'trimtab_job_step{{job="{job}"}} 40\.0', text):
            return None
        return {b: float(v) for b, v in re.findall(
            rf'trimtab_job_lr_window{{bound="(min|max)",job="{job}"}} (\S+)', text)}

    got = wait_for(window)
    assert got == {"min": pytest.approx(LR), "max": pytest.approx(3 * LR)}
    guard.close()


@pytest.mark.parametrize("hooks", [False, True], ids=["guard.step", "hooks"])
def test_a_report_says_the_lrs_its_window_ran_with(serve_factory, hooks):
    srv = serve_factory()
    job = f"lr-window-{'hooks' if hooks else 'step'}"
    _run(srv, job, hooks)
    reports = [e.data for e in srv.journal().events(job, "report")]
    assert [r["step"] for r in reports] == [10, 20, 30, 40]
    for r in reports:
        spiked = r["step"] in (20, 40)
        # The last step's lr is the loop's usual one in every window...
        assert r["knobs"]["lr"] == pytest.approx(LR)
        # ...and the window's range shows the steps that ran at 3x.
        assert r["lr_window_min"] == pytest.approx(LR)
        assert r["lr_window_max"] == pytest.approx(3 * LR if spiked else LR)
