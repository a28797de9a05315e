"""The ZeroMQ adapter: one ROUTER socket in front of a :class:`Controller`.

>>> server = Server(ControllerConfig(bind="tcp://127.0.0.1:0", metrics_port=0,
...                                  journal=":memory:"))
>>> server.endpoint.startswith("tcp://127.0.0.1:")
True
>>> server.security
'loopback only, unauthenticated'
>>> server.close()

What reaches the controller is bounded here, before any parsing: a frame over
``4 * MAX_MESSAGE_BYTES`` closes its connection (libzmq's ``MAXMSGSIZE``); a message of
more than two parts is read to its end but only its first parts are kept; and each peer
is held to its token bucket (:mod:`trimtab.controller.ratelimit`). With CURVE keys
configured (:mod:`trimtab.controller.auth`), only listed client keys complete the
handshake, and each message carries its key (the ZAP User-Id) to the controller, which
binds every job to the key that registered it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time

import zmq
from prometheus_client import CollectorRegistry, start_http_server
from zmq.utils.monitor import recv_monitor_message

from trimtab.controller.auth import AllowList, CurveAuthenticator, load_server_keys
from trimtab.controller.config import ControllerConfig, is_loopback_endpoint
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.controller.lock import JournalLock
from trimtab.controller.ratelimit import RateLimiter
from trimtab.protocol import wire

__all__ = ["Server"]

log = logging.getLogger("trimtab.controller")

#: How often the loop wakes to mark silent jobs lost, in milliseconds.
TICK_MS = 250
#: One journal transaction holds the messages handled in a row, up to this many or for
#: this long (seconds), whichever comes first; their replies go out once it is committed.
BATCH_MESSAGES = 128
BATCH_S = 0.004
#: Parts of one message kept: the routing id and one payload frame (a DEALER's message).
_KEEP_PARTS = 2
#: Failed CURVE handshakes that never reach the ZAP handler (wrong mechanism, wrong server
#: key, garbage): counted as ``trimtab_rejected_peers_total{reason="handshake"}``.
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
#: At most one log line about failed handshakes this often (seconds); each is counted.
_HANDSHAKE_LOG_S = 60.0


class Server:
    """Binds the ROUTER, serves the metrics endpoint and runs the message loop."""

    def __init__(
        self,
        config: ControllerConfig,
        *,
        context: zmq.Context | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.curve = config.curve_server_secret is not None
        if self.curve:  # load the keys before anything starts, so a bad one stops the start
            public, secret = load_server_keys(config.curve_server_secret)
            allowed = AllowList(config.curve_allowed_clients)
            operators = (None if config.curve_operators is None
                         else AllowList(config.curve_operators, "curve_operators"))
        # A start that fails leaves no journal (nor lock) it created behind it.
        self._new_journal = (config.journal != ":memory:"
                             and not os.path.exists(config.journal))
        self._lock = JournalLock(config.journal)  # one controller per journal
        try:
            self.controller = Controller(config, Journal(config.journal), registry=self.registry)
        except BaseException:
            self._lock.release()
            raise
        metrics = self.controller.metrics
        if self.curve:
            self.controller.clients = allowed.named
        if self.curve and operators is not None:
            self.controller.operators = operators.named
        # A ZAP handler serves its whole context, so a CURVE server gets a context of its own.
        self._own_context = context is None and self.curve
        self._ctx = context or (zmq.Context() if self.curve else zmq.Context.instance())
        self._auth = None
        self._monitor = None
        # Failed handshakes: when one was last logged, and how many came since.
        self._handshake_said, self._handshakes_quiet = -math.inf, 0
        self.limiter = RateLimiter(config.rate_limit)
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A frame larger than this is cut off by libzmq before it reaches Python; the
        # decoder refuses anything over MAX_MESSAGE_BYTES with an error reply.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
        # Drop (rather than block on) replies to peers whose pipes are full or gone.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        if self.curve:
            self._auth = CurveAuthenticator(
                self._ctx,
                allowed,
                on_deny=lambda reason: metrics.rejected_peers.labels(reason=reason).inc(),
                operators=operators,
            )
            self.sock.curve_server = True
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
            self._monitor = self.sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        try:
            self.sock.bind(config.bind)
        except zmq.ZMQError as exc:
            self._abort()
            raise OSError(f"cannot bind {config.bind}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.metrics_port = None
        if config.metrics_port:
            try:
                httpd, _ = start_http_server(
                    config.metrics_port, addr=config.metrics_addr, registry=self.registry
                )
            except OSError as exc:  # busy port, address not on this host
                self._abort()
                raise OSError(f"cannot serve metrics on {config.metrics_addr}:"
                              f"{config.metrics_port} (--metrics-addr, --metrics-port): "
                              f"{exc.strerror or exc}") from None
            self.metrics_port = httpd.server_port
            self._httpd = httpd
        self._stop = threading.Event()
        #: Whether the last :meth:`_handle_ready` found no message left ready.
        self._idle = True
        #: Why the loop stopped (the shutdown line says it), e.g. "SIGTERM".
        self.stop_reason = "stopped"

    def _abort(self) -> None:
        """A start that failed half way: undo what was set up."""
        self._close_sockets()
        self.controller.close()
        self._lock.release()
        if self._new_journal:  # made by this start: nothing in it but the schema
            for path in (self.config.journal, f"{self.config.journal}-wal",
                         f"{self.config.journal}-shm", self._lock.path):
                if path is not None:
                    with contextlib.suppress(OSError):
                        os.remove(path)

    @property
    def metrics_address(self) -> str | None:
        """``http://ADDR:PORT/metrics`` as bound (None: metrics off)."""
        if not self.metrics_port:
            return None
        return f"http://{self._metrics_host}:{self.metrics_port}/metrics"

    @property
    def _metrics_host(self) -> str:
        """The metrics address as a URL host (an IPv6 one in brackets)."""
        addr = self.config.metrics_addr
        return f"[{addr}]" if ":" in addr else addr

    def describe(self, config_file: str | None) -> list[str]:
        """The start-up lines: the config read, the policies live and in shadow, where it
        listens, who can reach it, where its metrics and journal are."""
        pol = self.config.policies

        def names(shadow: bool) -> str:
            chosen = [p.name + ("" if p.jobs is None else f" (jobs {', '.join(p.jobs)})")
                      for p in pol if p.shadow == shadow]
            return ", ".join(chosen) or "none"

        metrics = self.metrics_address or "off (--metrics-port 0)"
        if self.metrics_port and not is_loopback_endpoint(f"tcp://{self._metrics_host}:1"):
            metrics += " (not loopback: anyone who can reach it reads every job's metrics)"
        return [
            f"config: {config_file or 'none (defaults and TRIMTAB_* environment)'}",
            f"policies live: {names(False)}",
            f"policies in shadow: {names(True)}",
            f"bind: {self.endpoint} ({self.security})",
            f"metrics: {metrics}",
            f"journal: {self.config.journal}",
        ]

    @property
    def security(self) -> str:
        """Who can reach this controller, in words (logged at start)."""
        if self.curve:
            n = len(self._auth.allowed.keys())
            ops = self._auth.operators
            steer = ("nobody may steer jobs by hand (no curve_operators)" if ops is None else
                     f"the {len(ops.keys())} operator keys in {self.config.curve_operators} "
                     "may steer jobs by hand")
            return (
                f"CURVE-authenticated and encrypted: the {n} client keys in "
                f"{self.config.curve_allowed_clients}; {steer}"
            )
        if is_loopback_endpoint(self.config.bind):
            return "loopback only, unauthenticated"
        return (
            "NOT loopback and unauthenticated (allow_remote): anyone who can reach it "
            "can steer any job"
        )

    def serve_forever(self) -> None:
        """Handle messages until :meth:`stop` is called."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        log.info(
            "trimtab controller listening on %s; metrics on %s; journal %s",
            self.endpoint, self.metrics_address or "off", self.config.journal,
        )
        (log.info if self.curve or is_loopback_endpoint(self.config.bind) else log.warning)(
            "trimtab controller security: %s", self.security
        )
        next_tick = 0.0
        while not self._stop.is_set():
            ready = dict(poller.poll(TICK_MS))
            if self.sock in ready:
                self._drain()
            if self._monitor is not None and self._monitor in ready:
                self._watch_handshakes()
            if time.monotonic() >= next_tick:  # its scan of every job: not after every drain
                next_tick = time.monotonic() + TICK_MS / 1000
                self._send(self.controller.tick())
            else:  # states due for saving, a slice at a time
                self.controller.save_due()

    def _recv(self) -> tuple[list[zmq.Frame], int]:
        """One message's first parts, and how many parts it had (the rest are dropped)."""
        frames = [self.sock.recv(zmq.NOBLOCK, copy=False)]
        parts, more = 1, frames[0].more
        while more:  # the parts of one message arrive together: this never waits
            frame = self.sock.recv(copy=False)
            parts, more = parts + 1, frame.more
            if len(frames) < _KEEP_PARTS:
                frames.append(frame)
        return frames, parts

    def _user(self, frame: zmq.Frame) -> str | None:
        """The CURVE key (z85) a frame came with; None without keys (or, should libzmq
        ever give none with keys, "" — a key no job can be bound to)."""
        if not self.curve:
            return None
        try:
            return frame.get("User-Id") or ""
        except zmq.ZMQError:
            return ""

    def _drain(self, budget: int = 1000) -> None:
        """Handle up to ``budget`` messages that are ready, in transactions of a bounded
        size (:data:`BATCH_MESSAGES`, :data:`BATCH_S`): one COMMIT for many messages, the
        replies of each transaction sent once it committed. A kill loses at most the
        transaction under way, whole messages of it and nothing any client was told."""
        left = budget
        while left > 0:
            replies: list = []
            with self.controller.journal.batch():
                handled = self._handle_ready(min(left, BATCH_MESSAGES), replies)
            self._send(replies)
            left -= handled
            if self._idle:  # nothing more ready
                return

    def _handle_ready(self, most: int, replies: list) -> int:
        """Handle up to ``most`` ready messages for :data:`BATCH_S` at most, adding their
        replies to ``replies``; returns how many were handled (fewer: none left ready, or
        the time was up, as :attr:`_idle` says)."""
        t0 = time.perf_counter()
        self._idle = False
        for n in range(most):
            if n and time.perf_counter() - t0 > BATCH_S:
                return n
            try:
                frames, parts = self._recv()
            except zmq.Again:
                self._idle = True
                return n
            peer = frames[0].bytes
            user = self._user(frames[-1])
            if not self.limiter.allow(peer):
                replies += self._over_limit(peer)
                continue
            if parts != _KEEP_PARTS:
                # A DEALER sends [payload]; ROUTER prepends the identity. Anything else
                # is not ours: refuse it without guessing at the payload.
                replies.append(self.controller.refuse_frames(peer, parts - 1))
                continue
            if user == "":  # no key with CURVE on: never let it past the job binding
                replies.append(self.controller.refuse(peer, "forbidden", "no CURVE client key"))
                continue
            try:
                replies += self.controller.handle(peer, frames[1].bytes, user)
            except Exception:  # one job's bad luck must not stop the others
                log.exception("unexpected error handling a message; still serving")
        self._idle = False
        return most

    def _over_limit(self, peer: bytes) -> list:
        """Drop a message over its peer's rate; tell the peer at most once per interval."""
        cfg = self.config.rate_limit
        if self.limiter.should_notify(peer):
            return [
                self.controller.refuse(
                    peer,
                    "rate_limited",
                    f"over {cfg.messages_per_s:g} messages/s (burst "
                    f"{cfg.burst}); messages are dropped until the rate falls",
                )
            ]
        self.controller.metrics.message_errors.labels(code="rate_limited").inc()
        return []

    def _watch_handshakes(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _HANDSHAKE_EVENTS:
                self.controller.metrics.rejected_peers.labels(reason="handshake").inc()
                self._say_handshake(event["endpoint"].decode(errors="replace"),
                                    event["value"], time.monotonic())

    def _say_handshake(self, endpoint: str, code: int, now: float) -> None:
        """Log a failed CURVE handshake: the first at once, then at most one line a minute
        saying how many more (a client with the wrong server key retries in bursts every
        100 ms, about 90 lines in 20 s before). libzmq tells neither the peer nor its key."""
        self._handshakes_quiet += 1
        if now - self._handshake_said < _HANDSHAKE_LOG_S:
            return
        more = self._handshakes_quiet - 1
        log.warning(
            "refused a peer on %s: CURVE handshake failed (libzmq code %s: a wrong server "
            "key, no CURVE, or not ZeroMQ)%s; counted in trimtab_rejected_peers_total",
            endpoint, code,
            f", and {more} more since the last such line" if more else "")
        self._handshake_said, self._handshakes_quiet = now, 0

    def _send(self, replies) -> None:
        for peer, frame in replies:
            try:
                self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("reply to %r dropped: %s", peer, exc)

    def stop(self) -> None:
        self._stop.set()

    def _close_sockets(self) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._ctx.term()

    def close(self) -> None:
        """Stop, save every live job's state in the journal (logged, with the jobs and their
        steps), close the sockets and the metrics endpoint, release the journal."""
        self.stop()
        self._close_sockets()
        if self.metrics_port:
            self._httpd.shutdown()
        saved = self.controller.close()
        self._lock.release()
        jobs = ", ".join(f"{job} at step {step}" for job, step in saved[:20])
        more = f" and {len(saved) - 20} more" if len(saved) > 20 else ""
        log.info("trimtab controller stopped (%s): the state of %d live job%s saved in %s%s",
                 self.stop_reason, len(saved), "" if len(saved) == 1 else "s",
                 self.config.journal, f": {jobs}{more}" if saved else "")
