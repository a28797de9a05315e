"""Fuzzing the wire decoder and the controller's message handling (hypothesis).

In-process: arbitrary bytes, truncated and mutated encodings of valid messages, wrong
versions, huge numbers, NaN/inf, unknown fields and jobs, replayed and out-of-order
sequence numbers. Every frame is answered with an error (counted, and then nothing
changed) or taken as the valid message it is, nothing escapes, and a job that was never
the target keeps its state and still gets its decisions. Then once over real sockets,
against a ``trimtab serve`` subprocess, with frames no client would send.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tests.integration.support import Regression, start_serve, wait_for
from trimtab.client import attach
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.protocol import wire

PEER = b"fuzzer"
WITNESS = "witness"
V = wire.PROTOCOL_VERSION
#: The effective values, the user's own and trimtab's multipliers (none yet) of a client.
IN_FORCE = {
    "knobs": wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0),
    "base": wire.Knobs(lr=0.1, momentum=0.9, weight_decay=0.0),
    "scale": wire.Scale(),
}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def make() -> Controller:
    cfg = ControllerConfig(
        journal=":memory:",
        metrics_port=0,
        policies=[PolicySpec(name="plateau")],
        signals={"slope_window": 5},
        governor={"lr": {"min_rel": 1e-3, "max_rel": 10, "max_step_ratio": 2, "cooldown_steps": 0}},
    )
    return Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())


def register(job: str, **over) -> dict:
    msg = wire.Register(
        job=job,
        run_id="r1",
        report_every=10,
        facts=wire.ScaleFacts(
            param_count=100, group_sizes=[100], optimizer="SGD", dtype="float32", device="cpu"
        ),
        **IN_FORCE,
    )
    return {**json.loads(wire.encode(msg)), **over}


def report(job: str, seq: int, loss: float = 1.0, **over) -> dict:
    msg = wire.Report(
        job=job,
        seq=seq,
        step=seq * 10,
        window=10,
        loss_mean=loss,
        loss_last=loss,
        loss_min=loss,
        loss_max=loss,
        grad_norm_mean=1.0,
        grad_norm_max=1.0,
        grad_norm_std=0.1,
        **IN_FORCE,
    )
    return {**json.loads(wire.encode(msg)), **over}


def valid_messages(job: str) -> list[dict]:
    in_force = {k: v.model_dump() for k, v in IN_FORCE.items()}
    return [
        register(job),
        report(job, 7),
        {"type": "ack", "v": V, "job": job, "seq": 1, "step": 5, **in_force},
        {"type": "heartbeat", "v": V, "job": job, "step": 3},
        {"type": "bye", "v": V, "job": job, "step": 3, "reason": "done"},
    ]


def frame(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def errors_total(ctl: Controller) -> float:
    return sum(
        s.value
        for m in ctl.metrics.message_errors.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


def snapshot(ctl: Controller) -> dict:
    return {job: json.dumps(state.state_dict(), sort_keys=True) for job, state in ctl.jobs.items()}


def feed(ctl: Controller, data: bytes, peer: bytes = PEER, user: str | None = None) -> list:
    """One frame in; checks the contract every reply must keep, returns the replies."""
    before_errors, before = errors_total(ctl), snapshot(ctl)
    replies = ctl.handle(peer, data, user)  # nothing may escape: an exception fails the test
    decoded = [wire.decode(f) for _, f in replies]
    assert all(p == peer for p, _ in replies)
    errors = [m for m in decoded if isinstance(m, wire.Error)]
    if errors:
        assert len(decoded) == 1, "an error is the only reply"
        assert errors[0].code in wire.ERROR_CODES
        assert errors_total(ctl) == before_errors + 1, "every error reply is counted"
        assert snapshot(ctl) == before, f"refused ({errors[0].code}) but the state changed"
    else:
        assert errors_total(ctl) == before_errors
    return decoded


def with_witness() -> tuple[Controller, str]:
    """A controller with one healthy job on a slowly falling loss; returns its state."""
    ctl = make()
    feed(ctl, frame(register(WITNESS)), peer=b"w")
    for seq in (1, 2, 3):
        assert feed(ctl, frame(report(WITNESS, seq, loss=2.0 - 0.1 * seq)), peer=b"w") == []
    return ctl, snapshot(ctl)[WITNESS]


def witness_still_served(ctl: Controller, state_before: str, user: str | None = None) -> None:
    """The witness's state is as it was, and a plateau on it still brings the decision."""
    assert snapshot(ctl)[WITNESS] == state_before
    commands = []
    for seq in range(4, 16):
        loss = 1.7 + 0.01 * (-1) ** seq  # flat: a plateau
        commands += [
            m
            for m in feed(ctl, frame(report(WITNESS, seq, loss=loss)), peer=b"w", user=user)
            if isinstance(m, wire.Command)
        ]
        if commands:
            break
    assert commands, "the witness job got no plateau decision after the fuzzing"
    assert commands[0].scale.lr == pytest.approx(0.5)  # half the job's own lr
    assert any("plateau" in r for r in commands[0].reasons)
    ctl.close()


