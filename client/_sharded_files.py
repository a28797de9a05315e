"""Sharded checkpoint files: DCP directories written in the background, and resuming.

:class:`~trimtab.client._sharded.ShardedStore` holds each rank's shards in host memory;
with a ``checkpoint_dir`` it also hands every snapshot to :class:`ShardedFiles`, kept
here apart from the snapshots because it is file I/O with a life of its own (DCP's
background thread, a process group of its own, rank 0's bookkeeping on disk), and
because :func:`load_sharded` reads the same layout back without a guard.

Every snapshot is saved with ``torch.distributed.checkpoint.async_save`` to
``checkpoint_dir/step-<N>/`` (12-digit ``N``), over a gloo process group of its own so
that its collectives never interleave with training's: the state is staged to host
memory before the call returns and written by DCP's background thread. A directory
counts only once DCP's coordinator has renamed its ``.metadata`` into place, which it
does after every rank wrote its part. Rank 0 keeps ``stable.json`` (the stable steps,
written atomically), writes each directory's ``trimtab.pt`` and deletes the directories
the host ring no longer keeps, all on an I/O thread of its own, in order: the training
thread only serializes the small host part (a file's fsync on a network filesystem can
take tens of ms).
:func:`load_sharded` resumes a freshly built FSDP model and its optimizer from the
newest stable complete directory.

>>> step_name(200)
'step-000000000200'
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._checkpoint_files import atomic_write

try:  # DCP's failures are BaseExceptions: they must be caught by name
    from torch.distributed.checkpoint.api import CheckpointException as _DCPError
except ImportError:  # pragma: no cover - torch without distributed checkpointing
    class _DCPError(Exception):  # type: ignore[no-redef]
        pass

__all__ = ["ShardedFiles", "load_sharded", "sharded_guard_state", "step_name", "STABLE_FILE",
           "RESUME_FILE"]

log = logging.getLogger("trimtab.client")

#: Rank 0's list of stable steps in a sharded ``checkpoint_dir``.
STABLE_FILE = "stable.json"
#: In each step directory, rank 0's host part of the snapshot: the guard's state to resume
#: the same run from it (run id, counters, values in force), the scheduler's state.
RESUME_FILE = "trimtab.pt"
_FORMAT = 1


def _read_resume(path: Path) -> dict[str, Any] | None:
    """The host part of the step directory ``path`` (None: none, or unreadable)."""
    try:
        data = torch.load(path / RESUME_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # an unreadable one is no state to resume from
        log.warning("trimtab sharded checkpoint %s: %s unreadable (%s)", path, RESUME_FILE, exc)
        return None
    return data if isinstance(data, dict) and data.get("format") == _FORMAT else None


def _stable_steps(directory: Path) -> list[int]:
    """The steps ``stable.json`` lists; raises ``OSError``, ``ValueError``, ``KeyError`` or
    ``TypeError`` when it is missing or unreadable."""
    return [int(s) for s in json.loads((directory / STABLE_FILE).read_bytes())["stable"]]


def _run_of(path: Path) -> str | None:
    resume = _read_resume(path)
    run = None if resume is None else resume.get("run")
    return run.get("run_id") if isinstance(run, dict) else None


def step_name(step: int) -> str:
    """The directory of the sharded checkpoint at ``step``."""
    return f"step-{step:012d}"


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file()


class ShardedFiles:
    """DCP directories of one :class:`~trimtab.client._sharded.ShardedStore`, written by
    DCP's background thread.

    Every rank calls every method at the same step (the saves are collectives over this
    writer's own gloo group); only rank 0 writes ``stable.json`` and deletes directories,
    and only directories whose save it has seen finish (which means every rank's did).
    """

    def __init__(self, directory: str | os.PathLike, keep: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # A group of its own: the background saves' collectives never meet training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._futures: dict[int, Future] = {}
        self._saved: set[int] = set()
        self._stable: list[int] = []
        # Stable directories taken over from an earlier process of the run (see adopt):
        # kept as they are, not saved over by this process's snapshot of the same step.
        self._kept: set[int] = set()
        self._marked = False  # stable.json is an earlier process's until this one marks
        # Rank 0's file work (trimtab.pt, stable.json, deletions), in the order asked for.
        self._io = (ThreadPoolExecutor(1, thread_name_prefix="trimtab-sharded-io")
                    if self.rank == 0 else None)

    def _rank0(self, work: Callable[[], None]) -> Future | None:
        """Rank 0: do ``work`` on the I/O thread, after what was asked before (inline once
        closed); other ranks: nothing."""
        if self.rank != 0:
            return None
        if self._io is None:
            work()
            return None
        return self._io.submit(work)

    def save(self, step: int, state: dict[str, Any],
             resume: dict[str, Any] | None = None) -> None:
        """Save ``state`` (every rank's shards: a collective) to the step's directory and,
        on rank 0, ``resume`` (host values) beside it."""
        import torch.distributed.checkpoint as dcp

        if step in self._kept:
            return  # the stable directory of this step stays (see adopt)
        self._wait(step)  # an older save of the same step (before a rollback) goes first
        path = self.directory / step_name(step)
        if resume is not None:
            self.write_resume(step, resume)
        result = dcp.async_save(state, checkpoint_id=path, process_group=self.group)
        self._futures[step] = getattr(result, "upload_completion", result)

    def write_resume(self, step: int, resume: dict[str, Any], wait: bool = False) -> None:
        """Rank 0: write the host part of the step's snapshot (atomic), serialized now and
        written on the I/O thread (``wait``: before this returns); a failure is logged,
        never raised (the run goes on; the directory then resumes as a new run)."""
        if self.rank != 0:
            return
        buf = io.BytesIO()
        torch.save(resume, buf)
        body = buf.getvalue()
        path = self.directory / step_name(step)

        def write() -> None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                atomic_write(path / RESUME_FILE, lambda f: f.write(body))
            except Exception as exc:
                log.warning("trimtab could not write %s of step %d: %s", RESUME_FILE, step,
                            exc)

        done = self._rank0(write)
        if wait and done is not None:
            done.result()

    def restate(self, step: int, resume: dict[str, Any]) -> None:
        """Rank 0: write the step's host part again (restated after a rollback to it), where
        this writer saved the step's directory or is saving it; one not saved yet gets it
        with its save."""
        if step in self._saved or step in self._futures:
            self.write_resume(step, resume, wait=True)

    def adopt(self, run_id: str, step: int) -> bool:
        """A process resuming run ``run_id`` at ``step`` takes over the run's directories
        here: the one at ``step`` (complete) is this writer's from now on, kept as it is
        (stable: not saved over; ``True`` when ``stable.json`` lists it), and the run's
        others, those after ``step`` the trajectory the resume left, are deleted (rank 0).
        Directories of other runs, and those with no ``trimtab.pt``, are left alone."""
        try:
            stable = set(_stable_steps(self.directory))
        except (OSError, ValueError, KeyError, TypeError):
            stable = set()
        mine = []
        for path in sorted(self.directory.glob("step-*")):
            try:
                s = int(path.name.split("-", 1)[1])
            except ValueError:
                continue
            if _run_of(path) == run_id:
                mine.append(s)
        here = step in mine and _complete(self.directory / step_name(step))
        if here:
            self._saved.add(step)
            if step in stable:
                self._kept.add(step)
        doomed = [s for s in mine if s != step or not here]
        if self.rank == 0:
            for s in doomed:
                shutil.rmtree(self.directory / step_name(s), ignore_errors=True)
            if doomed:
                log.info("trimtab: run %s resumed at step %d; its other sharded checkpoints "
                         "(%s) are deleted", run_id, step, ", ".join(map(str, doomed)))
        return here and step in stable

    def _wait(self, step: int, timeout_s: float | None = None) -> None:
        future = self._futures.pop(step, None)
        if future is None:
            return
        try:
            future.result(timeout_s)
            self._saved.add(step)
        except (Exception, _DCPError) as exc:  # a failed write costs a file, never the run
            log.warning("trimtab sharded checkpoint save of step %d failed: %s", step, exc)

    def poll(self, held: list[int]) -> None:
        """Collect finished saves; rank 0 deletes what the ring (``held``) no longer keeps."""
        for step in [s for s, f in self._futures.items() if f.done()]:
            self._wait(step)
        doomed = [s for s in self._saved if s not in held]
        for s in doomed:
            self._saved.discard(s)
            self._kept.discard(s)
        self._delete(doomed)

    def _delete(self, steps: list[int]) -> None:
        """Rank 0: delete the directories of ``steps`` (on the I/O thread)."""
        if steps:
            directory = self.directory
            self._rank0(lambda: [shutil.rmtree(directory / step_name(s), ignore_errors=True)
                                 for s in steps])

    def mark(self, stable: list[int]) -> None:
        """Rank 0: record ``stable`` in ``stable.json`` (atomic: temporary file, rename)."""
        self._stable = list(stable)
        self._marked = True
        body = json.dumps({"format": _FORMAT, "stable": self._stable}).encode()
        path = self.directory / STABLE_FILE

        def write() -> None:
            try:
                atomic_write(path, lambda f: f.write(body))
            except OSError as exc:
                log.warning("trimtab could not write %s: %s", STABLE_FILE, exc)

        self._rank0(write)

    def drop_after(self, step: int, stable: list[int]) -> None:
        """After a rollback to ``step``: wait for the saves in flight (a rollback already
        stops the run), then rank 0 deletes every newer directory."""
        for s in list(self._futures):
            self._wait(s)
        doomed = [s for s in self._saved if s > step]
        self._saved.difference_update(doomed)
        self._kept = {s for s in self._kept if s <= step}
        self._delete(doomed)
        if self._marked or stable:  # an earlier process's list stays until this one marks
            self.mark(stable)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the saves in flight, then for rank 0's file work; False when one did
        not finish in time."""
        for s in list(self._futures):
            self._wait(s, timeout_s)
        done = self._rank0(lambda: None)
        if done is not None:
            try:
                done.result(timeout_s)
            except TimeoutError:
                return False
        return not self._futures

    def close(self, timeout_s: float | None = None) -> bool:
        """:meth:`flush`, then stop the I/O thread (what comes after is done inline)."""
        flushed = self.flush(timeout_s)
        if self._io is not None:
            self._io.shutdown(wait=flushed)
            self._io = None
        return flushed


def load_sharded(
    directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
) -> int | None:
    """Load the newest stable, complete sharded checkpoint in ``directory`` into ``model``
    (already ``fully_shard``-ed as when it was saved), ``optimizer`` and ``scheduler`` (when
    given and saved); its step, or ``None`` when none loads. A collective: call it on every
    rank. Then ``guard.load_state_dict(sharded_guard_state(directory, step))`` resumes the
    same run at that step.

    A directory without DCP's ``.metadata`` (a save cut short) or that fails to load is
    skipped with a WARNING and the next older stable one is tried.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    try:
        stable = _stable_steps(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "trimtab: no readable %s in %s (%s); nothing loaded", STABLE_FILE, directory, exc
        )
        return None
    for step in sorted(stable, reverse=True):
        path = directory / step_name(step)
        if not _complete(path):
            log.warning("trimtab sharded checkpoint %s skipped: incomplete (no .metadata)", path)
            continue
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, _DCPError) as exc:  # CheckpointException is a BaseException
            log.warning("trimtab sharded checkpoint %s skipped: %s", path, exc)
            continue
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        resume = _read_resume(path)
        if scheduler is not None and resume is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        return step
    return None


def sharded_guard_state(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """What ``guard.load_state_dict`` takes to resume the same run from the sharded
    checkpoint at ``step`` (as :attr:`Checkpoint.guard_state` for an unsharded one); None
    when its directory holds none (a save of an older trimtab)."""
    from ._snapshot import Checkpoint

    resume = _read_resume(Path(directory) / step_name(step))
    if resume is None or not isinstance(resume.get("run"), dict):
        return None
    # The host part as a checkpoint without tensors: its guard_state is the unsharded one's.
    return Checkpoint(step=step, model={}, optimizer={}, scheduler=None, rng={},
                      counters=dict(resume.get("counters") or {}),
                      controls=dict(resume.get("controls") or {}), run=resume["run"],
                      resume=resume.get("resume"),
                      scheduler_stepped=bool(resume.get("scheduler_stepped"))).guard_state
