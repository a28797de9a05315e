"""A run resumed in a new process from the user's checkpoint (``guard.load_state_dict``):
the controller follows it, driven with frames (no sockets)."""

from __future__ import annotations

import pytest

from trimtab.controller.journal import Journal
from trimtab.protocol import wire

from .test_handler import PEER, decoded, in_force, make

FACTS = wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD", dtype="float32",
                        device="cpu")


def register(run_id="r1", step=0, applied_seq=0, resume=0, checkpoints=(), stable=None,
             lr=1.0, resume_id=None, keep=None) -> bytes:
    return wire.encode(wire.Register(
        job="j1", run_id=run_id, step=step, report_every=10, applied_seq=applied_seq,
        facts=FACTS, resume=resume, resume_id=resume_id, checkpoints=list(checkpoints),
        stable_step=stable, schedules=[], keep=keep, **in_force(lr)))


def report(seq, step, loss=1.0, nonfinite=0, applied_seq=0, lr=1.0, checkpoints=(),
           stable=None) -> bytes:
    return wire.encode(wire.Report(
        job="j1", seq=seq, step=step, window=10, loss_mean=loss, loss_last=loss, loss_min=loss,
        loss_max=loss, grad_norm_mean=1.0, grad_norm_max=1.0, grad_norm_std=0.0,
        nonfinite_grads=nonfinite, applied_seq=applied_seq, checkpoints=list(checkpoints),
        stable_step=stable, **in_force(lr)))


def _first_run(ctl):
    """r1 trains to step 300 with checkpoints every 100; a non-finite window at step 250
    cuts the lr (command 1, applied); stable marks come with the healthy windows."""
    ctl.handle(PEER, register(checkpoints=[0]))
    stable, applied, lr = None, 0, 1.0
    for seq in range(1, 31):
        step = seq * 10
        listed = [s for s in (0, 100, 200, 300) if s <= step]
        for cmd in decoded(ctl.handle(PEER, report(seq, step, nonfinite=3 if step == 250 else 0,
                                                   applied_seq=applied, lr=lr,
                                                   checkpoints=listed, stable=stable))):
            if isinstance(cmd, wire.Command):
                applied = cmd.seq
                lr = cmd.scale.lr if cmd.scale.lr is not None else lr
                stable = cmd.mark_stable if cmd.mark_stable is not None else stable
                ctl.handle(PEER, wire.encode(wire.Ack(
                    job="j1", seq=cmd.seq, step=step, **in_force(lr))))
    return applied, lr


def test_a_run_resumed_from_an_older_checkpoint_is_followed_from_there(tmp_path):
    ctl, _ = make(tmp_path)
    applied, lr = _first_run(ctl)
    st = ctl.jobs["j1"]
    assert lr == pytest.approx(0.5) and st.step == 300 and st.rollback.stable
    seq_before = st.command_seq
    st.validations.append((250, 0.9))  # validation results of the path about to be left
    st.validations_ema.append((250, 0.8))
    # The process is preempted. A new one attaches (a new run id, before it loads the
    # user's state) and then resumes the saved run at step 120, saved before the cut.
    ctl.handle(PEER, register(run_id="fresh"))
    assert ctl.jobs["j1"].run_id == "fresh"
    replies = decoded(ctl.handle(PEER, register(step=120, applied_seq=0, resume=1,
                                                checkpoints=[120], lr=1.0)))
    st = ctl.jobs["j1"]
    reg = ctl.journal.events("j1", "register")[-1]
    assert reg.data["resumed"] == "resume" and reg.data["resume"] == 1
    # The run's state came back (from the retired runs), and went back to step 120: what
    # was seen after it is set aside, the knobs are the registration's (the cut at step
    # 250 never happened for this process), and the old stable marks are gone.
    assert st.run_id == "r1" and st.resumes == 1 and st.step == 120
    assert all(s.step <= 120 for s in st.history) and st.last_report is None
    assert all(s <= 120 for s, _ in (*st.validations, *st.validations_ema))
    assert st.knobs.lr == 1.0 and st.applied_seq == 0
    assert st.rollback.checkpoints == [120] and st.rollback.stable == []
    assert st.pending_command is None
    assert not any(isinstance(r, wire.Command) and r.seq <= seq_before for r in replies)
    # The resumed process numbers its reports from its save: accepted, observed; the
    # snapshot of the resumed state is marked stable with it (the client acks the mark).
    out = decoded(ctl.handle(PEER, report(13, 130, checkpoints=[120])))
    assert not any(isinstance(r, wire.Error) for r in out)
    assert st.last_report is not None and st.last_report.step == 130
    (mark,) = [r for r in out if isinstance(r, wire.Command)]
    assert mark.mark_stable == 120 and mark.seq > seq_before
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=mark.seq, step=130, **in_force(1.0))))
    # A fault now: the next command continues the sequence, and cuts from the
    # registration's multiplier.
    (cmd,) = [r for r in decoded(ctl.handle(PEER, report(14, 140, nonfinite=3,
                                                         applied_seq=mark.seq,
                                                         checkpoints=[120], stable=120)))
              if isinstance(r, wire.Command)]
    assert cmd.seq > mark.seq and cmd.scale.lr == pytest.approx(0.5)


