"""Spike guard: cut the learning rate at a loss or gradient-norm spike, or a non-finite value.

The rule: if the latest report had any non-finite loss or gradient, or, once the
z-scores have warmed up, the loss or gradient-norm z-score (the report against
the exponentially weighted history before it) is above ``z_threshold``, propose
``lr *= cut``. Only upward spikes count: a sudden drop in loss is no danger.
Rolling back to a stable checkpoint is the divergence guard's job, not this one's.

>>> SpikeGuard({"z_threshold": 6}).config.cut
0.5
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from trimtab.policies.sdk import JobView, Policy, Proposal

__all__ = ["SpikeGuard", "SpikeGuardConfig"]


class SpikeGuardConfig(BaseModel):
    """SpikeGuard's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A z-score above this is a spike.
    z_threshold: float = Field(4.0, gt=0.0, allow_inf_nan=False)
    #: The lr multiplier at a spike.
    cut: float = Field(0.5, gt=0.0, lt=1.0)
    #: Whether a non-finite loss or gradient in the latest report counts as a spike.
    on_nonfinite: bool = True


class SpikeGuard(Policy):
    """Loss or grad-norm z-score over ``z_threshold``, or non-finite values -> ``lr *= cut``."""

    name: ClassVar[str] = "spike_guard"
    Config: ClassVar[type[BaseModel]] = SpikeGuardConfig

    def propose(self, view: JobView) -> list[Proposal]:
        cfg: SpikeGuardConfig = self.config  # type: ignore[assignment]
        why = []
        last = view.last
        if cfg.on_nonfinite and last is not None:
            if last.nonfinite_losses or last.nonfinite_grads:
                why.append(
                    f"non-finite values in the last report: {last.nonfinite_losses} losses, "
                    f"{last.nonfinite_grads} gradients"
                )
        sig = view.signals
        for signal, z in (("loss", sig.loss_z), ("grad norm", sig.grad_norm_z)):
            if z is not None and z > cfg.z_threshold:
                why.append(f"{signal} spike: z={z:.1f} > {cfg.z_threshold:g}")
        if not why:
            return []
        return [Proposal("lr", factor=cfg.cut, reason="; ".join(why))]
