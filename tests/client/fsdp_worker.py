"""One rank of an FSDP2 training job attached to a trimtab controller, for test_fsdp.py.

Launched by ``python -m torch.distributed.run --standalone --nproc_per_node=2`` (gloo, CPU).
Every rank trains a small ReLU MLP sharded with ``fully_shard`` (each Linear and the
root) on its own batches, and writes ``rank-<r>.json`` to ``--out``: per ``guard.step()``
the iteration, global step, lr, a SHA-256 of this rank's local shards (parameters and
momentum), a SHA-256 of the full (gathered) parameters, the local loss, the stable step,
the rollbacks, three gradient norms of the whole, gathered gradient: before the step
(the reference for the reported norm), as ``torch.nn.utils.get_total_norm`` computes it
on the DTensor gradients, and after the guard clipped it; and the cosine of the whole
gradient before the step with the opposite of the whole update the step before made (the
reference for the reported update alignment). Once a checkpoint is stable
past step 0 (the same step on every rank), rank 1 alone feeds one batch with a NaN. After the loop,
with ``--checkpoint-dir``, it builds a fresh FSDP model and optimizer, loads the newest
stable DCP directory into them with ``load_sharded`` and logs their local-shard hash.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trimtab.client import attach
from trimtab.client._sharded import load_sharded


def build(mesh, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def local_hash(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """This rank's shards of the parameters and of their momentum buffers."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to_local().numpy().tobytes())
        buf = opt.state.get(p, {}).get("momentum_buffer")
        h.update(b"-" if buf is None else buf.to_local().numpy().tobytes())
    return h.hexdigest()[:16]


def full_hash(model: torch.nn.Module) -> str:
    """The whole parameters, gathered from every rank (a collective)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().full_tensor().numpy().tobytes())
    return h.hexdigest()[:16]


def full_grad_norm(model: torch.nn.Module) -> float:
    """The 2-norm of the whole gradient, gathered (a collective): the unsharded reference."""
    full = [p.grad.full_tensor().double() for p in model.parameters()]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in full])).item()


def full_flat(tensors) -> torch.Tensor:
    """DTensors gathered (a collective) and flattened into one float64 vector."""
    return torch.cat([t.full_tensor().reshape(-1).double() for t in tensors])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cap", type=int, default=1000, help="iterations, at most")
    ap.add_argument("--after", type=int, default=20, help="iterations after the rollback")
    ap.add_argument("--report-every", type=int, default=5)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--drop-grad-at", type=int, default=None,
                    help="rank 1 alone drops its last parameter's gradient at this iteration")
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.3 * torch.randn(512, 1, generator=g)
    model, opt = build(mesh, seed=0)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    restored: list[list] = []

    def on_rollback(step: int) -> None:  # right after the restore, before any new step
        restored.append([step, local_hash(model, opt)])

    guard = attach(
        model,
        opt,
        job=args.job,
        endpoint=args.endpoint,
        report_every=args.report_every,
        checkpoint_every=25,
        clip=args.clip,
        heartbeat_s=0.2,
        on_rollback=on_rollback,
        checkpoint_dir=args.checkpoint_dir,
    )
    rows = [[-1, 0, guard.knobs.lr, local_hash(model, opt), full_hash(model)]]
    if rank == 0:  # the others wait for rank 0 in FSDP's first all-gather
        deadline = time.monotonic() + 60
        while not guard.connected and time.monotonic() < deadline:
            time.sleep(0.01)
    fault_step = fault_iter = None
    after = 0
    update = None  # the whole update the last step made
    for it in range(args.cap):
        idx = torch.randint(0, len(x), (64,), generator=data)
        xb, yb = x[idx], y[idx]
        if fault_step is None and (guard.stable_step or 0) > 0:  # momentum in the state
            fault_step, fault_iter = guard.global_step, it  # the same on every rank
        # Bad batches on one rank until a whole report window is non-finite: persistent (a
        # shorter burst is bad batches the guard's skip absorbs, with no rollback).
        if (fault_iter is not None and it - fault_iter < 2 * args.report_every
                and guard.rollbacks == 0 and rank == 1):
            xb = xb.clone()
            xb[0, 0] = math.nan
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if it == args.drop_grad_at:  # no gathers of this worker's own: a grad is missing
            if rank == 1:
                list(model.parameters())[-1].grad = None  # one rank's gradient, missing
            guard.step(loss)
            rows.append([it, guard.global_step])
            update = None
            continue
        before = full_grad_norm(model)
        dtensor_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        dtensor_norm = dtensor_norm.full_tensor().item()
        grad = full_flat([p.grad for p in model.parameters()])
        align = (None if update is None else
                 torch.nn.functional.cosine_similarity(grad, -update, dim=0).item())
        weights = full_flat([p.detach() for p in model.parameters()])
        guard.step(loss)
        stepped = all(p.grad is not None for p in model.parameters())  # not a rollback
        update = full_flat([p.detach() for p in model.parameters()]) - weights if stepped else None
        clipped = full_grad_norm(model) if stepped else None
        value = loss.item()
        rows.append(
            [
                it,
                guard.global_step,
                guard.knobs.lr,
                local_hash(model, opt),
                full_hash(model),
                value if math.isfinite(value) else None,
                guard.stable_step,
                guard.rollbacks,
                before if math.isfinite(before) else None,
                dtensor_norm if math.isfinite(dtensor_norm) else None,
                clipped if clipped is not None and math.isfinite(clipped) else None,
                align if align is not None and math.isfinite(align) else None,
            ]
        )
        after += guard.rollbacks > 0  # the same on every rank: the rollback is broadcast
        if after > args.after:
            break
    checkpoints = guard.checkpoints
    guard.close()
    out = {
        "rank": rank,
        "rows": rows,
        "restored": restored,
        "fault_step": fault_step,
        "fault_iter": fault_iter,
        "checkpoints": checkpoints,
    }
    if args.checkpoint_dir is not None:
        dist.barrier()  # every rank's saves have finished (close() waited for them)
        out["dirs"] = sorted(os.listdir(args.checkpoint_dir))
        fresh, fresh_opt = build(mesh, seed=1)
        out["fresh_before"] = local_hash(fresh, fresh_opt)
        out["loaded_step"] = load_sharded(args.checkpoint_dir, fresh, fresh_opt)
        out["loaded"] = local_hash(fresh, fresh_opt)
        out["loaded_full"] = full_hash(fresh)
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(out))
    # As in dist_worker: what holds the process group goes first (a fresh-clone run aborted
    # once here with 'terminate called without an active exception' on rank 1, the gloo
    # group's threads torn down during finalization), then every rank leaves its last
    # collective before any tears the group down.
    guard = opt = model = None  # (a closure refers to model and opt: dropped, not deleted)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
