"""The controller's message handling, driven with frames (no sockets)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.protocol import wire
from trimtab.protocol.ring import kept

PEER = b"peer-1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, **over) -> tuple[Controller, Clock]:
    over.setdefault("policies", [PolicySpec(name="spike_guard")])
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"), metrics_port=0,
        governor={"lr": {"min_rel": 1e-3, "max_rel": 10, "max_step_ratio": 2,
                         "cooldown_steps": 0}},
        **over)
    clock = Clock()
    return Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry(), clock=clock), clock


def in_force(lr: float = 1.0, base_lr: float = 0.1) -> dict:
    """``knobs`` (effective), ``base`` and ``scale`` with trimtab's lr multiplier ``lr`` on
    the user's own ``base_lr`` (weight decay 0 times a multiplier 1)."""
    return {"knobs": wire.Knobs(lr=base_lr * lr, momentum=0.9, weight_decay=0.0),
            "base": wire.Knobs(lr=base_lr, momentum=0.9, weight_decay=0.0),
            "scale": wire.Scale(lr=lr)}


def register(job="j1", run_id="r1", applied_seq=0, keep=None) -> bytes:
    return wire.encode(wire.Register(
        job=job, run_id=run_id, report_every=10, applied_seq=applied_seq, keep=keep,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"),
        **in_force()))


def report(seq, loss=1.0, job="j1", nonfinite=0, applied_seq=0, lr=1.0) -> bytes:
    return wire.encode(wire.Report(
        job=job, seq=seq, step=seq * 10, window=10, loss_mean=loss, loss_last=loss,
        loss_min=loss, loss_max=loss, grad_norm_mean=1.0, grad_norm_max=1.0, grad_norm_std=0.0,
        nonfinite_grads=nonfinite, applied_seq=applied_seq, **in_force(lr)))


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
    # Half the user's own lr: the multiplier 0.5, sent as a scale; no absolute lr.
    assert cmd.scale.lr == pytest.approx(0.5) and cmd.knobs.lr is None
    assert any("spike_guard" in r for r in cmd.reasons)
    # No new decision while a command is unacknowledged; it is re-sent when not applied.
    assert ctl.handle(PEER, report(5, nonfinite=3)) == []
    (again,) = decoded(ctl.handle(PEER, report(6, nonfinite=3)))
    assert again == cmd
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=60, **in_force(0.5))))
    st = ctl.jobs["j1"]
    assert st.knobs.lr == pytest.approx(0.5) and st.effective.lr == pytest.approx(0.05)
    assert st.base.lr == 0.1
    kinds = [e.kind for e in ctl.journal.events("j1")]
    assert kinds.count("command") == 1 and "decision" in kinds and kinds[-1] == "ack"
    # The journal keeps the multipliers apart from the absolute knobs, and the lr cap.
    (sent,) = ctl.journal.events("j1", "command")
    assert sent.data["scale"] == {"lr": pytest.approx(0.5)} and sent.data["knobs"] == {}
    # The lr's bounds are configured here, so none is derived: no cap on the effective lr.
    assert sent.data["lr_max"] is None and cmd.lr_max is None
    ack = ctl.journal.events("j1", "ack")[-1]
    assert (ack.data["knobs"]["lr"], ack.data["base"]["lr"], ack.data["scale"]["lr"]) == (
        pytest.approx(0.05), 0.1, 0.5)


def test_unknown_job_and_client_only_types_are_refused_and_counted(tmp_path):
    ctl, _ = make(tmp_path)
    (err,) = decoded(ctl.handle(PEER, report(1, job="ghost")))
    assert isinstance(err, wire.Error) and err.code == "unknown_job" and err.job == "ghost"
    cmd = wire.encode(wire.Command(job="ghost", seq=1, scale=wire.ScaleTargets(lr=1.0)))
    (err,) = decoded(ctl.handle(PEER, cmd))
    assert err.code == "unexpected"
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_message_errors_total{code="unknown_job"} 1.0' in text
    assert 'trimtab_message_errors_total{code="unexpected"} 1.0' in text


def test_a_job_that_ends_while_no_controller_runs_is_marked_lost_after_the_restart(tmp_path):
    """The controller stops while jobs a and b run; a ends before it is back, b registers
    again. Before, a stayed live in the journal (and ``trimtab jobs``) for good."""
    ctl, _ = make(tmp_path, job_timeout_s=5.0)
    for job in ("a", "b"):
        ctl.handle(PEER, register(job))
        ctl.handle(PEER, report(1, job=job))
    ctl.close()  # stopped (SIGTERM saves every live state), no bye from either job
    assert set(Journal(str(tmp_path / "j.db")).states(live_only=True)) == {"a", "b"}

    ctl, clock = make(tmp_path, job_timeout_s=5.0)
    # Until it is heard or marked lost, a is exported from its saved state as live, its
    # age counted from its last journaled event (a job killed while no controller ran
    # had no series at all, so no silence alert could fire for it).
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_job_live{job="a"} 1.0' in text and 'trimtab_job_step{job="a"} 10.0' in text
    assert 'trimtab_job_last_seen_age_seconds{job="a"}' in text
    clock.t += 3
    ctl.handle(PEER, register("b"))  # b's client reconnects
    ctl.tick()
    assert not ctl.journal.events("a", "lost")  # not yet: the timeout counts from the start
    clock.t += 3
    ctl.tick()
    (lost,) = ctl.journal.events("a", "lost")
    assert lost.step == 10 and lost.data["unheard"] is True
    assert not ctl.journal.events("b", "lost")
    ctl.journal.commit()
    assert set(ctl.journal.states(live_only=True)) == {"b"}
    text = generate_latest(ctl.metrics.registry).decode()
    assert "trimtab_jobs_lost_total 1.0" in text
    assert 'trimtab_job_live{job="a"} 0.0' in text and 'trimtab_job_lost{job="a"} 1.0' in text
    assert 'trimtab_job_lost{job="b"} 0.0' in text
    clock.t += 3
    ctl.handle(PEER, report(2, job="b"))
    ctl.tick()
    assert len(ctl.journal.events("a", "lost")) == 1 and not ctl.journal.events("b", "lost")


