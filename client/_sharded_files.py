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
written atomically) and deletes the directories the host ring no longer keeps.
:func:`load_sharded` resumes a freshly built FSDP model and its optimizer from the
newest stable complete directory.

>>> step_name(200)
'step-000000000200'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future
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

__all__ = ["ShardedFiles", "load_sharded", "step_name", "STABLE_FILE"]

log = logging.getLogger("trimtab.client")

#: Rank 0's list of stable steps in a sharded ``checkpoint_dir``.
STABLE_FILE = "stable.json"
_FORMAT = 1


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
        self._marked = False  # stable.json is an earlier process's until this one marks

    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        self._wait(step)  # an older save of the same step (before a rollback) goes first
        path = self.directory / step_name(step)
        result = dcp.async_save(state, checkpoint_id=path, process_group=self.group)
        self._futures[step] = getattr(result, "upload_completion", result)

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
        if self.rank == 0:
            for s in doomed:
                shutil.rmtree(self.directory / step_name(s), ignore_errors=True)

    def mark(self, stable: list[int]) -> None:
        """Rank 0: record ``stable`` in ``stable.json`` (atomic: temporary file, rename)."""
        self._stable = list(stable)
        self._marked = True
        if self.rank == 0:
            body = json.dumps({"format": _FORMAT, "stable": self._stable}).encode()
            try:
                atomic_write(self.directory / STABLE_FILE, lambda f: f.write(body))
            except OSError as exc:
                log.warning("trimtab could not write %s: %s", STABLE_FILE, exc)

    def drop_after(self, step: int, stable: list[int]) -> None:
        """After a rollback to ``step``: wait for the saves in flight (a rollback already
        stops the run), then rank 0 deletes every newer directory."""
        for s in list(self._futures):
            self._wait(s)
        doomed = [s for s in self._saved if s > step]
        self._saved.difference_update(doomed)
        if self.rank == 0:
            for s in doomed:
                shutil.rmtree(self.directory / step_name(s), ignore_errors=True)
        if self._marked or stable:  # an earlier process's list stays until this one marks
            self.mark(stable)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the saves in flight; False when one did not finish in time."""
        for s in list(self._futures):
            self._wait(s, timeout_s)
        return not self._futures


def load_sharded(
    directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int | None:
    """Load the newest stable, complete sharded checkpoint in ``directory`` into ``model``
    (already ``fully_shard``-ed as when it was saved) and ``optimizer``; its step, or
    ``None`` when none loads. A collective: call it on every rank.

    A directory without DCP's ``.metadata`` (a save cut short) or that fails to load is
    skipped with a WARNING and the next older stable one is tried.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    try:
        meta = json.loads((directory / STABLE_FILE).read_bytes())
        stable = [int(s) for s in meta["stable"]]
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
        return step
    return None
