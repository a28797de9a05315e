"""A simulated client for the policies' closed-loop tests: the real
:class:`~trimtab.client._knobs.Actuator` around a real optimizer's steps.

It takes the engine's decisions as the service sends them (a ``wire.Command``: lr and
weight decay as multipliers, momentum and clip absolute), puts the knobs in around every
optimizer step and takes them off after it, as the guard does; acknowledges a command
with what the first step that ran with it used; snapshots its knobs at checkpoint steps
and restores them on a rollback; and reports what the last step of each window used
(``knobs``: effective, ``base``: the user's own, ``scale``: the multipliers). The
controller's side of an ack (the knobs, a stable mark, a restore) is settled on the job
state in the service's order.

>>> import torch
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> c = Client(opt)
>>> c.report(loss_mean=1.0).knobs.lr, c.state.knobs.lr
(0.1, 1.0)
"""

from __future__ import annotations

from typing import Any

import torch

from trimtab.client._knobs import Actuator
from trimtab.controller.advance import Advanced, advance, commit, settle_ack, take
from trimtab.controller.decision import Decision
from trimtab.controller.engine import Engine
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.state import JobState
from trimtab.controller.tracker import SignalConfig
from trimtab.protocol import wire

__all__ = ["Client", "momentum_of", "one_param"]

EVERY = 10


def one_param(optimizer: str = "SGD", lr: float = 1e-3, **kw: Any) -> torch.optim.Optimizer:
    """``optimizer`` (a ``torch.optim`` name) on one two-element parameter at ``lr``."""
    p = torch.nn.Parameter(torch.zeros(2))
    return getattr(torch.optim, optimizer)([p], lr=lr, **kw)


def momentum_of(opt: torch.optim.Optimizer) -> float | None:
    """SGD's momentum or the Adam family's beta1 in group 0, as it is now."""
    group = opt.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"])
    betas = group.get("betas")
    return None if betas is None else float(betas[0])


class Client:
    """One job: ``optimizer`` under the real Actuator, a report every ``every`` steps,
    checkpoints (snapshots of the actuator's knobs) at the steps in ``checkpoints``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = EVERY,
        clip: float | None = None,
        facts: wire.ScaleFacts | None = None,
        signal_cfg: SignalConfig | None = None,
        checkpoints: tuple[int, ...] = (),
        rollback: RollbackConfig | None = None,
        job: str = "s",
    ) -> None:
        self.opt = optimizer
        self.act = Actuator(optimizer, clip)
        self.every = every
        self.checkpoints = tuple(checkpoints)
        self.rb = rollback or RollbackConfig()
        self.job = job
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        #: Optimizer steps taken (the guard's global_step), and the last report's step.
        self.step = 0
        self.reported = 0
        #: ``(step, lr, momentum)`` the optimizer saw at each step taken, in order.
        self.trace: list[tuple[int, float, float | None]] = []
        #: Every command taken.
        self.commands: list[wire.Command] = []
        self._saved: dict[int, dict[str, Any]] = {}
        self._owed: list[tuple[wire.Command, int | None]] = []
        self._save()
        facts = facts or wire.ScaleFacts(
            param_count=sum(p.numel() for p in self.params),
            group_sizes=[sum(p.numel() for p in g["params"]) for g in optimizer.param_groups],
            optimizer=type(optimizer).__name__, dtype="float32", device="cpu")
        self.state = JobState.from_register(wire.Register(
            job=job, run_id="r", report_every=every, facts=facts, knobs=self.act.used(),
            base=self.act.base(), scale=self.act.scale()), signal_cfg)

    # -- the controller's commands ------------------------------------------------------------

    def send(self, decision: Decision, lr_max: float | None = None) -> wire.Command | None:
        """What the service does with ``decision`` (:func:`~trimtab.controller.advance.commit`:
        its draft adopted, its command pending), then the client takes the command; returns
        it (None: nothing sent)."""
        command = commit(self.state, decision, lr_max)
        if command is not None:
            self.take(command)
        return command

    def take(self, command: wire.Command) -> None:
        """The guard's order: the stable mark, the restore, the knobs, the live schedules;
        the next optimizer step (:meth:`run`) runs with them and acknowledges them."""
        self.commands.append(command)
        restored = None
        if command.rollback_to is not None:
            self.act.load_state_dict(self._saved[command.rollback_to])
            self.step = self.reported = restored = command.rollback_to
        errors = self.act.command(command.scale, command.knobs, command.lr_max,
                                  command.schedules)
        assert not errors, errors
        self._owed.append((command, restored))

    def _acknowledge(self) -> None:
        owed, self._owed = self._owed, []
        knobs, base, scale = self.act.used(), self.act.base(), self.act.scale()
        for command, restored in owed:
            settle_ack(self.state, wire.Ack(job=self.job, seq=command.seq, step=self.step,
                                            knobs=knobs, base=base, scale=scale,
                                            restored_step=restored), self.rb)

    # -- training -----------------------------------------------------------------------------

    def run(self, steps: int) -> None:
        """``steps`` optimizer steps, the knobs engaged around each."""
        for _ in range(steps):
            self.act.engage(self.step)
            if self._owed:
                self._acknowledge()  # with the values this step uses
            self.trace.append((self.step, float(self.opt.param_groups[0]["lr"]),
                               momentum_of(self.opt)))
            for p in self.params:
                p.grad = torch.ones_like(p)
            self.opt.step()
            self.act.release()
            self.step += 1
            self._save()

    def _save(self) -> None:
        if self.step in self.checkpoints:
            self._saved[self.step] = self.act.state_dict()

    def advance(self) -> None:
        """Train up to the next report's step."""
        self.run(self.reported + self.every - self.step)

    def report(self, **fields: Any) -> wire.Report:
        """Train up to the next report's step and report what its last step used (fields
        given override), with the checkpoints taken so far; the state observes it."""
        self.advance()
        return self.observe(**fields)

    def observe(self, **fields: Any) -> wire.Report:
        """The report at this step, without training further (see :meth:`report`); the
        state takes it (:func:`~trimtab.controller.advance.take`), nothing is decided."""
        report = self._report(**fields)
        take(self.state, report, self.rb.health)
        return report

    def exchange(self, engine: Engine, **fields: Any) -> Advanced:
        """The report at this step through the controller as the live service takes it
        (:func:`~trimtab.controller.advance.advance`: folded in, judged, decided,
        committed), and the command it sends taken by the client."""
        out = advance(self.state, self._report(**fields), engine)
        if out.command is not None:
            self.take(out.command)
        return out

    def _report(self, **fields: Any) -> wire.Report:
        st = self.state
        fields.setdefault("knobs", self.act.used())
        fields.setdefault("base", self.act.base())
        fields.setdefault("scale", self.act.scale())
        fields.setdefault("checkpoints", [c for c in self.checkpoints if c <= self.step])
        fields.setdefault("stable_step", st.rollback.stable_step)
        report = wire.Report(job=self.job, seq=st.reports_seen + 1, step=self.step,
                             window=self.step - self.reported, applied_seq=st.applied_seq,
                             **fields)
        self.reported = self.step
        return report