def test_job_series_end_with_bye_and_when_lost_after_the_grace(tmp_path):
    ctl, clock = make(tmp_path, job_timeout_s=5.0, metrics_grace_s=60.0)
    ctl.handle(PEER, register("a"))
    ctl.handle(PEER, register("b"))
    ctl.handle(PEER, report(1, job="a"))
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_knob_value{job="a",knob="lr"} 0.1' in text
    assert 'trimtab_job_live{job="a"} 1.0' in text
    assert "trimtab_jobs_connected 2.0" in text
    ctl.handle(PEER, wire.encode(wire.Bye(job="a", step=10)))
    clock.t += 6
    ctl.tick()
    # Both ended (a said bye, b went silent): not live, but their series stay for the
    # grace, so that a scrape sees a short job and how each one ended.
    text = generate_latest(ctl.metrics.registry).decode()
    assert "trimtab_jobs_connected 0.0" in text
    assert "trimtab_jobs_lost_total 1.0" in text
    assert [e.kind for e in ctl.journal.events("b")][-1] == "lost"
    assert 'trimtab_job_live{job="a"} 0.0' in text and 'trimtab_job_live{job="b"} 0.0' in text
    # How each ended, per job (an alert names the job lost; a bye is no loss).
    assert 'trimtab_job_lost{job="a"} 0.0' in text and 'trimtab_job_lost{job="b"} 1.0' in text
    assert 'trimtab_knob_value{job="a",knob="lr"} 0.1' in text
    # Back before the grace ends: live again, one series each.
    ctl.handle(PEER, register("b"))
    text = generate_latest(ctl.metrics.registry).decode()
    assert text.count('trimtab_job_live{job="b"}') == 1 and 'trimtab_job_live{job="b"} 1.0' in text
    clock.t += 61
    ctl.tick()
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'job="a"' not in text  # its grace is over
    assert 'trimtab_job_live{job="b"} 0.0' in text  # lost again, in its own grace


def test_a_connected_job_whose_loop_is_stuck_shows_its_reports_age(tmp_path):
    """A DDP trial: a rank stopped, rank 0 hung in its backward, and its client's thread kept
    sending heartbeats: live and healthy for good, last seen under a second ago. The age of
    the last report shows the loop made no progress."""
    ctl, clock = make(tmp_path, job_timeout_s=30.0)
    ctl.handle(PEER, register("a"))
    clock.t += 4
    ctl.handle(PEER, report(1, job="a"))
    for _ in range(10):
        clock.t += 5
        ctl.handle(PEER, wire.encode(wire.Heartbeat(job="a", step=10)))
    ctl.tick()
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_job_last_seen_age_seconds{job="a"} 0.0' in text
    assert 'trimtab_job_last_report_age_seconds{job="a"} 50.0' in text
    assert 'trimtab_job_live{job="a"} 1.0' in text
    ctl.handle(PEER, report(2, job="a"))
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_job_last_report_age_seconds{job="a"} 0.0' in text


def test_with_no_grace_series_end_at_once(tmp_path):
    ctl, _ = make(tmp_path, metrics_grace_s=0.0)
    ctl.handle(PEER, register("a"))
    ctl.handle(PEER, wire.encode(wire.Bye(job="a", step=10)))
    assert 'job="a"' not in generate_latest(ctl.metrics.registry).decode()


def test_restarted_controller_resumes_job_state_from_the_journal(tmp_path):
    ctl, clock = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 8):
        ctl.handle(PEER, report(seq, loss=1.0 + 0.01 * seq))
    clock.t += ctl.config.state_save_s  # what reports alone changed is saved once due
    ctl.tick()
    before = ctl.jobs["j1"].state_dict()
    ctl.journal.close()  # the process dies; the file stays

    ctl2, _ = make(tmp_path)
    ctl2.handle(b"peer-2", register())
    after = ctl2.jobs["j1"].state_dict()
    assert after == before
    assert ctl2.journal.events("j1", "register")[-1].data["resumed"] == "journal"


def test_a_kill_loses_at_most_state_save_s_of_signals_and_never_a_command(tmp_path):
    ctl, clock = make(tmp_path, state_save_s=5.0)
    ctl.handle(PEER, register())
    at_registration = ctl.journal.load_state("j1")
    for seq in range(1, 4):  # signals only: not saved yet
        clock.t += 1.0
        ctl.handle(PEER, report(seq))
    assert ctl.journal.load_state("j1") == at_registration
    clock.t += 1.0
    (cmd,) = decoded(ctl.handle(PEER, report(4, nonfinite=3)))
    # A command is in the journal, with the state that sent it, before it goes out.
    saved = ctl.journal.load_state("j1")
    assert saved == ctl.jobs["j1"].state_dict()
    assert saved["command_seq"] == cmd.seq == 1 and saved["awaiting_ack"]
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=1, step=40, **in_force(lr=0.5))))
    assert ctl.journal.load_state("j1") == ctl.jobs["j1"].state_dict(), "an ack saves"
    clock.t += 1.0
    ctl.handle(PEER, report(5, applied_seq=1, lr=0.5))
    clock.t += 4.9
    ctl.tick()
    assert ctl.journal.load_state("j1")["reports_seen"] == 4, "4.9 s: not due yet"
    clock.t += 0.1
    ctl.tick()  # 5 s after the report that left it unsaved
    assert ctl.journal.load_state("j1") == ctl.jobs["j1"].state_dict()
    ctl.journal.close()  # killed

    ctl2, _ = make(tmp_path)  # a restarted controller numbers its next command on
    ctl2.handle(b"peer-2", register(applied_seq=1))
    assert ctl2.jobs["j1"].command_seq == 1


def _listing(kind, step, checkpoints, **kw) -> bytes:
    """A registration (``kind`` "register") or report at ``step`` listing ``checkpoints``."""
    if kind == "register":
        return wire.encode(wire.Register(
            job="j1", run_id="r1", report_every=10, step=step, checkpoints=checkpoints,
            origin=0, facts=wire.ScaleFacts(param_count=100, group_sizes=[100],
                                            optimizer="SGD", dtype="float32", device="cpu"),
            **in_force(), **kw))
    return wire.encode(wire.Report(
        job="j1", seq=step // 10, step=step, window=10, loss_mean=1.0, loss_last=1.0,
        loss_min=1.0, loss_max=1.0, grad_norm_mean=1.0, grad_norm_max=1.0, grad_norm_std=0.0,
        checkpoints=checkpoints, **in_force(), **kw))


