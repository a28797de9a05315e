"""The governor's limits per knob: what ``[governor.<knob>]`` in the config sets.

:class:`KnobLimits` holds one knob's bounds (absolute, and relative to its registered
value), step and slew ratios, cooldown, deadband and hysteresis; :class:`GovernorConfig`
one for each knob, with the defaults chosen for each. The governor
(:mod:`~trimtab.controller.governor`) applies them; :mod:`~trimtab.controller.scale`
derives a job's own from its scale facts.

>>> GovernorConfig().lr.max_step_ratio
2.0
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MULTIPLIERS", "KnobLimits", "GovernorConfig"]

#: The knobs steered as multipliers on the user's own values (the knob model).
MULTIPLIERS: tuple[str, ...] = ("lr", "weight_decay")

_PosFloat = Field(gt=0.0, allow_inf_nan=False)



class KnobLimits(BaseModel):
    """Limits on one knob; a limit left ``None`` is off.

    Bounds are the intersection of ``[min, max]`` and ``[min_rel, max_rel] x
    initial``; relative bounds are skipped when the knob had no initial value. For the
    multiplier knobs (lr, weight decay) ``[min_rel, max_rel]`` bounds the multiplier
    (initial 1.0); ``min`` and ``max`` are not multiplier bounds: the lr's ``max`` caps the
    effective lr a multiplier above 1 can reach, and the others are refused (see
    :class:`GovernorConfig`).
    ``[min_rel_grad_norm, max_rel_grad_norm] x`` the job's gradient-norm EMA (given once
    its z-score warm-up has passed) bounds the targets policies ask for, not the value in
    force, which the scale drifting under it never moves (that would be a command per
    report); the clip's default is ``[0.1, 10]``, so its bounds follow the job's own norms.

    >>> KnobLimits(min_rel=0.1, max_rel=10, max_step_ratio=2).max_step_ratio
    2.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="absolute lower bound")
    max: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="absolute upper bound")
    min_rel: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="x initial")
    max_rel: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="x initial")
    min_rel_grad_norm: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                                            description="x the job's gradient-norm EMA")
    max_rel_grad_norm: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                                            description="x the job's gradient-norm EMA")
    #: Zero is a valid target (momentum, weight decay); else a zero target is refused.
    allow_zero: bool = False
    max_step_ratio: float | None = Field(None, ge=1.0, allow_inf_nan=False)
    slew_ratio: float | None = Field(None, ge=1.0, allow_inf_nan=False)
    slew_window_steps: int = Field(1000, ge=1)
    cooldown_steps: int = Field(0, ge=0)
    deadband: float = Field(0.0, ge=0.0, lt=1.0)
    reversal_window_steps: int = Field(0, ge=0)
    reversal_min_change: float = Field(0.0, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> KnobLimits:
        for lo, hi in (("min", "max"), ("min_rel", "max_rel"),
                       ("min_rel_grad_norm", "max_rel_grad_norm")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo}={a} is above {hi}={b}; {lo} must be <= {hi}")
        return self


def _lr_limits() -> KnobLimits:
    return KnobLimits(
        min_rel=1e-3, max_rel=10.0, max_step_ratio=2.0, slew_ratio=4.0, slew_window_steps=1000,
        cooldown_steps=50, deadband=0.01, reversal_window_steps=200, reversal_min_change=0.2,
    )


def _momentum_limits() -> KnobLimits:
    # The ratios on 1 / (1 - momentum), the steps a gradient is averaged over (the step's
    # scale, as the lr's): 0.9 -> at most 0.95 or 0.8 in one decision, 0.975 in a window.
    return KnobLimits(min=0.0, max=0.999, allow_zero=True, max_step_ratio=2.0, slew_ratio=4.0,
                      cooldown_steps=50, deadband=0.01)


def _weight_decay_limits() -> KnobLimits:
    return KnobLimits(
        min_rel=0.0, max_rel=10.0, allow_zero=True, max_step_ratio=2.0, cooldown_steps=50,
        deadband=0.01,
    )


def _clip_limits() -> KnobLimits:
    return KnobLimits(min=1e-6, max=1e6, min_rel_grad_norm=0.1, max_rel_grad_norm=10.0,
                      max_step_ratio=2.0, cooldown_steps=50, deadband=0.01)


class GovernorConfig(BaseModel):
    """One :class:`KnobLimits` per knob; the defaults are conservative.

    ``wd_coupling`` says what weight decay does when a decision changes only the lr, for
    optimizers whose step shrinks the weights by ``lr x wd`` (AdamW, SGD; see
    :func:`~trimtab.controller.scale.decay_is_lr_times_wd`): ``"follow"`` (the default)
    leaves wd alone, so the decay per step follows the lr, as the schedule multiplier
    ``eta_t`` scales both the gradient step and the decay in AdamW (Loshchilov & Hutter
    2019, Algorithm 2), which is what a decay or a rollback cut means to do;
    ``"keep_product"`` divides wd by the lr's factor in the same command (within wd's
    bounds), so the decay per step stays where it was, as with the fully independent decay
    of Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
    instabilities"), for lr corrections meant to change the step alone.

    >>> GovernorConfig(lr={"max_step_ratio": 1.5}).lr.cooldown_steps
    0
    >>> GovernorConfig(lr={"min": 1e-5})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for GovernorConfig
      Value error, governor.lr.min = 1e-05: lr is steered as a multiplier on your own lr...
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: KnobLimits = Field(default_factory=_lr_limits)
    momentum: KnobLimits = Field(default_factory=_momentum_limits)
    weight_decay: KnobLimits = Field(default_factory=_weight_decay_limits)
    clip: KnobLimits = Field(default_factory=_clip_limits)
    wd_coupling: Literal["follow", "keep_product"] = "follow"

    @model_validator(mode="after")
    def _multipliers(self) -> GovernorConfig:
        refused = [("lr", "min"), ("weight_decay", "min"), ("weight_decay", "max")]
        for knob, name in refused:
            value = getattr(getattr(self, knob), name)
            if value is not None:
                raise ValueError(
                    f"governor.{knob}.{name} = {value!r}: {knob} is steered as a multiplier on "
                    f"your own {knob}, which trimtab never lifts or caps from below; bound the "
                    "multiplier with min_rel / max_rel"
                    + (" (lr.max caps the effective lr)" if knob == "lr" else ""))
        return self
