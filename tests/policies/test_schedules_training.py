"""Schedules on a real training run: a small MLP trained with its lr (and momentum) set at
every step boundary from the policy's decision, through the engine, the opened governor and
the client's own Actuator (the user's lr constant, trimtab's multiplier put in around each
optimizer step), against the same loop driven by torch's scheduler."""

from __future__ import annotations

import pytest
import torch

from trimtab.client._knobs import Actuator
from trimtab.client._options import _facts
from trimtab.controller.advance import advance, commit
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.policy import load_policy
from trimtab.controller.state import JobState
from trimtab.protocol import wire

from ._schedule_cases import CASES, OPENED, STEPS, Case, make_optimizer, max_rel_err, momentum_of


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(512, 1, generator=g)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _train(case: Case, steer) -> tuple[list[tuple[float, float]], list[float]]:
    """Train for STEPS minibatch steps; ``steer(model, opt)`` gives ``before(step,
    last_loss)``, run at each step boundary, and ``after()``, run after each optimizer
    step. Returns the (lr, momentum) each step used and the losses."""
    x, y = _data()
    model = _model()
    opt = make_optimizer(case.optimizer, model.parameters())
    before, after = steer(model, opt)
    trace, losses = [], []
    loss_value = None
    for t in range(STEPS):
        before(t, loss_value)
        trace.append((opt.param_groups[0]["lr"], momentum_of(opt)))
        i = (t * 64) % 512
        loss = torch.nn.functional.mse_loss(model(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        after()
        loss_value = loss.item()  # a host sync per step is fine in a test
        losses.append(loss_value)
    return trace, losses


def _by_torch(case: Case):
    def steer(model, opt):
        s = case.torch(opt) if case.torch is not None else None
        return (lambda t, loss: None), (lambda: s.step() if s is not None else None)
    return steer


def _by_trimtab(case: Case):
    """The controller's decision at every step (report_every=1), carried out the client's
    way: the command taken by the Actuator, engaged just before the optimizer step (and
    acknowledged with what that step uses), released right after it."""
    def steer(model, opt):
        facts, _ = _facts(model, opt, batch_size=64)
        act = Actuator(opt, None)
        st = JobState.from_register(wire.Register(
            job="run", run_id="r", report_every=1, facts=facts, knobs=act.used(),
            base=act.base(), scale=act.scale()))
        engine = Engine([load_policy(case.policy, case.config)], Governor(OPENED))

        def before(t: int, loss: float | None) -> None:
            if t:
                out = advance(st, wire.Report(job="run", seq=t, step=t, window=1,
                                              loss_mean=loss, knobs=act.used(), base=act.base(),
                                              scale=act.scale(), applied_seq=st.applied_seq),
                              engine)
                decision, command = out.decision, out.command
            else:  # before the first report, as at registration
                decision = engine.decide(st)
                command = commit(st, decision)
            assert not decision.errors, decision.errors
            if command is not None:
                assert not act.command(command.scale, command.knobs, command.lr_max)
                act.live.replace(command.schedules)
            act.engage(t)
            if command is not None:
                assert st.on_ack(wire.Ack(job="run", seq=command.seq, step=t,
                                          knobs=act.used(), base=act.base(),
                                          scale=act.scale()))

        def after() -> None:
            act.release()
            # The loop's own lr, untouched between steps (the user's, constant here).
            assert opt.param_groups[0]["lr"] == opt.defaults["lr"]
        return before, after
    return steer


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_real_run_trains_and_follows_torchs_schedule(case: Case):
    ours, our_losses = _train(case, _by_trimtab(case))
    theirs, their_losses = _train(case, _by_torch(case))
    lr_err, mom_err = max_rel_err(ours, theirs)
    print(f"\n{case.id} ({case.optimizer}, real run): max relative error over {STEPS} steps: "
          f"lr {lr_err:.3g}, momentum {mom_err:.3g}; loss {our_losses[0]:.3f} -> "
          f"{sum(our_losses[-20:]) / 20:.3f}")
    assert lr_err <= 1e-6 and mom_err <= 1e-6
    # It trains: the last 20 steps' loss is well under the first 20's (a quarter less at least) ...
    assert sum(our_losses[-20:]) < 0.75 * sum(our_losses[:20])
    # ... and it is the same run as torch's, step for step.
    assert our_losses == pytest.approx(their_losses, rel=1e-4, abs=1e-6)
