"""``torch.compile``d models: what the guard does with them, and the graph breaks it counts.

The guard never enters a compiled region: it holds no module hooks, and all it does runs
between the loop's ``backward()`` and the optimizer's update (``guard.step``, or the
optimizer's step hooks with ``hooks=True``), in eager mode on the gradients the compiled
backward left. So attaching adds no graph break to a compiled forward or backward; keep
``guard.step(loss)`` outside a compiled function (a compiled training step that calls it
would trace the guard's host logic and break there).

What the guard keeps of a compiled model (``torch.compile(model)`` returns a wrapper,
``OptimizedModule``) is its ``state_dict``: with keys prefixed ``_orig_mod.``, restored
into the same wrapper by a rollback. The wrapper shares its parameters with the original
module, so a rollback's in-place restore is what the compiled code reads next step.

Graph breaks cost a compiled model its speed, and they are easy to miss: the guard reads
dynamo's own count (``torch._dynamo.utils.counters["graph_break"]``, every break dynamo
met compiling in this process, recompilations included) as ``Guard.graph_breaks`` and logs
it once, when a compiled model's first report window closes. Reading it touches no device.

>>> import torch
>>> is_compiled(torch.nn.Linear(2, 1))
False
"""

from __future__ import annotations

import logging
import sys

import torch

__all__ = ["is_compiled", "graph_breaks", "CompileNote"]

log = logging.getLogger("trimtab.client")


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` is, or holds, a ``torch.compile``d module (the ``OptimizedModule``
    wrapper, or a module compiled in place by ``module.compile()``)."""
    dynamo = sys.modules.get("torch._dynamo")  # never imported: nothing was compiled
    if dynamo is None:
        return False
    wrapper = dynamo.eval_frame.OptimizedModule
    return any(isinstance(m, wrapper) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process so far (0 when it never ran)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return 0
    return sum(dynamo.utils.counters["graph_break"].values())


class CompileNote:
    """Logs a compiled model's graph breaks once, at its first report window's end (the
    compiled forward and backward have run by then)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pending = is_compiled(model)

    def window_closed(self, job: str) -> None:
        if not self.pending:
            return
        self.pending = False
        n = graph_breaks()
        if n:
            log.warning("trimtab: job %s runs a torch.compile'd model with %d graph break(s) "
                        "so far (torch._dynamo's count; TORCH_LOGS=graph_breaks shows where)",
                        job, n)
        else:
            log.info("trimtab: job %s runs a torch.compile'd model without graph breaks", job)
