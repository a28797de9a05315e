"""attach()'s options checked, and the facts a job registers with: what the guard knows
before its first step.

A refused option names the option, the value given and what is allowed.
"""

from __future__ import annotations

import os

import torch

from trimtab.protocol import wire

__all__ = ["NONFINITE_MODES"]

#: Allowed values of ``nonfinite``.
NONFINITE_MODES: tuple[str, ...] = ("auto", "skip", "zero")


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


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


def _check_switches(hooks: object, reseed_on_rollback: object) -> None:
    if not isinstance(hooks, bool):
        raise _invalid("hooks", hooks, "True (the optimizer's step hooks) or False")
    if not isinstance(reseed_on_rollback, bool):
        raise _invalid("reseed_on_rollback", reseed_on_rollback, "True or False")


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