def test_a_lost_mark_of_a_checkpoint_no_longer_held_is_withdrawn_not_resent(tmp_path):
    # The first report marks the checkpoint taken at attach (the last resort); the controller
    # dies before the command reaches the client, whose ring has moved past step 0 by the
    # time a restarted controller hears from it again.
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, _listing("register", 0, [0]))
    (mark,) = decoded(ctl.handle(PEER, _listing("report", 10, [0])))
    assert (mark.seq, mark.mark_stable) == (1, 0)
    ctl.journal.close()

    ctl2, _ = make(tmp_path)
    replies = decoded(ctl2.handle(b"peer-2", _listing("register", 520, [300, 400, 500])))
    assert [type(r) for r in replies] == [wire.Heartbeat], "not sent to be refused"
    st = ctl2.jobs["j1"]
    assert st.pending_command is None and st.rollback.pending_mark is None
    (withdrawn,) = ctl2.journal.events("j1", "withdrawn")
    assert withdrawn.seq == 1 and withdrawn.data["mark_stable"] == 0
    assert "no longer holds (it lists 300, 400, 500)" in withdrawn.data["why"]
    # Nothing of the run is stranded: a checkpoint it holds is marked, in a new command
    # (once the restarted controller's health warm-up is over: 20 reports, then the window).
    for step in range(530, 1200, 10):
        out = decoded(ctl2.handle(b"peer-2", _listing("report", step, [400, 500, 600])))
        if out:
            (cmd,) = out
            break
    assert cmd.seq == 2 and cmd.mark_stable in (400, 500, 600)


def _ring(step: int) -> list[int]:
    """What a client snapshotting every 100 steps, keeping 3 and the one at attach, lists."""
    return [0, *[c for c in range(100, step + 1, 100)][-3:]]


def _to_rollback(ctl) -> tuple[wire.Command, int]:
    """Drive ``ctl`` (divergence_guard) to a stable mark of a ring checkpoint, then to a
    rollback there (a report of non-finite steps); the rollback command and its step."""
    seq, applied, step = 0, 0, 0
    while not [s for s in ctl.jobs["j1"].rollback.stable if s > 0]:
        seq, step = seq + 1, step + 10
        assert step < 3000, "no ring checkpoint marked stable"
        out = decoded(ctl.handle(PEER, wire.encode(wire.Report(
            job="j1", seq=seq, step=step, window=10, loss_mean=1.0, loss_last=1.0,
            loss_min=1.0, loss_max=1.0, grad_norm_mean=1.0, grad_norm_max=1.0,
            grad_norm_std=0.0, checkpoints=_ring(step), applied_seq=applied, **in_force()))))
        for cmd in (r for r in out if isinstance(r, wire.Command)):
            applied = cmd.seq
            ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=cmd.seq, step=step + 1,
                                                  **in_force())))
    bad = wire.Report(job="j1", seq=seq + 1, step=step + 10, window=10, loss_mean=None,
                      nonfinite_losses=10, nonfinite_grads=10, checkpoints=_ring(step + 10),
                      applied_seq=applied, **in_force())
    (rollback,) = [r for r in decoded(ctl.handle(PEER, wire.encode(bad)))
                   if isinstance(r, wire.Command)]
    assert rollback.rollback_to is not None and rollback.rollback_to > 0
    return rollback, step + 10


def test_a_lost_rollback_to_a_checkpoint_no_longer_held_is_withdrawn_not_resent(tmp_path):
    """A re-trial: a controller SIGSTOPped, then SIGCONTed, decided on the reports queued
    before the stop, and its rollback, lost with the old link, went out again when the
    client re-registered ~2,150 steps later: restore_failed, and the rest of the command
    applied to a run that had moved on. A rollback to a checkpoint the registration no
    longer lists can only fail: it is withdrawn, journaled, never sent; it never happened
    (out of the history that escalates) and `trimtab jobs` does not count it."""
    from trimtab.controller.jobs_view import JobsView

    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")])
    ctl.handle(PEER, _listing("register", 0, [0]))
    rollback, at = _to_rollback(ctl)
    target = rollback.rollback_to
    st = ctl.jobs["j1"]
    assert st.rollback.pending is not None and len(st.rollback.history) == 1
    (line,) = JobsView(ctl.journal).lines(all_jobs=True)
    assert line.rollbacks == 1  # ordered
    later = at + 2150
    replies = decoded(ctl.handle(b"peer-2", _listing(
        "register", later, _ring(later), applied_seq=rollback.seq - 1, link=2)))
    assert [type(r) for r in replies] == [wire.Heartbeat], "not sent to fail"
    assert st.pending_command is None and st.rollback.pending is None
    assert st.rollback.history == [] and target in st.rollback.unusable
    (withdrawn,) = ctl.journal.events("j1", "withdrawn")
    assert withdrawn.seq == rollback.seq and withdrawn.data["unheld_rollback"] == target
    assert (f"rolls back to step {target}, whose checkpoint the client no longer holds "
            f"(it lists {', '.join(map(str, _ring(later)))})") in withdrawn.data["why"]
    (line,) = JobsView(ctl.journal).lines(all_jobs=True)
    assert line.rollbacks == 0
    assert line.last_decision.startswith(f"rollback to {target} withdrawn: ")


@pytest.mark.parametrize("full", [False, True])
def test_a_lost_rollback_to_a_checkpoint_the_registration_may_hold_is_sent_again(tmp_path,
                                                                                 full):
    """Listed, or older than a full listing's oldest (it names the newest 256 only): the
    client may hold it, and the rollback goes out again as it was."""
    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")])
    ctl.handle(PEER, _listing("register", 0, [0]))
    rollback, at = _to_rollback(ctl)
    listed = ([at + 100 * i for i in range(1, wire.MAX_LISTED + 1)] if full
              else [0, rollback.rollback_to, at])
    replies = decoded(ctl.handle(b"peer-2", _listing(
        "register", listed[-1], listed, applied_seq=rollback.seq - 1, link=2)))
    assert replies[1:] == [rollback]
    assert ctl.journal.events("j1", "withdrawn") == []


def test_a_lost_mark_of_a_checkpoint_still_held_is_sent_again(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, _listing("register", 0, [0]))
    (mark,) = decoded(ctl.handle(PEER, _listing("report", 10, [0])))
    ctl.journal.close()
    ctl2, _ = make(tmp_path)
    _, again = decoded(ctl2.handle(b"peer-2", _listing("register", 40, [0, 20, 40])))
    assert again == mark and ctl2.jobs["j1"].rollback.pending_mark == 0
    assert ctl2.journal.events("j1", "withdrawn") == []


