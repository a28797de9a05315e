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

The governor's defaults follow from the same context (:func:`derive_limits`, applied per
job when it registers; a limit the configuration sets is never touched):

* **lr bounds**: the lr is steered as a multiplier on the user's own lr (the knob
  model), so its bounds are the configured band of the multiplier (``[1e-3, 10]`` by
  default) widened to reach the family's sane range from the lr the job registered
  with: ``LR_CENTER[family] x [1e-2, 10] x`` the batch rule from ``REFERENCE_BATCH_SIZE``
  = 256 to the job's global batch. The centres are the customary lrs at batch 256: 0.1
  for SGD (Goyal et al. 2017; He et al. 2016) and 1e-3 for Adam (Kingma & Ba 2015's
  default). So a run started 100x too low can still be raised into the sane range (the
  band alone stops it at 10x), and one started 100x too high lowered into it. The
  effective lr a multiplier above 1 reaches is capped (``lr.max``, applied by the client
  at every step) at the top of that union, so a run registered early in its warm-up,
  whose lr is still tiny, is not raised past the sane range later; the user's own lr is
  never lowered by the cap, and 1.0 always lies inside, so nothing moves on its own.
* **clip bounds** are relative to the job's own gradient-norm scale (the governor's
  ``min_rel_grad_norm``/``max_rel_grad_norm``, ``[0.1, 10] x`` the gradient-norm EMA once
  the z-score warm-up has passed; see :mod:`trimtab.controller.governor`), not absolute,
  so one setting serves norms of 1e-3 and 1e3 alike.
* **weight decay and lr** stay coupled as ``wd_coupling`` says (see
  :func:`decay_is_lr_times_wd`; the engine applies it).

Step limits (``max_step_ratio``, slew, cooldown, deadband) are ratios and step counts,
already free of the model's scale, so they are not derived.

>>> from trimtab.protocol import wire
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

from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.protocol import wire

__all__ = [
    "BatchScaling",
    "OptimizerFamily",
    "ScaleContext",
    "optimizer_family",
    "decay_is_lr_times_wd",
    "DerivedLimits",
    "derive_limits",
    "explicit_fields",
    "LR_CENTER",
    "LR_CENTER_BY_OPTIMIZER",
    "LR_SPAN",
    "REFERENCE_BATCH_SIZE",
]

#: How an lr follows the global batch size: by optimizer family, or forced.
BatchScaling = Literal["auto", "linear", "sqrt"]
OptimizerFamily = Literal["sgd", "adam", "other"]

_ADAPTIVE = frozenset({"adafactor", "adagrad", "adadelta", "lamb", "rmsprop"})
_SGD = frozenset({"sgd", "sgdw", "lars", "asgd"})

#: The global batch size the lr centres are quoted at.
REFERENCE_BATCH_SIZE = 256
#: A family's customary lr at ``REFERENCE_BATCH_SIZE``: SGD's 0.1 (Goyal et al. 2017, He et
#: al. 2016), Adam's 1e-3 (Kingma & Ba 2015's default).
LR_CENTER: dict[str, float] = {"sgd": 0.1, "adam": 1e-3}
#: Optimizers of a family whose lr means something else: Adadelta's lr scales an update
#: already in the parameters' units (Zeiler 2012 has none; torch's default is 1.0), so the
#: Adam family's centre would put a run at its customary lr 100x over the sane range.
LR_CENTER_BY_OPTIMIZER: dict[str, float] = {"adadelta": 1.0}
#: The sane lr range around the centre: two decades below, one above.
LR_SPAN = (1e-2, 10.0)
#: Fields of a knob's bounds: setting any of them in the config keeps the lr's derived
#: bounds off.
_BOUND_FIELDS = ("min", "max", "min_rel", "max_rel")


#: Optimizers that read their param groups' lr only at their first step (torch's Rprop
#: sets each parameter's step size from it, then adapts them on its own): an lr multiplier
#: would change nothing they do, so their lr is not steered (the client refuses it too).
LR_READ_ONCE = frozenset({"rprop"})


def reads_lr_once(name: str) -> bool:
    """Whether optimizer ``name`` reads its lr only at its first step (:data:`LR_READ_ONCE`).

    >>> reads_lr_once("Rprop"), reads_lr_once("RMSprop")
    (True, False)
    """
    return name.lower() in LR_READ_ONCE


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


