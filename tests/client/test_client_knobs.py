"""The knob model on real torch optimizers: trimtab's multipliers put in around the step.

The user's values stay in the param groups between steps; the optimizer steps with
``base x multiplier`` (lr, weight decay) and the commanded momentum; ``used()`` says what
the step used, ``base()`` the user's values, ``scale()`` the multipliers.
"""

from __future__ import annotations

import pytest
import torch

from trimtab.client._knobs import Actuator, check_optimizer, knobs_of
from trimtab.protocol import wire

pytestmark = pytest.mark.timeout(30)


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


class Seen:
    """What every optimizer step ran with, per group, recorded by a step pre-hook."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.steps: list[list[dict]] = []
        opt.register_step_pre_hook(self._pre)

    def _pre(self, opt, args, kwargs) -> None:
        self.steps.append([{k: (v.item() if isinstance(v, torch.Tensor) else v)
                            for k, v in g.items() if k in ("lr", "weight_decay", "momentum")}
                           | ({"beta1": float(g["betas"][0])} if "betas" in g else {})
                           for g in opt.param_groups])


def _step(opt: torch.optim.Optimizer, act: Actuator, step: int = 0) -> None:
    """One guarded optimizer step: engage, step, release."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    act.engage(step)
    try:
        opt.step()
    finally:
        act.release()


@pytest.mark.parametrize(
    ("make", "momentum"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4), 0.9),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.99), weight_decay=1e-4), 0.8),
        (lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.7, 0.99), weight_decay=1e-4), 0.7),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.5, weight_decay=1e-4), 0.5),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=1e-4), None),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop", "adagrad"],
)
def test_each_optimizer_steps_with_the_multipliers_and_gets_its_own_values_back(make, momentum):
    opt = make(_params())
    seen = Seen(opt)
    act = Actuator(opt, clip=1.5)
    assert act.used() == wire.Knobs(lr=0.1, momentum=momentum, weight_decay=1e-4, clip=1.5)
    errors = act.command(wire.ScaleTargets(lr=0.5, weight_decay=2.0),
                         wire.Knobs(momentum=0.6 if momentum is not None else None), None)
    assert errors == []
    _step(opt, act)
    ran = seen.steps[-1][0]
    assert ran["lr"] == pytest.approx(0.05) and ran["weight_decay"] == pytest.approx(2e-4)
    if momentum is not None:
        assert ran.get("momentum", ran.get("beta1")) == 0.6
    # Between steps the group holds the user's own values (betas stay a usable tuple).
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.1, 1e-4)
    if "betas" in group:
        assert group["betas"] == (momentum, 0.99)
    used = act.used()
    assert used.lr == pytest.approx(0.05) and used.weight_decay == pytest.approx(2e-4)
    assert used.momentum == (None if momentum is None else 0.6) and used.clip == 1.5
    assert act.base() == wire.Knobs(lr=0.1, momentum=momentum, weight_decay=1e-4)
    assert act.scale() == wire.Scale(lr=0.5, weight_decay=2.0)
    _step(opt, act)  # the optimizer still steps with its own values put back


def test_adagrad_refuses_a_momentum_it_does_not_have():
    opt = torch.optim.Adagrad(_params(), lr=0.1)
    act = Actuator(opt, clip=None)
    errors = act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(momentum=0.6), None)
    assert errors == ["knobs not applied: momentum commanded, but the optimizer has none"]
    assert act.scale().lr == 1.0  # nothing of that command was taken


