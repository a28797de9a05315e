"""The closed forms of trimtab's schedules: plain float math, shared by both sides.

The controller's schedule policies (:mod:`trimtab.policies`) propose these values, and
the client evaluates the same functions before every optimizer step when a command
carries a live schedule (:class:`~trimtab.protocol.wire.LiveSchedule`), so the two can
never drift apart. No torch, no numpy: one evaluation is a few float operations on the
host, never a device read.

Every function takes ``t``, the optimizer steps taken since the schedule's origin, and
returns what the ``(t+1)``-th optimizer step uses: torch's ``scheduler.get_last_lr()``
after ``t`` scheduler steps. Each is written in the arithmetic of its torch
counterpart's closed form (see each policy's module for the source of the rule).

>>> cosine(50, lr=0.1, t_max=100, eta_min=0.0)
0.05
>>> value("lr", "step_decay", {"lr": 0.1, "step_size": 100, "gamma": 0.5}, 250)
0.025

:func:`check` validates a schedule named on the wire, naming the bad parameter, its
value and what is allowed:

>>> check("cosine", {"lr": 0.1, "t_max": 0})
Traceback (most recent call last):
...
ValueError: cosine: t_max=0 is invalid; allowed: an int >= 1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "NAMES",
    "REFERENCE",
    "MOMENTUM",
    "constant",
    "step_decay",
    "exponential",
    "linear",
    "linear_factor",
    "cosine",
    "inverse_sqrt",
    "inverse_sqrt_factor",
    "warmup",
    "warmup_factor",
    "one_cycle",
    "one_cycle_phases",
    "anneal_cos",
    "anneal_linear",
    "value",
    "check",
]


def anneal_cos(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), written as torch's OneCycleLR does."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def anneal_linear(start: float, end: float, pct: float) -> float:
    """Straight line from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR."""
    return (end - start) * pct + start


def constant(t: int, lr: float, factor: float = 1.0, total_iters: int = 0) -> float:
    """``lr x factor`` before ``total_iters`` steps, ``lr`` after (torch's ConstantLR)."""
    return lr * factor if t < total_iters else lr


def step_decay(t: int, lr: float, step_size: int, gamma: float = 0.1) -> float:
    """``lr x gamma ** (t // step_size)`` (torch's StepLR)."""
    return lr * gamma ** (t // step_size)


def exponential(t: int, lr: float, gamma: float) -> float:
    """``lr x gamma ** t`` (torch's ExponentialLR); with ``gamma > 1`` the LR range test's
    sweep, which the client then follows step by step."""
    return lr * gamma**t


def linear_factor(t: int, start: float, end: float, total: int) -> float:
    """``start + (end - start) x min(t, total) / total``, in torch's LinearLR's closed form."""
    return start + (end - start) * min(total, t) / total


def linear(
    t: int, lr: float, total_iters: int, start_factor: float = 1.0, end_factor: float = 0.0
) -> float:
    """``lr x`` a straight line of factors over ``total_iters`` (torch's LinearLR)."""
    return lr * linear_factor(t, start_factor, end_factor, total_iters)


def cosine(t: int, lr: float, t_max: int, eta_min: float = 0.0) -> float:
    """SGDR's eq. 5, in torch's CosineAnnealingLR's closed-form arithmetic."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def inverse_sqrt_factor(t: int, warmup_steps: int) -> float:
    """``min(n / w, sqrt(w / n))`` with ``n = t + 1``."""
    n = t + 1
    return min(n / warmup_steps, math.sqrt(warmup_steps / n))


def inverse_sqrt(t: int, lr: float, warmup_steps: int) -> float:
    """Vaswani et al.'s warm-up then ``1 / sqrt(step)``, peaking at ``lr``."""
    return lr * inverse_sqrt_factor(t, warmup_steps)


def warmup_factor(t: int, warmup_steps: int, start_factor: float) -> float:
    """``s + (1 - s) x min(t, w) / w``."""
    return start_factor + (1.0 - start_factor) * min(t, warmup_steps) / warmup_steps


def warmup(t: int, lr: float, warmup_steps: int, start_factor: float = 0.0) -> float:
    """Goyal et al.'s linear warm-up from ``start_factor x lr`` to ``lr``, then ``lr``."""
    return lr * warmup_factor(t, warmup_steps, start_factor)


def one_cycle_phases(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> list[tuple[float, float, float, float, float]]:
    """``(end_step, start_lr, end_lr, start_momentum, end_momentum)`` per phase, as torch."""
    initial = max_lr / div_factor
    final = initial / final_div_factor
    hi_m, lo_m = max_momentum, base_momentum
    up = float(pct_start * total_steps) - 1
    last = total_steps - 1
    if three_phase:
        down = float(2 * pct_start * total_steps) - 2
        return [
            (up, initial, max_lr, hi_m, lo_m),
            (down, max_lr, initial, lo_m, hi_m),
            (last, initial, final, hi_m, hi_m),
        ]
    return [(up, initial, max_lr, hi_m, lo_m), (last, max_lr, final, lo_m, hi_m)]


def one_cycle(
    t: int,
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[float, float]:
    """``(lr, momentum)`` of torch's OneCycleLR after ``t`` steps; past the cycle its final
    values hold (torch raises there)."""
    anneal = anneal_cos if anneal_strategy == "cos" else anneal_linear
    phases = one_cycle_phases(
        max_lr,
        total_steps,
        pct_start,
        div_factor,
        final_div_factor,
        three_phase,
        base_momentum,
        max_momentum,
    )
    t = min(t, total_steps - 1)
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            pct = (t - start) / (end - start)
            return anneal(lr0, lr1, pct), anneal(m0, m1, pct)
        start = end
    raise AssertionError("unreachable: the last phase always matches")


def _one_cycle_lr(t: int, **params: Any) -> float:
    return one_cycle(t, **params)[0]


def _one_cycle_momentum(t: int, **params: Any) -> float:
    return one_cycle(t, **params)[1]


#: The lr formula of each schedule, by its policy's name.
_LR: dict[str, Callable[..., float]] = {
    "constant": constant,
    "step_decay": step_decay,
    "exponential": exponential,
    "linear": linear,
    "cosine": cosine,
    "inverse_sqrt": inverse_sqrt,
    "warmup": warmup,
    "one_cycle": _one_cycle_lr,
}
#: Schedules that also move momentum (SGD's momentum, the Adam family's beta1).
MOMENTUM: dict[str, Callable[..., float]] = {"one_cycle": _one_cycle_momentum}
#: The schedules a live schedule may name.
NAMES: tuple[str, ...] = tuple(_LR)
#: The parameter holding each schedule's reference lr (the lr its factors multiply).
REFERENCE: dict[str, str] = {name: "max_lr" if name == "one_cycle" else "lr" for name in NAMES}

_INT = "an int >= {}"
_POS = "a finite number > 0"
_NONNEG = "a finite number >= 0"
_FRACTION = "a number in [0, 1]"
_MOMENTUM = "a number in [0, 1)"
#: Parameter -> (check, what is allowed), where the rule is the same for every schedule.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda x: _num(x) and x >= 0, _NONNEG),
    "max_lr": (lambda x: _num(x) and x > 0, _POS),
    "t_max": (lambda x: _int(x, 1), _INT.format(1)),
    "eta_min": (lambda x: _num(x) and x >= 0, _NONNEG),
    "step_size": (lambda x: _int(x, 1), _INT.format(1)),
    "gamma": (lambda x: _num(x) and x > 0, _POS),
    "total_iters": (lambda x: _int(x, 0), _INT.format(0)),
    "factor": (lambda x: _num(x) and 0 < x <= 1, "a number in (0, 1]"),
    "start_factor": (lambda x: _num(x) and 0 <= x <= 1, _FRACTION),
    "end_factor": (lambda x: _num(x) and 0 <= x <= 1, _FRACTION),
    "warmup_steps": (lambda x: _int(x, 1), _INT.format(1)),
    "total_steps": (lambda x: _int(x, 2), _INT.format(2)),
    "pct_start": (lambda x: _num(x) and 0 < x < 1, "a number in (0, 1)"),
    "anneal_strategy": (lambda x: x in ("cos", "linear"), "'cos' or 'linear'"),
    "div_factor": (lambda x: _num(x) and x > 0, _POS),
    "final_div_factor": (lambda x: _num(x) and x > 0, _POS),
    "three_phase": (lambda x: isinstance(x, bool), "true or false"),
    "base_momentum": (lambda x: _num(x) and 0 <= x < 1, _MOMENTUM),
    "max_momentum": (lambda x: _num(x) and 0 <= x < 1, _MOMENTUM),
}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _parameters(name: str) -> tuple[str, ...]:
    if name == "one_cycle":
        fn: Callable[..., Any] = one_cycle
    else:
        fn = _LR[name]
    code = fn.__code__
    return code.co_varnames[1 : code.co_argcount]


def _required(name: str) -> set[str]:
    fn = one_cycle if name == "one_cycle" else _LR[name]
    params = _parameters(name)
    return set(params[: len(params) - len(fn.__defaults__ or ())])


def check(name: str, params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``name`` is a schedule and ``params`` are its parameters,
    each within what the formula allows; the message names the bad one."""
    if name not in _LR:
        raise ValueError(f"schedule {name!r} is unknown; allowed: {', '.join(NAMES)}")
    known = _parameters(name)
    extra = sorted(set(params) - set(known))
    if extra:
        raise ValueError(f"{name}: unknown parameters {extra}; allowed: {', '.join(known)}")
    missing = sorted(_required(name) - set(params))
    if missing:
        raise ValueError(f"{name}: missing parameters {missing}")
    for key, x in params.items():
        ok, allowed = _RULES[key]
        if not ok(x):
            raise ValueError(f"{name}: {key}={x!r} is invalid; allowed: {allowed}")
    if name == "one_cycle":
        _check_one_cycle(params)


def _check_one_cycle(params: Mapping[str, Any]) -> None:
    low = params.get("base_momentum", 0.85)
    high = params.get("max_momentum", 0.95)
    if low > high:
        raise ValueError(
            f"one_cycle: base_momentum={low} is above max_momentum={high}; "
            "base_momentum must be <= max_momentum"
        )
    phases = one_cycle_phases(
        1.0,
        params["total_steps"],
        params.get("pct_start", 0.3),
        three_phase=params.get("three_phase", False),
    )
    ends = [end for end, *_ in phases]
    starts = [0.0, *ends[:-1]]
    if any(end <= start for start, end in zip(starts, ends, strict=True)):
        raise ValueError(
            f"one_cycle: pct_start={params.get('pct_start', 0.3)} with total_steps="
            f"{params['total_steps']} gives phases ending at steps {ends}; each must end "
            "after the previous one (and after 0)"
        )


def value(knob: str, name: str, params: Mapping[str, Any], t: int) -> float:
    """Schedule ``name``'s ``knob`` (``"lr"``, or ``"momentum"`` for one that moves it)
    after ``t`` steps; ``t < 0`` counts as 0 (the schedule has not begun)."""
    table = _LR if knob == "lr" else MOMENTUM
    try:
        fn = table[name]
    except KeyError:
        raise ValueError(f"schedule {name!r} gives no {knob}") from None
    return fn(max(t, 0), **params)
