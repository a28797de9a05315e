"""One rank of a DDP training job attached to a trimtab controller, for test_distributed.py.

Launched by ``python -m torch.distributed.run --standalone --nproc_per_node=N`` (gloo, CPU).
Every rank trains the same small ReLU MLP under DistributedDataParallel on its own data and
writes ``rank-<r>.json`` to ``--out``: one row per ``guard.step()`` (iteration, global step,
lr, a SHA-256 of the parameters' bytes, the local loss, stable step, rollbacks and, with
``--ema``, a SHA-256 of the weight average's parameters) and what ``on_rollback`` saw.
Without ``--fault`` it trains ``--iters`` iterations (whole report windows) and, with
``--until-lr-moves``, on until a command has moved the lr. With ``--fault``, once a
checkpoint is stable (the same step on every rank: the mark is broadcast), rank 1 alone
feeds one batch with a NaN: DDP's gradient all-reduce spreads it to every rank, and only the
reduced report shows the NaN loss; with ``--rank-lr`` rank 1 alone writes its own lr x3
for three steps instead, and its replica parts from rank 0's. Every condition that ends
the loop is the same on every rank, so the ranks stop together.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trimtab.client import attach


def param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=100, help="iterations, at least")
    ap.add_argument("--cap", type=int, default=3000, help="iterations, at most")
    ap.add_argument("--until-lr-moves", action="store_true", help="and until the lr changed")
    ap.add_argument("--after", type=int, default=30, help="iterations after the rollback")
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--rank-lr", action="store_true",
                    help="with --fault: rank 1 alone writes lr x3 for 3 steps, no NaN")
    ap.add_argument("--report-every", type=int, default=5)
    ap.add_argument("--uneven", action="store_true", help="rank 1 reports every N+1 steps")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--ema", type=float, default=None, help="attach(..., ema=)")
    ap.add_argument("--die", action="store_true", help="end without close(), as a kill")
    ap.add_argument("--resume-files", action="store_true",
                    help="resume from --checkpoint-dir: load_stable(ranks_agree) + guard_state")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.3 * torch.randn(512, 1, generator=g)
    torch.manual_seed(rank)  # DDP makes every replica rank 0's at construction
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    restored: list[int] = []
    try:
        guard = attach(
            model,
            opt,
            job=args.job,
            endpoint=args.endpoint,
            report_every=args.report_every + (args.uneven and rank == 1),
            checkpoint_every=25,
            heartbeat_s=0.2,
            on_rollback=restored.append,
            checkpoint_dir=args.checkpoint_dir,
            ema=args.ema,
        )
    except ValueError as exc:
        print(f"rank {rank}: attach refused: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(3)
    resumed_at = None
    if args.resume_files:
        from trimtab.client import load_stable

        ckpt = load_stable(Path(args.checkpoint_dir) / f"rank-{rank}", ranks_agree=True)
        ckpt.restore(model, opt)
        guard.load_state_dict(ckpt.guard_state)
        resumed_at = ckpt.step
    average = None if guard.ema_model is None else param_hash(guard.ema_model)
    rows = [[-1, guard.global_step, guard.knobs.lr, param_hash(model), None, None, 0, average]]
    if rank == 0:  # the others wait for rank 0 in DDP's first gradient all-reduce
        deadline = time.monotonic() + 60
        while not guard.connected and time.monotonic() < deadline:
            time.sleep(0.01)
    lr0 = guard.knobs.lr
    fault_step = fault_iter = None
    after = 0
    for it in range(args.cap):
        idx = torch.randint(0, len(x), (64,), generator=data)
        xb, yb = x[idx], y[idx]
        if args.fault and fault_step is None and guard.stable_step is not None:
            fault_step, fault_iter = guard.global_step, it  # the same on every rank
        # Bad batches on one rank until a whole report window is non-finite: persistent (a
        # shorter burst is bad batches the guard's skip absorbs, with no rollback).
        if (fault_iter is not None and it - fault_iter < 2 * args.report_every
                and guard.rollbacks == 0 and rank == 1 and not args.rank_lr):
            xb = xb.clone()
            xb[0, 0] = math.nan
        if args.rank_lr and rank == 1 and fault_iter is not None and guard.rollbacks == 0:
            # The loop's own lr on this rank only: its replica leaves the others for good.
            opt.param_groups[0]["lr"] = 0.15 if it - fault_iter < 3 else 0.05
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
        value = loss.item()
        rows.append(
            [
                it,
                guard.global_step,
                guard.knobs.lr,
                param_hash(model),
                value if math.isfinite(value) else None,
                guard.stable_step,
                guard.rollbacks,
                None if guard.ema_model is None else param_hash(guard.ema_model),
            ]
        )
        # Every condition below is the same on every rank (rollbacks and knobs are in step).
        if args.fault:
            after += guard.rollbacks > 0
            if after > args.after:
                break
        elif it + 1 >= args.iters and (it + 1) % args.report_every == 0:
            if not args.until_lr_moves or guard.knobs.lr != lr0:
                break
    if not args.die:
        guard.close()
    out = {
        "rank": rank,
        "world": dist.get_world_size(),
        "rows": rows,
        "restored": restored,
        "fault_step": fault_step,
        "fault_iter": fault_iter,
        "resumed_at": resumed_at,
        "run_id": guard.run_id,
    }
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(out))
    if args.die:  # a preemption: no close, no Bye; every rank gone at once
        dist.barrier()
        os._exit(0)
    # DDP's reducer holds the process group: dropped only at interpreter exit, after
    # destroy_process_group, the gloo group's threads were torn down during finalization and
    # one 4-rank run in about ten aborted ("terminate called without an active exception").
    # So the model (and what refers to it) goes first, then every rank leaves its last
    # collective before any tears the group down.
    del guard, opt, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
