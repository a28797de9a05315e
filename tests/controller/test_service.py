"""The controller's message handling, driven with frames (no sockets)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from trimtab.client import wire
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.journal import Journal
from trimtab.controller.service import Controller

PEER = b"peer-1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, **over) -> tuple[Controller, Clock]:
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"), metrics_port=0,
        policies=[PolicySpec(name="spike_guard")],
        governor={"lr": {"min_rel": 1e-3, "max_rel": 10, "max_step_ratio": 2,
                         "cooldown_steps": 0}},
        **over)
    clock = Clock()
    return Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry(), clock=clock), clock


def register(job="j1", run_id="r1", applied_seq=0) -> bytes:
    return wire.encode(wire.Register(
        job=job, run_id=run_id, report_every=10, applied_seq=applied_seq,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"),
        knobs=wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0)))


def report(seq, loss=1.0, job="j1", nonfinite=0, applied_seq=0, lr=0.1) -> bytes:
    return wire.encode(wire.Report(
        job=job, seq=seq, step=seq * 10, window=10, loss_mean=loss, loss_last=loss,
        loss_min=loss, loss_max=loss, grad_norm_mean=1.0, grad_norm_max=1.0, grad_norm_std=0.0,
        nonfinite_grads=nonfinite, knobs=wire.Knobs(lr=lr, momentum=0.9, weight_decay=0.0),
        applied_seq=applied_seq))


def decoded(replies):
    return [wire.decode(frame) for _, frame in replies]


def test_register_is_answered_and_journaled(tmp_path):
    ctl, _ = make(tmp_path)
    (reply,) = decoded(ctl.handle(PEER, register()))
    assert isinstance(reply, wire.Heartbeat) and reply.job == "j1"
    assert [e.kind for e in ctl.journal.events("j1")] == ["register"]
    assert "j1" in ctl.jobs


def test_nonfinite_report_triggers_a_bounded_command_then_ack(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 4):
        assert ctl.handle(PEER, report(seq)) == []
    (cmd,) = decoded(ctl.handle(PEER, report(4, nonfinite=3)))
    assert isinstance(cmd, wire.Command) and cmd.seq == 1
    assert cmd.knobs.lr == pytest.approx(0.05)
    assert any("spike_guard" in r for r in cmd.reasons)
    # No new decision while a command is unacknowledged; it is re-sent when not applied.
    assert ctl.handle(PEER, report(5, nonfinite=3)) == []
    (again,) = decoded(ctl.handle(PEER, report(6, nonfinite=3)))
    assert again == cmd
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=60,
                                          knobs=wire.Knobs(lr=0.05, momentum=0.9))))
    assert ctl.jobs["j1"].knobs.lr == pytest.approx(0.05)
    kinds = [e.kind for e in ctl.journal.events("j1")]
    assert kinds.count("command") == 1 and "decision" in kinds and kinds[-1] == "ack"


def test_unknown_job_and_client_only_types_are_refused_and_counted(tmp_path):
    ctl, _ = make(tmp_path)
    (err,) = decoded(ctl.handle(PEER, report(1, job="ghost")))
    assert isinstance(err, wire.Error) and err.code == "unknown_job" and err.job == "ghost"
    cmd = wire.encode(wire.Command(job="ghost", seq=1, knobs=wire.Knobs(lr=1.0)))
    (err,) = decoded(ctl.handle(PEER, cmd))
    assert err.code == "unexpected"
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_message_errors_total{code="unknown_job"} 1.0' in text
    assert 'trimtab_message_errors_total{code="unexpected"} 1.0' in text


def test_job_series_end_with_bye_and_when_lost(tmp_path):
    ctl, clock = make(tmp_path, job_timeout_s=5.0)
    ctl.handle(PEER, register("a"))
    ctl.handle(PEER, register("b"))
    ctl.handle(PEER, report(1, job="a"))
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_knob_value{job="a",knob="lr"} 0.1' in text
    assert "trimtab_jobs_connected 2.0" in text
    ctl.handle(PEER, wire.encode(wire.Bye(job="a", step=10)))
    clock.t += 6
    ctl.tick()
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'job="a"' not in text and 'job="b"' not in text
    assert "trimtab_jobs_connected 0.0" in text
    assert "trimtab_jobs_lost_total 1.0" in text
    assert [e.kind for e in ctl.journal.events("b")][-1] == "lost"


def test_restarted_controller_resumes_job_state_from_the_journal(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 8):
        ctl.handle(PEER, report(seq, loss=1.0 + 0.01 * seq))
    before = ctl.jobs["j1"].state_dict()
    ctl.journal.close()  # the process dies; the file stays

    ctl2, _ = make(tmp_path)
    ctl2.handle(b"peer-2", register())
    after = ctl2.jobs["j1"].state_dict()
    assert after == before
    assert ctl2.journal.events("j1", "register")[-1].data["resumed"] == "journal"


def test_a_new_run_of_the_same_job_starts_fresh(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register(run_id="r1"))
    for seq in range(1, 5):
        ctl.handle(PEER, report(seq))
    ctl.handle(PEER, register(run_id="r2"))
    assert ctl.jobs["j1"].reports_seen == 0
    assert ctl.journal.events("j1", "register")[-1].data["resumed"] == "new"
