"""The running signals of one job: what reports become before a policy reads them.

:class:`SignalTracker` folds each report's loss and gradient norm into exponentially
weighted means and variances with a warm-up, gives their z-scores against the history
before the report, keeps the loss slope's least-squares window, and marks the signals at
each reported step, so that a rollback puts them back as they stood at the checkpoint
(:meth:`SignalTracker.rewind`). The math is :mod:`~trimtab.controller.signals`'; this is
its state. :class:`~trimtab.controller.state.JobState` holds one per job.

>>> t = SignalTracker(SignalConfig(z_warmup=2))
>>> for step, loss in ((10, 2.0), (20, 1.0), (30, 9.0)):
...     t.fold(step, loss, 1.0)
>>> t.signals().loss_z > 2 and t.signals().slope > 0
True
>>> t.rewind(20)
>>> t.signals().loss_ema
1.5
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trimtab.controller.signals import ema_var, ols_slope, t_stat, zscore
from trimtab.controller.view import Signals

__all__ = ["SignalConfig", "SignalTracker"]

#: Reported steps whose signals are kept for a rollback to a checkpoint taken there.
_SIGNAL_MARKS = 64


class SignalConfig(BaseModel):
    """How reports become signals.

    >>> SignalConfig(slope_window=30).z_warmup
    10
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Weight of the newest report in the EMAs and EW variances.
    alpha: float = Field(0.05, gt=0.0, le=1.0)
    #: Reports in the least-squares window for the loss slope.
    slope_window: int = Field(20, ge=3, le=100_000)
    #: Reports folded in before z-scores are given.
    z_warmup: int = Field(10, ge=2)
    #: Added to variances before dividing, so a flat history gives finite z-scores.
    eps: float = Field(1e-12, gt=0.0, allow_inf_nan=False)
    #: Reports kept as :class:`Sample` history (and validation results kept) for policies.
    history: int = Field(128, ge=8, le=100_000)


class _EW:
    """Exponentially weighted mean and variance of one signal, with a warm-up."""

    __slots__ = ("mean", "var", "n")

    def __init__(self) -> None:
        self.mean: float | None = None
        self.var: float | None = None
        self.n = 0

    def fold(self, x: float, alpha: float) -> None:
        self.n += 1
        # alpha = 1/n at first: an EMA seeded by one sample underestimates the
        # variance for ~1/alpha samples, which would inflate early z-scores.
        self.mean, self.var = ema_var(self.mean, self.var, x, max(alpha, 1.0 / self.n))

    def to_list(self) -> list[Any]:
        # Overflowed (inf) moments are dropped rather than written as non-standard JSON.
        return [_finite(self.mean), _finite(self.var), self.n]

    @classmethod
    def from_list(cls, raw: list[Any]) -> _EW:
        ew = cls()
        ew.mean, ew.var, ew.n = raw[0], raw[1], int(raw[2])
        return ew


