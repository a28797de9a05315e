"""A person steers a job: ``trimtab set``, ``pause``, ``resume`` and ``rollback``.

An operator's request (:class:`~trimtab.protocol.wire.Operate`) reaches the controller on
the socket the jobs use and goes the policies' way from there: the job's governor judges
it, the command it makes is the job's next one (it is applied between steps and acked as
any other), and it is journaled (event ``manual``: who, why, what was asked and what came
of it), logged and counted (``trimtab_operator_actions_total``, an annotation on the
dashboards). A request that cannot be carried out changes nothing and is answered with why.

- ``set``: each value within the job's governor bounds (for the lr also its absolute cap),
  or the whole request is refused, naming the value and the range allowed. A person's
  value is not paced as a policy's is (no step ratio, slew, cooldown, deadband or
  hysteresis hold it back: it is what was asked, now), and it starts the knob's cooldown,
  so no policy moves the knob straight back. The lr and weight decay are asked as the
  values the optimizer is to use (or as multipliers, ``lr=x0.5``): the controller sets the
  multiplier on the user's own value at the job's last report, so a schedule of the
  user's own goes on moving the lr from there, as it would have. A live schedule on the
  knob stops (the value set holds). Unless the job is paused, the policies may move the
  knob again once its cooldown has passed.
- ``pause``: from now on the policies' proposals are journaled and not acted on, save the
  safety net's: rollbacks for a divergence or non-finite values, the governor's bounds,
  stable marks, and a measurement phase already under way, which runs to its return.
  Live schedules stop, each knob held at the value its schedule has now. ``resume`` ends
  the pause: the next report is decided as ever (schedules are sent again).
- ``rollback``: the client restores the checkpoint at the step asked (default: the newest
  stable one), which it must still hold, with the knobs in force there; planned (it
  counts against no rollback budget and starts no rollback cooldown). It ends a
  measurement phase under way.

A request that would send the job a command is refused while a rollback awaits its ack
(the run is going back, and a newer command would replace the rollback: ask again once it
has); a ``set`` is refused while a measurement phase owns the knobs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from trimtab.controller.decision import Decision, KnobDecision
from trimtab.controller.engine import Engine
from trimtab.controller.limits import MULTIPLIERS
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.rollback_rules import plan_rollback, why_no_rollback, with_pending_mark
from trimtab.controller.scale import ScaleContext
from trimtab.controller.state import JobState
from trimtab.controller.timeline import knob_text
from trimtab.protocol import wire

__all__ = ["MANUAL", "Outcome", "operate"]

#: The policy name a person's changes are recorded under (decisions, governor memory).
MANUAL = "manual"


@dataclass(frozen=True)
class Outcome:
    """What a request did: ``ok`` (else refused, nothing changed), ``detail`` (one line for
    the person), and the decision, command and command replaced, when one is sent."""

    ok: bool
    detail: str
    decision: Decision | None = None
    command: wire.Command | None = None
    superseded: wire.Command | None = None
    #: What the journal's ``manual`` event records beside who, why and the request.
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def _refused(why: str) -> Outcome:
    return Outcome(False, why)


def operate(state: JobState, msg: wire.Operate, engine: Engine,
            cfg: RollbackConfig) -> Outcome:
    """Carry out ``msg`` on ``state`` (see the module docstring); the command it returns is
    already the job's pending one, as :func:`~trimtab.controller.advance.commit` leaves it."""
    if msg.action == "pause":
        return _pause(state, msg, engine)
    if msg.action == "resume":
        if state.paused is None:
            return _refused("not paused")
        was = state.paused
        state.paused = None
        _count(state, "resume")
        return Outcome(True, f"resumed at step {state.step}: the policies act again from the "
                             f"next report (paused by {was['who']} at step {was['step']})",
                       record={"paused": was})
    if msg.action == "rollback":
        return _rollback(state, msg, engine, cfg)
    return _set(state, msg, engine)


