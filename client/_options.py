"""attach()'s options checked, and the facts a job registers with: what the guard knows
before its first step.

A refused option names the option, the value given and what is allowed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from typing import Any

import torch

from trimtab.protocol import wire

from ._checkpoint_files import unfileable

log = logging.getLogger("trimtab.client")

__all__ = ["NONFINITE_MODES", "check_endpoint"]

#: Allowed values of ``nonfinite``.
NONFINITE_MODES: tuple[str, ...] = ("auto", "skip", "zero")


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return _refused(name, repr(value), allowed)


def _is_int(x: object, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _check_options(
    job: str, report_every: int, clip: float | None, batch_size: int | None,
    heartbeat_s: float, queue_size: int, nonfinite: str, liveness: int,
) -> None:
    try:
        wire.Heartbeat(job=job)
    except Exception:
        raise _invalid("job", job, "1-128 characters of A-Za-z0-9_.:@/-") from None
    checks = [
        ("report_every", report_every, _is_int(report_every, 1), "an int >= 1"),
        ("clip", clip, clip is None or _is_positive(clip), "None or a finite number > 0"),
        ("batch_size", batch_size, batch_size is None or _is_int(batch_size, 1),
         "None or an int >= 1"),
        ("heartbeat_s", heartbeat_s, _is_positive(heartbeat_s), "a number of seconds > 0"),
        ("queue_size", queue_size, _is_int(queue_size, 1), "an int >= 1"),
        ("nonfinite", nonfinite, nonfinite in NONFINITE_MODES, ", ".join(NONFINITE_MODES)),
        ("liveness", liveness, _is_int(liveness, 1), "an int >= 1"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise _invalid(name, value, allowed)


#: What ``endpoint`` may be, as a refusal says it.
_ENDPOINT_FORMS = "'tcp://HOST:PORT' (PORT 1-65535), 'ipc://PATH', 'inproc://NAME'"
#: A host name's labels (the underscore too: container runtimes name hosts with one).
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]"
                        r"([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def _tcp_problem(rest: str) -> tuple[str, str | None]:
    """Why ``tcp://REST`` cannot be connected to, and a likely fix; ``("", None)``: it can."""
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        return "no HOST:PORT", None
    if port.endswith("/") and port.rstrip("/").isdigit():
        return "a trailing '/'", f"tcp://{host}:{port.rstrip('/')}"
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not a number from 1 to 65535", None
    if host == "*":  # bind's wildcard: a client connects to one host
        return "'*' is for binding, a client connects to a host", f"tcp://127.0.0.1:{port}"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1].partition("%")[0])
        except ValueError:
            return f"{host} is not an IPv6 address", None
        return "", None
    if ":" in host:  # an IPv6 address without its brackets
        return "an IPv6 address goes in brackets", f"tcp://[{host}]:{port}"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address", None
        return "", None
    if not _HOST_NAME.fullmatch(host) or len(host) > 253:
        return f"{host!r} is not a host name or address", None
    return "", None


def check_endpoint(endpoint: object, name: str = "endpoint") -> None:
    """Refuse an endpoint a DEALER cannot connect to, naming ``name``, the value, the forms
    allowed and, where it is clear, the endpoint meant.

    ZeroMQ refuses a malformed endpoint only when the transport thread connects, after
    attach has returned, and then again at every reconnection: the run would go on alone,
    its log full of tracebacks. Checked here, the mistake stops the script at its line.

    >>> check_endpoint("tcp://controller:5555"); check_endpoint("ipc:///run/trimtab.sock")
    >>> check_endpoint("127.0.0.1:5555")
    Traceback (most recent call last):
    ...
    ValueError: endpoint='127.0.0.1:5555' is not a ZeroMQ endpoint ... 'tcp://127.0.0.1:5555'?)
    """
    guess: str | None = None
    if isinstance(endpoint, int) and not isinstance(endpoint, bool):
        why = "a port alone"
        guess = f"tcp://127.0.0.1:{endpoint}" if 1 <= endpoint <= 65535 else None
    elif not isinstance(endpoint, str):
        why = f"a {type(endpoint).__name__}, not a string"
    elif "://" not in endpoint:
        why = "no scheme"
        if endpoint.isdigit():
            guess = f"tcp://127.0.0.1:{endpoint}"
        elif not _tcp_problem(endpoint)[0]:
            guess = f"tcp://{endpoint}"
    else:
        scheme, _, rest = endpoint.partition("://")
        if scheme == "tcp":
            why, guess = _tcp_problem(rest)
        elif scheme in ("ipc", "inproc"):
            why = "" if rest.strip() and "\0" not in rest else f"no {scheme} name"
        else:
            why = f"scheme {scheme!r} is not one a client connects with"
        if not why:
            return
    hint = f" (did you mean {guess!r}?)" if guess else ""
    raise ValueError(f"{name}={endpoint!r} is not a ZeroMQ endpoint ({why}); "
                     f"allowed: {_ENDPOINT_FORMS}{hint}")