def test_with_state_save_s_0_every_report_is_saved(tmp_path):
    ctl, _ = make(tmp_path, state_save_s=0.0)
    ctl.handle(PEER, register())
    ctl.handle(PEER, report(1))
    ctl.tick()
    assert ctl.journal.load_state("j1")["reports_seen"] == 1


def test_a_journaled_state_from_before_the_knob_model_is_not_resumed(tmp_path, caplog):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register())
    for seq in range(1, 5):
        ctl.handle(PEER, report(seq))
    old = ctl.jobs["j1"].state_dict()
    old["version"] = 2  # written by a controller before the knob model
    ctl.journal.save_state("j1", old)
    ctl.journal.close()

    ctl2, _ = make(tmp_path)
    with caplog.at_level("WARNING", logger="trimtab.controller"):
        ctl2.handle(b"peer-2", register())
    assert ctl2.jobs["j1"].reports_seen == 0
    assert ctl2.journal.events("j1", "register")[-1].data["resumed"] == "new"
    assert ("journaled state not resumed (JobState state_dict version 2, expected 3 to 4"
            in caplog.text)


def test_a_new_run_of_the_same_job_starts_fresh(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, register(run_id="r1"))
    for seq in range(1, 5):
        ctl.handle(PEER, report(seq))
    ctl.handle(PEER, register(run_id="r2"))
    assert ctl.jobs["j1"].reports_seen == 0
    assert ctl.journal.events("j1", "register")[-1].data["resumed"] == "new"


# -- rollback, end to end through frames ----------------------------------------------------


class FakeClient:
    """Reports like a client with a checkpoint every 50 steps; acks as told. ``base_lr`` is
    the user's own lr, ``lr`` trimtab's multiplier on it."""

    def __init__(self, ctl: Controller, job: str = "rb", keep: int | None = None) -> None:
        self.ctl, self.job, self.keep = ctl, job, keep
        self.seq = self.step = self.applied = 0
        self.ckpts: list[int] = []
        self.stable: int | None = None
        self.base_lr, self.lr = 0.1, 1.0
        ctl.handle(PEER, register(job=job, keep=keep))

    def in_force(self) -> dict:
        return {"knobs": wire.Knobs(lr=self.base_lr * self.lr),
                "base": wire.Knobs(lr=self.base_lr), "scale": wire.Scale(lr=self.lr)}

    def report(self, **fault) -> list[wire.Command]:
        self.seq += 1
        self.step += 10
        if self.step % 50 == 0:
            self.ckpts.append(self.step)
            if self.keep is not None:  # the client's ring: its keep newest and the stable one
                self.ckpts = sorted(kept(self.ckpts, self.stable, self.keep))
        loss = 1.0 + 0.001 * (self.seq % 3)
        fields = {"loss_mean": loss, "loss_min": loss - 0.01, "grad_norm_mean": 1.0, **fault}
        frame = wire.encode(wire.Report(
            job=self.job, seq=self.seq, step=self.step, window=10, **self.in_force(),
            applied_seq=self.applied, checkpoints=list(self.ckpts), stable_step=self.stable,
            **fields))
        return [m for m in decoded(self.ctl.handle(PEER, frame)) if isinstance(m, wire.Command)]

    def run_to(self, step: int, ack: bool = True) -> list[wire.Command]:
        """Healthy reports up to ``step``, acking each command as it comes (if ``ack``)."""
        out = []
        while self.step < step:
            for cmd in self.report():
                out.append(cmd)
                if ack:
                    self.ack(cmd)
        return out

    def ack(self, cmd: wire.Command, *, restore: bool = True, error: str | None = None,
            ran_on: int = 0) -> None:
        """Apply ``cmd`` and ack it (``ran_on``: steps the loop took past the report before
        the command reached it)."""
        restored, before = None, self.step + ran_on
        if cmd.mark_stable is not None and error is None:
            self.stable = cmd.mark_stable
        if cmd.rollback_to is not None and restore:
            restored = self.step = cmd.rollback_to
            self.ckpts = [s for s in self.ckpts if s <= restored]
        if cmd.scale.lr is not None:
            self.lr = cmd.scale.lr
        self.applied = cmd.seq
        self.ctl.handle(PEER, wire.encode(wire.Ack(
            job=self.job, seq=cmd.seq, step=self.step, **self.in_force(),
            restored_step=restored, error=error,
            rolled_back_from=None if restored is None else before)))


def make_rb(tmp_path, **rollback) -> Controller:
    # No health warm-up: these runs' reports count as healthy evidence from the first (a
    # warm-up's reports count as none; see test_rollback).
    ctl, _ = make(tmp_path, policies=[PolicySpec(name="divergence_guard")],
                  rollback={"stable_window_steps": 50, "stable_min_reports": 3,
                            "cooldown_steps": 20, "health": {"warmup_reports": 0},
                            **rollback})
    return ctl


def metric(ctl: Controller, line: str) -> bool:
    return line in generate_latest(ctl.metrics.registry).decode()


def kinds(ctl: Controller, job: str = "rb") -> list[str]:
    return [e.kind for e in ctl.journal.events(job)]


def test_checkpoints_are_journaled_and_marked_stable_after_a_healthy_window(tmp_path):
    ctl = make_rb(tmp_path)
    c = FakeClient(ctl)
    assert c.run_to(90) == []
    (cmd,) = c.report()  # step 100: the checkpoint at 50 has 50 healthy steps after it
    assert (cmd.mark_stable, cmd.rollback_to, cmd.knobs.set(), cmd.scale.set()) == (
        50, None, {}, {})
    assert cmd.reasons == ["checkpoint at step 50 marked stable: 5 healthy reports after it "
                           "(50 steps)"]
    c.ack(cmd)
    assert [e.data["step"] for e in ctl.journal.events("rb", "checkpoint")] == [50, 100]
    (stable,) = ctl.journal.events("rb", "stable")
    assert stable.data == {"step": 50, "source": "ack"}
    assert metric(ctl, 'trimtab_checkpoints_stable_step{job="rb"} 50.0')
    assert metric(ctl, 'trimtab_checkpoints_marked_stable_total{job="rb"} 1.0')
    assert metric(ctl, 'trimtab_checkpoints_total{job="rb"} 2.0')