def decay_is_lr_times_wd(name: str) -> bool:
    """Whether the optimizer's step shrinks the weights by ``lr x wd`` (so ``wd_coupling``
    applies): decoupled decay (AdamW, Lion; Loshchilov & Hutter 2019) and SGD's family,
    where L2 in the gradient is scaled by the lr too. Adam's L2 goes through its
    per-coordinate normalisation, so its decay is not ``lr x wd``.

    >>> [decay_is_lr_times_wd(n) for n in ("AdamW", "SGD", "Lion", "Adam", "RMSprop")]
    [True, True, True, False, False]
    """
    low = name.lower()
    return "adamw" in low or "lion" in low or optimizer_family(name) == "sgd"


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

    @property
    def reads_lr_once(self) -> bool:
        """Whether the job's optimizer reads its lr only at its first step (its lr is not
        steered: :func:`reads_lr_once`)."""
        return reads_lr_once(self.optimizer)

    @classmethod
    def from_facts(cls, facts: wire.ScaleFacts) -> ScaleContext:
        """The context of a job's :class:`~trimtab.protocol.wire.ScaleFacts`."""
        return cls(
            param_count=facts.param_count,
            group_sizes=tuple(facts.group_sizes),
            world_size=facts.world_size,
            batch_size=facts.batch_size,
            optimizer=facts.optimizer,
            family=optimizer_family(facts.optimizer),
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

    def lr_range(self) -> tuple[float, float] | None:
        """The family's sane lr range at this job's global batch (None: not SGD/Adam family).

        ``LR_CENTER[family] x LR_SPAN``, times the batch rule from ``REFERENCE_BATCH_SIZE``
        (1 when the batch size is unknown).

        >>> from trimtab.protocol import wire
        >>> facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
        ...                         dtype="float32", device="cpu", batch_size=64)
        >>> ScaleContext.from_facts(facts).lr_range()
        (5e-06, 0.005)
        >>> ScaleContext.from_facts(facts.model_copy(update={"optimizer": "Adadelta",
        ...                                                  "batch_size": 256})).lr_range()
        (0.01, 10.0)
        """
        if self.family == "other":
            return None
        f = 1.0 if self.batch_size is None else self.batch_lr_factor(REFERENCE_BATCH_SIZE)
        center = LR_CENTER_BY_OPTIMIZER.get(self.optimizer.lower(),
                                            LR_CENTER[self.family]) * f
        return center * LR_SPAN[0], center * LR_SPAN[1]


@dataclass(frozen=True)
class DerivedLimits:
    """A job's governor config after :func:`derive_limits`, and one line per derived limit."""

    config: GovernorConfig
    notes: tuple[str, ...] = ()


def explicit_fields(cfg: GovernorConfig) -> set[str]:
    """``"knob.field"`` for every limit the configuration set, plus top-level names.

    A knob's table replaces that knob's defaults as a whole (fields it leaves out are off),
    so every field of a knob the configuration gives counts as set.

    >>> sorted(explicit_fields(GovernorConfig(clip={"max": 5.0})))[:2]
    ['clip.allow_zero', 'clip.cooldown_steps']
    >>> explicit_fields(GovernorConfig())
    set()
    """
    out: set[str] = set()
    for name in cfg.model_fields_set:
        if isinstance(getattr(cfg, name), KnobLimits):
            out |= {f"{name}.{f}" for f in KnobLimits.model_fields}
        else:
            out.add(name)
    return out


def derive_limits(
    ctx: ScaleContext, cfg: GovernorConfig, explicit: set[str], registered: wire.Knobs,
    lr_spread: float = 1.0,
) -> DerivedLimits:
    """``cfg`` with the lr bounds derived from ``ctx`` (see the module docstring), unless
    ``explicit`` (see :func:`explicit_fields`) names one of the lr's bound fields.
    ``registered`` holds the user's own values at registration (group 0's lr);
    ``lr_spread``, the highest group lr over group 0's (:attr:`wire.Register.lr_spread`):
    the family's range bounds the highest, on which the client measures the cap too.

    >>> from trimtab.protocol import wire
    >>> facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="SGD",
    ...                         dtype="float32", device="cpu", batch_size=256)
    >>> d = derive_limits(ScaleContext.from_facts(facts), GovernorConfig(), set(),
    ...                   wire.Knobs(lr=1e-4))
    >>> (f"{d.config.lr.min_rel:g}", f"{d.config.lr.max_rel:g}", d.config.lr.max)
    ('0.001', '10000', 1.0)
    """
    notes: list[str] = []
    lr = cfg.lr
    if ctx.reads_lr_once:
        # An optimizer trial: Rprop's lr x0.01 left its updates 1.94x larger, while the
        # journal said x0.01 was in force. Pinned: no command moves it, a rollback cuts none.
        pinned = lr.model_copy(update={"min_rel": 1.0, "max_rel": 1.0, "min": None,
                                       "max": None})
        notes.append(f"lr not steered (multiplier bounds [1, 1]): {ctx.optimizer} reads its lr "
                     "only at its first step, and adapts each parameter's step size on its own")
        return DerivedLimits(cfg.model_copy(update={"lr": pinned}), tuple(notes))
    rng = ctx.lr_range()
    if rng is not None and not any(f"lr.{f}" in explicit for f in _BOUND_FIELDS):
        lr0 = None if registered.lr is None else registered.lr * lr_spread
        lo_m = lr.min_rel if lr.min_rel is not None else 0.0
        hi_m = lr.max_rel if lr.max_rel is not None else math.inf
        cap = rng[1]
        if lr0 is not None and lr0 > 0:
            lo_m, hi_m = min(lo_m, rng[0] / lr0), max(hi_m, rng[1] / lr0)
            if lr.max_rel is not None:
                cap = max(cap, lr.max_rel * lr0)
        lr = lr.model_copy(update={"min_rel": lo_m, "max_rel": hi_m, "max": cap})
        batch = ctx.global_batch_size
        rule = (
            "unknown batch, unscaled"
            if batch is None
            else (f"{ctx.batch_rule()} rule, global batch {batch} vs {REFERENCE_BATCH_SIZE}")
        )
        notes.append(
            f"lr multiplier bounds [{lo_m:.3g}, {hi_m:.3g}], effective lr capped at "
            f"{cap:.3g}: {_whose(ctx)} range [{rng[0]:.3g}, {rng[1]:.3g}] ({rule}) "
            f"joined with the configured band around the registered lr {lr0}"
            + (f" (the highest param group's, {lr_spread:.3g}x group 0's)"
               if lr_spread > 1.0 else "")
        )
    return DerivedLimits(cfg.model_copy(update={"lr": lr}), tuple(notes))


def _whose(ctx: ScaleContext) -> str:
    """Whose sane lr range a job's is, for the log: its family's, or its optimizer's own."""
    if ctx.optimizer.lower() in LR_CENTER_BY_OPTIMIZER:
        return f"{ctx.optimizer}'s"
    return f"{ctx.family} family"
