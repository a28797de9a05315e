"""Checkpoint files: written atomically off the training thread, checksummed, bounded.

A checkpoint at step ``s`` is two files in the directory:

* ``ckpt-<s>.pt``: the payload, ``torch.save``\\ d;
* ``ckpt-<s>.json``: its manifest, ``{"format", "step", "file", "bytes", "sha256",
  "stable", "written_ns", "run"}``; the SHA-256 is that of the ``.pt`` file's bytes,
  ``run`` the run id on the controller (``None``: a snapshot that holds no guard state);
* ``ckpt-<s>.resume.json``, once a rollback restored it: the guard's state to resume from
  it with (:meth:`CheckpointFiles.restate`).

Each file is written to a temporary file in the same directory, flushed and fsynced,
renamed over its final name with ``os.replace`` (atomic on POSIX and Windows), and the
directory is fsynced. The manifest goes second: it is the commit point, so a write
killed at any moment leaves either no manifest (the checkpoint does not exist) or a
complete, checksummed one. Loading reads the bytes once, checks size and checksum, and
only then unpickles them; a mismatch or an unreadable file is logged as a WARNING that
names the file and the reason, and is skipped, never loaded. Deleting goes the other
way (manifest first). A directory belongs to one run; this writer lists, prunes and
deletes only the checkpoints it wrote itself, and those of its own run that it takes over
when the run resumes in a new process (:meth:`CheckpointFiles.adopt`).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     files = CheckpointFiles(d, keep=2)
...     print(files.steps(), scan(d))
...     files.close()
[] []
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from trimtab.protocol.ring import kept

__all__ = ["CheckpointFiles", "read_payload", "scan", "unfileable", "WRITER_THREAD", "FORMAT"]

log = logging.getLogger("trimtab.client")

#: The name of the thread that writes checkpoint files.
WRITER_THREAD = "trimtab-checkpoint-writer"
#: Version of the payload and manifest layout.
FORMAT = 1
_MANIFEST = re.compile(r"^ckpt-(\d{12,})\.json$")
_TEMP_PREFIX = ".trimtab-"


class Writable(Protocol):
    """What the writer needs of a checkpoint (``Checkpoint`` in ``_checkpoint``)."""

    step: int
    stable: bool
    writing: bool
    run: dict[str, Any] | None
    resume: dict[str, Any] | None

    def payload(self) -> dict[str, Any]: ...


def data_name(step: int) -> str:
    return f"ckpt-{step:012d}.pt"


def manifest_name(step: int) -> str:
    return f"ckpt-{step:012d}.json"


def resume_name(step: int) -> str:
    """The restated guard state of the checkpoint at ``step`` (see
    :meth:`CheckpointFiles.restate`)."""
    return f"ckpt-{step:012d}.resume.json"


class _Hashing:
    """A write-only file wrapper that hashes what goes through it (one pass over the bytes)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.sha, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform (Windows); skip there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    """Write ``path`` via a fsynced temporary file and ``os.replace``; return (sha256, size)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMP_PREFIX}{path.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            hashing = _Hashing(f)
            write(hashing)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return hashing.sha.hexdigest(), hashing.size


def _run_id(ckpt: Writable) -> str | None:
    run = ckpt.run
    return run.get("run_id") if isinstance(run, dict) else None


def _write_manifest(directory: Path, step: int, digest: str, size: int, stable: bool,
                    run: str | None) -> None:
    # written_ns: when (wall clock) it was written or marked stable; the newest stable one
    # is the newest marked, whatever its step (an earlier run's files, or an abandoned
    # trajectory's left by a process that resumed from an older save, may have higher ones).
    # run: whose it is, so that a process resuming the run takes its files over.
    body = {"format": FORMAT, "step": step, "file": data_name(step), "bytes": size,
            "sha256": digest, "stable": stable, "written_ns": time.time_ns(), "run": run}
    atomic_write(directory / manifest_name(step), lambda f: f.write(json.dumps(body).encode()))


def _read_manifest(directory: Path, step: int) -> dict[str, Any] | None:
    path = directory / manifest_name(step)
    try:
        meta = json.loads(path.read_bytes())
        ok = (isinstance(meta, dict) and meta.get("format") == FORMAT
              and meta.get("step") == step and meta.get("file") == data_name(step)
              and isinstance(meta.get("sha256"), str) and isinstance(meta.get("bytes"), int)
              and isinstance(meta.get("stable"), bool)
              and isinstance(meta.get("run"), (str, type(None))))
        if not ok:
            raise ValueError(f"not a trimtab checkpoint manifest of step {step}")
    except (OSError, ValueError) as exc:
        log.warning("trimtab checkpoint manifest %s skipped: unreadable (%s); "
                    "its checkpoint is not loaded", path, exc)
        return None
    return meta


def read_payload(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """The payload of the checkpoint at ``step``, or ``None`` (with a WARNING) when its
    manifest or file is missing, unreadable or fails its checksum."""
    directory = Path(directory)
    meta = _read_manifest(directory, step)
    if meta is None:
        return None
    path = directory / meta["file"]
    try:
        data = path.read_bytes()  # read once: what is checked is exactly what is loaded
    except OSError as exc:
        log.warning("trimtab checkpoint file %s skipped: unreadable (%s); not loaded", path, exc)
        return None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != meta["bytes"] or digest != meta["sha256"]:
        log.warning("trimtab checkpoint file %s skipped: checksum mismatch (SHA-256 %s, %d "
                    "bytes; manifest says %s, %d bytes): corrupt or incomplete; not loaded",
                    path, digest[:16], len(data), meta["sha256"][:16], meta["bytes"])
        return None
    try:
        # weights_only=True: the payload is plain containers, numbers, strings and tensors,
        # so no arbitrary pickle runs even for a file that matches its (forgeable) checksum.
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("trimtab checkpoint file %s skipped: cannot be loaded with "
                    "weights_only=True (%s); not loaded", path, exc)
        return None
    if not isinstance(payload, dict) or (payload.get("format"), payload.get("step")) != (
        FORMAT, step
    ):
        log.warning("trimtab checkpoint file %s skipped: not a trimtab checkpoint of step %d",
                    path, step)
        return None
    try:  # restated after a rollback restored it (see CheckpointFiles.restate)
        restated = json.loads((directory / resume_name(step)).read_bytes())
    except FileNotFoundError:
        restated = None
    except (OSError, ValueError) as exc:
        log.warning("trimtab checkpoint %s: %s unreadable (%s); it resumes with the state "
                    "of when it was taken", path, resume_name(step), exc)
        restated = None
    if isinstance(restated, dict) and restated.get("step") == step:
        payload["resume"] = restated.get("resume")
    return payload


def _skeleton(obj: Any) -> Any:
    """``obj`` with every tensor replaced by an empty one of its dtype: what a file's loader
    meets in it, without its data."""
    if isinstance(obj, torch.Tensor):
        try:
            return torch.empty(0, dtype=obj.dtype)
        except Exception:  # a dtype that has no empty tensor: its data loads as any tensor's
            return torch.empty(0)
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)((k, _skeleton(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_skeleton(v) for v in obj)
    return obj


def unfileable(state: Any) -> str | None:
    """Why ``state`` (a ``state_dict``) cannot go in a checkpoint file, which loads with
    ``weights_only=True`` (containers, numbers, strings, tensors), or ``None``: it can.
    Its structure is saved and loaded without the tensors' data: cheap, and no device read.

    >>> unfileable({"step": 3, "w": torch.zeros(2), "names": ["a"]}) is None
    True
    >>> print(unfileable({"when": object()}))  # doctest: +ELLIPSIS
    Unsupported global: GLOBAL ...object was not an allowed global by default
    """
    buffer = io.BytesIO()
    try:
        torch.save(_skeleton(state), buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", text)
        return (found[1] if found else f"{type(exc).__name__}: {text.splitlines()[0]}")[:300]
    return None


@dataclass(frozen=True)
class Entry:
    """A committed checkpoint on disk, as its manifest says; ``written``: when its manifest
    was written or marked stable (ns since the epoch; 0 for a manifest of an older trimtab
    that did not say); ``run``: the run id it belongs to (``None``: not said)."""

    step: int
    stable: bool
    written: int = 0
    run: str | None = None


def scan(directory: str | os.PathLike) -> list[Entry]:
    """Checkpoints committed in ``directory`` (a manifest that parses), oldest first."""
    directory = Path(directory)
    entries = []
    for name in os.listdir(directory):
        match = _MANIFEST.match(name)
        if match and (meta := _read_manifest(directory, int(match[1]))) is not None:
            written = meta.get("written_ns")
            entries.append(Entry(meta["step"], meta["stable"],
                                 written if isinstance(written, int) else 0, meta.get("run")))
    return sorted(entries, key=lambda e: e.step)


@dataclass
class _Job:
    kind: str  # "write", "mark", "delete", "prune", "stop"
    ckpt: Writable | None = None
    steps: tuple[int, ...] = ()
    generation: int = 0


class CheckpointFiles:
    """The files of one :class:`~trimtab.client._checkpoint.CheckpointStore`.

    Every method is called from the training thread and only queues work (except
    :meth:`load`); one background thread, ``trimtab-checkpoint-writer``, does all
    writing and deleting, in order. On disk it keeps the ``keep`` newest checkpoints
    plus the newest one its manifest marks stable.
    """

    def __init__(self, directory: str | os.PathLike, keep: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._busy = False
        self._disk: dict[int, bool] = {}  # step -> stable, for what this writer committed
        # Stable files taken over from an earlier process of the run (see adopt): kept as
        # they are, not written again by this process's snapshot at the same step.
        self._kept_stable: set[int] = set()
        self._generation = 0
        self._floors: dict[int, int] = {}  # generation -> the step its rollback returned to
        self._thread: threading.Thread | None = None
        #: Queued work waits while held (see :meth:`hold`).
        self._held = False
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Temporary files of a writer that was killed: never committed, never to be read.
        for name in os.listdir(self.directory):
            if name.startswith(_TEMP_PREFIX) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / name)

    # -- training-thread side ---------------------------------------------------------------

    def _put(self, job: _Job) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=WRITER_THREAD,
                                                daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._cond.notify_all()

    def write(self, ckpt: Writable) -> None:
        """Queue ``ckpt`` for writing (it must be complete: host copies finished)."""
        with self._cond:
            if ckpt.step in self._kept_stable:
                return  # the stable file of this step stays (see adopt)
        self._put(_Job("write", ckpt, generation=self._generation))

    def adopt(self, run_id: str, step: int) -> list[Entry]:
        """A process resuming run ``run_id`` at ``step`` takes over the files the run's
        earlier processes left in the directory: those up to ``step`` are this writer's from
        now on (listed, kept and pruned as if it had written them; the stable ones stay
        stable, and a stable one at ``step`` itself is not written over by the snapshot of
        the resumed state, so that a process killed before its first stable mark leaves the
        step it resumed from to resume from again); those after ``step`` belong to the
        trajectory the resume left, and are deleted, as a rollback's are. Other runs' files,
        and an older trimtab's that name no run, are left alone. Returns the entries taken
        over, oldest first."""
        entries = [e for e in scan(self.directory) if e.run == run_id]
        mine = [e for e in entries if e.step <= step]
        after = tuple(e.step for e in entries if e.step > step)
        with self._cond:
            for e in mine:
                self._disk.setdefault(e.step, e.stable)
                if e.stable:
                    self._kept_stable.add(e.step)
        if after:
            log.info("trimtab: run %s resumed at step %d; its checkpoints after that step "
                     "(%s), the trajectory left behind, are deleted", run_id, step,
                     ", ".join(map(str, after)))
            self._put(_Job("delete", steps=after))
        if mine:
            self._put(_Job("prune"))
        return mine

    def mark(self, step: int) -> None:
        """Queue marking the checkpoint at ``step`` stable in its manifest."""
        self._put(_Job("mark", steps=(step,)))

    def restate(self, ckpt: Writable) -> None:
        """Write ``ckpt``'s ``resume`` state beside it now, on the calling thread: a
        rollback restored it, and the run goes on from it with the rollback's values. A
        small JSON file, written atomically (``ckpt-<s>.resume.json``, read with the
        checkpoint); not queued behind a checkpoint being written, so that a process killed
        a step after the rollback resumes with them (a re-trial lost the cut 2 times in 14
        to a kill 1 step after it, the queued rewrite not yet done). A failure is logged."""
        body = json.dumps({"step": ckpt.step, "resume": ckpt.resume}).encode()
        try:
            atomic_write(self.directory / resume_name(ckpt.step), lambda f: f.write(body))
        except Exception as exc:
            log.warning("trimtab could not write %s: %s; a process resumed from it goes on "
                        "with the state of when it was taken", resume_name(ckpt.step), exc)

    def forget(self, ckpt: Writable, cancel: bool = True) -> bool:
        """``ckpt`` left the memory ring: drop its queued write unless it is stable (or
        ``cancel`` is False: it lives on as a file). True when the writer no longer
        touches it (its buffers may be reused)."""
        with self._cond:
            if cancel and not ckpt.stable:
                self._jobs = collections.deque(j for j in self._jobs if j.ckpt is not ckpt)
            return not ckpt.writing and all(j.ckpt is not ckpt for j in self._jobs)

    def drop_after(self, step: int) -> None:
        """After a rollback to ``step``: forget and delete every newer checkpoint."""
        with self._cond:
            self._generation += 1
            self._floors[self._generation] = step
            self._jobs = collections.deque(
                j for j in self._jobs if not (j.kind == "write" and j.ckpt.step > step))
            doomed = tuple(s for s in self._disk if s > step)
            for s in doomed:
                del self._disk[s]
            self._kept_stable = {s for s in self._kept_stable if s <= step}
        if doomed:
            self._put(_Job("delete", steps=doomed))

    def steps(self) -> list[int]:
        """Steps committed on disk by this writer, oldest first."""
        with self._cond:
            return sorted(self._disk)

    def stable_steps(self) -> list[int]:
        """Committed steps whose manifest says stable, oldest first."""
        with self._cond:
            return sorted(s for s, stable in self._disk.items() if stable)

    def has(self, step: int) -> bool:
        with self._cond:
            return step in self._disk

    def load(self, step: int) -> dict[str, Any] | None:
        """The verified payload at ``step`` (read on the calling thread), or ``None``."""
        if not self.has(step):
            return None
        return read_payload(self.directory, step)

    def hold(self) -> None:
        """Queue work without doing it until :meth:`release`: the guard holds the snapshot
        it takes at attach until the first step, so that a loop resuming from this directory
        (``load_stable`` between ``attach`` and the first step) reads the earlier run's files
        as they were, not one this run is writing over at the same step."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        """Do the work queued while held, and what comes after."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is done (released first); False on timeout."""
        self.release()
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout_s)

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Finish the queued work (at most ``timeout_s``) and stop the thread."""
        if self._thread is None or not self._thread.is_alive():  # none, or stopped before
            return
        if not self.flush(timeout_s):
            log.warning("trimtab checkpoint writer did not finish within %s s", timeout_s)
        self._put(_Job("stop"))
        self._thread.join(1.0)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs) and not self._held)
                job = self._jobs.popleft()
                if job.kind == "stop":
                    return
                self._busy = True
                if job.ckpt is not None:
                    job.ckpt.writing = True
            try:
                getattr(self, f"_do_{job.kind}")(job)
            except Exception as exc:  # a failed write must never reach training
                log.warning("trimtab checkpoint %s of step %s failed: %s; the previous "
                            "checkpoints stay as they were", job.kind,
                            job.ckpt.step if job.ckpt else job.steps, exc)
            finally:
                with self._cond:
                    if job.ckpt is not None:
                        job.ckpt.writing = False
                    self._busy = False
                    self._cond.notify_all()

    def _stale(self, step: int, generation: int) -> bool:
        """Whether a rollback since ``generation`` returned to a step before ``step``."""
        return any(floor < step for g, floor in self._floors.items() if g > generation)

    def _do_write(self, job: _Job) -> None:
        ckpt = job.ckpt
        assert ckpt is not None
        step, path = ckpt.step, self.directory / data_name(ckpt.step)
        payload = ckpt.payload()
        digest, size = atomic_write(path, lambda f: torch.save(payload, f))
        with self._cond:
            stale = self._stale(step, job.generation)  # a trajectory rolled back meanwhile
            stable = ckpt.stable
        if not stale:
            # A state restated for an earlier file of this step is not this one's; this
            # one's, restated before it was written, is written again after the removal (a
            # restate from now on writes its own).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / resume_name(step))
            if ckpt.resume is not None:
                self.restate(ckpt)
            _write_manifest(self.directory, step, digest, size, stable, _run_id(ckpt))
            with self._cond:
                # Checked again under the lock: a rollback during the manifest write must
                # not see this step listed afterwards (it belongs to the abandoned run).
                stale = self._stale(step, job.generation)
                if not stale:
                    self._disk[step] = stable
        if stale:
            self._do_delete(_Job("delete", steps=(step,)))
            return
        self._prune()

    def _do_mark(self, job: _Job) -> None:
        step = job.steps[0]
        with self._cond:
            # Not on disk yet: its write reads ckpt.stable when it commits. Already stable: done.
            if step not in self._disk or self._disk[step]:
                return
        meta = _read_manifest(self.directory, step)
        if meta is None:
            return
        _write_manifest(self.directory, step, meta["sha256"], meta["bytes"], True,
                        meta.get("run"))
        with self._cond:
            if step in self._disk:
                self._disk[step] = True
        self._prune()

    def _do_delete(self, job: _Job) -> None:
        for step in job.steps:
            # Manifest first: without it the data file is never read, whatever happens next.
            for name in (manifest_name(step), data_name(step), resume_name(step)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        _fsync_dir(self.directory)

    def _do_prune(self, job: _Job) -> None:
        self._prune()

    def _prune(self) -> None:
        with self._cond:
            steps = sorted(self._disk)
            stable = [s for s in steps if self._disk[s]]
            # The newest stable one survives any crash.
            keep = kept(steps, stable[-1] if stable else None, self.keep)
            doomed = tuple(s for s in steps if s not in keep)
            for s in doomed:
                del self._disk[s]
            self._kept_stable -= set(doomed)
        if doomed:
            self._do_delete(_Job("delete", steps=doomed))
