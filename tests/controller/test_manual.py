"""A person steers a job (``trimtab set``, ``pause``, ``resume``, ``rollback``), driven with
frames through the controller's handler (no sockets; the CLI and a real training run are
in tests/integration/test_operate.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.controller.state import JobState
from trimtab.protocol import wire

PEER, OPERATOR = b"job-peer", b"operator-peer"
STEP_DECAY = PolicySpec(name="step_decay", config={"step_size": 100, "gamma": 0.5})
BASE_LR = 0.1


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, policies=("spike_guard", "divergence_guard"), **over) -> Controller:
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"), metrics_port=0,
        policies=[PolicySpec(name=n) if isinstance(n, str) else n for n in policies],
        governor={"lr": {"min_rel": 0.01, "max_rel": 4, "max_step_ratio": 2,
                         "cooldown_steps": 50, "max": 0.3},
                  "momentum": {"min": 0.5, "max": 0.99}},
        **{"rollback": {"stable_window_steps": 30, "stable_min_reports": 3}, **over})
    return Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry(), clock=Clock())


def in_force(lr: float = 1.0, base_lr: float = BASE_LR, momentum: float = 0.9) -> dict:
    return {"knobs": wire.Knobs(lr=base_lr * lr, momentum=momentum, weight_decay=0.0),
            "base": wire.Knobs(lr=base_lr, momentum=momentum, weight_decay=0.0),
            "scale": wire.Scale(lr=lr)}


def register(job="j1") -> bytes:
    return wire.encode(wire.Register(
        job=job, run_id="r1", report_every=10,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"),
        checkpoints=[0], **in_force()))


def report(seq, loss=1.0, nonfinite=0, applied_seq=0, lr=1.0, momentum=0.9, stable=None,
           base_lr=BASE_LR) -> bytes:
    step = seq * 10
    return wire.encode(wire.Report(
        job="j1", seq=seq, step=step, window=10, loss_mean=loss, loss_last=loss, loss_min=loss,
        loss_max=loss, grad_norm_mean=1.0, grad_norm_max=1.0, grad_norm_std=0.0,
        nonfinite_grads=nonfinite, nonfinite_losses=nonfinite, applied_seq=applied_seq,
        checkpoints=[s for s in (0, 20, 40, 60, 80) if s <= step], stable_step=stable,
        **in_force(lr, base_lr, momentum)))


def tick(ctl, seq, **kw) -> list[wire.Command]:
    """A report that says every command sent so far is applied (its mark taken); the
    commands it brings."""
    state = ctl.jobs["j1"]
    rb = state.rollback
    kw.setdefault("stable", rb.pending_mark if rb.pending_mark is not None else rb.stable_step)
    out = decoded(ctl.handle(PEER, report(seq, applied_seq=state.command_seq, **kw)))
    return [m for _, m in out if isinstance(m, wire.Command)]


def operate(action, who="alice", reason="testing", **kw) -> bytes:
    return wire.encode(wire.Operate(job="j1", action=action, who=who, reason=reason,
                                    request="r-1", **kw))


def decoded(replies):
    return [(peer, wire.decode(frame)) for peer, frame in replies]


def answer(ctl, frame, user=None) -> tuple[wire.Operated, list[wire.Command]]:
    """The operator's answer, and the commands sent to the job."""
    out = decoded(ctl.handle(OPERATOR, frame, user))
    (reply,) = [m for peer, m in out if peer == OPERATOR]
    assert isinstance(reply, wire.Operated) and reply.request == "r-1"
    commands = [m for peer, m in out if peer == PEER]
    assert all(isinstance(c, wire.Command) for c in commands)
    return reply, commands


def manual_events(ctl):
    return [e.data for e in ctl.journal.events("j1") if e.kind == "manual"]


