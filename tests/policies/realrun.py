"""A real, short CPU training run wired to an in-process controller.

The real :class:`~trimtab.client.Guard` probes a small MLP and points at an endpoint
nobody listens on; its reports and acks are handed straight to a real
:class:`~trimtab.controller.handler.Controller` (as frames), and the commands it answers
go into the guard's command slot, as its transport would put them. So the policies see
real probe numbers and their decisions act on the run.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from trimtab.client import Guard
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.protocol import wire

IN, HIDDEN = 16, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed random target function."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(IN, 32, generator=g) / IN**0.5, torch.randn(32, 1, generator=g)
    return lambda x: torch.sin(x @ w1 * 2.0) @ w2


class Run:
    """One job: model, optimizer, guard and a controller running ``policies``."""

    def __init__(
        self, tmp_path: Any, policies: list[str | PolicySpec], *, lr: float,
        optimizer: str = "sgd", report_every: int = 10, clip: float | None = None,
        governor: dict[str, Any] | None = None, seed: int = 0, width: int = HIDDEN,
    ) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(IN, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        if optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        specs = [p if isinstance(p, PolicySpec) else PolicySpec(name=p) for p in policies]
        cfg = ControllerConfig(
            journal=str(tmp_path / "journal.db"), metrics_port=0, policies=specs,
            governor=governor or {})
        self.ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())
        self.guard = Guard(self.model, self.opt, job="real", report_every=report_every,
                           endpoint=f"tcp://127.0.0.1:{_free_port()}", clip=clip,
                           checkpoint_every=0, batch_size=32)
        self.reports: list[wire.Report] = []
        self.commands: list[wire.Command] = []
        transport = self.guard._transport
        transport.put_report = self._relay  # type: ignore[method-assign]
        transport.put_control = self._relay  # type: ignore[method-assign]
        # The controller answers in-process, so the client always hears it: its reports are
        # live ones, not made offline.
        transport._last_heard = math.inf
        self._relay(self.guard._registration())
        self.target = teacher(seed)
        self.gen = torch.Generator().manual_seed(seed + 1)
        #: The label noise's standard deviation (raise it mid-run for a data shift).
        self.noise = 0.1
        #: A fixed training set to draw batches from (None: fresh samples every batch).
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None

    def _relay(self, msg: Any) -> None:
        if isinstance(msg, wire.Report):
            self.reports.append(msg)
        for _, frame in self.ctl.handle(b"real-run", wire.encode(msg)):
            reply = wire.decode(frame)
            if isinstance(reply, wire.Command):
                self.commands.append(reply)
                self.guard._transport._handle(reply)

    def batch(self, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None:
            i = torch.randint(0, len(self.pool[0]), (n,), generator=self.gen)
            return self.pool[0][i], self.pool[1][i]
        x = torch.randn(n, IN, generator=self.gen)
        y = self.target(x) + self.noise * torch.randn(n, 1, generator=self.gen)
        return x, y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.model(x), y)

    def train(
        self, steps: int, *, micro: int = 1, scale_at: dict[int, float] | None = None
    ) -> None:
        """``steps`` optimizer steps; ``micro`` micro-batches each (the loss divided by it);
        ``scale_at`` multiplies the loss at some steps (an injected gradient spike)."""
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(micro):
                x, y = self.batch()
                loss = self.loss(x, y) / micro
                scale = (scale_at or {}).get(self.guard.global_step, 1.0)
                (loss * scale).backward()
                if micro > 1:
                    self.guard.note_micro_batch()
                total += loss.item()
            self.guard.step(total)

    def fix_pool(self, n: int) -> None:
        """Train on ``n`` fixed samples from now on (so the model can overfit)."""
        x = torch.randn(n, IN, generator=self.gen)
        self.pool = (x, self.target(x) + 0.1 * torch.randn(n, 1, generator=self.gen))

    def validate(self, n: int = 512) -> float:
        g = torch.Generator().manual_seed(12345)
        x = torch.randn(n, IN, generator=g)
        with torch.no_grad():
            return self.loss(x, self.target(x)).item()

    def close(self) -> None:
        self.guard.close()
        self.ctl.close()
