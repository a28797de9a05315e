"""A rollback the client cannot carry out is journaled, shown and counted as not done.

A real ``trimtab serve`` with the divergence guard and a real run whose loop drops a
param group after its checkpoints were taken (a fine-tuning loop that re-freezes a
backbone), then turns stranded (every loss non-finite). The controller orders rollbacks
to the checkpoints it holds; those taken before the drop have the dropped group, so the
client restores nothing and its ack says why, until one taken after it (step 250) is
restored. The journal says so (``restore_failed`` for those, ``restored`` only for that
one), ``trimtab jobs`` counts the one rollback done, ``trimtab decisions`` shows the failed
rows, and ``trimtab_rollback_failures_total`` counts them: nothing says a restore was in
force that the optimizer never saw.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from trimtab.client import attach
from trimtab.controller.jobs_view import JobsView

from .support import cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB = "refrozen"


def test_a_rollback_that_restores_nothing_is_not_counted_as_done(serve_factory, one_thread,
                                                                 tmp_path):
    srv = serve_factory('[[policies]]\nname = "divergence_guard"\n')
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam([{"params": model[2].parameters()},
                            {"params": model[0].parameters(), "lr": 1e-4}], lr=1e-3)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    with attach(model, opt, job=JOB, endpoint=srv.endpoint, report_every=10,
                checkpoint_every=50) as guard:
        for i in range(600):
            if i == 220:  # the loop re-freezes the backbone: its group leaves the optimizer
                dropped = opt.param_groups.pop(1)
                for p in dropped["params"]:
                    opt.state.pop(p, None)
                    p.requires_grad_(False)
            idx = torch.randint(0, 256, (32,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            guard.step(loss * float("nan") if i >= 250 else loss)  # stranded from 250
            time.sleep(0.002)  # a step's time: the commands land near the report they answer
        ran = guard.rollbacks
    journal = srv.journal()
    wait_for(lambda: journal.events(JOB, "bye"))
    ordered = journal.events(JOB, "rollback")
    failed = journal.events(JOB, "restore_failed")
    assert ordered and failed
    # Restored: only what the client says it restored (the one target taken after the
    # drop; every one before it has the dropped group).
    restored = journal.events(JOB, "restored")
    assert len(restored) == ran == len(ordered) - len(failed)
    assert all(e.data["target"] < 220 for e in failed)
    assert all(e.data["restored_step"] > 220 for e in restored)
    first = failed[0].data
    assert first["target"] == ordered[0].data["target"] and first["reason"] == "nonfinite"
    assert "param groups" in first["why"] and "nothing restored" in first["why"]
    # A failed target is never ordered again.
    targets = [e.data["target"] for e in ordered]
    assert len(set(targets)) == len(targets)
    # trimtab jobs: only the rollbacks done.
    (line,) = [ln for ln in JobsView(journal).update() if ln.job == JOB]
    assert line.rollbacks == ran
    out = cli("decisions", JOB, "--journal", str(srv.journal_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "not restored" in out.stdout
    text = srv.metrics()
    got = re.search(rf'trimtab_rollback_failures_total{{job="{JOB}"}} (\S+)', text)
    assert got and float(got.group(1)) == len(failed)
