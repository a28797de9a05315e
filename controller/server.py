"""The ZeroMQ adapter: one ROUTER socket in front of a :class:`Controller`.

>>> server = Server(ControllerConfig(bind="tcp://127.0.0.1:0", metrics_port=0,
...                                  journal=":memory:"))
>>> server.endpoint.startswith("tcp://127.0.0.1:")
True
>>> server.close()
"""

from __future__ import annotations

import logging
import threading

import zmq
from prometheus_client import CollectorRegistry, start_http_server

from trimtab.client import wire
from trimtab.controller.config import ControllerConfig
from trimtab.controller.journal import Journal
from trimtab.controller.service import Controller

__all__ = ["Server"]

log = logging.getLogger("trimtab.controller")

#: How often the loop wakes to mark silent jobs lost, in milliseconds.
TICK_MS = 250


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
        self.controller = Controller(config, Journal(config.journal), registry=self.registry)
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A frame larger than this is cut off by libzmq before it reaches Python; the
        # decoder refuses anything over MAX_MESSAGE_BYTES with an error reply.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
        # Drop (rather than block on) replies to peers whose pipes are full or gone.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.bind(config.bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.metrics_port = None
        if config.metrics_port:
            httpd, _ = start_http_server(config.metrics_port, addr=config.metrics_addr,
                                         registry=self.registry)
            self.metrics_port = httpd.server_port
            self._httpd = httpd
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        """Handle messages until :meth:`stop` is called."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        log.info("trimtab controller listening on %s; metrics on %s; journal %s",
                 self.endpoint,
                 f"{self.config.metrics_addr}:{self.metrics_port}" if self.metrics_port else "off",
                 self.config.journal)
        while not self._stop.is_set():
            if poller.poll(TICK_MS):
                self._drain()
            self._send(self.controller.tick())

    def _drain(self, budget: int = 1000) -> None:
        for _ in range(budget):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                # A DEALER sends [payload]; ROUTER prepends the identity. Anything else
                # is not ours: refuse it without guessing at the payload.
                self._send([self.controller.refuse_frames(frames[0], len(frames) - 1)])
                continue
            try:
                replies = self.controller.handle(frames[0], frames[1])
            except Exception:  # one job's bad luck must not stop the others
                log.exception("unexpected error handling a message; still serving")
                continue
            self._send(replies)

    def _send(self, replies) -> None:
        for peer, frame in replies:
            try:
                self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("reply to %r dropped: %s", peer, exc)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self.sock.close(linger=0)
        if self.metrics_port:
            self._httpd.shutdown()
        self.controller.close()
