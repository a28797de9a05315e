"""Sharded parameters (FSDP2's ``fully_shard``): global norms, snapshots and DCP files.

A model whose parameters are DTensors sharded over a 1-D device mesh (every module
wrapped with ``torch.distributed.fsdp.fully_shard``) switches the guard into sharded
mode (:func:`is_sharded`); each rank then holds only its shard of every parameter,
gradient and optimizer state.

* **Gradient norm.** Each rank's gradients are shards, so the global norm is
  ``sqrt(sum over ranks of the squared local norms)``: per step one ``all_reduce`` (SUM)
  of the per-group squared local norms, on the device, queued like FSDP's own
  reduce-scatter (no host sync). It cannot wait for the report: the clip in force scales
  every shard by ``clip / global norm`` and a non-finite gradient on any rank's shard must
  skip the step on every rank, both at this step. ``torch.nn.utils.clip_grad_norm_`` on
  the DTensor gradients computes the same global norm (its ``_NormPartial`` reduction);
  the guard's one all-reduce serves the probe, the clip and the skip at once, where
  ``clip_grad_norm_`` would add a second. The norms are then the same on every rank, so
  the report's mean over ranks (:meth:`DistLink.reduce_rows`) leaves them as they are.
* **Snapshots** (:class:`ShardedStore`). ``get_state_dict(model, optimizer)`` (sharded
  DTensor state, optimizer state keyed by parameter name); every rank keeps host copies
  of its own local shards plus each DTensor's mesh, placements, shape and stride, and a
  rollback rebuilds the DTensors and loads them with ``set_state_dict``. The rollback
  step comes from rank 0's broadcast command, so every rank restores the same step.
* **Files** (``checkpoint_dir``). Every snapshot is also saved with
  ``torch.distributed.checkpoint.async_save`` to ``checkpoint_dir/step-<N>/`` (12-digit
  ``N``), over a gloo process group of its own so that its collectives never interleave
  with training's: the state is staged to host memory before the call returns and
  written by DCP's background thread. A directory counts only once DCP's coordinator has
  renamed its ``.metadata`` into place, which it does after every rank wrote its part.
  Rank 0 keeps ``stable.json`` (the stable steps, written atomically) and deletes the
  directories the host ring no longer keeps. :func:`load_sharded` resumes a freshly
  built FSDP model and its optimizer from the newest stable complete directory.

Supported: every parameter a DTensor on one 1-D mesh with a ``Shard`` placement
(``fully_shard`` on a 1-D mesh); HSDP, tensor parallelism and FSDP1
(``FullyShardedDataParallel``) are refused at attach.

>>> model = torch.nn.Linear(2, 1)
>>> is_sharded(model)
False
>>> step_name(200)
'step-000000000200'
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._checkpoint import Checkpoint, CheckpointStore, capture_rng, restore_rng
from ._checkpoint_files import atomic_write
from ._host_copy import _HostCopier
from ._probe import Grads

__all__ = ["is_sharded", "ShardNorms", "ShardedStore", "load_sharded", "step_name"]

log = logging.getLogger("trimtab.client")

#: Rank 0's list of stable steps in a sharded ``checkpoint_dir``.
STABLE_FILE = "stable.json"
_FORMAT = 1


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2); raises for layouts the
    guard cannot reduce (some parameters sharded and some not, a mesh of more than one
    dimension, a placement other than ``Shard``), naming the parameter."""
    dtensor = _dtensor_type()
    # Loaded already wherever a model was wrapped with it: no import of FSDP here.
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(
            f"model={type(model).__name__} is wrapped in FullyShardedDataParallel (FSDP1); "
            "allowed: FSDP2 (torch.distributed.fsdp.fully_shard), DDP or a plain module"
        )
    params = list(model.named_parameters())
    if dtensor is None or not any(isinstance(p, dtensor) for _, p in params):
        return False
    for name, p in params:
        if not isinstance(p, dtensor):
            raise ValueError(
                f"parameter {name!r} is a plain tensor in a model with DTensor parameters; "
                "allowed: every parameter sharded (fully_shard the root module too)"
            )
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or not placements[0].is_shard():
            raise ValueError(
                f"parameter {name!r} has placements={placements!r} on a "
                f"{p.device_mesh.ndim}-D mesh; allowed: one Shard placement on a 1-D mesh "
                "(fully_shard); HSDP and tensor parallelism are not supported"
            )
    return True


class ShardNorms:
    """The probe's view of sharded parameters: local shards, and norms made global.

    ``group``: the process group the parameters are sharded over (``None``: the default
    group); :meth:`of` takes it from a model's device mesh.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._dtensor = _dtensor_type()

    @classmethod
    def of(cls, model: torch.nn.Module) -> ShardNorms:
        """For a model :func:`is_sharded` accepted: its mesh's process group."""
        return cls(next(model.parameters()).device_mesh.get_group())

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``t`` (a view: in-place changes reach the DTensor)."""
        return t.to_local() if isinstance(t, self._dtensor) else t

    def grads(self, groups: list[dict[str, Any]], device: torch.device) -> Grads:
        """Each group's local gradient shards, all on ``device`` (the mesh's device)."""
        return [
            {device: [self.local(p.grad) for p in g["params"] if p.grad is not None]}
            for g in groups
        ]

    def global_norms(self, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Local 2-norms of shards -> the norms of the whole tensors: one all-reduce (SUM)
        of their squares, queued on the device (no host sync). A NaN or inf on any rank
        makes the result non-finite on every rank."""
        squares = torch.stack(norms).square()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.group)
        return list(squares.sqrt().unbind(0))


