"""Data shift: a sustained step up in the loss or gradient-norm level -> a short LR re-warm.

The rule, a two-window change-point test on the report means (the history of
:class:`~trimtab.controller.state.Sample`): at report ``t`` compare the ``after`` newest
reports with the ``before`` reports preceding them. A shift is found when, for the loss or
the gradient norm,

* every one of the ``after`` means lies above the ``before`` mean by more than ``z``
  standard deviations of the ``before`` means (a level that persists: one spike, the
  divergence guard's business, never passes), and the ``after`` mean is at least
  ``min_rel_jump`` above the ``before`` mean (relative, so scale-free);
* the new level is flat: the second half of ``after`` has not risen above the first half
  by more than ``max_climb`` of the jump (a climb is divergence, not a shift);
* no report in the two windows has non-finite values, trimtab's lr multiplier is the same
  in all of them, and the lr the optimizer used (the user's own schedule times the
  multiplier) moved by at most ``lr_drift`` (a change the controller or the user's
  schedule made is no data shift; a cosine's slow drift is no change).

At the report that first finds it the policy proposes ``lr = lr0 * cut`` (``lr0``:
trimtab's lr multiplier then, the knob model); over the next ``rewarm_reports`` reports
the target ramps linearly back to ``lr0``, and for at most as many reports more it still
asks for ``lr0`` while the multiplier in force is below it. Then it is over: the re-warm is
bounded and ends. A shift found within a re-warm, or before its windows have cleared it,
is the same shift. Every test is recomputed from the job's history, so the policy keeps
no state of its own (the history must hold ``before + after + 2 * rewarm_reports``
reports, as the default ``SignalConfig.history`` does).

Where it comes from: a short linear warm-up after a change in the data distribution is the
usual practice in continual pre-training (Gupta et al. 2023, "Continual Pre-Training of
Large Language Models: How to (re)warm your model?"; Ibrahim et al. 2024, "Simple and
Scalable Strategies to Continually Pre-train Large Language Models"); the detector is a
Page-style two-sample mean-shift test with a persistence requirement.

>>> DataShift({"cut": 0.3}).config.rewarm_reports
10
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal, Sample

__all__ = ["DataShift", "DataShiftConfig", "level_shift", "find_shifts"]

_SIGNALS = (("loss", "loss_mean"), ("grad norm", "grad_norm_mean"))


class DataShiftConfig(BaseModel):
    """DataShift's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Reports in the reference window, and reports the new level must persist.
    before: int = Field(8, ge=3)
    after: int = Field(4, ge=2)
    #: Each of the ``after`` means must exceed the ``before`` mean by z of its std.
    z: float = Field(3.0, gt=0.0, allow_inf_nan=False)
    #: The jump must be at least this fraction of the ``before`` level.
    min_rel_jump: float = Field(0.05, ge=0.0, allow_inf_nan=False)
    #: Largest rise within ``after`` (second half over first), as a fraction of the jump.
    max_climb: float = Field(0.25, ge=0.0, allow_inf_nan=False)
    #: The LR multiplier at the shift; the ramp starts there.
    cut: float = Field(0.5, gt=0.0, lt=1.0)
    #: Reports over which the LR ramps back to its value before the shift.
    rewarm_reports: int = Field(10, ge=1)
    #: The lr the optimizer used may drift this much (max/min - 1) over the windows judged:
    #: a user's schedule moves it a little every step, a step in it is not a data shift.
    lr_drift: float = Field(0.25, ge=0.0, allow_inf_nan=False)


