"""trimtab candidate policy sets: ``--trimtab-set NAME=policy[,policy...]``.

Each set runs as the contender ``trimtab:NAME`` against its own ``trimtab serve`` whose
configuration lists exactly those policies, in that order. A list that starts with ``+``
extends the default set (what a user gets with no configuration). A policy takes
settings after colons, each value read as JSON when it parses and as a string otherwise;
``{steps}`` or ``{steps/N}`` stands for the run's budget (divided by N, rounded), so a
schedule fits every task: the controller then gets one entry per task, for that task's
jobs (``bench-TASK-*``).

>>> name, items = parse_set("warm=+warmup:warmup_steps=20")
>>> name, [p for p, _ in items]
('warm', ['divergence_guard', 'lr_range_test', 'warmup'])
>>> items[1], items[-1]
(('lr_range_test', {'sweep_steps': '{steps/5}'}), ('warmup', {'warmup_steps': 20}))
>>> print(to_toml([("warmup", {"warmup_steps": 20})]), end="")
safety_net = false
[[policies]]
name = "warmup"
config = { warmup_steps = 20 }
>>> print(to_toml([("cosine", {"t_max": "{steps}"})], {"a": 300}), end="")
safety_net = false
[[policies]]
name = "cosine"
config = { t_max = 300 }
jobs = ["bench-a-*"]
"""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points

__all__ = ["CANDIDATES", "FIT_TO_BUDGET", "default_items", "default_set", "describe",
           "known_policies", "parse_set", "to_toml"]

#: The candidate default sets ``python -m bench.choose_default`` measures beside the
#: ``trimtab`` contender (the current default), as written on the command line: the
#: default plus each policy that could join it.
CANDIDATES = (
    "guard_only=divergence_guard",
    "plateau=+plateau",
    "noise=+grad_noise",
    "spike=+spike_guard",
    "clip=+adaptive_clip",
    "ratio=+update_ratio",
    "always_sweep=divergence_guard,lr_range_test:when=always:sweep_steps={steps/5}",
    "warmup=+warmup:warmup_steps={steps/20}",
    "cosine=+cosine:t_max={steps}",
)

#: Settings the bench gives the default set's policies so that they fit a run's budget, as
#: the schedule contenders get theirs (OneCycle's total steps, cosine's T_max): the range
#: test's sweep takes a fifth of the budget (the library's default, 200 steps, is for runs
#: of thousands of steps).
FIT_TO_BUDGET = {"lr_range_test": {"sweep_steps": "{steps/5}"}}

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STEPS = re.compile(r"^\{steps(?:/([0-9]+))?\}$")


def default_set() -> list[str]:
    """The policy names of the controller's default configuration."""
    from trimtab.controller.config import ControllerConfig

    return [p.name for p in ControllerConfig().policies]


def default_items() -> list[tuple[str, dict]]:
    """The default set as the bench runs it: each policy with its :data:`FIT_TO_BUDGET`
    settings."""
    return [(p, dict(FIT_TO_BUDGET.get(p, {}))) for p in default_set()]


def known_policies() -> list[str]:
    """Installed policy names (entry-point group ``trimtab.policies``), sorted."""
    return sorted(ep.name for ep in entry_points(group="trimtab.policies"))


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(text: str) -> tuple[str, list[tuple[str, dict]]]:
    """``NAME=policy[:key=value...][,policy...]`` -> (NAME, [(policy, config), ...]).

    Raises ValueError naming the bad part and what is allowed.
    """
    where = f"--trimtab-set {text!r}"
    name, sep, body = text.partition("=")
    if not sep or not _NAME.match(name):
        raise ValueError(f"{where}: the set name {name!r} is invalid; allowed: NAME=policies "
                         "with NAME of 1-40 characters A-Za-z0-9_.-")
    items: list[tuple[str, dict]] = []
    if body.startswith("+"):
        items = default_items()
        body = body[1:]
    known = known_policies()
    for part in filter(None, body.split(",")):
        policy, *settings = part.split(":")
        if policy not in known and "." not in policy:
            raise ValueError(f"{where}: unknown policy {policy!r}; allowed: "
                             f"{', '.join(known)} or a dotted path")
        config = {}
        for kv in settings:
            key, eq, value = kv.partition("=")
            if not eq or not _KEY.match(key):
                raise ValueError(f"{where}: policy {policy!r} setting {kv!r} is invalid; "
                                 "allowed: key=value with key an identifier")
            config[key] = _value(value)
        items = [i for i in items if i[0] != policy] + [(policy, config)]
    if not items:
        raise ValueError(f"{where}: no policies; allowed: at least one policy, or '+' for "
                         "the default set")
    return name, items


def _toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise ValueError("a policy setting cannot be null in TOML")
    return json.dumps(v)


def _per_task(config: dict, steps: int) -> dict:
    out = {}
    for k, v in config.items():
        m = _STEPS.match(v) if isinstance(v, str) else None
        out[k] = max(1, round(steps / int(m.group(1) or 1))) if m else v
    return out


def to_toml(items: list[tuple[str, dict]], steps: dict[str, int] | None = None,
            base: dict | None = None) -> str:
    """The controller configuration that runs exactly ``items``; ``steps`` (task -> budget)
    fills in ``{steps}`` settings, one entry per task; ``base`` (a parsed configuration,
    say ``--trimtab-config``) supplies every other setting, its own policies replaced.
    Exactly: a set without ``divergence_guard`` says ``safety_net = false`` (else the
    controller runs the safety net first), unless ``base`` says otherwise."""
    out = [f"{k} = {_toml_value(v)}" for k, v in (base or {}).items() if k != "policies"]
    if "safety_net" not in (base or {}) and all(p != "divergence_guard" for p, _ in items):
        out.append("safety_net = false")
    for policy, config in items:
        per_task = any(isinstance(v, str) and _STEPS.match(v) for v in config.values())
        if per_task and not steps:
            raise ValueError(f"policy {policy!r}: a {{steps}} setting needs the tasks' budgets")
        for task, n in (sorted(steps.items()) if per_task else [(None, 0)]):
            c = _per_task(config, n) if per_task else config
            out += ["[[policies]]", f"name = {json.dumps(policy)}"]
            if c:
                out.append(f"config = {_toml_value(c)}")
            if task is not None:
                out.append(f"jobs = [{json.dumps(f'bench-{task}-*')}]")
    return "\n".join(out) + "\n"


def describe(items: list[tuple[str, dict]]) -> str:
    """``a, b (k=v)`` for the settings table."""
    return ", ".join(p + (f" ({', '.join(f'{k}={v}' for k, v in c.items())})" if c else "")
                     for p, c in items)
