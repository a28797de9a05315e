"""One controller per journal: an advisory lock beside the journal file.

Two ``trimtab serve`` processes writing one journal would each keep their own job states
and overwrite each other's (SQLite keeps the file consistent, not the controllers'
beliefs). The server takes an exclusive ``flock`` on ``JOURNAL.lock`` for its lifetime
and writes its pid there; a second one is refused with the holder's pid. The lock goes
with the process (a killed controller holds nothing), so no stale lock is ever left to
clean up. Read-only commands (``trimtab decisions``) take no lock.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "journal.db")
>>> first = JournalLock(path)
>>> try:
...     JournalLock(path)
... except JournalError as exc:
...     print("in use by another trimtab serve" in str(exc))
True
>>> os.symlink(path, path + ".link")
>>> try:
...     JournalLock(path + ".link")
... except JournalError as exc:
...     print("in use by another trimtab serve" in str(exc))
True
>>> first.release()
"""

from __future__ import annotations

import contextlib
import os

from trimtab.controller.journal import JournalError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]

__all__ = ["JournalLock"]


class JournalLock:
    """Held from construction until :meth:`release` (or the process ends)."""

    def __init__(self, journal: str,
                 busy_advice: str = "stop that one, or give this one another --journal"
                 ) -> None:
        #: What the refusal tells the person, when another trimtab holds the journal.
        self.busy_advice = busy_advice
        # The journal's real path: another name for the same file (a symlink, a path
        # through one) must meet the same lock.
        self.path = (None if journal == ":memory:"
                     else f"{os.path.realpath(journal)}.lock")
        self._fd: int | None = None
        if self.path is None or fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"journal lock {self.path!r} cannot be opened: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalError(
                f"journal {journal!r} is in use by another trimtab serve (pid {holder}; lock "
                f"{self.path}); {self.busy_advice}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
