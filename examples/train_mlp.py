"""A small real training run attached to a trimtab controller.

Start the controller, then run this script; every knob change the controller commands
is printed as the loop sees it:

    trimtab serve &
    python examples/train_mlp.py --job demo --steps 3000
    trimtab decisions --job demo

The task is a two-class spiral (made here, nothing downloaded) learned by a small MLP
with SGD + momentum. The three lines marked ``trimtab`` are all the loop needs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from trimtab.client import attach


def spirals(n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=g) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * math.pi)
    angle = t + label * math.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    return x + noise * torch.randn(n, 2, generator=g), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="demo")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = spirals(4096, 0.02, g)
    xv, yv = spirals(1024, 0.02, g)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    guard = attach(model, opt, job=args.job, endpoint=args.endpoint,  # trimtab
                   report_every=args.report_every, batch_size=args.batch_size)
    lr_seen = guard.knobs.lr
    t0 = time.perf_counter()
    with guard:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (args.batch_size,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)  # trimtab: clip, step, probe, apply commands between steps
            # What the step ran with: the loop's own lr times trimtab's multiplier (the
            # optimizer's param group holds the loop's own lr between steps).
            lr = guard.knobs.lr
            if lr != lr_seen:
                print(f"step {guard.global_step}: lr {lr_seen:.4g} -> {lr:.4g} "
                      f"(trimtab's multiplier x{guard.scale.lr:.3g})")
                lr_seen = lr
    with torch.no_grad():
        val = torch.nn.functional.cross_entropy(model(xv), yv).item()
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    print(f"done: {guard.global_step} steps in {time.perf_counter() - t0:.1f} s, "
          f"validation loss {val:.4f}, accuracy {acc:.3f}, final lr {lr_seen:.4g}, "
          f"reports dropped {guard.dropped_reports}")


if __name__ == "__main__":
    main()
