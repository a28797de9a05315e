"""LR range test: sweep the LR up at the start of the run, pick one, and go on from its best.

The rule (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", sec. 3.3:
train while the LR rises and read the usable range off the loss; as practised by
fastai's ``lr_find`` and torch-lr-finder's ``LRFinder``, whose conventions give the
defaults), in the run itself:

* **Sweep.** From the first report that lists a checkpoint, the LR rises exponentially
  from ``min_lr`` to ``max_lr`` over ``sweep_steps`` optimizer steps,
  ``lr(t) = min_lr x (max_lr / min_lr) ** (t / sweep_steps)`` with ``t`` the steps since
  the sweep began. With live schedules (the controller's default) the client follows it
  at every step (an ``exponential`` schedule, torch's ExponentialLR, from the step the
  sweep opened), so the LR each step sees does not depend on when commands arrive; without
  them it is set once per report. Unless set, ``min_lr`` and ``max_lr`` span
  ``[min_factor, max_factor] x`` the registered LR joined with the optimizer family's
  sane range at the job's global batch (:meth:`ScaleContext.lr_range
  <trimtab.controller.scale.ScaleContext.lr_range>`, the range the governor's derived
  bounds already admit), so a run registered decades away from a workable LR still
  sweeps across one (``family_range=False``: the registered LR's band only).
* **Smoothing.** Each report's mean loss goes into a bias-corrected exponential moving
  average with ``beta`` per optimizer step (``beta ** window`` per report; fastai's 0.98).
* **Stop.** When the smoothed loss passes ``diverge_factor`` x its lowest (fastai's 4,
  torch-lr-finder's 5), a loss or gradient is non-finite, or ``sweep_steps`` are done; or,
  once the smoothed loss has fallen ``min_drop`` below its first value, as soon as a
  report's mean loss turns up past ``turn_ratio`` x the sweep's lowest report: in a run
  (not fastai's throw-away copy) the LR past the low ruins the weights within a few
  reports, long before the smoothed loss reaches 4x its low. A loss that goes below 0 (a
  noise or likelihood term) has no meaningful ratio to its lowest: there each "x its
  lowest" bar is a rise off the lowest of that many times the fall to it (``past``).
* **Pick.** ``"min"``: the LR at the lowest smoothed loss divided by ``pick_divisor``
  (fastai's ``lr_min``: a tenth of where the loss bottoms out, which the smoothing's lag
  puts a little late); ``"steepest"``: the LR where the smoothed loss falls fastest
  against log LR, up to its lowest point (torch-lr-finder's suggestion, fastai's
  ``lr_steep``). A sweep of a run too low (it began at the run's own multiplier) never
  picks below where it began: when "min" would, it picks halfway up, in log, from there to
  the lowest smoothed loss. No pick when fewer than ``min_points`` reports came in, or the smoothed
  loss never fell ``min_drop`` below its first value (a flat-then-up curve says nothing
  about where to train): the job keeps the LR it registered.
* **End in place.** With a pick, when the latest report is finite, healthy (the
  controller's verdict) and its mean loss within ``keep_within`` x the sweep's lowest
  report, the smoothed loss at its lowest at most one report before, the run is at its
  best and the sweep's steps were training: the phase ends where the run is
  (``Proposal.end_in_place``), no rollback, the LR set to the pick x ``start_fraction``,
  and the phase is journaled as ended in place at that step and LR. By default only a
  sweep that started over because the run ran too hot may end so (and stop at the turn);
  ``end_in_place = "always"`` lets every sweep, ``"never"`` none.
* **Bad data.** A sweep that started over from an earlier checkpoint because the run blew
  up, whose reports so far each stand whole above ``explode_ratio`` x the highest loss the
  run reported from that checkpoint up to the blow-up, is reading bad batches (at its
  first LRs the weights barely move off the checkpoint's): the blow-up was theirs. It
  starts over from its checkpoint while they last (``data_restarts`` times at most: past
  them, back to the checkpoint at the run's own LR, no pick), and once a report is clean
  ends in place with no pick: the evidence for the sweep was the data's, the run keeps
  its own LR.
* **Return.** Otherwise a planned rollback to the checkpoint where the sweep began (the
  engine marks it stable when the sweep opens), the LR set to the pick x ``start_fraction``
  (1 for a schedule that starts at its reference LR, such as cosine; ``1 / div_factor``
  for ``one_cycle``, the warm-up's start factor for ``warmup``, so that the schedule
  takes over without the governor's rate limits in the way). The pick becomes the job's
  ``found_lr``: schedule policies whose own reference LR is not configured take it. The
  decision journals the curve, ``(lr, smoothed loss)`` per report. The run pays at most
  the sweep's steps (:meth:`LrRangeTest.resume_at` keeps the sweep's progress where it
  can), and none of those it kept in place.

The knob model: trimtab steers a multiplier on the user's own lr, so the sweep is a sweep
of the multiplier (``min_lr``/``max_lr`` and the family's range, which are absolute, are
divided by :func:`own_lr`, the highest lr the loop has run at, once, when the sweep
opens: the range is kept with the phase, ``Phase.opened``), the curve is the smoothed loss
against the multiplier, and the pick, ``found_lr``, is a multiplier on the user's lr.

The sweep is a measurement phase of the engine: while it runs only this policy's
proposals count, its values get past every governor limit but the bounds (so
``max_lr`` above the bounds, 10 x the registered LR by default, is cut to them; widen
``[governor.lr] max_rel`` with it), and the rollback neither escalates nor counts
against the rollback budget (see :mod:`trimtab.controller.engine`). A job has one range
test, ever: the phase is kept in the job's state, so a restarted controller stays quiet
too. Without checkpoints (``checkpoint_every=0``) there is nothing to return to, and no
sweep starts.

>>> from trimtab.policies.lr_range_test import pick_lr, smooth
>>> curve = smooth([(1e-3, 1.0, 10), (1e-2, 0.5, 10), (1e-1, 0.2, 10), (1.0, 5.0, 10)], 0.0)
>>> pick_lr(curve, "min", 10.0)
0.01
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.policies.sdk import (
    JobView,
    Phase,
    Policy,
    Proposal,
    Sample,
    ScaleContext,
    SchedulePiece,
    fell_below,
    lined_up,
    past,
    past_bar,
    pick_lr,
    smooth,
    stop_reason,
)

__all__ = ["LrRangeTest", "LrRangeTestConfig", "own_lr", "smooth", "pick_lr", "stop_reason"]

#: The rollback cause (and metric label) of the return.
CAUSE = "lr_range_test"


class LrRangeTestConfig(BaseModel):
    """The range test's settings; see the module docstring for the rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The sweep's first LR (absolute); None: ``min_factor`` x the user's own LR.
    min_lr: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    #: The sweep's last LR (absolute); None: ``max_factor`` x the user's own LR.
    max_lr: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    min_factor: float = Field(1e-2, gt=0.0, allow_inf_nan=False)
    #: 10: the default governor's ``max_rel``, past which the bounds would cut the sweep.
    max_factor: float = Field(10.0, gt=0.0, allow_inf_nan=False)
    #: Join the default span with the optimizer family's sane LR range at the job's batch.
    family_range: bool = True
    #: Optimizer steps from ``min_lr`` to ``max_lr``.
    sweep_steps: int = Field(200, ge=2)
    #: EMA weight of the previous smoothed loss, per optimizer step; a sweep shorter than
    #: 10 / (1 - beta) steps smooths over a tenth of its steps instead (see
    #: :meth:`LrRangeTest.sweep_beta`).
    beta: float = Field(0.98, ge=0.0, lt=1.0)
    #: Stop when the smoothed loss passes this multiple of its lowest.
    diverge_factor: float = Field(4.0, gt=1.0, allow_inf_nan=False)
    pick: Literal["min", "steepest"] = "min"
    #: ``"min"`` picks the LR of the lowest smoothed loss divided by this.
    pick_divisor: float = Field(10.0, ge=1.0, allow_inf_nan=False)
    #: Reports needed for a pick.
    min_points: int = Field(4, ge=2)
    #: The lowest smoothed loss must lie this fraction below the first for a pick...
    min_drop: float = Field(0.02, ge=0.0, lt=1.0)
    #: ...and this many standard errors of a report's mean loss (its window's range over
    #: the expected range of as many normal draws, over the square root of its steps; the
    #: median over the sweep's reports): a loss whose batches spread it 2x either way
    #: "falls" 8% at an LR that moves nothing (a small-batch regression 10x too cold: the
    #: sweep stopped at its "turn" and picked a thousandth of the run's LR).
    min_drop_noise: float = Field(2.0, ge=0.0, allow_inf_nan=False)
    #: The LR set with the rollback is the pick times this.
    start_fraction: float = Field(1.0, gt=0.0, le=1.0)
    #: Stop too once the loss has fallen (the smoothed loss ``min_drop`` below its first)
    #: and a report's mean loss then passes this multiple of the sweep's lowest report
    #: (None: only the ``diverge_factor`` stop): past its low, a run blows up within a few
    #: reports, long before the smoothed loss reaches 4x its lowest.
    turn_ratio: float | None = Field(1.5, gt=1.0, allow_inf_nan=False)
    #: End in place, no rollback, when an LR was picked and the latest report's mean loss is
    #: finite, healthy and within ``keep_within`` x the sweep's lowest report, the smoothed
    #: loss at its lowest at most a report before: the run is at its best, and the sweep's
    #: steps were training. ``"restarted"``: only for a sweep that started over from an
    #: earlier checkpoint because the run ran too hot (its weights trained at the sweep's
    #: low LRs only); a sweep of a run that had trained for a while at too low an LR climbs
    #: far past the pick and goes back (kept in place, the digits CNN started 100x too low
    #: ended 2.4-3x worse in the quick grid). ``"always"`` (True), ``"never"`` (False: always
    #: roll back). The ``turn_ratio`` stop applies where an end in place may. 1.6: measured
    #: on the digits CNN started 10x and 30x too hot, 8 seeds (2.0 kept runs the turn had
    #: already worn down).
    end_in_place: Literal["restarted", "always", "never"] | bool = "restarted"
    keep_within: float = Field(1.6, ge=1.0, allow_inf_nan=False)
    #: A sweep that started over from an earlier checkpoint because the run blew up, whose
    #: reports so far each stand whole (their lowest loss) above ``explode_ratio`` x the
    #: highest loss the run reported from that checkpoint up to the blow-up, measures the
    #: data, not the LR: at the sweep's first LRs the weights barely move from the
    #: checkpoint's, so such a loss is bad batches (a burst of corrupted targets, or
    #: inputs), and the blow-up that opened the sweep was theirs. The sweep then starts
    #: over from its checkpoint, up to this many times, so the run does not train through
    #: them; once a report is clean again, the evidence for the sweep is gone and it ends in
    #: place with no pick, the run's own LR restored (past this many: back to its checkpoint
    #: at the run's own LR, no pick). 0: never (the sweep reads whatever comes). Measured
    #: with ``python -m bench.faults --fault-at 50``: twenty corrupted batches at iteration
    #: 50 of a tuned run opened a sweep that read them and picked x0.003 of its LR; the runs
    #: ended 2.3x and 74x their clean ones.
    data_restarts: int = Field(5, ge=0)
    #: When the sweep runs: ``"evidence"`` only when the run shows its LR is far off (see
    #: :meth:`LrRangeTest.evidence`), ``"always"`` at the start of every run.
    when: Literal["evidence", "always"] = "evidence"
    #: Reports the evidence is looked for in, from the run's first live report on.
    evidence_reports: int = Field(20, ge=2)
    #: Too high: in one of the first ``explode_reports`` reports after the first, a whole
    #: window (its lowest loss) stood above every loss before and this multiple of the
    #: lowest (it blew up)...
    explode_ratio: float = Field(4.0, gt=1.0, allow_inf_nan=False)
    explode_reports: int = Field(4, ge=1)
    #: ...or a later window's mean stands this fraction above the first report's (and, in
    #: a run whose mean fell below half the first's, its last or lowest loss too).
    rise: float = Field(0.05, ge=0.0, allow_inf_nan=False)
    #: Too low: after ``flat_reports`` reports the loss fell less than this fraction (the
    #: mean of the first 3 reports against the last 3; only where such a fall stands
    #: ``min_drop_noise`` standard errors clear of the batches' noise).
    flat_drop: float = Field(0.02, ge=0.0, lt=1.0, allow_inf_nan=False)
    flat_reports: int = Field(20, ge=3)
    #: Too low, too: the median update alignment (``cos(g, -dtheta)``, the hypergradient's
    #: sign, reported by the client) of the reports in the second half of the evidence
    #: window, at least ``align_reports`` of them, above this, and no more than a fifth of
    #: them at or below 0 (None: not used). Measured
    #: on the benchmark's five tasks, 4 seeds, reports 10-20 of 5 steps: at the tuned LR
    #: -0.19..+0.05; at a tenth of it +0.22..+0.52 (char, GPT, width MLP; the digits CNN
    #: +0.11..+0.25); the early steps of every run are positive, hence the second half.
    align_low: float | None = Field(0.15, gt=0.0, lt=1.0, allow_inf_nan=False)
    align_reports: int = Field(5, ge=1)
    #: A rise (``rise``) is no evidence when the updates of the reports so far, at least
    #: this many of them, lined up the same way (median over ``align_low``, at most a
    #: fifth at or below 0): each step went downhill and the loss rose anyway, so what the
    #: run fits moves (a policy-gradient loss). Until this many, a rise whose alignments
    #: are all above 0 waits a report. Measured: the hot runs whose loss rose, 5 in the
    #: quick grid and 8 in ``bench.tuned`` (digits CNN, noisy quadratic, GPT loop), had a median
    #: of -0.66..+0.09 up to the rise and one at or below 0 among their first two; a
    #: tuned PPO on CartPole lined up at +0.11..+0.30 from its first reports on.
    rise_align_reports: int = Field(3, ge=1)
    #: A rise (``rise``) is no evidence while the median update ratio (``|dtheta| /
    #: |theta|`` per step, reported by the client) of the reports so far is below this
    #: (None: not used): updates that small do not overshoot, and a loss on a plateau
    #: rises and falls with its batches' noise. A sweep trial's tanh MLP, its loss on a
    #: plateau near its initial value for 100-150 steps at its best lrs (0.004-0.013),
    #: was swept on a 5-7% rise and ended near that initial loss in 5 of 12 runs
    #: (``python -m bench.plateau``). Measured (median of the first 6 reports): the
    #: benchmark's too-hot starts whose loss rose at 0.019-0.12 (the GPT loop at 10x, the
    #: digits CNN at 10x and 30x), its tuned runs at 0.0027-0.107 (none of which rose).
    rise_update_ratio: float | None = Field(0.02, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _rising(self) -> LrRangeTestConfig:
        if self.min_lr is not None and self.max_lr is not None and self.min_lr >= self.max_lr:
            raise ValueError(
                f"min_lr={self.min_lr} is not below max_lr={self.max_lr}; the "
                "sweep rises: min_lr must be < max_lr"
            )
        if self.min_factor >= self.max_factor:
            raise ValueError(
                f"min_factor={self.min_factor} is not below max_factor="
                f"{self.max_factor}; min_factor must be < max_factor"
            )
        return self


#: A run whose first report the controller observed ends later than this many windows
#: into it was met past its start (a registration and its first reports may be a window or
#: two late): no evidence is read from it.
_MET_LATE_WINDOWS = 3


def own_lr(view: JobView) -> float | None:
    """The user's own lr that absolute lr settings relate to: the highest it has been so
    far (at registration, in the reports kept, at the latest report). A loop's warm-up
    registers a fraction of the lr it runs at (LambdaLR's first factor: 1/30 of it in
    the benchmark's GPT), and a range of absolute LRs divided by that fraction would sweep
    and pick 30x too high; its decay after the peak leaves the peak as the run's scale.
    The reports' lr is param group 0's; it is taken to the highest group's
    (``view.lr_spread``): with layer-wise LR decay group 0 is the input layer, at 1/270 of
    the head's lr on a 12-block ViT, and a sweep of the family's range divided by it ran
    the head from 2.7x its own lr up, held at the cap for most of the sweep.

    >>> from trimtab.controller.state import JobState
    >>> from trimtab.protocol import wire
    >>> own_lr(JobState.from_register(wire.Register(job="j", run_id="r", report_every=5,
    ...     knobs=wire.Knobs(lr=1e-5), facts=wire.ScaleFacts(param_count=1, group_sizes=[1],
    ...     optimizer="AdamW", dtype="float32", device="cpu"))).view())
    1e-05
    """
    seen = [x for x in (view.registered.lr, view.base.lr) if x is not None and x > 0]
    seen += [s.lr_used / s.lr for s in view.history
             if s.lr_used is not None and s.lr and s.lr_used > 0]
    top = max(seen, default=view.registered.lr)
    return None if top is None else top * view.lr_spread


class LrRangeTest(Policy):
    """An exponential LR sweep at the start, its pick handed on, the run rolled back."""

    name: ClassVar[str] = "lr_range_test"
    Config: ClassVar[type[BaseModel]] = LrRangeTestConfig

    def sweep_range(self, view: JobView) -> tuple[float, float]:
        """``(first, last)`` lr multiplier of the sweep for ``view``'s job: the range its
        open sweep recorded when it opened, else as it would open now (the absolute
        ``min_lr``, ``max_lr`` and family range as multipliers on :func:`own_lr`)."""
        phase = view.phase
        if phase is not None and phase.policy == self.name and phase.opened:
            fixed = phase.opened.get("range")
            if isinstance(fixed, (list, tuple)) and len(fixed) == 2:
                return float(fixed[0]), float(fixed[1])
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        lr = view.initial.lr  # 1.0: the user's own lr
        own = own_lr(view)  # what the absolute values relate to
        if (cfg.min_lr is None or cfg.max_lr is None) and lr is None:
            raise ValueError("no min_lr/max_lr configured and the job registered no lr")
        if (cfg.min_lr is not None or cfg.max_lr is not None) and not own:
            raise ValueError("min_lr/max_lr are absolute and the job registered no lr of its "
                             f"own to relate them to (got {own!r})")
        family = ScaleContext.from_facts(view.facts).lr_range() if cfg.family_range else None
        if family is not None and own:
            family = (family[0] / own, family[1] / own)
        else:
            family = None
        if cfg.min_lr is not None:
            lo = cfg.min_lr / own  # type: ignore[operator]
        else:
            lo = cfg.min_factor * lr  # type: ignore[operator]
            lo = lo if family is None else min(lo, family[0])
        if cfg.max_lr is not None:
            hi = cfg.max_lr / own  # type: ignore[operator]
        else:
            hi = cfg.max_factor * lr  # type: ignore[operator]
            hi = hi if family is None else max(hi, family[1])
        if not lo < hi:
            raise ValueError(
                f"the sweep would run from {lo:.6g} down to {hi:.6g}; set min_lr "
                "and max_lr so that min_lr < max_lr"
            )
        return lo, hi

    def sweep_beta(self) -> float:
        """The per-step EMA weight the sweep's losses are smoothed with: ``beta``, but at
        most ``1 - 10 / sweep_steps``. An EMA remembers ~1/(1 - beta) steps: at 0.98, 50,
        which on a 60-step sweep (the benchmark's, fitted to a 300-step run) is most of
        it; the smoothed loss then lags the fall near the sweep's end and sees no fall or
        picks the last point. Remembering a tenth of the sweep keeps it local.

        >>> LrRangeTest({"sweep_steps": 1000}).sweep_beta()
        0.98
        >>> round(LrRangeTest({"sweep_steps": 80}).sweep_beta(), 3)
        0.875
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        return min(cfg.beta, max(0.0, 1.0 - 10.0 / cfg.sweep_steps))

    def lr_at(self, steps: int, lo: float, hi: float, skip: int = 0) -> float:
        """The sweep's LR ``steps`` optimizer steps after it began; ``skip``: the steps of
        the full sweep from ``lo`` it left out at its start (:meth:`skipped`)."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        return lo * (hi / lo) ** (min(steps + skip, cfg.sweep_steps) / cfg.sweep_steps)

    def skipped(self, lo: float, hi: float, first: float | None) -> int:
        """The steps of the full sweep from ``lo`` to ``hi`` below ``first``, where a sweep
        for an LR far too low begins (the multiplier in force: the values below it are
        known to be too low, and their steps would be lost). 0 from ``lo``.

        >>> LrRangeTest({"sweep_steps": 200}).skipped(0.01, 10.0, 1.0)
        133
        """
        if first is None or not lo < first < hi:
            return 0
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        return int(round(cfg.sweep_steps * math.log(first / lo) / math.log(hi / lo)))

    def trajectory(self, start: int, lo: float, hi: float, skip: int = 0) -> SchedulePiece:
        """The sweep as a schedule from global step ``start`` (torch's ExponentialLR with
        ``gamma = (hi / lo) ** (1 / sweep_steps)``), which the client follows step by step
        when the controller sends live schedules; it begins ``skip`` steps into it."""
        gamma = (hi / lo) ** (1.0 / self.config.sweep_steps)  # type: ignore[attr-defined]
        return SchedulePiece(name="exponential",
                             params={"lr": self.lr_at(0, lo, hi, skip), "gamma": gamma},
                             origin=start)

    def propose(self, view: JobView) -> list[Proposal]:
        if any(p.policy == self.name for p in view.phases_done):
            return []  # one range test per job
        if not view.loss_trend and view.phase is None:
            # A loss not expected to fall (attach(loss_trend=False): PPO's, a GAN
            # generator's) is no evidence about the LR, and a sweep reads its curve: none.
            return []
        phase = view.phase
        if phase is not None and phase.policy != self.name:
            return []
        if phase is None and ScaleContext.from_facts(view.facts).reads_lr_once:
            return []  # its lr is not steered (Rprop): a sweep would measure nothing
        lo, hi = self.sweep_range(view)
        if phase is None:
            listed = view.last.checkpoints if view.last is not None else []
            if not any(s <= view.step for s in listed):
                return []  # nothing to return to (yet)
            found = (("always", "configured to run always")
                     if self.config.when == "always" else self.evidence(view))  # type: ignore[attr-defined]
            if found is None:
                return []  # the run's own LR is the prior: no evidence it is far off
            kind, why = found
            start, detail, where = view.step, None, ""
            # Too low: the LRs below the one in force are known to be too low, the sweep
            # begins there (its steps train, at an LR no lower than the run's own).
            skip = (self.skipped(lo, hi, view.knobs.lr or view.initial.lr)
                    if kind == "low" else 0)
            oldest = min(s for s in listed if s <= view.step)
            if kind == "high" and oldest < view.step:
                # The steps so far ran too hot: their state may be ruined (a dead network
                # sweeps to nothing). The sweep starts over from the oldest checkpoint.
                start, detail = oldest, {"restart_from": oldest}
                before = _losses_after(view, oldest)
                if before is not None:
                    detail["before"] = before  # what the checkpoint's weights gave before
                where = f", from the checkpoint at step {oldest}"
            first = self.lr_at(0, lo, hi, skip)
            # The range is fixed for the sweep: the loop's own lr may move under it.
            detail = {**(detail or {}), "range": [lo, hi]}
            return [
                Proposal.sweep_value(
                    "lr",
                    first,
                    f"LR range test starts ({why}): lr x{first:.3g} -> "
                    f"x{hi:.3g} over {self.config.sweep_steps - skip} steps{where}",  # type: ignore[attr-defined]
                    detail=detail,
                    schedule=self.trajectory(start, lo, hi, skip),
                )
            ]
        return self._during(view, phase, lo, hi)

    def far_off(self, view: JobView) -> str | None:
        """Why the run's own LR looks far off (None: no evidence); see :meth:`evidence`."""
        found = self.evidence(view)
        return None if found is None else found[1]

    def evidence(self, view: JobView) -> tuple[str, str] | None:
        """``(kind, why)``: the run's own LR looks far too ``"high"`` or too ``"low"``
        (None: no evidence, the sweep does not run).

        Within the first ``evidence_reports`` reports of the run's path (from its start;
        after a resume or a rollback to an early step, those before it and since), an LR far
        too high shows as persistent non-finite values, as a loss that blows up (a whole
        window, its lowest loss, above every loss before and ``explode_ratio`` times the
        lowest, in one of the first ``explode_reports`` reports after the first: a fast
        fall from the initial loss, noisy batches or a few bad ones spread a window as
        widely, but never lift its lowest loss), as a window that jumps whole above the one
        before (its lowest above that one's highest and twice its lowest), or as a window
        whose mean rises above the first report's by ``rise`` (in a run that has trained,
        its last or lowest loss too; not while the updates kept lining up with the next
        gradient, see ``rise_align_reports``, nor under updates smaller than
        ``rise_update_ratio``); one far too low as updates that keep lining up with
        the next gradient (a median ``update_alignment``
        over ``align_low`` in the second half of the window, while the loop's LR holds), or
        a loss that fell less than ``flat_drop`` over the first ``flat_reports`` reports
        while the LR the optimizer used held within 1.5x (a loop's own warm-up is no
        evidence). Each is measured on the benchmark's tasks to stay quiet at a tuned LR
        (``python -m bench.tuned``); a run that shows none keeps its own LR untouched.
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        # Counted on the run's path (its history): a run resumed at an early step, or rolled
        # back to one, is at its start again (counting every report seen, a run killed at
        # step 120 and resumed from step 0 was past its evidence window by step 90).
        if len(view.history) > cfg.evidence_reports or not view.history:
            return None  # past the start of the run: its LR has proved itself
        seen = view.history
        if seen[0].step - seen[0].window > _MET_LATE_WINDOWS * view.report_every:
            # The controller met the run past its first windows (it started late, restarted
            # without its journal, or took the name over from another run): what it sees
            # first is a run that has trained a while, not its start. A notebook re-trial:
            # a run taken over at ~step 120 (12 windows; 20 were allowed) was swept on a
            # noise rise, rolled back to its attach snapshot, and its sweep then read the
            # initial loss as bad data against losses it had only seen from step 120 on.
            return None
        if view.warm_start:
            # The optimizer had stepped before it was attached (a run continued from its
            # own checkpoint, without trimtab's state): past its start, too. A regression
            # trained to its floor and continued so was swept on noise ("the loss rose"
            # 7% in a window of batches spread 2x) and ended 1.07x worse than bare.
            return None
        if view.nonfinite_faults:
            # Persistent ones only: a burst of bad batches the client skipped is no
            # evidence about the LR (see DivergenceThresholds.nonfinite_isolated).
            return "high", (f"non-finite values in the first {view.reports_seen} reports: "
                            f"{view.nonfinite_losses_total} losses, "
                            f"{view.nonfinite_grads_total} gradient steps")
        losses = [s.loss_mean for s in seen if s.loss_mean is not None]
        hot = _blew_up(seen[:cfg.explode_reports + 1], cfg.explode_ratio) or _jumped(seen)
        if hot is not None:
            return "high", hot
        rose = _rose(seen, losses, cfg.rise)
        if rose is not None and self._small_updates(seen):
            # Updates this small do not overshoot: a plateau's noise, not an lr far too
            # high. No evidence of that; the rules for an lr far too low still read the run.
            rose = None
        if rose is not None:
            moving = self._target_moves(seen)
            if moving is None:
                return None  # too few alignments yet, every one of them lined up: wait
            if moving:
                # The loss rose while nearly every update lined up with the next gradient:
                # each step went downhill and the loss rose anyway, so what the run fits
                # moves (PPO's value loss grows with its returns: a tuned CartPole run,
                # alignment +0.11..+0.30 over its first reports, was swept to x0.002-x0.14
                # and ended at a tenth of its bare return). The loss says nothing of this
                # LR, either way: no evidence.
                return None
            return "high", rose
        low = self._aligned(view)
        if low is not None:
            return "low", low
        if len(losses) >= cfg.flat_reports and not _warming(seen[:cfg.flat_reports]):
            # (A loop still warming its LR up is not flat at a bad LR: its LR is moving.)
            head, tail = losses[:3], losses[cfg.flat_reports - 3:cfg.flat_reports]
            start, now = sum(head) / len(head), sum(tail) / len(tail)
            # The first report's lowest loss is about the initial one: a run whose loss
            # jumped in its first steps and settled back has a high head mean but no fall.
            first = seen[0].loss_min if seen[0].loss_min is not None else start
            if start > 0 and now > min(start, first) * (1.0 - cfg.flat_drop):
                if not self._resolves(seen[:cfg.flat_reports], min(start, first), len(head)):
                    return None  # a fall of flat_drop would be lost in the batches' noise
                peak = max((x.loss_max for x in seen[:cfg.explode_reports + 1]
                            if x.loss_max is not None), default=0.0)
                # Stuck after a jump far above where it began: too hot (a dead network),
                # not too cold.
                kind = "high" if first > 0 and peak > cfg.explode_ratio * first else "low"
                return kind, (f"loss {min(start, first):.4g} -> {now:.4g} over the first "
                              f"{cfg.flat_reports} reports: it did not fall "
                              f"{cfg.flat_drop:.0%}")
        return None

    def _resolves(self, seen: Sequence[Sample], level: float, n: int) -> bool:
        """Whether a fall of ``flat_drop`` of ``level`` stands ``min_drop_noise`` standard
        errors of an ``n``-report mean loss (:func:`mean_noise`, the median over ``seen``,
        over the square root of ``n``) clear: else "it did not fall" is no measurement. A
        model trained to its floor and attached fresh (a fine-tune or a continued run on
        the same data) sits there with batch noise of about twice a 2% fall over three
        reports (a regression at batch 32: 0.47-0.60 of the bar), and was swept and rolled
        back, ending 1.08-1.15x worse than bare; the benchmark's runs whose loss did not
        fall (the digits CNN 10x and 100x too cold, the width MLP too hot) stood 17-123
        standard errors clear. True where no report has a range."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        noise = median_noise(seen)
        return noise is None or cfg.flat_drop * level >= cfg.min_drop_noise * noise / math.sqrt(n)

    def _small_updates(self, seen: Sequence[Sample]) -> bool:
        """Whether the median update ratio of ``seen`` is below ``rise_update_ratio``
        (False where that is off or no report carries a ratio)."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        ratios = [s.update_ratio for s in seen if s.update_ratio is not None]
        return (cfg.rise_update_ratio is not None and bool(ratios)
                and statistics.median(ratios) < cfg.rise_update_ratio)

    def _target_moves(self, seen: Sequence[Sample]) -> bool | None:
        """Whether the updates of ``seen`` (the reports so far) kept lining up with the
        next gradient (:func:`lined_up`: over ``align_low``, at least
        ``rise_align_reports`` of them): True, a loss that rose there is a moving target,
        no overshoot. None: fewer than that yet and every one above 0 (wait for more).
        False otherwise, and where no report carries an alignment (a sharded model)."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        if cfg.align_low is None:
            return False
        found = [s.update_alignment for s in seen if s.update_alignment is not None]
        if lined_up(found, cfg.align_low, cfg.rise_align_reports):
            return True
        if found and len(found) < cfg.rise_align_reports and min(found) > 0.0:
            return None
        return False

    def _aligned(self, view: JobView) -> str | None:
        """Why the updates say the LR is too low (None: they do not, or too few said)."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        if cfg.align_low is None:
            return None
        late = view.history[cfg.evidence_reports // 2:cfg.evidence_reports]
        seen = [s.update_alignment for s in late if s.update_alignment is not None]
        if len(seen) < cfg.align_reports or _warming(late):
            return None  # too few, or the loop's own LR still moving (a warm-up)
        # Nearly all of them, too: one sampled step per report spreads a tuned run's
        # alignment +-0.3, and a noisy one's first five (+0.25, +0.17, +0.50, -0.04, -0.30)
        # had a median over the line; a run far too low lines up at almost every report.
        if not lined_up(seen, cfg.align_low, cfg.align_reports):
            return None
        median = statistics.median(seen)
        against = sum(1 for a in seen if a <= 0.0)
        return (f"each update lined up with the next gradient: median cos(g, -update) "
                f"{median:+.2f} > {cfg.align_low:g} over {len(seen)} reports from report "
                f"{cfg.evidence_reports // 2 + 1} ({len(seen) - against} of them above 0), "
                "a larger LR would have gone further")

    def _during(self, view: JobView, phase: Phase, lo: float, hi: float) -> list[Proposal]:
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        samples = [
            s for s in view.history if s.step - s.window >= phase.start_step and s.lr is not None
        ]
        points = [
            (
                s.lr,
                math.inf
                if s.nonfinite or s.loss_mean is None or not math.isfinite(s.loss_mean)
                else s.loss_mean,
                s.window,
            )
            for s in samples
        ]
        curve = smooth(points, self.sweep_beta())  # type: ignore[arg-type]
        done = view.step - phase.start_step
        skip = self.skipped(lo, hi, phase.sweep_from)
        bad = self.bad_data(phase, samples)
        if bad is not None:
            if phase.restarts < cfg.data_restarts:
                return [Proposal.sweep_value(
                    "lr", self.lr_at(0, lo, hi, skip),
                    f"LR range test starts over from the checkpoint at step "
                    f"{phase.checkpoint} ({phase.restarts + 1} of {cfg.data_restarts}): "
                    f"{bad}", detail={"restart_from": phase.checkpoint},
                    schedule=self.trajectory(phase.start_step, lo, hi, skip))]
            return [Proposal.roll_back(
                CAUSE, f"LR range test ends, no pick: {bad}, still after "
                f"{phase.restarts} restarts; back to step {phase.checkpoint} at the run's "
                "own LR", to_step=phase.checkpoint, value=view.initial.lr,  # type: ignore[arg-type]
                detail={"found_lr": None, "stop": "bad data", "start_step": phase.start_step,
                        "checkpoint": phase.checkpoint, "end": "rollback"})]
        if phase.restarts and samples:
            # The data is clean again: the blow-up that opened the sweep was the bad
            # batches', not the LR's. Nothing to measure: the run goes on at its own LR.
            return [Proposal.end_in_place(
                "lr", view.initial.lr,  # type: ignore[arg-type]
                f"LR range test ends in place at step {view.step}, no pick: the loss is back "
                f"below {cfg.explode_ratio:g} x the highest the checkpoint at step "
                f"{phase.checkpoint} gave before, after {phase.restarts} restarts over bad "
                "data; the blow-up was the data's, the run's own LR stays",
                detail={"found_lr": None, "stop": "bad data over",
                        "start_step": phase.start_step, "checkpoint": None,
                        "end": "in_place"})]
        why = stop_reason(curve, cfg.diverge_factor)
        if why is None:
            why = (self.turned([loss for _, loss, _ in points], curve, samples)
                   if self.in_place_allowed(phase) else None)
        if why is None and done + skip >= cfg.sweep_steps:
            why = f"sweep done at lr x{curve[-1][0]:.3g}" if curve else "sweep done"
        if why is None:
            lr = self.lr_at(done, lo, hi, skip)
            loss = f", smoothed loss {curve[-1][1]:.4g}" if curve else ""
            return [
                Proposal.sweep_value(
                    "lr",
                    lr,
                    f"LR range test: step {done} of {cfg.sweep_steps - skip}, lr x{lr:.3g}"
                    f"{loss}",
                    schedule=self.trajectory(phase.start_step, lo, hi, skip),
                )
            ]
        return [self._finish(view, phase, curve, why, samples,
                             [loss for _, loss, _ in points], skip)]

    def bad_data(self, phase: Phase, samples: Sequence[Sample]) -> str | None:
        """Why the sweep's reports so far measure bad data, not the LR (None: they do not,
        or this is not a sweep that started over because the run blew up): see
        ``data_restarts``. Every one of them, at least one, stands whole (its lowest loss)
        above ``explode_ratio`` x the highest loss the run reported from the phase's
        checkpoint up to the blow-up (``opened["before"]``, positive)."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        before = (phase.opened or {}).get("before")
        if (not cfg.data_restarts or not phase.restarted or not samples
                or not isinstance(before, (list, tuple)) or len(before) != 2):
            return None
        high = before[1]
        if not isinstance(high, (int, float)) or not math.isfinite(high) or high <= 0:
            return None
        lows = [s.loss_min if s.loss_min is not None else s.loss_mean for s in samples]
        if any(x is None or not math.isfinite(x) or x <= cfg.explode_ratio * high
               for x in lows):
            return None
        return (f"the loss at the sweep's first LRs, lowest {min(lows):.4g} in "  # type: ignore[type-var]
                f"{len(lows)} report(s), stands above {cfg.explode_ratio:g} x the highest "
                f"{high:.4g} the checkpoint at step {phase.checkpoint} gave before: bad "
                "data, not the LR")

    def turned(self, losses: list[float], curve: list[tuple[float, float]],
               samples: Sequence[Sample] = ()) -> str | None:
        """Why the sweep stops at its latest report because its loss turned up off its low
        (None: it did not): the smoothed loss fell below its first value (:meth:`fell`),
        and the latest report's mean loss passes ``turn_ratio`` x the lowest before it.

        >>> LrRangeTest().turned([2.3, 2.0, 1.0, 0.6, 1.2], [(0.1, 2.3), (0.2, 2.1),
        ...                      (0.4, 1.6), (0.8, 1.1), (1.6, 1.1)])
        'the loss turned up: 1.2 > 1.5 x its lowest report 0.6 at lr x1.6'
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        if cfg.turn_ratio is None or len(losses) < cfg.min_points:
            return None
        finite = [x for _, x in curve if math.isfinite(x)]
        if not finite or not self.fell(finite, samples):
            return None  # the loss has not fallen: no low to turn up from yet
        before = [x for x in losses[:-1] if math.isfinite(x)]
        last = losses[-1]
        if not before or not past(last, min(before), before[0], cfg.turn_ratio):
            return None
        bar = past_bar(min(before), before[0], cfg.turn_ratio, "its lowest report")
        return f"the loss turned up: {last:.4g} > {bar} at lr x{curve[-1][0]:.3g}"

    def fell(self, smoothed: list[float], samples: Sequence[Sample]) -> bool:
        """Whether the sweep's finite ``smoothed`` losses fell below their first: their
        lowest ``min_drop`` of it and ``min_drop_noise`` standard errors of a report's mean
        loss (:func:`mean_noise`, the median over ``samples``, the sweep's reports) below.

        >>> from trimtab.controller.view import Sample
        >>> calm = [Sample(step=10 * i, window=10, loss_min=8.0, loss_max=9.0)
        ...         for i in range(1, 5)]
        >>> noisy = [Sample(step=10 * i, window=10, loss_min=3.0, loss_max=20.0)
        ...          for i in range(1, 5)]
        >>> t = LrRangeTest()
        >>> t.fell([8.6, 7.9, 8.4], calm), t.fell([8.6, 7.9, 8.4], noisy)
        (True, False)
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        spread = median_noise(samples) or 0.0
        first = smoothed[0]
        return min(smoothed) < min(fell_below(first, cfg.min_drop),
                                   first - cfg.min_drop_noise * spread)

    def _finish(
        self, view: JobView, phase: Phase, curve: list[tuple[float, float]], why: str,
        reports: Sequence[Sample], losses: list[float], skip: int,
    ) -> Proposal:
        """The sweep's end with the pick (if any): in place when the run is at its best
        (:meth:`keeps`), else the planned rollback to the newest checkpoint taken during
        the sweep at or before its lowest smoothed loss, where the sweep's steps made
        progress (:meth:`resume_at`), else to the sweep's own checkpoint. ``skip``: the
        steps of the full sweep it left out below the run's own LR (:meth:`skipped`);
        ``reports``: the sweep's."""
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        steps = [s.step for s in reports]
        finite = [(lr, loss) for lr, loss in curve if math.isfinite(loss)]
        found, verdict = None, ""
        if len(finite) < cfg.min_points:
            verdict = f"no pick: {len(finite)} finite points < min_points={cfg.min_points}"
        elif not self.fell([loss for _, loss in finite], reports):
            verdict = (
                f"no pick: the smoothed loss never fell {cfg.min_drop:.0%} and "
                f"{cfg.min_drop_noise:g} standard errors of a report's mean below its "
                f"first value {finite[0][1]:.4g}"
            )
        else:
            found = pick_lr(finite, cfg.pick, cfg.pick_divisor)
            verdict = f"picked lr x{found:.4g} ({cfg.pick})"
            start = phase.sweep_from
            best = min(finite, key=lambda p: p[1])[0]
            if skip and found < start < best:  # type: ignore[operator]
                # A sweep of a run too low began at its own LR: a pick below it would put
                # back an LR the evidence said is too low. Halfway up (in log) to the best.
                found = math.sqrt(start * best)  # type: ignore[operator]
                verdict = (f"picked lr x{found:.4g} (halfway from the run's own x{start:.3g}, "
                           f"too low, to the lowest loss's x{best:.3g})")
        lr = found * cfg.start_fraction if found is not None else view.initial.lr
        kept = (self.keeps(view, losses, curve)
                if found is not None and self.in_place_allowed(phase) else None)
        detail = {
            "found_lr": found,
            "pick": cfg.pick,
            "stop": why,
            "start_step": phase.start_step,
            "checkpoint": None,
            "curve": [[lr_, loss if math.isfinite(loss) else None] for lr_, loss in curve],
        }
        if kept is not None:
            detail["end"] = "in_place"
            reason = (f"LR range test over {len(curve)} reports stopped ({why}); {verdict}; "
                      f"ended in place at step {view.step}, no rollback ({kept})")
            return Proposal.end_in_place("lr", lr, reason, detail=detail)  # type: ignore[arg-type]
        back = phase.checkpoint
        if found is not None:
            back = self.resume_at(view, phase, curve, steps, found)
        detail["end"], detail["checkpoint"] = "rollback", back
        progress = "" if back == phase.checkpoint else (
            f" (kept the sweep's progress: its start was step {phase.checkpoint})")
        reason = (
            f"LR range test over {len(curve)} reports stopped ({why}); {verdict}; back "
            f"to step {back}{progress}"
        )
        return Proposal.roll_back(CAUSE, reason, to_step=back, value=lr, detail=detail)

    def in_place_allowed(self, phase: Phase) -> bool:
        """Whether this sweep may stop at its turn and end in place (``end_in_place``)."""
        mode = self.config.end_in_place  # type: ignore[attr-defined]
        if isinstance(mode, bool):
            return mode
        return mode == "always" or (mode == "restarted" and phase.restarted)

    def keeps(self, view: JobView, losses: list[float], curve: list[tuple[float, float]]
              ) -> str | None:
        """Why the sweep's run is kept where it is, with no rollback (None: it goes back):
        its latest report is finite, healthy (the controller's verdict) and its mean loss
        within ``keep_within`` x the sweep's lowest report, and the smoothed loss was at its
        lowest at most one report ago (a sweep that ran on past its low, at LRs too high
        for it, has worn the run down: it goes back to a checkpoint before): the run is at
        its best, and the sweep's steps were training, not damage.
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        last = view.history[-1] if view.history else None
        finite = [x for x in losses if math.isfinite(x)]
        smoothed = [x for _, x in curve]
        if (last is None or last.nonfinite or view.health is not None
                or not finite or not losses or not math.isfinite(losses[-1])
                or not all(math.isfinite(x) for x in smoothed[-2:])):
            return None
        low = min(finite)
        if past(losses[-1], low, finite[0], cfg.keep_within) or min(smoothed[-2:]) > min(smoothed):
            return None
        bar = past_bar(low, finite[0], cfg.keep_within, "its lowest report")
        return f"its latest loss {losses[-1]:.4g} within {bar}"

    def resume_at(self, view: JobView, phase: Phase, curve: list[tuple[float, float]],
                  steps: list[int], found: float | None = None) -> int:
        """The checkpoint the run resumes from after a sweep that picked an LR (``found``).

        The sweep's steps up to its lowest smoothed loss ran at LRs no higher than the one
        that loss was reached at, and lowered the loss: they are progress, not damage, so
        the run keeps them. It goes back to the newest checkpoint the client holds within
        the sweep, at or before that lowest point (not one the client's next snapshot
        evicts, :meth:`JobView.evicted_next`, which may be gone before the command lands),
        whose smoothed loss lies ``min_drop`` below the sweep's first and below every loss
        the run reported before the sweep (a run that had blown up before its sweep began
        falls from a ruin, not to progress), or that the sweep reached at an LR no higher
        than ``found``, its loss no higher than the sweep's first (every step before it ran
        at an LR no higher than the one the run now trains at: training the run would have
        done anyway, such as the first, slow steps of a sweep of a run too low); where there
        is none, to the sweep's own checkpoint.
        """
        cfg: LrRangeTestConfig = self.config  # type: ignore[assignment]
        finite = [(st, lr, loss) for st, (lr, loss) in zip(steps, curve, strict=True)
                  if math.isfinite(loss)]
        if not finite:
            return phase.checkpoint
        first = finite[0][2]
        bar = fell_below(first, cfg.min_drop)
        for s in view.history:
            if s.step > phase.start_step:
                break
            low = s.loss_min if s.loss_min is not None else s.loss_mean
            if s.nonfinite or low is None or not math.isfinite(low):
                return phase.checkpoint  # non-finite before the sweep: no progress to keep
            bar = min(bar, low)
        lowest = min(finite, key=lambda p: p[2])
        held = view.last.checkpoints if view.last is not None else []
        # The client's next snapshot, possibly at the very step this report was made (the
        # snapshot follows the report), may evict one: a return to it could find it gone,
        # and the run would stay where the sweep left it.
        doomed = view.evicted_next()
        for ckpt in sorted(held, reverse=True):
            if not phase.start_step < ckpt <= lowest[0] or ckpt in doomed:
                continue
            before = [loss for st, _, loss in finite if st <= ckpt]
            if not before:
                continue
            if before[-1] < bar:
                return ckpt
            # The LR of the first report at or after the checkpoint bounds every LR the
            # sweep ran at up to it (it only rises).
            reached = next((lr for st, lr, _ in finite if st >= ckpt), math.inf)
            if found is not None and reached <= found and before[-1] <= first:
                return ckpt
        return phase.checkpoint


def _losses_after(view: JobView, checkpoint: int) -> list[float] | None:
    """``[lowest, highest]`` finite loss of the reports from ``checkpoint`` on, before the
    latest (the one that showed the blow-up); None: there are none."""
    kept = [s for s in list(view.history)[:-1]
            if s.step - s.window >= checkpoint and not s.nonfinite]
    lows = [s.loss_min if s.loss_min is not None else s.loss_mean for s in kept]
    highs = [s.loss_max if s.loss_max is not None else s.loss_mean for s in kept]
    lows = [x for x in lows if x is not None and math.isfinite(x)]
    highs = [x for x in highs if x is not None and math.isfinite(x)]
    if not lows or not highs:
        return None
    return [min(lows), max(highs)]


def _blew_up(seen: Sequence[Sample], ratio: float) -> str | None:
    """Why ``seen`` (the first reports) blew up: a whole window far above the lowest loss
    seen before (None: none did)."""
    low = high = None  # the lowest and highest losses of the reports before
    for s in seen:
        if s.loss_min is None or s.loss_max is None:
            continue
        # A blow-up lifts a whole window far above the lowest loss seen before: its lowest
        # loss stands there. One batch does not: a window's highest loss is a single batch,
        # and small noisy batches, or a few bad ones, spread a healthy window as widely (a
        # trial: a regression at batch 8, falling, spread 2.1-14.5 in one window, was swept
        # from step 0 and ended 35x its bare run). (Off a lowest at or below 0, a loss with
        # a noise or likelihood term, the rise is measured in units of the fall from the
        # first report's mean: past.) And above every loss seen before: a window that only
        # sits above one unusually low batch is noise.
        if (low is not None and high is not None and s.loss_min > high
                and past(s.loss_min, low, seen[0].loss_mean
                         if seen[0].loss_mean is not None else high, ratio)):
            return (f"the loss blew up by the window ending at step {s.step}: its lowest "
                    f"{s.loss_min:.4g}, from a lowest {low:.4g} before")
        low = s.loss_min if low is None else min(low, s.loss_min)
        high = s.loss_max if high is None else max(high, s.loss_max)
    return None


def _jumped(seen: Sequence[Sample]) -> str | None:
    """Why a window of ``seen`` jumped: whole above the window before it, its lowest loss at
    least twice that one's (a CNN at 10x its LR, falling to 0.53-1.23, then 1.90-4.84 in
    one window: dead a few reports later). Windows of noisy batches, a fall, a slow rise or
    a bad batch or two overlap the window before. None: none did."""
    for before, s in zip(seen[:-1], seen[1:], strict=True):
        if (before.loss_min is not None and before.loss_max is not None
                and s.loss_min is not None and before.loss_min > 0
                and s.loss_min > before.loss_max and s.loss_min > 2 * before.loss_min):
            return (f"the loss jumped by the window ending at step {s.step}: its lowest "
                    f"{s.loss_min:.4g} above the window before's highest "
                    f"{before.loss_max:.4g}")
    return None


def _rose(seen: Sequence[Sample], losses: list[float], rise: float) -> str | None:
    """Why the loss of ``seen`` (``losses``: their means) rose: a later window's mean
    ``rise`` above the first report's. A run that has trained (a report's mean below half
    the first's) must show it in the whole window or at its end (its lowest or last loss)
    too: a window lifted by a few bad batches that it got past is no LR far too high (a
    trial: three batches x1e6 at step 150 of a tuned Lightning run, its clip absorbing
    them, were swept from step 0). One that never got far from its start and only gets
    worse is (a CNN at 30x its LR, hovering at its initial loss, its mean lifted 5-10% by
    its worst batches). None: it did not."""
    if len(losses) < 2 or losses[0] <= 0:
        return None
    bar = losses[0] * (1 + rise)
    lowest = losses[0]
    for s in seen[1:]:
        if s.loss_mean is None:
            continue
        if s.loss_mean <= bar:
            lowest = min(lowest, s.loss_mean)
            continue
        ends = s.loss_last if s.loss_last is not None else s.loss_mean
        whole = s.loss_min if s.loss_min is not None else s.loss_mean
        if lowest >= 0.5 * losses[0] or ends > bar or whole > bar:
            return (f"the loss rose from {losses[0]:.4g} to {s.loss_mean:.4g} by the window "
                    f"ending at step {s.step} (its last loss {ends:.4g}) over the first "
                    f"{len(losses)} reports")
    return None


def mean_noise(s: Sample) -> float | None:
    """The standard error of ``s``'s mean loss, from its window's spread: the range over
    the expected range of ``window`` normal draws (Blom's approximation), over
    ``sqrt(window)``. None without a range, or for a window under 2 steps.

    >>> round(mean_noise(Sample(step=10, window=10, loss_min=1.0, loss_max=4.0)), 3)
    0.307
    """
    n, lo, hi = s.window, s.loss_min, s.loss_max
    if n < 2 or lo is None or hi is None or not math.isfinite(hi - lo):
        return None
    expected_range = 2.0 * statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))
    return (hi - lo) / expected_range / math.sqrt(n)


def median_noise(samples: Sequence[Sample]) -> float | None:
    """The median of :func:`mean_noise` over ``samples`` (None: no sample has a range)."""
    noise = [x for x in (mean_noise(s) for s in samples) if x is not None]
    return statistics.median(noise) if noise else None


def _warming(samples: list) -> bool:
    """Whether the loop's own LR moved more than 1.5x over ``samples`` (its warm-up): a
    loss or an alignment seen then says nothing of an LR far off."""
    used = [s.lr_used for s in samples if s.lr_used]
    return len(used) >= 2 and max(used) > 1.5 * min(used)
