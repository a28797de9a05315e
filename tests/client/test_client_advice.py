"""report_validation, stop advice and micro-batch statistics, against a stand-in controller."""

from __future__ import annotations

import math

import pytest
import torch

from trimtab.client import Guard, attach
from trimtab.protocol import wire

pytestmark = pytest.mark.timeout(30)


def _run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _step(model, opt, guard: Guard, micro: int = 1) -> None:
    opt.zero_grad()
    total = 0.0
    for _ in range(micro):
        x = torch.randn(8, 5)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean() / micro
        loss.backward()
        if micro > 1:
            guard.note_micro_batch()
        total += loss.item()
    guard.step(total)


def test_a_validation_goes_out_with_the_next_report_only(fake_controller) -> None:
    model, opt = _run()
    with attach(model, opt, job="adv", endpoint=fake_controller.endpoint, report_every=5,
                heartbeat_s=0.05, checkpoint_every=0) as guard:
        for _ in range(3):
            _step(model, opt, guard)
        guard.report_validation(0.5)  # replaced by the newer one below
        guard.report_validation(0.25, step=2)
        for _ in range(7):
            _step(model, opt, guard)
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 2)
        first, second = fake_controller.of_type(wire.Report)[:2]
        assert (first.validation, first.validation_step) == (0.25, 2)
        assert (second.validation, second.validation_step) == (None, None)
        guard.report_validation(1.5)  # default step: the step the host knows
        assert guard._reporter.validation == (1.5, 10)


def test_report_validation_checks_its_input() -> None:
    model, opt = _run()
    with attach(model, opt, job="adv", endpoint="tcp://127.0.0.1:1", checkpoint_every=0) as g:
        with pytest.raises(ValueError, match=r"value=tensor\(1\.\) is invalid; allowed: a Python"):
            g.report_validation(torch.tensor(1.0))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"step=-1 is invalid; allowed: None or an int >= 0"):
            g.report_validation(1.0, step=-1)
        g.report_validation(math.nan)  # dropped (a NaN would make the report invalid)
        assert g._reporter.validation is None


def test_stop_advice_sets_should_stop(fake_controller) -> None:
    model, opt = _run()
    with attach(model, opt, job="adv", endpoint=fake_controller.endpoint, report_every=5,
                heartbeat_s=0.05, checkpoint_every=0) as guard:
        assert (guard.should_stop, guard.stop_reason) == (False, None)
        _step(model, opt, guard)
        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        fake_controller.send(wire.Command(job="adv", seq=1, stop_advice="flat validation"))
        fake_controller.wait_for(lambda c: guard.applied_seq == 1,
                                 while_waiting=lambda: _step(model, opt, guard))
        assert (guard.should_stop, guard.stop_reason) == (True, "flat validation")
        assert opt.param_groups[0]["lr"] == 0.05  # advice only


def test_micro_batch_statistics_are_reported(fake_controller) -> None:
    model, opt = _run()
    with attach(model, opt, job="adv", endpoint=fake_controller.endpoint, report_every=5,
                heartbeat_s=0.05, checkpoint_every=0) as guard:
        for _ in range(5):
            _step(model, opt, guard, micro=4)
        for _ in range(5):
            _step(model, opt, guard)  # no accumulation: nothing to report
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 2)
        first, second = fake_controller.of_type(wire.Report)[:2]
        assert first.micro_batches == 4 and first.micro_sq_norm_mean > 0
        # One micro-batch's gradient (x n^2, in the accumulated gradient's units) is noisier
        # than the mean of four, so its energy is larger than the window's.
        assert first.micro_sq_norm_mean > first.grad_norm_mean ** 2
        assert (second.micro_batches, second.micro_sq_norm_mean) == (None, None)