def test_param_group_ratios_and_a_zero_decay_group_are_kept():
    a, b, c = _params(3)
    opt = torch.optim.SGD(
        [
            {"params": [a], "lr": 0.1, "weight_decay": 0.01},
            {"params": [b], "lr": 0.2, "weight_decay": 0.0},  # a no-decay group
            {"params": [c], "lr": 0.05, "weight_decay": 0.02, "momentum": 0.5},
        ],
        momentum=0.9,
    )
    seen = Seen(opt)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=3.0, weight_decay=3.0), wire.Knobs(momentum=0.8), None)
    _step(opt, act)
    ran = seen.steps[-1]
    assert [g["lr"] for g in ran] == pytest.approx([0.3, 0.6, 0.15])
    assert [g["weight_decay"] for g in ran] == pytest.approx([0.03, 0.0, 0.06])
    assert [g["momentum"] for g in ran] == [0.8, 0.8, 0.8]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2, 0.05]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9, 0.5]
    assert act.used().lr == pytest.approx(0.3)  # the job's lr is group 0's
    # The same command again multiplies the user's values, not the last step's.
    act.command(wire.ScaleTargets(lr=3.0), wire.Knobs(), None)
    _step(opt, act)
    assert [g["lr"] for g in seen.steps[-1]] == pytest.approx([0.3, 0.6, 0.15])


def test_the_multiplier_follows_the_users_own_rewrites_and_never_lifts_a_zero():
    opt = torch.optim.SGD(_params(), lr=0.0)
    seen = Seen(opt)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(), None)
    for t, user_lr in enumerate([0.0, 0.01, 0.02, 0.04]):  # a warm-up written by the loop
        opt.param_groups[0]["lr"] = user_lr
        _step(opt, act, t)
    assert [s[0]["lr"] for s in seen.steps] == pytest.approx([0.0, 0.005, 0.01, 0.02])
    assert act.base().lr == 0.04 and act.used().lr == pytest.approx(0.02)


def test_the_cap_holds_an_increase_but_never_lowers_the_users_own_lr():
    opt = torch.optim.SGD(_params(), lr=0.1)
    seen = Seen(opt)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=4.0), wire.Knobs(), lr_max=0.25)
    _step(opt, act)
    assert seen.steps[-1][0]["lr"] == pytest.approx(0.25)  # 0.4 capped
    assert act.used().lr == pytest.approx(0.25) and act.scale().lr == 4.0
    opt.param_groups[0]["lr"] = 0.5  # the user's own lr above the cap
    _step(opt, act)
    assert seen.steps[-1][0]["lr"] == 0.5  # not raised, not lowered
    act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(), None)  # a decrease is a decrease
    _step(opt, act)
    assert seen.steps[-1][0]["lr"] == pytest.approx(0.25)


def test_none_leaves_a_knob_alone():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=0.5)
    seen = Seen(opt)
    act = Actuator(opt, clip=2.0)
    act.command(wire.ScaleTargets(lr=2.0), wire.Knobs(), None)
    _step(opt, act)
    assert seen.steps[-1][0] == {"lr": pytest.approx(0.2), "momentum": 0.9, "weight_decay": 0.5}
    assert act.used().model_dump() == {"lr": pytest.approx(0.2), "momentum": 0.9,
                                       "weight_decay": 0.5, "clip": 2.0}


def test_a_tensor_lr_is_scaled_in_place_and_put_back():
    opt = torch.optim.Adam(_params(), lr=torch.tensor(0.01))
    seen = Seen(opt)
    lr_tensor = opt.param_groups[0]["lr"]
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=2.0), wire.Knobs(), None)
    _step(opt, act)
    assert opt.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.01)
    assert seen.steps[-1][0]["lr"] == pytest.approx(0.02)
    assert act.used().lr == pytest.approx(0.02) and act.base().lr == pytest.approx(0.01)


def test_the_jobs_weight_decay_is_the_first_groups_that_decays():
    """A no-decay group listed first (timm's create_optimizer_v2, fine-tuning recipes): the
    job's weight decay is the first group's that is not 0, so reports say the decay the
    run has (not 0) and a multiplier has something to multiply; group 0's lr still stands
    for the lr. A run with no decay anywhere reports 0."""
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([{"params": [b], "weight_decay": 0.0},
                             {"params": [w], "weight_decay": 0.05}], lr=1e-3)
    act = Actuator(opt, clip=None)
    assert act.base().weight_decay == 0.05
    act.command(wire.ScaleTargets(weight_decay=2.0), wire.Knobs(), None)
    seen = Seen(opt)
    _step(opt, act)
    assert [g["weight_decay"] for g in seen.steps[-1]] == [0.0, pytest.approx(0.1)]
    assert act.used().weight_decay == pytest.approx(0.1) and act.base().weight_decay == 0.05
    none = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3, weight_decay=0.0)
    assert Actuator(none, clip=None).base().weight_decay == 0.0


