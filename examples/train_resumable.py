"""A training run that survives preemption: it saves its own checkpoint, and resumes from it.

Start the controller, run this script, kill it (``kill -9``, a spot instance reclaimed),
run it again with the same arguments:

    trimtab serve &
    python examples/train_resumable.py --job resumable --steps 2000 --ckpt run.pt
    # ... killed ...
    python examples/train_resumable.py --job resumable --steps 2000 --ckpt run.pt

The second run finds ``run.pt`` and resumes from it: the model, optimizer and LR
scheduler from their own ``state_dict``, trimtab's part (the lr multiplier, momentum,
clip and schedules the controller put in force, the step counters, the run's identity on
the controller) from ``guard.state_dict()``. The controller follows the same run,
resumed at the saved step. The lines marked ``trimtab`` are all it takes.

The checkpoint is written atomically (a temporary file renamed over the old one), so a
kill during the save leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from trimtab.client import attach


def batch(step: int, x: torch.Tensor, y: torch.Tensor, size: int):
    """The batch of a step: a function of the step, so a resumed run draws what the
    uninterrupted one would have."""
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, len(x), (size,), generator=g)
    return x[idx], y[idx]


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="resumable")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--ckpt", type=Path, default=Path("resumable.pt"))
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g)) + 0.05 * torch.randn(4096, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    guard = attach(model, opt, job=args.job, endpoint=args.endpoint,  # trimtab
                   scheduler=sched, clip=1.0)
    if args.ckpt.exists():
        saved = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        guard.load_state_dict(saved["trimtab"])  # trimtab: after the others, before a step
        print(f"resumed at step {guard.global_step}", flush=True)

    with guard:
        while guard.global_step < args.steps:
            xb, yb = batch(guard.global_step, x, y, 64)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)  # trimtab: instead of opt.step()
            sched.step()
            step = guard.global_step
            if step % args.save_every == 0:
                save(args.ckpt, model=model.state_dict(), optimizer=opt.state_dict(),
                     scheduler=sched.state_dict(),
                     trimtab=guard.state_dict())  # trimtab: its part of the checkpoint
                print(f"saved step {step} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    print(f"done at step {guard.global_step}: loss {final:.4f}", flush=True)


if __name__ == "__main__":
    main()
