"""What every schedule policy shares: the config base, the reference, the proposal.

A schedule policy is a pure function of the job's step: at a decision taken when
``view.step`` optimizer steps have been taken, it proposes the lr (and, for OneCycle,
momentum) the next optimizer step should use. That is torch's convention too: after
``t`` calls of ``scheduler.step()`` the lr in force is the one the ``(t+1)``-th
``optimizer.step()`` uses, so ``lr_at(t)`` here equals ``scheduler.get_last_lr()[0]``
after ``t`` scheduler steps.

The knob model: trimtab steers a *multiplier* on the user's own lr, so a trimtab schedule
is a multiplier trajectory, and it composes with a schedule of the user's (a loop that
writes its lr, a torch scheduler, a trainer's) as two schedulers chained with torch's
``ChainedScheduler`` do: the optimizer steps with ``user's lr x trimtab's schedule``.
With a user lr that stays constant this is exactly the schedule from the reference lr.
The user's own schedule is the default owner of the lr: no schedule policy is in the
default set; configure one only for a run whose loop has none, or to shape it further.

The reference (``lr``, or ``max_lr`` for OneCycle) is therefore a multiplier:
``configured lr / the lr the user's scheduler scales`` (the client's ``nominal_lr``: its
``initial_lr``, or OneCycleLR's ``max_lr``; for a loop without a scheduler, the user's lr
at registration) when an absolute lr is configured
(:func:`reference_multiplier`), else 1 (the user's own lr); with ``scale_with_batch`` it
is multiplied by the batch-size rule of :class:`~trimtab.controller.scale.ScaleContext`
(linear for SGD, square root for the Adam family), taking ``reference_batch_size`` as the
batch the lr was tuned at.

When an LR range test ran for the job (:mod:`trimtab.policies.lr_range_test`), its pick,
``view.found_lr`` (a multiplier), is the reference of every schedule whose own is not
configured (``use_found_lr=False`` keeps the user's). It is not batch-scaled: it was
measured at the run's batch size. The schedule keeps counting the run's steps: the
range test rolls the run back to the checkpoint where its sweep began (step 0 when it
runs from the start), so the schedule starts there afresh and the sweep costs it nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.scale import BatchScaling, ScaleContext
from trimtab.controller.view import JobView
from trimtab.protocol import schedules, wire
from trimtab.protocol.schedules import anneal_cos, anneal_linear

__all__ = [
    "LrField", "ScheduleConfig", "SchedulePolicy", "reference_multiplier", "as_multiplier",
    "batch_factor",
    "anneal_cos", "anneal_linear",
]

#: The reference lr of a schedule, absolute; None: the user's own lr.
LrField = Field(None, gt=0.0, allow_inf_nan=False)


class ScheduleConfig(BaseModel):
    """Settings every schedule has: batch-size scaling of its reference lr (off by default,
    so that the schedule is exactly torch's).

    >>> ScheduleConfig(scale_with_batch=True, reference_batch_size=256).batch_scaling
    'auto'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Multiply the reference lr by the batch-size rule (see :mod:`trimtab.controller.scale`).
    scale_with_batch: bool = False
    #: The global batch size the reference lr was tuned at; needed with ``scale_with_batch``.
    reference_batch_size: int | None = Field(None, ge=1)
    #: ``"auto"``: linear for SGD, square root for the Adam family; or force one.
    batch_scaling: BatchScaling = "auto"
    #: Take the LR range test's pick (``view.found_lr``) when no reference lr is configured.
    use_found_lr: bool = True

    @model_validator(mode="after")
    def _reference_given(self) -> ScheduleConfig:
        if self.scale_with_batch and self.reference_batch_size is None:
            raise ValueError("scale_with_batch=True needs reference_batch_size (the global "
                             "batch size the lr was tuned at)")
        return self


def _own_lr(view: JobView, what: str) -> float:
    """What an absolute lr relates to: the lr the user's own scheduler scales (the
    client's ``nominal_lr``), else the user's lr at registration; both group 0's, taken to
    the param group with the highest lr (``view.lr_spread``: with layer-wise LR decay,
    the head's, the lr a user configures, not the input layer's)."""
    own = view.nominal_lr or view.registered.lr
    if not own:
        raise ValueError(f"{what} needs the job's own lr (its scheduler's, or at "
                         f"registration), and it registered {view.registered.lr!r} with no "
                         "scheduler's lr")
    return own * view.lr_spread


def reference_multiplier(configured: float | None, cfg: ScheduleConfig, view: JobView) -> float:
    """The schedule's reference as a multiplier on the user's lr: ``configured`` (an
    absolute lr) over the lr the user's own scheduler scales (else the user's lr at
    registration), or 1 (the user's own), times the batch-size factor if asked; the LR
    range test's pick when there is one and nothing is configured (never batch-scaled)."""
    if configured is None and cfg.use_found_lr and view.found_lr is not None:
        return view.found_lr
    m = 1.0
    if configured is not None:
        m = configured / _own_lr(view, f"an absolute reference lr ({configured:g})")
    return m * batch_factor(cfg, view)


def as_multiplier(lr: float, view: JobView | None) -> float:
    """An absolute lr a schedule is configured with (e.g. cosine's ``eta_min``) as a
    multiplier on the lr the user's own scheduler scales (else the user's lr at
    registration; ``view`` None: unchanged, for the policies' own arithmetic on a
    reference of 1)."""
    if view is None or lr == 0.0:
        return lr
    return lr / _own_lr(view, f"an absolute lr ({lr:g})")


def batch_factor(cfg: ScheduleConfig, view: JobView) -> float:
    """The batch-size factor ``cfg`` applies to ``view`` (1 when scaling is off)."""
    if not cfg.scale_with_batch:
        return 1.0
    ctx = ScaleContext.from_facts(view.facts)
    return ctx.batch_lr_factor(cfg.reference_batch_size, cfg.batch_scaling)  # type: ignore[arg-type]


class SchedulePolicy(Policy):
    """A policy that proposes ``lr = lr_at(t, reference lr)`` with ``t = view.step -
    step_origin(view)``; subclasses give ``lr_at``, or ``formula`` and ``formula_params``
    (a closed form of :mod:`trimtab.protocol.schedules`), and the name of their reference-lr
    field.

    A schedule's proposal is the *base trajectory* of its knob (it carries
    :attr:`Proposal.schedule`, the formula and its parameters): the engine multiplies it by
    the job's persistent correction (the other policies' factors) instead of weighing it
    against them, composes several schedules of one knob as torch's ``ChainedScheduler``
    does (the first one's value times the others' factors), and may send it to the client
    to evaluate at every optimizer step (see :mod:`trimtab.controller.engine`). A subclass
    with its own ``lr_at`` and no ``formula`` proposes plain absolute values.

    >>> class Halving(SchedulePolicy):
    ...     name = "halving"
    ...     class Config(ScheduleConfig):
    ...         lr: float | None = LrField
    ...     def lr_at(self, step, base_lr):
    ...         return base_lr * 0.5 ** (step // 100)
    >>> Halving().lr_at(250, 0.1)
    0.025
    """

    #: The config field holding the reference lr.
    lr_field: ClassVar[str] = "lr"
    #: The closed form in :mod:`trimtab.protocol.schedules` (None: ``lr_at`` is the policy's own).
    formula: ClassVar[str | None] = None

    def formula_params(self, base_lr: float, view: JobView | None = None) -> dict[str, Any]:
        """The parameters of :attr:`formula` for reference lr ``base_lr`` (``view``: the job,
        for parameters that depend on it)."""
        raise NotImplementedError(f"{type(self).__name__} gives neither lr_at nor a formula")

    def lr_at(self, step: int, base_lr: float) -> float:
        """The lr for the optimizer step after ``step`` steps, given the reference lr."""
        if self.formula is None:
            raise NotImplementedError(f"{type(self).__name__} gives neither lr_at nor a formula")
        return schedules.value("lr", self.formula, self.formula_params(base_lr), step)

    def base_lr(self, view: JobView) -> float:
        """The reference for ``view``'s job, as a multiplier on its own lr."""
        cfg: ScheduleConfig = self.config  # type: ignore[assignment]
        return reference_multiplier(getattr(cfg, self.lr_field), cfg, view)

    def step_origin(self, view: JobView) -> int:
        """The step at which this schedule's step 0 falls for ``view``'s job (0: the run's
        start; the checkpoint an LR range test returned to, or the step it ended at in
        place, when the schedule takes its pick); before it the schedule holds its step-0
        value."""
        cfg: ScheduleConfig = self.config  # type: ignore[assignment]
        if getattr(cfg, self.lr_field) is None and cfg.use_found_lr and view.found_lr:
            found = [p for p in view.phases_done if p.found_lr == view.found_lr]
            return found[-1].resume_step if found else 0
        return 0

    def lr_for(self, view: JobView) -> tuple[float, float]:
        """``(lr, reference)`` multipliers for ``view``'s job at its step."""
        base = self.base_lr(view)
        step = max(view.step - self.step_origin(view), 0)
        if self.formula is not None:  # the piece's own parameters, as the client evaluates it
            return schedules.value("lr", self.formula, self.formula_params(base, view), step), base
        return self.lr_at(step, base), base

    def piece(self, view: JobView, base_lr: float) -> wire.SchedulePiece | None:
        """This schedule for ``view``'s job as the client can evaluate it (None: no formula)."""
        if self.formula is None:
            return None
        return wire.SchedulePiece(name=self.formula, params=self.formula_params(base_lr, view),
                                  origin=self.step_origin(view))

    def propose(self, view: JobView) -> list[Proposal]:
        lr, base = self.lr_for(view)
        return [Proposal("lr", value=lr, schedule=self.piece(view, base),
                         reason=f"{self.name} at step {view.step}: x{lr:.6g} "
                                f"(reference x{base:.6g})")]