def test_a_marks_reason_is_the_engines_own_and_journaled_with_its_decision(tmp_path):
    """The command's and the journal's words for a mark are those the engine chose it by,
    never re-derived afterwards: a checkpoint marked early because the client's ring drops
    it next says so, and says how many judged reports vouch for it."""
    ctl = make_rb(tmp_path)  # a 50-step window, 3 healthy reports
    c = FakeClient(ctl, keep=1)  # a ring of one: the snapshot at 100 drops the one at 50
    marks = [cmd for cmd in c.run_to(80) if cmd.mark_stable is not None]
    (cmd,) = marks
    assert (cmd.mark_stable, c.step) == (50, 80)
    assert cmd.reasons == ["checkpoint at step 50 marked stable: 3 healthy reports after it "
                           "(30 steps), short of the 50-step window: the client's next "
                           "snapshot drops it from its ring"]
    (row,) = [e for e in ctl.journal.events("rb", "command") if e.data["mark_stable"] == 50]
    assert row.data["reasons"] == cmd.reasons


def test_the_steps_lost_are_counted_from_where_the_client_carried_the_rollback_out(tmp_path):
    """A fast loop takes steps between the report a rollback is decided on and the command's
    arrival: its ack says where the run stood (a trial: the journal said 10 steps lost where
    the loop lost 17). The journal and the metric count from there."""
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)  # decided at step 240
    assert cmd.rollback_to == 150
    c.ack(cmd, ran_on=7)
    (restored,) = ctl.journal.events("rb", "restored")
    assert (restored.data["from_step"], restored.data["steps_lost"]) == (247, 97)
    assert metric(ctl, 'trimtab_rollback_steps_lost_total{job="rb"} 97.0')


def _stable_at_150(ctl: Controller) -> FakeClient:
    c = FakeClient(ctl)
    c.run_to(200)
    assert c.stable == 150
    c.run_to(230)
    return c


def test_a_rollbacks_change_reads_from_the_value_the_run_was_using(tmp_path):
    """A monitoring trial: a rollback's row read "x1 -> x0.25" at step 610 where the run was
    at x0.5; the "from" was the checkpoint's value. It is the value in force, and the line
    says what the restore brings back; the decision counter's direction follows it."""
    from trimtab.controller.timeline import Timeline

    ctl = make_rb(tmp_path)
    c = FakeClient(ctl)
    c.lr = 2.0  # the checkpoint at 150 ran at x2
    c.run_to(200)
    assert c.stable == 150
    c.lr = 0.8  # then the run went down to x0.8 (as a person's set would)
    c.run_to(230)
    (cmd,) = c.report(nonfinite_grads=10)
    assert cmd.rollback_to == 150 and cmd.scale.lr == pytest.approx(0.4)
    line = next(r for r in cmd.reasons if r.startswith("lr "))
    assert line.startswith("lr x0.8 -> x0.4 by divergence_guard: rollback to step 150")
    assert line.endswith("(the restore brings back x2, which this replaces)")
    (row,) = [e for e in ctl.journal.events("rb", "decision") if e.data["rollback"]]
    assert row.data["knobs"]["lr"]["in_force"] == pytest.approx(0.8)
    assert row.data["knobs"]["lr"]["current"] == pytest.approx(2.0)
    timeline = Timeline()
    rows = [r for e in ctl.journal.events("rb") for r in timeline.feed(e)]
    (shown,) = [r for r in rows if r.kind == "decision" and r.knob == "lr"]
    assert shown.change == "x0.8 -> x0.4"
    assert metric(ctl, 'trimtab_decisions_total{direction="down",job="rb",knob="lr",'
                       'policy="divergence_guard"} 1.0')


def test_a_rollback_never_sets_the_lr_above_what_the_checkpoint_ran_at(tmp_path):
    """A plugin's trial: raised to x16 after the checkpoint at 900 (x4 there), it diverged,
    and the rollback set half of x16: x8, twice what the run was healthy at."""
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)  # at x1
    c.lr = 4.0
    c.run_to(240)
    (cmd,) = c.report(nonfinite_grads=10)
    assert cmd.rollback_to == 150
    assert cmd.scale.lr is None  # the restore brings back x1: nothing else to set
    c.lr = 1.0  # what the client's restore of the checkpoint brings back
    c.ack(cmd)
    assert ctl.jobs["rb"].knobs.lr == pytest.approx(1.0)


def test_a_nonfinite_report_rolls_back_to_the_newest_stable_checkpoint(tmp_path):
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)  # step 240
    assert cmd.rollback_to == 150 and cmd.mark_stable is None
    assert cmd.scale.lr == pytest.approx(0.5)
    assert cmd.reasons[0].startswith("rollback from step 240 to stable step 150 (level 1")
    (order,) = ctl.journal.events("rb", "rollback")
    assert (order.data["reason"], order.data["level"], order.data["target"]) == (
        "nonfinite", 1, 150)
    # While it is pending nothing else is commanded, even at another fault.
    assert c.report(nonfinite_grads=10) == []
    c.ack(cmd)  # the client ran on to 250 before it carried it out: 100 steps lost
    (restored,) = ctl.journal.events("rb", "restored")
    assert restored.data["restored_step"] == 150 and restored.data["steps_lost"] == 100
    assert kinds(ctl)[-2:] == ["ack", "restored"]
    st = ctl.jobs["rb"]
    # The signals are the checkpoint's (its step's report ended with 15 slope points).
    assert st.step == 150 and st.view().signals.slope_n == 15 and st.knobs.lr == 0.5
    assert st.view().signals.slope_since_step == 10
    assert st.effective.lr == pytest.approx(0.05)
    assert metric(ctl, 'trimtab_rollbacks_total{job="rb",reason="nonfinite"} 1.0')
    assert metric(ctl, 'trimtab_rollback_steps_lost_total{job="rb"} 100.0')
    assert metric(ctl, 'trimtab_rollback_alert{job="rb"} 0.0')


