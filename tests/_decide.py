"""Engine decisions for tests that call the engine on a job state directly, without reports.

:meth:`Engine.decide <trimtab.controller.engine.Engine.decide>` changes nothing: the state
a decision leaves is its draft. A test that asks the engine several times in a row, as a
controller would over successive reports, takes each decision's draft as the job's state
(what :func:`~trimtab.controller.advance.commit` does first) without building a command:
the knobs in force stay the ones the test sets. Tests that feed reports use
:func:`~trimtab.controller.advance.advance` instead.
"""

from __future__ import annotations

from trimtab.controller.decision import Decision
from trimtab.controller.engine import Engine
from trimtab.controller.state import JobState


def decided(engine: Engine, state: JobState) -> Decision:
    """``engine.decide(state)``, its draft adopted."""
    return _adopted(state, engine.decide(state))


def decided_schedules(engine: Engine, state: JobState) -> Decision:
    """``engine.decide_schedules(state)``, its draft adopted."""
    return _adopted(state, engine.decide_schedules(state))


def _adopted(state: JobState, d: Decision) -> Decision:
    if d.draft is not None:
        state.adopt(d.draft)
    return d
