"""accelerate's loops (``accelerator.prepare`` and ``accelerator.accumulate``), attached
either way: ``hooks=True`` on the ``AcceleratedOptimizer`` the loop steps, or
``guard.step(loss)`` in its place. Real CPU training; reports on a real ZeroMQ ROUTER."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

accelerate = pytest.importorskip("accelerate", reason="the hf extra is not installed")

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

MICRO, STEPS, REPORT_EVERY, CLIP = 4, 12, 4, 0.5


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps its state (the accumulation steps among it) in process-wide
    singletons: each test gets its own."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _prepared():
    """A tiny regression model, its SGD and a loader through ``accelerator.prepare``, with
    ``MICRO`` micro-batches per optimizer step."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=MICRO, cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(MICRO * STEPS * 8, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    return accelerator, model, opt, loader


def _run(accelerator, model, opt, loader, step) -> tuple[list[float], list[float]]:
    """The loop of accelerate's examples; ``step(loss)`` in place of ``opt.step()``. The
    mean micro-batch loss and the accumulated gradient's norm of each optimizer step."""
    step_losses, step_norms, losses = [], [], []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # divides by the accumulation steps
            losses.append(loss.item())
            if accelerator.sync_gradients:
                step_losses.append(sum(losses) / len(losses))
                step_norms.append(torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters()]).item())
                losses = []
            step(loss)
            opt.zero_grad()
    return step_losses, step_norms


def _check_reports(reports: list[wire.Report], step_losses: list[float],
                   step_norms: list[float]) -> None:
    """One report per ``REPORT_EVERY`` optimizer steps, with the mean micro-batch loss and
    the norm of the accumulated gradient."""
    assert [(r.step, r.window) for r in reports] == [
        (n, REPORT_EVERY) for n in range(REPORT_EVERY, STEPS + 1, REPORT_EVERY)]
    for i, report in enumerate(reports):
        window = slice(i * REPORT_EVERY, (i + 1) * REPORT_EVERY)
        assert report.loss_mean == pytest.approx(
            sum(step_losses[window]) / REPORT_EVERY, rel=1e-5)
        assert report.grad_norm_mean == pytest.approx(
            sum(step_norms[window]) / REPORT_EVERY, rel=1e-5)


def _count_updates(opt) -> list[int]:
    """A list that grows by one at each step the torch optimizer under accelerate's
    wrapper takes (a step post-hook of the test's own)."""
    updates: list[int] = []
    opt.optimizer.register_step_post_hook(lambda o, a, k: updates.append(1))
    return updates


def test_hooks_go_on_the_torch_optimizer_under_accelerates_wrapper(fake_controller) -> None:
    """``attach(model, optimizer, hooks=True)`` with what ``accelerator.prepare`` returned:
    the hooks fire at the steps the wrapper takes (it skips the micro-batches), a step
    reports the mean of its micro-batches' observed losses, and close() takes them off."""
    accelerator, model, opt, loader = _prepared()
    updates = _count_updates(opt)
    guard = attach(model, opt, job="accel", endpoint=fake_controller.endpoint, hooks=True,
                   report_every=REPORT_EVERY, heartbeat_s=0.05, checkpoint_every=0)

    def step(loss: torch.Tensor) -> None:
        guard.observe_loss(loss)
        opt.step()

    step_losses, step_norms = _run(accelerator, model, opt, loader, step)
    guard.close()
    assert len(updates) == guard.global_step == STEPS
    assert guard.optimizer is opt.optimizer
    assert len(opt.optimizer._optimizer_step_pre_hooks) == 0  # one left: the test's own
    assert len(opt.optimizer._optimizer_step_post_hooks) == 1
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    _check_reports(fake_controller.of_type(wire.Report), step_losses, step_norms)
    assert fake_controller.of_type(wire.Register)[0].facts.optimizer == "SGD"


def test_guard_step_inside_accumulate_steps_only_where_accelerate_syncs(fake_controller) -> None:
    """``guard.step(loss)`` at every micro-batch, in place of the wrapper's ``step()``: a
    micro-batch whose gradients are not synced is only a micro-batch (its loss joins the
    step's mean; no step, no count, no clip, no snapshot), so ``global_step`` counts the
    optimizer's real steps and the clip acts on the accumulated gradient alone, as
    ``accelerator.clip_grad_norm_`` at the sync step does in the unattached loop."""
    accelerator, model, opt, loader = _prepared()

    def clipped(loss: torch.Tensor) -> None:
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()

    _run(accelerator, model, opt, loader, clipped)
    expected = [p.detach().clone() for p in model.parameters()]
    accelerate.state.GradientState._reset_state()

    accelerator, model, opt, loader = _prepared()
    updates = _count_updates(opt)
    guard = attach(model, opt, job="accel", endpoint=fake_controller.endpoint, clip=CLIP,
                   report_every=REPORT_EVERY, heartbeat_s=0.05, checkpoint_every=REPORT_EVERY,
                   keep=4)
    step_losses, step_norms = _run(accelerator, model, opt, loader, guard.step)
    assert len(updates) == guard.global_step == STEPS
    assert guard.checkpoints == list(range(0, STEPS + 1, REPORT_EVERY))
    guard.close()
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    _check_reports(fake_controller.of_type(wire.Report), step_losses, step_norms)


def test_guard_step_refuses_a_wrapper_that_holds_a_grad_scaler(dead_endpoint) -> None:
    """fp16 under accelerate: its wrapper steps through a ``GradScaler``, which
    ``guard.step`` would bypass (scaled norms, overflow steps taken); hooks=True is the way."""
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # the state the wrapper reads
    model = torch.nn.Linear(4, 1)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"optimizer=AcceleratedOptimizer holding a GradScaler "
                                         r"is invalid with guard.step\(loss\); allowed: "
                                         r"attach\(\.\.\., hooks=True\)"):
        attach(model, opt, job="accel", endpoint=dead_endpoint)
    with attach(model, opt, job="accel", endpoint=dead_endpoint, hooks=True) as guard:
        assert guard.optimizer is opt.optimizer
