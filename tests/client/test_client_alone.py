"""The client says when it is alone: ``attach`` refuses an endpoint no DEALER can connect
to, and a run that no controller answers says so in one warning (then a reminder at a low
rate), from the transport thread, while its training goes on."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from trimtab.client import attach, shard_endpoint
from trimtab.client._link_watch import LinkWatch

pytestmark = pytest.mark.timeout(60)

ALLOWED = "allowed: 'tcp://HOST:PORT' (PORT 1-65535), 'ipc://PATH', 'inproc://NAME'"


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, guard) -> None:
    x = torch.randn(8, 4)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    guard.step(loss)


def _client_threads() -> int:
    return sum(t.name == "trimtab-client" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize(
    "endpoint, why, meant",
    [
        ("127.0.0.1:5555", "no scheme", "tcp://127.0.0.1:5555"),
        (5555, "a port alone", "tcp://127.0.0.1:5555"),
        ("5555", "no scheme", "tcp://127.0.0.1:5555"),
        ("tcp://127.0.0.1:5555/", "a trailing '/'", "tcp://127.0.0.1:5555"),
        ("tcp://*:5555", "'*' is for binding", "tcp://127.0.0.1:5555"),
        ("tcp://::1:5555", "an IPv6 address goes in brackets", "tcp://[::1]:5555"),
        ("tcp://127.0.0.1:0", "port '0' is not a number from 1 to 65535", None),
        ("tcp://127.0.0.1:70000", "port '70000' is not a number from 1 to 65535", None),
        ("tcp://localhost", "no HOST:PORT", None),
        ("tcp://999.0.0.1:5555", "'999.0.0.1' is not an IPv4 address", None),
        ("tcp://[nope]:5555", "[nope] is not an IPv6 address", None),
        ("tcp://two words:5555", "'two words' is not a host name or address", None),
        ("http://controller:5555", "scheme 'http' is not one a client connects with", None),
        ("ipc://", "no ipc name", None),
        ("inproc://", "no inproc name", None),
        (None, "a NoneType, not a string", None),
    ],
)
def test_attach_refuses_a_malformed_endpoint_before_anything_starts(endpoint, why, meant):
    model, opt = _model_and_opt()
    before = _client_threads()
    with pytest.raises(ValueError) as info:
        attach(model, opt, job="alone", endpoint=endpoint)
    message = str(info.value)
    assert message.startswith(f"endpoint={endpoint!r} is not a ZeroMQ endpoint ({why}")
    assert ALLOWED in message
    if meant is None:
        assert "did you mean" not in message
    else:
        assert message.endswith(f"(did you mean {meant!r}?)")
    assert _client_threads() == before  # refused at attach: no transport thread was started


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://localhost:{port}", "tcp://127.0.0.1:{port}", "tcp://[::1]:{port}",
     "tcp://ctl_1.example:{port}", "ipc://{tmp}/trimtab.sock", "inproc://trimtab-{port}"],
)
def test_attach_takes_every_form_a_dealer_connects_to(endpoint, unused_port, tmp_path):
    model, opt = _model_and_opt()
    endpoint = endpoint.format(port=unused_port, tmp=tmp_path)
    with attach(model, opt, job="alone", endpoint=endpoint, heartbeat_s=0.05) as guard:
        for _ in range(3):
            _train_step(model, opt, guard)
        assert guard._transport.endpoint == endpoint
    assert guard.global_step == 3


def test_shard_endpoint_refuses_a_malformed_endpoint_naming_its_place():
    with pytest.raises(ValueError, match=r"^endpoints\[1\]='ctl-b:5555' is not a ZeroMQ "
                       r"endpoint \(no scheme\); allowed: .*did you mean 'tcp://ctl-b:5555'"):
        shard_endpoint("job", ["tcp://ctl-a:5555", "ctl-b:5555"])


def _lines(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "trimtab.client" and text in r.getMessage()]


def _train_until(model, opt, guard, predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        _train_step(model, opt, guard)
        time.sleep(0.005)


def test_a_run_no_controller_answers_says_so_once_from_the_transport_thread(
    dead_endpoint, caplog
):
    caplog.set_level(logging.DEBUG, logger="trimtab.client")
    model, opt = _model_and_opt()
    with attach(model, opt, job="alone-run", endpoint=dead_endpoint, heartbeat_s=0.1,
                liveness=3) as guard:
        _train_until(model, opt, guard, lambda: _lines(caplog, "has not reached"))
        # Many liveness windows and reconnections later: still the one warning.
        connects = guard._transport.connects
        _train_until(model, opt, guard, lambda: guard._transport.connects >= connects + 3)
        assert not guard.connected
    [warning] = _lines(caplog, "has not reached")
    assert warning.levelno == logging.WARNING
    assert warning.threadName == "trimtab-client"  # never the training thread
    assert warning.getMessage() == (
        f"trimtab: job 'alone-run' has not reached a controller at {dead_endpoint} within "
        "0.3 s (3 heartbeats); training goes on uncontrolled until one answers "
        "(guard.connected is False)")
    assert not _lines(caplog, "still has no controller")  # the reminder is minutes away
    # The reconnections themselves are DEBUG lines, not a storm of INFO ones.
    reconnecting = _lines(caplog, "reconnecting in")
    assert reconnecting and all(r.levelno == logging.DEBUG for r in reconnecting)
    said = [r for r in caplog.records if r.name == "trimtab.client" and r.levelno >= logging.INFO]
    assert said == [warning]


def test_a_run_alone_for_long_is_reminded_while_it_lasts(dead_endpoint, caplog):
    caplog.set_level(logging.WARNING, logger="trimtab.client")
    model, opt = _model_and_opt()
    with attach(model, opt, job="alone-run", endpoint=dead_endpoint, heartbeat_s=0.05,
                liveness=2) as guard:
        guard._transport.watch.remind_every_s = 0.2  # 10 minutes in a run; a fraction here
        _train_until(model, opt, guard, lambda: len(_lines(caplog, "still has no")) >= 2)
    assert len(_lines(caplog, "has not reached")) == 1
    reminder = _lines(caplog, "still has no")[0]
    assert reminder.threadName == "trimtab-client"
    assert reminder.getMessage().startswith(
        f"trimtab: job 'alone-run' still has no controller at {dead_endpoint} (")


# -- LinkWatch on its own clock: reminders and a flapping link, with no waiting -------------

INF = float("-inf")


def _watched(caplog) -> LinkWatch:
    caplog.set_level(logging.DEBUG, logger="trimtab.client")
    return LinkWatch("flappy", "tcp://ctl:5555", window=3.0, heartbeats=3, started=0.0)


def _said_at(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "trimtab.client" and r.levelno == level]


def test_the_reminder_comes_every_interval_while_no_controller_answers(caplog):
    watch = _watched(caplog)
    for t in range(0, 1900):  # a transport turn every second for half an hour
        watch.update(float(t), INF)
    said = _said_at(caplog, logging.WARNING)
    # Said at 3 s (the window), then every 600 s after the line before.
    assert said[0].startswith("trimtab: job 'flappy' has not reached a controller at "
                              "tcp://ctl:5555 within 3.0 s (3 heartbeats)")
    assert said[1:] == [
        "trimtab: job 'flappy' still has no controller at tcp://ctl:5555 (603 s without one)",
        "trimtab: job 'flappy' still has no controller at tcp://ctl:5555 (1203 s without one)",
        "trimtab: job 'flappy' still has no controller at tcp://ctl:5555 (1803 s without one)",
    ]
    watch.update(1900.0, 1900.0)  # a controller answers
    assert _said_at(caplog, logging.WARNING)[-1] == (
        "trimtab: job 'flappy' reached the controller at tcp://ctl:5555 after 1900 s without one")


def test_a_flapping_link_is_one_warning_a_minute_counting_the_drops_between(caplog):
    watch = _watched(caplog)
    heard = 0.0
    for t in range(0, 200):  # heard every second, except for 5 s in every 20
        if t % 20 >= 5:
            heard = float(t)
        watch.update(float(t) + 0.5, heard)
    warnings = _said_at(caplog, logging.WARNING)
    # Ten drops (at 3.5, 22.5, ... 182.5 s): said at 3.5, at 82.5 (the first a minute or
    # more after it, three counted between) and at 142.5 (two counted between).
    lost = ("trimtab: job 'flappy' lost the controller at tcp://ctl:5555 (no word for 3.5 s); "
            "training goes on uncontrolled, reconnecting")
    back = "trimtab: job 'flappy' reached the controller at tcp://ctl:5555 after 6 s without one"
    assert warnings == [
        lost, back,
        lost + " (3 more short drops since the last warning)", back,
        lost + " (2 more short drops since the last warning)", back,
    ]
    debug = _said_at(caplog, logging.DEBUG)
    assert debug.count("trimtab: job 'flappy' lost the controller at tcp://ctl:5555 again") == 7


def test_a_controller_that_stops_answering_and_answers_again_is_a_line_each_way(
    make_controller, caplog
):
    caplog.set_level(logging.DEBUG, logger="trimtab.client")
    controller = make_controller()
    model, opt = _model_and_opt()
    with attach(model, opt, job="flap-run", endpoint=controller.endpoint, heartbeat_s=0.05,
                liveness=3) as guard:
        _train_until(model, opt, guard, lambda: guard.connected)
        for _ in range(2):  # two drops within the minute: the second one is DEBUG only
            controller.answer_heartbeats = False
            _train_until(model, opt, guard, lambda: not guard.connected)
            controller.answer_heartbeats = True
            _train_until(model, opt, guard, lambda: guard.connected)
    said = [r for r in caplog.records if r.name == "trimtab.client" and r.levelno >= logging.INFO]
    assert [r.getMessage().split(" at ")[0] for r in said] == [
        "trimtab: job 'flap-run' lost the controller", "trimtab: job 'flap-run' reached the "
        "controller"]
    assert _lines(caplog, "lost the controller at") and _lines(caplog, "again")


def test_a_second_open_guard_on_the_same_job_is_refused(dead_endpoint):
    """Two guards on one job in one process would mix two runs' reports, and roll one back
    for the other's faults (a trial: a GAN's two optimizers given one job name). The second
    is refused naming the job; once the first is closed the job is free, and two jobs may
    be open side by side."""
    from trimtab.client import attach
    d, g = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4)
    first = attach(d, opt_d, job="gan", endpoint=dead_endpoint, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"job='gan' is invalid; allowed: a job no open guard"):
        attach(g, opt_g, job="gan", endpoint=dead_endpoint, checkpoint_every=0)
    other = attach(g, opt_g, job="gan-G", endpoint=dead_endpoint, checkpoint_every=0)
    first.close()
    again = attach(d, opt_d, job="gan", endpoint=dead_endpoint, checkpoint_every=0)
    again.close()
    other.close()


def test_attach_warns_when_its_ring_drops_every_checkpoint_before_one_can_be_stable(
    dead_endpoint, caplog
):
    """A checkpoint every 10 steps, 3 kept, a report every 10: each is held 30 steps, 3
    reports, fewer than a default controller needs to mark one stable. attach says so,
    naming the values; with the defaults (100 x 3 steps) it does not."""
    caplog.set_level(logging.WARNING, logger="trimtab.client")
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = attach(model, opt, job="short-ring", endpoint=dead_endpoint, report_every=10,
                   checkpoint_every=10, keep=3)
    guard.close()
    [said] = _lines(caplog, "keep x checkpoint_every")
    assert "3 x 10 = 30 steps" in said.getMessage() and "report_every=10" in said.getMessage()
    caplog.clear()
    guard = attach(model, opt, job="default-ring", endpoint=dead_endpoint, report_every=10)
    guard.close()
    assert not _lines(caplog, "keep x checkpoint_every")


def test_a_run_alone_whose_every_step_is_skipped_says_it_is_stuck(dead_endpoint, caplog):
    """A controller trial: a fault while no controller answered left a run with non-finite
    weights skipping every step for 5,400 iterations; its only log line was the link's.
    Every step of a window skipped while alone is an ERROR (once, then every 10 minutes);
    a window with a step taken, or a controller heard, ends it."""
    model, opt = _model_and_opt()
    guard = attach(model, opt, job="stuck", endpoint=dead_endpoint, report_every=5,
                   heartbeat_s=0.05, liveness=2)
    try:
        time.sleep(0.3)  # alone: a liveness window with no word
        for _ in range(5):
            _train_step(model, opt, guard)  # healthy: no error
        with torch.no_grad():
            model.weight.fill_(float("nan"))  # the fault: every step non-finite from here
        with caplog.at_level(logging.ERROR, logger="trimtab.client"):
            for _ in range(20):
                _train_step(model, opt, guard)
        said = [r.getMessage() for r in caplog.records
                if "no longer move" in r.getMessage()]
        assert len(said) == 1 and "job stuck: every step of the last window up to step 5" \
            in said[0], said
    finally:
        guard.close()
