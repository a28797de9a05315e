"""Reading and writing lr, momentum, weight decay on real torch optimizers."""

from __future__ import annotations

import pytest
import torch

from trimtab.client import wire
from trimtab.client._knobs import apply_knobs, check_optimizer, read_knobs

pytestmark = pytest.mark.timeout(30)


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


def _one_step(opt: torch.optim.Optimizer) -> None:
    """The optimizer still steps after its knobs were written (betas stay a usable tuple)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


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
def test_read_and_write_each_optimizer(make, momentum) -> None:
    opt = make(_params())
    assert read_knobs(opt, clip=1.5) == wire.Knobs(
        lr=0.1, momentum=momentum, weight_decay=1e-4, clip=1.5
    )
    apply_knobs(opt, wire.Knobs(lr=0.05, momentum=0.6, weight_decay=2e-4))
    knobs = read_knobs(opt, clip=None)
    assert knobs.lr == 0.05 and knobs.weight_decay == 2e-4 and knobs.clip is None
    # Adagrad has no momentum: a momentum target is ignored, not invented.
    assert knobs.momentum == (None if momentum is None else 0.6)
    group = opt.param_groups[0]
    if "betas" in group:
        assert group["betas"] == (0.6, 0.99)
    _one_step(opt)


def test_multi_group_keeps_ratios_and_zero_decay() -> None:
    a, b, c = _params(3)
    opt = torch.optim.SGD(
        [
            {"params": [a], "lr": 0.1, "weight_decay": 0.01},
            {"params": [b], "lr": 0.2, "weight_decay": 0.0},  # a no-decay group
            {"params": [c], "lr": 0.05, "weight_decay": 0.02, "momentum": 0.5},
        ],
        momentum=0.9,
    )
    apply_knobs(opt, wire.Knobs(lr=0.3, momentum=0.8, weight_decay=0.03))
    lrs = [g["lr"] for g in opt.param_groups]
    wds = [g["weight_decay"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.3, 0.6, 0.15])
    assert wds == pytest.approx([0.03, 0.0, 0.06])
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.8, 0.8]
    assert read_knobs(opt, None).lr == 0.3  # the job's lr is group 0's, exactly
    # Absolute targets: applying the same command again changes nothing.
    apply_knobs(opt, wire.Knobs(lr=0.3, momentum=0.8, weight_decay=0.03))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.6, 0.15])


def test_lr_from_zero_sets_every_group() -> None:
    a, b = _params()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.0}])
    apply_knobs(opt, wire.Knobs(lr=0.01))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def test_none_leaves_a_knob_alone() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=0.5)
    apply_knobs(opt, wire.Knobs(lr=0.2))
    assert read_knobs(opt, None) == wire.Knobs(lr=0.2, momentum=0.9, weight_decay=0.5)


def test_tensor_lr_is_updated_in_place() -> None:
    opt = torch.optim.Adam(_params(), lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    apply_knobs(opt, wire.Knobs(lr=0.02))
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert read_knobs(opt, None).lr == pytest.approx(0.02)
    _one_step(opt)


def test_out_of_range_momentum_changes_nothing() -> None:
    opt = torch.optim.Adam(_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"momentum=1\.0 .*allowed: 0 <= m < 1"):
        apply_knobs(opt, wire.Knobs(lr=0.5, momentum=1.0))
    assert read_knobs(opt, None).lr == 0.1


def test_optimizer_without_lr_is_refused() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    del opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="param group 0 has no 'lr'"):
        check_optimizer(opt)
