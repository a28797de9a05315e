"""One process of a resumable run (tests/integration/test_resume.py runs it).

``python -m tests.integration.resume_worker ENDPOINT WORKDIR --until N [--save-at S]
[--resume] [--die] [--spike-at K]``: trains a small regression attached to the controller
at ENDPOINT up to step N (its batches a function of the step, so that any process draws
the same one at the same step), saving ``{"model", "optimizer", "scheduler", "trimtab"}``
to WORKDIR/ckpt.pt at step S. ``--resume`` starts from that file (with ``--files``, the
run writes trimtab's own checkpoint files to WORKDIR/ckpt, and ``--resume`` starts from
the newest stable one, the guard's state with it); ``--die`` ends the
process at step N without closing the guard (a preemption); ``--spike-at K`` runs the 3
steps from step K on at 300x the lr, once (a bug in the loop). It writes
WORKDIR/<name>.json: the knobs each step used, the final loss on the whole data set, the
guard's run id and its rollbacks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from trimtab.client import attach

JOB = "resumable"


def batch(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, len(x), (64,), generator=g)
    return x[idx], y[idx]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--until", type=int, required=True)
    ap.add_argument("--save-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die", action="store_true")
    ap.add_argument("--name", default="run")
    ap.add_argument("--spike-at", type=int, help="the loop's own bug: lr x300 for 3 steps")
    ap.add_argument("--files", action="store_true",
                    help="checkpoint_dir=WORKDIR/ckpt; --resume from trimtab's own files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.3 * torch.randn(1024, 1, generator=g)
    torch.manual_seed(0 if not args.resume else 123)  # a resumed process starts elsewhere
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    guard = attach(model, opt, job=JOB, endpoint=args.endpoint, report_every=5,
                   heartbeat_s=0.05, checkpoint_every=25, scheduler=sched, clip=5.0,
                   checkpoint_dir=args.workdir / "ckpt" if args.files else None)
    if args.resume and args.files:
        from trimtab.client import load_stable

        ckpt = load_stable(args.workdir / "ckpt")
        ckpt.restore(model, opt, sched)
        guard.load_state_dict(ckpt.guard_state)
    elif args.resume:
        saved = torch.load(args.workdir / "ckpt.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        guard.load_state_dict(saved["trimtab"])
    # Wait for the controller's registration reply (its schedule) before the first step.
    import time
    deadline = time.monotonic() + 20
    while not guard.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    used = []
    step, spiked = guard.global_step, 0
    while step < args.until:
        xb, yb = batch(step, x, y)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        spike = args.spike_at is not None and step >= args.spike_at and spiked < 3
        spiked += spike  # once: a rollback's replay of the steps does not repeat the bug
        if spike:
            lrs = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                group["lr"] *= 300
        guard.step(loss)
        if spike:
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr
        sched.step()
        step = guard.global_step
        used.append([step, guard.knobs.model_dump(), guard.applied_seq])
        time.sleep(0.004)  # the controller answers within a step or two
        if step == args.save_at:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "trimtab": guard.state_dict()},
                       args.workdir / "ckpt.pt")
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    out = {"used": used, "final": final, "run_id": guard.run_id, "step": step,
           "checkpoints": guard.checkpoints, "rollbacks": guard.rollbacks}
    (args.workdir / f"{args.name}.json").write_text(json.dumps(out))
    if args.die:
        time.sleep(0.3)  # its last reports reach the controller; then it is gone
        os._exit(0)
    guard.close()


if __name__ == "__main__":
    main()
