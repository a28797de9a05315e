"""Per-peer rate limits: the token bucket, the bounded peer table, the config, and a real
flood from one peer against a ``trimtab serve`` subprocess while another job is served."""

from __future__ import annotations

import threading

import pytest
import zmq

from tests.integration.support import start_serve
from trimtab.controller.config import ConfigError, load_config
from trimtab.controller.ratelimit import RateLimitConfig, RateLimiter, TokenBucket
from trimtab.protocol import wire


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(0.1) and not b.take(0.1)  # 0.1 s at 10/s: one token
    assert sum(b.take(100.0) for _ in range(10)) == 5  # never more than the burst


def test_limiter_is_per_peer_and_tells_a_peer_at_most_once_per_interval():
    clock = Clock()
    lim = RateLimiter(RateLimitConfig(messages_per_s=1, burst=2, notify_every_s=1.0), clock=clock)
    assert [lim.allow(b"a") for _ in range(3)] == [True, True, False]
    assert lim.allow(b"b")  # another peer has its own bucket
    assert lim.should_notify(b"a") and not lim.should_notify(b"a")
    clock.t = 0.5
    assert not lim.should_notify(b"a")
    clock.t = 1.0
    assert lim.should_notify(b"a") and lim.allow(b"a")
    assert lim.refused == 1


def test_peer_table_is_bounded():
    clock = Clock()
    lim = RateLimiter(RateLimitConfig(messages_per_s=1, burst=1, max_peers=3), clock=clock)
    for i in range(1000):
        lim.allow(i)
    assert len(lim) == 3
    assert not lim.allow(999)  # the newest are kept, with their spent buckets
    assert lim.allow(0)  # the oldest was forgotten: a fresh bucket


def test_rate_zero_turns_limits_off():
    lim = RateLimiter(RateLimitConfig(messages_per_s=0, burst=1), clock=Clock())
    assert all(lim.allow(b"a") for _ in range(100)) and len(lim) == 0


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("messages_per_s", -1, "greater than or equal to 0"),
        ("burst", 0, "greater than or equal to 1"),
        ("max_peers", 0, "greater than or equal to 1"),
        ("sideways", 1, "Extra inputs are not permitted"),
    ],
)
def test_bad_limits_are_refused_naming_field_and_value(field, value, rule):
    with pytest.raises(ConfigError, match=rf"rate_limit\.{field} = {value}: .*{rule}"):
        load_config(env={}, overrides={"rate_limit": {field: value}})


def test_a_flooding_peer_is_limited_while_another_job_is_served(tmp_path):
    serve = start_serve(
        tmp_path, None, None,
        """
        [rate_limit]
        messages_per_s = 50
        burst = 50
    """,
    )
    ctx = zmq.Context()
    try:
        good = ctx.socket(zmq.DEALER)
        good.linger = 0
        good.connect(serve.endpoint)
        reg = wire.Register(
            job="good",
            run_id="r1",
            report_every=10,
            facts=wire.ScaleFacts(
                param_count=10, group_sizes=[10], optimizer="SGD", dtype="float32", device="cpu"
            ),
            knobs=wire.Knobs(lr=0.1),
        )
        good.send(wire.encode(reg))
        assert good.poll(10_000) and isinstance(wire.decode(good.recv()), wire.Heartbeat)

        flood_n, flood_replies = 5000, []
        stop = threading.Event()

        def flood() -> None:
            bad = ctx.socket(zmq.DEALER)
            bad.linger = 0
            bad.sndhwm = 0
            bad.connect(serve.endpoint)
            frame = wire.encode(wire.Heartbeat(job="flood"))  # an unknown job: answered
            for _ in range(flood_n):
                bad.send(frame)
            while not stop.is_set():
                if bad.poll(100):
                    flood_replies.append(wire.decode(bad.recv()))
            bad.close()

        flooder = threading.Thread(target=flood)
        flooder.start()
        # Meanwhile the good job's heartbeats are answered, every one.
        answered = 0
        for step in range(20):
            good.send(wire.encode(wire.Heartbeat(job="good", step=step)))
            if good.poll(10_000):
                reply = wire.decode(good.recv())
                answered += isinstance(reply, wire.Heartbeat) and reply.job == "good"
        text = ""
        for _ in range(100):  # until the server has counted the whole flood
            text = serve.metrics()
            errors = {code: _metric(text, code) for code in ("rate_limited", "unknown_job")}
            if sum(errors.values()) >= flood_n:
                break
            threading.Event().wait(0.1)
        stop.set()
        flooder.join()
        assert answered == 20
        # Every flood message is accounted for: answered (unknown job) or refused (limited).
        assert errors["unknown_job"] + errors["rate_limited"] == flood_n, errors
        assert errors["rate_limited"] > flood_n / 2, errors
        # The flooder hears of its limit, but the flood is not mirrored back to it.
        codes = [r.code for r in flood_replies]
        assert "rate_limited" in codes
        assert codes.count("rate_limited") < 0.01 * flood_n
        assert len(flood_replies) < flood_n / 2
    finally:
        ctx.destroy(linger=0)
        serve.proc.terminate()
        serve.proc.wait(timeout=10)


def _metric(text: str, code: str) -> float:
    line = f'trimtab_message_errors_total{{code="{code}"}} '
    return sum(float(x[len(line) :]) for x in text.splitlines() if x.startswith(line))