def test_set_lr_sends_the_multiplier_for_the_value_asked_and_journals_who_and_why(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    ctl.handle(PEER, report(1))
    reply, (cmd,) = answer(ctl, operate("set", knobs=wire.Knobs(lr=0.03, momentum=0.8),
                                        reason="loss plateaued"))
    assert reply.ok and reply.seq == cmd.seq
    # lr 0.03 on the loop's own 0.1: the multiplier 0.3; momentum absolute.
    assert cmd.scale.lr == pytest.approx(0.3) and cmd.knobs.momentum == pytest.approx(0.8)
    assert "0.03" in reply.detail and f"command {cmd.seq} sent" in reply.detail
    (ev,) = manual_events(ctl)
    assert ev["action"] == "set" and ev["who"] == "alice" and ev["reason"] == "loss plateaued"
    assert ev["ok"] and ev["asked"]["lr"] == pytest.approx(0.3)
    cmd_ev = [e for e in ctl.journal.events("j1") if e.kind == "command"][-1]
    assert cmd_ev.seq == cmd.seq and any("by manual" in r and "alice" in r
                                   for r in cmd_ev.data["reasons"])
    # The ack says it is in force; a report then carries it.
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=11,
                                          **in_force(0.3, momentum=0.8))))
    assert ctl.jobs["j1"].knobs.lr == pytest.approx(0.3)
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_operator_actions_total{action="set",job="j1"} 1.0' in text
    assert 'trimtab_decisions_total{direction="down",job="j1",knob="lr",policy="manual"} 1.0' \
        in text
    assert 'trimtab_operator_requests_total{action="set",outcome="done"} 1.0' in text


def test_a_value_out_of_bounds_is_refused_naming_it_and_the_range_and_nothing_is_sent(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    ctl.handle(PEER, report(1))
    seq = ctl.jobs["j1"].command_seq
    # Above max_rel 4 x the loop's 0.1 (0.4)... and above the lr cap 0.3 below it.
    reply, sent = answer(ctl, operate("set", knobs=wire.Knobs(lr=0.5, momentum=0.8)))
    assert not reply.ok and sent == [] and reply.seq is None
    assert "lr=0.5" in reply.detail and "[0.001 (x0.01), 0.4 (x4)]" in reply.detail
    reply, sent = answer(ctl, operate("set", scale=wire.ScaleTargets(lr=3.5)))
    assert not reply.ok and sent == [] and "above the lr cap 0.3" in reply.detail
    reply, sent = answer(ctl, operate("set", knobs=wire.Knobs(momentum=0.3)))
    assert not reply.ok and "momentum=0.3 is out of the job's bounds [0.5, 0.99]" in reply.detail
    state = ctl.jobs["j1"]
    assert state.command_seq == seq
    assert state.memory["momentum"].last_change_step is None  # nothing half-applied
    assert [e["ok"] for e in manual_events(ctl)] == [False, False, False]
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_operator_requests_total{action="set",outcome="refused"} 3.0' in text
    assert 'trimtab_operator_actions_total{action="set",job="j1"} 0.0' in text


def test_a_persons_change_starts_the_cooldown_so_no_policy_moves_it_straight_back(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    ctl.handle(PEER, report(1))
    reply, (cmd,) = answer(ctl, operate("set", scale=wire.ScaleTargets(lr=0.5)))
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=11, **in_force(0.5))))
    # A non-finite report: the spike guard asks for a cut; inside the 50-step cooldown of
    # the person's change, the governor holds it.
    out = decoded(ctl.handle(PEER, report(2, nonfinite=1, applied_seq=cmd.seq, lr=0.5)))
    assert not any(isinstance(m, wire.Command) and m.scale.lr for _, m in out)
    decision = [e for e in ctl.journal.events("j1") if e.kind == "decision"][-1].data
    assert "cooldown" in decision["knobs"]["lr"]["limits"]


def test_pause_stops_the_policies_and_keeps_the_safety_rollback_and_resume_ends_it(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 8):
        tick(ctl, seq)
    reply, sent = answer(ctl, operate("pause", reason="investigating"))
    assert reply.ok and sent == [] and "paused at step 70" in reply.detail
    assert ctl.jobs["j1"].paused["who"] == "alice"
    # A loss spike: the spike guard's cut is journaled, not acted on.
    for seq in range(8, 14):
        tick(ctl, seq)
    assert [c for c in tick(ctl, 14, loss=50.0) if c.scale.lr] == []
    proposals = [e for e in ctl.journal.events("j1") if e.kind == "proposal"]
    assert [e.step for e in proposals if e.data["policy"] == "spike_guard"] == [140]
    # Non-finite values: the divergence guard's rollback still goes out.
    cmds = tick(ctl, 15, nonfinite=10) or tick(ctl, 16, nonfinite=10)
    # To the newest stable checkpoint, or, with only the last resort stable, to the
    # newest one with healthy reports after it (rollback_rules._young).
    target = cmds[-1].rollback_to if cmds else None
    assert target is not None and target in ctl.jobs["j1"].rollback.checkpoints
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_job_paused{job="j1"} 1.0' in text
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmds[-1].seq, step=target,
                                          restored_step=target, **in_force(0.5))))
    # Resume: the policies act again.
    reply, _ = answer(ctl, operate("resume", reason="done looking"))
    assert reply.ok and ctl.jobs["j1"].paused is None
    reply, _ = answer(ctl, operate("resume"))
    assert not reply.ok and reply.detail == "not paused"
    assert [(e["action"], e["ok"]) for e in manual_events(ctl)] == [
        ("pause", True), ("resume", True), ("resume", False)]


