"""Journal: WAL, ordered events, job-state round trip, atomic batches, integrity check."""

from __future__ import annotations

import sqlite3

import pytest

from trimtab.controller.journal import Journal, JournalError


def test_wal_mode_and_ordered_events(tmp_path):
    j = Journal(str(tmp_path / "j.db"))
    j.append("a", "register", step=0, data={"run_id": "r"})
    j.append("b", "report", step=10, seq=1, data={"loss_mean": 1.0})
    j.append("a", "command", step=10, seq=1, data={"knobs": {"lr": 0.5}})
    j.close()
    db = sqlite3.connect(tmp_path / "j.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    j = Journal(str(tmp_path / "j.db"))
    assert [(e.job, e.kind, e.seq) for e in j.events()] == [
        ("a", "register", None), ("b", "report", 1), ("a", "command", 1)]
    assert [e.kind for e in j.events("a", "command")] == ["command"]
    assert j.events("a", "command")[0].data == {"knobs": {"lr": 0.5}}
    assert j.jobs() == ["a", "b"]


def test_state_round_trip_and_liveness(tmp_path):
    j = Journal(str(tmp_path / "j.db"))
    j.save_state("a", {"x": 1})
    j.save_state("a", {"x": 2})
    j.save_state("b", {"y": 1}, live=False)
    assert j.load_state("a") == {"x": 2}
    assert j.load_state("zzz") is None
    assert set(j.states()) == {"a", "b"}
    assert set(j.states(live_only=True)) == {"a"}


def test_batch_is_one_transaction_visible_to_other_readers_only_after(tmp_path):
    path = str(tmp_path / "j.db")
    j = Journal(path)
    reader = Journal(path)
    with j.batch():
        j.append("a", "report", step=1)
        j.append("a", "decision", step=1)
        assert reader.events() == []
    assert [e.kind for e in reader.events()] == ["report", "decision"]


def test_unknown_kind_refused(tmp_path):
    j = Journal(str(tmp_path / "j.db"))
    with pytest.raises(ValueError, match="kind 'nonsense'"):
        j.append("a", "nonsense")


def test_not_a_database_is_refused_clearly(tmp_path):
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="cannot be opened"):
        Journal(str(path))


def test_an_event_json_cannot_hold_is_written_not_lost(tmp_path, caplog):
    """Non-finite numbers become null and other objects their repr, and the error is
    logged: a record never fails to be written (a decision's command is sent with it)."""
    j = Journal(str(tmp_path / "j.db"))
    j.append("a", "decision", step=1, data={"x": float("nan"), "y": [float("inf"), 2.0],
                                            "o": object, 3: "k"})
    (ev,) = j.events("a", "decision")
    assert ev.data == {"x": None, "y": [None, 2.0], "o": repr(object), "3": "k"}
    assert "journal: a decision event of job 'a' held what JSON cannot" in caplog.text
