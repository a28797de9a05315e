"""The policy API: what a plugin implements, and how plugins are found and loaded.

A policy is a class with a validated ``Config`` and one method, ``propose``,
that reads a :class:`~trimtab.controller.state.JobView` and returns proposals.
It never applies anything: the engine arbitrates and the governor bounds.

>>> from pydantic import BaseModel, ConfigDict
>>> class Halve(Policy):
...     name = "halve"
...     class Config(BaseModel):
...         model_config = ConfigDict(extra="forbid")
...         every: int = 100
...     def propose(self, view):
...         if view.step and view.step % self.config.every == 0:
...             return [Proposal("lr", factor=0.5, reason=f"step {view.step}")]
...         return []
>>> Halve({"every": 10}).config.every
10

Loading goes in stages, as flake8's finder does: :func:`discover` lists the
entry points of group ``trimtab.policies`` sorted by name; :func:`load_policy`
resolves a name or a dotted path, imports it, checks it is a :class:`Policy`
and validates its config, wrapping every failure in :class:`PolicyLoadError`.
"""

from __future__ import annotations

import abc
import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from fnmatch import fnmatchcase
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trimtab.protocol import wire

if TYPE_CHECKING:
    from .state import JobView

__all__ = [
    "ENTRY_POINT_GROUP",
    "Proposal",
    "Policy",
    "PolicyLoadError",
    "discover",
    "is_allowed",
    "load_policy",
]

ENTRY_POINT_GROUP = "trimtab.policies"
#: The package of the built-in policies: always allowed to load.
BUILTIN_PACKAGE = "trimtab.policies"


_CAUSE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Advice a proposal may carry instead of a knob change.
ADVICE: tuple[str, ...] = ("stop",)


