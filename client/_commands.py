"""The controller's commands on the training thread: taken, carried out, acknowledged.

The transport keeps only the newest command (see :mod:`trimtab.client._transport`); at
a step boundary the guard takes it. A command newer than the last one applied is carried
out (mark stable and roll back through :mod:`trimtab.client._checkpointing`, then its
knobs into the :class:`~trimtab.client._knobs.Actuator`), and its ack is owed: it goes out
with the first optimizer step that runs with it, stating that step's values, so the
controller learns what the optimizer really used. A repeated or older command is
acknowledged again with what is in force, never re-applied; the same seq repeats its
outcome (its first ack may have been lost).

>>> import torch
>>> from trimtab.client._knobs import Actuator
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
>>> class Link:  # the transport's two calls commands use
...     command, sent = None, []
...     def take_command(self): c, self.command = self.command, None; return c
...     def put_control(self, msg): self.sent.append(msg)
>>> link, act = Link(), Actuator(opt, clip=None)
>>> commands = Commands("demo", act, link, checkpoints=None)  # no mark_stable, rollback_to
>>> link.command = wire.Command(job="demo", seq=1, scale=wire.ScaleTargets(lr=0.5))
>>> commands.take(), commands.applied_seq, commands.owed
(False, 1, True)
>>> act.engage(step=0); commands.acknowledge(step=0); act.release()
>>> ack = link.sent[-1]; ack.seq, ack.knobs.lr, ack.base.lr
(1, 0.05, 0.1)
"""

from __future__ import annotations

import logging
from typing import Any

from trimtab.protocol import wire

from ._checkpoint import Checkpoint
from ._checkpointing import Checkpointing
from ._knobs import Actuator

__all__ = ["Commands"]

log = logging.getLogger("trimtab.client")

#: What carrying a command out came to: the step restored (``None``: none) and the errors.
Outcome = tuple[int | None, str | None]


class Commands:
    """One job's commands: the newest applied, the acks owed, the values in force, and
    the controller's stop advice. ``transport`` hands commands in and takes acks;
    ``checkpoints`` carries out their ``mark_stable`` and ``rollback_to``."""

    def __init__(self, job: str, act: Actuator, transport: Any,
                 checkpoints: Checkpointing) -> None:
        self.job = job
        self._act = act
        self._transport = transport
        self._checkpoints = checkpoints
        #: Sequence number of the last command applied (0: none).
        self.applied_seq = 0
        #: The controller advises stopping (the validation metric stopped improving).
        self.should_stop = False
        #: Why it advises stopping (``None``: it does not).
        self.stop_reason: str | None = None
        # What registration tells the controller; swapped whole by the training thread.
        self.in_force = (act.used(), act.base(), act.scale())
        # Commands taken and not yet acknowledged: (seq, restored step, error), acked at
        # the first optimizer step that runs with them.
        # (seq, the step restored, the step rolled back from, error) per ack owed.
        self._owed: list[tuple[int, int | None, int | None, str | None]] = []
        self._outcome: tuple[int, int | None, int | None, str | None] = (0, None, None, None)

    @property
    def owed(self) -> bool:
        """Whether acks are owed for commands taken."""
        return bool(self._owed)

    def take(self) -> bool:
        """Carry out a pending command; True when it rolled back. Its ack goes out with the
        first optimizer step that runs with it (:meth:`acknowledge`)."""
        command = self._transport.take_command()
        if command is None:
            return False
        rolled_back = False
        if command.seq > self.applied_seq:
            if command.stop_advice is not None:
                self.should_stop, self.stop_reason = True, command.stop_advice
                log.warning("trimtab controller advises stopping: %s", command.stop_advice)
            before = (None if command.rollback_to is None or self._checkpoints is None
                      else self._checkpoints.step_now)  # where the run stood
            restored, error = self._carry_out(command)
            self.applied_seq = command.seq
            self._outcome = (command.seq, restored,
                             None if restored is None else before, error)
            rolled_back = restored is not None
        # A repeated or old command is acknowledged again with what is in force, not
        # re-applied; the same seq repeats its outcome (its first ack may have been lost).
        seq, restored, before, error = self._outcome
        if seq != command.seq:
            restored = before = error = None
        del self._owed[:-7]  # bounded: a controller resending faster than steps run
        self._owed.append((command.seq, restored, before, error))
        return rolled_back

    def note_error(self, error: str) -> None:
        """Add ``error`` to the ack owed for the command just taken (the loop's
        ``on_rollback`` raised, called after the command was carried out)."""
        if not self._owed:
            return
        seq, restored, before, old = self._owed[-1]
        joined = error if not old else f"{old}; {error}"
        self._owed[-1] = (seq, restored, before, joined[:1024])
        if self._outcome[0] == seq:
            self._outcome = (seq, restored, before, joined[:1024])

    def _carry_out(self, command: wire.Command) -> Outcome:
        """mark_stable, then rollback_to, then knobs. Never raises: errors go in the ack."""
        errors: list[str] = []
        restored: Checkpoint | None = None
        try:
            if command.mark_stable is not None:
                errors += self._checkpoints.mark_stable(command.mark_stable)
            if command.rollback_to is not None:
                restored, notes = self._checkpoints.rollback(command.rollback_to)
                errors += notes
            errors += self._act.command(command.scale, command.knobs, command.lr_max,
                                        command.schedules)
            if restored is not None:
                self._checkpoints.hold_schedule(restored)
        except Exception as exc:  # training must go on; the controller learns from the ack
            log.exception("trimtab command %d failed", command.seq)
            errors.append(f"client error: {type(exc).__name__}: {exc}")
        for error in errors:
            log.warning("trimtab command %d: %s", command.seq, error)
        step = None if restored is None else restored.step
        return step, "; ".join(errors)[:1024] or None

    def note_in_force(self) -> tuple[wire.Knobs, wire.Knobs, wire.Scale]:
        """The values the last step used, the user's own then, the multipliers; kept for
        the next registration."""
        act = self._act
        self.in_force = (act.used(), act.base(), act.scale())
        return self.in_force

    def acknowledge(self, step: int) -> None:
        """Send the acks owed for the commands taken, with the values in force: those of
        the step just engaged (or, at close, of the last one)."""
        owed, self._owed = self._owed, []
        knobs, base, scale = self.note_in_force()
        for seq, restored, before, error in owed:
            self._transport.put_control(wire.Ack(
                job=self.job, seq=seq, step=step, knobs=knobs, base=base,
                scale=scale, restored_step=restored, rolled_back_from=before, error=error))
