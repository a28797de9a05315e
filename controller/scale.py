"""Scale awareness: what a job's registration facts imply for its defaults.

A :class:`ScaleContext` is built from the facts a client sends once at registration
(parameter count, per-group sizes, per-rank batch size, world size, optimizer type),
so that one policy configuration serves a small and a large run without retuning.

The batch-size rule it implements (:meth:`ScaleContext.batch_lr_factor`) scales a
learning rate tuned at a reference global batch ``B_ref`` to the job's global batch
``B = batch_size x world_size``:

* SGD family (SGD, SGD with momentum or Nesterov, LARS): **linear**, ``lr x B / B_ref``
  (Goyal et al. 2017, "Accurate, Large Minibatch SGD", the linear scaling rule);
* Adam family and other per-coordinate adaptive methods (Adam, AdamW, NAdam, RAdam,
  Adamax, Adafactor, LAMB, RMSprop, Adagrad): **square root**, ``lr x sqrt(B / B_ref)``
  (Hoffer et al. 2017, "Train longer, generalize better"; Malladi et al. 2022, "On the
  SDEs and Scaling Rules for Adaptive Gradient Algorithms").

>>> from trimtab.client import wire
>>> facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
...                         dtype="float32", device="cpu", batch_size=64, world_size=4)
>>> ctx = ScaleContext.from_facts(facts)
>>> (ctx.family, ctx.global_batch_size, ctx.batch_lr_factor(64))
('adam', 256, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from trimtab.client import wire

__all__ = ["BatchScaling", "OptimizerFamily", "ScaleContext", "optimizer_family"]

#: How an lr follows the global batch size: by optimizer family, or forced.
BatchScaling = Literal["auto", "linear", "sqrt"]
OptimizerFamily = Literal["sgd", "adam", "other"]

_ADAPTIVE = frozenset({"adafactor", "adagrad", "adadelta", "lamb", "rmsprop"})
_SGD = frozenset({"sgd", "sgdw", "lars", "asgd"})


def optimizer_family(name: str) -> OptimizerFamily:
    """``"adam"`` for the Adam family and other adaptive methods, ``"sgd"`` for SGD's.

    >>> [optimizer_family(n) for n in ("SGD", "FusedAdam", "RMSprop", "LBFGS")]
    ['sgd', 'adam', 'adam', 'other']
    """
    low = name.lower()
    if "adam" in low or low in _ADAPTIVE:
        return "adam"
    if low in _SGD or low.endswith("sgd"):
        return "sgd"
    return "other"


@dataclass(frozen=True)
class ScaleContext:
    """A job's scale, from its registration facts; see the module docstring."""

    param_count: int
    group_sizes: tuple[int, ...]
    world_size: int
    #: Per-rank batch size as the client gave it (None: not given).
    batch_size: int | None
    optimizer: str
    family: OptimizerFamily

    @classmethod
    def from_facts(cls, facts: wire.ScaleFacts) -> ScaleContext:
        """The context of a job's :class:`~trimtab.client.wire.ScaleFacts`."""
        return cls(
            param_count=facts.param_count, group_sizes=tuple(facts.group_sizes),
            world_size=facts.world_size, batch_size=facts.batch_size,
            optimizer=facts.optimizer, family=optimizer_family(facts.optimizer),
        )

    @property
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step over all ranks (None when the batch size is unknown)."""
        return None if self.batch_size is None else self.batch_size * self.world_size

    def batch_rule(self, scaling: BatchScaling = "auto") -> Literal["linear", "sqrt"]:
        """The rule ``scaling`` resolves to for this optimizer; ``"auto"`` follows its family."""
        if scaling != "auto":
            return scaling
        if self.family == "other":
            raise ValueError(
                f"optimizer {self.optimizer!r} is neither SGD- nor Adam-family, so the "
                "batch-size scaling rule is unknown; set batch_scaling to 'linear' or 'sqrt'"
            )
        return "linear" if self.family == "sgd" else "sqrt"

    def batch_lr_factor(self, reference_batch_size: int, scaling: BatchScaling = "auto") -> float:
        """The lr multiplier from ``reference_batch_size`` to this job's global batch."""
        if reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size!r}")
        batch = self.global_batch_size
        if batch is None:
            raise ValueError(
                "batch-size scaling needs the job's batch size, and the client registered "
                "none (pass batch_size= to attach)"
            )
        ratio = batch / reference_batch_size
        return ratio if self.batch_rule(scaling) == "linear" else math.sqrt(ratio)