def test_a_recurring_fault_ends_in_alert_with_its_reason_then_plain_cuts(tmp_path):
    ctl = make_rb(tmp_path, budget=2)
    c = _stable_at_150(ctl)
    orders = []
    for _ in range(2):
        (cmd,) = c.report(nonfinite_grads=10)
        orders.append((cmd.rollback_to, cmd.scale.lr,
                       ctl.journal.events("rb", "rollback")[-1].data["level"]))
        c.ack(cmd)
        c.run_to(c.step + 100)  # past the cooldown, healthy; 200 becomes stable meanwhile
    # The second goes to the newer stable checkpoint, one level deeper: the multiplier in
    # force at the first fault (1.0) x 0.25, not the one in force at the second (0.5, after
    # the first cut) x 0.25.
    assert orders == [(150, 0.5, 1), (200, 0.25, 2)]
    assert [r.fault_lr for r in ctl.jobs["rb"].rollback.history] == [1.0, 0.5]
    (cmd,) = c.report(nonfinite_grads=10)
    assert cmd.rollback_to is None and cmd.scale.lr == pytest.approx(c.lr * 0.5)
    (alert,) = ctl.journal.events("rb", "alert")
    assert alert.data["why"].startswith("rollback budget exhausted: 2 rollbacks within 1000")
    assert alert.data["budget"] == 2 and len(alert.data["rollbacks"]) == 2
    assert metric(ctl, 'trimtab_rollback_alert{job="rb"} 1.0')
    assert len(ctl.journal.events("rb", "rollback")) == 2


def test_a_stranded_run_in_alert_is_rolled_back_then_advised_to_stop(tmp_path):
    """In alert after its budget, the run's every step is skipped from then on (its state
    blew up): plain cuts cannot change a run that takes no step. Two such reports and it is
    rolled back anyway, one level deeper; when the stranded run's extra rollbacks are spent
    too, the job is advised to stop (guard.should_stop), once."""
    ctl = make_rb(tmp_path, budget=1, stranded_budget=1)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)
    c.ack(cmd)
    c.run_to(c.step + 100)
    c.report(nonfinite_grads=10)  # the budget is spent: alert, a plain cut
    assert ctl.jobs["rb"].rollback.alert is not None
    for cmd in c.run_to(0):
        c.ack(cmd)
    skipped = {"loss_mean": None, "loss_min": None, "grad_norm_mean": None,
               "nonfinite_losses": 10, "nonfinite_grads": 10, "skipped_steps": 10}

    def stranded_report() -> list[wire.Command]:
        out = c.report(**skipped)
        for cmd in out:
            c.ack(cmd)
        return out

    assert [m.rollback_to for m in stranded_report()] in ([], [None])  # a plain cut, maybe
    (cmd,) = stranded_report()
    assert cmd.rollback_to == 200 and cmd.stop_advice is None
    order = ctl.journal.events("rb", "rollback")[-1].data
    assert order["level"] == 2 and "stranded" in order["why"]
    assert [m.rollback_to for m in stranded_report()] in ([], [None])
    (cmd,) = [m for m in stranded_report() if m.stop_advice]
    assert cmd.rollback_to is None and "stranded" in cmd.stop_advice
    # Said once: no new alert or advice at every report after.
    assert [m for m in stranded_report() if m.stop_advice or m.rollback_to] == []
    alerts = ctl.journal.events("rb", "alert")
    assert len(alerts) == 2 and alerts[-1].data["why"].startswith("stranded: every step")


def test_a_failed_restore_is_journaled_and_that_checkpoint_never_targeted_again(tmp_path):
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)
    c.ack(cmd, restore=False, error="no checkpoint at step 150")
    ack = ctl.journal.events("rb", "ack")[-1]
    assert ack.data["error"] == "no checkpoint at step 150" and ack.data["restored_step"] is None
    assert not ctl.journal.events("rb", "restored")
    assert ctl.jobs["rb"].rollback.history[-1].failed == "no checkpoint at step 150"
    (cmd,) = c.report(nonfinite_grads=10)
    assert cmd.rollback_to == 100  # the next newest stable one


def test_a_lost_ack_is_settled_from_the_next_report(tmp_path):
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)
    c.step, c.applied, c.lr = 150, cmd.seq, cmd.scale.lr  # applied, ack lost
    c.ckpts = [s for s in c.ckpts if s <= 150]
    c.report()
    (restored,) = ctl.journal.events("rb", "restored")
    assert restored.data["inferred"] is True and restored.data["restored_step"] == 150
    st = ctl.jobs["rb"]
    assert st.pending_command is None
    assert (st.knobs.lr, st.effective.lr, st.base.lr) == (0.5, pytest.approx(0.05), 0.1)


def test_rollback_series_end_with_the_job(tmp_path):
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    (cmd,) = c.report(nonfinite_grads=10)
    c.ack(cmd)
    for name in ("rollbacks_total", "rollback_steps_lost_total", "rollback_alert",
                 "checkpoints_stable_step", "checkpoints_total", "checkpoints_marked_stable_total"):
        assert metric(ctl, f'trimtab_{name}{{job="rb"'), name
    ctl.handle(PEER, wire.encode(wire.Bye(job="rb", step=c.step)))
    assert metric(ctl, 'trimtab_job_live{job="rb"} 0.0')
    ctl.clock.t += ctl.config.metrics_grace_s + 1  # the metrics grace ends
    ctl.tick()
    assert 'job="rb"' not in generate_latest(ctl.metrics.registry).decode()


def test_non_finite_values_right_after_a_restore_roll_back_again_not_just_cut(tmp_path):
    # A restored run that meets the bad data again has non-finite weights: every step is
    # skipped, so a cooldown counted in steps would never end and a cut cannot help.
    ctl = make_rb(tmp_path, budget=2)
    c = _stable_at_150(ctl)
    (first,) = c.report(nonfinite_grads=10)
    c.ack(first)
    (second,) = c.report(nonfinite_grads=10)  # step 160, inside the cooldown (until 170)
    # One level deeper from the multiplier in force at the first fault: 1.0 x 0.25.
    assert second.rollback_to == 150 and second.scale.lr == pytest.approx(0.25)
    c.ack(second)
    (third,) = c.report(nonfinite_grads=10)
    assert third.rollback_to is None and ctl.journal.events("rb", "alert")  # bounded


