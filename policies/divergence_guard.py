"""Divergence guard: roll back to the newest stable checkpoint when a run diverges.

The rule (:func:`~trimtab.controller.rollback.assess`, shared with the controller's
judgement of which checkpoints are stable), on the latest report:

* ``nonfinite``: at least ``nonfinite_min`` non-finite losses or gradient steps;
* ``loss_spike``: after ``warmup_reports``, the loss z-score (against the exponentially
  weighted mean and variance of the reports before it; one-sided, upward only) above
  ``loss_z`` and the loss at least ``loss_min_rise`` above its EMA;
* ``grad_spike``: the gradient-norm z-score above ``grad_norm_z`` and the norm at least
  ``grad_norm_min_ratio`` times its EMA;
* ``climb``: over a full loss-slope window with no LR change in it, the least-squares slope
  significantly positive (``t > climb_t``) and rising at least ``climb_min_rise`` of the
  loss over the window.

Any of them proposes a rollback (:meth:`Proposal.roll_back`); the engine rolls back, with
an escalating LR cut, when a stable checkpoint, the cooldown and the budget allow, and
otherwise cuts the LR by ``fallback_cut`` through the governor like any decrease.

Where it comes from: PaLM (Chowdhery et al. 2022, section 5.1) handled loss spikes by
restarting from a checkpoint about 100 steps before the spike and skipping 200-500
batches; the OPT-175B logbook (Zhang et al. 2022) records restarts from the last good
checkpoint with a lower LR after divergences and loss spikes, as an operator's routine.
Spike detection by a z-score against a running mean and variance is the usual online
outlier rule. The defaults are well above the spike guard's z = 4, which fires on healthy
early training (a small MLP reached grad-norm z ~ 5): a rollback costs steps and a
permanent LR cut, so it must be rare on a healthy run (see the tests' false-alarm bounds).

>>> DivergenceGuard({"loss_z": 8}).config.fallback_cut
0.5
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.rollback import DivergenceThresholds, assess
from trimtab.controller.state import JobView

__all__ = ["DivergenceGuard", "DivergenceGuardConfig"]


class DivergenceGuardConfig(DivergenceThresholds):
    """The thresholds of :class:`DivergenceThresholds`, and the cut without a rollback."""

    #: The LR factor when no rollback can be made (no stable checkpoint, cooldown, alert).
    fallback_cut: float = Field(0.5, gt=0.0, lt=1.0)


class DivergenceGuard(Policy):
    """Non-finite values, a loss or gradient-norm spike, or a climb -> roll back."""

    name: ClassVar[str] = "divergence_guard"
    Config: ClassVar[type[BaseModel]] = DivergenceGuardConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: DivergenceGuardConfig = self.config  # type: ignore[assignment]
        verdict = assess(view, cfg)
        if verdict is None:
            return []
        return [Proposal.roll_back(verdict.cause, verdict.reason, fallback_factor=cfg.fallback_cut)]