def _check_checkpoint_options(
    checkpoint_every: int, keep: int, checkpoint_dir: object, scheduler: object,
    optimizer: torch.optim.Optimizer, on_rollback: object,
) -> None:
    # A scheduler may be built on a wrapper of this optimizer (accelerate's, Lightning's).
    owner = getattr(scheduler, "optimizer", optimizer)
    sched_ok = scheduler is None or (
        callable(getattr(scheduler, "state_dict", None))
        and callable(getattr(scheduler, "load_state_dict", None))
        and (owner is optimizer or getattr(owner, "optimizer", None) is optimizer)
    )
    checks = [
        ("checkpoint_every", checkpoint_every, _is_int(checkpoint_every, 0),
         "an int >= 0 (0: no checkpoints, no rollback)"),
        ("keep", keep, _is_int(keep, 1) and keep <= 255, "an int from 1 to 255"),
        ("checkpoint_dir", checkpoint_dir,
         checkpoint_dir is None or isinstance(checkpoint_dir, (str, os.PathLike)),
         "None or a directory path (str or os.PathLike)"),
        ("scheduler", scheduler, sched_ok,
         "None or an LR scheduler of this optimizer (state_dict/load_state_dict)"),
        ("on_rollback", on_rollback, on_rollback is None or callable(on_rollback),
         "None or a callable taking the restored step"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise _invalid(name, value, allowed)


#: Healthy reports a controller (by default, ``[rollback] stable_min_reports``) sees after a
#: checkpoint before it marks it stable: at the latest when the client's ring is about to
#: drop it.
STABLE_MIN_REPORTS = 5


def ring_too_short(checkpoint_every: int, keep: int, report_every: int) -> str | None:
    """Why no checkpoint of this ring can become stable on a default controller (None:
    one can): each is held ``keep x checkpoint_every`` steps, and the controller marks one
    only after ``STABLE_MIN_REPORTS`` healthy reports that end while the ring holds it.

    >>> ring_too_short(100, 3, 10) is None, ring_too_short(10, 3, 10) is None
    (True, False)
    """
    held = keep * checkpoint_every
    if checkpoint_every == 0 or held >= (STABLE_MIN_REPORTS + 1) * report_every:
        return None
    return (f"trimtab: a checkpoint is held for keep x checkpoint_every = {keep} x "
            f"{checkpoint_every} = {held} steps, fewer than the {STABLE_MIN_REPORTS + 1} reports "
            f"of report_every={report_every} a default controller needs to mark one stable: "
            f"only the checkpoint taken at attach can be a rollback target; raise keep or "
            f"checkpoint_every")


#: What each value of ``extra_state`` must be, as a refusal says it.
_EXTRA_OBJECT = "an object with callable state_dict() and load_state_dict(state_dict)"


def _refused(name: str, shown: str, allowed: str) -> ValueError:
    """The error refusing option ``name``, its value shown as ``shown`` (its repr, for
    :func:`_invalid`; see :func:`_shown`), and what is allowed."""
    return ValueError(f"{name}={shown} is invalid; allowed: {allowed}")


def _shown(value: object) -> str:
    """A value as a refusal names it: its repr when that is one short line, else its type
    (a module's or an optimizer's repr runs over many lines); a dict entry by entry."""
    if type(value) is dict and value:
        return "{" + ", ".join(f"{k!r}: {_shown(v)}" for k, v in value.items()) + "}"
    try:
        text = repr(value)
    except Exception:  # a refusal must not fail on the value it names
        text = "\n"
    return text if "\n" not in text and len(text) <= 100 else f"<{type(value).__name__}>"


def _check_extra_state(
    extra_state: object, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    wrapper: object, scheduler: object, checkpoint_dir: object,
) -> dict[str, Any]:
    """``attach``'s ``extra_state``: ``None`` or a dict of name -> an object with
    ``state_dict()`` and ``load_state_dict()``, each object once and none the guard restores
    already (the model, the optimizer, the scheduler); its ``state_dict()`` must return a
    dict and, with a ``checkpoint_dir``, one a checkpoint file can hold. The objects by name
    (``{}``: none)."""
    if extra_state is None:
        return {}
    if not isinstance(extra_state, dict):
        raise _refused("extra_state", _shown(extra_state),
                       f"None or a dict of name (str) -> {_EXTRA_OBJECT}")
    module = getattr(model, "module", None)  # a DDP wrapper's
    restored = {id(model): "the model", id(optimizer): "the optimizer",
                id(wrapper): "the optimizer"}
    if isinstance(module, torch.nn.Module):
        restored[id(module)] = "the model"
    if scheduler is not None:
        restored[id(scheduler)] = "the scheduler"
    given: dict[int, str] = {}
    for name, obj in extra_state.items():
        if not isinstance(name, str) or not name:
            raise _invalid("extra_state name", name, "a non-empty str")
        field, shown = f"extra_state[{name!r}]", _shown(obj)
        if not (callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))):
            raise _refused(field, shown, _EXTRA_OBJECT)
        if id(obj) in restored:
            raise _refused(field, shown, f"an object not given already (as "
                                         f"{restored[id(obj)]}: it is restored anyway)")
        if id(obj) in given:
            raise _refused(field, shown, f"an object not given already (as "
                                         f"extra_state[{given[id(obj)]!r}])")
        given[id(obj)] = name
        try:
            state = obj.state_dict()
        except Exception as exc:
            raise _refused(field, shown, f"an object whose state_dict() returns a dict (it "
                                         f"raised {type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict):
            raise _refused(field, shown, f"an object whose state_dict() returns a dict (it "
                                         f"returned a {type(state).__name__})")
        # Checked here: a file that does not load would cost its checkpoint at a rollback.
        problem = None if checkpoint_dir is None else unfileable(state)
        if problem is not None:
            raise _refused(field, shown, "with checkpoint_dir, an object whose state_dict() "
                                         "holds only containers, numbers, strings and tensors "
                                         f"(checkpoint files load with weights_only=True: "
                                         f"{problem})")
    return dict(extra_state)


def check_pairing(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The model is the one whose parameters the optimizer steps: refused when none of the
    optimizer's parameters is the model's (an examples trial swapped a GAN's pair,
    ``attach(netD, optimizerG)``: accepted, and a rollback reset the discriminator, which
    the other optimizer trains, while the generator it steered stayed as it was, the
    journal saying 'restored'); a WARNING when some are not (a rollback restores only the
    model's)."""
    owned = {id(p) for p in model.parameters()}
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    if not owned or not stepped:
        return
    outside = sum(id(p) not in owned for p in stepped)
    if outside == len(stepped):
        raise _refused("model", _shown(model), f"the module whose parameters the optimizer "
                       f"steps: none of its {len(stepped)} parameters is one of this "
                       "model's (two model-optimizer pairs swapped?)")
    if outside:
        log.warning("trimtab: %d of the optimizer's %d parameters are not the model's: a "
                    "rollback restores the model's only", outside, len(stepped))


def _check_switches(hooks: object, reseed_on_rollback: object,
                    loss_trend: object = True) -> None:
    if not isinstance(hooks, bool):
        raise _invalid("hooks", hooks, "True (the optimizer's step hooks) or False")
    if not isinstance(reseed_on_rollback, bool):
        raise _invalid("reseed_on_rollback", reseed_on_rollback, "True or False")
    if loss_trend is not None and not isinstance(loss_trend, bool):
        raise _invalid("loss_trend", loss_trend, "True (the loss falls as the run learns), "
                       "False (a policy-gradient loss, a GAN's) or None (True, unless "
                       "other guards share the process)")


def _check_validation(value: object, step: object, ema: object = None) -> None:
    """``report_validation``'s arguments: a Python number (never a tensor: reporting one
    must not read the device), ``None`` or a step, and ``None`` or the weight average's
    number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid("value", value, "a Python int or float (use tensor.item())")
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float))):
        raise _invalid("ema", ema, "None or a Python int or float: the weight average's "
                       "validation result (use tensor.item())")
    if step is not None and not _is_int(step, 0):
        raise _invalid("step", step, "None or an int >= 0")


def _resolve_mode(nonfinite: str, optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """How a non-finite step is skipped: "fused", "skip" (host check) or "zero"."""
    if nonfinite == "zero":
        return "zero"
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return "fused"  # exact and sync-free: the fused kernel reads found_inf on the device
    if nonfinite == "skip" or device.type == "cpu":
        return "skip"
    return "zero"


def _facts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int | None
) -> tuple[wire.ScaleFacts, torch.device]:
    group_sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    if first is None:
        first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    facts = wire.ScaleFacts(
        param_count=sum(group_sizes), group_sizes=group_sizes, world_size=world,
        optimizer=type(optimizer).__name__, dtype=dtype, device=str(device)[:32],
        batch_size=batch_size,
    )
    return facts, device
