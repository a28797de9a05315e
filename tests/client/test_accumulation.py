"""Gradient accumulation, attached: reports are per optimizer step, and the loss a step
reports is the mean of its micro-batches' losses (each as the loss function returned it,
before the division by the number of micro-batches that the backward uses). Real CPU
training; reports on a real ZeroMQ ROUTER."""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

MICRO, STEPS, REPORT_EVERY = 4, 15, 5


@pytest.mark.parametrize("hooks", [False, True], ids=["guard.step", "hooks"])
def test_reports_are_per_optimizer_step_with_the_mean_micro_batch_loss(
    fake_controller, hooks: bool,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    step_losses, step_norms, first_sq = [], [], []
    with attach(model, opt, job="accum", endpoint=fake_controller.endpoint, hooks=hooks,
                report_every=REPORT_EVERY, heartbeat_s=0.05, checkpoint_every=0) as guard:
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            losses = []
            for k in range(MICRO):
                x = torch.randn(8, 8, generator=g)
                loss = torch.nn.functional.mse_loss(model(x), x @ w)
                (loss / MICRO).backward()  # the accumulated gradient is the mean's
                losses.append(loss.detach())
                if k == 0:  # the first micro-batch's own gradient, |g_1|^2
                    first_sq.append(MICRO**2 * sum(
                        p.grad.pow(2).sum() for p in model.parameters()).item())
                guard.note_micro_batch()
                if hooks:
                    guard.observe_loss(loss)  # one per micro-batch: the step reports the mean
            step_losses.append(torch.stack(losses).mean().item())
            step_norms.append(torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters()]).item())
            if hooks:
                opt.step()
            else:
                guard.step(torch.stack(losses).mean())  # the mean of the micro-batch losses
            assert guard.global_step == len(step_losses)  # optimizer steps, not micro-batches
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    reports = fake_controller.of_type(wire.Report)
    assert [(r.step, r.window) for r in reports] == [
        (n, REPORT_EVERY) for n in range(REPORT_EVERY, STEPS + 1, REPORT_EVERY)]
    for i, report in enumerate(reports):
        window = slice(i * REPORT_EVERY, (i + 1) * REPORT_EVERY)
        assert report.loss_mean == pytest.approx(
            sum(step_losses[window]) / REPORT_EVERY, rel=1e-6)
        assert report.loss_max == pytest.approx(max(step_losses[window]), rel=1e-6)
        # The norm of the accumulated gradient, as the optimizer step sees it.
        assert report.grad_norm_mean == pytest.approx(
            sum(step_norms[window]) / REPORT_EVERY, rel=1e-5)
        assert report.micro_batches == MICRO
        assert report.micro_sq_norm_mean == pytest.approx(
            sum(first_sq[window]) / REPORT_EVERY, rel=1e-4)