def _going_back(state: JobState) -> str | None:
    """Why no command can be sent now: a rollback command awaits its ack (a newer command
    would replace it); None: one can."""
    pending = state.rollback.pending
    if pending is None:
        return None
    return (f"the rollback to step {pending.to_step} (command {state.command_seq}) is not "
            "acknowledged yet; ask again once the run has gone back")


def _count(state: JobState, action: str) -> None:
    state.operator_actions[action] = state.operator_actions.get(action, 0) + 1


def _why(msg: wire.Operate) -> str:
    return f"{msg.action} by {msg.who}: {msg.reason}"[:1024]


def _asked(state: JobState, msg: wire.Operate) -> tuple[dict[str, float], str | None]:
    """The controlled values asked (multipliers for lr and weight decay), or why not."""
    out = {}
    for knob in wire.KNOBS:
        value = getattr(msg.knobs, knob)
        mult = getattr(msg.scale, knob) if knob in MULTIPLIERS else None
        if knob in MULTIPLIERS and value is not None:
            base = getattr(state.base, knob)
            if not base:
                return {}, (f"{knob}={value:g}: the loop's own {knob} is {base}, and trimtab "
                            f"sets {knob} as a multiplier on it; nothing to multiply")
            mult = value / base
        target = mult if knob in MULTIPLIERS else value
        if target is None:
            continue
        if knob != "clip" and getattr(state.knobs, knob) is None:
            return {}, f"{knob}: the job's optimizer has no {knob} in force"
        out[knob] = target
    return out, None


def _out_of_bounds(state: JobState, engine: Engine, knob: str, target: float) -> str | None:
    """Why ``target`` (controlled units) is not allowed for ``knob``; None: it is."""
    gov = engine.governor
    lim = gov.limits(knob)  # type: ignore[arg-type]
    lo, hi = gov.bounds(knob, getattr(state.initial, knob))  # type: ignore[arg-type]
    scaled = gov.grad_norm_range(knob, state.grad_norm_scale())  # type: ignore[arg-type]
    if scaled is not None:
        lo, hi = max(lo, scaled[0]), min(hi, scaled[1])
    base = getattr(state.base, knob) if knob in MULTIPLIERS else None

    def text(x: float) -> str:
        if base is None or not math.isfinite(x):
            return f"{x:.6g}"
        return f"{x * base:.6g} ({knob_text(knob, x)})"

    if not math.isfinite(target) or target < 0 or (target == 0 and not lim.allow_zero):
        return f"{knob}={text(target)}: not allowed (zero only where allow_zero is set)"
    if not lo <= target <= hi:
        where = (f" of the loop's own {knob} {base:.6g} at step {state.step}"
                 if base is not None else "")
        source = (f"{state.facts.optimizer} reads its lr only at its first step: its lr is not "
                  "steered" if knob == "lr" and ScaleContext.from_facts(state.facts).reads_lr_once
                  else f"[governor.{knob}] in the controller's config")
        return (f"{knob}={text(target)} is out of the job's bounds [{text(lo)}, {text(hi)}]"
                f"{where} ({source})")
    if knob == "lr" and lim.max is not None and base is not None and target > 1.0:
        if target * base > lim.max * (1 + 1e-9):
            return (f"lr={target * base:.6g} is above the lr cap {lim.max:.6g} "
                    f"(governor.lr.max), which the client would hold it to")
    return None


