"""A guard the loop dropped without ``close()``: an optuna-style sweep in one process whose
pruned trials raise out of their loops. The dropped guard is collected, says Bye and stops
its threads; later trials are ordinary runs, under the same job name too."""

from __future__ import annotations

import gc
import logging
import threading

import pytest
import torch

from trimtab.client import _guard, attach
from trimtab.protocol import wire

pytestmark = pytest.mark.timeout(60)


class Pruned(Exception):
    """What a sweep library raises to stop a trial (optuna's TrialPruned)."""


def _trial(controller, steps: int, *, job: str = "sweep", hooks: bool = False,
           seed: int = 0) -> None:
    """One trial as a sweep's objective writes it: attach, train, pruned mid-way (once the
    controller has its registration: a trial dropped before its link came up is one the
    controller never knew)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, opt, job=job, endpoint=controller.endpoint, report_every=5,
                   heartbeat_s=0.05, hooks=hooks)
    controller.wait_for(lambda c: any(r.run_id == guard.run_id for r in c.of_type(wire.Register)))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if hooks:
            guard.observe_loss(loss)
            opt.step()
        else:
            guard.step(loss)
        opt.zero_grad()
    raise Pruned


@pytest.fixture(autouse=True)
def _earlier_threads():
    """The threads earlier tests of this process left (controllers in-process, ...)."""
    _EARLIER[:] = threading.enumerate()
    yield


_EARLIER: list[threading.Thread] = []


def _threads() -> list[str]:
    """trimtab's client threads started by this test and running."""
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("trimtab-") and t not in _EARLIER)


def test_a_pruned_trials_guard_says_bye_and_the_next_trial_is_an_ordinary_run(
        fake_controller, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        with pytest.raises(Pruned):
            _trial(fake_controller, 23)
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 4)
        # The next trial, under the same job name, as a sweep's objective attaches it.
        model = torch.nn.Linear(4, 1)
        guard = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), job="sweep",
                       endpoint=fake_controller.endpoint, heartbeat_s=0.05)
    try:
        (bye,) = fake_controller.of_type(wire.Bye)
        reports = fake_controller.of_type(wire.Report)
        # The dropped run's Bye: at a step it reached (the newest it told), said to be so.
        assert bye.step >= max(r.step for r in reports) and bye.step <= 23
        assert bye.reason.startswith("abandoned: the guard was dropped without close()")
        assert "its guard was dropped without close()" in caplog.text
        # Alone in its process: not counted as a game's second player.
        assert guard.loss_trend
        fake_controller.wait_for(lambda c: c.of_type(wire.Register)[-1].run_id == guard.run_id)
        assert fake_controller.of_type(wire.Register)[-1].loss_trend is None
        assert _threads() == ["trimtab-client"]  # the new guard's only
        assert [g.job for g in _guard._OPEN.values() if not g._closed] == ["sweep"]
    finally:
        guard.close()
    assert _threads() == []


def test_a_guard_whose_optimizer_steps_on_hooks_lives_as_long_as_the_optimizer(
        fake_controller) -> None:
    """attach(..., hooks=True) without keeping the guard: the optimizer's step hooks hold
    it, and it goes on controlling while the loop steps the optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    loop = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.05)}
    attach(model, loop["opt"], job="hooked", endpoint=fake_controller.endpoint,
           report_every=5, heartbeat_s=0.05, hooks=True)  # the guard not kept
    del model
    gc.collect()
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def train() -> None:
        torch.nn.functional.mse_loss(loop["model"](x), y).backward()
        loop["opt"].step()
        loop["opt"].zero_grad()

    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 3, while_waiting=train)
    assert not fake_controller.of_type(wire.Bye)
    loop.clear()  # the loop lets go of its model and optimizer
    gc.collect()
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    for thread in _guard._ENDING:
        thread.join(5)
    assert fake_controller.of_type(wire.Bye)[0].reason.startswith("abandoned")
    assert _threads() == []


def test_trials_in_a_row_each_pruned_leave_nothing_open(fake_controller) -> None:
    for seed in range(4):
        with pytest.raises(Pruned):
            _trial(fake_controller, 12, job=f"trial-{seed}", hooks=seed % 2 == 1,
                   seed=seed)
    _guard._end_abandoned_guards()  # what the next attach does
    assert not [g for g in _guard._OPEN.values() if not g._closed]
    assert _threads() == []
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Bye)) == 4)
    assert sorted(b.job for b in fake_controller.of_type(wire.Bye)) == [
        f"trial-{s}" for s in range(4)]
