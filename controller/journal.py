"""The journal: every registration, report summary, proposal, decision, command and ack,
appended to an embedded SQLite database in WAL mode, plus each job's latest state so a
restarted controller resumes every job.

A commit survives a kill of the process at any point (WAL): the next open finds every
committed transaction and none of a half-written one. Each open checks the file (SQLite's
``quick_check`` and the journal's tables) and refuses a damaged one with a
:class:`JournalError` that names it and says what to do.

The read-only commands (``trimtab decisions``, ``export``, ``replay``, ``rerun``) open a
journal with ``readonly=True``: a missing file is an error (:class:`JournalMissing`),
never an empty journal created on the spot, and nothing is written, created or changed.

>>> j = Journal(":memory:")
>>> j.append("demo", "register", step=0, data={"run_id": "r1"})
1
>>> [e.kind for e in j.events("demo")]
['register']
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimtab.controller.retention import RetentionConfig, plan_sql

__all__ = ["EVENT_KINDS", "Event", "Journal", "JournalError", "JournalMissing", "named_jobs",
           "no_such_job"]

log = logging.getLogger("trimtab.controller.journal")


def _dumps(data: Any, kind: str | None = None, job: str | None = None) -> str:
    """JSON for the journal: no NaN or infinity, no spaces (a journal keeps millions). What
    JSON cannot hold is written as null (a non-finite number) or its repr (anything else)
    rather than lost with the event: a record must never fail to be written."""
    try:
        return json.dumps(data, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        what = "a saved state" if kind is None else f"a {kind} event of job {job!r}"
        log.error("journal: %s held what JSON cannot (%s); written with null or repr in its "
                  "place", what, exc)
        return json.dumps(_jsonable(data), allow_nan=False, separators=(",", ":"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return repr(x)


#: What an event can be.
EVENT_KINDS = (
    "register", "report", "proposal", "decision", "command", "ack",
    "bye", "lost", "policy_error", "message_error",
    # Rollback: a checkpoint first listed, marked stable, a rollback ordered, acknowledged
    # as restored or as not restored (the client said why), and a job put in alert
    # (rollback budget exhausted).
    "checkpoint", "stable", "rollback", "restored", "restore_failed", "alert",
    # A report sent before a rollback its client had applied by the time it arrived.
    "abandoned",
    # A report made while its client heard no controller, or before its registration.
    "stale",
    # What shadow policies would have done (journaled and exported, never sent).
    "shadow",
    # Advice sent to a run (stop: the validation metric stopped improving).
    "advice",
    # A person's request (trimtab set, pause, resume, rollback): who, why, and what came of it.
    "manual",
    # A validation result sent as the run ended, after its last report (wire.Validation).
    "validation",
    # Climb verdicts turned off for a job: the checkpoint a climb rollback restored scored
    # as high as the run before it (the data moved, not the weights).
    "data_moved",
    # A pending command withdrawn unsent: a registration showed it could only fail (it
    # marks stable a checkpoint the client no longer holds).
    "withdrawn",
)

#: Bytes the WAL file is truncated to after a checkpoint (SQLite's journal_size_limit).
_WAL_LIMIT = 4 * 2**20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY,
    ts    REAL NOT NULL,
    job   TEXT NOT NULL,
    kind  TEXT NOT NULL,
    step  INTEGER,
    seq   INTEGER,
    data  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job, id);
CREATE INDEX IF NOT EXISTS events_kind_ts ON events (kind, ts);
CREATE TABLE IF NOT EXISTS job_state (
    job    TEXT PRIMARY KEY,
    ts     REAL NOT NULL,
    live   INTEGER NOT NULL,
    state  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_state (
    job    TEXT NOT NULL,
    run_id TEXT NOT NULL,
    ts     REAL NOT NULL,
    state  TEXT NOT NULL,
    PRIMARY KEY (job, run_id)
);
"""

#: Earlier runs' states kept per job (:meth:`Journal.retire_state`), newest first.
RETIRED_PER_JOB = 4


#: The columns of each table, as ``_SCHEMA`` creates them (checked at open).
_COLUMNS = {
    "events": ("id", "ts", "job", "kind", "step", "seq", "data"),
    "job_state": ("job", "ts", "live", "state"),
    "run_state": ("job", "run_id", "ts", "state"),
}