def test_the_window_lr_range_is_the_lrs_put_in_and_none_for_a_tensor_lr():
    """take_window_lr: the lowest and highest effective lr of the steps since the last
    call (the loop's own lr times the multiplier), then a new window; an lr held in a
    tensor is not read on the host (it would sync every step): no range."""
    opt = torch.optim.SGD(_params(), lr=0.1)
    act = Actuator(opt, clip=None)
    assert act.take_window_lr() == (None, None)  # no step yet
    act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(), None)
    for own in (0.1, 0.4, 0.2):
        opt.param_groups[0]["lr"] = own
        _step(opt, act)
    assert act.take_window_lr() == (pytest.approx(0.05), pytest.approx(0.2))
    _step(opt, act)
    assert act.take_window_lr() == (pytest.approx(0.1), pytest.approx(0.1))
    t = torch.optim.Adam(_params(), lr=torch.tensor(0.01))
    act = Actuator(t, clip=None)
    _step(t, act)
    assert act.take_window_lr() == (None, None)


def test_out_of_range_values_change_nothing():
    opt = torch.optim.Adam(_params(), lr=0.1)
    act = Actuator(opt, clip=None)
    assert act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(momentum=1.0), None) == [
        "knobs not applied: momentum=1.0 is out of range; allowed: 0 <= m < 1"]
    assert act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(clip=0.0), None) == [
        "knobs not applied: clip=0.0 is out of range; allowed: clip > 0"]
    assert act.scale() == wire.Scale() and act.used().lr == 0.1


def test_a_step_that_raised_before_its_release_does_not_compound():
    opt = torch.optim.SGD(_params(), lr=0.1)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(), None)
    act.engage(0)  # ... and the step raises: no release
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    act.engage(1)  # the next step puts the user's value back first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    act.release()
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_checkpointed_state_round_trips():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    act = Actuator(opt, clip=1.0)
    act.command(wire.ScaleTargets(lr=0.25, weight_decay=2.0), wire.Knobs(momentum=0.5, clip=3.0),
                lr_max=1.0)
    sd = act.state_dict()
    other = Actuator(opt, clip=None)
    other.load_state_dict(sd)
    assert other.state_dict() == sd == {"lr_scale": 0.25, "wd_scale": 2.0, "lr_max": 1.0,
                                         "momentum": 0.5, "clip": 3.0}


def test_knobs_of_reads_a_state_dicts_groups():
    opt = torch.optim.AdamW(_params(), lr=0.1, betas=(0.7, 0.99), weight_decay=1e-2)
    assert knobs_of(opt.state_dict()["param_groups"], 1.5) == wire.Knobs(
        lr=0.1, momentum=0.7, weight_decay=1e-2, clip=1.5)


def test_optimizer_without_lr_is_refused():
    opt = torch.optim.SGD(_params(), lr=0.1)
    del opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="param group 0 has no 'lr'"):
        check_optimizer(opt)


@pytest.mark.parametrize("hooks", [False, True])
def test_attach_without_an_optimizer_is_refused_naming_what_it_needs(hooks, dead_endpoint):
    """A loop that updates its parameters by hand (pytorch/examples' word language model)
    has no optimizer to attach: the argument is named, with what is allowed."""
    model = torch.nn.Linear(2, 1)
    from trimtab.client import attach
    for given in (None, model.parameters(), list(model.parameters())):
        with pytest.raises(ValueError, match=r"optimizer=.*allowed: a torch\.optim\.Optimizer"):
            attach(model, given, job="no-opt", endpoint=dead_endpoint, hooks=hooks)
