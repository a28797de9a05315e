"""Divergence guard: roll back to the newest stable checkpoint when a run diverges.

The controller judges every report once (:mod:`~trimtab.controller.health`, under the
``[rollback.health]`` thresholds of its config) and the verdict reaches this policy as
:attr:`JobView.health <trimtab.controller.view.JobView.health>`: the same judgement that
decides which checkpoints are stable, so the two can never disagree. The causes, most
urgent first:

* ``nonfinite``: persistent non-finite losses or gradient steps (a burst of bad batches,
  which the client's skip already absorbed, over within the report or the next, excepted);
* ``loss_spike``: after a warm-up, a loss z-score far out of the noise (this report's, or
  the one before's for a spike that began at that window's first step) and a material
  rise of the window's lowest loss over its EMA;
* ``grad_spike``: a gradient-norm z-score far out of the noise and a norm many times its
  EMA;
* ``climb``: over a full loss-slope window with no LR change in it, a slope significantly
  positive and a material rise.

Any of them proposes a rollback (:meth:`Proposal.roll_back`); the engine rolls back, with
an escalating LR cut, when a stable checkpoint, the budget and (for a climb) the cooldown
after a rollback allow, and otherwise cuts the LR by ``fallback_cut`` through the governor
like any decrease (not for parted replicas, ``replicas``, which no lr cut mends: there the
rollback cuts nothing either, and past the budget the run is advised to stop).

Where it comes from: PaLM (Chowdhery et al. 2022, section 5.1) handled loss spikes by
restarting from a checkpoint about 100 steps before the spike and skipping 200-500
batches; the OPT-175B logbook (Zhang et al. 2022) records restarts from the last good
checkpoint with a lower LR after divergences and loss spikes, as an operator's routine.
Spike detection by a z-score against a running mean and variance is the usual online
outlier rule. The default thresholds are well above the spike guard's z = 4, which fires
on healthy early training (a small MLP reached grad-norm z ~ 5): a rollback costs steps and
a permanent LR cut, so it must be rare on a healthy run (see the tests' false-alarm bounds).

>>> DivergenceGuard({"fallback_cut": 0.3}).config.fallback_cut
0.3
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trimtab.policies.sdk import UNCUT, DivergenceThresholds, JobView, Policy, Proposal

__all__ = ["DivergenceGuard", "DivergenceGuardConfig"]


class DivergenceGuardConfig(BaseModel):
    """The cut without a rollback. The thresholds are the controller's, in
    ``[rollback.health]``: one judgement, shared with stable marking."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The LR factor when no rollback can be made (no stable checkpoint, cooldown, alert).
    fallback_cut: float = Field(0.5, gt=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _thresholds_moved(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        moved = sorted(set(data) & set(DivergenceThresholds.model_fields))
        if moved:
            raise ValueError(
                f"divergence_guard config {', '.join(moved)}: the divergence thresholds are "
                "the controller's, set them under [rollback.health] (one judgement of each "
                "report, shared by stable marking and this policy); allowed here: fallback_cut")
        return data


class DivergenceGuard(Policy):
    """The controller judged the latest report unhealthy -> roll back."""

    name: ClassVar[str] = "divergence_guard"
    Config: ClassVar[type[BaseModel]] = DivergenceGuardConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: DivergenceGuardConfig = self.config  # type: ignore[assignment]
        verdict = view.health
        if verdict is None:
            return []
        # Parted replicas: an lr cut mends nothing, with a rollback or without one.
        cut = None if verdict.cause in UNCUT else cfg.fallback_cut
        return [Proposal.roll_back(verdict.cause, verdict.reason, fallback_factor=cut)]