def test_a_command_the_old_process_never_applied_is_journaled_withdrawn_at_the_resume(
        tmp_path):
    """A command pending when the process was preempted (here the guard's LR cut for a
    non-finite window at step 310, never acknowledged) is set aside by the resume: the
    journal says so (a withdrawn row naming it and why), and `trimtab jobs` no longer shows
    the decisions after the save as the job's last."""
    from trimtab.controller.jobs_view import JobsView

    ctl, _ = make(tmp_path)
    applied, lr = _first_run(ctl)
    out = decoded(ctl.handle(PEER, report(31, 310, nonfinite=3, applied_seq=applied, lr=lr,
                                          checkpoints=[100, 200, 300], stable=200)))
    (cmd,) = [r for r in out if isinstance(r, wire.Command)]
    assert ctl.jobs["j1"].pending_command == cmd
    view = JobsView(ctl.journal)
    (line,) = view.lines(all_jobs=True)
    assert line.last_decision_step == 310
    ctl.handle(PEER, register(run_id="fresh"))
    ctl.handle(PEER, register(step=120, applied_seq=0, resume=1, checkpoints=[120]))
    assert ctl.jobs["j1"].pending_command is None
    (gone,) = ctl.journal.events("j1", "withdrawn")
    assert gone.seq == cmd.seq and gone.step == 120
    assert "resumed at step 120" in gone.data["why"] and "the resumed run never applies it" in \
        gone.data["why"]
    (line,) = view.lines(all_jobs=True)
    assert line.last_decision_step == 120 and "set aside" in line.last_decision
    # Registering again (a reconnect of the resumed process) withdraws nothing more.
    ctl.handle(PEER, register(step=120, applied_seq=0, resume=1, checkpoints=[120]))
    assert len(ctl.journal.events("j1", "withdrawn")) == 1


def test_a_resume_from_a_save_inside_a_spike_is_not_marked_stable_until_a_report_is_not(
        tmp_path):
    """A user's save at step 300 landed inside a burst of bad batches: the first report
    after the resume is a spike against the run's history from before it. Its snapshot is
    no rollback target then (rollbacks to it replay the burst's aftermath and cut the LR
    each time: a trial ended 1.5x the bare resumed run); it is marked stable, as the last
    resort, with the first report that is not a spike, and its words say why it was.
    (spike_guard alone, no safety net: the marking rule, no rollback asked for. With the
    safety net, this history, clean up to the save, sends the spike back to the save.)"""
    ctl, _ = make(tmp_path, safety_net=False)
    applied, lr = _first_run(ctl)
    ctl.handle(PEER, register(run_id="fresh"))
    ctl.handle(PEER, register(step=300, applied_seq=applied, resume=1, checkpoints=[300],
                              lr=lr))
    st = ctl.jobs["j1"]
    assert st.rollback.last_resort == [300]
    out = [r for r in decoded(ctl.handle(PEER, report(31, 310, loss=40.0, applied_seq=applied,
                                                      lr=lr, checkpoints=[300])))
           if isinstance(r, wire.Command)]
    assert st.health is not None and st.health.cause == "loss_spike"
    assert all(c.mark_stable is None and c.rollback_to is None for c in out), out
    for c in out:
        applied = c.seq
        lr = c.scale.lr if c.scale.lr is not None else lr
        ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=c.seq, step=310, **in_force(lr))))
    (mark,) = [r for r in decoded(ctl.handle(PEER, report(32, 320, loss=1.0, applied_seq=applied,
                                                         lr=lr, checkpoints=[300])))
               if isinstance(r, wire.Command)]
    assert st.health is None and mark.mark_stable == 300
    assert "the rollback target of last resort" in mark.reasons[-1]