def _set(state: JobState, msg: wire.Operate, engine: Engine) -> Outcome:
    if _going_back(state):
        return _refused(_going_back(state))  # type: ignore[arg-type]
    if state.phase is not None:
        return _refused(f"{state.phase.policy}'s measurement phase (since step "
                        f"{state.phase.start_step}) owns the knobs until it returns to "
                        f"checkpoint {state.phase.checkpoint}; ask again after it, or end it "
                        f"with `trimtab rollback {state.job} --to {state.phase.checkpoint}`")
    asked, why = _asked(state, msg)
    if why is not None:
        return _refused(why)
    for knob, target in asked.items():
        why = _out_of_bounds(state, engine, knob, target)
        if why is not None:
            return _refused(why)
    reason = _why(msg)
    knobs = {}
    for knob, target in asked.items():
        knobs[knob] = KnobDecision(knob, state.current(knob), target, target, MANUAL, reason)
    stopped = [k for k in asked if k in state.live]
    live = {k: s for k, s in state.live.items() if k not in asked}
    decision = Decision(step=state.step, proposals=(), knobs=knobs,
                        schedules=tuple(live.values()) if stopped else None)
    changed = decision.commands
    if not changed and not stopped:
        return Outcome(True, f"already in force at step {state.step}: nothing sent",
                       record={"asked": asked})
    for knob, value in changed.items():
        window = engine.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
        state.note_change(knob, MANUAL, knobs[knob].current, value, window)
    state.live = live
    superseded = state.pending_command
    command = _command(state, engine, superseded, scale={k: v for k, v in asked.items()
                                                         if k in MULTIPLIERS},
                       absolute={k: v for k, v in asked.items() if k not in MULTIPLIERS},
                       reasons=decision.reasons() or [reason], schedules=decision.schedules)
    _count(state, "set")
    said = ", ".join(_describe(state, k, v) for k, v in asked.items())
    if stopped:
        said += f"; the live schedule on {', '.join(stopped)} stopped"
    return Outcome(True, f"command {command.seq} sent: {said}; in force from the job's next "
                         "step (its ack is journaled)", decision, command, superseded,
                   record={"asked": asked, "stopped_schedules": stopped})


def _describe(state: JobState, knob: str, value: float) -> str:
    if knob in MULTIPLIERS:
        base = getattr(state.base, knob)
        return f"{knob} {knob_text(knob, value)} (= {value * base:.6g} at the loop's {base:.6g})"
    return f"{knob} {knob_text(knob, value)}"


def _command(state: JobState, engine: Engine, pending: wire.Command | None, *,
             scale: dict[str, float], absolute: dict[str, float], reasons: list[str],
             schedules: tuple[wire.LiveSchedule, ...] | None = None,
             rollback_to: int | None = None, mark: int | None = None) -> wire.Command:
    """The job's next command, made its pending one. The client keeps only its newest
    command, so an ordinary one still pending is carried in it (its changes, its mark, its
    schedules where this one sets none); a rollback replaces it (``mark``: the checkpoint
    it marks stable, its own target whose mark is still unacknowledged)."""
    advice = None
    if pending is not None and rollback_to is None:
        scale = {**pending.scale.set(), **scale}
        absolute = {**pending.knobs.set(), **absolute}
        mark, advice = pending.mark_stable, pending.stop_advice
        reasons = [*pending.reasons, *reasons]
        if schedules is None and pending.schedules is not None:
            schedules = tuple(pending.schedules)
    command = wire.Command(
        job=state.job, seq=state.next_command_seq(), knobs=wire.Knobs(**absolute),
        scale=wire.ScaleTargets(**scale), lr_max=engine.governor.limits("lr").max,
        reasons=reasons[-64:], mark_stable=mark, rollback_to=rollback_to, stop_advice=advice,
        schedules=None if schedules is None else list(schedules))
    state.pending_command = command
    state.pending_since = state.reports_seen
    return command


