"""Rollback across ``optimizer.add_param_group``: progressive unfreezing adds a param group in
the middle of a run, after checkpoints were taken. A rollback to such a checkpoint restores
the model and the optimizer state of the groups it knew, keeps the groups added since (their
parameters had no optimizer state then), and is acknowledged as done. A checkpoint whose
groups do not fit the optimizer any more (a group removed) restores nothing at all: the
model is not touched either, and the ack says why. Commands come from a real ZeroMQ ROUTER
on 127.0.0.1; the run is real (small) training."""

from __future__ import annotations

import copy

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

pytestmark = pytest.mark.timeout(60)

JOB = "unfreeze-test"


class Run:
    """A backbone (frozen at first, not in the optimizer) and a head trained with Adam."""

    def __init__(self, hooks: bool) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
        self.model[0].requires_grad_(False)
        self.opt = torch.optim.Adam(self.model[2].parameters(), lr=0.01)
        self.hooks = hooks
        self.ran: list[list[float]] = []  # each step's lr per group, as the optimizer ran
        self.at: dict[int, tuple[list[torch.Tensor], dict]] = {}

    def record(self) -> None:
        """After attach: a step pre-hook behind trimtab's sees what the optimizer runs with."""
        self.opt.register_step_pre_hook(
            lambda opt, a, k: self.ran.append([g["lr"] for g in opt.param_groups]))

    def unfreeze(self) -> None:
        self.model[0].requires_grad_(True)
        self.opt.add_param_group({"params": list(self.model[0].parameters()), "lr": 0.001})

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def step(self, guard) -> None:
        x = torch.randn(8, 5)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        if self.hooks:
            guard.observe_loss(loss)
            self.opt.step()
        else:
            guard.step(loss)
        self.at.setdefault(guard.global_step,
                           (self.params(), copy.deepcopy(self.opt.state_dict())))




def _ack(controller, seq: int) -> wire.Ack:
    controller.wait_for(lambda c: any(a.seq == seq for a in c.of_type(wire.Ack)))
    return next(a for a in controller.of_type(wire.Ack) if a.seq == seq)


@pytest.mark.parametrize("hooks", [False, True])
def test_rollback_to_a_checkpoint_taken_before_a_group_was_added(fake_controller,
                                                                 hooks) -> None:
    run = Run(hooks)
    with attach(run.model, run.opt, job=JOB, endpoint=fake_controller.endpoint,
                heartbeat_s=0.05, report_every=5, checkpoint_every=5, hooks=hooks) as guard:
        run.record()
        for _ in range(6):
            run.step(guard)
        fake_controller.mark_stable(guard, 5, seq=1, train=lambda: run.step(guard))
        run.unfreeze()  # the backbone becomes trainable: a second param group
        backbone_then = [p.detach().clone() for p in run.model[0].parameters()]
        for _ in range(6):
            run.step(guard)
        assert not torch.equal(run.model[0].weight, backbone_then[0])  # it trained
        fake_controller.send_until(wire.Command(job=JOB, seq=2, rollback_to=5,
                                                scale=wire.ScaleTargets(lr=0.5)),
                                   lambda c: guard.rollbacks == 1, lambda: run.step(guard))

        assert guard.global_step == 5
        params, opt_state = run.at[5]
        assert all(torch.equal(p, q) for p, q in zip(run.params(), params, strict=True))
        # The head's Adam state is the checkpoint's; the backbone had none then.
        state = run.opt.state_dict()["state"]
        assert sorted(state) == sorted(opt_state["state"]) == [0, 1]
        for i in (0, 1):
            assert torch.equal(state[i]["exp_avg"], opt_state["state"][i]["exp_avg"])
        assert all(not run.opt.state[p] for p in run.model[0].parameters())
        # The group added since is kept, with the loop's own lr.
        assert [g["lr"] for g in run.opt.param_groups] == [0.01, 0.001]

        run.step(guard)  # the first step on the restored run: both groups at x0.5
        assert run.ran[-1] == pytest.approx([0.005, 0.0005])
        assert not torch.equal(run.model[0].weight, params[0])  # the backbone trains on
        ack = _ack(fake_controller, 2)
        assert (ack.restored_step, ack.error) == (5, None)
        assert ack.scale.lr == 0.5 and ack.knobs.lr == pytest.approx(0.005)


def test_a_checkpoint_that_does_not_fit_the_groups_restores_nothing(fake_controller) -> None:
    run = Run(hooks=False)
    run.unfreeze()  # two groups from the start
    with attach(run.model, run.opt, job=JOB, endpoint=fake_controller.endpoint,
                heartbeat_s=0.05, report_every=5, checkpoint_every=5) as guard:
        for _ in range(6):
            run.step(guard)
        fake_controller.mark_stable(guard, 5, seq=1, train=lambda: run.step(guard))
        dropped = run.opt.param_groups.pop(1)  # the loop drops the backbone's group
        for p in dropped["params"]:
            run.opt.state.pop(p, None)
        run.model[0].requires_grad_(False)
        for _ in range(3):
            run.step(guard)
        before = run.params()
        fake_controller.send(wire.Command(job=JOB, seq=2, rollback_to=5,
                                          scale=wire.ScaleTargets(lr=0.5)))
        fake_controller.wait_for(lambda c: any(a.seq == 2 for a in c.of_type(wire.Ack)),
                                 while_waiting=lambda: run.step(guard))
        ack = _ack(fake_controller, 2)
        assert ack.restored_step is None and guard.rollbacks == 0
        assert "param groups" in ack.error and "nothing restored" in ack.error
        # Nothing was restored: the model moved on from where it was, not back to step 5.
        assert not all(torch.equal(p, q) for p, q in zip(run.params(), run.at[5][0],
                                                          strict=True))
        assert torch.equal(run.model[0].weight, before[0])  # frozen, untouched
        assert ack.scale.lr == 0.5  # the command's knobs still apply
