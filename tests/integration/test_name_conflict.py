"""A run refused because another live run holds its job's name (a notebook's kernel
restarted and the cell attached again while the old process's run was still heard): it
trains uncontrolled until the name is free, and says so. A notebook trial's run trained
~10 s uncontrolled while ``guard.connected`` said True, and no line said when the
controller took it. Now ``connected`` is False while refused, and a WARNING says when the
controller takes the run. A real ``trimtab serve``; the other run is a raw DEALER."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from trimtab.client import attach
from trimtab.protocol import wire

from .support import Regression, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _other_run(endpoint: str, job: str, stop: threading.Event) -> None:
    """Register run 'old' of ``job`` and keep it heard until ``stop``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(wire.encode(wire.Register(
        job=job, run_id="old", report_every=10,
        facts=wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
                              dtype="float32", device="cpu"),
        knobs=wire.Knobs(lr=0.1))))
    while not stop.wait(0.1):
        sock.send(wire.encode(wire.Heartbeat(job=job)))
        while sock.poll(0):
            sock.recv()
    sock.close()
    ctx.term()


def test_a_run_refused_for_a_name_in_use_is_not_connected_until_the_controller_takes_it(
        serve_factory, caplog):
    srv = serve_factory("takeover_after_s = 1.0\n")
    stop = threading.Event()
    other = threading.Thread(target=_other_run, args=(srv.endpoint, "nb", stop), daemon=True)
    other.start()
    time.sleep(0.5)  # the old run registered and heard
    task = Regression()
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="trimtab.client"), attach(
            task.model, opt, job="nb", endpoint=srv.endpoint, report_every=5,
            heartbeat_s=0.1) as guard:

        def step() -> None:
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            time.sleep(0.01)

        assert wait_for(lambda: guard._transport.refused.get("conflict"), 10)
        for _ in range(20):
            step()
            assert not guard.connected
        stop.set()  # the old run goes silent: taken over after takeover_after_s
        for _ in range(1000):
            step()
            if guard.connected:
                break
        assert guard.connected
    assert "the controller took this run's registration" in caplog.text
    other.join(5)
