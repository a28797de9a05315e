"""attach(..., hooks=True): a loop that keeps calling optimizer.step(), guarded by step hooks.

Real CPU training; the end-to-end test talks to a real ``trimtab serve``.
"""

from __future__ import annotations

import copy
import logging
import time

import pytest
import torch

from trimtab.client import Guard, attach
from trimtab.protocol import wire

from ..integration.support import STEP_DECAY, Regression, start_serve, wait_for
from .test_client_step import _backward, _model, _same, _state, sync_counter  # noqa: F401

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def _attach(model, opt, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    return attach(model, opt, job="hooks", endpoint=endpoint, hooks=True, **kw)


def _hook_count(opt: torch.optim.Optimizer) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


@pytest.mark.integration
def test_plain_loop_gets_commands_applied_and_acked(tmp_path) -> None:
    srv = start_serve(tmp_path, None, None, STEP_DECAY)
    try:
        task = Regression(seed=3)
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
        guard = _attach(task.model, opt, srv.endpoint, report_every=5)
        assert wait_for(lambda: guard.connected)
        lrs = []
        for _ in range(150):  # the loop as it was, plus one observe_loss call
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.observe_loss(loss)
            opt.step()
            lrs.append(guard.knobs.lr)  # what the step ran with
            time.sleep(0.003)
        assert guard.global_step == 150
        assert guard.applied_seq > 0
        guard.close()
        assert _hook_count(opt) == 0
        opt.step()  # no longer guarded: nothing counts it
        assert guard.global_step == 150

        journal = srv.journal()
        acks = wait_for(lambda: journal.events("hooks", "ack"))
        reports = wait_for(
            lambda: (
                len(journal.events("hooks", "report")) == 30 and journal.events("hooks", "report")
            )
        )
        commands = journal.events("hooks", "command")
        # Every command was acknowledged, once, but one sent after the last report.
        seqs = [c.seq for c in commands]
        acked = list(dict.fromkeys(a.seq for a in acks))  # a resent command is re-acked
        assert acked and acked == seqs[: len(acked)]
        assert len(seqs) - len(acked) <= 1
        # The command handed over step_decay: from its step on, every step ran at its lr.
        t0 = acks[0].step
        assert lrs[t0:] == [pytest.approx(0.05 * 0.5 ** (t // 30)) for t in range(t0, 150)]
        assert min(lrs) < 0.05
        assert [r.step for r in reports] == list(range(5, 151, 5))
        assert all(r.data["loss_mean"] is not None for r in reports)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_hooked_step_equals_guard_step(dead_endpoint) -> None:
    """Same clip, same updates, same counts as guard.step() on a twin."""
    model, twin = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    hooked = _attach(model, opt, dead_endpoint, clip=0.5, report_every=3)
    plain = attach(
        twin,
        twin_opt,
        job="plain",
        endpoint=dead_endpoint,
        clip=0.5,
        report_every=3,
        heartbeat_s=0.05,
    )
    try:
        for step in range(7):
            loss = _backward(model, step)
            hooked.observe_loss(loss)
            opt.step()
            plain.step(_backward(twin, step))
            assert _same(_state(model), _state(twin)), f"step {step}"
        assert hooked.global_step == plain.global_step == 7
    finally:
        hooked.close()
        plain.close()


def test_closure_step_is_guarded_after_the_closure(dead_endpoint) -> None:
    """optimizer.step(closure): the guard clips the gradients the closure computed."""
    model, twin = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    with _attach(model, opt, dead_endpoint, clip=0.5) as guard:
        for step in range(3):
            opt.step(lambda step=step: _backward(model, step))
            _backward(twin, step)
            assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5) > 0.5
            twin_opt.step()
            assert _same(_state(model), _state(twin))
        assert guard.global_step == 3


def test_an_optimizer_that_needs_a_closure_is_refused_without_hooks(fake_controller) -> None:
    """LBFGS: ``guard.step(loss)`` would call ``step()`` without the closure it needs (a
    TypeError from torch in the middle of the loop); attach says what to do instead, before
    the job registers, and with ``hooks=True`` the loop's own ``step(closure)`` is guarded."""
    model, twin = _model(), _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    twin_opt = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=4)
    with pytest.raises(ValueError, match=r"optimizer=LBFGS is invalid with guard.step\(loss\): "
                                         r"its step\(\) needs a closure.*hooks=True"):
        attach(model, opt, job="lbfgs", endpoint=fake_controller.endpoint)
    assert _hook_count(opt) == 0
    with _attach(model, opt, fake_controller.endpoint, report_every=2) as guard:
        for step in range(4):
            opt.step(lambda step=step: _backward(model, step))
            twin_opt.step(lambda step=step: _backward(twin, step))
        assert _same(_state(model), _state(twin)) and guard.global_step == 4
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 2)
    assert fake_controller.of_type(wire.Register)[0].job == "hooks"  # not "lbfgs"


def _poison(model: torch.nn.Module, step: int) -> torch.Tensor:
    loss = _backward(model, step)
    next(model.parameters()).grad[0, 0] = float("nan")
    return loss


@pytest.mark.parametrize(
    ("make", "nonfinite", "mode"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), "auto", "skip"),
        (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), "auto", "fused"),
        (lambda ps: torch.optim.SGD(ps, lr=0.01), "zero", "zero"),
    ],
    ids=["skip", "fused", "zero"],
)
def test_nonfinite_step_leaves_the_model_alone(make, nonfinite, mode, dead_endpoint) -> None:
    model = _model()
    opt = make(model.parameters())
    with _attach(model, opt, dead_endpoint, nonfinite=nonfinite, report_every=3) as guard:
        assert guard.nonfinite_mode == mode
        for step in range(2):
            guard.observe_loss(_backward(model, step))
            opt.step()
        before, opt_before = _state(model), copy.deepcopy(opt.state_dict())
        guard.observe_loss(_poison(model, 2))
        opt.step()
        assert _same(before, _state(model))
        if mode != "zero":  # an exact skip leaves the optimizer state alone too
            for k, v in opt.state_dict()["state"][0].items():
                torch.testing.assert_close(v, opt_before["state"][0][k])
        assert not hasattr(opt, "found_inf")  # the fused route is undone after the step
        assert guard.skipped_steps == 1 and guard.global_step == 2
        guard.observe_loss(_backward(model, 3))
        opt.step()
        assert not _same(before, _state(model))
        assert guard.global_step == 3


