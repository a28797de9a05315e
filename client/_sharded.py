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
* **Update alignment.** Once per report window, on its first step: one ``all_reduce``
  (SUM) of four numbers per rank -- its shards' dot product of gradient and kept update,
  their squared norms, and whether it could measure -- reached by every rank whatever
  its shards hold (:meth:`ShardNorms.sum`; see ``Probe._sharded_alignment``).
* **Snapshots** (:class:`ShardedStore`). ``get_state_dict(model, optimizer)`` (sharded
  DTensor state, optimizer state keyed by parameter name); every rank keeps host copies
  of its own local shards plus each DTensor's mesh, placements, shape and stride, and a
  rollback rebuilds the DTensors and loads them with ``set_state_dict``. The rollback
  step comes from rank 0's broadcast command, so every rank restores the same step.
* **Files** (``checkpoint_dir``). Every snapshot is also saved as a DCP directory
  ``checkpoint_dir/step-<N>/`` in the background; :func:`load_sharded` resumes from the
  newest stable complete one. The file I/O lives in :mod:`trimtab.client._sharded_files`
  (its names are re-exported here).

Supported: every parameter a DTensor on one 1-D mesh with a ``Shard`` placement
(``fully_shard`` on a 1-D mesh); HSDP, tensor parallelism and FSDP1
(``FullyShardedDataParallel``) are refused at attach.

>>> model = torch.nn.Linear(2, 1)
>>> is_sharded(model)
False
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from ._checkpoint import Checkpoint, CheckpointStore, capture_rng, restore_rng
from ._host_copy import _HostCopier
from ._probe import Grads
from ._sharded_files import (
    RESUME_FILE,
    STABLE_FILE,
    ShardedFiles,
    load_sharded,
    sharded_guard_state,
    step_name,
)

__all__ = ["is_sharded", "ShardNorms", "ShardedStore", "load_sharded", "sharded_guard_state",
           "step_name", "ShardedFiles", "STABLE_FILE", "RESUME_FILE"]


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

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks: one all-reduce (SUM), queued on the device."""
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

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

    def resume_file(self) -> dict[str, Any] | None:
        """The host part saved beside its shards (``trimtab.pt``): what resumes the same run
        from its directory (None: it holds no guard state)."""
        if self.run is None:
            return None
        return {"format": 1, "step": self.step, "run": self.run,
                "counters": dict(self.counters), "controls": dict(self.controls),
                "clip": self.clip, "scheduler": self.scheduler,
                "scheduler_stepped": self.scheduler_stepped, "resume": self.resume}

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
        self._dcp_held = False
        self._unsaved: set[int] = set()  # snapshots taken while held, saved at release

    def hold(self) -> bool:
        """As :meth:`CheckpointStore.hold`: snapshots taken from now on are saved only at
        :meth:`release` (the one taken at attach is saved at the first step, not over a
        directory the loop may be loading with ``load_sharded`` before it)."""
        if self.dcp is None:
            return False
        self._dcp_held = True
        return True

    def release(self) -> None:
        """Save what was taken while held and is still in the ring, from its host copy
        (a collective, as every save: every rank releases at the same step)."""
        if not self._dcp_held:
            return
        self._dcp_held = False
        assert self.dcp is not None
        ring = {**{c.step: c for c in self._pending}, **self._held}
        for step in sorted(self._unsaved & set(ring)):
            ckpt = ring[step]
            assert isinstance(ckpt, ShardedCheckpoint)
            for _, event, _ in ckpt._events:  # once, at the first step: its copies done
                event.synchronize()
            self.dcp.save(step, {"model": _join(ckpt.model, ckpt.specs, ("model",)),
                                 "optimizer": _join(ckpt.optimizer, ckpt.specs,
                                                    ("optimizer",))}, ckpt.resume_file())
        self._unsaved.clear()

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
        run: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Snapshot this rank's shards at ``step`` (every rank at the same step; its host
        buffers are allocated as it goes, whatever ``block`` says: every rank must take it)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
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
            run=run,
        )
        ckpt.specs = specs
        if self.dcp is not None and self._dcp_held:
            self._unsaved.add(step)  # saved from its host copy at release
        elif self.dcp is not None:  # staged to host memory before it returns
            self.dcp.save(step, {"model": model_sd, "optimizer": optim_sd}, ckpt.resume_file())
        return self._admit(ckpt, copier)

    def adopt(self, run_id: str, step: int) -> bool:
        """Take over run ``run_id``'s directories as it resumes at ``step`` in this process
        (see :meth:`ShardedFiles.adopt`); True when the one at ``step`` is stable."""
        return self.dcp is not None and self.dcp.adopt(run_id, step)

    def restate(self, step: int, run: dict[str, Any], controls: dict[str, Any]) -> None:
        super().restate(step, run, controls)
        ckpt = self._held.get(step)
        if (self.dcp is not None and isinstance(ckpt, ShardedCheckpoint)
                and ckpt.resume is not None):
            self.dcp.restate(step, ckpt.resume_file())  # type: ignore[arg-type]

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
            self.dcp.close(timeout_s)
