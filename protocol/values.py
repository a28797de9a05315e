"""The values the wire messages carry: knobs, multipliers, scale facts, live schedules.

Frozen pydantic models that refuse unknown fields and non-finite numbers, shared by the
messages of :mod:`~trimtab.protocol.wire` (which re-exports each, so ``wire.Knobs`` is the
name to use) and by both sides' code.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import schedules

__all__ = ["KNOBS", "Knob", "Knobs", "Scale", "ScaleFacts", "SchedulePiece", "LiveSchedule",
           "ScaleTargets"]

#: The optimizer knobs trimtab steers, in the order they are reported.
KNOBS: tuple[str, ...] = ("lr", "momentum", "weight_decay", "clip")
Knob = Literal["lr", "momentum", "weight_decay", "clip"]

JobId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]
#: A run's (or a resume's) identifier, as the client makes it.
RunId = Annotated[str, Field(min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0, le=2**62)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=1024)]


Multiplier = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Knobs(_Model):
    """Knob values (group 0's lr and weight decay, the momentum, the guard's clip). ``None``
    means the optimizer has no such knob (momentum for plain Adagrad) or, for ``clip``,
    that clipping is off.

    In a report or an ack, ``knobs`` are the *effective* values the optimizer used and
    ``base`` the user's own values (what the loop or its scheduler put in the param
    groups); trimtab's lr and weight decay are the multipliers of :class:`Scale` on them.
    """

    lr: NonNeg | None = None
    momentum: NonNeg | None = None
    weight_decay: NonNeg | None = None
    clip: NonNeg | None = None

    def set(self) -> dict[str, float]:
        """The knobs that carry a value."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Scale(_Model):
    """trimtab's multipliers on the user's own lr and weight decay (the knob model).

    The user's code or scheduler owns each param group's lr and weight decay (the
    *base*, which it may rewrite every iteration); the optimizer steps with ``base x
    multiplier`` (every group by the same multiplier, so their ratios are kept), and the
    base is put back right after the step. ``1.0`` leaves the user's schedule untouched.
    """

    lr: Multiplier = 1.0
    weight_decay: Multiplier = 1.0


class ScaleFacts(_Model):
    """What the controller needs to know of a job's scale, sent once at registration."""

    param_count: Count
    group_sizes: Annotated[list[Count], Field(max_length=1024)]
    world_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    optimizer: Annotated[str, Field(max_length=128)]
    dtype: Annotated[str, Field(max_length=32)]
    device: Annotated[str, Field(max_length=32)]
    batch_size: Annotated[int, Field(ge=1)] | None = None


Param = Union[bool, int, float, str]  # noqa: UP007


class SchedulePiece(_Model):
    """One closed form of :mod:`trimtab.protocol.schedules` with its parameters; its step 0 is
    at global step ``origin`` (before it, the step-0 value holds).

    >>> SchedulePiece(name="cosine", params={"lr": 0.1, "t_max": 0})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for SchedulePiece
      Value error, cosine: t_max=0 is invalid; allowed: an int >= 1 ...
    """

    name: Annotated[str, Field(max_length=32)]
    params: Annotated[dict[Annotated[str, Field(max_length=32)], Param], Field(max_length=16)]
    origin: Count = 0

    @model_validator(mode="after")
    def _known(self) -> SchedulePiece:
        schedules.check(self.name, self.params)
        return self

    def value(self, knob: str, step: int) -> float:
        """This piece's ``knob`` at global ``step``."""
        return schedules.value(knob, self.name, self.params, step - self.origin)


class LiveSchedule(_Model):
    """A knob's trajectory, evaluated by the client before every optimizer step until a newer
    command replaces it: ``clamp(scale x product of the pieces' values at the step, lo, hi)``.

    The first piece gives the value, the others (reference lr 1) multiply it, as torch's
    ``ChainedScheduler``; ``scale`` is the controller's correction (e.g. a plateau cut),
    ``[lo, hi]`` the governor's bounds for the knob. For ``lr`` the value is trimtab's lr
    *multiplier* on the user's own lr (:class:`Scale`): a trimtab schedule composes with the
    user's as two chained schedulers do; for ``momentum`` it is the momentum itself.

    >>> s = LiveSchedule(knob="lr", pieces=[SchedulePiece(
    ...     name="cosine", params={"lr": 0.1, "t_max": 100})], scale=0.5, lo=0.01)
    >>> s.value(50), s.value(100)
    (0.025, 0.01)
    """

    knob: Literal["lr", "momentum"]
    pieces: Annotated[list[SchedulePiece], Field(min_length=1, max_length=8)]
    scale: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    lo: NonNeg = 0.0
    #: None: no upper bound.
    hi: NonNeg | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LiveSchedule:
        if self.hi is not None and self.lo > self.hi:
            raise ValueError(f"lo={self.lo} is above hi={self.hi}; lo must be <= hi")
        if self.knob == "momentum":
            bad = [p.name for p in self.pieces if p.name not in schedules.MOMENTUM]
            if bad:
                raise ValueError(f"schedules {bad} give no momentum; allowed: "
                                 f"{', '.join(schedules.MOMENTUM)}")
        return self

    def value(self, step: int) -> float:
        """The knob's value for the optimizer step taken after ``step`` steps."""
        x = self.scale
        for piece in self.pieces:
            x *= piece.value(self.knob, step)
        x = max(x, self.lo)
        return x if self.hi is None else min(x, self.hi)


class ScaleTargets(_Model):
    """The multipliers a command sets (``None``: the one in force stays)."""

    lr: Multiplier | None = None
    weight_decay: Multiplier | None = None

    def set(self) -> dict[str, float]:
        """The multipliers that carry a value."""
        return {k: v for k, v in self.model_dump().items() if v is not None}