# -- strategies -------------------------------------------------------------------------

jobs = st.from_regex(r"[a-z]{1,6}", fullmatch=True).filter(lambda j: j != WITNESS)
huge = st.sampled_from([2**63, -(2**63), 10**30, -1, 1e308, -1e308, 1e400, 0.0, -0.0])
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), huge, nonfinite, st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def mutated(draw, job_names=jobs):
    """A valid message of a random type with one field set, added or removed."""
    msg = dict(draw(st.sampled_from(valid_messages(draw(job_names)))))
    how = draw(st.sampled_from(["set", "add", "drop", "version", "type"]))
    if how == "set":
        msg[draw(st.sampled_from(sorted(msg)))] = draw(json_value)
    elif how == "add":
        msg[draw(st.text(min_size=1, max_size=12))] = draw(json_value)
    elif how == "drop":
        msg.pop(draw(st.sampled_from(sorted(msg))))
    elif how == "version":
        msg["v"] = draw(st.one_of(st.integers(), st.text(max_size=3), st.none(), huge))
    else:
        msg["type"] = draw(
            st.one_of(st.text(max_size=10), st.sampled_from(["command", "error", "Report"]))
        )
    return msg


# -- in-process fuzzing -----------------------------------------------------------------


def test_arbitrary_bytes_are_refused_and_counted():
    ctl, witness = with_witness()

    @FUZZ
    @given(st.binary(max_size=2048))
    def run(data):
        replies = feed(ctl, data)
        assert len(replies) == 1 and isinstance(replies[0], wire.Error)

    run()
    for size in (wire.MAX_MESSAGE_BYTES + 1, 4 * wire.MAX_MESSAGE_BYTES):
        (reply,) = feed(ctl, os.urandom(size))
        assert reply.code == "oversized"
    witness_still_served(ctl, witness)


def test_truncated_valid_messages_are_refused():
    ctl, witness = with_witness()
    for obj in valid_messages("trunc"):
        data = frame(obj)
        for cut in range(len(data)):  # every proper prefix
            (reply,) = feed(ctl, data[:cut])
            assert isinstance(reply, wire.Error) and reply.code == "malformed"
    witness_still_served(ctl, witness)


def test_mutated_messages_are_refused_or_taken_as_valid():
    ctl, witness = with_witness()
    # Some fuzzed jobs exist, so reports, acks and byes reach a live job's handling.
    for job in ("a", "b", "c"):
        feed(ctl, frame(register(job)))

    @FUZZ
    @given(mutated())
    def run(msg):
        data = frame(msg)
        replies = feed(ctl, data)
        try:
            wire.decode(data)
        except wire.WireError as exc:
            assert [type(r) for r in replies] == [wire.Error]
            assert replies[0].code == exc.code and replies[0].detail

    run()
    witness_still_served(ctl, witness)


def test_refused_messages_aimed_at_a_live_job_change_nothing():
    """Mutations of the witness's own messages: each refused one leaves it exactly as it
    was (``feed`` checks it), and it is still served afterwards."""
    ctl, witness = with_witness()

    @FUZZ
    @given(mutated(job_names=st.just(WITNESS)))
    def run(msg):
        try:
            valid = wire.decode(frame(msg))
        except wire.WireError:
            valid = None
        if valid is not None and valid.type != "heartbeat":
            return  # a valid message may change the witness: that is not this test
        feed(ctl, frame(msg), peer=b"w")
        assert WITNESS in ctl.jobs

    run()
    witness_still_served(ctl, witness)


