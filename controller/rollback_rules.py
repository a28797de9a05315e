"""Rollback rules: which checkpoint to mark stable, whether and where to roll back, and how
hard to cut. Pure functions over a job's :class:`~trimtab.controller.rollback.RollbackState`
(the rules themselves are told in :mod:`~trimtab.controller.rollback`'s docstring).

>>> from trimtab.controller.rollback import RollbackConfig, RollbackState
>>> cfg = RollbackConfig()
>>> st = RollbackState()
>>> st.note_marked(400)
>>> st.checkpoints = [400]
>>> st.step = 650
>>> plan = plan_rollback("nonfinite", "non-finite loss", st, cfg)
>>> (plan.target_step, plan.level, plan.cut)
(400, 1, 0.5)
"""

from __future__ import annotations

import dataclasses

from trimtab.controller.health import DAMAGE, UNCUT
from trimtab.controller.rollback import (
    RollbackConfig,
    RollbackPlan,
    RollbackRecord,
    RollbackState,
)
from trimtab.protocol.ring import evicted_next

__all__ = ["URGENT", "stable_to_mark", "why_no_rollback", "plan_rollback", "with_pending_mark"]

#: The causes a rollback is urgent for: damage an LR cut cannot repair. Ordered inside the
#: cooldown after a rollback (a spike only while that leaves the budget's last rollback
#: unspent), and, while no stable checkpoint has a full window behind it, sent to the young
#: checkpoint before the fault if it is newer (:func:`_young`). Any other cause (a climb, a
#: plugin's) waits the cooldown out.
URGENT: tuple[str, ...] = (*DAMAGE, "loss_spike", "grad_spike")


def stable_to_mark(state: RollbackState, cfg: RollbackConfig,
                   keep: int | None = None) -> int | None:
    """The newest candidate healthy for a full window after it, to be marked stable now
    (of its ``stable_min_reports`` healthy reports, none of the health warm-up's: a report
    not judged for spikes is no evidence).

    With the client's ``keep`` (as it registered), also one its next snapshot drops from
    the ring before that window ends, once ``stable_min_reports`` healthy reports followed
    it: a ring that spans fewer steps than the window (a checkpoint every 50 steps, 3 kept)
    would otherwise drop every checkpoint before it could be marked, and leave the run
    nothing to go back to but the one taken at attach."""
    if state.pending_mark is not None or state.pending is not None:
        return None
    newest = state.stable_step
    doomed = set() if keep is None else evicted_next(state.checkpoints, newest, keep)
    ready = [
        c for c in state.candidates
        if (newest is None or c > newest) and c in state.checkpoints
        and state.judged_after(c) >= cfg.stable_min_reports
        and (state.step - c >= cfg.stable_window_steps or c in doomed)
    ]
    return max(ready, default=None)


def _target(state: RollbackState, cfg: RollbackConfig,
            cause: str | None = None) -> int | None:
    """The newest stable checkpoint the client still lists, at or before the current step;
    for non-finite values with none stable, the oldest one it lists (the one taken at
    attach while it is held): a run whose every step is skipped must not be stranded. Not,
    for a climb, the last resort marked stable (:attr:`RollbackState.resort_marked`): a
    climb is slow, and the run as it was handed over holds nothing it has trained since;
    with no other, the climb's rollback becomes an LR cut in place. For a spike or
    non-finite values while no stable one has a full window behind it, :func:`_young`."""
    ok = _stable_held(state)
    if cause == "climb":
        ok = [s for s in ok if s not in state.resort_marked]
    else:
        young = _young(state, cfg, cause)
        if young is not None:
            return young
    if not ok and cause in DAMAGE:
        listed = [s for s in state.checkpoints if s <= state.step and s not in state.unusable]
        return min(listed, default=None)
    resumed = state.clean_resume
    if (not ok and cause in URGENT and resumed is not None and resumed in state.checkpoints
            and resumed <= state.step and resumed not in state.unusable):
        # A resume from a save made in a healthy stretch, and nothing marked stable yet: a
        # spike soon after it came after the save (the loop replays a bad batch), and goes
        # back there; the rollback's command marks it. (A save inside a burst is not one:
        # its last resort waits for a report that is not a spike, see the engine.)
        return resumed
    return max(ok, default=None)


def _stable_held(state: RollbackState) -> list[int]:
    """The stable checkpoints the client still lists, at or before the current step."""
    return [s for s in state.stable if s in state.checkpoints and s <= state.step]


