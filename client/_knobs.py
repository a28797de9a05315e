"""Read and write the knobs trimtab steers on any ``torch.optim.Optimizer``.

The job's ``lr`` and ``weight_decay`` are param group 0's values. A target is
applied to every group by the ratio ``target / group-0 value``, so groups keep
their relative settings (a no-decay group at 0 stays at 0). ``momentum`` is set
absolutely in every group that has one: ``momentum`` (SGD, RMSprop) or
``betas[0]`` (the Adam family). ``clip`` is not an optimizer setting; the guard
holds it and passes it in.

>>> import torch
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
>>> read_knobs(opt, clip=None)
Knobs(lr=0.1, momentum=0.9, weight_decay=0.0, clip=None)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import wire

__all__ = ["read_knobs", "knobs_of", "apply_knobs", "check_optimizer"]


def _scalar(value: Any) -> float:
    # A tensor lr/beta (capturable or fused optimizers) costs one host read here; knobs
    # are read once per report window and once per command, never per step.
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _momentum_of(group: dict[str, Any]) -> float | None:
    if "momentum" in group:
        return _scalar(group["momentum"])
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        return _scalar(betas[0])
    return None


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless every param group carries an ``lr``."""
    if not optimizer.param_groups:
        raise ValueError("optimizer has no param groups; trimtab needs at least one")
    for i, group in enumerate(optimizer.param_groups):
        if "lr" not in group:
            raise ValueError(f"optimizer param group {i} has no 'lr'; trimtab steers lr")


def read_knobs(optimizer: torch.optim.Optimizer, clip: float | None) -> wire.Knobs:
    """The knob values in force: group 0's lr and weight decay, the first group's momentum."""
    return knobs_of(optimizer.param_groups, clip)


def knobs_of(groups: list[dict[str, Any]], clip: float | None) -> wire.Knobs:
    """:func:`read_knobs` on param groups (live, or an optimizer ``state_dict``'s)."""
    group0 = groups[0]
    momentum = next((m for g in groups if (m := _momentum_of(g)) is not None), None)
    wd = group0.get("weight_decay")
    return wire.Knobs(
        lr=_scalar(group0["lr"]),
        momentum=momentum,
        weight_decay=None if wd is None else _scalar(wd),
        clip=clip,
    )


def _write(group: dict[str, Any], key: str, value: float) -> None:
    # Tensor-valued settings are updated in place so a fused or captured step keeps its tensor.
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def _scale_groups(
    groups: list[dict[str, Any]], key: str, target: float
) -> list[float | None]:
    """Write ``target`` to group 0 and scale the others alike; return each group's factor
    (``None`` where the change is not a scaling: a group without the key, or all at 0)."""
    factors: list[float | None] = [None] * len(groups)
    if key not in groups[0]:
        return factors
    current = _scalar(groups[0][key])
    if current > 0.0:
        ratio = target / current
        for i, group in enumerate(groups):
            if key in group:
                factors[i] = ratio
                if i:
                    _write(group, key, _scalar(group[key]) * ratio)
    elif key == "lr":
        # Every lr at zero (a warm-up from 0) has no ratio to keep: all groups take the target.
        for group in groups[1:]:
            _write(group, key, target)
    # Group 0 gets the target exactly, not target * (c / c) with its rounding.
    _write(groups[0], key, target)
    return factors


def _set_momentum(groups: list[dict[str, Any]], target: float) -> None:
    for group in groups:
        if "momentum" in group:
            _write(group, "momentum", target)
        elif isinstance(group.get("betas"), (tuple, list)) and group["betas"]:
            betas = group["betas"]
            if isinstance(betas[0], torch.Tensor):
                betas[0].fill_(target)
            else:
                group["betas"] = (target, *tuple(betas[1:]))


def apply_knobs(
    optimizer: torch.optim.Optimizer, target: wire.Knobs
) -> list[float | None] | None:
    """Write the knobs ``target`` sets (``None`` leaves a knob as it is); ``clip`` is ignored.

    Returns each group's lr factor (new / old; ``None`` for a group whose lr was not
    scaled), or ``None`` when ``target`` sets no lr: an LR scheduler's reference values
    are scaled by the same factors. Raises ``ValueError`` before changing anything when
    a target is out of range.
    """
    if target.momentum is not None and not target.momentum < 1.0:
        raise ValueError(f"momentum={target.momentum!r} is out of range; allowed: 0 <= m < 1")
    for name in ("lr", "weight_decay"):
        value = getattr(target, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not finite")
    groups = optimizer.param_groups
    factors = None if target.lr is None else _scale_groups(groups, "lr", target.lr)
    if target.weight_decay is not None:
        _scale_groups(groups, "weight_decay", target.weight_decay)
    if target.momentum is not None:
        _set_momentum(groups, target.momentum)
    return factors
