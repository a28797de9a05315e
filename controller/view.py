"""What a policy reads: the frozen view of one job, its signals and its history.

:class:`~trimtab.controller.state.JobState` folds reports into running signals and hands
out a :class:`JobView` for each decision; policies read nothing else. The view is frozen:
a policy that keeps state of its own keeps it on itself (see docs/writing-policies.md).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trimtab.protocol import wire
from trimtab.protocol.ring import evicted_next

__all__ = ["Signals", "Sample", "Phase", "Unhealthy", "JobView"]


@dataclass(frozen=True)
class Signals:
    """A snapshot of a job's signals; ``None`` where not yet defined."""

    #: Exponentially weighted mean and variance of the reports' mean loss.
    loss_ema: float | None
    loss_var: float | None
    #: Latest loss_mean against the history before it (None during warm-up).
    loss_z: float | None
    #: The same for the mean gradient norm (before clipping), and its z-score.
    grad_norm_ema: float | None
    grad_norm_var: float | None
    grad_norm_z: float | None
    #: Least-squares slope of loss_mean per optimizer step over the slope window.
    slope: float | None
    #: Its standard error and t-statistic (slope / se).
    slope_se: float | None
    slope_t: float | None
    #: Points in the slope window now, and its capacity.
    slope_n: int
    slope_window: int
    #: Step of the oldest point in the slope window.
    slope_since_step: int | None
    #: The EMAs before the latest report was folded in: what its z-scores are measured
    #: against, and what a spike's size is best compared with.
    loss_ref: float | None = None
    grad_norm_ref: float | None = None
    #: The loss z-score of the report before the latest (None: none, or in warm-up): a
    #: spike that began at the first step of that window shows there, its lowest loss not
    #: yet raised.
    loss_z_before: float | None = None
    #: The loss EMA before the report before the latest was folded in: what a spike that
    #: began in that report is measured against (its mean has lifted the EMA since).
    loss_ref_before: float | None = None


@dataclass(frozen=True)
class Sample:
    """One report, condensed to what history-reading policies need; ``None`` where the
    report carried nothing."""

    #: The step at the window's end, and the window's length in training steps.
    step: int
    window: int
    #: The window's mean loss.
    loss_mean: float | None = None
    #: Mean, standard deviation and maximum of the window's gradient norms (before clipping).
    grad_norm_mean: float | None = None
    grad_norm_std: float | None = None
    grad_norm_max: float | None = None
    #: ||delta theta|| / ||theta|| over one sampled step of the window.
    update_ratio: float | None = None
    #: With gradient accumulation: mean squared micro-batch gradient norm, and micro-batches
    #: per step (the gradient-noise-scale estimate's inputs).
    micro_sq_norm_mean: float | None = None
    micro_batches: int | None = None
    #: trimtab's lr multiplier in force at the window's end (as the report says).
    lr: float | None = None
    #: Non-finite losses plus non-finite gradient steps in the window.
    nonfinite: int = 0
    #: The lr the optimizer used at the window's last step (the user's times ``lr``).
    lr_used: float | None = None
    #: Steps whose gradient norm sat at the loop's own clipping threshold: their norms
    #: are that threshold, not the gradient's.
    user_clipped: int = 0
    #: The window's lowest and highest finite loss.
    loss_min: float | None = None
    loss_max: float | None = None
    #: cos(g, -delta theta) of the window's first step (see the client's probe).
    update_alignment: float | None = None
    #: The loss of the window's last step (None: not finite, or not reported).
    loss_last: float | None = None

    @classmethod
    def of(cls, r: wire.Report) -> Sample:
        """The sample of one report."""
        return cls(r.step, r.window, r.loss_mean, r.grad_norm_mean, r.grad_norm_std,
                   r.grad_norm_max, r.update_ratio, r.micro_sq_norm_mean, r.micro_batches,
                   None if r.knobs.lr is None else r.scale.lr,
                   r.nonfinite_losses + r.nonfinite_grads, r.knobs.lr, r.user_clipped_steps,
                   r.loss_min, r.loss_max, r.update_alignment, r.loss_last)

    def to_list(self) -> list[Any]:
        return list(_sample_values(self))


# Made once: state_dict() turns every history sample into a list on every report.
_sample_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Sample)))


