"""The knob model on the client: trimtab's multipliers around the user's own values.

The user's code or scheduler owns each param group's ``lr`` and ``weight_decay`` (the
*base*: a loop may rewrite them every iteration, a scheduler steps them). trimtab's lr
and weight-decay knobs are *multipliers* on that base, put in just before the optimizer
step and taken off right after it, as ``GradScaler`` puts its scale around the user's
step::

    engage()          group["lr"] = base x m   (every group by the same m: ratios kept)
    optimizer.step()
    release()         group["lr"] = base       (the loop and its scheduler see their own)

So a loop that writes ``param_group["lr"]`` every iteration, closed-form and chainable
torch schedulers and a trainer's schedule all compose with trimtab, and a multiplier
below 1 always lowers the lr relative to the user's schedule. A multiplier above 1 raises
it, at most to ``lr_max`` (the governor's safety cap; a base already above the cap is
never lowered by it). Momentum (``momentum``, or ``betas[0]`` for the Adam family) is
absolute: once commanded it is put in around every step the same way (``None``: the
user's own). The clip threshold is the guard's own.

Between steps the param groups hold the user's values; :meth:`Actuator.used` says what
the optimizer used at the last step. Tensor-valued settings (capturable or fused
optimizers) are scaled in place on their device, never read per step.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(2))
>>> opt = torch.optim.SGD([{"params": [p]}, {"params": [], "lr": 0.01}], lr=0.1, momentum=0.9)
>>> act = Actuator(opt, clip=None)
>>> act.command(wire.ScaleTargets(lr=0.5), wire.Knobs(), None)
[]
>>> act.engage(step=0); [g["lr"] for g in opt.param_groups]
[0.05, 0.005]
>>> act.release(); [g["lr"] for g in opt.param_groups]
[0.1, 0.01]
>>> act.used().lr, act.base().lr, act.scale().lr
(0.05, 0.1, 0.5)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from trimtab.protocol import wire

from ._live_schedule import LiveSchedules

__all__ = ["Actuator", "knobs_of", "nominal_lr", "lr_spread", "check_optimizer"]

log = logging.getLogger("trimtab.client")


def _scalar(value: Any) -> float:
    # A tensor lr/beta (capturable or fused optimizers) costs one host read here; knobs
    # are read once per report window and once per command, never per step.
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def reads_lr_once(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` reads its param groups' ``lr`` only at its first step:
    torch's Rprop sets each parameter's step size from it then, and adapts those on its own
    after (an optimizer trial: a multiplier of x0.01 left Rprop's updates 1.94x larger, while
    the journal said x0.01 was in force). An lr multiplier would change nothing it does."""
    return isinstance(optimizer, torch.optim.Rprop)


def _sweeps(schedule: wire.LiveSchedule) -> bool:
    """Whether ``schedule`` rises geometrically with no end but its bound: an exponential
    piece with ``gamma > 1``, the LR range test's sweep (up to where runs blow up, which
    only the controller, reading the loss, ends)."""
    return any(p.name == "exponential" and float(p.params.get("gamma", 1.0)) > 1.0
               for p in schedule.pieces)