def test_the_same_resume_registering_again_sets_nothing_aside_twice(tmp_path):
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    ctl.handle(PEER, register(step=120, resume=1, checkpoints=[120]))
    for seq in range(13, 20):
        ctl.handle(PEER, report(seq, seq * 10, checkpoints=[120]))
    st = ctl.jobs["j1"]
    seen = len(st.history)
    # A reconnect of the resumed process: the same resume count, a later step.
    ctl.handle(PEER, register(step=190, resume=1, checkpoints=[120]))
    assert st.step == 190 and len(st.history) == seen
    assert ctl.journal.events("j1", "register")[-1].data["resumed"] == "live"


def test_a_second_process_resumed_from_the_same_save_is_followed_as_a_resume(tmp_path):
    """Preempted twice before the next save: two processes resume from the same saved state,
    so both register with the same resume count. Each is a new resume (its own resume
    id), whether the controller still holds the run live or takes it from its journal."""
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    for ended in (False, True):
        ctl.handle(PEER, register(run_id="fresh"))  # the process attaches, then loads
        ctl.handle(PEER, register(step=120, resume=1, resume_id="p1", checkpoints=[120]))
        for seq in range(13, 20):
            ctl.handle(PEER, report(seq, seq * 10, checkpoints=[120, 150]))
        if ended:
            ctl.handle(PEER, wire.encode(wire.Bye(job="j1", step=190)))
        ctl.handle(PEER, register(run_id="fresh"))
        ctl.handle(PEER, register(step=120, resume=1, resume_id="p2", checkpoints=[120]))
        reg = ctl.journal.events("j1", "register")[-1]
        st = ctl.jobs["j1"]
        assert reg.data["resumed"] == "resume", ended
        assert st.run_id == "r1" and st.step == 120 and st.last_report is None
        assert all(s.step <= 120 for s in st.history)
        # The second process numbers its reports from the save, as the first did: observed.
        out = decoded(ctl.handle(PEER, report(13, 130, checkpoints=[120])))
        assert not any(isinstance(r, wire.Error) for r in out), out
        assert st.last_report is not None and st.last_report.step == 130
        # A reconnect of that process (the same resume id) is no new resume.
        ctl.handle(PEER, register(step=130, resume=1, resume_id="p2", checkpoints=[120]))
        assert ctl.journal.events("j1", "register")[-1].data["resumed"] == "live"
        assert st.step == 130


def test_the_resumed_snapshot_is_marked_stable_with_the_first_report_after_the_resume(
        tmp_path):
    """The snapshot a resumed process takes of the state it loaded is its rollback target of
    last resort, as the one taken at attach is for a new run: marked stable with the first
    report, so that a spike soon after the resume can be rolled back."""
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    st = ctl.jobs["j1"]
    assert st.rollback.stable  # the first process had marks; the new one holds none of them
    ctl.handle(PEER, register(run_id="fresh"))
    ctl.handle(PEER, register(step=120, resume=1, resume_id="p1", checkpoints=[120]))
    st = ctl.jobs["j1"]
    assert st.rollback.stable == [] and st.rollback.checkpoints == [120]
    cmds = [r for r in decoded(ctl.handle(PEER, report(13, 130, checkpoints=[120])))
            if isinstance(r, wire.Command)]
    assert [c.mark_stable for c in cmds] == [120]
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmds[0].seq, step=130,
                                          **in_force(1.0))))
    assert st.rollback.stable == [120]


def test_a_restarted_controller_follows_a_resume_from_its_journal(tmp_path):
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    ctl.handle(PEER, register(run_id="fresh"))
    ctl.close()
    # A new controller on the same journal: the resumed run is found among the retired.
    again, _ = make(tmp_path)
    again.handle(PEER, register(step=200, resume=1, checkpoints=[200], stable=None))
    st = again.jobs["j1"]
    assert st.run_id == "r1" and st.step == 200 and st.reports_seen == 30
    assert again.journal.events("j1", "register")[-1].data["resumed"] == "resume"