def test_another_key_can_do_nothing_to_a_bound_job():
    """With keys: whatever another key sends for a job bound to the first key is refused
    (``forbidden`` once it decodes) and changes nothing; the owner is still served."""
    ctl = make()
    feed(ctl, frame(register(WITNESS)), peer=b"w", user="KEY-1")
    for seq in (1, 2, 3):
        feed(ctl, frame(report(WITNESS, seq, loss=2.0 - 0.1 * seq)), peer=b"w", user="KEY-1")
    witness = snapshot(ctl)[WITNESS]

    @FUZZ
    @given(mutated(job_names=st.just(WITNESS)))
    def run(msg):
        replies = feed(ctl, frame(msg), peer=b"intruder", user="KEY-2")
        try:
            valid = wire.decode(frame(msg))
        except wire.WireError:
            return
        if valid.type in ("register", "report", "ack", "heartbeat", "bye") and (
            valid.job == WITNESS
        ):
            assert [r.code for r in replies] == ["forbidden"]

    run()
    witness_still_served(ctl, witness, user="KEY-1")


def test_edge_numbers_are_refused_with_the_right_code():
    ctl, witness = with_witness()
    cases = {
        "nonfinite": [
            report("edge", 1, loss_mean=math.nan),
            report("edge", 1, loss_max=-math.inf),
            report("edge", 1, step_time_s=math.inf),
        ],
        "invalid": [
            report("edge", 1, step=2**63),
            report("edge", 1) | {"seq": 0},
            report("edge", 1) | {"seq": -5},
            report("edge", 1, grad_norm_mean=-1.0),
            report("edge", 1, window=10**12),
            report("edge", 1, extra_field=1),
            register("edge", report_every=0),
        ],
        "version": [
            report("edge", 1, v=1),  # protocol 1: before the knob model
            report("edge", 1, v=V + 1),
            report("edge", 1, v=None),
            report("edge", 1, v=str(V)),
        ],
        "unknown_job": [report("nobody", 1), {"type": "heartbeat", "v": V, "job": "nobody"}],
        "unexpected": [{"type": "command", "v": V, "job": WITNESS, "seq": 99}],
    }
    for code, msgs in cases.items():
        for msg in msgs:
            (reply,) = feed(ctl, frame(msg))
            assert (reply.code, msg) == (code, msg)
    (reply,) = feed(ctl, b'{"type":"report","v":2,"job":"edge","seq":1e400}')
    assert reply.code in ("nonfinite", "invalid")
    (reply,) = feed(ctl, b'{"type":"report","v":2,"seq":' + b"9" * 5000 + b"}")
    assert reply.code == "malformed"  # Python refuses ints of over 4300 digits
    (reply,) = feed(ctl, b"[" * 60_000)  # too deep for the parser
    assert reply.code == "malformed"
    witness_still_served(ctl, witness)


def test_a_newer_clients_report_is_refused_saying_so_and_logged_once(caplog):
    """A client from a newer trimtab sends a field this controller does not know in every
    report (as lr_window_min was to a controller before it: a user trial's runs went on
    uncontrolled, the refusals logged at DEBUG): each is refused and counted, the reply
    says it may be a version skew, and the controller says so at WARNING once per job."""
    ctl, witness = with_witness()
    with caplog.at_level(logging.DEBUG, logger="trimtab.controller"):
        for seq in (4, 5, 6):
            (reply,) = feed(ctl, frame(report(WITNESS, seq) | {"loss_p99": 1.0}))
            assert reply.code == "invalid"
            assert "loss_p99" in reply.detail and "newer trimtab" in reply.detail
    said = [r for r in caplog.records if r.levelno == logging.WARNING
            and "refused a message" in r.getMessage()]
    assert len(said) == 1 and WITNESS in said[0].getMessage()


