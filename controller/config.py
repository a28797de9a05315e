"""The controller's configuration: defaults, then a TOML file, then environment variables,
then command-line flags — each later source overriding the earlier one.

>>> cfg = load_config(env={"TRIMTAB_GOVERNOR__LR__COOLDOWN_STEPS": "20"})
>>> cfg.governor.lr.cooldown_steps
20

An invalid value is refused at start with :class:`ConfigError`, whose message names the
field, the value given and what is allowed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trimtab.controller.governor import GovernorConfig
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.state import SignalConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ENV_PREFIX", "PolicySpec", "ControllerConfig", "ConfigError", "load_config"]

#: Environment variables ``TRIMTAB_<FIELD>`` override the file; ``__`` goes one level down
#: (``TRIMTAB_GOVERNOR__LR__MAX_STEP_RATIO=1.5``).
ENV_PREFIX = "TRIMTAB_"


class PolicySpec(BaseModel):
    """One policy in the engine's ordered set: a registered name or a dotted path.

    >>> PolicySpec(name="plateau", shadow=True, jobs=["exp-*"]).applies_to("exp-7")
    True
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    config: dict[str, Any] = {}
    #: Run live, but only journal and export its decisions: never send them.
    shadow: bool = False
    #: Job-name globs (``fnmatch``) this entry is for; None: every job.
    jobs: list[Annotated[str, Field(min_length=1)]] | None = None

    def applies_to(self, job: str) -> bool:
        """Whether this entry runs for ``job``."""
        return self.jobs is None or any(fnmatchcase(job, g) for g in self.jobs)


def _default_policies() -> list[PolicySpec]:
    # spike_guard stays installed (an LR cut without rollback) but is not on by default:
    # divergence_guard covers its cases, and rolls back.
    return [PolicySpec(name="divergence_guard"), PolicySpec(name="plateau")]


class ControllerConfig(BaseModel):
    """Everything ``trimtab serve`` needs; every field has a sensible default."""

    model_config = ConfigDict(extra="forbid")

    bind: Annotated[str, Field(pattern=r"^(tcp|ipc|inproc)://.+")] = "tcp://127.0.0.1:5555"
    #: Port of the Prometheus /metrics endpoint; 0 turns it off.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    metrics_addr: str = "0.0.0.0"
    journal: str = "trimtab-journal.db"
    #: A job not heard from for this long is marked lost and its series end.
    job_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    #: A command not acknowledged after this many reports is sent again.
    resend_after_reports: Annotated[int, Field(ge=1, le=1000)] = 2
    log_level: Annotated[str, Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    policies: list[PolicySpec] = Field(default_factory=_default_policies)
    signals: SignalConfig = Field(default_factory=SignalConfig)
    governor: GovernorConfig = Field(default_factory=GovernorConfig)
    #: Stable marking, rollback escalation and budget.
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    #: Third-party policies allowed to load: entry-point names or dotted paths (globs).
    #: The built-in ``trimtab.policies.*`` are always allowed; nothing else is by default.
    allow_plugins: list[Annotated[str, Field(min_length=1)]] = []

    @model_validator(mode="after")
    def _one_entry_per_name_and_job(self) -> ControllerConfig:
        # The same name twice is fine only for different jobs (say, shadow for some,
        # active for others); with ``jobs`` unset on both, one would always hide the other.
        # For a job that two entries match, the first one wins.
        for spec in self.policies:
            same = [s for s in self.policies if s.name == spec.name]
            if len(same) > 1 and any(s.jobs is None for s in same):
                raise ValueError(f"policy {spec.name!r} is listed {len(same)} times; "
                                 "give each entry its own `jobs`")
        return self


class ConfigError(ValueError):
    """A configuration value was refused; the message says which, what and what is allowed."""


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid trimtab configuration ({source}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        given = err.get("input")
        lines.append(f"  {where} = {given!r:.120}: {err['msg']}")
    return "\n".join(lines)


def _parse_env_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from ``TRIMTAB_*`` variables."""
    out: dict[str, Any] = {}
    for key, text in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid trimtab configuration (environment): {key} "
                                  "conflicts with another variable")
        node[path[-1]] = _parse_env_value(text)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ControllerConfig:
    """Defaults < TOML file at ``path`` (or ``$TRIMTAB_CONFIG``) < environment < ``overrides``."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    sources = []
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        sources.append(str(path))
    from_env = env_overrides(env)
    if from_env:
        sources.append("environment")
    data = _merge(_merge(data, from_env), overrides or {})
    if overrides:
        sources.append("command line")
    try:
        return ControllerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, " + ".join(sources) or "defaults")) from None