def test_a_registration_lists_the_clients_checkpoints_and_adopts_its_stable_mark(tmp_path):
    """A controller that starts after the run learns its checkpoints and stable mark from
    the registration: a rollback can go to it before the first report."""
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register(step=400, checkpoints=[200, 300, 400], stable=300))
    rb = ctl.jobs["j1"].rollback
    assert rb.checkpoints == [200, 300, 400] and rb.stable == [300]
    (ev,) = ctl.journal.events("j1", "stable")
    assert (ev.step, ev.data["source"]) == (300, "register")


def test_retired_run_states_are_kept_per_job_up_to_a_bound(tmp_path):
    j = Journal(str(tmp_path / "r.db"))
    for i in range(7):
        j.retire_state("a", f"run{i}", {"run_id": f"run{i}", "i": i})
    j.retire_state("b", "run0", {"run_id": "run0", "i": 99})
    assert j.load_run_state("a", "run6") == {"run_id": "run6", "i": 6}
    assert j.load_run_state("a", "run0") is None  # only the newest few are kept
    assert j.load_run_state("b", "run0")["i"] == 99
    j.close()


def test_a_resume_is_journaled_at_the_step_it_resumed_at(tmp_path, caplog):
    """Trials: a resumed process whose link came up after its first step registered at
    step 121, and the journal and `decisions` showed the resume at 121 for a resume at 120.
    A resume's registration is journaled at its resume step."""
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    reg = wire.Register(job="j1", run_id="r1", step=121, report_every=10, applied_seq=0,
                        facts=FACTS, resume=1, resume_step=120, checkpoints=[120],
                        schedules=[], **in_force(1.0))
    with caplog.at_level("INFO", logger="trimtab.controller"):
        ctl.handle(PEER, wire.encode(reg))
    event = ctl.journal.events("j1", "register")[-1]
    assert event.data["resumed"] == "resume" and event.step == 120
    assert "job j1 registered (resume), step 120" in caplog.text  # the log says so too


@pytest.mark.parametrize("started, checkpoint", [(150, 100), (250, 100), (250, 250)])
def test_a_phase_that_began_after_the_resumed_step_starts_over_there(tmp_path, started,
                                                                      checkpoint):
    """A preemption trial: the LR range test opened at step 150 and the run was resumed
    from the stable checkpoint at 100, taken before it: the client resumed with no sweep,
    the controller's phase went on ('LR range test: step -40 of 58', a sweep schedule from
    step 150 sent at step 110). A phase that began after the resumed step starts over at
    it, its checkpoint still behind the run; with its checkpoint past the resumed step it
    never happened. One under way at the resumed step goes on (the resumed state holds its
    sweep)."""
    ctl, _ = make(tmp_path)
    _first_run(ctl)
    st = ctl.jobs["j1"]
    st.step = started
    st.begin_phase("lr_range_test", checkpoint=checkpoint)
    ctl.handle(PEER, register(step=200, applied_seq=0, resume=1, checkpoints=[100, 200]))
    st = ctl.jobs["j1"]
    if started <= 200:
        assert st.phase is not None and st.phase.start_step == started
    elif checkpoint <= 200:
        assert st.phase is not None and st.phase.start_step == 200
    else:
        assert st.phase is None and "lr_range_test" not in st.phases_done


