"""The policy API: what a plugin implements, and how plugins are found and loaded.

A policy is a class with a validated ``Config`` and one method, ``propose``,
that reads a :class:`~trimtab.controller.view.JobView` and returns proposals (the kinds
are in :mod:`~trimtab.controller.proposal`).
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
import difflib
import importlib
from collections.abc import Sequence
from fnmatch import fnmatchcase
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trimtab.controller.proposal import ADVICE, KINDS, Advice, Proposal, Rollback, Sweep

if TYPE_CHECKING:
    from .view import JobView

__all__ = [
    "ENTRY_POINT_GROUP",
    "ADVICE",
    "KINDS",
    "Proposal",
    "Rollback",
    "Sweep",
    "Advice",
    "Policy",
    "PolicyLoadError",
    "discover",
    "is_allowed",
    "load_policy",
]

ENTRY_POINT_GROUP = "trimtab.policies"
#: The package of the built-in policies: always allowed to load.
BUILTIN_PACKAGE = "trimtab.policies"


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
    """Installed policies by entry-point name, sorted. Of several entry points with one
    name a built-in wins (a plugin cannot take the place of ``divergence_guard``, whatever
    ``allow_plugins`` says), else the first by target; :func:`ignored` gives the others."""
    return _scan()[0]


def ignored() -> list[tuple[EntryPoint, EntryPoint]]:
    """``(ignored, used)`` for each entry point that another of the same name wins over."""
    return _scan()[1]


def _scan() -> tuple[dict[str, EntryPoint], list[tuple[EntryPoint, EntryPoint]]]:
    found: dict[str, EntryPoint] = {}
    lost: list[tuple[EntryPoint, EntryPoint]] = []
    eps = entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(eps, key=lambda e: (e.name, not _is_builtin(e.value), e.value)):
        if ep.name in found:
            lost.append((ep, found[ep.name]))
        else:
            found[ep.name] = ep
    return found, lost


def _is_builtin(target: str) -> bool:
    """Whether an entry point's target (``pkg.module:Class``) is a built-in policy."""
    module = target.partition(":")[0] if ":" in target else target.rpartition(".")[0]
    return module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + ".")


def is_allowed(name: str, allow: Sequence[str]) -> bool:
    """Whether ``name`` may load: a built-in always; anything else only when the name or
    what it points at matches an entry (an ``fnmatch`` glob) of ``allow``. Nothing is
    imported to decide.

    >>> is_allowed("plateau", []), is_allowed("acme.policies:Mine", ["acme.*"])
    (True, True)
    """
    eps = discover()
    target = eps[name].value if name in eps else name
    if _is_builtin(target):
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
        eps = discover()
        if name not in eps and ":" not in name and "." not in name:
            # Neither installed nor a dotted path: a typo, and not a matter of permission.
            raise _not_found(name, eps)
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
        raise _not_found(name, eps)
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


def _not_found(name: str, eps: dict[str, EntryPoint]) -> PolicyLoadError:
    """A name that is no installed policy: the ones there are, and the closest to it."""
    known = ", ".join(eps) or "none installed"
    close = difflib.get_close_matches(name, list(eps), n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return PolicyLoadError(
        f"policy {name!r} not found: no entry point of that name in group "
        f"{ENTRY_POINT_GROUP!r} (known: {known}), and not a dotted path{hint}"
    )


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
