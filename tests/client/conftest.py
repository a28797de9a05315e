"""Shared fixtures for the client tests: a stand-in controller and free ports.

``fake_controller`` (or ``make_controller(...)`` for more control) is a real ZeroMQ
ROUTER on 127.0.0.1 served by its own thread: it records every frame a client sends,
answers heartbeats (unless told not to) and sends whatever a test queues. Tests never
touch its socket directly.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from trimtab.protocol import wire


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeController:
    """A ROUTER that plays controller for tests; thread-safe from the test's side."""

    def __init__(self, port: int, *, answer_heartbeats: bool = True) -> None:
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.answer_heartbeats = answer_heartbeats
        self.messages: list[wire.Message] = []
        #: The newest report step received (what its heartbeats say was seen).
        self.seen = 0
        self._identity: bytes | None = None
        self._outbox: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(10):
                identity, frame = self._sock.recv_multipart()
                message = wire.decode(frame)
                with self._lock:
                    self._identity = identity
                    self.messages.append(message)
                late = isinstance(message, wire.Validation) and message.run_id is not None
                if isinstance(message, wire.Report):
                    self.seen = message.step
                if ((isinstance(message, (wire.Heartbeat, wire.Report)) and self.answer_heartbeats)
                        or late):
                    # A validation sent after close waits for an answer, as a serve gives.
                    # Answers say the newest step seen, as a serve's do (to every report
                    # while a live lr schedule runs: the client holds one that gets ahead).
                    beat = wire.encode(wire.Heartbeat(job=message.job, step=self.seen))
                    self._sock.send_multipart([identity, beat])
            while self._outbox and self._identity is not None:
                self._sock.send_multipart([self._identity, self._outbox.popleft()])

    def send(self, message: wire.Command | wire.Error | bytes) -> None:
        """Queue a message (or raw bytes) for the last client heard from."""
        self._outbox.append(message if isinstance(message, bytes) else wire.encode(message))

    def of_type(self, kind: type) -> list:
        """Messages received so far of one type, in arrival order."""
        with self._lock:
            return [m for m in self.messages if isinstance(m, kind)]

    def wait_for(
        self, predicate: Callable[[FakeController], bool], timeout_s: float = 10.0,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        """Wait until ``predicate(self)``, calling ``while_waiting`` (a training step) meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received {[m.type for m in self.messages]}")
            if while_waiting is not None:
                while_waiting()
            time.sleep(0.01)

    def send_until(self, command: wire.Command, done: Callable[[FakeController], bool],
                   step: Callable[[], None], tries: int = 5) -> None:
        """Send ``command`` until ``done(self)``, training (``step``) meanwhile, re-sending
        as a controller does when no ack comes (a reconnect may lose a frame; commands are
        idempotent by seq)."""
        for _ in range(tries):
            self.send(command)
            try:
                return self.wait_for(done, timeout_s=2.0, while_waiting=step)
            except AssertionError:
                continue
        raise AssertionError(f"command {command.seq} never took effect")

    def mark_stable(self, guard: Any, step: int, seq: int, train: Callable[[], None]) -> None:
        """Once a report lists checkpoint ``step``, mark it stable (command ``seq``) until
        ``guard`` has it, training (``train``) all the while."""
        self.wait_for(lambda c: any(step in r.checkpoints for r in c.of_type(wire.Report)),
                      while_waiting=train)
        self.send_until(wire.Command(job=guard.job, seq=seq, mark_stable=step),
                        lambda c: guard.stable_step == step, train)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._ctx.term()


@pytest.fixture
def make_controller() -> Iterator[Callable[..., FakeController]]:
    """``make_controller(port=None, answer_heartbeats=True)``: start a stand-in controller."""
    started: list[FakeController] = []

    def make(port: int | None = None, *, answer_heartbeats: bool = True) -> FakeController:
        controller = FakeController(port or free_port(), answer_heartbeats=answer_heartbeats)
        started.append(controller)
        return controller

    yield make
    for controller in started:
        controller.close()


@pytest.fixture
def fake_controller(make_controller) -> FakeController:
    """A running stand-in controller on a free port (answers heartbeats)."""
    return make_controller()


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (yet)."""
    return free_port()


@pytest.fixture
def dead_endpoint(unused_port: int) -> str:
    """An endpoint on which no controller listens."""
    return f"tcp://127.0.0.1:{unused_port}"


#: The tensor methods that read a value from its device onto the host (a sync on CUDA).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Count, by method, the :data:`HOST_READS` called from trimtab's client code (the
    test's own reads are not counted) until the test ends."""
    import torch

    reads: collections.Counter = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("trimtab.client"):
                reads[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