@pytest.mark.parametrize("burst_before_save", [False, True], ids=["healthy-save", "save-in-burst"])
def test_a_spike_right_after_a_resume_from_a_healthy_save_goes_back_to_it(
        tmp_path, burst_before_save):
    """A preemption re-trial: resumed from the loop's own save at step 700, the loop
    replayed its bad batches in the first window; nothing was stable yet, so the spike got
    an LR cut only and the bad updates stayed (final loss 0.0305 against 0.0041 with the
    same fault and no kill; a Trainer 1.96 against 0.74). A save this controller saw made
    in a healthy stretch is the spike's rollback target, marked with the rollback. A save
    inside a burst (a report before it unhealthy) is not: rollbacks to it replay the burst's
    aftermath (see the test above)."""
    from trimtab.controller.config import PolicySpec

    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")])
    applied, lr = _first_run(ctl)
    st = ctl.jobs["j1"]
    save = 300
    if burst_before_save:  # the last report before the save was already a spike
        ctl.handle(PEER, report(31, 310, loss=40.0, applied_seq=applied, lr=lr,
                                checkpoints=[0, 100, 200, 300], stable=st.rollback.stable_step))
        save = 310
    ctl.handle(PEER, register(run_id="fresh"))
    ctl.handle(PEER, register(step=save, applied_seq=applied, resume=1, checkpoints=[save],
                              lr=lr))
    st = ctl.jobs["j1"]
    out = [r for r in decoded(ctl.handle(PEER, report(40, save + 10, loss=40.0,
                                                      applied_seq=applied, lr=lr,
                                                      checkpoints=[save])))
           if isinstance(r, wire.Command)]
    assert st.health is not None and st.health.cause == "loss_spike"
    back = [c for c in out if c.rollback_to is not None]
    if burst_before_save:
        assert not back, out
    else:
        assert [(c.rollback_to, c.mark_stable) for c in back] == [(save, save)], out


def test_a_resume_says_which_registration_of_its_process_it_replaces(tmp_path):
    """Trials: ``attach`` registers the new process as a new run, and ``load_state_dict``
    then registers it as the resume; ``decisions`` showed a 'registered (new, run ...)' row
    before every resume with nothing to say that the process never ran as it. The resume's
    row names the run it replaces, when that registration came from the same process (one
    link) and took no step; a resume straight from a new process replaces nothing."""
    from trimtab.controller.timeline import Timeline

    ctl, clock = make(tmp_path)
    _first_run(ctl)
    clock.t += 60  # the first process was killed a minute ago
    ctl.handle(b"peer-2", register(run_id="attach-2", step=0))  # the new process attaches
    ctl.handle(b"peer-2", register(step=200, resume=1, resume_id="p2", checkpoints=[200]))
    ctl.handle(b"peer-3", register(step=200, resume=2, resume_id="p3", checkpoints=[200]))
    first, resumed, straight = ctl.journal.events("j1", "register")[-3:]
    assert first.data["resumed"] == "new" and first.data["run_id"] == "attach-2"
    assert resumed.data["resumed"] == "resume" and resumed.data["replaces"] == "attach-2"
    assert straight.data["resumed"] == "resume" and "replaces" not in straight.data
    (row,) = Timeline().feed(resumed)
    assert row.why == ("registered (resume, run r1); this process registered as run attach-2 "
                       "when it attached and took no step as it")


@pytest.mark.parametrize("kept", [False, True])
def test_a_reconnect_without_the_phases_sweep_ends_the_phase_in_place(tmp_path, kept):
    """A controller trial: killed mid-sweep and back on its journal, the controller's range
    test went on while the client no longer ran its sweep. A client alone drops a rising
    live schedule (and goes back to the lr before it); its registration on a new link then
    lists no sweep, and the phase ends where the run is, nothing found, journaled with the
    registration. A reconnect that still lists the sweep keeps the phase."""
    from trimtab.controller.timeline import Timeline

    ctl, _ = make(tmp_path)
    _first_run(ctl)
    st = ctl.jobs["j1"]
    st.begin_phase("lr_range_test", checkpoint=300)
    sweep = wire.LiveSchedule(knob="lr", pieces=[wire.SchedulePiece(
        name="exponential", params={"lr": 0.01, "gamma": 1.05}, origin=300)])
    st.live = {"lr": sweep}
    reg = wire.Register(job="j1", run_id="r1", step=340, report_every=10,
                        applied_seq=st.command_seq, facts=FACTS, checkpoints=[300],
                        stable_step=300, schedules=[sweep] if kept else [], **in_force(0.5))
    ctl.handle(PEER, wire.encode(reg))
    st = ctl.jobs["j1"]
    event = ctl.journal.events("j1", "register")[-1]
    if kept:
        assert st.phase is not None and "phase_ended" not in event.data
        return
    assert st.phase is None and st.live == {}
    done = st.phases_done["lr_range_test"]
    assert done.in_place and done.found_lr is None and done.end_step == 340
    assert event.data["phase_ended"]["policy"] == "lr_range_test"
    (row,) = Timeline().feed(event)
    assert "lr_range_test's phase ended in place, nothing found" in row.why


