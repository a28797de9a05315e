"""Early-stopping advice: recommend stopping when the validation metric stops improving.

The rule (as Lightning's ``EarlyStopping``, as a pure function of the reported
history): walk the validation results the run reported (``Report.validation``, lower is
better) in order, keeping the best; a result improves on it when it is below ``best -
max(min_delta, min_rel_delta * |best|)``. When the last ``patience`` results brought no
improvement, advise the run to stop (:meth:`Proposal.advise_stop`); the controller
sends the advice once (``Command.stop_advice``, read by the client as
``guard.should_stop``). No knob is touched. The relative margin makes the default
independent of the metric's scale.

Weight averaging (``attach(..., ema=)``): a run that reports its average's validation too
(``Report.validation_ema``) is judged by ``source``: ``"best"`` (the default), at each
evaluation the better of the raw and the averaged weights; ``"raw"`` or ``"ema"``, one
alone. The default asks whether *either* model still improves, because either can be the
one the user keeps: the average lags the raw weights while they improve fast and keeps
improving after they plateau (that is what it is kept for), so stopping on the raw series
alone would cut the average's gains short, and judging the average alone would ignore the
raw weights while they are ahead. A run that reports no average is judged on its raw
series exactly as before.

>>> EarlyStop({"patience": 3}).config.min_rel_delta
0.001
>>> best_of([(10, 3.0), (20, 2.0)], [(10, 2.5), (20, 2.2)])
[(10, 2.5), (20, 2.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal

__all__ = ["EarlyStop", "EarlyStopConfig", "stalled", "best_of"]


class EarlyStopConfig(BaseModel):
    """EarlyStop's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Validation results without improvement before stopping is advised.
    patience: int = Field(5, ge=1)
    #: Smallest improvement that counts, absolute ...
    min_delta: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    #: ... and relative to the best so far; the larger of the two applies.
    min_rel_delta: float = Field(1e-3, ge=0.0, lt=1.0)
    #: The series judged: per evaluation the better of the raw and the weight average's
    #: validation ("best"), or one of them alone ("raw", "ema").
    source: Literal["best", "raw", "ema"] = "best"


def best_of(
    raw: Sequence[tuple[int, float]], ema: Sequence[tuple[int, float]]
) -> list[tuple[int, float]]:
    """The two series merged by step (both come in step order), an evaluation reported for
    both models counting with the lower of its two values."""
    out: list[tuple[int, float]] = []
    i = j = 0
    while i < len(raw) or j < len(ema):
        if j == len(ema) or (i < len(raw) and raw[i][0] < ema[j][0]):
            out.append(tuple(raw[i]))  # type: ignore[arg-type]
            i += 1
        elif i == len(raw) or ema[j][0] < raw[i][0]:
            out.append(tuple(ema[j]))  # type: ignore[arg-type]
            j += 1
        else:  # the same evaluation, of both models
            out.append((raw[i][0], min(raw[i][1], ema[j][1])))
            i, j = i + 1, j + 1
    return out


def series(view: JobView, source: str) -> list[tuple[int, float]]:
    """The validation series ``source`` names, from what the run reported."""
    if source == "raw":
        return list(view.validations)
    if source == "ema":
        return list(view.validations_ema)
    return best_of(view.validations, view.validations_ema)


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
        values = series(view, cfg.source)
        out = stalled(values, cfg.patience, cfg.min_delta, cfg.min_rel_delta)
        if out is None:
            return []
        best_step, best, since = out
        # Named only where the weight average counted: plain runs read as they always did.
        what = "validation"
        if view.validations_ema and cfg.source != "raw":
            what = ("weight average's validation" if cfg.source == "ema"
                    else "validation (the better of raw and weight average)")
        return [Proposal.advise_stop(
            f"{what} {values[-1][1]:.6g} at step {values[-1][0]}: no "
            f"improvement on the best {best:.6g} (step {best_step}) for {since} results")]
