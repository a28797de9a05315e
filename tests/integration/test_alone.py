"""A run that starts before its controller, and one whose controller dies and comes back:
the client's log says so in a few lines, against a real ``trimtab serve``."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from trimtab.client import attach

from .support import Regression, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _said(caplog) -> list[logging.LogRecord]:
    """What the client logged at INFO or above, in order."""
    return [r for r in caplog.records if r.name == "trimtab.client" and r.levelno >= logging.INFO]


def _train_until(task, opt, guard, predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        xb, yb = task.batch()
        loss = task.loss(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.step(loss)
        time.sleep(0.003)


def test_a_controller_started_late_ends_the_warning_with_one_line(serve_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="trimtab.client")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    task = Regression(seed=3)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with attach(task.model, opt, job="late-ctl", endpoint=endpoint, report_every=5,
                heartbeat_s=0.1, reconnect_max_s=0.4) as guard:
        _train_until(task, opt, guard, lambda: _said(caplog))
        assert not guard.connected
        serve_factory(port=port)
        _train_until(task, opt, guard, lambda: guard.connected and len(_said(caplog)) >= 2)
    warning, connected = _said(caplog)
    assert warning.getMessage().startswith(
        f"trimtab: job 'late-ctl' has not reached a controller at {endpoint} within 0.3 s")
    assert connected.getMessage().startswith(
        f"trimtab: job 'late-ctl' reached the controller at {endpoint} after ")
    assert {warning.threadName, connected.threadName} == {"trimtab-client"}


def test_a_controller_lost_and_back_is_one_line_each_way(serve_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="trimtab.client")
    port = free_port()
    srv = serve_factory(port=port)
    task = Regression(seed=4)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with attach(task.model, opt, job="lost-ctl", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.1, reconnect_max_s=0.4) as guard:
        _train_until(task, opt, guard, lambda: guard.connected)
        assert _said(caplog) == []  # a controller that answers at once is not news
        srv.kill()
        _train_until(task, opt, guard, lambda: _said(caplog))
        # Several reconnections while it is away: no more lines than the one.
        connects = guard._transport.connects
        _train_until(task, opt, guard, lambda: guard._transport.connects >= connects + 3)
        assert len(_said(caplog)) == 1
        serve_factory(port=port, journal=srv.journal_path)
        _train_until(task, opt, guard, lambda: guard.connected and len(_said(caplog)) >= 2)
    lost, back = _said(caplog)
    assert lost.levelno == logging.WARNING
    assert lost.getMessage().startswith(
        f"trimtab: job 'lost-ctl' lost the controller at {srv.endpoint} (no word for ")
    assert back.getMessage().startswith(
        f"trimtab: job 'lost-ctl' reached the controller at {srv.endpoint} after ")
    reconnecting = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert len(reconnecting) >= 3 and {r.levelno for r in reconnecting} == {logging.DEBUG}
