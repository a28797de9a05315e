"""The journal's retention: a long job's journal stays within what its config allows, and
every decision that acted is kept (driven with frames through the real handler; the
journal's wall clock is simulated, three days in a few seconds of reports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trimtab.controller.journal import Journal
from trimtab.controller.retention import RetentionConfig
from trimtab.protocol import wire

from .test_handler import PEER, decoded, in_force, make, register

EVERY_S = 30.0  # one report every 30 s of simulated time
DAYS = 3
RET = {"full_s": 6 * 3600, "downsample_s": 60, "max_age_s": 2 * 86400, "compact_every_s": 3600,
       "batch_rows": 2000}


class WallClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def report(seq: int, nonfinite: int = 0, applied_seq: int = 0, lr: float = 1.0) -> bytes:
    return wire.encode(wire.Report(
        job="j1", seq=seq, step=seq * 10, window=10, loss_mean=1.0 / (1 + seq * 1e-3),
        grad_norm_mean=1.0, grad_norm_max=1.2, grad_norm_std=0.1, nonfinite_grads=nonfinite,
        applied_seq=applied_seq, checkpoints=[seq * 10 - 10 * (seq % 10)],
        **in_force(lr)))


def _long_job(tmp_path):
    ctl, clock = make(tmp_path, retention=RET)
    wall = WallClock()
    ctl.journal.clock = wall
    ctl._compact_at = wall()  # noqa: SLF001 - the test's clock starts here
    ctl.handle(PEER, register())
    applied, lr, commands = 0, 1.0, []
    n = int(DAYS * 86400 / EVERY_S)
    for seq in range(1, n + 1):
        wall.t += EVERY_S
        clock.t += EVERY_S
        bad = 3 if seq % 500 == 0 else 0  # a fault now and then: a command, acked
        for msg in decoded(ctl.handle(PEER, report(seq, bad, applied, lr))):
            if isinstance(msg, wire.Command):
                commands.append(msg.seq)
                applied = msg.seq
                lr = msg.scale.lr if msg.scale.lr is not None else lr
                ctl.handle(PEER, wire.encode(wire.Ack(job="j1", seq=msg.seq, step=seq * 10,
                                                      **in_force(lr))))
        ctl.tick()
    return ctl, wall, n, commands


@pytest.mark.timeout(300)
def test_a_long_jobs_journal_stays_within_its_retention_and_keeps_every_decision(tmp_path):
    ctl, wall, n, commands = _long_job(tmp_path)
    j = ctl.journal
    cfg = RetentionConfig(**RET)
    reports = j.events("j1", "report")
    # Bounded by the rules: the full window whole, then one per minute up to max_age_s.
    full = cfg.full_s / EVERY_S
    thinned = (cfg.max_age_s - cfg.full_s) / cfg.downsample_s
    slack = cfg.compact_every_s / EVERY_S + 2  # a compaction is due at most this late
    assert n == 8640 and len(reports) <= full + thinned + slack
    assert len(reports) >= full  # the recent ones are all there
    newest = [r.seq for r in reports if r.ts >= wall.t - cfg.full_s]
    assert newest == list(range(newest[0], n + 1))
    # Past the full window, one report per job per minute.
    old = [r for r in reports if r.ts < wall.t - cfg.full_s - cfg.compact_every_s]
    minutes = [int(r.ts // cfg.downsample_s) for r in old]
    assert len(minutes) == len(set(minutes)) and old
    assert min(r.ts for r in reports) >= wall.t - cfg.max_age_s - cfg.compact_every_s
    # Every decision that acted, its command and ack, kept from the first day on.
    assert commands and [c.seq for c in j.events("j1", "command")] == commands
    assert [a.seq for a in j.events("j1", "ack")] == commands
    acted = {d.step for d in j.events("j1", "decision") if d.data["commands"]}
    changed = {c.step for c in j.events("j1", "command") if c.data["scale"] or c.data["knobs"]}
    assert changed and changed <= acted
    assert j.events("j1", "register")
    # Checkpoints: those marked stable stay listed; the others go after the full window.
    ckpts = j.events("j1", "checkpoint")
    assert {e.step for e in j.events("j1", "stable")} <= {c.step for c in ckpts}
    assert all(c.ts >= wall.t - cfg.full_s - cfg.compact_every_s for c in ckpts
               if c.step not in {e.step for e in j.events("j1", "stable")})


def test_compaction_by_hand_refuses_a_journal_in_use_and_reports_what_it_deleted(tmp_path):
    from trimtab.controller.lock import JournalLock

    path = tmp_path / "j.db"
    j = Journal(str(path))
    wall = WallClock()
    j.clock = wall
    for i in range(500):
        wall.t += 60
        j.append("a", "report", step=i, seq=i + 1, data={"i": i})
        if i % 100 == 0:
            j.append("a", "command", step=i, seq=i // 100 + 1, data={})
    j.close()
    cmd = [sys.executable, "-m", "trimtab.controller", "journal", "compact", "--journal",
           str(path), "--vacuum"]
    lock = JournalLock(str(path))
    held = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    lock.release()
    assert held.returncode == 2 and "is in use by another trimtab serve" in held.stderr
    # The reports are up to 500 minutes old: with max_age_s 1 h the older ones go (the
    # journal's clock is the real one now: all of them); commands stay.
    cfg = tmp_path / "t.toml"
    cfg.write_text("[retention]\nfull_s = 0\nmax_age_s = 3600\n")
    out = subprocess.run([*cmd, "--config", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "reports past max_age_s: 500 rows deleted" in out.stdout
    assert "bytes before" in out.stdout
    j = Journal(str(path))
    assert not j.events("a", "report") and len(j.events("a", "command")) == 5
    j.close()


def test_a_missing_journal_is_named(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trimtab.controller", "journal", "compact",
                          "--journal", str(tmp_path / "none.db")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and f"no journal at {tmp_path / 'none.db'}" in out.stderr
    assert not (tmp_path / "none.db").exists()


def test_retention_config_errors_name_the_field():
    from trimtab.controller.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="retention.downsample_s"):
        load_config(None, overrides={"retention": {"downsample_s": 0}}, env={})


def test_the_saved_states_of_ended_jobs_and_replaced_runs_go_after_ended_state_s(tmp_path):
    """A fleet trial: every trial of a sweep left its saved state (~20-30 KB) for good, 39
    MB of a 59 MB journal after its reports were thinned. An ended job's state, and a
    replaced run's, go once older than ended_state_s; a live job's stays, however old."""
    journal = Journal(str(tmp_path / "j.db"))
    wall = WallClock()
    journal.clock = wall
    journal.save_state("old-ended", {"step": 1}, live=False)
    journal.save_state("old-live", {"step": 1}, live=True)
    journal.retire_state("old-live", "r0", {"step": 0})
    wall.t += 8 * 86400
    journal.save_state("new-ended", {"step": 2}, live=False)
    journal.retire_state("new-ended", "r1", {"step": 1})
    journal.commit()
    deleted = journal.compact(RetentionConfig(), now=wall.t)
    assert deleted["ended job states"] == 2
    assert sorted(journal.states()) == ["new-ended", "old-live"]
    assert journal.load_run_state("old-live", "r0") is None
    assert journal.load_run_state("new-ended", "r1") == {"step": 1}
    assert journal.compact(RetentionConfig(ended_state_s=0), now=wall.t + 1e7).get(
        "ended job states") is None  # 0: never
    journal.close()
