"""trimtab's state in the user's own checkpoint: what a guard needs to resume exactly.

A long run is preempted and resumed from the user's checkpoint in a new process. The
model, optimizer and scheduler come back through their own ``state_dict``; trimtab's
part -- the multipliers, momentum, clip and live schedules in force, the step counters,
the last command applied, the run's identity on the controller -- comes back through
``guard.state_dict()`` / ``guard.load_state_dict(sd)``, in torch's convention::

    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "trimtab": guard.state_dict()}, path)
    ...  # a new process
    guard = attach(model, opt, job="gpt", scheduler=sched, ...)
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"]); guard.load_state_dict(ckpt["trimtab"])

The state is plain Python (numbers, strings, lists, dicts) -- but for ``"ema"``, the
weight average's tensors with ``attach(..., ema=)`` (``None`` without): it goes in a
``torch.save`` file; without an average, in a JSON file too. Loading it

- continues the same run on the controller (its ``run_id``), which registers again as a
  *resume* (``Register.resume``, counted, and ``Register.resume_id``, made anew by each
  process that loads a state, so that two processes resumed from the same save are two
  resumes): the controller sets aside what it saw after
  the resumed step, drops stable marks this process does not hold and re-bases its
  commands (see :meth:`~trimtab.controller.state.JobState.on_resumed`);
- puts back the values in force, so the first step after the resume runs with the same
  effective lr, momentum, weight decay and clip as the first step after the save would
  have, and the live schedules continue at the resumed step;
- puts back the weight average (``ema=``) as it was at the save (a state saved without one
  starts it again from the resumed weights, with a warning);
- continues the step counters (``global_step``, skipped steps, the report numbers) and
  the command sequence: a command the saving process applied is never applied again;
- replaces the snapshot taken at attach (it holds the state before the user's own was
  loaded) by one of the resumed state, the new rollback target of last resort (the
  controller marks it stable with the first report after the resume);
- with ``checkpoint_dir``, takes over the run's files that its earlier processes left
  there: those up to the resumed step are kept to the same bound as this process's own
  (``keep`` newest plus the newest stable; a stable file at the resumed step is kept as it
  is, so that a process killed again before its first report resumes from it again), and
  those after it, the trajectory left behind, are deleted, as a rollback's are.

Call it after loading the model's, optimizer's and scheduler's state and before the first
step (later, it raises: the steps already taken would be counted twice).
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

import torch

from trimtab.protocol import wire

from ._options import _invalid, _is_int

if TYPE_CHECKING:
    from ._guard_state import GuardState as Guard  # the guard's parts; _guard imports this

__all__ = ["FORMAT", "state_of", "run_state", "load_state"]

log = logging.getLogger("trimtab.client")

#: The layout of :func:`state_of`'s dict (``"format"``); a newer one is refused.
FORMAT = 1

_KEYS = ("format", "job", "run_id", "resume", "step", "calls", "report_seq", "applied_seq",
         "should_stop", "stop_reason", "rollbacks", "controls", "live")
_CONTROLS = ("lr_scale", "wd_scale", "lr_max", "momentum", "clip")


def state_of(guard: Guard) -> dict[str, Any]:
    """The guard's state to resume from (see the module docstring); reads the device once
    on the sync-free paths mid-window (the exact count of skipped steps)."""
    if guard._act._saved is not None:
        raise RuntimeError("guard.state_dict() during an optimizer step; call it between steps")
    step = guard.global_step
    act = guard._act
    return {
        "format": FORMAT,
        "job": guard.job,
        "run_id": guard.run_id,
        "resume": guard._resumes,
        "step": step,
        "calls": guard._step.calls,
        "report_seq": guard._reporter.seq,
        "applied_seq": guard._commands.applied_seq,
        "should_stop": guard._commands.should_stop,
        "stop_reason": guard._commands.stop_reason,
        "rollbacks": guard._ckpts.rollbacks,
        "controls": act.state_dict(),
        "live": {"schedules": [s.model_dump(mode="json") for s in act.live.schedules],
                 "last": dict(act.live.last)},
        # The weight average's tensors (attach(..., ema=)), copied: the only entry that is
        # not a plain value (None: no average).
        "ema": None if guard._ema is None else {
            k: v.detach().clone() for k, v in guard._ema.state_dict().items()},
    }


def run_state(guard: Guard) -> dict[str, Any]:
    """:func:`state_of` without the step, the step count, the values in force
    (``controls``) and the weight average, which a snapshot holds itself: what each of
    trimtab's own snapshots carries so that a new process can resume from its file as the
    same run (``Checkpoint.guard_state``). Host values only, read when the snapshot is
    taken (or, for one taken at a window's end before the window's read, when its step is
    settled)."""
    act = guard._act
    commands = getattr(guard, "_commands", None)  # none yet at the snapshot taken at attach
    return {
        "format": FORMAT, "job": guard.job, "run_id": guard.run_id, "resume": guard._resumes,
        "report_seq": guard._reporter.seq,
        "applied_seq": 0 if commands is None else commands.applied_seq,
        "should_stop": False if commands is None else commands.should_stop,
        "stop_reason": None if commands is None else commands.stop_reason,
        "rollbacks": guard._ckpts.rollbacks,
        "live": {"schedules": [s.model_dump(mode="json") for s in act.live.schedules],
                 "last": dict(act.live.last)},
        # Whether the loop steps its scheduler right after this step: a snapshot is taken
        # before that call, which a resume from its file makes for the loop.
        "scheduler_follows": guard._sched_pattern.follows(guard._step.calls),
    }


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return _invalid(f"guard.load_state_dict: {key}", value, allowed)


def _count(sd: dict[str, Any], key: str) -> int:
    v = sd[key]
    if not _is_int(v, 0):
        raise _bad(key, v, "an int >= 0")
    return v


def _number(value: Any, key: str, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, value, "a finite number" + (" or None" if optional else ""))
    return float(value)


def check(sd: Any, job: str) -> dict[str, Any]:
    """The checked state (a refused one raises ``ValueError`` naming the key, the value and
    what is allowed); nothing on the guard changes before this passes."""
    if not isinstance(sd, dict):
        raise TypeError(f"guard.load_state_dict expects the dict guard.state_dict() gave, "
                        f"got {type(sd).__name__}")
    missing = [k for k in _KEYS if k not in sd]
    if missing:
        raise ValueError(f"guard.load_state_dict: missing keys {missing}; is this "
                         "guard.state_dict()'s dict?")
    if sd["format"] != FORMAT:
        raise _bad("format", sd["format"], f"{FORMAT} (saved by a newer trimtab?)")
    if sd["job"] != job:
        raise _bad("job", sd["job"], f"this guard's job {job!r} (attach with the job saved)")
    if not isinstance(sd["run_id"], str) or not 1 <= len(sd["run_id"]) <= 64:
        raise _bad("run_id", sd["run_id"], "a string of 1 to 64 characters")
    for key in ("resume", "step", "calls", "report_seq", "applied_seq", "rollbacks"):
        _count(sd, key)
    if sd["calls"] < sd["step"]:
        raise _bad("calls", sd["calls"], f">= step={sd['step']} (calls count skipped steps too)")
    controls = sd["controls"]
    if not isinstance(controls, dict) or set(controls) != set(_CONTROLS):
        raise _bad("controls", controls, f"a dict with the keys {list(_CONTROLS)}")
    out = {k: _number(controls[k], f"controls.{k}", optional=k not in ("lr_scale", "wd_scale"))
           for k in _CONTROLS}
    if out["lr_scale"] < 0 or out["wd_scale"] < 0:  # type: ignore[operator]
        raise _bad("controls", controls, "multipliers >= 0")
    live = sd["live"]
    if not isinstance(live, dict) or not isinstance(live.get("schedules"), list):
        raise _bad("live", live, "{'schedules': [...], 'last': {...}}")
    try:
        schedules = [wire.LiveSchedule.model_validate(s) for s in live["schedules"]]
    except Exception as exc:
        raise _bad("live.schedules", live["schedules"], f"live schedules ({exc})") from None
    last = live.get("last") or {}
    if not isinstance(last, dict):
        raise _bad("live.last", last, "a dict of knob -> value")
    return {**sd, "controls": out, "live": (schedules, {str(k): float(v) for k, v in
                                                        last.items()})}


def _catch_up_schedule(guard: Guard, sd: dict[str, Any]) -> None:
    """A snapshot's state (``Checkpoint.guard_state``) holds the scheduler as it was inside
    ``guard.step()`` of its step, before the loop's own ``scheduler.step()`` of that step
    (a rollback restores it there, and the loop's call follows). Resumed before the next
    step, that call must be made for the loop, when the loop made it after that step: one
    step behind otherwise, one more per resume. A saved ``guard.state_dict()`` says
    neither: the loop saved its scheduler where it chose."""
    sched = guard._ckpts.scheduler
    if (sd.get("scheduler_stepped") is not False or sd.get("scheduler_follows") is not True
            or sched is None
            or isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return
    sched.step()
    log.info("trimtab: the scheduler was stepped once at the resume, as the loop did after "
             "step %d", sd["step"])


def load_state(guard: Guard, sd: Any) -> None:
    """Put ``sd`` (:func:`state_of`'s) back into a guard that has taken no step yet; see
    the module docstring for what that means for the run and its controller."""
    if guard._closed:
        raise RuntimeError("guard.load_state_dict() after close()")
    if guard._step.calls or guard._resumed_here:
        raise RuntimeError("guard.load_state_dict() after the guard has stepped (or loaded a "
                           "state already); call it once, after attach and before the first step")
    sd = check(sd, guard.job)
    act, step = guard._act, sd["step"]
    act.load_state_dict(sd["controls"])  # drops the live schedules' last values
    schedules, last = sd["live"]
    act.live.replace(schedules)
    act.live.last = last
    guard._step.restart(sd["calls"], step)
    guard._reporter.seq = sd["report_seq"]
    guard._reporter.restart()
    commands = guard._commands
    commands.applied_seq = sd["applied_seq"]
    commands.should_stop, commands.stop_reason = bool(sd["should_stop"]), sd["stop_reason"]
    commands.note_in_force()
    guard._ckpts.rollbacks = sd["rollbacks"]
    _catch_up_schedule(guard, sd)
    ema = sd.get("ema")
    if guard._ema is not None:
        if ema is not None:
            guard._ema.load_state_dict(ema)
        else:  # saved without an average (or by a trainer that cannot hold tensors)
            guard._ema.restart()
            log.warning("trimtab: the saved state has no weight average; it starts again "
                        "from the resumed weights")
    guard.run_id = sd["run_id"]
    guard._resumes = sd["resume"] + 1
    guard._resumed_here = True
    guard._resume_step = step
    # This process's resume: a second process resumed from the same save counts the same
    # resumes, and this id tells the controller that it is another resume all the same.
    guard._resume_id = uuid.uuid4().hex
    # The attach snapshot predates the state just loaded; the run's files are this
    # process's from now on (kept to the same bound; a stable one at ``step`` stays so).
    guard._ckpts.replace_all(guard.run_id)
    guard._handed = guard._fingerprint()  # handed over as loaded: nothing to take again
    guard._note_listing()
    # Registered again, on the same link: as this run, resumed at ``step``.
    guard._transport.reregister()
    log.info("trimtab resumed job %s (run %s) at step %d (resume %d)", guard.job,
             guard.run_id, step, guard._resumes)
