"""A torch.compile'd model trained in mixed precision, attached to a trimtab controller.

Start the controller, then run this script:

    trimtab serve &
    python examples/train_compiled_fp16.py --job fp16-demo --steps 400

The task is a two-class spiral (made here, nothing downloaded) learned by a small
residual MLP, compiled with ``torch.compile`` (``--backend``, default inductor; on a
machine without a C++ compiler use ``--backend aot_eager``) and trained by a fused AdamW.

Precision (``--precision auto``): fp16 autocast with a ``torch.amp.GradScaler`` on CUDA.
On CPU it falls back to bf16 autocast without a scaler: bf16 is the reduced precision
CPU kernels are built for, and it has fp32's exponent range, so nothing overflows and
nothing needs scaling. ``--precision fp16`` asks for fp16 and the scaler on CPU too
(torch supports both there; most CPUs run fp16 matmuls no faster than fp32).

With the scaler the loop keeps its own ``scaler.step(optimizer); scaler.update()`` and
attaches with ``hooks=True`` (see docs/adapters.md): the guard then sees and clips the
unscaled gradients, and a step the scaler skips for an overflow (fp16 runs have some,
more with a large ``--init-scale``) is neither a step nor a fault to trimtab:
``guard.global_step`` counts the updates made. The lines marked ``trimtab`` are all the
loop needs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from trimtab.client import attach


def spirals(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=g) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + label * math.pi
    r = t / (3 * math.pi)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    return x + 0.02 * torch.randn(n, 2, generator=g), label


class Net(torch.nn.Module):
    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(2, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width),
                                torch.nn.GELU()) for _ in range(depth))
        self.out = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32, no autocast)."""
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[choice]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="fp16-demo")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    ap.add_argument("--init-scale", type=float, default=2.0**16,
                    help="the GradScaler's first scale (fp16 only)")
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision(args.precision, device)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = (t.to(device) for t in spirals(4096, g))
    xv, yv = (t.to(device) for t in spirals(1024, g))
    model = torch.compile(Net().to(device), backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    # Disabled (a pass-through) unless fp16: one loop for every precision.
    scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale,
                                  enabled=dtype == torch.float16)

    guard = attach(model, opt, job=args.job, endpoint=args.endpoint,  # trimtab
                   hooks=True, clip=args.clip, report_every=args.report_every,
                   checkpoint_every=args.checkpoint_every, batch_size=args.batch_size)
    t0 = time.perf_counter()
    with guard:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (args.batch_size,), generator=g).to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            guard.observe_loss(loss)  # trimtab: the loss for the coming step's report
            scaler.step(opt)  # the guard's hooks clip, probe and apply commands around it
            scaler.update()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        logits = model(xv).float()
    val = torch.nn.functional.cross_entropy(logits, yv).item()
    acc = (logits.argmax(1) == yv).float().mean().item()
    print(f"done: precision={dtype} backend={args.backend} device={device} "
          f"iterations={args.steps} global_step={guard.global_step} "
          f"scaler_skips={args.steps - guard.global_step} graph_breaks={guard.graph_breaks} "
          f"val_loss={val:.4f} accuracy={acc:.3f} "
          f"reports_dropped={guard.dropped_reports} seconds={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