@dataclass(frozen=True)
class Phase:
    """A measurement phase that one policy holds for a job: the LR range test's sweep.

    It opens with the policy's first sweep proposal, at ``start_step``, and returns to
    the checkpoint at ``checkpoint`` when it ends, unless it ends in place (``in_place``:
    no rollback, the run went on from ``end_step``); while it is open the engine takes
    that policy's proposals only (see :mod:`~trimtab.controller.phases`). A policy holds
    at most one phase per job, ever.
    """

    policy: str
    start_step: int
    checkpoint: int
    #: The step it ended at (None: still open).
    end_step: int | None = None
    #: The LR it found (None: none, or still open).
    found_lr: float | None = None
    #: It ended where the run was, with no rollback (False: with its return to ``checkpoint``,
    #: or still open).
    in_place: bool = False
    #: The lr multiplier set at its end (None: none set, or still open).
    end_lr: float | None = None
    #: It started over from an earlier checkpoint (the steps before it ran too hot), not at
    #: the step it opened at.
    restarted: bool = False
    #: The value its opening proposal asked for (the sweep's first; None: not known).
    sweep_from: float | None = None
    #: The opening proposal's ``detail``, as its policy recorded it for the phase (the LR
    #: range test: the sweep's range, fixed when it opened); None: none, or an older save.
    opened: dict[str, Any] | None = None
    #: Times its policy started it over from ``checkpoint`` while it was open (the range
    #: test, while the data its sweep met was bad: see its ``data_restarts``).
    restarts: int = 0

    @property
    def resume_step(self) -> int:
        """The step the run went on from after the phase: the checkpoint it returned to, or
        the step it ended at in place."""
        return self.end_step if self.in_place and self.end_step is not None else self.checkpoint


@dataclass(frozen=True)
class Unhealthy:
    """Why a report is unhealthy: the most urgent cause (one of
    :data:`~trimtab.controller.health.CAUSES`) in ``cause``, and every cause found in
    ``reason``."""

    cause: str
    reason: str