def _young(state: RollbackState, cfg: RollbackConfig, cause: str | None) -> int | None:
    """For a spike or non-finite values (:data:`URGENT`) while no stable checkpoint has a
    full healthy window after it (each is the last resort, marked at the first report, or
    was marked short of ``stable_window_steps``: :attr:`RollbackState.short_marked`, e.g.
    by a ring that would have dropped it): the newest checkpoint that had
    ``stable_min_reports`` healthy reports after it when the latest fault was judged
    (:attr:`RollbackState.before_verdict`), newer than the newest stable one, still listed
    and restorable; None if none, or if a rollback near it was already ordered (a second
    fault there goes back to the newest stable one). Such a checkpoint has the evidence a
    short mark has, and the fault came after it: a fault early in a run goes back there
    rather than to the run as it was handed over, or to the older checkpoint a short ring
    marked. The rollback's command marks it stable."""
    ok = _stable_held(state)
    if cause not in URGENT or not ok or not set(ok) <= {*state.resort_marked,
                                                         *state.short_marked}:
        return None
    floor = max(ok)
    young = [s for s, n in state.before_verdict.items()
             if n >= cfg.stable_min_reports and s > floor and s in state.checkpoints
             and s <= state.step and s not in state.unusable and s not in state.stable]
    target = max(young, default=None)
    if target is None or _near(state, cfg, target):
        return None
    return target


def _near(state: RollbackState, cfg: RollbackConfig, target: int) -> list[RollbackRecord]:
    # Planned rollbacks (level 0) end a measurement phase: they do not escalate.
    return [r for r in state.history
            if r.level > 0 and abs(r.to_step - target) <= cfg.near_steps]


def _level(state: RollbackState, cfg: RollbackConfig, target: int) -> int:
    return 1 + len(_near(state, cfg, target))


def why_no_rollback(
    state: RollbackState, cfg: RollbackConfig, cause: str | None = None,
    to_step: int | None = None,
) -> tuple[str, str] | None:
    """``(code, why)`` when no rollback for ``cause`` can be ordered now, else None.

    Codes: ``alert``, ``pending``, ``cooldown``, ``no_stable``, and ``budget`` (the one the
    engine turns into an alert); for a planned rollback (``to_step``): ``pending`` and
    ``no_checkpoint``.
    """
    if to_step is not None:
        if state.pending is not None:
            return "pending", (f"the rollback to step {state.pending.to_step} is not "
                               f"acknowledged yet")
        if (to_step not in state.checkpoints or to_step in state.unusable
                or to_step > state.step):
            held = ", ".join(map(str, state.checkpoints)) or "none"
            return "no_checkpoint", (f"no restorable checkpoint at step {to_step} "
                                     f"(listed: {held})")
        return None
    # A stranded run (every step skipped) changes no more whatever is waited for or cut:
    # past the alert and the budget, it is rolled back still, up to stranded_budget more.
    stranded = cause == "nonfinite" and state.stranded(cfg)
    if state.alert is not None and not stranded:
        return "alert", f"job in rollback alert: {state.alert}"
    if state.pending is not None:
        return "pending", f"the rollback to step {state.pending.to_step} is not acknowledged yet"
    target = _target(state, cfg, cause)
    if target is None:
        if cause == "climb" and _stable_held(state):
            # Stable, but only the run as it was handed over: a climb does not go back there.
            return "no_stable", ("no stable checkpoint but the one taken at attach, which a "
                                 "climb does not go back to (an LR cut in place answers it)")
        return "no_stable", "no stable checkpoint to roll back to"
    # Before the cooldown: a fault that recurs inside it, with the budget spent, is the
    # clearest case for the alert; waiting out the cooldown would only hide it.
    budget = cfg.budget + (cfg.stranded_budget if stranded else 0)
    if _level(state, cfg, target) > budget:
        near = _near(state, cfg, target)
        steps = ", ".join(f"{r.from_step}->{r.to_step} ({r.cause})" for r in near)
        if stranded and state.alert is not None and state.alert.startswith("stranded:"):
            return "alert", f"job in rollback alert: {state.alert}"  # said once
        if stranded:
            return "budget", (f"stranded: every step of the last {state.skipped_reports} "
                              f"reports skipped, and {len(near)} rollbacks within "
                              f"{cfg.near_steps} steps of step {target} did not cure it "
                              f"(budget {cfg.budget} + {cfg.stranded_budget} for a stranded "
                              f"run): {steps}")
        return "budget", (f"rollback budget exhausted: {len(near)} rollbacks within "
                          f"{cfg.near_steps} steps of step {target} (budget {cfg.budget}): "
                          f"{steps}")
    cooling = state.cooldown_until is not None and state.step < state.cooldown_until
    # Inside the cooldown: non-finite values and parted replicas are rolled back; a spike
    # too, unless that would spend the budget's last rollback (a burst of bad data longer
    # than the reports after a restore would use it all up at once, and leave nothing for
    # after it); any other cause (a climb) waits it out.
    last = _level(state, cfg, target) >= cfg.budget
    if cooling and (cause not in URGENT or (cause not in DAMAGE and last)):
        return "cooldown", f"cooling down after a rollback until step {state.cooldown_until}"
    return None