def _remedy(path: str) -> str:
    """What to do with a journal that fails its check."""
    return (f"move it aside (with its -wal and -shm files) to start with a new journal, "
            f"or salvage its events with `sqlite3 {path} .recover | sqlite3 NEW.db`")


class JournalError(RuntimeError):
    """The journal file cannot be used (corrupt, not a database, locked)."""


class JournalMissing(JournalError):
    """A journal opened to be read does not exist."""


def _readonly_uri(path: str) -> str:
    """The URI that opens ``path`` for reading only, creating nothing.

    A reader of a WAL database creates its ``-wal`` and ``-shm`` files when they are
    missing, and leaves them behind. They are missing only when no writer has the journal
    open (the last one to close removes them); the file is then read as ``immutable``,
    without locks or side files. A ``trimtab serve`` starting in the middle of that read
    could make it fail, never corrupt the journal.
    """
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return uri if os.path.exists(path + "-wal") else uri + "&immutable=1"


@dataclass(frozen=True)
class Event:
    """One journal row."""

    id: int
    ts: float
    job: str
    kind: str
    step: int | None
    seq: int | None
    data: dict[str, Any]


class Journal:
    """Append-only event log and job-state store over one SQLite file.

    Writes go into one open transaction that :meth:`commit` ends. The server handles the
    messages that are ready in one transaction (:meth:`batch`, a bounded number) and sends
    their replies once it committed, so a message's events land together or not at all,
    and whatever a client was told (a command and its sequence number) is in the journal.
    """

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._db = None
        if readonly and not os.path.isfile(path):
            raise JournalMissing(f"no journal at {path}; trimtab serve writes it (see --journal)")
        try:
            if readonly:
                self._db = sqlite3.connect(_readonly_uri(path), uri=True, isolation_level=None,
                                           check_same_thread=False)
            else:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives a process kill; only power loss
                # may lose the last transactions, never corrupt the file.
                self._db.execute("PRAGMA synchronous=NORMAL")
                # The WAL file is truncated to this after each checkpoint, not left at its
                # high-water size (a fleet trial: 9.6 MB beside a 20 MB journal).
                self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            self._check()
        except sqlite3.OperationalError as exc:  # locked, unreadable, no such directory
            self._close_quietly()
            raise JournalError(f"journal {path!r} cannot be opened: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not a database, malformed
            self._close_quietly()
            raise JournalError(
                f"journal {path!r} cannot be opened: {exc}; {_remedy(path)}") from None
        except JournalError:
            self._close_quietly()
            raise
        self._in_tx = False
        self._batching = False
        #: The wall clock events are stamped with (and retention measures ages by).
        self.clock: Callable[[], float] = time.time
        #: Called with the seconds each commit took (the controller's metrics observe it).
        self.on_commit: Callable[[float], None] | None = None

    def _check(self) -> None:
        """At open: SQLite's ``quick_check`` (every page and index entry readable and
        consistent; linear in the file's size), then the tables a journal has."""
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise JournalError(f"journal {self.path!r} failed its integrity check: "
                               f"{'; '.join(problems)}; {_remedy(self.path)}")
        for table, columns in _COLUMNS.items():
            found = tuple(r[1] for r in self._db.execute(f"PRAGMA table_info({table})"))
            if found and found != columns:
                raise JournalError(
                    f"{self.path!r} is an SQLite database but not a trimtab journal: table "
                    f"{table!r} has columns {found}, a journal's has {columns}; give "
                    "--journal a new file")
            if not found and self.readonly:  # a writer would create it; a reader cannot
                raise JournalError(f"{self.path!r} is an SQLite database but not a trimtab "
                                   f"journal: it has no table {table!r}")
        if not self.readonly:
            self._db.executescript(_SCHEMA)

    def _close_quietly(self) -> None:
        if self._db is not None:
            self._db.close()

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def append(
        self, job: str, kind: str, *, step: int | None = None, seq: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> int:
        """Add one event; returns its id. Visible to readers after :meth:`commit`."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"journal event kind {kind!r} is not one of {EVENT_KINDS}")
        text = _dumps(data or {}, kind, job)
        self._begin()
        cur = self._db.execute(
            "INSERT INTO events (ts, job, kind, step, seq, data) VALUES (?, ?, ?, ?, ?, ?)",
            (self.clock(), job, kind, step, seq, text),
        )
        self._autocommit_if_idle()
        return int(cur.lastrowid)

    def save_state(self, job: str, state: dict[str, Any], *, live: bool = True) -> None:
        """Store a job's latest ``state_dict()`` (replacing the previous one)."""
        text = _dumps(state)
        self._begin()
        self._db.execute(
            "INSERT INTO job_state (job, ts, live, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(job) DO UPDATE SET ts=excluded.ts, live=excluded.live, "
            "state=excluded.state",
            (job, self.clock(), int(live), text),
        )
        self._autocommit_if_idle()

    def _autocommit_if_idle(self) -> None:
        if not self._batching:
            self.commit()

    def batch(self) -> _Batch:
        """``with journal.batch():`` groups writes into one transaction."""
        return _Batch(self)

    def commit(self) -> None:
        if self._in_tx:
            t0 = time.perf_counter()
            self._db.execute("COMMIT")
            self._in_tx = False
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - t0)

    def retire_state(self, job: str, run_id: str, state: dict[str, Any]) -> None:
        """Keep the state of a run that another run of the job replaces (a new process
        registered): if the old run is resumed from the user's checkpoint, the controller
        takes it back up (:meth:`load_run_state`). The newest :data:`RETIRED_PER_JOB` per
        job are kept."""
        self._begin()
        self._db.execute(
            "INSERT INTO run_state (job, run_id, ts, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(job, run_id) DO UPDATE SET ts=excluded.ts, state=excluded.state",
            (job, run_id, self.clock(), _dumps(state)))
        self._db.execute(
            "DELETE FROM run_state WHERE job = ? AND run_id NOT IN (SELECT run_id FROM "
            "run_state WHERE job = ? ORDER BY ts DESC, rowid DESC LIMIT ?)",
            (job, job, RETIRED_PER_JOB))
        self._autocommit_if_idle()

    def load_run_state(self, job: str, run_id: str) -> dict[str, Any] | None:
        """The state of run ``run_id`` of ``job``: the job's current one, or a retired one."""
        current = self.load_state(job)
        if current is not None and current.get("run_id") == run_id:
            return current
        row = self._db.execute("SELECT state FROM run_state WHERE job = ? AND run_id = ?",
                               (job, run_id)).fetchone()
        return json.loads(row[0]) if row else None

    def load_state(self, job: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT state FROM job_state WHERE job = ?", (job,)).fetchone()
        return json.loads(row[0]) if row else None

    def last_heard(self, job: str) -> float | None:
        """The time (the journal's clock) of ``job``'s newest event; None: it has none."""
        row = self._db.execute("SELECT ts FROM events WHERE job = ? ORDER BY id DESC LIMIT 1",
                               (job,)).fetchone()
        return None if row is None else float(row[0])

    def states(self, *, live_only: bool = False) -> dict[str, dict[str, Any]]:
        """Every stored job state, by job."""
        sql = "SELECT job, state FROM job_state" + (" WHERE live = 1" if live_only else "")
        return {job: json.loads(s) for job, s in self._db.execute(sql)}

    def state_summaries(self) -> dict[str, tuple[bool, float, dict[str, Any]]]:
        """Per job: whether live, when saved, and the few fields of its saved state that
        ``trimtab jobs`` shows (``step``, ``effective``, ``alert``, ``paused``), read by
        SQLite's JSON functions: a state is ~20-30 KB, its signals' history mostly."""
        rows = self._db.execute(
            "SELECT job, live, ts, json_extract(state, '$.step'), "
            "json_extract(state, '$.effective'), json_extract(state, '$.rollback.alert'), "
            "json_extract(state, '$.paused') FROM job_state")
        return {job: (bool(live), ts, {
            "step": step, "effective": json.loads(eff) if eff else None, "alert": alert,
            "paused": json.loads(paused) if paused else None})
            for job, live, ts, step, eff, alert, paused in rows}

    def events(
        self, job: str | None = None, kind: str | None = None, *, after_id: int = 0,
    ) -> list[Event]:
        """Events in order, optionally for one job and/or of one kind."""
        return list(self.iter_events(job, kind, after_id=after_id))

    def iter_events(
        self, job: str | None = None, kind: str | None = None, *, after_id: int = 0,
        bare: frozenset[str] = frozenset(),
    ) -> Iterator[Event]:
        """Events in order, optionally for one job and/or of one kind; those of the kinds
        in ``bare`` without their data (``{}``: not read, not decoded; most of a journal's
        bytes are its reports', which a reader of steps and times never needs)."""
        data = "data" if not bare else (
            "CASE WHEN kind IN (" + ",".join("?" * len(bare)) + ") THEN '{}' ELSE data END")
        sql = f"SELECT id, ts, job, kind, step, seq, {data} FROM events WHERE id > ?"
        args: list[Any] = [*sorted(bare), after_id]
        if job is not None:
            sql, args = sql + " AND job = ?", [*args, job]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        for row in self._db.execute(sql + " ORDER BY id", args):
            yield Event(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]))

    def jobs(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT job FROM events ORDER BY job")]

    def compact(self, cfg: RetentionConfig, now: float | None = None,
                limit: int | None = None) -> dict[str, int]:
        """Apply the retention rules (:mod:`~trimtab.controller.retention`) at ``now``
        (default: the time now), deleting at most ``limit`` rows (None: all that are due);
        returns the rows deleted, by rule (none left due when the counts sum below
        ``limit``)."""
        now = self.clock() if now is None else now
        left = limit
        deleted: dict[str, int] = {}
        for what, select, args in plan_sql(cfg, now):
            if left is not None and left <= 0:
                break
            cap = "" if left is None else f" LIMIT {int(left)}"
            self._begin()
            cur = self._db.execute(f"DELETE FROM events WHERE id IN ({select}{cap})", args)
            self._autocommit_if_idle()
            deleted[what] = cur.rowcount
            if left is not None:
                left -= cur.rowcount
        if cfg.ended_state_s > 0 and (left is None or left > 0):
            old = now - cfg.ended_state_s
            cap = "" if left is None else f" LIMIT {int(left)}"
            n = 0
            for table, where in (("job_state", "live = 0 AND ts < ?"), ("run_state", "ts < ?")):
                self._begin()
                cur = self._db.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid "
                                       f"FROM {table} WHERE {where}{cap})", (old,))
                self._autocommit_if_idle()
                n += cur.rowcount
                if left is not None:
                    left -= cur.rowcount
                    cap = f" LIMIT {max(int(left), 0)}"
            deleted["ended job states"] = n
        return deleted

    def vacuum(self) -> None:
        """Give the pages of deleted rows back to the file system (rewrites the file)."""
        self.commit()
        self._db.execute("VACUUM")

    def has_job(self, job: str) -> bool:
        """Whether any event of ``job`` is in the journal (one index lookup)."""
        return self._db.execute("SELECT 1 FROM events WHERE job = ? LIMIT 1",
                                (job,)).fetchone() is not None

    def close(self) -> None:
        if not self.readonly:
            self.commit()
        self._db.close()