def level_shift(
    xs: list[float | None], before: int, z: float, min_rel: float, max_climb: float
) -> float | None:
    """The relative jump if the last ``len(xs) - before`` values sit at a new, higher,
    flat level against the first ``before``; else None.

    >>> level_shift([1.0, 1.1, 0.9, 1.0, 2.0, 2.1, 1.9, 2.0], 4, 3.0, 0.05, 0.5)
    1.0
    """
    if any(x is None or not math.isfinite(x) for x in xs):
        return None
    ref, new = xs[:before], xs[before:]
    mb = math.fsum(ref) / len(ref)  # type: ignore[arg-type]
    sd = math.sqrt(math.fsum((x - mb) ** 2 for x in ref) / (len(ref) - 1))  # type: ignore[operator]
    ma = math.fsum(new) / len(new)  # type: ignore[arg-type]
    jump = ma - mb
    if jump <= 0 or min(new) <= mb + z * sd or jump < min_rel * abs(mb):  # type: ignore[type-var]
        return None
    half = len(new) // 2
    first = math.fsum(new[:half]) / half  # type: ignore[arg-type]
    second = math.fsum(new[half:]) / (len(new) - half)  # type: ignore[arg-type]
    if second - first > max_climb * jump:
        return None
    return jump / abs(mb) if mb != 0 else math.inf


def _lr_steady(window: list[Sample], drift: float) -> bool:
    """Whether trimtab's multiplier stayed put and the lr the optimizer used (the user's
    own schedule times it) moved less than ``drift`` over ``window``."""
    if len({s.lr for s in window}) != 1:
        return False
    used = [s.lr_used for s in window if s.lr_used is not None]
    if not used or min(used) <= 0.0:
        return not used
    return max(used) / min(used) <= 1.0 + drift


def _detect(window: list[Sample], cfg: DataShiftConfig) -> str | None:
    if any(s.nonfinite for s in window) or not _lr_steady(window, cfg.lr_drift):
        return None
    for label, attr in _SIGNALS:
        rel = level_shift([getattr(s, attr) for s in window], cfg.before, cfg.z,
                          cfg.min_rel_jump, cfg.max_climb)
        if rel is not None:
            return f"{label} level up {rel:.1%} for {cfg.after} reports"
    return None


def find_shifts(history: tuple[Sample, ...], cfg: DataShiftConfig) -> list[tuple[int, str]]:
    """``(index, why)`` of each distinct shift in ``history``: the report that found it, with
    later findings inside its re-warm (and the windows after it) taken as the same one."""
    span = cfg.before + cfg.after
    quiet = 2 * cfg.rewarm_reports + span
    found: list[tuple[int, str]] = []
    for t in range(span - 1, len(history)):
        if found and t - found[-1][0] <= quiet:
            continue
        why = _detect(list(history[t - span + 1 : t + 1]), cfg)
        if why is not None:
            found.append((t, why))
    return found


class DataShift(Policy):
    """Sustained jump in loss or grad-norm level -> cut the LR, then ramp it back."""

    name: ClassVar[str] = "data_shift"
    Config: ClassVar[type[BaseModel]] = DataShiftConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: DataShiftConfig = self.config  # type: ignore[assignment]
        shifts = find_shifts(view.history, cfg)
        if not shifts:
            return []
        at, why = shifts[-1]
        j = len(view.history) - 1 - at  # reports since the shift was found
        lr0 = view.history[at].lr
        n = cfg.rewarm_reports
        if lr0 is None or j > 2 * n:
            return []
        step = view.history[at].step
        if j == 0:
            return [Proposal("lr", value=lr0 * cfg.cut,
                             reason=f"data shift at step {step}: {why}; re-warm from "
                                    f"{lr0 * cfg.cut:.3g} to {lr0:.3g} over {n} reports")]
        if j <= n:
            target = lr0 * (cfg.cut + (1.0 - cfg.cut) * j / n)
            return [Proposal("lr", value=target,
                             reason=f"re-warm after the data shift at step {step}: {j}/{n}")]
        lr = view.knobs.lr
        if lr is not None and lr < lr0 * 0.999:
            return [Proposal("lr", value=lr0,
                             reason=f"re-warm after the data shift at step {step}: restore")]
        return []
