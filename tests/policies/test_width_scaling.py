"""One configuration, a model and the same model 10x wider, no retuning: real runs.

The task: scikit-learn's digits, an MLP 64-w-w-10 (ReLU, PyTorch's default init), AdamW
(weight decay 0.01), batch 64, 400 steps, at w=32 (3,466 parameters) and w=160 (37,770:
10.9x). The user tunes a fixed LR at w=32 on a small grid and starts both widths from it;
in the standard parametrisation Adam's best LR falls with width, so the wide model needs
a smaller one. trimtab runs with one configuration for both: divergence_guard + plateau
(the default set before lr_range_test joined it) plus ``grad_noise`` (whose measure,
the gradient norm's coefficient of variation, is a ratio of
the job's own signals), every limit at its default (the scale-derived ones included).

Final validation loss / that width's best fixed LR on the grid, as this test printed on a
2-core AMD EPYC VM (torch 2.13.0+cpu, one thread), seeds 0-3: the tuned LR kept fixed at
w=160 ends 2.04x, 1.25x, 1.00x, 1.00x; this configuration ends within 1.31x at both widths
on every seed. The grid's high-LR runs are chaotic: on an earlier VM the same code printed
3.04x, 1.51x, 3.20x, 1.00x for the fixed LR (docs/scale.md has both). So the test runs all
four seeds and asserts what holds on both machines: the fixed LR misses 1.5x on some seed,
and trimtab's configuration is within 1.5x at both widths on every seed.
"""

from __future__ import annotations

import math
import socket
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from bench.tasks._data import digits
from trimtab.client import Guard
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.protocol import wire

pytest.importorskip("sklearn", reason="scikit-learn (in the dev extra) ships the digits data")

SEEDS, STEPS, BATCH = (0, 1, 2, 3), 400, 64
WIDTHS = (32, 160)
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
POLICIES = ("divergence_guard", "plateau", "grad_noise")
#: Final validation loss within this factor of the width's best fixed LR on the grid.
WITHIN = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def train(
    data: tuple[torch.Tensor, ...],
    width: int,
    lr: float,
    tmp_path: Any = None,
    policies: tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[float, float]:
    """(final validation loss, final lr) of one run; with ``policies``, attached to an
    in-process controller that runs them (the guard's reports and acks handed to it as
    frames, its commands put in the guard's command slot, as its transport would)."""
    xt, yt, xv, yv = data
    model = _mlp(width, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(100 + seed)
    guard = ctl = None
    if policies:
        # The policy time budget is off: a loaded test machine must not disable a policy.
        cfg = ControllerConfig(
            journal=str(tmp_path / f"{len(policies)}-w{width}-s{seed}.db"),
            metrics_port=0,
            policy_budget_ms=0,
            policies=[PolicySpec(name=p) for p in policies],
        )
        ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())
        guard = Guard(
            model,
            opt,
            job=f"w{width}",
            batch_size=BATCH,
            endpoint=f"tcp://127.0.0.1:{_free_port()}",
        )

        def relay(msg: Any) -> None:
            for _, frame in ctl.handle(b"run", wire.encode(msg)):  # type: ignore[union-attr]
                reply = wire.decode(frame)
                if isinstance(reply, wire.Command):
                    guard._transport._handle(reply)  # type: ignore[union-attr]

        guard._transport.put_report = relay  # type: ignore[method-assign]
        guard._transport.put_control = relay  # type: ignore[method-assign]
        guard._transport._last_heard = math.inf  # answered in-process: its reports are live
        relay(guard._registration())
    try:
        for _ in range(STEPS):
            i = torch.randint(0, len(xt), (BATCH,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                opt.step()
        with torch.no_grad():
            val = torch.nn.functional.cross_entropy(model(xv), yv).item()
        return val, opt.param_groups[0]["lr"]
    finally:
        if guard is not None:
            guard.close()
            ctl.close()  # type: ignore[union-attr]


def test_one_configuration_serves_a_model_and_one_10x_wider_without_retuning(tmp_path, one_thread):
    data = digits()
    params = {w: sum(p.numel() for p in _mlp(w).parameters()) for w in WIDTHS}
    assert params[WIDTHS[1]] >= 10 * params[WIDTHS[0]]
    fixed: dict[int, dict[int, float]] = {}  # seed -> width -> tuned LR kept fixed / best
    ours: dict[int, dict[int, float]] = {}  # seed -> width -> trimtab / best
    for seed in SEEDS:
        grid = {w: {lr: train(data, w, lr, seed=seed)[0] for lr in GRID} for w in WIDTHS}
        best = {w: min(grid[w].values()) for w in WIDTHS}
        tuned = min(grid[WIDTHS[0]], key=grid[WIDTHS[0]].get)  # tuned at the small width
        runs = {w: train(data, w, tuned, tmp_path, POLICIES, seed=seed) for w in WIDTHS}
        fixed[seed] = {w: grid[w][tuned] / best[w] for w in WIDTHS}
        ours[seed] = {w: runs[w][0] / best[w] for w in WIDTHS}
        print(f"\nseed {seed}: LR tuned at w={WIDTHS[0]}: {tuned:g}")
        for w in WIDTHS:
            row = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in grid[w].items())
            print(f"  w={w} ({params[w]} params) fixed-LR grid: {row}")
            print(
                f"    fixed at the tuned LR: {fixed[seed][w]:.2f}x best; trimtab "
                f"{'+'.join(POLICIES)}: {ours[seed][w]:.2f}x (lr ends {runs[w][1]:.3g})"
            )
    # Without retuning, the small width's LR kept fixed misses the mark on some seed...
    assert any(fixed[s][WIDTHS[1]] > WITHIN for s in SEEDS), fixed
    # ...while one trimtab configuration, started from it, meets it at both widths on all.
    for seed in SEEDS:
        for w in WIDTHS:
            assert ours[seed][w] <= WITHIN, (seed, w, ours[seed][w])
