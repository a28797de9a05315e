"""Lockstep: the benchmark's way to make a trimtab run repeatable (never the library's).

The client never waits for the controller: a command lands at whichever step boundary
follows its arrival, so on a loaded machine two runs of one seed can take a command a
few steps apart and then differ. In lockstep the *benchmark loop* waits after each step
that sent a report: until the controller's journal holds that report and, when the
controller answered it with a command, until the command sits in the client's slot, so
it applies at the very next step whatever the machine's load. That is what a real run
sees whenever a step takes longer than the controller's reply (milliseconds). The
journal is read through its own read-only SQLite connection (WAL lets it read while the
controller writes); the client library is not changed.

It reads two private attributes of the guard (the report counter and the command slot):
this is a benchmark harness, pinned to this repository's client.

>>> ls = Lockstep("journal.db", guard)  # doctest: +SKIP
>>> guard.step(loss); ls.after_step()  # doctest: +SKIP
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

__all__ = ["Lockstep"]

#: Give up waiting on one message after this long (counted in ``timeouts``): a wedged
#: controller must not hang the benchmark.
TIMEOUT_S = 10.0
_POLL_S = 0.0005


class Lockstep:
    """Wait, after each report, until the controller has answered it (see the module)."""

    def __init__(self, journal: str, guard: Any, timeout_s: float = TIMEOUT_S) -> None:
        self.guard = guard
        self.timeout_s = timeout_s
        self._db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=timeout_s)
        self._seen = guard._report_seq
        #: Waits that gave up after ``timeout_s``.
        self.timeouts = 0
        #: Seconds spent waiting.
        self.waited_s = 0.0
        # Register first: the controller's job state starts from the registration.
        self._after = self._wait(
            "SELECT id FROM events WHERE job = ? AND kind = 'register' "
            "AND json_extract(data, '$.run_id') = ? ORDER BY id DESC LIMIT 1",
            (guard.job, guard.run_id)) or 0

    def _wait(self, sql: str, args: tuple) -> Any:
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        try:
            while True:
                row = self._db.execute(sql, args).fetchone()
                if row is not None:
                    return row[0]
                if time.perf_counter() > deadline:
                    self.timeouts += 1
                    return None
                time.sleep(_POLL_S)
        finally:
            self.waited_s += time.perf_counter() - t0

    def after_step(self) -> None:
        """Call after every ``guard.step()``; returns at once unless it sent a report."""
        seq = self.guard._report_seq
        if seq == self._seen:
            return
        self._seen = seq
        job = self.guard.job
        report = self._wait("SELECT id FROM events WHERE job = ? AND kind = 'report' AND "
                            "seq = ? AND id > ? ORDER BY id LIMIT 1", (job, seq, self._after))
        if report is None:
            return
        self._after = report
        # The command a report brings is journaled in the same transaction as the report.
        row = self._db.execute("SELECT seq FROM events WHERE job = ? AND kind = 'command' "
                               "AND id > ? ORDER BY id LIMIT 1", (job, report)).fetchone()
        if row is None:
            return
        t0 = time.perf_counter()
        while not self._arrived(row[0]):
            if time.perf_counter() - t0 > self.timeout_s:
                self.timeouts += 1
                break
            time.sleep(_POLL_S)
        self.waited_s += time.perf_counter() - t0

    def _arrived(self, seq: int) -> bool:
        slot = self.guard._transport._command
        return self.guard.applied_seq >= seq or (slot is not None and slot.seq >= seq)

    def close(self) -> None:
        self._db.close()