def plan_rollback(
    cause: str, reason: str, state: RollbackState, cfg: RollbackConfig,
    to_step: int | None = None, lr: float | None = None,
    in_force: dict[str, float | None] | None = None,
) -> RollbackPlan | None:
    """The rollback to order for ``cause``, or None when :func:`why_no_rollback` says no;
    with ``to_step``, the planned rollback to that checkpoint, setting the lr multiplier
    ``lr`` (see the module docstring). ``in_force``: the controlled values in force now.

    >>> st = RollbackState(step=200, checkpoints=[0, 100])
    >>> plan = plan_rollback("lr_range_test", "sweep done", st, RollbackConfig(), 0, 0.03)
    >>> (plan.target_step, plan.level, plan.targets, plan.cooldown_steps)
    (0, 0, {'lr': 0.03}, 0)
    """
    in_force = dict(in_force or {})
    if why_no_rollback(state, cfg, cause, to_step) is not None:
        return None
    if to_step is not None:
        seen = state.at_checkpoint.get(to_step, {})
        return RollbackPlan(
            target_step=to_step, from_step=state.step, cause=cause, reason=reason, level=0,
            cut=1.0, cooldown_steps=0, restored=dict(seen.get("knobs", {})),
            targets={} if lr is None else {"lr": lr}, in_force=in_force,
        )
    target = _target(state, cfg, cause)
    assert target is not None  # why_no_rollback checked it
    if target not in state.stable and target == _young(state, cfg, cause):
        reason = (f"{reason} (to checkpoint {target}, {state.before_verdict[target]} healthy "
                  f"reports after it, marked stable with this rollback: no stable checkpoint "
                  f"had a full healthy window behind it yet)")[:1024]
    level = _level(state, cfg, target)
    if level > cfg.budget:
        reason = (f"{reason} (stranded: every step of the last {state.skipped_reports} "
                  f"reports skipped; rolled back past the budget of {cfg.budget})")[:1024]
    seen = state.at_checkpoint.get(target, {})
    restored: dict[str, float | None] = dict(seen.get("knobs", {}))
    uncut = cause in UNCUT
    cut = 1.0 if uncut else cfg.cut(level)
    targets: dict[str, float] = {}
    now = {**restored, **{k: v for k, v in in_force.items() if v is not None}}
    lr = now.get("lr")
    if lr is not None and not uncut:
        first = next((r.fault_lr for r in _near(state, cfg, target)
                      if r.fault_lr is not None), lr)
        targets["lr"] = min(first * cut, lr * cfg.base_cut)
        if restored.get("lr") is not None:
            # Never above what the checkpoint ran at: a run that diverged after a raise
            # (a policy's, a person's) goes back to the value it was healthy at, not to half
            # the one it diverged at, which it never ran from there.
            targets["lr"] = min(targets["lr"], restored["lr"])
    if cfg.clip_tighten is not None and not uncut:
        clip, ema = now.get("clip"), seen.get("grad_norm_ema")
        if clip is not None:
            targets["clip"] = clip * cfg.clip_tighten ** level
        elif ema:
            targets["clip"] = cfg.clip_from_grad_norm * ema * cfg.clip_tighten ** (level - 1)
    return RollbackPlan(
        target_step=target, from_step=state.step, cause=cause, reason=reason, level=level,
        cut=cut, cooldown_steps=cfg.cooldown(level), restored=restored, targets=targets,
        in_force=now,
    )


def with_pending_mark(rb: RollbackState) -> RollbackState:
    """``rb`` as the client will see it once a rollback command is applied: a mark sent and
    not yet acknowledged counts as done (a copy; ``rb`` is unchanged). The client may have
    applied it already, and then it keeps that checkpoint as its newest stable one and lets
    the one before go; or it may never (a newer command supersedes one not yet taken). A
    rollback ordered now targets the marked checkpoint and carries the mark again, which
    holds either way (see :meth:`~trimtab.controller.engine.Engine._stable_mark`)."""
    mark = rb.pending_mark
    if mark is None or mark not in rb.checkpoints or mark in rb.unusable:
        return rb
    view = dataclasses.replace(rb)
    view.note_marked(mark)
    return view
