"""An optimizer that reads its lr only at its first step (torch's Rprop sets each
parameter's step size from it, then adapts them on its own). An optimizer trial: trimtab
set Rprop's lr x0.01, the journal and `trimtab jobs` said 0.0001 was in force, and the
updates grew 1.94x; a rollback's LR cut was as empty. An lr multiplier is now refused for
such an optimizer, in the ack, and nothing says it is in force: the command's knobs are
refused whole, as for any knob refused (a rollback it carries is carried out before them)."""

from __future__ import annotations

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire

from ..integration.support import Regression, wait_for


def _run(fake_controller, opt_cls, **kw):
    task = Regression(seed=2)
    opt = opt_cls(task.model.parameters(), **kw)
    lrs: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    job = f"once-{opt_cls.__name__}"
    with attach(task.model, opt, job=job, endpoint=fake_controller.endpoint, report_every=5,
                heartbeat_s=0.05) as guard:
        fake_controller.wait_for(lambda c: c.of_type(wire.Register))
        fake_controller.send(wire.Command(job=job, seq=1, scale=wire.ScaleTargets(lr=0.01),
                                          knobs=wire.Knobs(clip=0.5)))
        assert wait_for(lambda: guard._transport._command is not None, 10)
        for _ in range(5):
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        fake_controller.wait_for(lambda c: c.of_type(wire.Ack))
    (ack,) = fake_controller.of_type(wire.Ack)
    return ack, lrs, guard


def test_an_lr_multiplier_is_refused_for_rprop_in_the_ack(fake_controller):
    ack, lrs, guard = _run(fake_controller, torch.optim.Rprop, lr=0.01)
    assert ack.error is not None and "Rprop reads its lr only at its first step" in ack.error
    assert ack.scale.lr == 1.0 and ack.knobs.lr == pytest.approx(0.01)
    assert lrs == [0.01] * 5 and guard.knobs.lr == pytest.approx(0.01)
    assert guard.knobs.clip is None and ack.knobs.clip is None


def test_the_same_command_is_applied_to_sgd(make_controller):
    ack, lrs, guard = _run(make_controller(), torch.optim.SGD, lr=0.1)
    assert ack.error is None and ack.scale.lr == pytest.approx(0.01)
    assert lrs == pytest.approx([0.001] * 5) and guard.knobs.clip == 0.5
