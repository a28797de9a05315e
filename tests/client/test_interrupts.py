"""Ctrl-C anywhere in a step: what a notebook's interrupt does to a guarded loop.

A notebook trial (a real Jupyter kernel, 80 random interrupts): one that landed between
the release's clearing of its saved values and its writes made trimtab's multiplier part
of the user's own lr and momentum for good (0.05 -> 0.025 -> 0.0125; the reports' 'base'
said 0.0125); two in 100 left autograd off for the whole process (inside a measurement's
``torch.no_grad()``), and every later ``loss.backward()`` failed. Here a KeyboardInterrupt
is raised at every line the guard's step runs, one step at a time (``sys.settrace``, where a
SIGINT handler raises); after each, and a clean step, the loop is as the user left it."""

from __future__ import annotations

import dis
import os
import sys

import pytest
import torch

import trimtab.client
from trimtab.client import attach
from trimtab.client._knobs import Actuator
from trimtab.protocol import wire

from ..integration.support import optimizer_step

ROOT = os.path.dirname(trimtab.client.__file__)
_NOP = dis.opmap["NOP"]


class _InterruptAt:
    """Raise KeyboardInterrupt at the ``k``-th line event in the client's code (and in
    the grad-mode switches it enters) while active; ``fired``: whether it did."""

    def __init__(self, k: int) -> None:
        self.k, self.n, self.fired = k, 0, False

    def _local(self, frame, event, arg):
        # Not at a NOP (a ``try:`` line): a SIGINT's KeyboardInterrupt is raised where the
        # interpreter checks for signals, never there; and a NOP right inside a ``with``
        # block is outside its exception table on CPython 3.11, so an exception raised
        # there by the trace skips the block's ``__exit__`` (a lock left held), which no
        # real interrupt can do.
        if event == "line" and not self.fired and frame.f_code.co_code[frame.f_lasti] != _NOP:
            if self.n == self.k:
                self.fired = True
                raise KeyboardInterrupt
            self.n += 1
        return self._local

    def __call__(self, frame, event, arg):
        f = frame.f_code.co_filename
        if f.startswith(ROOT) or (f.endswith("grad_mode.py") and _called_by_trimtab(frame)):
            return self._local
        return None


def _interrupted(k: int, call) -> bool:
    """Run ``call()`` with a KeyboardInterrupt at its ``k``-th traced line (caught, as the
    notebook's cell ends); whether it fired (False: the call ran whole)."""
    trap = _InterruptAt(k)
    sys.settrace(trap)
    try:
        call()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return trap.fired


def _called_by_trimtab(frame) -> bool:
    """Whether a grad-mode switch was entered by the client's code (not by torch's own:
    the optimizer's step switches it too, and a bare loop shares that window)."""
    up = frame.f_back
    while up is not None and up.f_code.co_filename.endswith("grad_mode.py"):
        up = up.f_back
    return up is not None and up.f_code.co_filename.startswith(ROOT)


def _user(opt) -> tuple[float, float]:
    g = opt.param_groups[0]
    return g["lr"], g["momentum"]


def test_an_interrupt_anywhere_in_engage_or_release_leaves_the_users_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.05, momentum=0.9)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(momentum=0.8), None)
    used: list[tuple[float, float]] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(_user(o)))
    for k in range(200):
        def whole_step() -> None:
            act.engage(0)
            opt.step()
            act.release()

        if not _interrupted(k, whole_step):
            break
        act.engage(1)
        opt.step()
        act.release()
        assert used[-1] == pytest.approx((0.025, 0.8)), k
        assert _user(opt) == (0.05, 0.9), k
    else:
        raise AssertionError("the step never ran whole")


@pytest.mark.parametrize("hooks", [False, True], ids=["guard.step", "hooks"])
def test_an_interrupt_anywhere_in_a_guarded_step_leaves_the_loop_as_it_was(dead_endpoint,
                                                                            hooks):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = attach(model, opt, job=f"interrupts-{hooks}", endpoint=dead_endpoint,
                   report_every=3, checkpoint_every=4, hooks=hooks)
    used: list[tuple[float, float]] = []  # registered after the guard's own step hooks
    opt.register_step_pre_hook(lambda o, a, k: used.append(_user(o)))
    guard._act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(momentum=0.8), None)

    def step() -> None:
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        optimizer_step(opt, loss, guard, hooks)

    with guard:
        fired = 0
        for k in range(0, 700, 3):
            fired += _interrupted(k, step)
            assert torch.is_grad_enabled(), k
            step()  # the next cell goes on
            assert torch.is_grad_enabled(), k
            assert _user(opt) == (0.05, 0.9), k
            assert used[-1] == pytest.approx((0.025, 0.8)), k
        assert fired > 50


def test_a_close_interrupted_anywhere_is_finished_by_the_next(fake_controller, tmp_path):
    """A notebook trial: Ctrl-C while close() waited for its checkpoint writes left the
    guard marked closed with its link up: a second close() did nothing, no Bye was sent,
    the controller kept the job live, and a new attach under its name was refused. Now the
    next close() finishes what the interrupted one left: the Bye goes, the threads stop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fired = 0
    for k in range(0, 400, 7):
        job = f"close-{k}"
        guard = attach(model, opt, job=job, endpoint=fake_controller.endpoint, report_every=3,
                       checkpoint_every=2, checkpoint_dir=tmp_path / job, heartbeat_s=0.05)
        for _ in range(5):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        if not _interrupted(k, guard.close):
            break
        fired += 1
        guard.close()  # the cell run again
        assert not guard._transport._thread.is_alive() and not guard.connected, k
        assert _user(opt) == (0.05, 0.9), k
        fake_controller.wait_for(
            lambda c, job=job: any(b.job == job for b in c.of_type(wire.Bye)), 10)
    assert fired > 10