def test_a_spike_while_not_paused_is_acted_on(tmp_path):
    """The other half of the pause test: the same spike, not paused, cuts the lr."""
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 14):
        tick(ctl, seq)
    assert [c.scale.lr for c in tick(ctl, 14, loss=50.0) if c.scale.lr] == [0.5]


def test_pause_is_kept_across_a_controller_restart(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    ctl.handle(PEER, report(1))
    answer(ctl, operate("pause"))
    ctl.close()
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    assert ctl.jobs["j1"].paused["who"] == "alice"
    state = JobState.from_state_dict(ctl.jobs["j1"].state_dict())
    assert state.paused["reason"] == "testing" and state.operator_actions == {"pause": 1}


def test_pause_holds_live_schedules_at_their_value_now(tmp_path):
    ctl = make(tmp_path, policies=(STEP_DECAY,), live_schedules=True)
    replies = decoded(ctl.handle(PEER, register()))
    (sched,) = [m for _, m in replies if isinstance(m, wire.Command)]
    assert sched.schedules and sched.schedules[0].knob == "lr"
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=0, **in_force())))
    ctl.handle(PEER, report(1, applied_seq=1))
    spec = ctl.jobs["j1"].live["lr"]
    reply, (cmd,) = answer(ctl, operate("pause"))
    assert reply.ok and cmd.schedules == [] and cmd.scale.lr == pytest.approx(spec.value(10))
    assert ctl.jobs["j1"].live == {} and "live schedules stopped" in reply.detail


def test_set_stops_a_live_schedule_on_its_knob(tmp_path):
    ctl = make(tmp_path, policies=(STEP_DECAY,), live_schedules=True)
    ctl.handle(PEER, register())
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=0, **in_force())))
    reply, (cmd,) = answer(ctl, operate("set", knobs=wire.Knobs(lr=0.05)))
    assert reply.ok and cmd.schedules == [] and cmd.scale.lr == pytest.approx(0.5)
    assert "live schedule on lr stopped" in reply.detail


def test_set_carries_the_changes_of_a_command_still_pending(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in (1, 2, 3):
        tick(ctl, seq)
    (first,) = tick(ctl, 4, nonfinite=1)  # spike guard: lr x0.5
    assert first.scale.lr == pytest.approx(0.5)
    reply, (cmd,) = answer(ctl, operate("set", knobs=wire.Knobs(momentum=0.8)))
    # The client keeps only the newest command: the pending lr cut travels with it.
    assert cmd.seq == first.seq + 1 and cmd.scale.lr == pytest.approx(0.5)
    assert cmd.knobs.momentum == pytest.approx(0.8)
    assert [e.data["supersedes"] for e in ctl.journal.events("j1")
            if e.kind == "command"][-1] == first.seq


def test_rollback_to_a_named_checkpoint_and_to_the_newest_stable_one(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 6):
        ctl.handle(PEER, report(seq))
    reply, sent = answer(ctl, operate("rollback", to_step=30))
    assert not reply.ok and sent == []
    assert "no restorable checkpoint at step 30 (listed: 0, 20, 40)" in reply.detail
    reply, (cmd,) = answer(ctl, operate("rollback", to_step=20, reason="bad data shard"))
    assert reply.ok and cmd.rollback_to == 20 and "to checkpoint 20" in reply.detail
    rb_ev = [e.data for e in ctl.journal.events("j1") if e.kind == "rollback"][-1]
    assert rb_ev["reason"] == "manual" and rb_ev["policy"] == "manual" and rb_ev["level"] == 0
    # A second request while the first is not acknowledged: refused, nothing replaced.
    reply, sent = answer(ctl, operate("set", knobs=wire.Knobs(momentum=0.8)))
    assert not reply.ok and sent == [] and "not acknowledged yet" in reply.detail
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=20, restored_step=20,
                                          **in_force())))
    assert [e.data["restored_step"] for e in ctl.journal.events("j1")
            if e.kind == "restored"] == [20]
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_rollbacks_total{job="j1",reason="manual"} 1.0' in text
    assert 'trimtab_operator_actions_total{action="rollback",job="j1"} 1.0' in text


