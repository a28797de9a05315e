"""The controller's configuration: defaults, then a TOML file, then environment variables,
then command-line flags — each later source overriding the earlier one.

>>> cfg = load_config(env={"TRIMTAB_GOVERNOR__LR__COOLDOWN_STEPS": "20"})
>>> cfg.governor.lr.cooldown_steps
20

An invalid value is refused at start with :class:`ConfigError`, whose message names the
field, the value given and what is allowed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trimtab.controller.limits import GovernorConfig
from trimtab.controller.ratelimit import RateLimitConfig
from trimtab.controller.retention import RetentionConfig
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.tracker import SignalConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ENV_PREFIX", "PolicySpec", "ControllerConfig", "ConfigError", "load_config",
           "is_loopback_endpoint"]

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


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only: ``ipc://``, ``inproc://``,
    or ``tcp://`` on a loopback address or a name that resolves to loopback addresses only.

    >>> is_loopback_endpoint("tcp://127.0.0.1:5555"), is_loopback_endpoint("tcp://[::1]:5")
    (True, True)
    >>> is_loopback_endpoint("tcp://0.0.0.0:5555"), is_loopback_endpoint("tcp://*:5555")
    (False, False)
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.split(";")[-1].strip("[]")  # "src;dst" picks the local address of a connect
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # an interface name or an unknown host: not provably local
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


#: The policy every job runs unless a config says ``safety_net = false``.
SAFETY_NET = "divergence_guard"


def _default_policies() -> list[PolicySpec]:
    # Chosen by measurement, do no harm first (bench/results/tuned.md, python -m
    # bench.tuned, 4 seeds): at each task's tuned LR with its usual schedule, the set
    # before (divergence_guard, plateau, an always-on lr_range_test, grad_noise) ended
    # 1.05-3.7x worse than the bare run (gpt 1.14-1.25x, digits 2.24x median); grad_noise
    # (x0.8 on a grad-norm coefficient of variation above 0.5) cut tuned runs of the
    # digits CNN and the width MLP 4-6 times, plateau cut the tuned noisy quadratic
    # (1.12x). The default now is the safety net plus an LR range test that runs only on
    # evidence the run's own LR is far off (non-finite values, a loss that blows up or
    # rises early, or one that does not move): 1.000 on every task at its tuned LR. The
    # price, shown in the same file: less rescue of a run started decades off its LR.
    # plateau, grad_noise, adaptive_clip, update_ratio and the schedules stay installed.
    return [PolicySpec(name="divergence_guard"), PolicySpec(name="lr_range_test")]


class ControllerConfig(BaseModel):
    """Everything ``trimtab serve`` needs; every field has a sensible default."""

    model_config = ConfigDict(extra="forbid")

    bind: Annotated[str, Field(pattern=r"^(tcp|ipc|inproc)://.+")] = "tcp://127.0.0.1:5555"
    #: Port of the Prometheus /metrics endpoint; 0 turns it off.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    #: Address the /metrics endpoint binds: loopback by default, like ``bind``; a
    #: Prometheus on another host (or outside a container) needs ``0.0.0.0`` or the
    #: host's address (``--metrics-addr``). The endpoint is unauthenticated and read-only.
    metrics_addr: Annotated[str, Field(min_length=1, max_length=255)] = "127.0.0.1"
    journal: str = "trimtab-journal.db"
    #: A job not heard from for this long is marked lost and its series end.
    job_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    #: A registration of another run under a job's name, from another connection, while
    #: the job's run was heard within this long, is refused (``conflict``): two live runs
    #: never share one job's state and commands. A client heartbeats every second by
    #: default; a run silent this long (a crashed process, its replacement starting) is
    #: taken over by the new one. Keep it above the clients' ``heartbeat_s``.
    takeover_after_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    #: An ended job's series (it said bye, or was lost) stay on /metrics this long, with
    #: ``trimtab_job_live`` 0, so that a job shorter than a scrape interval is scraped and
    #: every job's end is seen; 0: they go at once. Keep it above the scrape interval.
    metrics_grace_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    #: A live job's state is saved in the journal at registration, with every command it
    #: is sent, every ack, and when it ends; what reports alone change (its signals and
    #: history) is saved once it is this old. So a controller killed outright loses at most
    #: this many seconds of a job's signal history (a restarted one takes the next reports
    #: from there), never a command or its sequence number. 0: saved after every report.
    state_save_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 5.0
    #: A command not acknowledged after this many reports is sent again.
    resend_after_reports: Annotated[int, Field(ge=1, le=1000)] = 2
    #: Longest wait for one policy's ``propose`` (ms); a policy that overruns it is disabled
    #: for that job and its call abandoned (see :mod:`trimtab.controller.budget`); 0: no
    #: budget, policies are called inline. Built-in policies answer in well under 1 ms; the
    #: margin keeps an overloaded host's preemptions from disabling a healthy policy.
    policy_budget_ms: Annotated[float, Field(ge=0, le=60_000, allow_inf_nan=False)] = 1000.0
    log_level: Annotated[str, Field(pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    policies: list[PolicySpec] = Field(default_factory=_default_policies)
    #: The safety net (``divergence_guard``: rollbacks for non-finite values, spikes, a
    #: climb, a stranded run) runs for every job, first, when ``policies`` does not list it;
    #: False: only the policies listed (no rollback at all unless one of them asks).
    safety_net: bool = True
    #: Send schedule policies' trajectories to the client to evaluate at every optimizer
    #: step (where the governor's limits allow; see :mod:`trimtab.controller.engine`);
    #: False: a schedule moves its knob once per report.
    live_schedules: bool = True
    signals: SignalConfig = Field(default_factory=SignalConfig)
    governor: GovernorConfig = Field(default_factory=GovernorConfig)
    #: Stable marking, rollback escalation and budget.
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    #: Third-party policies allowed to load: entry-point names or dotted paths (globs).
    #: The built-in ``trimtab.policies.*`` are always allowed; nothing else is by default.
    allow_plugins: list[Annotated[str, Field(min_length=1)]] = []
    #: Let ``bind`` be a non-loopback address without CURVE keys: anyone who can reach it
    #: may then report for and steer any job. Loopback, ipc:// and inproc:// need no keys.
    allow_remote: bool = False
    #: CURVE: the controller's key pair file (``server.key_secret`` of ``trimtab keys
    #: generate``). With ``curve_allowed_clients``, only listed client keys can connect.
    curve_server_secret: str | None = None
    #: CURVE: a directory of the client public keys (``*.key``) allowed to connect; re-read
    #: when it changes.
    curve_allowed_clients: str | None = None
    #: CURVE: a directory of the public keys of the people allowed to steer jobs (``trimtab
    #: set``, ``pause``, ``resume``, ``rollback``; ``trimtab keys generate --operator``).
    #: Unset, with CURVE on, nobody may; without CURVE, anyone who can reach the loopback
    #: socket may (as anyone there may report for any job).
    curve_operators: str | None = None
    #: Per-peer message rate limits (a peer: one client connection).
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    #: What the journal keeps, and for how long (see :mod:`trimtab.controller.retention`).
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @field_validator("curve_server_secret")
    @classmethod
    def _a_key_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError("no such file; expected the server.key_secret written by "
                             "`trimtab keys generate`")
        return path

    @field_validator("curve_operators")
    @classmethod
    def _an_operator_dir(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_dir():
            raise ValueError("no such directory; expected a directory of operator public keys "
                             "(*.key), e.g. the operators/ of `trimtab keys generate --operator`")
        return path

    @field_validator("curve_allowed_clients")
    @classmethod
    def _a_key_dir(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_dir():
            raise ValueError("no such directory; expected a directory of client public keys "
                             "(*.key), e.g. the allowed/ of `trimtab keys generate`")
        return path

    @field_validator("bind")
    @classmethod
    def _tcp_port(cls, bind: str) -> str:
        # libzmq takes a port past 65535 modulo 65536 (99999 bound 34463).
        if bind.startswith("tcp://"):
            port = bind[len("tcp://"):].rpartition(":")[2]
            if port != "*" and not (port.isdigit() and int(port) <= 65535):
                raise ValueError(f"port {port!r} is not a TCP port; allowed: 0 to 65535, or * "
                                 "for any free one (tcp://HOST:PORT)")
        return bind

    @model_validator(mode="after")
    def _remote_needs_keys(self) -> ControllerConfig:
        if (self.curve_server_secret is None) != (self.curve_allowed_clients is None):
            raise ValueError(
                f"curve_server_secret = {self.curve_server_secret!r} and curve_allowed_clients"
                f" = {self.curve_allowed_clients!r}: set both (CURVE on) or neither (off)")
        if self.curve_operators is not None and self.curve_server_secret is None:
            raise ValueError(
                f"curve_operators = {self.curve_operators!r} without CURVE: set "
                "curve_server_secret and curve_allowed_clients too, or leave it unset")
        if (self.curve_server_secret is None and not self.allow_remote
                and not is_loopback_endpoint(self.bind)):
            raise ValueError(
                f"bind = {self.bind!r} is not a loopback address and no CURVE keys are "
                "configured; allowed without keys: tcp:// on 127.0.0.0/8, [::1] or localhost, "
                "ipc://, inproc://. Set curve_server_secret and curve_allowed_clients (see "
                "`trimtab keys generate`), or allow_remote = true (--allow-remote) to accept "
                "unauthenticated peers")
        return self

    @model_validator(mode="after")
    def _with_the_safety_net(self) -> ControllerConfig:
        # A config that lists its policies replaces the default set; one that left out
        # divergence_guard (a trial's: [[policies]] lr_range_test alone) had no rollback at
        # all, and a run whose weights went non-finite skipped every step for good under a
        # live controller. Safety is not opted out of by omission.
        if self.safety_net and not any(s.name == SAFETY_NET for s in self.policies):
            self.policies = [PolicySpec(name=SAFETY_NET), *self.policies]
        return self

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
        if not err["loc"]:  # a rule across fields: its message names them and their values
            lines.append(f"  {err['msg']}")
            continue
        where = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        allowed = ""
        if err["type"] == "extra_forbidden":
            fields = _fields_at(err["loc"][:-1])
            allowed = f" (allowed fields: {', '.join(fields)})" if fields else ""
        lines.append(f"  {where} = {given!r:.120}: {err['msg']}{allowed}")
    return "\n".join(lines)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the configuration model at ``loc`` (list indices skipped); empty
    where it is not a model."""
    model: Any = ControllerConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return sorted(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    """The pydantic model an annotation holds (through Optional, list and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


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
