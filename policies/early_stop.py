"""Early-stopping advice: recommend stopping when the validation metric stops improving.

The rule (as Lightning's ``EarlyStopping``, as a pure function of the reported
history): walk the validation results the run reported (``Report.validation``, lower is
better) in order, keeping the best; a result improves on it when it is below ``best -
max(min_delta, min_rel_delta * |best|)``. When the last ``patience`` results brought no
improvement, advise the run to stop (:meth:`Proposal.advise_stop`); the controller
sends the advice once (``Command.stop_advice``, read by the client as
``guard.should_stop``). No knob is touched. The relative margin makes the default
independent of the metric's scale.

>>> EarlyStop({"patience": 3}).config.min_rel_delta
0.001
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal

__all__ = ["EarlyStop", "EarlyStopConfig", "stalled"]


class EarlyStopConfig(BaseModel):
    """EarlyStop's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Validation results without improvement before stopping is advised.
    patience: int = Field(5, ge=1)
    #: Smallest improvement that counts, absolute ...
    min_delta: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    #: ... and relative to the best so far; the larger of the two applies.
    min_rel_delta: float = Field(1e-3, ge=0.0, lt=1.0)


def stalled(
    values: Sequence[tuple[int, float]], patience: int, min_delta: float, min_rel: float
) -> tuple[int, float, int] | None:
    """``(best_step, best, results_since)`` when the last ``patience`` results did not
    improve on the best; else None.

    >>> stalled([(1, 3.0), (2, 2.0), (3, 2.0), (4, 2.1)], 2, 0.0, 0.0)
    (2, 2.0, 2)
    """
    if not values:
        return None
    best_step, best = values[0]
    since = 0
    for step, v in values[1:]:
        if v < best - max(min_delta, min_rel * abs(best)):
            best_step, best, since = step, v, 0
        else:
            since += 1
    return (best_step, best, since) if since >= patience else None


class EarlyStop(Policy):
    """No validation improvement for ``patience`` results -> advise stopping."""

    name: ClassVar[str] = "early_stop"
    Config: ClassVar[type[BaseModel]] = EarlyStopConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: EarlyStopConfig = self.config  # type: ignore[assignment]
        out = stalled(view.validations, cfg.patience, cfg.min_delta, cfg.min_rel_delta)
        if out is None:
            return []
        best_step, best, since = out
        return [Proposal.advise_stop(
            f"validation {view.validations[-1][1]:.6g} at step {view.validations[-1][0]}: no "
            f"improvement on the best {best:.6g} (step {best_step}) for {since} results")]
