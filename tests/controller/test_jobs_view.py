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


def test_a_resume_from_a_save_before_a_rollback_takes_it_off_the_rollbacks_column(tmp_path):
    """Preemption re-trial: a run rolled back at step 250, then resumed in a new process
    from its save at 200, still showed 1 in trimtab jobs' rollbacks column: that rollback
    is on the path the resume set aside (the controller set it aside too). One before the
    save stays counted; a rollback not restored is not counted."""
    journal = Journal(str(tmp_path / "j.db"))
    journal.append("a", "register", step=0, data={"run_id": "r1", "resumed": "new"})
    journal.append("a", "rollback", step=120, data={"from_step": 120, "target": 100})
    journal.append("a", "rollback", step=250, data={"from_step": 250, "target": 200})
    journal.append("a", "rollback", step=260, data={"from_step": 260, "target": 200})
    journal.append("a", "restore_failed", step=260, data={"target": 200, "why": "gone"})
    journal.commit()
    view = JobsView(journal)
    assert view.lines(all_jobs=True)[0].rollbacks == 2
    journal.append("a", "register", step=200, data={"run_id": "r1", "resumed": "resume",
                                                    "resume_step": 200})
    journal.commit()
    (line,) = view.lines(all_jobs=True)
    assert line.rollbacks == 1
    assert "rollback_steps" not in line.to_json()


def test_a_name_reused_by_another_run_shows_that_runs_rollbacks_and_decisions(tmp_path):
    """A fleet trial: trials reusing a name showed the rollbacks and last decision of
    earlier runs under it (14 names wrong; 'rollbacks 1, rollback 250 -> 100' for a latest
    run that had none), where the metrics start each run from zero. A line follows the run
    that registered last; an attach registration its process replaced with a resume gives
    the resumed run its own history back."""
    journal = Journal(str(tmp_path / "j.db"))
    journal.append("a", "register", step=0, data={"run_id": "r1", "resumed": "new"})
    journal.append("a", "rollback", step=250, data={"from_step": 250, "target": 100,
                                                    "reason": "loss_spike", "why": "z"})
    journal.append("a", "bye", step=400, data={"reason": "closed"})
    journal.append("a", "register", step=0, data={"run_id": "r2", "resumed": "new"})
    journal.commit()
    view = JobsView(journal)
    (line,) = view.lines(all_jobs=True)
    assert (line.rollbacks, line.last_decision) == (0, "")
    # r1 resumed in a new process that registered as r3 first, at attach.
    journal.append("a", "register", step=0, data={"run_id": "r3", "resumed": "new"})
    journal.append("a", "register", step=300, data={"run_id": "r1", "resumed": "resume",
                                                    "resume_step": 300, "replaces": "r3"})
    journal.commit()
    (line,) = view.lines(all_jobs=True)
    assert line.rollbacks == 1 and line.last_decision.startswith("rollback 250 -> 100")


def test_the_step_shown_is_the_reports_when_the_saved_state_lags_them(tmp_path):
    """An examples trial: a controller killed and restarted; trimtab jobs showed 'live step
    10', then 'lost step 10', where the journal held reports to step 110 (the state is
    saved every few seconds, the reports as they come)."""
    journal = Journal(str(tmp_path / "j.db"))
    now = [1000.0]
    journal.clock = lambda: now[0]
    journal.append("a", "register", step=0, data={"run_id": "r1", "resumed": "new"})
    journal.save_state("a", {"step": 10, "effective": {}})
    for i in range(1, 12):
        now[0] += 1
        journal.append("a", "report", step=10 * i, seq=i, data={})
    journal.commit()
    view = JobsView(journal)
    assert view.lines(all_jobs=True)[0].step == 110
    now[0] += 60  # the restarted controller marks it lost at its saved state's step
    journal.append("a", "lost", step=10, data={"silent_s": 60.0, "unheard": True})
    journal.save_state("a", {"step": 10, "effective": {}}, live=False)
    journal.commit()
    (line,) = view.lines(all_jobs=True)
    assert (line.state, line.step) == ("lost", 110)


def test_an_ended_job_shows_the_step_of_its_bye(tmp_path):
    """A re-trial: trimtab jobs showed step 140 (the last report's, in the state saved with
    the bye) for a run that said bye at step 144."""
    journal = Journal(str(tmp_path / "j.db"))
    now = [1000.0]
    journal.clock = lambda: now[0]
    journal.append("a", "register", step=0, data={"run_id": "r1", "resumed": "new"})
    journal.append("a", "report", step=140, seq=1, data={})
    now[0] += 1
    journal.append("a", "bye", step=144, data={"reason": "closed"})
    now[0] += 0.001
    journal.save_state("a", {"step": 140, "effective": {}}, live=False)
    journal.commit()
    (line,) = JobsView(journal).lines(all_jobs=True)
    assert (line.state, line.step) == ("ended (closed)", 144)


def test_a_resume_from_a_save_made_after_a_rollback_restored_keeps_it(tmp_path):
    """A preemption trial: SIGTERM during a rollback; the loop saved at the restored step
    1100, with the rollback's cut (its command applied). Resumed, trimtab jobs said
    'rollbacks 0' and 'resumed from the save at step 1100: the decisions after it set
    aside' while the run went on at lr x0.5 and the metrics counted the rollback: the
    rollback, decided at 1250, is on the resumed path, as the save's applied seq says."""
    journal = Journal(str(tmp_path / "j.db"))
    journal.append("a", "register", step=0, data={"run_id": "r1", "resumed": "new"})
    journal.append("a", "decision", step=1250, data={"knobs": {"lr": {
        "current": 1.0, "commanded": 0.5, "policy": "divergence_guard", "reason": "climb"}}})
    journal.append("a", "rollback", step=1250, seq=22, data={
        "from_step": 1250, "target": 1100, "reason": "climb", "why": "loss climbing"})
    journal.append("a", "command", step=1250, seq=22, data={})
    journal.commit()
    view = JobsView(journal)
    journal.append("a", "register", step=1100, data={
        "run_id": "r1", "resumed": "resume", "resume_step": 1100, "applied_seq": 22})
    journal.commit()
    (line,) = view.lines(all_jobs=True)
    assert line.rollbacks == 1
    assert line.last_decision.startswith("rollback 1250 -> 1100: climb")
    # A save made before the rollback was applied (seq 22 not applied) sets it aside.
    journal.append("a", "register", step=1100, data={
        "run_id": "r1", "resumed": "resume", "resume_step": 1100, "applied_seq": 21,
        "resume_id": "second"})
    journal.commit()
    (line,) = view.lines(all_jobs=True)
    assert line.rollbacks == 0 and line.last_decision.startswith("resumed from the save")