@dataclass(frozen=True)
class JobView:
    """What a policy reads: a frozen snapshot of one job."""

    #: The job's id (one policy instance serves every job: key per-job state by it).
    job: str
    #: The run's id, new at each start of the training process.
    run_id: str
    #: The job's ``global_step`` (optimizer steps) at the latest report.
    step: int
    #: Training steps per report window.
    report_every: int
    #: What the client registered about the run's scale: parameter count, group sizes,
    #: optimizer, dtype, device, batch size, world size (see ``trimtab.protocol.wire``).
    facts: wire.ScaleFacts
    #: The controlled values with nothing changed: lr and weight-decay multipliers 1.0
    #: (the user's own values), momentum and clip as registered.
    initial: wire.Knobs
    #: The controlled values in force, as last reported or acknowledged by the client:
    #: lr and weight_decay are trimtab's multipliers on the user's values, momentum and
    #: clip absolute. A policy's factor multiplies these; its value replaces them.
    knobs: wire.Knobs
    #: The controlled values of a command sent but not yet acknowledged (None: nothing
    #: pending; a knob it leaves unchanged is None).
    pending: wire.Knobs | None
    #: Reports folded in so far (the latest included).
    reports_seen: int
    #: The running signals: EMAs, variances, z-scores and the loss slope.
    signals: Signals
    #: The latest report as received (its non-finite counts are for its window).
    last: wire.Report | None
    #: Non-finite losses over the whole run...
    nonfinite_losses_total: int
    #: ...and steps with non-finite gradients.
    nonfinite_grads_total: int
    #: Step of the last change the controller commanded, per knob (None: never).
    last_change_step: Mapping[str, int | None]
    #: The newest reports as samples, oldest first (at most ``SignalConfig.history``).
    history: tuple[Sample, ...] = ()
    #: Reports judged unhealthy for non-finite values over the whole run: persistent ones
    #: (a burst of bad batches that the client skipped, over within a report or the next,
    #: is not counted; see :class:`~trimtab.controller.health.DivergenceThresholds`).
    nonfinite_faults: int = 0
    #: ``(step, value)`` of the validation results reported, oldest first (lower is better).
    validations: tuple[tuple[int, float], ...] = ()
    #: ``(step, value)`` of the same validations measured on the client's weight average
    #: (``attach(..., ema=)``), where the run reported one; oldest first.
    validations_ema: tuple[tuple[int, float], ...] = ()
    #: The measurement phase open now (None: none).
    phase: Phase | None = None
    #: Phases that ended, oldest first.
    phases_done: tuple[Phase, ...] = ()
    #: The lr multiplier an LR range test found for this job (None: none ran or it found
    #: none); schedule policies take it as their reference.
    found_lr: float | None = None
    #: The values the optimizer used at the last reported (or acknowledged) step...
    effective: wire.Knobs = wire.Knobs()
    #: ...the user's own values then (what the loop or its scheduler set)...
    base: wire.Knobs = wire.Knobs()
    #: ...and the user's own values at registration (what an absolute lr a policy is
    #: configured with relates to where the client told no ``nominal_lr``: multiplier =
    #: lr / registered.lr).
    registered: wire.Knobs = wire.Knobs()
    #: The controller's judgement of the latest report (None: healthy, or not judged yet):
    #: :func:`~trimtab.controller.health.assess` under ``[rollback.health]``, made once per
    #: report and shared by the rollback manager and every policy that reads it.
    health: Unhealthy | None = None
    #: How many of its newest checkpoints the client keeps besides the newest stable one,
    #: as it registered (None: not told); ``evicted_next()`` gives those of the latest
    #: listing its next snapshot evicts (a command that refers to one may find it gone).
    checkpoint_keep: int | None = None
    #: The lr the client's own torch scheduler scales for group 0 (its ``initial_lr``, or
    #: OneCycleLR's ``max_lr``), as it registered: what an absolute lr a policy is
    #: configured with relates to, with ``registered.lr`` where it is None (not told: no
    #: scheduler, or an older client).
    nominal_lr: float | None = None
    #: Whether the job's loss is expected to fall as it learns (False: the client attached
    #: with ``loss_trend=False``, a policy-gradient or GAN generator loss): a policy that
    #: reads the loss's trend, level or curve as evidence about the knobs stays out.
    loss_trend: bool = True
    #: Whether the job's optimizer already held state when the client attached (a run
    #: continued from its own checkpoint without trimtab's state): its LR has run before,
    #: and a policy that looks for evidence at a run's start stays out.
    warm_start: bool = False
    #: The highest lr of the client's param groups over group 0's, as it registered (1:
    #: group 0's is the highest). ``effective.lr``, ``registered.lr`` and ``nominal_lr`` are
    #: group 0's; with layer-wise LR decay group 0 is the input layer at a fraction of the
    #: head's lr, and an absolute lr relates to the highest: group 0's times this.
    lr_spread: float = 1.0
    #: The step at which a climb rollback's restored checkpoint scored as high as the run
    #: before it (the loss rose with the data, not the weights): no climb verdicts for the
    #: job from then on (None: none; see ``RollbackState.check_climb``).
    climb_moved: int | None = None
    #: Whether a climb rollback's restored checkpoint is being scored now (its first two
    #: reports): a loss above the checkpoint's is then what the check measures, no spike.
    climb_checking: bool = False

    def evicted_next(self) -> frozenset[int]:
        """The checkpoints of the latest report's listing that the client's next snapshot
        evicts: those not among its ``checkpoint_keep`` newest once that snapshot is taken,
        bar the newest stable one. A command that refers to one may find it gone. Not told
        ``checkpoint_keep``, the oldest checkpoint that is not the stable one.

        >>> from trimtab.controller.state import JobState
        >>> st = JobState.from_register(wire.Register(job="j", run_id="r", report_every=5,
        ...     knobs=wire.Knobs(lr=0.1), facts=wire.ScaleFacts(param_count=1, group_sizes=[1],
        ...     optimizer="SGD", dtype="float32", device="cpu"), keep=3))
        >>> st.observe(wire.Report(job="j", seq=1, step=60, window=5, knobs=wire.Knobs(lr=0.1),
        ...                        checkpoints=[0, 40], stable_step=0))
        >>> sorted(st.view().evicted_next())  # a ring of 3 holding one: nothing goes
        []
        """
        if self.last is None:
            return frozenset()
        held, stable = sorted(self.last.checkpoints), self.last.stable_step
        if self.checkpoint_keep is None:
            ring = [s for s in held if s != stable]
            return frozenset(ring[:1])
        # The client's own rule, on its listing with the next snapshot (newer than all).
        return frozenset(evicted_next(held, stable, self.checkpoint_keep))

    def since_change(self, knob: str) -> tuple[Sample, ...]:
        """History samples whose whole window ran after ``knob`` last changed."""
        last = self.last_change_step.get(knob)
        if last is None:
            return self.history
        return tuple(s for s in self.history if s.step - s.window >= last)
