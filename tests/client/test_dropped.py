"""A guard the loop dropped without ``close()``: an optuna-style sweep in one process whose
pruned trials raise out of their loops. The dropped guard is collected, says Bye and stops
its threads; later trials are ordinary runs, under the same job name too."""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from trimtab.client import _guard, attach
from trimtab.protocol import wire

from ..integration.support import optimizer_step

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
        optimizer_step(opt, loss, guard, hooks)
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


def test_a_dropped_guard_rolled_back_says_bye_at_the_step_it_reached_not_the_highest(
        fake_controller) -> None:
    """A trial rolled back from step 20 to 5, then trained 2 steps and pruned: its Bye says
    7 (the step count rewound), not 20, the highest a report carried."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def trial() -> None:
        guard = attach(model, opt, job="rewound", endpoint=fake_controller.endpoint,
                       report_every=5, checkpoint_every=5, keep=6, heartbeat_s=0.05)

        def train() -> None:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()

        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        while guard.global_step < 5:
            train()
        fake_controller.mark_stable(guard, 5, 1, train)
        while guard.global_step < 20:
            train()
        fake_controller.wait_for(lambda c: any(r.step == 20 for r in c.of_type(wire.Report)))
        fake_controller.send_until(wire.Command(job="rewound", seq=2, rollback_to=5),
                                   lambda c: guard.global_step <= 6, train)
        while guard.global_step < 7:
            train()
        assert guard.global_step == 7
        time.sleep(0.3)  # a few heartbeats: the link reads step 7
        raise Pruned

    with pytest.raises(Pruned):
        trial()
    _guard._end_abandoned_guards()
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    assert max(r.step for r in fake_controller.of_type(wire.Report)) >= 20
    assert fake_controller.of_type(wire.Bye)[0].step == 7


def test_two_threads_attaching_one_job_name_at_once_get_one_guard_and_one_clear_refusal(
        fake_controller, monkeypatch) -> None:
    """An optuna study with n_jobs=2 under one job name: both trials passed the name check
    before either was open (the controller then refused one, 'conflict')."""
    start = _guard.Guard._start

    def slow_start(self, **kw):  # widen the window between the check and the open
        time.sleep(0.3)
        return start(self, **kw)

    monkeypatch.setattr(_guard.Guard, "_start", slow_start)
    both = threading.Barrier(2)
    out: dict[int, object] = {}

    def trial(seed: int) -> None:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        both.wait(10)
        try:
            out[seed] = attach(model, opt, job="one-name", endpoint=fake_controller.endpoint,
                               heartbeat_s=0.05)
        except ValueError as exc:
            out[seed] = exc

    threads = [threading.Thread(target=trial, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        refused = [v for v in out.values() if isinstance(v, ValueError)]
        assert len(refused) == 1 and len(out) == 2
        assert "job='one-name' is invalid; allowed: a job no open guard in this process has" \
            in str(refused[0])
        assert "f'trial-{trial.number}'" in str(refused[0])
    finally:
        for v in out.values():
            if not isinstance(v, ValueError):
                v.close()


def test_a_guard_dropped_just_before_exit_still_says_bye(fake_controller, tmp_path) -> None:
    """A careless sweep's last trial, collected by a gc.collect() right before the script
    ends: the thread ending its link was a daemon, killed at exit with the Bye unsent."""
    script = tmp_path / "last_trial.py"
    script.write_text(textwrap.dedent(f"""
        import gc, time, torch
        from trimtab.client import _guard, attach
        end = _guard._end_dropped
        def slow(*a):  # a Bye that takes a moment (checkpoint writes to finish)
            time.sleep(0.5)
            end(*a)
        _guard._end_dropped = slow
        def trial():
            model = torch.nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            guard = attach(model, opt, job="last", endpoint={fake_controller.endpoint!r},
                           heartbeat_s=0.05)
            time.sleep(0.5)
            raise RuntimeError("pruned")
        try:
            trial()
        except RuntimeError:
            pass
        gc.collect()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)), timeout_s=5.0)
    assert fake_controller.of_type(wire.Bye)[0].reason.startswith("abandoned")


@pytest.mark.parametrize("hooked", [True, False], ids=["hook_sigterm", "not-hooked"])
def test_trials_attached_by_worker_threads_say_bye_on_sigterm_once_hooked(
        fake_controller, tmp_path, hooked) -> None:
    """An optuna study with n_jobs=2 attaches from worker threads, where Python cannot set
    a signal handler: SIGTERMed, its trials said no Bye and were marked lost. With
    ``hook_sigterm()`` called from the main thread they do; without, attach says so."""
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, threading, time, torch
        import trimtab.client
        if {hooked!r}:
            assert trimtab.client.hook_sigterm()
        ready = threading.Barrier(3)
        def trial(i):
            model = torch.nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            guard = trimtab.client.attach(model, opt, job=f"trial-{{i}}",
                                          endpoint={fake_controller.endpoint!r},
                                          heartbeat_s=0.05)
            ready.wait()
            while True:
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                guard.step(loss)
                opt.zero_grad()
                time.sleep(0.01)
        for i in range(2):
            threading.Thread(target=trial, args=(i,), daemon=True).start()
        ready.wait()
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr
    if hooked:
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Bye)) == 2, timeout_s=5.0)
        assert {b.reason for b in fake_controller.of_type(wire.Bye)} == {"terminated (SIGTERM)"}
        assert "attached from a thread other than the main one" not in done.stderr
    else:
        time.sleep(1.0)
        assert not fake_controller.of_type(wire.Bye)
        assert done.stderr.count("attached from a thread other than the main one") == 1
        assert "trimtab.client.hook_sigterm()" in done.stderr