def _momentum_of(group: dict[str, Any]) -> Any:
    if "momentum" in group:
        return group["momentum"]
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        return betas[0]
    return None


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless every param group carries an ``lr``."""
    if not optimizer.param_groups:
        raise ValueError("optimizer has no param groups; trimtab needs at least one")
    for i, group in enumerate(optimizer.param_groups):
        if "lr" not in group:
            raise ValueError(f"optimizer param group {i} has no 'lr'; trimtab steers lr")


def decay_of(groups: list[dict[str, Any]]) -> Any:
    """The weight decay that stands for the job: the first group's that is not 0, else
    group 0's (None: no group has one). A no-decay group listed first (timm's
    ``create_optimizer_v2``, many fine-tuning recipes) would read 0: "nothing to
    multiply" for a run whose other groups decay. A tensor entry counts as not 0 (it is
    not read here).

    >>> decay_of([{"weight_decay": 0.0}, {"weight_decay": 0.05}]), decay_of([{}])
    (0.05, None)
    """
    first = None
    for g in groups:
        wd = g.get("weight_decay")
        if wd is None:
            continue
        if first is None:
            first = wd
        if isinstance(wd, torch.Tensor) or wd != 0:
            return wd
    return first


def knobs_of(groups: list[dict[str, Any]], clip: float | None) -> wire.Knobs:
    """Group 0's lr, the job's weight decay (:func:`decay_of`) and the first group's
    momentum, as they are in ``groups`` (live param groups, or an optimizer
    ``state_dict``'s)."""
    group0 = groups[0]
    momentum = next((m for g in groups if (m := _momentum_of(g)) is not None), None)
    wd = decay_of(groups)
    return wire.Knobs(
        lr=_scalar(group0["lr"]),
        momentum=None if momentum is None else _scalar(momentum),
        weight_decay=None if wd is None else _scalar(wd),
        clip=clip,
    )


def nominal_lr(groups: list[dict[str, Any]]) -> float | None:
    """The lr group 0's torch scheduler scales: OneCycleLR's ``max_lr``, else any
    scheduler's ``initial_lr`` (the lr it was given, however far a warm-up has come);
    ``None`` where no scheduler left one (a loop that writes its lr itself).

    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> nominal_lr(opt.param_groups)
    >>> _ = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.01)
    >>> opt.param_groups[0]["lr"], nominal_lr(opt.param_groups)
    (0.001, 0.1)
    """
    group0 = groups[0] if groups else {}
    for key in ("max_lr", "initial_lr"):
        value = group0.get(key)
        if isinstance(value, torch.Tensor):  # a tensor lr: read on the host only if there
            value = float(value) if value.numel() == 1 and value.device.type == "cpu" else None
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value > 0):
            return float(value)
    return None


def lr_spread(groups: list[dict[str, Any]]) -> float | None:
    """The highest lr of the param groups over group 0's, where it is higher (None: group 0
    runs at the highest lr, or an lr is a tensor off the host, or group 0's is 0).
    ``knobs.lr`` and ``nominal_lr`` are group 0's; with layer-wise LR decay (timm's
    ``layer_decay``, BEiT/ViT fine-tuning recipes) group 0 is the input layer at a small
    fraction of the head's lr, and an absolute lr -- a policy's, the optimizer family's sane
    range -- relates to the head's, the lr a user configures (timm's ``lr`` is the head's).
    The multiplier is the same for every group, so the ratio holds under it and under a
    scheduler that scales every group alike.

    >>> w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    >>> opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3 * 0.5 ** (2 - i)}
    ...                          for i, p in enumerate(w)])
    >>> lr_spread(opt.param_groups)
    4.0
    >>> lr_spread(torch.optim.AdamW(w, lr=1e-3).param_groups) is None
    True
    """
    lrs = []
    for g in groups:
        value = g.get("lr")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.device.type != "cpu":
                return None
            value = float(value)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value)):
            return None
        lrs.append(float(value))
    if not lrs or lrs[0] <= 0.0:
        return None
    spread = max(lrs) / lrs[0]
    return spread if 1.0 + 1e-9 < spread <= 1e12 else None


