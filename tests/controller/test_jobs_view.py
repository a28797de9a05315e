"""``trimtab jobs`` over a real journal file: which names are jobs, and when each was heard."""

from __future__ import annotations

from trimtab.controller.jobs_view import JobsView
from trimtab.controller.journal import Journal


def test_a_name_only_people_sent_requests_for_is_no_job_and_requests_are_not_word_from_one(
    tmp_path,
):
    """A refused request (an operator's typo, a job of another shard, any name a client key
    sends) made a line of state '?' in trimtab jobs, and in every refusal's list of jobs;
    and a request for a real job moved the time it was last heard from forward."""
    journal = Journal(str(tmp_path / "j.db"))
    now = [1000.0]
    journal.clock = lambda: now[0]
    journal.append("a", "register", step=0, data={"run_id": "r1"})
    journal.append("a", "report", step=10, seq=1, data={})
    now[0] = 2000.0
    journal.append("tpyo", "manual", data={"action": "pause", "ok": False, "who": "x",
                                           "reason": "y", "detail": "not live"})
    journal.append("a", "manual", data={"action": "pause", "ok": False, "who": "x",
                                        "reason": "y", "detail": "not live"})
    journal.commit()
    lines = JobsView(journal).lines(all_jobs=True, now=2000.0)
    assert [ln.job for ln in lines] == ["a"]
    assert lines[0].last_seen == 1000.0 and lines[0].state == "live"