# -- snapshots -------------------------------------------------------------------------------


def _split(obj: Any, specs: dict[tuple, tuple], path: tuple = ()) -> Any:
    """``obj`` with every DTensor replaced by its local shard; ``specs`` gets, per path,
    what rebuilds it (mesh, placements, global shape and stride)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(obj, dtensor):
        specs[path] = (obj.device_mesh, tuple(obj.placements), obj.shape, obj.stride())
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _split(v, specs, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_split(v, specs, (*path, i)) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, specs: dict[tuple, tuple], path: tuple = ()) -> Any:
    """The inverse of :func:`_split`, on fresh copies (loading must not alias the snapshot)."""
    if path in specs:
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = specs[path]
        local = obj.to(mesh.device_type, copy=True)
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )
    if isinstance(obj, dict):
        return {k: _join(v, specs, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, specs, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    return obj


class ShardedCheckpoint(Checkpoint):
    """A :class:`~trimtab.client.Checkpoint` of this rank's shards (``get_state_dict``
    layout: the optimizer state keyed by parameter name)."""

    #: Per path in (model, optimizer): what rebuilds the DTensor there.
    specs: dict[tuple, tuple]

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> None:
        """Rebuild the DTensors from the local copies and load them with ``set_state_dict``."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_sd = _join(self.model, self.specs, ("model",))
        optim_sd = _join(self.optimizer, self.specs, ("optimizer",))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        restore_rng(self.rng)

    def payload(self) -> dict[str, Any]:
        raise TypeError("a sharded checkpoint is written with torch.distributed.checkpoint")


class ShardedStore(CheckpointStore):
    """A :class:`~trimtab.client.CheckpointStore` of sharded state: host copies of this
    rank's shards in the ring, DCP directories on disk (``directory``; see the module)."""

    def __init__(self, keep: int = 3, directory: str | os.PathLike | None = None) -> None:
        super().__init__(keep, None)  # the ring; files are DCP's, below
        self.dcp = None if directory is None else ShardedFiles(directory, keep)

    def take(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        clip: float | None = None,
        counters: dict[str, int] | None = None,
        scheduler_stepped: bool = False,
        controls: dict[str, Any] | None = None,
        block: bool = True,
    ) -> Checkpoint:
        """Snapshot this rank's shards at ``step`` (every rank at the same step; its host
        buffers are allocated as it goes, whatever ``block`` says: every rank must take it)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        if self.dcp is not None:  # staged to host memory before it returns
            self.dcp.save(step, {"model": model_sd, "optimizer": optim_sd})
        specs: dict[tuple, tuple] = {}
        local = _split({"model": model_sd, "optimizer": optim_sd}, specs)
        copier = _HostCopier(self._pool, block=True)  # as before: FSDP stages in place
        ckpt = ShardedCheckpoint(
            step=step,
            model=copier(local["model"]),
            optimizer=copier(local["optimizer"]),
            scheduler=None if scheduler is None else copier(scheduler.state_dict()),
            rng=capture_rng(),
            clip=clip,
            counters=dict(counters or {}),
            scheduler_stepped=scheduler_stepped,
            controls=dict(controls or {}),
        )
        ckpt.specs = specs
        return self._admit(ckpt, copier)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing ahead of time: sharded snapshots allocate as they are taken."""

    def poll(self) -> None:
        super().poll()
        if self.dcp is not None:
            self.dcp.poll(self.steps())

    def mark_stable(self, step: int) -> bool:
        if not super().mark_stable(step):
            return False
        if self.dcp is not None:
            self.dcp.mark(self.stable_steps())
        return True

    def _drop_after(self, step: int) -> None:
        super()._drop_after(step)
        if self.dcp is not None:
            self.dcp.drop_after(step, self.stable_steps())

    def flush(self, timeout_s: float | None = None) -> bool:
        return True if self.dcp is None else self.dcp.flush(timeout_s)

    def close(self, timeout_s: float | None = 60.0) -> None:
        if self.dcp is not None:
            self.dcp.flush(timeout_s)


# -- DCP directories -------------------------------------------------------------------------


def step_name(step: int) -> str:
    """The directory of the sharded checkpoint at ``step``."""
    return f"step-{step:012d}"


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file()


class ShardedFiles:
    """DCP directories of one :class:`ShardedStore`, written by DCP's background thread.

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
        except Exception as exc:  # a failed write costs a file, never the run
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
        except Exception as exc:
            log.warning("trimtab sharded checkpoint %s skipped: %s", path, exc)
            continue
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        return step
    return None