def test_rollback_without_a_step_goes_to_a_checkpoint_whose_mark_is_on_its_way(tmp_path):
    """A person's rollback ordered while a stable mark is sent and not acknowledged goes to
    that checkpoint and carries the mark again, as the guard's own rollbacks do: the client
    may have applied the mark and let the older stable checkpoint go (a trial: the
    rollback went to 100, dropping the mark of 200, and lost 300 steps). No health
    warm-up: these reports count as healthy evidence from the first."""
    ctl = make(tmp_path, rollback={"stable_window_steps": 30, "stable_min_reports": 3,
                                   "health": {"warmup_reports": 0}})
    ctl.handle(PEER, register())
    for seq in range(1, 7):
        tick(ctl, seq)
    assert ctl.jobs["j1"].rollback.stable == [0, 20]
    (mark,) = tick(ctl, 7)
    assert mark.mark_stable == 40  # sent; the next report has not said it is applied
    reply, (cmd,) = answer(ctl, operate("rollback", reason="bad shard"))
    assert reply.ok and (cmd.rollback_to, cmd.mark_stable) == (40, 40)


def test_rollback_without_a_step_needs_a_stable_checkpoint(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    reply, sent = answer(ctl, operate("rollback"))
    assert not reply.ok and sent == [] and "no stable checkpoint" in reply.detail
    assert "--to STEP" in reply.detail


def test_an_unknown_job_and_a_non_operator_key_are_refused(tmp_path):
    ctl = make(tmp_path)
    reply, _ = answer(ctl, operate("pause"))
    assert not reply.ok and "not live" in reply.detail
    ctl.handle(PEER, register(), user="job-key")
    # CURVE on and no operator keys configured: nobody steers.
    reply, _ = answer(ctl, operate("pause"), user="ops-key")
    assert not reply.ok and "not an operator key" in reply.detail
    ctl.operators = lambda: {"ops-key": "bob"}
    reply, _ = answer(ctl, operate("pause"), user="job-key")
    assert not reply.ok and "not an operator key" in reply.detail
    reply, _ = answer(ctl, operate("pause"), user="ops-key")
    assert reply.ok
    assert manual_events(ctl)[-1]["key"] == "bob"


@pytest.mark.parametrize("kw, why", [
    ({"action": "set"}, "name at least one knob"),
    ({"action": "pause", "knobs": wire.Knobs(lr=0.1)}, "takes no knob values"),
    ({"action": "set", "knobs": wire.Knobs(lr=0.1), "scale": wire.ScaleTargets(lr=0.5)},
     "both as a value and as a multiplier"),
    ({"action": "pause", "to_step": 3}, "to_step is for rollback only"),
])
def test_a_malformed_request_is_refused_with_its_cause(kw, why):
    with pytest.raises(ValueError, match=why):
        wire.Operate(job="j1", who="a", reason="r", **kw)


def test_a_rerun_of_the_journal_asks_what_people_asked_and_sends_the_same_commands(tmp_path):
    from trimtab.controller.replay import rerun, trace_records

    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 5):
        tick(ctl, seq)
    answer(ctl, operate("set", knobs=wire.Knobs(lr=0.05, momentum=0.8)))
    answer(ctl, operate("set", knobs=wire.Knobs(lr=5.0)))  # refused: asked again, refused
    for seq in range(5, 9):
        tick(ctl, seq)
    answer(ctl, operate("rollback", to_step=40))
    live = [e for e in ctl.journal.events("j1") if e.kind == "command"]
    trace = trace_records(ctl.journal, "j1")
    assert [r.kind for r in trace].count("manual") == 3
    again = rerun(trace, ctl.config)
    assert [(c.seq, c.scale.lr, c.knobs.momentum, c.rollback_to) for c in again] == [
        (e.seq, e.data["scale"].get("lr"), e.data["knobs"].get("momentum"),
         e.data["rollback_to"]) for e in live]
    assert any(c.rollback_to == 40 for c in again) and any(c.knobs.momentum for c in again)


