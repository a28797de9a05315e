"""``trimtab serve`` says what it runs, binds what it says, refuses a journal in use and
says what it saved when it stops: real subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from trimtab.protocol import wire

from .support import free_port, start_serve, wait_for

CONFIG = """
[[policies]]
name = "divergence_guard"

[[policies]]
name = "plateau"
shadow = true
jobs = ["exp-*"]
"""


def _serve(tmp_path, *args: str, config: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trimtab.controller", "serve", "--bind",
           f"tcp://127.0.0.1:{free_port()}", "--journal", str(tmp_path / "journal.db"), *args]
    if config is not None:
        path = tmp_path / "trimtab.toml"
        path.write_text(textwrap.dedent(config))
        cmd += ["--config", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_says_what_it_runs_and_binds_metrics_to_loopback(tmp_path):
    mport = free_port()
    srv = start_serve(tmp_path, free_port(), mport, CONFIG)
    try:
        log = srv.log()
        assert f"trimtab serve: config: {tmp_path / 'trimtab.toml'}" in log
        assert "trimtab serve: policies live: divergence_guard" in log
        assert "trimtab serve: policies in shadow: plateau (jobs exp-*)" in log
        assert f"trimtab serve: bind: {srv.endpoint} (loopback only, unauthenticated)" in log
        assert f"trimtab serve: metrics: http://127.0.0.1:{mport}/metrics" in log
        assert f"trimtab serve: journal: {srv.journal_path}" in log
        # Bound to loopback only, as said: another address of this host is refused.
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, mport), timeout=2).close()
        with socket.create_connection(("127.0.0.1", mport), timeout=2):
            pass
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def _non_loopback_address() -> str | None:
    """An address of this host that is not loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it only picks a route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_metrics_addr_binds_where_it_says(tmp_path):
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this host has no non-loopback address")
    mport = free_port()
    proc = _serve(tmp_path, "--metrics-port", str(mport), "--metrics-addr", "0.0.0.0")
    try:
        line = proc.stdout.readline()
        assert f"metrics=http://0.0.0.0:{mport}/metrics" in line, line
        with socket.create_connection((other, mport), timeout=2):
            pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_second_serve_on_a_journal_in_use_is_refused(tmp_path):
    first = _serve(tmp_path, "--metrics-port", "0")
    try:
        assert "ready" in first.stdout.readline()
        second = _serve(tmp_path, "--metrics-port", "0")
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert (f"journal {str(tmp_path / 'journal.db')!r} is in use by another trimtab serve "
                f"(pid {first.pid};") in err
    finally:
        first.terminate()
        first.wait(timeout=10)
    # Released with the process, however it ended: a new one starts.
    third = _serve(tmp_path, "--metrics-port", "0")
    try:
        assert "ready" in third.stdout.readline()
    finally:
        third.kill()
        third.wait(timeout=10)
    fourth = _serve(tmp_path, "--metrics-port", "0")  # after a SIGKILL too
    try:
        assert "ready" in fourth.stdout.readline()
    finally:
        fourth.terminate()
        fourth.wait(timeout=10)


def test_a_busy_metrics_port_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve(tmp_path, "--metrics-port", str(port))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-addr, --metrics-port)" in err
    # A refused start leaves no journal, nor lock, it made (a controller trial found both).
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_busy_bind_address_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "trimtab.controller", "serve", "--bind",
               f"tcp://127.0.0.1:{port}", "--metrics-port", "0", "--journal",
               str(tmp_path / "journal.db")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"cannot bind tcp://127.0.0.1:{port}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_logs_the_jobs_whose_state_it_saved(tmp_path):
    import zmq

    proc = _serve(tmp_path, "--metrics-port", "0", config="")
    line = proc.stdout.readline()
    endpoint = line.split("ready on ")[1].split()[0]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="SGD",
                            dtype="float32", device="cpu")
    sock.send(wire.encode(wire.Register(job="saved-job", run_id="r", step=40, report_every=10,
                                        facts=facts, knobs=wire.Knobs(lr=0.1))))
    assert wait_for(lambda: sock.poll(100), timeout=10)
    sock.close(linger=0)
    ctx.term()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert ("trimtab controller stopped (SIGTERM): the state of 1 live job saved in "
            f"{tmp_path / 'journal.db'}: saved-job at step 40") in err
