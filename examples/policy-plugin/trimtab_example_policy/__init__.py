"""An example third-party trimtab policy, installed through the ``trimtab.policies`` entry point.

:class:`LossEmaBand` halves the learning rate when the loss EMA rises more than ``rise``
above the best EMA seen since the LR last changed: the run has left its band, say after
a shift in the data, and smaller steps are the cautious answer.

>>> LossEmaBand({"rise": 0.1}).config.rise
0.1
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import Policy, Proposal

__all__ = ["LossEmaBand"]


class LossEmaBand(Policy):
    """Halve the LR when the loss EMA is ``rise`` above its best since the LR last changed.

    >>> from types import SimpleNamespace as NS
    >>> band = LossEmaBand({"rise": 0.1, "min_reports": 1})
    >>> def view(ema, lr=0.1):
    ...     return NS(job="j", reports_seen=5, knobs=NS(lr=lr), signals=NS(loss_ema=ema))
    >>> band.propose(view(1.0)), band.propose(view(0.8))
    ([], [])
    >>> band.propose(view(0.95))[0].reason
    'loss EMA 0.95 is 19% above its best 0.8 since the lr multiplier was x0.1 (band 10%)'
    """

    name = "example_band"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        #: How far above its best the loss EMA may rise, as a fraction (0.05 = 5%).
        rise: float = Field(0.05, gt=0.0, le=10.0)
        #: The factor the LR is multiplied by when the band is left.
        cut: float = Field(0.5, gt=0.0, lt=1.0)
        #: Reports to see before acting (the EMA needs a few to settle).
        min_reports: int = Field(10, ge=1)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        # Optional per-job state: (best loss EMA, trimtab's lr multiplier when it was seen;
        # the knob model: view.knobs.lr is the multiplier on the run's own lr).
        self._best: dict[str, tuple[float, float | None]] = {}

    def propose(self, view):
        ema, lr = view.signals.loss_ema, view.knobs.lr
        if ema is None or view.reports_seen < self.config.min_reports:
            return []
        best, best_lr = self._best.get(view.job, (ema, lr))
        if lr != best_lr or ema < best:
            # A new LR starts a new band (whoever changed it); a lower EMA is the new best.
            best, best_lr = ema, lr
        self._best[view.job] = (best, best_lr)
        if ema <= best * (1.0 + self.config.rise):
            return []
        return [Proposal("lr", factor=self.config.cut, reason=(
            f"loss EMA {ema:.4g} is {ema / best - 1:.0%} above its best {best:.4g} "
            f"since the lr multiplier was x{best_lr:.4g} (band {self.config.rise:.0%})"))]