def _pause(state: JobState, msg: wire.Operate, engine: Engine) -> Outcome:
    if state.paused is not None:
        p = state.paused
        return _refused(f"already paused by {p['who']} at step {p['step']}: {p['reason']}")
    if state.live and _going_back(state):
        return _refused(_going_back(state))  # type: ignore[arg-type]
    state.paused = {"who": msg.who, "reason": msg.reason, "step": state.step,
                    "ts": time.time()}
    _count(state, "pause")
    said = (f"paused at step {state.step}: the policies' proposals are journaled, not acted "
            "on; the safety net stays on (rollbacks, bounds, stable marks)")
    if state.phase is not None:
        said += f"; {state.phase.policy}'s measurement phase runs to its return"
        return Outcome(True, said, record={"phase": state.phase.policy})
    if not state.live:
        return Outcome(True, said)
    # Hold each scheduled knob at its schedule's value now: the schedules stop.
    held = {k: s.value(state.step) for k, s in state.live.items()}
    knobs = {k: KnobDecision(k, state.current(k), v, v, MANUAL, _why(msg))
             for k, v in held.items()}
    decision = Decision(step=state.step, proposals=(), knobs=knobs, schedules=())
    for knob, value in held.items():
        window = engine.governor.limits(knob).slew_window_steps  # type: ignore[arg-type]
        state.note_change(knob, MANUAL, knobs[knob].current, value, window)
    state.live = {}
    superseded = state.pending_command
    command = _command(state, engine, superseded,
                       scale={k: v for k, v in held.items() if k in MULTIPLIERS},
                       absolute={k: v for k, v in held.items() if k not in MULTIPLIERS},
                       reasons=[f"{_why(msg)}: live schedules stopped, held at "
                                + ", ".join(f"{k} {knob_text(k, v)}" for k, v in held.items())],
                       schedules=())
    said += ("; live schedules stopped, held at "
             + ", ".join(f"{k} {knob_text(k, v)}" for k, v in held.items())
             + f" (command {command.seq})")
    return Outcome(True, said, decision, command, superseded, record={"held": held})


def _rollback(state: JobState, msg: wire.Operate, engine: Engine,
              cfg: RollbackConfig) -> Outcome:
    rb = state.rollback
    target = msg.to_step
    if target is None:
        # A mark sent and not acknowledged yet counts, as for the guard's own rollbacks: the
        # client may have applied it (and let the older stable checkpoint go), and the
        # command carries the mark again, which holds either way.
        marked = with_pending_mark(rb)
        usable = [s for s in marked.stable if s in rb.checkpoints and s <= state.step]
        if not usable:
            held = ", ".join(map(str, rb.checkpoints)) or "none"
            return _refused(f"no stable checkpoint to roll back to (the client lists: {held});"
                            " name one with --to STEP")
        target = max(usable)
    no = why_no_rollback(rb, cfg, MANUAL, to_step=target)
    if no is not None:
        return _refused(no[1])
    plan = plan_rollback(MANUAL, _why(msg), rb, cfg, to_step=target,
                         in_force=state.knobs.model_dump())
    assert plan is not None  # why_no_rollback said yes
    plan = dataclasses.replace(plan, policy=MANUAL)
    phase = state.end_phase(None, target) if state.phase is not None else None
    state.rewind_controls(target)
    rb.note_ordered(plan, seq=state.command_seq + 1)  # the command made below
    stopped = sorted(state.live)
    state.live = {}
    decision = Decision(step=state.step, proposals=(), knobs={}, rollback=plan,
                        schedules=() if stopped else None)
    superseded = state.pending_command
    command = _command(state, engine, superseded, scale={}, absolute={},
                       reasons=[plan.describe()], rollback_to=target,
                       schedules=() if stopped else None,
                       mark=target if target == rb.pending_mark else None)
    _count(state, "rollback")
    said = (f"command {command.seq} sent: roll back from step {state.step} to checkpoint "
            f"{target}, with the knobs in force there")
    if phase is not None:
        said += f"; {phase.policy}'s measurement phase ended"
    if stopped:
        said += f"; live schedules on {', '.join(stopped)} stopped until the next decision"
    return Outcome(True, said, decision, command, superseded,
                   record={"to_step": target, "phase_ended": None if phase is None
                           else phase.policy})