def no_such_job(journal: Journal, job: str, limit: int = 20) -> str:
    """What to say of a job ``journal`` has no event of: the jobs it has (at most ``limit``
    named, however many there are) and the names closest to the one given.

    >>> j = Journal(":memory:")
    >>> for name in ("gpt-small", "gpt-large", "mlp"):
    ...     _ = j.append(name, "register")
    >>> no_such_job(j, "gpt-smal")
    "no job 'gpt-smal' in journal ':memory:' (jobs in it: ...); did you mean 'gpt-small'?"
    >>> no_such_job(j, "x", limit=2)
    "no job 'x' in journal ':memory:' (jobs in it: gpt-large, gpt-small and 1 more)"
    """
    jobs = journal.jobs()
    if not jobs:
        return f"no job {job!r} in journal {journal.path!r}: it holds no events yet"
    close = difflib.get_close_matches(job, jobs, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"no job {job!r} in journal {journal.path!r} ({named_jobs(jobs, limit)}){hint}"


def named_jobs(jobs: list[str], limit: int = 20) -> str:
    """``jobs`` for a message, at most ``limit`` of them named.

    >>> named_jobs(["a", "b", "c"], limit=2)
    'jobs in it: a, b and 1 more'
    """
    if not jobs:
        return "no jobs in it"
    more = f" and {len(jobs) - limit} more" if len(jobs) > limit else ""
    return f"jobs in it: {', '.join(jobs[:limit])}{more}"


class _Batch:
    """One transaction; a batch inside another joins the outer one, which commits."""

    def __init__(self, journal: Journal) -> None:
        self._j = journal
        self._outer = False

    def __enter__(self) -> Journal:
        self._outer = self._j._batching
        self._j._batching = True
        return self._j

    def __exit__(self, *exc: object) -> None:
        self._j._batching = self._outer
        if not self._outer:
            self._j.commit()
