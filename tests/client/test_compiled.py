"""``torch.compile``d models, attached: real compiled training on CPU (aot_eager where only
dynamo's tracing matters, the default inductor backend for the rollback), reports and
commands over a real ZeroMQ ROUTER."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo

from trimtab.client import attach
from trimtab.protocol import wire

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


class Net(torch.nn.Module):
    """A small MLP; ``breaks`` puts one graph break of its own in the forward."""

    def __init__(self, breaks: bool) -> None:
        super().__init__()
        self.breaks = breaks
        self.a = torch.nn.Linear(6, 24)
        self.b = torch.nn.Linear(24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.breaks:
            torch._dynamo.graph_break()
        return self.b(h)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        out.append((x, x.sum(1, keepdim=True).sin()))
    return out


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _train(breaks: bool, way: str, endpoint: str) -> tuple[list[torch.Tensor], int, int]:
    """Compile a fresh model and train it ``way`` (unattached, guard.step, hooks): its
    final parameters, dynamo's graph breaks, and the guard's count of them (-1: none)."""
    _fresh_dynamo()
    torch.manual_seed(0)
    model = torch.compile(Net(breaks), backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = None
    if way != "unattached":
        guard = attach(model, opt, job="compiled", endpoint=endpoint, hooks=way == "hooks",
                       report_every=4, heartbeat_s=0.05, clip=10.0, checkpoint_every=4)
    for x, y in _batches(12):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        elif way == "hooks":
            guard.observe_loss(loss)
            opt.step()
        else:
            guard.step(loss)
    counted = -1
    if guard is not None:
        counted = guard.graph_breaks
        assert guard.global_step == 12
        guard.close()
    breaks_seen = sum(torch._dynamo.utils.counters["graph_break"].values())
    return [p.detach().clone() for p in model.parameters()], breaks_seen, counted


@pytest.mark.parametrize("breaks", [False, True], ids=["whole-graph", "one-break"])
def test_attaching_adds_no_graph_break_and_the_guard_counts_them(
    fake_controller, caplog, breaks: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="trimtab.client")
    want, base, _ = _train(breaks, "unattached", fake_controller.endpoint)
    assert base == (1 if breaks else 0)  # dynamo's count sees the model's own break
    for way in ("step", "hooks"):
        got, seen, counted = _train(breaks, way, fake_controller.endpoint)
        assert seen == base, way  # trimtab added none
        assert counted == base, way  # and the guard reports dynamo's count
        for p, q in zip(got, want, strict=True):  # the compiled run trains as unattached
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    notes = [r for r in caplog.records if "torch.compile'd model" in r.getMessage()]
    assert len(notes) == 2  # once per run, at its first report
    if breaks:
        assert all(r.levelno == logging.WARNING and "1 graph break" in r.getMessage()
                   for r in notes)
    else:
        assert all(r.levelno == logging.INFO and "without graph breaks" in r.getMessage()
                   for r in notes)


def test_uncompiled_model_logs_nothing_of_compiling(fake_controller, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trimtab.client")
    model = Net(breaks=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with attach(model, opt, job="eager", endpoint=fake_controller.endpoint, report_every=2,
                checkpoint_every=0) as guard:
        for x, y in _batches(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()]


def test_inductor_compiled_model_rolls_back_to_a_checkpoint(fake_controller) -> None:
    """The default backend: the guard snapshots the compiled wrapper (``_orig_mod.`` keys),
    and a rollback restores it in place, where the compiled code reads it next."""
    _fresh_dynamo()
    torch.manual_seed(1)
    eager = Net(breaks=False)
    model = torch.compile(eager)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe_x = torch.randn(5, 6)
    batches = _batches(30)
    at: dict[int, list[torch.Tensor]] = {}
    restored: list[int] = []
    with attach(model, opt, job="inductor", endpoint=fake_controller.endpoint, report_every=4,
                heartbeat_s=0.05, checkpoint_every=4, on_rollback=restored.append) as guard:

        def step() -> None:
            x, y = batches[guard.global_step % len(batches)]
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            at.setdefault(guard.global_step, [p.detach().clone() for p in eager.parameters()])

        for _ in range(10):
            step()
        assert all(k.startswith("_orig_mod.") for k in model.state_dict())
        fake_controller.wait_for(lambda c: any(8 in r.checkpoints for r in c.of_type(wire.Report)),
                                 while_waiting=step)
        fake_controller.send(wire.Command(job="inductor", seq=1, mark_stable=8))
        fake_controller.wait_for(lambda c: guard.stable_step == 8, while_waiting=step)
        assert guard.global_step > 8
        fake_controller.send(wire.Command(job="inductor", seq=2, rollback_to=8))
        fake_controller.wait_for(lambda c: bool(restored), while_waiting=step)
        assert restored == [8] and guard.global_step == 8
        for p, q in zip(eager.parameters(), at[8], strict=True):
            assert torch.equal(p, q)
        with torch.no_grad():  # the compiled code computes with the restored weights
            w1, b1, w2, b2 = at[8]
            want = torch.nn.functional.linear(
                torch.tanh(torch.nn.functional.linear(probe_x, w1, b1)), w2, b2)
            torch.testing.assert_close(model(probe_x), want)
        step()
        assert guard.global_step == 9  # training goes on from the checkpoint
    fake_controller.wait_for(lambda c: any(a.seq == 2 for a in c.of_type(wire.Ack)))
    ack = next(a for a in fake_controller.of_type(wire.Ack) if a.seq == 2)
    assert ack.restored_step == 8 and ack.error is None
