"""trimtab's client: attach a running PyTorch training loop to a trimtab controller.

>>> from trimtab.client import attach
>>> guard = attach(model, optimizer, job="gpt-small", clip=1.0)  # doctest: +SKIP
>>> for batch in data:  # doctest: +SKIP
...     loss = model(batch).loss
...     optimizer.zero_grad()
...     loss.backward()
...     guard.step(loss)  # instead of optimizer.step()
>>> guard.close()  # doctest: +SKIP

Checkpoints and rollback: ``attach(..., checkpoint_every=100, keep=3,
checkpoint_dir="ckpt", scheduler=sched, on_rollback=loader_seek)``; the loop's own stateful
objects (an EMA or SWA model of its own, a second scheduler) are rolled back with the model
when handed over as ``extra_state={"swa": swa_model, "swa_sched": swalr}``. Resuming from
your own checkpoint in a new process: save ``guard.state_dict()`` in it, and call
``guard.load_state_dict(...)`` after ``attach`` and your other ``load_state_dict`` calls
(see :mod:`trimtab.client._resume`); from trimtab's own files,
``load_stable("ckpt").restore(model, optimizer, sched, extra_state={...})`` (a model
sharded with FSDP2: ``step = load_sharded("ckpt", model, optimizer, sched)`` on every rank,
then ``guard.load_state_dict(sharded_guard_state("ckpt", step))``).

A loop that cannot change: ``attach(..., hooks=True)`` guards the loop's own
``optimizer.step()`` through the optimizer's step hooks, with ``guard.observe_loss(loss)``;
Lightning and Hugging Face callbacks: ``trimtab.client.lightning``, ``trimtab.client.hf``
(see docs/adapters.md).

Many jobs across several controllers: ``attach(..., endpoint=shard_endpoint(job,
endpoints))`` picks each job's controller by its id (see docs/distributed.md).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._checkpoint import Checkpoint, CheckpointStore, load_stable
    from ._dist import shard_endpoint
    from ._guard import Guard, attach, hook_sigterm
    from ._sharded import load_sharded, sharded_guard_state

__all__ = ["attach", "Guard", "hook_sigterm", "Checkpoint", "CheckpointStore", "load_stable",
           "load_sharded", "sharded_guard_state", "shard_endpoint", "__version__"]

try:
    __version__ = version("trimtab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # torch is imported on first use of attach/Guard: importing this package stays cheap.
    if name in ("attach", "Guard", "hook_sigterm"):
        from . import _guard

        return getattr(_guard, name)
    if name in ("Checkpoint", "CheckpointStore", "load_stable"):
        from . import _checkpoint

        return getattr(_checkpoint, name)
    if name in ("load_sharded", "sharded_guard_state"):
        from . import _sharded

        return getattr(_sharded, name)
    if name == "shard_endpoint":
        from . import _dist

        return _dist.shard_endpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