def test_replayed_and_out_of_order_sequence_numbers():
    """A report is taken only when its seq is above every seq taken before; acks for
    commands never sent are refused; older acks are taken as repeats and change nothing."""
    ctl, witness = with_witness()
    jobs = iter(range(10**6))

    @FUZZ
    @given(
        st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
        st.lists(st.integers(min_value=1, max_value=2**62), max_size=5),
    )
    # The plateau's command goes out at the fifth report: its ack is taken, the next refused.
    @example([1, 2, 3, 4, 5], [1, 2])
    def run(report_seqs, ack_seqs):
        job = f"seqs-{next(jobs)}"
        feed(ctl, frame(register(job)))
        state, newest = ctl.jobs[job], 0
        for seq in report_seqs:
            seen = state.reports_seen
            replies = feed(ctl, frame(report(job, seq, loss=1.0 + 0.01 * seq)))
            if seq > newest:
                newest = seq
                assert state.reports_seen == seen + 1
                assert not any(isinstance(r, wire.Error) for r in replies)
            else:
                assert [r.code for r in replies] == ["stale"]
                assert state.reports_seen == seen
        for seq in ack_seqs:
            ack = {"type": "ack", "v": V, "job": job, "seq": seq, "step": 1,
                   "knobs": {"lr": 12.3}, "base": {"lr": 0.1}, "scale": {"lr": 123.0}}
            before = (state.knobs, state.effective, state.base)
            replies = feed(ctl, frame(ack))
            if seq > state.command_seq:
                assert [r.code for r in replies] == ["invalid"]
                # Its values were not taken (an earlier ack, of a command sent, may have
                # set the same ones: compare with what was in force before it).
                assert (state.knobs, state.effective, state.base) == before
            else:
                assert replies == []
        feed(ctl, frame({"type": "bye", "v": V, "job": job}))  # keep the job table small
        assert job not in ctl.jobs

    run()
    witness_still_served(ctl, witness)


# -- over real sockets ------------------------------------------------------------------


def _metric(text: str, name: str, label: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and label in line
    )


def test_real_socket_garbage_then_a_normal_client_still_works(tmp_path):
    serve = start_serve(
        tmp_path, None, None,
        """
        [[policies]]
        name = "plateau"
        [signals]
        slope_window = 5
        [governor.lr]
        cooldown_steps = 0
    """,
    )
    ctx = zmq.Context()
    try:
        rng = random.Random(0)
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(serve.endpoint)
        garbage = [
            [b""],  # an empty frame
            [b"", b""],  # an empty delimiter, as a REQ would send
            [b"x", b"y", b"z"],  # three payload frames
            [b"{}"] * 10_000,  # ten thousand parts: read, not kept
            [os.urandom(200)],
            [bytes(rng.getrandbits(8) for _ in range(wire.MAX_MESSAGE_BYTES + 10))],
            [b'{"type":"heartbeat","v":2,"job":"nobody"}'],
        ]
        for parts in garbage:
            dealer.send_multipart(parts)
        replies = []
        while len(replies) < len(garbage) and dealer.poll(10_000):
            replies.append(wire.decode(dealer.recv_multipart()[-1]))
        assert [r.code for r in replies] == [
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "oversized",
            "unknown_job",
        ]
        assert replies[3].detail == "expected 1 payload frame, got 10000"
        # A frame over libzmq's limit closes that peer's connection, never the server.
        big = ctx.socket(zmq.DEALER)
        big.linger = 0
        big.connect(serve.endpoint)
        big.send(b"A" * (8 * wire.MAX_MESSAGE_BYTES))
        # Not ZeroMQ at all: raw bytes on the TCP port.
        for _ in range(3):
            with socket.create_connection(
                ("127.0.0.1", int(serve.endpoint.rsplit(":", 1)[1]))
            ) as s:
                s.sendall(os.urandom(512))
        # A normal client now trains against it and gets its decision.
        task = Regression(seed=1)
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
        with attach(
            task.model,
            opt,
            job="after-fuzz",
            endpoint=serve.endpoint,
            report_every=5,
            heartbeat_s=0.2,
            checkpoint_every=0,
        ) as guard:
            deadline = time.monotonic() + 60
            while guard.applied_seq == 0 and time.monotonic() < deadline:
                xb, yb = task.batch()
                loss = task.loss(xb, yb)
                opt.zero_grad()
                loss.backward()
                guard.step(loss)
                time.sleep(0.002)
            assert guard.applied_seq >= 1, serve.log()[-3000:]
        assert serve.proc.poll() is None
        assert "security: loopback only, unauthenticated" in serve.log()
        assert wait_for(
            lambda: any(e.kind == "ack" for e in serve.journal().events("after-fuzz")), timeout=10
        )
        text = serve.metrics()
        assert _metric(text, "trimtab_message_errors_total", 'code="malformed"') >= 5
        assert _metric(text, "trimtab_message_errors_total", 'code="oversized"') >= 1
    finally:
        ctx.destroy(linger=0)
        serve.proc.terminate()
        serve.proc.wait(timeout=10)