def test_stop_advice_goes_out_once_in_a_command_and_is_journaled(tmp_path):
    ctl, _ = make(tmp_path, policies=[PolicySpec(name="early_stop", config={"patience": 2})])
    ctl.handle(PEER, register())
    sent = []
    for seq, val in enumerate([3.0, 2.0, 2.0, 2.0, 2.0, 2.0], start=1):
        frame = wire.Report(
            job="j1", seq=seq, step=seq * 10, window=10, loss_mean=1.0, validation=val,
            validation_step=seq * 10, applied_seq=len(sent), **in_force())
        sent += [m for m in decoded(ctl.handle(PEER, wire.encode(frame)))
                 if isinstance(m, wire.Command)]
    (cmd,) = sent
    assert cmd.stop_advice == ("early_stop: validation 2 at step 40: no improvement on the best "
                               "2 (step 20) for 2 results")
    assert cmd.knobs == wire.Knobs() and cmd.scale == wire.ScaleTargets()
    assert cmd.reasons == [f"stop advised: {cmd.stop_advice}"]
    advice = [e for e in ctl.journal.events("j1") if e.kind == "advice"]
    assert len(advice) == 1 and advice[0].step == 40
    assert advice[0].data == {"advice": "stop", "reason": cmd.stop_advice}
    assert ctl.jobs["j1"].stop_advice == cmd.stop_advice


def test_a_fault_while_a_command_awaits_its_ack_still_rolls_back(tmp_path):
    ctl = make_rb(tmp_path)
    c = _stable_at_150(ctl)
    pending = []
    while not pending:  # the next stable mark, left unacknowledged
        pending = c.run_to(c.step + 10, ack=False)
    (mark,) = pending
    assert mark.mark_stable == 200 and mark.rollback_to is None
    (cmd,) = c.report(nonfinite_grads=10)
    # The client may apply the mark before this command comes (then it keeps 200 as its
    # newest stable checkpoint and lets 150 go) or never (this one supersedes it): the
    # rollback goes to 200 and marks it again, which holds either way.
    assert cmd.seq == mark.seq + 1 and (cmd.rollback_to, cmd.mark_stable) == (200, 200)
    assert cmd.scale.lr == pytest.approx(0.5)
    (order,) = ctl.journal.events("rb", "rollback")
    assert order.data["reason"] == "nonfinite" and order.seq == cmd.seq
    # The journal says which command the rollback replaced (the mark may never be applied).
    sent = {e.seq: e.data["supersedes"] for e in ctl.journal.events("rb", "command")}
    assert sent[cmd.seq] == mark.seq and sent[mark.seq] is None
    # The rollback is pending now: a second fault waits for its ack.
    assert c.report(nonfinite_grads=10) == []
    c.ack(cmd)
    st = ctl.jobs["rb"]
    assert st.step == 200 and st.pending_command is None
    assert st.rollback.stable_step == 200 and st.rollback.pending_mark is None
    assert ctl.journal.events("rb", "stable")[-1].data == {"step": 200, "source": "ack"}


def test_commands_go_to_the_connection_that_registered_last(tmp_path):
    ctl, _ = make(tmp_path)
    old, new = b"old-connection", b"new-connection"
    ctl.handle(old, register())
    for seq in range(1, 4):
        ctl.handle(old, report(seq))
    ctl.handle(new, register())  # the client reconnected on a new socket
    # A report the old socket still delivers late: taken, but it does not take the job back.
    replies = ctl.handle(old, report(4, nonfinite=3))
    (peer, frame), = replies
    assert peer == new and isinstance(wire.decode(frame), wire.Command)
    # Resent commands go to the new connection too.
    ctl.handle(new, report(5, nonfinite=3))
    (peer, frame), = ctl.handle(new, report(6, nonfinite=3))
    assert peer == new and wire.decode(frame).seq == 1


def test_a_report_sent_before_the_restore_is_journaled_not_observed(tmp_path):
    # The client's transport may deliver reports it queued before it applied the rollback
    # after the ack: they describe the path rolled back from (here still non-finite, with
    # the checkpoint at 200 and a stable mark the restore discarded).
    ctl = make_rb(tmp_path, budget=3)
    c = _stable_at_150(ctl)
    c.run_to(250)
    assert c.stable == 200
    (cmd,) = c.report(nonfinite_grads=10)  # step 260
    assert cmd.rollback_to == 200
    before = (c.seq, c.step, c.applied, list(c.ckpts), c.stable)
    c.ack(cmd)
    c.seq, c.step, c.applied, c.ckpts, c.stable = before  # the queued report's view
    c.step -= 10  # its window was skipped steps: the same step as the report that faulted
    assert c.report(nonfinite_grads=5, nonfinite_losses=5) == []
    (gone,) = ctl.journal.events("rb", "abandoned")
    assert gone.data["step"] == 260 and gone.data["branch_seq"] == cmd.seq
    assert metric(ctl, "trimtab_reports_abandoned_total 1.0")
    st = ctl.jobs["rb"]
    assert st.step == 200 and st.nonfinite_grads == 10  # only the report that faulted
    assert st.rollback.checkpoints == [50, 100, 150, 200] and st.rollback.stable_step == 200
    assert len(ctl.journal.events("rb", "rollback")) == 1
    # The run goes on from 200; its reports are observed again, with no second rollback.
    c.step, c.applied, c.ckpts = 200, cmd.seq, [50, 100, 150, 200]
    c.run_to(300)
    assert len(ctl.journal.events("rb", "rollback")) == 1 and st.step == 300
    # A controller restarted from the journal still knows which reports are stale.
    assert type(st).from_state_dict(st.state_dict()).branch_seq == cmd.seq


