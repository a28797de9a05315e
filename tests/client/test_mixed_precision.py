"""Mixed precision, attached: fp16 autocast with ``torch.amp.GradScaler`` (the recipe is
``hooks=True`` and the loop's own ``scaler.step(optimizer); scaler.update()``) and bf16
autocast with ``guard.step``. Real CPU training, reports on a real ZeroMQ ROUTER.

The scaler tests start from a huge ``init_scale`` so that the first steps overflow and the
scaler skips them, as an fp16 run does at its start and now and then after.
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

STEPS, REPORT_EVERY, CLIP = 40, 5, 0.5


def _task(seed: int = 0) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(12, 1, generator=g)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(32, 12, generator=g)
        batches.append((x, x @ w + 0.1 * torch.randn(32, 1, generator=g)))
    return model, batches


def _optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=fused)


def _fp16_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    assert out.dtype == torch.float16  # autocast really ran the layers in fp16
    return torch.nn.functional.mse_loss(out.float(), y)


def _unattached(fused: bool) -> tuple[list[torch.Tensor], list[tuple[bool, float, float]]]:
    """The loop without trimtab, clipping itself as the guard would: the final parameters,
    and per iteration (whether the scaler skipped it, the unscaled grad norm, the loss)."""
    model, batches = _task()
    opt = _optimizer(model, fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trace = []
    for x, y in batches:
        loss = _fp16_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        trace.append((scaler.get_scale() < before, norm.item(), loss.item()))
    return [p.detach().clone() for p in model.parameters()], trace


@pytest.mark.parametrize("unscale", [False, True], ids=["scaler.step", "unscale_-first"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_recipe(fake_controller, fused: bool, unscale: bool) -> None:
    """The guard clips the unscaled gradients, nothing unscales twice (the run equals the
    loop that unscales and clips itself, step for step), the scaler's skipped steps are
    neither steps, nor trimtab skips, nor non-finite gradients in the reports, and the
    reported norms are the unscaled gradients'. Whether the loop unscales first
    (``scaler.unscale_``) or leaves it to ``scaler.step`` (for a fused optimizer: to its
    kernel, the gradients still scaled when the guard sees them) makes no difference."""
    want, trace = _unattached(fused)
    skipped = sum(s for s, _, _ in trace)
    assert 3 <= skipped < STEPS - 2 * REPORT_EVERY  # overflows happened, and steps too

    model, batches = _task()
    opt = _optimizer(model, fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    with attach(model, opt, job="fp16", endpoint=fake_controller.endpoint, hooks=True,
                clip=CLIP, report_every=REPORT_EVERY, heartbeat_s=0.05,
                checkpoint_every=0) as guard:
        assert guard.nonfinite_mode == ("fused" if fused else "skip")
        for x, y in batches:  # the loop of the unattached run, less its own clipping
            loss = _fp16_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            guard.observe_loss(loss)
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    got = [p.detach() for p in model.parameters()]
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    taken = STEPS - skipped
    assert guard.global_step == taken and guard.skipped_steps == 0
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    reports = fake_controller.of_type(wire.Report)
    assert sum(r.nonfinite_grads for r in reports) == 0
    assert sum(r.skipped_steps for r in reports) == 0
    assert sum(r.nonfinite_losses for r in reports) == 0
    assert reports[-1].step == taken
    # The windows: of optimizer steps where the scaler never calls step() (non-fused), of
    # step() calls with the scaler's skips marked and left out where it does (fused).
    if fused:
        windows = [trace[i:i + REPORT_EVERY] for i in range(0, STEPS, REPORT_EVERY)]
        steps = [sum(not s for s, _, _ in w) for w in windows]
        assert [r.step for r in reports] == [sum(steps[: i + 1]) for i in range(len(steps))]
    else:
        ran = [t for t in trace if not t[0]]
        windows = [ran[i:i + REPORT_EVERY] for i in range(0, taken, REPORT_EVERY)]
        assert [r.window for r in reports] == [len(w) for w in windows]
    for report, window in zip(reports, windows, strict=True):
        norms = [n for s, n, _ in window if not s]
        if not norms:
            assert report.grad_norm_mean is None
            continue
        # Unscaled: the scaled norms are about 2**30 times larger.
        assert report.grad_norm_mean == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        assert report.grad_norm_max == pytest.approx(max(norms), rel=1e-5)
    assert max(r.grad_norm_max for r in reports if r.grad_norm_max is not None) < 1e3


def test_bf16_autocast_trains_and_reports_its_losses_and_norms(fake_controller) -> None:
    """``guard.step`` under bf16 autocast (no scaler needed): the loss falls, and every
    report states the losses and unscaled gradient norms the loop saw."""
    model, batches = _task(seed=4)
    batches = batches * 2
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses, norms = [], []
    with attach(model, opt, job="bf16", endpoint=fake_controller.endpoint,
                report_every=REPORT_EVERY, heartbeat_s=0.05, checkpoint_every=0) as guard:
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = torch.nn.functional.mse_loss(out.float(), y)
            assert out.dtype == torch.bfloat16
            opt.zero_grad(set_to_none=True)
            loss.backward()
            losses.append(loss.item())
            norms.append(torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters()]).item())
            guard.step(loss)
    assert guard.global_step == len(batches)
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    reports = fake_controller.of_type(wire.Report)
    assert [r.step for r in reports] == list(range(REPORT_EVERY, len(batches) + 1, REPORT_EVERY))
    for i, report in enumerate(reports):
        window = slice(i * REPORT_EVERY, (i + 1) * REPORT_EVERY)
        assert report.loss_mean == pytest.approx(sum(losses[window]) / REPORT_EVERY, rel=1e-6)
        assert report.grad_norm_mean == pytest.approx(sum(norms[window]) / REPORT_EVERY,
                                                      rel=1e-5)
        assert report.nonfinite_grads == report.nonfinite_losses == 0
    assert reports[-1].loss_mean < 0.5 * reports[0].loss_mean  # it trains
