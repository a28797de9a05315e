"""One report through the controller: fold it in, judge it, decide. The only such loop.

The live service (:mod:`~trimtab.controller.service`), offline replay
(:mod:`~trimtab.controller.replay`) and the tests all take a report the same way, here:

1. :meth:`JobState.observe <trimtab.controller.state.JobState.observe>` folds it into the
   job's signals;
2. :func:`~trimtab.controller.health.assess` judges it, once, under ``[rollback.health]``:
   the verdict is the job's :attr:`~trimtab.controller.view.JobView.health`, read by the
   rollback manager and by the ``divergence_guard`` policy alike;
3. the rollback manager takes the checkpoints it lists
   (:meth:`RollbackState.observe <trimtab.controller.rollback.RollbackState.observe>`);
4. the engine decides: everything when no command awaits its ack, only an urgent
   rollback while an ordinary command does (ordinary changes are governed against the
   values in force, so they wait for the ack), nothing while a rollback command does.

What the caller does with the decision (journal it, send its command, assume it applied)
is the caller's: the service sends and journals, replay assumes the command applied.

>>> from trimtab.protocol import wire
>>> from trimtab.controller.engine import Engine
>>> from trimtab.controller.state import JobState
>>> from trimtab.policies.divergence_guard import DivergenceGuard
>>> facts = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
...                         dtype="float32", device="cpu")
>>> st = JobState.register(wire.Register(job="j", run_id="r", report_every=10, facts=facts,
...                                      knobs=wire.Knobs(lr=0.1)))
>>> engine = Engine([DivergenceGuard()])
>>> out = advance(st, wire.Report(job="j", seq=1, step=10, window=10, loss_mean=float(2),
...                               nonfinite_losses=3, knobs=wire.Knobs(lr=0.1)), engine)
>>> out.health.cause, st.view().health.cause
('nonfinite', 'nonfinite')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trimtab.controller.health import DivergenceThresholds, Unhealthy, assess

if TYPE_CHECKING:
    from trimtab.controller.engine import Decision, Engine
    from trimtab.controller.rollback import Observation
    from trimtab.controller.state import JobState
    from trimtab.protocol import wire

__all__ = ["Taken", "Advanced", "take", "advance"]


@dataclass(frozen=True)
class Taken:
    """What folding one report in did: its health and what the rollback manager saw."""

    health: Unhealthy | None
    observation: Observation


@dataclass(frozen=True)
class Advanced(Taken):
    """...and the decision (None: none was asked for, a rollback command awaits its ack)."""

    decision: Decision | None = None


def take(state: JobState, report: wire.Report, thresholds: DivergenceThresholds) -> Taken:
    """Steps 1-3 of the module docstring: fold ``report`` into ``state``, judge it under
    ``thresholds`` and let the rollback manager see it; no decision."""
    state.observe(report)
    view = state.view()
    verdict = assess(view, thresholds)
    state.health = verdict
    return Taken(verdict, state.rollback.observe(view, verdict))


def advance(state: JobState, report: wire.Report, engine: Engine) -> Advanced:
    """Take ``report`` into ``state`` and decide under ``engine`` (see the module docstring).

    ``engine.rollback.health`` holds the health thresholds. ``state`` changes as the report
    and the decision say; nothing else does.
    """
    taken = take(state, report, engine.rollback.health)
    pending = state.pending_command
    if pending is None:
        decision: Decision | None = engine.decide(state)
    elif pending.rollback_to is None:
        decision = engine.decide_urgent(state)
    else:
        decision = None
    return Advanced(taken.health, taken.observation, decision)