def test_reports_made_before_the_controller_heard_the_run_are_stale(tmp_path, caplog):
    """Only fresh evidence: reports the client made while it heard no controller (offline)
    are journaled as stale and counted, never observed: no signal, no checkpoint list, no
    decision comes from them, not even a non-finite one's rollback or cut. The log says so
    once per run of them (before: a line each, 34 after 10 s of downtime)."""
    caplog.set_level(logging.INFO, logger="trimtab.controller")
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, wire.encode(wire.Register(
        job="j1", run_id="r1", report_every=10, step=364,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"), **in_force())))
    queued = [wire.Report(job="j1", seq=s, step=s * 10, window=10, loss_mean=5.0 - s / 10,
                          grad_norm_mean=1.0, nonfinite_grads=3 if s == 30 else 0,
                          checkpoints=[0, 100], offline=True, **in_force())
              for s in range(1, 37)]
    late = wire.Report(job="j1", seq=37, step=370, window=10, loss_mean=1.4, grad_norm_mean=1.0,
                       checkpoints=[300, 360], offline=True, **in_force())
    for r in [*queued, late]:
        assert ctl.handle(PEER, wire.encode(r)) == []
    st = ctl.jobs["j1"]
    assert st.reports_seen == 0 and st.last_report is None and st.step == 364
    assert st.rollback.checkpoints == [] and st.nonfinite_grads == 0
    assert [e.kind for e in ctl.journal.events("j1")] == ["register"] + ["stale"] * 37
    assert metric(ctl, "trimtab_reports_stale_total 37.0")
    said = [r for r in caplog.records if "heard no controller" in r.getMessage()
            and r.levelno >= logging.INFO]
    assert len(said) == 1 and "not logged" in said[0].getMessage()
    # The first report made while the controller is heard is observed.
    fresh = late.model_copy(update={"seq": 38, "step": 375, "offline": False})
    ctl.handle(PEER, wire.encode(fresh))
    assert st.reports_seen == 1 and st.rollback.checkpoints == [300, 360]
    # After the client reconnected (a new link, registered again), a report it made under
    # the old link is stale, offline or not.
    ctl.handle(PEER, wire.encode(wire.Register(
        job="j1", run_id="r1", report_every=10, step=380, link=2,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"), **in_force())))
    old = fresh.model_copy(update={"seq": 39, "step": 380, "link": 1})
    ctl.handle(PEER, wire.encode(old))
    assert st.reports_seen == 1 and ctl.journal.events("j1")[-1].kind == "stale"
    assert len([r for r in caplog.records if "heard no controller" in r.getMessage()
                and r.levelno >= logging.INFO]) == 2  # a new run of them, after one observed
    ctl.handle(PEER, wire.encode(old.model_copy(update={"seq": 40, "step": 385, "link": 2})))
    assert st.reports_seen == 2


def test_replicas_parting_again_past_the_budget_are_advised_to_stop_with_no_lr_cut(tmp_path):
    """A DDP trial: rank 1's own lr came back after every rollback; past the budget the run
    trained on with two models and was cut x0.5 at every report (the guard's fallback), an
    lr cut that mends nothing there. The rollback and the alert cut nothing; the run is
    advised to stop (guard.should_stop), as every rank trains a model of its own."""
    ctl = make_rb(tmp_path, budget=1)
    c = _stable_at_150(ctl)
    parted = {"replica_spread": 3e-3, "replicas_identical": False}
    (cmd,) = c.report(**parted)
    assert cmd.rollback_to == 150 and cmd.scale.lr is None and cmd.stop_advice is None
    assert "no lr cut" in cmd.reasons[0]
    c.ack(cmd)
    c.run_to(c.step + 100)
    (cmd,) = c.report(**parted)  # the budget is spent
    assert cmd.rollback_to is None and cmd.scale.lr is None
    assert cmd.stop_advice.startswith("rollback budget exhausted")
    assert ctl.jobs["rb"].rollback.alert is not None
    assert c.report(**parted) == []  # no cut after it either


def test_a_second_live_run_under_a_jobs_name_is_refused_until_the_first_is_silent(tmp_path):
    """A fleet trial: two trials of a sweep named alike, both live. The second's
    registration took the job over; the first's reports were then decided on under it and
    its commands went to the second (a mark acknowledged at the other run's step), the
    second's own reports were refused as stale, and the first's bye ended the job. A
    registration of another run from another connection while the job's run is heard is
    refused ``conflict``, and nothing that connection sends is taken as the job's; once the
    run is silent for takeover_after_s (crashed), the new run takes the job over."""
    ctl, clock = make(tmp_path)
    a, b = b"peer-a", b"peer-b"
    ctl.handle(a, register(run_id="run-a"))
    ctl.handle(a, report(1))
    clock.t += 3.0
    (err,) = decoded(ctl.handle(b, register(run_id="run-b")))
    assert isinstance(err, wire.Error) and err.code == "conflict"
    assert "live as run run-a" in err.detail and "another job" in err.detail
    (err,) = decoded(ctl.handle(b, report(1)))  # not the job's: it is told to register
    assert err.code == "unknown_job"
    ctl.handle(b, wire.encode(wire.Bye(job="j1", step=10, reason="closed")))
    st = ctl.jobs["j1"]
    assert st.run_id == "run-a" and st.reports_seen == 1  # the first run's, untouched
    ctl.handle(a, report(2))  # the first run goes on
    assert ctl.jobs["j1"].reports_seen == 2
    # A process of the same run (resumed from its save, the old one not yet silent long)
    # is no other run: it is followed as the resume.
    (reply,) = decoded(ctl.handle(b"peer-c", register(run_id="run-a")))
    assert isinstance(reply, wire.Heartbeat) and ctl.jobs["j1"].run_id == "run-a"
    clock.t += 10.5  # the run silent past takeover_after_s: a crash; taken over
    (reply,) = decoded(ctl.handle(b, register(run_id="run-b")))
    assert isinstance(reply, wire.Heartbeat) and ctl.jobs["j1"].run_id == "run-b"
    ctl.handle(b, report(1))
    assert ctl.jobs["j1"].reports_seen == 1


def test_each_report_is_answered_with_the_step_seen_while_a_sweep_runs(tmp_path):
    """The client holds a sweep a few windows past the newest step the controller says it
    has seen (it never climbs far unwatched): while one runs, every report the controller
    observes is answered with that step, after what it decided. A schedule policy's live
    schedule is not held, and its reports are answered only by commands."""
    ctl, _ = make(tmp_path, policies=[PolicySpec(name="lr_range_test",
                                                 config={"when": "always"})])
    ctl.handle(PEER, _listing("register", 0, [0]))
    out = decoded(ctl.handle(PEER, _listing("report", 10, [0])))
    (sweep,) = [r for r in out if isinstance(r, wire.Command)]
    assert sweep.schedules and ctl.jobs["j1"].phase is not None
    assert out[-1] == wire.Heartbeat(job="j1", step=10)
    ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=sweep.seq, step=11, **in_force())))
    out = decoded(ctl.handle(PEER, _listing("report", 20, [0], applied_seq=sweep.seq)))
    assert out[-1] == wire.Heartbeat(job="j1", step=20)
    (tmp_path / "decay").mkdir()
    decay, _ = make(tmp_path / "decay", policies=[PolicySpec(
        name="step_decay", config={"step_size": 30, "gamma": 0.5})])
    (_, sched) = decoded(decay.handle(PEER, register()))
    assert sched.schedules and decay.jobs["j1"].live and decay.jobs["j1"].phase is None
    decay.handle(PEER, wire.encode(wire.Ack(job="j1", seq=sched.seq, step=1, **in_force())))
    assert decay.handle(PEER, report(1, applied_seq=sched.seq)) == []
