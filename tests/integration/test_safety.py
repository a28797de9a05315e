"""Safety first, against a real ``trimtab serve`` with its default policy set (the LR range
test's sweep included): a run whose every step is being skipped is rolled back within two
reports and trains on; a single non-finite step the guard skipped costs no rollback."""

from __future__ import annotations

import math

import pytest
import torch

from bench._lockstep import Lockstep
from trimtab.client import attach

from .support import Regression

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.usefixtures("one_thread")]

EVERY = 5


def _run(srv, job: str, steps: int, damage_at: int | None = None, nan_grad_at: int | None = None,
         lr: float = 0.02, every: int = EVERY):
    """SGD with momentum on a small regression, in lockstep with the controller. At
    ``damage_at`` the weights turn non-finite (what a blow-up leaves): every step after is
    skipped until a rollback restores them. At ``nan_grad_at`` one gradient is NaN."""
    task = Regression(seed=4)
    opt = torch.optim.SGD(task.model.parameters(), lr=lr, momentum=0.9)
    guard = attach(task.model, opt, job=job, endpoint=srv.endpoint, report_every=every,
                   heartbeat_s=0.05, checkpoint_every=20)
    lockstep = Lockstep(str(srv.journal_path), guard)
    losses = []
    with guard:
        for it in range(steps):
            if it == damage_at:
                with torch.no_grad():
                    for p in task.model.parameters():
                        p.fill_(math.nan)
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if it == nan_grad_at:
                task.model[0].weight.grad[0, 0] = math.nan
            guard.step(loss)
            lockstep.after_step()
            losses.append(loss.item())
    lockstep.close()
    assert lockstep.timeouts == 0
    return guard, losses, task


def test_a_run_whose_every_step_is_skipped_is_rolled_back_and_trains(serve_factory):
    srv = serve_factory("")  # the default policy set: the range test sweeps the first steps
    # Reports every 10 steps: the sweep opens at step 10, and every report after the damage
    # at 17 is at step 17 (no step is taken), its window reaching back before the sweep.
    guard, losses, task = _run(srv, "stranded", 200, damage_at=17, every=10)
    journal = srv.journal()
    reports = journal.events("stranded", "report")
    first_bad = next(r for r in reports if r.data["nonfinite_grads"])
    rollbacks = journal.events("stranded", "rollback")
    assert rollbacks, "a run whose every step is skipped was never rolled back"
    # Ordered within two reports of the first one with skipped steps.
    answered = [r for r in reports if first_bad.id <= r.id <= rollbacks[0].id]
    assert len(answered) <= 2, [r.step for r in answered]
    # By the guard, or by the sweep that was under way (its own end, back to its start).
    assert rollbacks[0].data["reason"] in ("nonfinite", "lr_range_test")
    assert journal.events("stranded", "restored")
    # The run trained on: it took its steps, and its loss is finite and lower than at the start
    # (of 200 iterations, 17 + 20 lost to the first rollback: the first report with skipped
    # steps could be a burst of bad batches, the second, all skipped, says it is stranded).
    assert guard.global_step > 140 and guard.rollbacks >= 1
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert all(bool(torch.isfinite(p).all()) for p in task.model.parameters())


def test_a_single_skipped_nan_costs_no_rollback(serve_factory):
    srv = serve_factory("")
    guard, losses, _ = _run(srv, "one-nan", 400, nan_grad_at=330)
    journal = srv.journal()
    bad = [r for r in journal.events("one-nan", "report") if r.data["nonfinite_grads"]]
    assert len(bad) == 1 and bad[0].data["nonfinite_grads"] == 1  # it happened, once
    assert not [e for e in journal.events("one-nan", "rollback")
                if e.data["reason"] == "nonfinite"]
    assert guard.skipped_steps == 1


def test_a_controller_started_late_takes_no_evidence_from_queued_reports(serve_factory):
    """The run trains 364 steps with no controller (its reports queue up, the oldest
    dropped), then one starts: the queued reports are journaled as stale, never observed;
    every decision and command comes from reports made after the registration, and no
    command names a checkpoint the client no longer lists."""
    import time

    from .support import free_port, wait_for

    port = free_port()
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.02, momentum=0.9)
    guard = attach(task.model, opt, job="late", endpoint=f"tcp://127.0.0.1:{port}",
                   report_every=EVERY, heartbeat_s=0.05, checkpoint_every=20)

    def step():
        xb, yb = task.batch()
        loss = task.loss(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)

    with guard:
        for _ in range(364):
            step()
        srv = serve_factory("", port=port)
        assert wait_for(lambda: guard.connected, 20)
        lockstep = Lockstep(str(srv.journal_path), guard)
        for _ in range(100):
            step()
            lockstep.after_step()
            time.sleep(0.001)
        lockstep.close()
    journal = srv.journal()
    reg = journal.events("late", "register")[-1]  # the link may have registered twice
    assert reg.step >= 364
    # Reports queued before the controller was heard, if any arrive, are stale, not evidence.
    assert all(e.data["offline"] or e.data["link"] < reg.data["link"]
               for e in journal.events("late", "stale"))
    reports = journal.events("late", "report")
    assert reports and all(r.step >= reg.step for r in reports)
    for kind in ("decision", "command"):
        assert all(e.step >= reg.step for e in journal.events("late", kind)), kind
    listed: list[int] = []
    for e in journal.events("late"):
        if e.kind == "report":
            listed = e.data["checkpoints"]
        if e.kind == "command":
            for step in (e.data["mark_stable"], e.data["rollback_to"]):
                assert step is None or step in listed, (e.data, listed)
    assert not any(r.data["offline"] for r in reports)


def test_a_start_too_low_is_told_by_its_updates_and_swept_from_its_own_lr(serve_factory):
    """The same regression at a tenth of its LR: the loss falls (no flat-loss evidence),
    but each update lines up with the next gradient, and the reports say so
    (``update_alignment``, measured by the client). The range test sweeps, from the
    multiplier in force up, never below it; at the run's own LR the same task shows none."""
    srv = serve_factory("")
    _run(srv, "cold", 200, lr=0.002)
    _run(srv, "tuned", 200, lr=0.02)
    journal = srv.journal()

    def aligned(job):
        reports = journal.events(job, "report")[10:20]
        return sorted(r.data["update_alignment"] for r in reports)[5]

    assert aligned("cold") > 0.15 > aligned("tuned"), (aligned("cold"), aligned("tuned"))
    starts = [e for e in journal.events("cold", "proposal")
              if e.data["policy"] == "lr_range_test" and "starts" in e.data["reason"]]
    assert starts and "lined up with the next gradient" in starts[0].data["reason"]
    # From the run's own LR up (to the sweep's whole steps: x0.993).
    assert starts[0].data["value"] == pytest.approx(1.0, rel=0.01)
    assert not [e for e in journal.events("tuned", "proposal")
                if e.data["policy"] == "lr_range_test"]