class Actuator:
    """trimtab's knobs on one optimizer: the multipliers, momentum, clip and the live
    schedules in force, put in around each optimizer step; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None) -> None:
        self.optimizer = optimizer
        #: The lr and weight-decay multipliers commanded (1.0: the user's values).
        self.lr_scale = 1.0
        self.wd_scale = 1.0
        #: The most a multiplier above 1 may take the effective lr to (None: no cap).
        self.lr_max: float | None = None
        #: The momentum commanded (None: the user's own).
        self.momentum: float | None = None
        #: The clipping threshold in force (None: off).
        self.clip = clip
        #: The controller's per-step schedules (none at first).
        self.live = LiveSchedules()
        # (group, key, base, value put) to put back after the step; None: nothing engaged.
        self._saved: list[tuple[dict[str, Any], str, Any, Any]] | None = None
        # What the last engaged step used: group 0's base lr, wd, momentum (floats, or
        # tensor copies), the lr multiplier after the cap, the momentum put in.
        self._last: tuple[Any, Any, Any, Any, float | None, float] | None = None
        #: Whether no controller answers (the guard sets it: see :meth:`engage`).
        self.alone = False
        #: The lr multiplier in force before the command that set the live lr schedule
        #: (None: none set, or set before this process loaded its state): what a run alone
        #: goes back to when that schedule would rise (see :meth:`engage`).
        self.lr_before_live: float | None = None
        #: The newest step the controller says it has seen (its answers to reports and
        #: heartbeats; None: not told yet), and how many steps a live lr schedule may run
        #: past it (None: no leash). The guard sets both (see :meth:`engage`).
        self.seen: int | None = None
        self.leash: int | None = None
        #: Optimizer steps a live lr schedule was held at its leash.
        self.held_steps = 0
        self._holding = False
        # The lowest and highest lr put in for the open report window's steps (group 0's,
        # effective; host floats), and whether a step's lr was a tensor (not read).
        self._window_lr: tuple[float, float] | None = None
        self._window_lr_unread = False

    # -- commands ------------------------------------------------------------------------------

    def command(
        self, scale: wire.ScaleTargets, knobs: wire.Knobs, lr_max: float | None,
        schedules: list[wire.LiveSchedule] | None = None,
    ) -> list[str]:
        """Take a command's multipliers, momentum, clip, cap and live schedules; errors
        (nothing changed then, schedules included).

        A live schedule that a command replaces or stops leaves its last value in force
        (the controller counts on it, as a value the run is at), unless the same command
        sets that knob."""
        clip, momentum = knobs.clip, knobs.momentum
        if clip is not None and not clip > 0:
            return [f"knobs not applied: clip={clip!r} is out of range; allowed: clip > 0"]
        if momentum is not None and not 0.0 <= momentum < 1.0:
            return [f"knobs not applied: momentum={momentum!r} is out of range; "
                    "allowed: 0 <= m < 1"]
        if momentum is not None and all(_momentum_of(g) is None
                                        for g in self.optimizer.param_groups):
            return ["knobs not applied: momentum commanded, but the optimizer has none"]
        if reads_lr_once(self.optimizer) and (
                (scale.lr is not None and scale.lr != self.lr_scale)
                or any(s.knob == "lr" for s in schedules or ())):
            return [f"knobs not applied: lr commanded, but {type(self.optimizer).__name__} "
                    "reads its lr only at its first step (each parameter's step size adapts "
                    "on its own after): a multiplier would change nothing it does"]
        if schedules is not None:
            last = self.live.last
            self.lr_scale = last.get("lr", self.lr_scale)
            if "momentum" in last:
                self.momentum = last["momentum"]
            self.live.replace(schedules)
            self.lr_before_live = (self.lr_scale if any(s.knob == "lr" for s in schedules)
                                   else None)
        if scale.lr is not None:
            self.lr_scale = scale.lr
        if scale.weight_decay is not None:
            self.wd_scale = scale.weight_decay
        if lr_max is not None:
            self.lr_max = lr_max
        if momentum is not None:
            self.momentum = momentum
        if clip is not None:
            self.clip = clip
        return []

    def state_dict(self) -> dict[str, Any]:
        """The knobs in force, for a checkpoint (live schedules are the controller's)."""
        return {"lr_scale": self.lr_scale, "wd_scale": self.wd_scale, "lr_max": self.lr_max,
                "momentum": self.momentum, "clip": self.clip}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` gave (a rollback; keys left out stay). A live
        schedule's last value belongs to the trajectory rolled back from: it is dropped."""
        self.live.last = {}
        self.lr_scale = float(sd.get("lr_scale", self.lr_scale))
        self.wd_scale = float(sd.get("wd_scale", self.wd_scale))
        self.lr_max = sd.get("lr_max", self.lr_max)
        self.momentum = sd.get("momentum", self.momentum)
        self.clip = sd.get("clip", self.clip)

    # -- around the step -------------------------------------------------------------------------

    def engage(self, step: int) -> None:
        """Put the effective values in the param groups for the optimizer step after ``step``
        steps (host arithmetic on param-group entries; tensor entries in place on device)."""
        if self._saved is not None:  # the last step raised, or was interrupted, unreleased
            self.release(stale=True)
        live = self.live.values(step)
        due = live.get("lr", self.lr_scale)  # where the schedule is due now
        lr_m = self._leashed(step, due) if "lr" in live else due
        if self.alone and due > self.lr_scale:
            # No controller to watch it, and a live lr schedule rising past what its command
            # set (a range test's sweep, up to where runs blow up, which only a controller
            # ends): it is dropped, and the run goes back to the multiplier in force before
            # that command. Not held at the command's value (a sweep for a run too hot
            # starts at 1/400 of it: a trial's run stayed there 1,770 steps), nor taken up
            # again when a controller answers (a trial's jumped to the sweep's x10): that
            # controller decides anew, from a run that says it holds no schedule.
            back = (self.lr_before_live if self.lr_before_live is not None
                    else max(self.lr_scale, 1.0))
            log.warning(
                "trimtab: no controller answers: the live lr schedule (at x%.4g, from its "
                "command's x%.4g) is dropped; the lr multiplier goes back to x%.4g, in force "
                "before it, until a controller's next command", lr_m, self.lr_scale, back)
            self.live.replace([s for s in self.live.schedules if s.knob != "lr"])
            self.live.last = {k: v for k, v in live.items() if k != "lr"}
            self.lr_scale = lr_m = back
            self.lr_before_live = None
        momentum = live.get("momentum", self.momentum)
        groups = self.optimizer.param_groups
        g0 = groups[0]
        base_lr, base_wd = g0["lr"], decay_of(groups)
        base_mom = next((m for g in groups if (m := _momentum_of(g)) is not None), None)
        # Read before the writes below: a tensor entry is scaled in place.
        self._last = (_keep(base_lr), _keep(base_wd), _keep(base_mom), None, momentum,
                      self.wd_scale)
        lr_eff = self._capped(groups, lr_m)
        # Kept before the first write, each entry before its own: an interrupt (Ctrl-C in a
        # notebook) at any point leaves every value written findable by release().
        saved: list[tuple[dict[str, Any], str, Any, Any]] = []
        self._saved = saved
        for group in groups:
            if lr_m != 1.0:
                _scale(group, "lr", lr_eff, saved)
            if self.wd_scale != 1.0 and "weight_decay" in group:
                _scale(group, "weight_decay", self.wd_scale, saved)
            if momentum is not None:
                _put_momentum(group, momentum, saved)
        self._last = (*self._last[:3], lr_eff, momentum, self.wd_scale)
        self._note_lr(base_lr, lr_eff)

    def _leashed(self, step: int, lr_m: float) -> float:
        """The live lr schedule's value ``lr_m`` for the step after ``step``, held at its
        value ``leash`` steps past the newest step the controller has seen when the run is
        further on than that: a rising schedule (a range test's sweep, which only the
        controller ends, reading the loss it causes) never runs more than ``leash`` steps
        ahead of what the controller has seen. A controller stopped mid-sweep (SIGSTOP, a
        stalled host) let a trial's sweep climb on unwatched for the liveness window, from
        x2.5 to x764, and the run's weights went non-finite before it was dropped. Only a
        sweep is held (:func:`_sweeps`): a schedule policy's warm-up rises to a peak its
        config bounds, and follows torch's step by step whatever the controller's lag; a
        falling schedule is never held (its value there is higher)."""
        seen, leash = self.seen, self.leash
        schedule = next((s for s in self.live.schedules if s.knob == "lr"), None)
        if (seen is None or leash is None or step <= seen + leash or schedule is None
                or not _sweeps(schedule)):
            if self._holding:
                self._holding = False
                log.debug("trimtab: the controller has caught up (step %s seen): the live lr "
                          "schedule goes on", seen)
            return lr_m
        cap = schedule.value(seen + leash)
        if cap >= lr_m:
            return lr_m
        self.held_steps += 1
        self.live.last["lr"] = cap  # what the step runs at
        if not self._holding:
            self._holding = True
            log.debug("trimtab: the live lr schedule is held at x%.4g at step %d: the "
                      "controller has seen up to step %d (the schedule runs at most %d steps "
                      "past it)", cap, step, seen, leash)
        return cap

    def _note_lr(self, base: Any, m: Any) -> None:
        """Widen the open window's lr range by the lr just put in (``base x m``); an lr
        held in a tensor is not read (that would be a host sync per step)."""
        if isinstance(base, torch.Tensor) or isinstance(m, torch.Tensor):
            self._window_lr_unread = True
            return
        lr = float(base) * m
        w = self._window_lr
        self._window_lr = (lr, lr) if w is None else (min(w[0], lr), max(w[1], lr))

    def take_window_lr(self) -> tuple[float | None, float | None]:
        """The lowest and highest lr (group 0's, effective) put in for the steps since the
        last call, and a new window begun; ``(None, None)`` for no step, or where an lr was a
        tensor (reading it would sync)."""
        w, unread = self._window_lr, self._window_lr_unread
        self._window_lr, self._window_lr_unread = None, False
        return (None, None) if w is None or unread else w

    def _capped(self, groups: list[dict[str, Any]], m: float) -> Any:
        """The lr multiplier after the cap: ``min(m, max(1, lr_max / base))`` for ``m > 1``;
        ``base`` is the highest lr of the param ``groups`` (:func:`_top_lr`, read only
        then), so that no group runs past the cap (layer-wise LR decay puts the smallest lr
        in group 0)."""
        if m <= 1.0 or self.lr_max is None:
            return m
        base = _top_lr(groups)
        if isinstance(base, torch.Tensor):
            if base.device.type != "cpu":  # on the device: no host read per step
                return torch.clamp(self.lr_max / base, min=1.0, max=m)
            base = float(base)
        return m if base <= 0.0 else min(m, max(1.0, self.lr_max / base))

    def release(self, stale: bool = False) -> None:
        """Put the user's values back after the optimizer step (idempotent). Each entry
        leaves the list only once put back, so an interrupt inside leaves the rest for the
        next call. ``stale``: a release the step never reached (it raised, or a notebook's
        Ctrl-C landed in it), made before the next step; the user's code ran in between,
        and a value it wrote since (a new lr in the next cell) is the user's own, kept (one
        held in a tensor, scaled in place, cannot be told apart: put back).

        A notebook trial: an interrupt between clearing the list and the writes made
        trimtab's multiplier part of the user's own lr and momentum for good (0.05 -> 0.025,
        the report's 'base' 0.0125 after two); one inside the optimizer step under
        ``hooks=True``, then the user's new lr 0.04, and the next step put 0.05 back."""
        saved = self._saved
        while saved:
            group, key, base, put = saved[-1]
            live = group.get(key)
            if isinstance(live, torch.Tensor) and isinstance(base, torch.Tensor):
                live.copy_(base)
            elif key == "betas" and isinstance(live, (tuple, list)) and isinstance(
                    live[0], torch.Tensor) and isinstance(base, torch.Tensor):
                live[0].copy_(base)
            elif not stale or put is None or _same(live, put):
                group[key] = base
            saved.pop()
        self._saved = None

    # -- what was in force ----------------------------------------------------------------------

    def used(self) -> wire.Knobs:
        """The effective values of the last engaged step (before any: what a step now would
        use). Reads a tensor-valued setting from its device: once per report or ack."""
        base = self.base()
        if self._last is None:
            # A live schedule's last value (a guard resumed from a saved state) holds until
            # the first step evaluates it again.
            last = self.live.last if self.live.schedules else {}
            lr_m: Any = (None if base.lr is None
                         else self._capped(self.optimizer.param_groups,
                                           last.get("lr", self.lr_scale)))
            momentum, wd_m = last.get("momentum", self.momentum), self.wd_scale
        else:
            lr_m, momentum, wd_m = self._last[3:]
        lr = None if base.lr is None else base.lr * _scalar(lr_m)
        wd = None if base.weight_decay is None else base.weight_decay * wd_m
        mom = momentum if momentum is not None and base.momentum is not None else base.momentum
        return wire.Knobs(lr=lr, momentum=mom, weight_decay=wd, clip=self.clip)

    def base(self) -> wire.Knobs:
        """The user's own values at the last engaged step (before any: in the groups now)."""
        if self._last is None:
            return knobs_of(self.optimizer.param_groups, None)
        lr, wd, mom = self._last[:3]
        return wire.Knobs(lr=_scalar(lr), momentum=None if mom is None else _scalar(mom),
                          weight_decay=None if wd is None else _scalar(wd))

    def scale(self) -> wire.Scale:
        """The multipliers in force (a live lr schedule's value at the last engaged step)."""
        lr = self.live.last.get("lr", self.lr_scale) if self.live.schedules else self.lr_scale
        return wire.Scale(lr=lr, weight_decay=self.wd_scale)


def _top_lr(groups: list[dict[str, Any]]) -> Any:
    """The highest lr of the param groups, which the cap on a multiplier above 1 is
    measured on: the multiplier is the same for every group, so the group with the highest
    lr reaches the cap first (timm's layer-wise LR decay orders its groups from the input,
    the smallest lr first). Host arithmetic for float lrs; tensor lrs are reduced on their
    device, with no host read."""
    lrs = [g["lr"] for g in groups]
    if len(lrs) == 1:
        return lrs[0]
    tensors = [v for v in lrs if isinstance(v, torch.Tensor)]
    if not tensors:
        return max(lrs)
    device = tensors[0].device
    return torch.stack([torch.as_tensor(v, dtype=torch.float64 if device.type == "cpu"
                                        else torch.float32, device=device).reshape(())
                        for v in lrs]).amax()


def _keep(value: Any) -> Any:
    """A value to read later: a tensor is copied on its device (it may change in place)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _same(live: Any, put: Any) -> bool:
    """Whether a param-group entry still holds what engage put there."""
    try:
        return bool(live == put)
    except Exception:  # an entry of the user's that does not compare: not ours
        return False


# Each entry is (group, key, the user's value, the value put in; None: a tensor changed in
# place), appended before the write it undoes.
def _scale(group: dict[str, Any], key: str, factor: Any, saved: list) -> None:
    base = group[key]
    if isinstance(base, torch.Tensor):
        saved.append((group, key, base.clone(), None))
        base.mul_(factor)  # in place: a fused or captured step keeps its tensor
    else:
        put = base * (factor if not isinstance(factor, torch.Tensor) else _scalar(factor))
        saved.append((group, key, base, put))
        group[key] = put


def _put_momentum(group: dict[str, Any], value: float, saved: list) -> None:
    if "momentum" in group:
        base = group["momentum"]
        if isinstance(base, torch.Tensor):
            saved.append((group, "momentum", base.clone(), None))
            base.fill_(value)
        else:
            saved.append((group, "momentum", base, value))
            group["momentum"] = value
        return
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        if isinstance(betas[0], torch.Tensor):
            saved.append((group, "betas", betas[0].clone(), None))
            betas[0].fill_(value)
        else:
            put = (value, *tuple(betas[1:]))
            saved.append((group, "betas", betas, put))
            group["betas"] = put

