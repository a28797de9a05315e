"""A loss that rises because the data moved is rolled back once, not again and again.

A regression whose target's scale grows with the loop's own iteration count (1 -> 3 over
the run, its noise growing with it, as a value loss grows with the returns; the
``growing`` row of ``bench.nonstationary``): its loss
climbs while every step trains, and the health judgement's climb verdict rolls it back.
The restored checkpoint then scores as high as the run did before the rollback (the loop's
count is not rewound: the same weights meet the larger target), which no divergence of
the weights would do: the controller journals ``data_moved`` and gives the job no more
climb verdicts. Against a real ``trimtab serve`` with its default policies; the bare run
is the reference. Before: 3-4 climb rollbacks and the budget's alert in a trial (a 2-rank
FSDP2 run of this loop ended 0.089-0.113 against bare's 0.065).
"""

from __future__ import annotations

import pytest

from bench.nonstationary import GROWING, growing

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STEPS, LR = GROWING


def test_a_climb_the_data_made_is_rolled_back_once(serve_factory, one_thread):
    srv = serve_factory()
    job = "moving-target"
    bare, _ = growing(STEPS, LR, None, "bare")
    # A plain guard against the serve, commands landing when they arrive.
    final, rollbacks = growing(STEPS, LR, srv, job, lockstep=False)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    causes = [e.data["reason"] for e in journal.events(job, "rollback")]
    moved = journal.events(job, "data_moved")
    assert causes.count("climb") == 1 and len(moved) == 1, (causes, [e.data for e in moved])
    assert "no more climb verdicts" in moved[0].data["why"]
    assert not journal.events(job, "alert")
    # After it (in the journal's order), nothing is rolled back for the loss's rise.
    assert not [e.data["reason"] for e in journal.events(job, "rollback")
                if e.id > moved[0].id and e.data["reason"] in ("climb", "loss_spike")]
    assert final <= 1.25 * bare, (final, bare, rollbacks)