def _climb_after(ctl, seq0, step0, applied, lr, listed, stable, n=40, rate=0.01):
    """Reports from ``step0`` on whose loss climbs ``rate`` per report (a loop's own lr
    fault, replayed); the commands they brought, until a rollback comes."""
    out = []
    for i in range(1, n + 1):
        step = step0 + 10 * i
        got = [r for r in decoded(ctl.handle(PEER, report(
            seq0 + i, step, loss=1.0 + rate * i, applied_seq=applied, lr=lr,
            checkpoints=listed, stable=stable))) if isinstance(r, wire.Command)]
        out += got
        if any(c.rollback_to is not None for c in got):
            return out, step
    return out, None


def test_a_climb_after_a_resume_from_a_healthy_save_goes_back_to_it(tmp_path):
    """A preemption trial: killed inside a loop's own lr fault, resumed from its save
    before it, the loop replayed the fault; the climb found nothing stable but the resumed
    snapshot, which (as the run handed over) a climb did not go back to: an lr cut in place
    only, and the run ended ruined (3.46 against 3.22 when rolled back)."""
    from trimtab.controller.config import PolicySpec

    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")])
    applied, lr = _first_run(ctl)
    ctl.handle(PEER, register(step=300, applied_seq=applied, resume=1, checkpoints=[300],
                              lr=lr))
    out, at = _climb_after(ctl, 40, 300, applied, lr, [300], None)
    back = [c for c in out if c.rollback_to is not None]
    assert [c.rollback_to for c in back] == [300], out
    assert ctl.jobs["j1"].health.cause == "climb"


def _flat_to(ctl, seq, step, until, applied, lr, stable):
    """Healthy reports from ``step`` to ``until`` (a checkpoint every 50 steps, a ring of
    three), acknowledging the marks; the last seq, applied seq and stable step."""
    while step < until:
        seq, step = seq + 1, step + 10
        listed = list(range(0, step + 1, 50))[-3:]
        for cmd in decoded(ctl.handle(PEER, report(seq, step, applied_seq=applied, lr=lr,
                                                   checkpoints=listed, stable=stable))):
            if isinstance(cmd, wire.Command):
                applied = cmd.seq
                stable = cmd.mark_stable if cmd.mark_stable is not None else stable
                ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=step,
                                                      **in_force(lr))))
    return seq, applied, stable


def test_a_climb_the_old_process_was_rolled_back_for_is_judged_again_when_replayed(tmp_path):
    """A preemption trial: the controller rolled the run back for a climb to its newest
    stable checkpoint, the process was killed before it saved again, and the resumed one
    replayed the climb from its save. The set-aside rollback's lr cut, in force from its
    target inside the replayed climb's window, counted as a change there: no climb was
    judged for a full slope window, by then the loss had stopped climbing, nothing was
    proposed at all, and checkpoints inside the damage were marked stable."""
    from trimtab.controller.config import PolicySpec

    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")])
    ctl.handle(PEER, register(checkpoints=[0], keep=3))  # snapshots every 50, 3 kept
    seq, applied, stable = _flat_to(ctl, 0, 0, 800, 0, 1.0, None)
    lr = 1.0
    out, first_at = _climb_after(ctl, seq, 800, applied, lr, [700, 750, 800], stable)
    back = [c for c in out if c.rollback_to is not None]
    assert first_at is not None and 800 - back[0].rollback_to < 190, out  # inside the window
    # Killed before the rollback was acknowledged; resumed from its own save at step 800.
    ctl.handle(PEER, register(step=800, applied_seq=applied, resume=1, checkpoints=[800],
                              lr=lr))
    out, again_at = _climb_after(ctl, seq + 100, 800, applied, lr, [800], None)
    assert again_at == first_at, out  # judged as it was the first time
    (back,) = [c for c in out if c.rollback_to is not None]
    assert back.rollback_to == 800
    # At the first level (x0.5), as the first time: the withdrawn rollback never ran on the
    # resumed path, so the replay is no sign that its cut failed (a re-trial: level 2, x0.25,
    # and the run ended at 3.30 where the uninterrupted one ended at 3.22).
    assert back.scale.lr == pytest.approx(0.5) and "(level 1," in back.reasons[0], back
