"""Do no harm on a loss plateau: a tanh MLP whose loss sits near its initial value for
its first 100-150 steps, at good lrs, bare and attached to the defaults.

    python -m bench.plateau [--lrs 0.05,0.1] [--seeds 6] [--steps 300]

Found by a sweep trial (an optuna study of this model, 300-step trials): the default
``lr_range_test`` read the plateau's noise (a report's mean loss 5-7% above the first
report's, one or two standard errors) as "the loss rose", swept the run from step 0 and
ended it near its initial loss. The regression: 16 inputs, a target mixing a sine of a
projection and a product of two inputs, 1536 training points; two hidden layers of 256
tanh units, SGD with momentum 0.9, batch 128, reports every 10 steps, snapshots every 30.
Printed: the validation MSE per seed, bare and attached, and the runs the range test
swept. A real ``trimtab serve`` subprocess on loopback, its defaults.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch
from torch import nn

from bench._serve import Controller
from trimtab.client import attach


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = (torch.sin(2 * x @ w / 4.0) + 0.3 * (x[:, :1] * x[:, 1:2])
         + 0.05 * torch.randn(2048, 1, generator=g))
    return x[:1536], y[:1536], x[1536:], y[1536:]


def run(lr: float, seed: int, steps: int, endpoint: str | None) -> tuple[float, int]:
    """The validation MSE after ``steps``, and the rollbacks (attached: ``endpoint``)."""
    xtr, ytr, xva, yva = _data()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    guard = (None if endpoint is None else
             attach(model, opt, job=f"plateau-lr{lr:g}-s{seed}", endpoint=endpoint,
                    report_every=10, checkpoint_every=30))
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        idx = torch.randint(0, xtr.shape[0], (128,), generator=g)
        loss = nn.functional.mse_loss(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        if guard is None:
            opt.step()
        else:
            guard.step(loss)
    with torch.no_grad():
        val = nn.functional.mse_loss(model(xva), yva).item()
    rollbacks = 0 if guard is None else guard.rollbacks
    if guard is not None:
        guard.close()
    return val, rollbacks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.plateau")
    ap.add_argument("--lrs", default="0.05,0.1")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# bench.plateau: {platform.machine()}, torch {torch.__version__}, Python "
          f"{platform.python_version()}; {args.steps} steps, seeds 0..{args.seeds - 1}; "
          "trimtab config: defaults")
    print("| lr | seed | bare | attached | ratio | rollbacks |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp)
        try:
            for lr in (float(x) for x in args.lrs.split(",")):
                for seed in range(args.seeds):
                    bare, _ = run(lr, seed, args.steps, None)
                    attached, rollbacks = run(lr, seed, args.steps, ctl.endpoint)
                    print(f"| {lr:g} | {seed} | {bare:.4f} | {attached:.4f} | "
                          f"{attached / bare:.3f} | {rollbacks} |", flush=True)
        finally:
            ctl.stop()


if __name__ == "__main__":
    main()