def test_a_person_waiting_hears_the_values_the_job_used_once_it_applied_them(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    tick(ctl, 1)
    reply, (cmd,) = answer(ctl, operate("set", knobs=wire.Knobs(lr=0.05), wait=True))
    assert reply.ok and not reply.applied
    # The ack: the values the step used, as the job says them, go to the person.
    out = decoded(ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=17,
                                                         **in_force(0.5)))))
    ((peer, told),) = out
    assert peer == OPERATOR and told.request == "r-1" and told.applied and told.ok
    assert told.step == 17 and told.knobs.lr == pytest.approx(0.05)
    assert told.scale.lr == pytest.approx(0.5)
    assert "applied after step 17, as its ack says: lr 0.05 (x0.5 of yours)" in told.detail
    # Told once: a repeated ack tells nobody.
    assert decoded(ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=17,
                                                         **in_force(0.5))))) == []


def test_a_person_waiting_hears_when_the_command_will_never_be_applied(tmp_path):
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    tick(ctl, 1)
    answer(ctl, operate("set", knobs=wire.Knobs(momentum=0.8), wait=True))
    out = decoded(ctl.handle(PEER, wire.encode(wire.Bye(job="j1", step=12))))
    ((peer, told),) = out
    assert peer == OPERATOR and not told.ok and not told.applied
    assert "ended (closed) before applying it" in told.detail


def test_a_rollback_that_replaces_a_command_stopping_the_schedules_stops_them_itself(tmp_path):
    """The client keeps only its newest command. The pause's command (stop the live
    schedule) is still pending when non-finite values bring a rollback, which replaces it:
    the rollback must say the schedules itself, or the client goes on following the one
    it runs, from the restored step, while the controller believes none is live (the
    hot-start run of tests/integration/test_rollback.py re-ran its range test's sweep from
    step 0 after every rollback that way, and was stranded)."""
    ctl = make(tmp_path, policies=(STEP_DECAY, "divergence_guard"), live_schedules=True)
    ctl.handle(PEER, register())
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=0, **in_force())))
    ctl.handle(PEER, report(1, applied_seq=1))
    reply, (stop,) = answer(ctl, operate("pause"))
    assert reply.ok and stop.schedules == [] and ctl.jobs["j1"].live == {}
    # The pause's command is not applied yet (applied_seq stays 1): the client still runs
    # the step-decay schedule when its steps go non-finite.
    cmds = [m for _, m in decoded(ctl.handle(PEER, report(2, nonfinite=10, applied_seq=1)))
            if isinstance(m, wire.Command)]
    (rollback,) = cmds
    assert rollback.rollback_to == 0 and rollback.seq > stop.seq
    assert rollback.schedules == [], rollback


def test_an_lr_set_for_rprop_is_refused_saying_its_lr_is_not_steered(tmp_path):
    ctl = make(tmp_path)
    frame = register().replace(b'"optimizer":"SGD"', b'"optimizer":"Rprop"')
    ctl.handle(PEER, frame)
    ctl.handle(PEER, report(1))
    reply, sent = answer(ctl, operate("set", scale=wire.ScaleTargets(lr=0.5)))
    assert not reply.ok and sent == []
    assert "out of the job's bounds [0.1 (x1), 0.1 (x1)]" in reply.detail
    assert "(Rprop reads its lr only at its first step: its lr is not steered)" in reply.detail


def test_a_planned_rollback_is_logged_at_info_not_as_a_warning(tmp_path, caplog):
    """A sweep trial: a 1000-trial study logged two WARNINGs per range test for rollbacks
    it planned (its start and its return). A planned rollback (level 0: a phase's, or a
    person's to a named checkpoint) is logged at INFO; a fault's stays a WARNING."""
    ctl = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 6):
        ctl.handle(PEER, report(seq))
    with caplog.at_level("INFO", logger="trimtab.controller"):
        reply, (cmd,) = answer(ctl, operate("rollback", to_step=20, reason="bad data shard"))
        ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=20, restored_step=20,
                                              **in_force())))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records
             if "rolled back from step" in r.getMessage()
             or "planned rollback" in r.getMessage()]
    assert lines and all(level == "INFO" for level, _ in lines), lines
    assert any("rolled back from step 50 to 20 (manual, level 0)" in m for _, m in lines), lines