@dataclass(frozen=True)
class Proposal:
    """One policy's wish for one knob: a ``factor`` on the value in force, an absolute
    ``value``, or ``hold=True`` (no change); always with a ``reason``.

    >>> Proposal("lr", factor=0.5, reason="loss plateau").factor
    0.5

    A rollback proposal (:meth:`roll_back`) asks for a rollback to the newest stable
    checkpoint; its ``factor`` is the LR cut to make instead when none can be made.

    >>> p = Proposal.roll_back("nonfinite", "NaN loss")
    >>> (p.rollback, p.knob, p.factor)
    ('nonfinite', 'lr', 0.5)

    With ``to_step`` it asks for a *planned* rollback to the checkpoint listed at that
    step, stable or not, with the LR set to ``value``: the return at the end of a
    measurement phase (the LR range test's), which the engine orders only for the policy
    holding that phase; it neither escalates nor counts against the rollback budget.

    >>> Proposal.roll_back("lr_range_test", "sweep done", to_step=0, value=0.03).to_step
    0

    A sweep proposal (:meth:`sweep_value`) is one absolute value of a measurement phase: the
    first one opens the phase for its policy, and while the phase runs the engine takes
    that policy's proposals only and lets its values past every governor limit but the
    bounds (see :mod:`~trimtab.controller.engine`).

    >>> Proposal.sweep_value("lr", 1e-4, "range test at step 10").sweep
    True

    An advice proposal (:meth:`advise_stop`) changes no knob: the engine carries it in the
    decision and the controller passes it on to the run (``Command.stop_advice``).

    >>> Proposal.advise_stop("validation loss flat for 5 evaluations").advice
    'stop'
    """

    knob: wire.Knob
    _: KW_ONLY
    reason: str
    factor: float | None = None
    value: float | None = None
    hold: bool = False
    #: The cause of a rollback asked for (a short identifier, e.g. ``"nonfinite"``; it
    #: becomes a metric label); None for an ordinary proposal.
    rollback: str | None = None
    #: Advice to the run instead of a knob change: one of :data:`ADVICE` (None: none).
    advice: str | None = None
    #: With ``rollback``: roll back to the checkpoint at this step (a planned rollback).
    to_step: int | None = None
    #: An absolute value of a measurement sweep (see :meth:`sweep_value`).
    sweep: bool = False
    #: JSON-serialisable facts journaled with the proposal (e.g. a sweep's curve); a
    #: phase-ending rollback's ``found_lr`` here becomes the job's ``found_lr``.
    detail: dict[str, Any] | None = None
    #: A schedule's base trajectory (``value`` is its value now): the engine multiplies it
    #: by the job's correction and may send it to the client to evaluate per step.
    schedule: wire.SchedulePiece | None = None

    @classmethod
    def advise_stop(cls, reason: str) -> Proposal:
        """Recommend that the run stop, and why; no knob changes."""
        return cls("lr", reason=reason, advice="stop")

    @classmethod
    def roll_back(
        cls, cause: str, reason: str, *, fallback_factor: float = 0.5,
        to_step: int | None = None, value: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Proposal:
        """Roll back to the newest stable checkpoint for ``cause``; where no rollback can be
        made, cut the LR by ``fallback_factor`` (< 1) instead. With ``to_step``: a planned
        rollback to that checkpoint, the LR set to ``value`` (also where none can be made)."""
        if to_step is not None:
            return cls("lr", reason=reason, value=value, rollback=cause, to_step=to_step,
                       detail=detail)
        return cls("lr", reason=reason, factor=fallback_factor, rollback=cause, detail=detail)

    @classmethod
    def sweep_value(cls, knob: wire.Knob, value: float, reason: str,
                    detail: dict[str, Any] | None = None,
                    schedule: wire.SchedulePiece | None = None) -> Proposal:
        """One value of a measurement sweep of ``knob`` (opens the policy's phase); with
        ``schedule``, the sweep's trajectory (``value`` is its value now), which the engine
        sends live for the client to follow step by step."""
        return cls(knob, reason=reason, value=value, sweep=True, detail=detail,
                   schedule=schedule)

    def __post_init__(self) -> None:
        if self.knob not in wire.KNOBS:
            raise ValueError(f"knob {self.knob!r} is not one of {', '.join(wire.KNOBS)}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(f"a proposal for {self.knob} needs a non-empty reason")
        given = [n for n in ("factor", "value") if getattr(self, n) is not None]
        if self.hold is not False:
            given.append("hold")
        if self.detail is not None and not isinstance(self.detail, dict):
            raise ValueError(f"detail must be a dict or None, got {type(self.detail).__name__}")
        if self.advice is not None:
            if self.advice not in ADVICE:
                raise ValueError(f"advice must be one of {', '.join(ADVICE)}, got {self.advice!r}")
            if given or self.rollback is not None or self.sweep:
                raise ValueError(f"an advice proposal takes no factor, value, hold, rollback or "
                                 f"sweep; got {given or ['rollback or sweep']}")
            return
        if len(given) != 1:
            raise ValueError(
                f"a proposal for {self.knob} takes exactly one of factor, value or hold=True; "
                f"got {given or 'none'}"
            )
        if self.hold is not False and self.hold is not True:
            raise ValueError(f"hold must be True or False, got {self.hold!r}")
        _check_number(self.knob, "factor", self.factor, strictly_positive=True)
        _check_number(self.knob, "value", self.value, strictly_positive=False)
        if self.schedule is not None and (
                not isinstance(self.schedule, wire.SchedulePiece) or self.value is None
                or self.knob not in ("lr", "momentum")):
            raise ValueError(f"a schedule proposal is a wire.SchedulePiece with a value, for lr "
                             f"or momentum; got {self.knob} schedule={self.schedule!r:.80} "
                             f"value={self.value!r}")
        if self.sweep is not False:
            if self.sweep is not True or self.value is None or self.rollback is not None:
                raise ValueError(f"a sweep proposal takes an absolute value and no rollback; "
                                 f"got sweep={self.sweep!r} value={self.value!r} "
                                 f"rollback={self.rollback!r}")
        if self.to_step is not None:
            if (isinstance(self.to_step, bool) or not isinstance(self.to_step, int)
                    or self.to_step < 0):
                raise ValueError(f"to_step must be a checkpoint step (an int >= 0), "
                                 f"got {self.to_step!r}")
            if self.rollback is None or self.knob != "lr" or self.value is None:
                raise ValueError(
                    "to_step is for a rollback proposal for lr with a value (the LR to set "
                    f"after the restore); got {self.knob} rollback={self.rollback!r} "
                    f"value={self.value!r} factor={self.factor!r}")
        if self.rollback is not None:
            if not isinstance(self.rollback, str) or not _CAUSE.match(self.rollback):
                raise ValueError(
                    f"a rollback cause must match {_CAUSE.pattern}, got {self.rollback!r}"
                )
            if self.to_step is not None:
                return
            if self.knob != "lr" or self.factor is None or not self.factor < 1:
                raise ValueError(
                    "a rollback proposal is for lr with a fallback factor < 1, got "
                    f"{self.knob} factor={self.factor!r} value={self.value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record."""
        out = {
            "knob": self.knob, "factor": self.factor, "value": self.value,
            "hold": self.hold, "reason": self.reason, "rollback": self.rollback,
        }
        if self.advice is not None:
            out["advice"] = self.advice
        if self.to_step is not None:
            out["to_step"] = self.to_step
        if self.sweep:
            out["sweep"] = True
        if self.detail is not None:
            out["detail"] = self.detail
        if self.schedule is not None:
            out["schedule"] = self.schedule.model_dump(mode="json")
        return out


def _check_number(knob: str, what: str, x: Any, strictly_positive: bool) -> None:
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{knob} {what} must be a finite number, got {x!r}")
    if x < 0 or (strictly_positive and x == 0):
        allowed = "> 0" if strictly_positive else ">= 0"
        raise ValueError(f"{knob} {what} must be {allowed}, got {x!r}")


class _NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Policy(abc.ABC):
    """Base class of every policy; subclasses set ``name``, ``Config`` and ``propose``.

    See the module docstring for a complete example.
    """

    #: The name the policy is known by (in entry points, metrics, journal, reasons).
    name: ClassVar[str] = ""
    #: Its configuration model; pydantic, ``extra="forbid"``.
    Config: ClassVar[type[BaseModel]] = _NoConfig

    def __init__(self, config: BaseModel | dict[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        if isinstance(config, dict):
            config = self.Config.model_validate(config)
        elif not isinstance(config, self.Config):
            raise TypeError(
                f"policy {self.name!r}: config must be a dict or {self.Config.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    @abc.abstractmethod
    def propose(self, view: JobView) -> list[Proposal]:
        """Proposals for this job now; an empty list when there is nothing to say."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class PolicyLoadError(Exception):
    """A policy could not be found, imported, checked or configured; says which and why."""


def discover() -> dict[str, EntryPoint]:
    """Installed policies by entry-point name, sorted; the first of duplicate names wins."""
    found: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        found.setdefault(ep.name, ep)
    return found


def is_allowed(name: str, allow: Sequence[str]) -> bool:
    """Whether ``name`` may load: a built-in always; anything else only when the name or
    what it points at matches an entry (an ``fnmatch`` glob) of ``allow``. Nothing is
    imported to decide.

    >>> is_allowed("plateau", []), is_allowed("acme.policies:Mine", ["acme.*"])
    (True, True)
    """
    eps = discover()
    target = eps[name].value if name in eps else name
    module = target.partition(":")[0] if ":" in target else target.rpartition(".")[0]
    if module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + "."):
        return True
    return any(fnmatchcase(name, pat) or fnmatchcase(target, pat) for pat in allow)


def load_policy(
    name: str, config: dict[str, Any] | None = None, *, allow: Sequence[str] | None = None,
) -> Policy:
    """A configured policy from an entry-point name, ``pkg.module:Class`` or ``pkg.module.Class``.

    With ``allow`` given, a policy that :func:`is_allowed` refuses is not even imported.

    >>> load_policy("plateau", {"t_crit": 3.0}).config.t_crit
    3.0
    """
    if allow is not None and not is_allowed(name, allow):
        raise PolicyLoadError(
            f"policy {name!r} is not allowed: besides the built-in {BUILTIN_PACKAGE}.*, only "
            f"policies listed in allow_plugins load (allow_plugins = {list(allow)!r})"
        )
    cls = _resolve(name)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyLoadError(f"policy {name!r}: {cls!r} is not a trimtab Policy subclass")
    if not isinstance(cls.name, str) or not cls.name:
        raise PolicyLoadError(f"policy {name!r}: class {cls.__qualname__} sets no name")
    if config is not None and not isinstance(config, dict):
        raise PolicyLoadError(
            f"policy {name!r}: config must be a mapping, got {type(config).__name__}"
        )
    try:
        return cls(config)
    except ValidationError as exc:
        raise PolicyLoadError(f"policy {name!r}: bad config: {_explain(exc, cls)}") from None
    except Exception as exc:
        raise PolicyLoadError(f"policy {name!r}: constructor failed: {_cause(exc)}") from exc


def _resolve(name: str) -> Any:
    eps = discover()
    if name in eps:
        try:
            return eps[name].load()
        except Exception as exc:
            raise PolicyLoadError(
                f"policy {name!r}: cannot load entry point {eps[name].value!r}: {_cause(exc)}"
            ) from exc
    if ":" in name:
        module, _, attr = name.partition(":")
    elif "." in name:
        module, _, attr = name.rpartition(".")
    else:
        known = ", ".join(eps) or "none installed"
        raise PolicyLoadError(
            f"policy {name!r} not found: no entry point of that name in group "
            f"{ENTRY_POINT_GROUP!r} (known: {known}), and not a dotted path"
        )
    try:
        obj: Any = importlib.import_module(module)
    except Exception as exc:
        raise PolicyLoadError(f"policy {name!r}: cannot import {module!r}: {_cause(exc)}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PolicyLoadError(
                f"policy {name!r}: module {module!r} has no attribute {attr!r}"
            ) from None
    return obj


def _explain(exc: ValidationError, cls: type[Policy]) -> str:
    """Each bad field with its value and what is allowed."""
    fields = ", ".join(cls.Config.model_fields) or "none"
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        allowed = f" (allowed fields: {fields})" if err["type"] == "extra_forbidden" else ""
        parts.append(f"{where}={err.get('input')!r}: {err['msg']}{allowed}")
    return "; ".join(parts)


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