class SignalTracker:
    """One job's running signals, their marks at reported steps, and their persistence."""

    def __init__(self, cfg: SignalConfig) -> None:
        self.cfg = cfg
        self._loss, self._grad = _EW(), _EW()
        self.loss_z: float | None = None
        self.grad_norm_z: float | None = None
        #: The loss z-score of the report before the latest.
        self.loss_z_before: float | None = None
        #: The EMAs before the latest report was folded in (what its z-scores measure against).
        self.refs: tuple[float | None, float | None] = (None, None)
        #: The loss EMA before the report before the latest was folded in.
        self.loss_ref_before: float | None = None
        self._points: deque[tuple[int, float]] = deque(maxlen=cfg.slope_window)
        self._slope: tuple[float | None, float | None, float | None] = (None, None, None)
        #: The signals at the newest reported steps (and the registration's), for a rollback;
        #: each holds how many slope points it had, which :attr:`_trail` keeps (a mark does
        #: not repeat them: most of a job's saved state, before).
        self._marks: dict[int, list[Any]] = {}
        #: The slope points folded in lately, enough for every mark's window.
        self._trail: deque[tuple[int, float]] = deque(
            maxlen=cfg.slope_window + _SIGNAL_MARKS + 1)

    def fold(self, step: int, loss: float | None, grad_norm: float | None) -> None:
        """Fold one report (ending at ``step``) in, and mark the signals there."""
        self.loss_ref_before = self.refs[0]
        self.refs = (_finite(self._loss.mean), _finite(self._grad.mean))
        self.loss_z_before = self.loss_z
        self.loss_z = self._fold(self._loss, loss)
        self.grad_norm_z = self._fold(self._grad, grad_norm)
        if loss is not None:
            self._points.append((step, loss))
            self._trail.append((step, loss))
            self._refresh_slope()
        self.mark(step)

    def mark(self, step: int) -> None:
        """Keep the signals as they stand at ``step`` (a report's end, or the registration):
        a checkpoint taken there holds the run as they describe it."""
        self._marks[step] = self._snapshot()
        for old in sorted(self._marks)[:-_SIGNAL_MARKS]:
            del self._marks[old]

    def restart_loss(self) -> None:
        """Start the loss's statistics afresh (its EW mean and variance, z-scores, slope
        points), the gradient norm's kept: what the run trains on moved, and the loss's
        history describes what it trained on before (``RollbackState.check_climb``)."""
        self._loss = _EW()
        self.loss_z = self.loss_z_before = self.loss_ref_before = None
        self.refs = (None, self.refs[1])
        self._points.clear()
        self._slope = (None, None, None)

    def rewind(self, step: int) -> None:
        """The run went back to ``step``: the signals become those of the report that ended
        at it (the newest one at or before it; afresh when none is kept)."""
        marks = [s for s in self._marks if s <= step]
        at = max(marks, default=None)
        snap = None if at is None else self._marks[at]
        self._marks = {s: v for s, v in self._marks.items() if s <= step}
        kept = [p for p in self._trail if p[0] <= step]
        self._trail.clear()
        self._trail.extend(kept)
        self._load(snap, at)

    def grad_norm_scale(self) -> float | None:
        """The gradient-norm EMA once its z-score warm-up has passed (None before): what
        scale-relative limits (the clip's) are measured against."""
        g = self._grad
        return _finite(g.mean) if g.n >= self.cfg.z_warmup else None

    def signals(self) -> Signals:
        """The signals now, as a policy reads them."""
        slope, se, t = self._slope
        points = list(self._points)
        return Signals(
            loss_ema=self._loss.mean, loss_var=self._loss.var, loss_z=self.loss_z,
            grad_norm_ema=self._grad.mean, grad_norm_var=self._grad.var,
            grad_norm_z=self.grad_norm_z, slope=slope, slope_se=se, slope_t=t,
            slope_n=len(points), slope_window=self.cfg.slope_window,
            slope_since_step=points[0][0] if points else None,
            loss_ref=self.refs[0], grad_norm_ref=self.refs[1],
            loss_z_before=self.loss_z_before, loss_ref_before=self.loss_ref_before,
        )

    # -- persistence (the keys of JobState.state_dict it owns) ----------------------------

    KEYS = ("loss", "grad_norm", "loss_z", "grad_norm_z", "refs", "slope_points",
            "signal_marks", "signal_trail", "loss_z_before", "loss_ref_before")

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self._loss.to_list(), "grad_norm": self._grad.to_list(),
            "loss_z": self.loss_z, "grad_norm_z": self.grad_norm_z, "refs": list(self.refs),
            "slope_points": [[s, y] for s, y in self._points],
            "signal_marks": [[s, v] for s, v in sorted(self._marks.items())],
            "signal_trail": [[s, y] for s, y in self._trail],
            "loss_z_before": _finite(self.loss_z_before),
            "loss_ref_before": _finite(self.loss_ref_before),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; ``signal_trail`` may be missing (a state saved
        before it: its marks hold their slope points themselves)."""
        self._marks = {int(s): v for s, v in sd["signal_marks"]}
        self._trail.clear()
        self._trail.extend((int(s), float(y)) for s, y in sd.get("signal_trail") or ())
        self._loss, self._grad = _EW.from_list(sd["loss"]), _EW.from_list(sd["grad_norm"])
        self.loss_z, self.grad_norm_z = sd["loss_z"], sd["grad_norm_z"]
        self.loss_z_before = sd.get("loss_z_before")
        self.loss_ref_before = sd.get("loss_ref_before")
        self.refs = (sd["refs"][0], sd["refs"][1])
        self._points.clear()
        self._points.extend((int(s), float(y)) for s, y in sd["slope_points"])
        self._refresh_slope()

    # -- inside -------------------------------------------------------------------------

    def _snapshot(self) -> list[Any]:
        """The signals as they are now (for :meth:`rewind`), JSON-serialisable."""
        return [self._loss.to_list(), self._grad.to_list(), _finite(self.loss_z),
                _finite(self.grad_norm_z), [_finite(x) for x in self.refs], len(self._points),
                _finite(self.loss_z_before), _finite(self.loss_ref_before)]

    def _load(self, snap: list[Any] | None, at: int | None = None) -> None:
        """Put back what :meth:`_snapshot` gave at step ``at`` (None: afresh)."""
        self._loss, self._grad = _EW(), _EW()
        self.loss_z = self.grad_norm_z = self.loss_z_before = self.loss_ref_before = None
        self.refs = (None, None)
        self._points.clear()
        if snap is not None:
            self._loss, self._grad = _EW.from_list(snap[0]), _EW.from_list(snap[1])
            self.loss_z, self.grad_norm_z = snap[2], snap[3]
            self.loss_z_before = snap[6] if len(snap) > 6 else None  # older marks: none
            self.loss_ref_before = snap[7] if len(snap) > 7 else None
            self.refs = (snap[4][0], snap[4][1])
            # The mark's slope points: the newest ``n`` of the trail up to its step, or, in a
            # state saved before the trail, the points themselves.
            n = snap[5]
            if isinstance(n, list):
                points = n
            else:
                trail = [p for p in self._trail if at is None or p[0] <= at]
                points = trail[-n:] if n else []
            self._points.extend((int(s), float(y)) for s, y in points)
        if self._points:
            self._refresh_slope()
        else:
            self._slope = (None, None, None)

    def _fold(self, ew: _EW, x: float | None) -> float | None:
        """Fold ``x`` into ``ew``; its z-score against the history before it, if warmed up."""
        if x is None:
            return None
        cfg = self.cfg
        z = zscore(x, ew.mean, ew.var, cfg.eps) if ew.n >= cfg.z_warmup else None
        ew.fold(x, cfg.alpha)
        return _finite(z)

    def _refresh_slope(self) -> None:
        slope, se = ols_slope([s for s, _ in self._points], [y for _, y in self._points])
        t = t_stat(slope, se)
        self._slope = (_not_nan(slope), _not_nan(se), _not_nan(t))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _not_nan(x: float) -> float | None:
    return None if math.isnan(x) else x