@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_host_reads_per_step(nonfinite, sync_counter, dead_endpoint) -> None:  # noqa: F811
    """No read per step beyond the window's one copy ("skip" adds its one flag)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    per_step = []
    with _attach(model, opt, dead_endpoint, clip=1.0, report_every=4, nonfinite=nonfinite) as guard:
        for step in range(12):
            loss = _backward(model, step)
            sync_counter.clear()
            guard.observe_loss(loss)
            opt.step()
            per_step.append(dict(sync_counter))
    flag = {"item": 1} if nonfinite == "skip" else {}
    for step, reads in enumerate(per_step):
        expected = {**flag, "tolist": 1} if step % 4 == 3 else flag
        assert reads == expected, f"step {step}: {reads}"


def test_reports_without_observed_loss(fake_controller, caplog) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        with _attach(model, opt, fake_controller.endpoint, report_every=2) as guard:
            for step in range(4):
                _backward(model, step)
                opt.step()
            guard.observe_loss(_backward(model, 4))  # one step with a loss: its own window
            opt.step()
            guard.observe_loss(_backward(model, 5))
            opt.step()
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) == 3)
    reports = fake_controller.of_type(wire.Report)
    assert [r.loss_mean for r in reports[:2]] == [None, None]
    assert all(r.nonfinite_losses == 0 for r in reports)
    assert reports[2].loss_mean is not None
    warnings = [r for r in caplog.records if "observe_loss" in r.getMessage()]
    assert len(warnings) == 1


def test_observed_losses_of_one_step_are_averaged(fake_controller) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with _attach(model, opt, fake_controller.endpoint, report_every=1) as guard:
        _backward(model, 0)
        for value in (1.0, 2.0, torch.tensor(6.0)):  # e.g. three micro-batches
            guard.observe_loss(value)
        opt.step()
    fake_controller.wait_for(lambda c: c.of_type(wire.Report))
    assert fake_controller.of_type(wire.Report)[0].loss_mean == pytest.approx(3.0)


def test_misuse_is_refused(dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"hooks='yes' is invalid; allowed: True .* or False"):
        attach(model, opt, job="x", endpoint=dead_endpoint, hooks="yes")
    with _attach(model, opt, dead_endpoint) as guard:
        with pytest.raises(RuntimeError, match=r"hooks=True: the loop calls optimizer.step"):
            guard.step(_backward(model, 0))
        with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(2,\)"):
            guard.observe_loss(torch.ones(2))
        with pytest.raises(ValueError, match=r"loss='a' is invalid; allowed: a scalar tensor"):
            guard.observe_loss("a")
    with attach(model, opt, job="x", endpoint=dead_endpoint) as plain:
        with pytest.raises(RuntimeError, match=r"observe_loss\(\) needs attach\(\.\.\., hooks"):
            plain.observe_loss(1.0)


def test_rollback_restores_at_the_next_step_and_that_step_updates_nothing(
    fake_controller,
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    restored = []
    with _attach(
        model,
        opt,
        fake_controller.endpoint,
        report_every=5,
        checkpoint_every=5,
        on_rollback=restored.append,
    ) as guard:
        for step in range(12):
            guard.observe_loss(_backward(model, step))
            opt.step()
            if step == 4:
                at_five = _state(model)
        fake_controller.wait_for(lambda c: c.of_type(wire.Register))
        fake_controller.send(wire.Command(job="hooks", seq=1, mark_stable=5, rollback_to=5))
        step = 12

        def one_step() -> None:
            nonlocal step
            if not restored:
                guard.observe_loss(_backward(model, step))
                opt.step()
                step += 1

        fake_controller.wait_for(lambda c: bool(restored), while_waiting=one_step)
        assert restored == [5] and guard.global_step == 5
        assert _same(at_five, _state(model))  # the rollback's own step updated nothing
        guard.observe_loss(_backward(model, 99))
        opt.step()
        assert guard.global_step == 6 and not _same(at_five, _state(model))
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Ack)))
    ack = fake_controller.of_type(wire.Ack)[0]
    assert ack.seq == 1 and ack.restored_step == 5 and ack.error is None


class _Proxy(torch.optim.Optimizer):
    """An optimizer wrapper of the kind trimtab does not know: a ``torch.optim.Optimizer``
    subclass that skips ``Optimizer.__init__`` (so it has no step hooks of its own) and
    hands its param groups and steps to an optimizer it holds under another name."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)

    def step(self, closure=None):
        return self.inner.step(closure)


def test_an_optimizer_without_step_hooks_is_refused_before_the_job_registers(
        fake_controller) -> None:
    """A clear error, and no job left registered on the controller by the guard that
    failed to attach."""
    model = _model()
    opt = _Proxy(torch.optim.SGD(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match=r"optimizer=_Proxy is invalid with hooks=True: it "
                                         r"takes no step hooks; allowed: a torch.optim.Optimizer"):
        _attach(model, opt, fake_controller.endpoint, checkpoint_every=1)
    time.sleep(0.5)  # a registration would have come by now (heartbeat_s=0.05)
    assert fake_controller.messages == []
