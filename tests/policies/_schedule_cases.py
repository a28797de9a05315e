"""Shared by the schedule tests: each schedule policy paired with its torch scheduler,
and the two ways of driving them step by step (trimtab's engine, torch's scheduler).

The knob model: the user's lr is ``LR`` and stays constant; a trimtab schedule proposes a
multiplier on it, which the client's Actuator puts in around each optimizer step. So the
lr the optimizer uses under trimtab (the *effective* lr) is what torch's scheduler gives
from ``LR``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler as sched

from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.controller.policy import Policy, load_policy
from trimtab.controller.state import JobState
from trimtab.protocol import wire

from .simclient import Client

STEPS = 300
LR = 0.1

#: Every limit off: bounds [0, inf), zero allowed, no step ratio, slew, cooldown,
#: deadband or hysteresis: the engine commands exactly what the schedule proposes.
_OPEN = KnobLimits(allow_zero=True)
OPENED = GovernorConfig(lr=_OPEN, momentum=_OPEN, weight_decay=_OPEN, clip=_OPEN)


@dataclass(frozen=True)
class Case:
    """A schedule policy, its config, and the torch scheduler it must match."""

    id: str
    policy: str
    config: dict[str, Any]
    #: Builds the torch scheduler on an optimizer (None: no scheduler, the lr is constant).
    torch: Callable[[torch.optim.Optimizer], Any] | None
    optimizer: str = "SGD"


def _lambda(fn: Callable[[int], float]) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda opt: sched.LambdaLR(opt, fn)


CASES = [
    Case("constant", "constant", {}, None),
    Case("constant-factor", "constant", {"factor": 0.5, "total_iters": 50},
         lambda o: sched.ConstantLR(o, factor=0.5, total_iters=50)),
    Case("step", "step_decay", {"step_size": 60, "gamma": 0.5},
         lambda o: sched.StepLR(o, step_size=60, gamma=0.5)),
    Case("linear-decay", "linear", {"total_iters": 200, "end_factor": 0.05},
         lambda o: sched.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=200)),
    Case("linear-ramp", "linear", {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 80},
         lambda o: sched.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=80)),
    Case("cosine", "cosine", {"t_max": 200, "eta_min": 1e-3},
         lambda o: sched.CosineAnnealingLR(o, T_max=200, eta_min=1e-3)),
    Case("cosine-adamw", "cosine", {"t_max": STEPS},
         lambda o: sched.CosineAnnealingLR(o, T_max=STEPS), optimizer="AdamW"),
    Case("inverse-sqrt", "inverse_sqrt", {"warmup_steps": 50},
         _lambda(lambda t: min((t + 1) / 50, (50 / (t + 1)) ** 0.5)), optimizer="Adam"),
    Case("warmup", "warmup", {"warmup_steps": 50, "start_factor": 0.1},
         _lambda(lambda t: 0.1 + 0.9 * min(t, 50) / 50)),
    Case("warmup-linearlr", "warmup", {"warmup_steps": 50, "start_factor": 0.1},
         lambda o: sched.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=50)),
    Case("one-cycle-sgd", "one_cycle", {"total_steps": STEPS},
         lambda o: sched.OneCycleLR(o, max_lr=LR, total_steps=STEPS)),
    Case("one-cycle-sgd-linear-3phase", "one_cycle",
         {"total_steps": STEPS, "anneal_strategy": "linear", "three_phase": True,
          "pct_start": 0.25},
         lambda o: sched.OneCycleLR(o, max_lr=LR, total_steps=STEPS, anneal_strategy="linear",
                                    three_phase=True, pct_start=0.25)),
    Case("one-cycle-adamw", "one_cycle",
         {"total_steps": STEPS, "div_factor": 10.0, "final_div_factor": 100.0},
         lambda o: sched.OneCycleLR(o, max_lr=LR, total_steps=STEPS, div_factor=10.0,
                                    final_div_factor=100.0), optimizer="AdamW"),
]


def make_optimizer(name: str, params, lr: float = LR) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, or an Adam-family optimizer (beta1 0.9), at ``lr``."""
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return getattr(torch.optim, name)(params, lr=lr)


def momentum_of(opt: torch.optim.Optimizer) -> float:
    """SGD's momentum or the Adam family's beta1 in group 0 (trimtab's momentum knob)."""
    group = opt.param_groups[0]
    return group["momentum"] if "momentum" in group else group["betas"][0]


def rel_err(a: float, b: float) -> float:
    """``|a - b| / |b|``; the absolute difference where ``b`` is 0."""
    return abs(a - b) / abs(b) if b else abs(a - b)


class EngineDriver:
    """A job under ``Engine([policy], Governor(OPENED))``, one report per step, whose
    commands a client carries out: the real Actuator on ``optimizer`` (the user's lr and
    momentum as it was built with), each command acknowledged by the step that runs with it."""

    def __init__(self, policy: Policy, optimizer: torch.optim.Optimizer,
                 batch_size: int | None = None, world_size: int = 1) -> None:
        facts = wire.ScaleFacts(param_count=2, group_sizes=[2],
                                optimizer=type(optimizer).__name__, dtype="float32",
                                device="cpu", batch_size=batch_size, world_size=world_size)
        self.client = Client(optimizer, every=1, facts=facts)
        self.engine = Engine([policy], Governor(OPENED))

    @property
    def state(self) -> JobState:
        return self.client.state

    def decide(self, step: int, loss: float | None = 1.0) -> tuple[float, float | None]:
        """Report ``step`` (after the first), decide, send; then the optimizer step after
        ``step`` steps runs: the ``(lr, momentum)`` it used."""
        c = self.client
        assert c.step == step, (c.step, step)
        if step:
            decision = c.exchange(self.engine, loss_mean=loss).decision
        else:  # before the first report, as at registration
            decision = self.engine.decide(c.state)
            c.send(decision)
        assert decision is not None and not decision.errors, decision
        c.run(1)
        _, lr, momentum = c.trace[-1]
        return lr, momentum


def torch_trace(case: Case, steps: int = STEPS) -> list[tuple[float, float]]:
    """``(lr, momentum)`` each optimizer step uses under the torch scheduler."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer(case.optimizer, [p])
    s = case.torch(opt) if case.torch is not None else None
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], momentum_of(opt)))
        p.grad = torch.ones_like(p)
        opt.step()
        if s is not None:
            s.step()
    return out


def engine_trace(case: Case, steps: int = STEPS,
                 loss: Callable[[int], float | None] = lambda t: 1.0) -> list[tuple[float, float]]:
    """``(lr, momentum)`` each optimizer step uses under the policy, through the engine,
    with the user's lr ``LR`` constant."""
    p = torch.nn.Parameter(torch.zeros(2))
    driver = EngineDriver(load_policy(case.policy, case.config),
                          make_optimizer(case.optimizer, [p]))
    out = []
    for t in range(steps):
        lr, momentum = driver.decide(t, loss(t))
        assert momentum is not None
        out.append((lr, momentum))
    assert all(g["lr"] == LR for g in driver.client.opt.param_groups)  # the user's, untouched
    return out


def max_rel_err(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]
                ) -> tuple[float, float]:
    """The largest relative error of lr and of momentum over all steps."""
    assert len(ours) == len(theirs)
    lr = max(rel_err(a[0], b[0]) for a, b in zip(ours, theirs, strict=True))
    mom = max(rel_err(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))
    assert math.isfinite(lr) and math.isfinite(mom)
    return lr, mom
