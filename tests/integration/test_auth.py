"""CURVE authentication against a real ``trimtab serve``: listed keys train end to end,
unlisted or keyless peers never get a reply and are counted, one key cannot act for
another key's job, and a non-loopback bind needs keys or ``--allow-remote``."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

from trimtab.client import attach
from trimtab.controller.cli import main
from trimtab.protocol import wire

from .support import Regression, free_port, start_serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def keys(tmp_path) -> Path:
    d = tmp_path / "keys"
    assert main(["keys", "generate", str(d), "--name", "alice", "--name", "bob"]) == 0
    return d


def curve_config(keys: Path, extra: str = "") -> str:
    return (
        f'curve_server_secret = "{keys / "server.key_secret"}"\n'
        f'curve_allowed_clients = "{keys / "allowed"}"\n' + extra
    )


def dealer(
    ctx: zmq.Context, endpoint: str, keys: Path | None = None, secret_file: Path | None = None
) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if secret_file is not None:
        public, secret = zmq.auth.load_certificate(secret_file)
        sock.curve_serverkey = zmq.auth.load_certificate(keys / "server.key")[0]
        sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(endpoint)
    return sock


def ask(sock: zmq.Socket, message, timeout_ms: int = 10_000):
    try:
        sock.send(wire.encode(message), zmq.NOBLOCK)
    except zmq.Again:  # a refused handshake leaves no connection to queue on
        return None
    return wire.decode(sock.recv()) if sock.poll(timeout_ms) else None


def register(job: str, run_id: str = "r1") -> wire.Register:
    return wire.Register(
        job=job,
        run_id=run_id,
        report_every=10,
        facts=wire.ScaleFacts(
            param_count=100, group_sizes=[100], optimizer="SGD", dtype="float32", device="cpu"
        ),
        knobs=wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0),
    )


def report(job: str, seq: int, nonfinite: int = 0) -> wire.Report:
    return wire.Report(
        job=job,
        seq=seq,
        step=seq * 10,
        window=10,
        loss_mean=1.0,
        grad_norm_mean=1.0,
        nonfinite_grads=nonfinite,
        knobs=wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0),
    )


def metric(text: str, name: str, label: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def test_keys_generate_writes_key_pairs_and_an_allow_list(keys, capsys):
    assert (keys / "server.key").is_file() and (keys / "server.key_secret").is_file()
    for name in ("alice", "bob"):
        public, secret = zmq.auth.load_certificate(keys / "clients" / f"{name}.key_secret")
        assert secret is not None
        assert zmq.auth.load_certificate(keys / "allowed" / f"{name}.key") == (public, None)
        mode = stat.S_IMODE(os.stat(keys / "clients" / f"{name}.key_secret").st_mode)
        assert mode == 0o600
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["alice.key", "bob.key"]
    server_before = (keys / "server.key_secret").read_text()
    assert main(["keys", "generate", str(keys), "--clients", "1"]) == 0  # adds client-1
    assert (keys / "server.key_secret").read_text() == server_before
    assert (keys / "allowed" / "client-1.key").is_file()
    assert main(["keys", "generate", str(keys), "--name", "alice"]) == 2
    assert "client 'alice' already has keys" in capsys.readouterr().err


def test_a_listed_key_trains_end_to_end(tmp_path, keys):
    srv = start_serve(
        tmp_path, None, None,
        curve_config(
            keys,
            """
        [[policies]]
        name = "plateau"
        [signals]
        slope_window = 8
        [governor.lr]
        cooldown_steps = 40
    """,
        ),
    )
    try:
        task = Regression(seed=1)
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
        with attach(
            task.model,
            opt,
            job="curve-e2e",
            endpoint=srv.endpoint,
            report_every=5,
            heartbeat_s=0.2,
            checkpoint_every=0,
            server_key=keys / "server.key",
            client_key=keys / "clients" / "alice.key_secret",
        ) as guard:
            for _ in range(1500):
                xb, yb = task.batch()
                loss = task.loss(xb, yb)
                opt.zero_grad()
                loss.backward()
                guard.step(loss)
                time.sleep(0.003)
                if guard.knobs.lr < 0.05:  # what the last step ran with
                    break
            assert guard.knobs.lr == pytest.approx(0.025), srv.log()[-3000:]
        journal = srv.journal()
        assert wait_for(lambda: journal.events("curve-e2e", "ack"))
        (reg,) = journal.events("curve-e2e", "register")
        alice_public = zmq.auth.load_certificate(keys / "allowed" / "alice.key")[0].decode()
        assert reg.data["key"] == alice_public  # the job is bound to alice's key
        assert "security: CURVE-authenticated and encrypted: the 2 client keys" in srv.log()
        # An evaluation after the run ended: on a link of its own, over CURVE with alice's
        # key, to the ended run's results; bob's key cannot add to them.
        guard.report_validation(0.25)
        assert wait_for(lambda: guard._transport.late)
        assert guard._transport.late == {"answered": 1}
        assert [e.data["value"] for e in journal.events("curve-e2e", "validation")] == [0.25]
        ctx = zmq.Context()
        try:
            bob = dealer(ctx, srv.endpoint, keys, keys / "clients" / "bob.key_secret")
            reply = ask(bob, wire.Validation(job="curve-e2e", step=1, value=9.0,
                                             run_id=guard.run_id))
            assert isinstance(reply, wire.Error) and reply.code == "forbidden", reply
        finally:
            ctx.destroy(linger=0)
        assert len(journal.events("curve-e2e", "validation")) == 1
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_unlisted_and_keyless_peers_never_get_a_reply_and_are_counted(tmp_path, keys):
    srv = start_serve(tmp_path, None, None, curve_config(keys))
    eve = tmp_path / "eve"
    eve.mkdir()
    _, eve_secret = zmq.auth.create_certificates(eve, "eve")
    ctx = zmq.Context()
    try:
        alice = dealer(ctx, srv.endpoint, keys, keys / "clients" / "alice.key_secret")
        assert isinstance(ask(alice, register("alice-job")), wire.Heartbeat)
        intruder = dealer(ctx, srv.endpoint, keys, Path(eve_secret))  # a key not listed
        anonymous = dealer(ctx, srv.endpoint)  # no CURVE at all
        for sock in (intruder, anonymous):
            assert ask(sock, register("eve-job"), timeout_ms=2000) is None

        def counted() -> str | None:
            text = srv.metrics()
            return text if metric(text, "trimtab_rejected_peers_total", "handshake") else None

        text = wait_for(counted)
        assert metric(text, "trimtab_rejected_peers_total", 'reason="unknown_key"') >= 1
        assert metric(text, "trimtab_rejected_peers_total", 'reason="handshake"') >= 1
        # A client with the wrong server key retries (libzmq reconnects every 100 ms):
        # each failure is counted, one log line a minute (before: one each, about 90 in
        # 20 s).
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        zmq.auth.create_certificates(wrong, "server")
        lost = dealer(ctx, srv.endpoint, wrong, keys / "clients" / "alice.key_secret")
        lost.send(wire.encode(register("alice-job")))
        before = metric(text, "trimtab_rejected_peers_total", 'reason="handshake"')
        assert wait_for(lambda: metric(srv.metrics(), "trimtab_rejected_peers_total",
                                       'reason="handshake"') >= before + 3)
        assert srv.log().count("CURVE handshake failed") == 1, srv.log()
        assert srv.journal().events("eve-job") == []
        assert isinstance(ask(alice, wire.Heartbeat(job="alice-job")), wire.Heartbeat)
        assert "refused a client with an unlisted CURVE key" in srv.log()
        # Revoking alice (deleting her allowed key) refuses her next handshake.
        (keys / "allowed" / "alice.key").unlink()
        again = dealer(ctx, srv.endpoint, keys, keys / "clients" / "alice.key_secret")
        assert ask(again, wire.Heartbeat(job="alice-job"), timeout_ms=2000) is None
    finally:
        ctx.destroy(linger=0)
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_a_key_cannot_act_for_or_receive_commands_of_another_keys_job(tmp_path, keys):
    config = curve_config(
        keys,
        """
        [[policies]]
        name = "spike_guard"
        [governor.lr]
        min_rel = 1e-3
        max_step_ratio = 2
        cooldown_steps = 0
    """,
    )
    port = free_port()
    journal = tmp_path / "journal.db"
    srv = start_serve(tmp_path, port, None, config, journal)
    ctx = zmq.Context()
    try:
        alice = dealer(ctx, srv.endpoint, keys, keys / "clients" / "alice.key_secret")
        bob = dealer(ctx, srv.endpoint, keys, keys / "clients" / "bob.key_secret")
        assert isinstance(ask(alice, register("a-job")), wire.Heartbeat)
        for seq in (1, 2, 3):
            alice.send(wire.encode(report("a-job", seq)))
        attempts = [
            register("a-job", run_id="bob-run"),
            report("a-job", 4, nonfinite=5),
            wire.Ack(job="a-job", seq=1, step=1, knobs=wire.Knobs(lr=9.0),
                     scale=wire.Scale(lr=90.0)),
            wire.Heartbeat(job="a-job"),
            wire.Bye(job="a-job"),
        ]
        for message in attempts:
            reply = ask(bob, message)
            assert isinstance(reply, wire.Error) and reply.code == "forbidden", reply
            assert reply.job == "a-job"
        # Alice's job is untouched, and its command goes to alice only.
        alice.send(wire.encode(report("a-job", 4, nonfinite=3)))
        assert alice.poll(10_000)
        command = wire.decode(alice.recv())
        assert isinstance(command, wire.Command) and command.scale.lr == pytest.approx(0.5)
        assert not bob.poll(1000)
        text = srv.metrics()
        assert metric(text, "trimtab_message_errors_total", 'code="forbidden"') == len(attempts)
        assert [e.data["run_id"] for e in srv.journal().events("a-job", "register")] == ["r1"]
        # The binding outlives the controller: restarted on the same journal, bob is still
        # refused the job, and alice gets it back.
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=10)
        srv = start_serve(tmp_path, port, None, config, journal)
        bob2 = dealer(ctx, srv.endpoint, keys, keys / "clients" / "bob.key_secret")
        reply = ask(bob2, register("a-job", run_id="bob-run"))
        assert isinstance(reply, wire.Error) and reply.code == "forbidden"
        alice2 = dealer(ctx, srv.endpoint, keys, keys / "clients" / "alice.key_secret")
        assert isinstance(ask(alice2, register("a-job")), wire.Heartbeat)
    finally:
        ctx.destroy(linger=0)
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def _serve(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trimtab.controller",
            "serve",
            "--metrics-port",
            "0",
            "--journal",
            str(tmp_path / "j.db"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TRIMTAB_CONFIG": ""},
    )


def test_a_remote_bind_needs_keys_or_allow_remote(tmp_path, keys):
    remote = f"tcp://0.0.0.0:{free_port()}"
    proc = _serve(tmp_path, "--bind", remote)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"bind = {remote!r} is not a loopback address and no CURVE keys" in err
    assert "allow_remote = true (--allow-remote)" in err
    for args, says in [
        (["--allow-remote"], "NOT loopback and unauthenticated"),
        (["--config", str(tmp_path / "c.toml")], "CURVE-authenticated"),
    ]:
        (tmp_path / "c.toml").write_text(curve_config(keys))
        proc = _serve(tmp_path, "--bind", f"tcp://0.0.0.0:{free_port()}", *args)
        try:
            assert "ready" in proc.stdout.readline()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        assert says in err


def test_client_keys_are_checked_at_attach(tmp_path, keys):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"server_key=.*client_key=None is invalid; "
        r"allowed: both \(CURVE\) or neither",
    ):
        attach(model, opt, job="k", server_key=keys / "server.key")
    with pytest.raises(
        ValueError,
        match=r"client_key=.*alice.key' is invalid \(it holds no "
        r"secret key\)",
    ):
        attach(
            model,
            opt,
            job="k",
            server_key=keys / "server.key",
            client_key=keys / "allowed" / "alice.key",
        )
    with pytest.raises(ValueError, match=r"server_key='.*missing.key' is invalid"):
        attach(
            model,
            opt,
            job="k",
            server_key=str(tmp_path / "missing.key"),
            client_key=keys / "clients" / "alice.key_secret",
        )


def test_bad_security_settings_are_refused_naming_field_and_value(tmp_path, keys):
    from trimtab.controller.config import ConfigError, load_config

    secret, allowed = str(keys / "server.key_secret"), str(keys / "allowed")
    missing = str(tmp_path / "missing")
    cases = [
        ({"bind": "tcp://*:5555"}, r"bind = 'tcp://\*:5555' is not a loopback address"),
        ({"bind": "tcp://10.1.2.3:5555"}, r"allow_remote = true \(--allow-remote\)"),
        (
            {"curve_server_secret": secret},
            r"curve_allowed_clients = None: set both \(CURVE on\) or neither",
        ),
        (
            {"curve_server_secret": missing, "curve_allowed_clients": allowed},
            r"curve_server_secret = '.*missing': .*no such file",
        ),
        (
            {"curve_server_secret": secret, "curve_allowed_clients": secret},
            r"curve_allowed_clients = '.*server.key_secret': .*no such directory",
        ),
        ({"allow_remote": "sometimes"}, r"allow_remote = 'sometimes': .*valid boolean"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(env={}, overrides=overrides)
    ok = [
        {"bind": "tcp://10.1.2.3:5555", "allow_remote": True},
        {"bind": "tcp://*:5555", "curve_server_secret": secret, "curve_allowed_clients": allowed},
        {"bind": "tcp://localhost:5555"},
        {"bind": "ipc:///run/trimtab.sock"},
    ]
    for overrides in ok:
        assert load_config(env={}, overrides=overrides).bind == overrides["bind"]


def test_with_keys_only_an_operator_key_steers_a_job(tmp_path):
    """``trimtab keys generate --operator``: that key may pause a job (over CURVE, with the
    CLI), a client key or one not listed may not (without ``curve_operators`` nobody
    may: tests/controller/test_manual.py)."""
    d = tmp_path / "keys"
    assert main(["keys", "generate", str(d), "--name", "alice", "--operator", "ops"]) == 0
    assert (d / "operators" / "ops.key").is_file() and not (d / "allowed" / "ops.key").exists()
    srv = start_serve(tmp_path, None, None,
                      curve_config(d, f'curve_operators = "{d / "operators"}"\n'))
    ctx = zmq.Context()
    try:
        job = dealer(ctx, srv.endpoint, d, d / "clients" / "alice.key_secret")
        assert isinstance(ask(job, register("alices-job")), wire.Heartbeat)
        assert "1 operator keys in" in srv.log()

        def pause(key: str, *extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "trimtab.controller", "pause", "alices-job",
                 "--reason", "checking", "--endpoint", srv.endpoint,
                 "--server-key", str(d / "server.key"), "--key", key, "--timeout", "3",
                 *extra], capture_output=True, text=True, timeout=60)

        # The job's own key is not an operator key: refused by the controller.
        out = pause(str(d / "clients" / "alice.key_secret"))
        assert out.returncode == 1 and "not an operator key" in out.stderr
        # The operator's key: done, and journaled under its name.
        out = pause(str(d / "clients" / "ops.key_secret"), "--who", "oncall")
        assert out.returncode == 0, out.stderr
        events = [e.data for e in srv.journal().events("alices-job", "manual")]
        assert [(e["ok"], e["key"]) for e in events] == [(False, None), (True, "ops")]
        # A key no list holds never completes the handshake: no answer.
        stranger = tmp_path / "stranger"
        assert main(["keys", "generate", str(stranger), "--name", "eve"]) == 0
        out = pause(str(stranger / "clients" / "eve.key_secret"))
        assert out.returncode == 2 and "no answer" in out.stderr
        # The operator's key may steer, never report as a job: its registration (a name
        # no key holds yet) and its report are refused, and no job of that name appears.
        ops = dealer(ctx, srv.endpoint, d, d / "clients" / "ops.key_secret")
        for msg in (register("ops-job"), report("ops-job", 1)):
            reply = ask(ops, msg)
            assert isinstance(reply, wire.Error) and reply.code == "forbidden", reply
            assert "operator's" in reply.detail and "not report as one" in reply.detail
        assert not srv.journal().events("ops-job", "register")
    finally:
        ctx.destroy(linger=0)
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
