"""The server's journal transactions: the messages that are ready are handled in one
transaction, and their replies go out only once it is committed (real ROUTER and DEALER
sockets on 127.0.0.1, a real journal file)."""

from __future__ import annotations

import time

import zmq

from trimtab.controller import server as server_mod
from trimtab.controller.config import ControllerConfig
from trimtab.controller.server import Server
from trimtab.protocol import wire

JOBS = 40


def register(job: str) -> bytes:
    return wire.encode(wire.Register(
        job=job, run_id="r1", report_every=10,
        facts=wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                              dtype="float32", device="cpu"),
        knobs=wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0)))


def test_ready_messages_share_one_commit_and_replies_wait_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "BATCH_S", 60.0)  # bounded by count alone here
    srv = Server(ControllerConfig(bind="tcp://127.0.0.1:0", metrics_port=0,
                                  journal=str(tmp_path / "j.db")))
    journal = srv.controller.journal
    commits: list[float] = []
    observe = journal.on_commit
    journal.on_commit = lambda s: (commits.append(s), observe(s))
    sent_in_tx: list[bool] = []
    send = srv._send
    monkeypatch.setattr(srv, "_send", lambda replies: (
        sent_in_tx.extend(journal._in_tx for _ in replies), send(replies)))
    ctx = zmq.Context.instance()
    dealers = []
    try:
        for _ in range(JOBS):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(srv.endpoint)
            dealers.append(d)
        for i, d in enumerate(dealers):
            d.send(register(f"b{i}"))
        time.sleep(1.0)  # all of them queued at the ROUTER before it reads any
        drains = 0
        while len(journal.events(kind="register")) < JOBS and drains < 50:
            srv._drain()
            drains += 1
        assert len(journal.events(kind="register")) == JOBS
        # One transaction for what was ready (a COMMIT per message before): at most one per
        # drain, and fewer than the messages.
        assert len(commits) <= drains < JOBS
        assert sent_in_tx == [False] * JOBS, "every reply sent after its transaction committed"
        for i, d in enumerate(dealers):
            assert d.poll(5000), f"no reply for b{i}"
            reply = wire.decode(d.recv())
            assert isinstance(reply, wire.Heartbeat) and reply.job == f"b{i}"
        assert set(journal.states(live_only=True)) == {f"b{i}" for i in range(JOBS)}
    finally:
        for d in dealers:
            d.close(linger=0)
        srv.close()


def test_a_transaction_holds_at_most_batch_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "BATCH_S", 60.0)
    monkeypatch.setattr(server_mod, "BATCH_MESSAGES", 8)
    srv = Server(ControllerConfig(bind="tcp://127.0.0.1:0", metrics_port=0,
                                  journal=str(tmp_path / "j.db")))
    journal = srv.controller.journal
    commits: list[int] = []
    observe = journal.on_commit
    journal.on_commit = lambda s: (commits.append(len(journal.events(kind="register"))),
                                   observe(s))
    ctx = zmq.Context.instance()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(JOBS)]
    try:
        for i, d in enumerate(dealers):
            d.setsockopt(zmq.LINGER, 0)
            d.connect(srv.endpoint)
            d.send(register(f"b{i}"))
        time.sleep(1.0)
        srv._drain()
        assert len(journal.events(kind="register")) == JOBS
        # Registrations committed 8 at a time (the states saved with them).
        assert commits == list(range(8, JOBS + 1, 8))
    finally:
        for d in dealers:
            d.close(linger=0)
        srv.close()
