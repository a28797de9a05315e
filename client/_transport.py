"""The client's link to the controller: one daemon thread that owns a ZeroMQ DEALER.

The training thread never touches the socket. It hands messages over through
two queues and takes commands from one slot:

* reports go into a bounded deque; a full deque drops the *oldest* report and
  counts the drop, so a slow or absent controller costs memory of at most
  ``queue_size`` reports and never blocks a step;
* control messages (acks) go into a small separate queue that is always sent
  before reports, so reports never starve them; a registration, built fresh at
  send time so it carries the latest step, knobs and ``applied_seq``, goes
  before everything;
* the newest :class:`~trimtab.protocol.wire.Command` waits in a single slot.

Liveness follows the ZeroMQ guide's Paranoid Pirate pattern: a heartbeat every
``heartbeat_s``; any valid message from the controller counts as a sign of
life; after ``liveness`` silent intervals the socket is closed and recreated
after an exponentially growing pause, and the job registers again.

A client alone says so, from this thread, in a few lines rather than a storm (see
:mod:`~trimtab.client._link_watch`); the reconnections themselves log at DEBUG.

With :class:`CurveKeys` the socket speaks CURVE (``zmq.auth``): it authenticates with
the client's key pair and checks the controller's public key, and every frame is
encrypted. A controller that does not list the client's key never completes the
handshake; the client then sees silence and keeps training, reconnecting with back-off.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.auth

from trimtab.protocol import wire

from ._link_watch import LinkWatch

__all__ = ["Transport", "CurveKeys", "load_curve_keys"]

log = logging.getLogger("trimtab.client")

#: How long the thread waits on the socket before looking at its queues again.
_POLL_MS = 20
#: At most this many queued messages are sent per loop turn, so receiving keeps up.
_SEND_BURST = 64
#: Close gives pending messages and the Bye this long to leave.
_CLOSE_FLUSH_S = 0.25
#: A message sent after close (:meth:`Transport.send_late`) waits this long at most for the
#: controller's answer, and the interpreter's exit for that.
_LATE_WAIT_S = 2.0
#: The threads sending such messages now (the exit waits for them).
_LATE_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _join_late() -> None:
    """At exit: let messages sent after close (an evaluation as a script's last line) leave,
    waiting at most :data:`_LATE_WAIT_S` in all."""
    deadline = time.monotonic() + _LATE_WAIT_S
    for thread in list(_LATE_THREADS):
        thread.join(max(0.0, deadline - time.monotonic()))


@dataclass(frozen=True, repr=False)
class CurveKeys:
    """The z85 keys a CURVE client needs: the controller's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeys(server_public={self.server_public!r}, public={self.public!r})"


def _read_key(field: str, path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{field}={str(path)!r} is invalid ({exc}); allowed: a key file "
            "written by `trimtab keys generate`"
        ) from None


def load_curve_keys(
    server_key: str | os.PathLike[str] | None, client_key: str | os.PathLike[str] | None
) -> CurveKeys | None:
    """Keys from ``server_key`` (the controller's ``server.key``) and ``client_key`` (this
    client's ``clients/NAME.key_secret``); None when neither is given."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise ValueError(
            f"server_key={server_key!r}, client_key={client_key!r} is invalid; "
            "allowed: both (CURVE) or neither"
        )
    server_public, _ = _read_key("server_key", server_key)
    public, secret = _read_key("client_key", client_key)
    if secret is None:
        raise ValueError(
            f"client_key={str(client_key)!r} is invalid (it holds no secret key);"
            " allowed: this client's NAME.key_secret file"
        )
    return CurveKeys(server_public, public, secret)


class Transport:
    """Send reports and control messages to ``endpoint`` and receive commands, off-thread.

    >>> t = Transport("tcp://127.0.0.1:5555", "demo", register=make_register)  # doctest: +SKIP
    >>> t.start(); t.put_report(report); cmd = t.take_command(); t.close(bye)  # doctest: +SKIP
    """

    def __init__(
        self,
        endpoint: str,
        job: str,
        *,
        register: Callable[[], wire.Register | None],
        step: Callable[[], int] = lambda: 0,
        context: zmq.Context | None = None,
        heartbeat_s: float = 1.0,
        liveness: int = 3,
        queue_size: int = 64,
        reconnect_max_s: float = 8.0,
        hwm: int = 256,
        zmq_heartbeat: bool = True,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._curve = curve
        self.job = job
        self._register = register
        self._step = step
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._heartbeat_s = heartbeat_s
        self._liveness = liveness
        self._reconnect_max_s = max(reconnect_max_s, heartbeat_s)
        self._hwm = hwm
        self._zmq_heartbeat = zmq_heartbeat
        self._lock = threading.Lock()
        self._reports: collections.deque[wire.Report | wire.Validation] = collections.deque(
            maxlen=queue_size)
        self._control: collections.deque[wire.Ack] = collections.deque(maxlen=32)
        self._need_register = True
        #: When the last report was queued, and its step (a dropped guard's Bye, see
        #: _guard._finish); None: none yet.
        self.last_report: tuple[float, int] | None = None
        self._command: wire.Command | None = None
        self._stop = threading.Event()
        self._bye: wire.Bye | None = None
        self._thread = threading.Thread(target=self._run, name="trimtab-client", daemon=True)
        self._last_heard = float("-inf")
        self._started = time.monotonic()
        #: When this thread last came round its loop (another thread reads it: a silence
        #: while this one could not run is not the controller's; see :meth:`_stalled`).
        self._turned = self._started
        #: Reports dropped because the queue was full.
        self.dropped = 0
        #: Frames from the controller that did not decode, ignored.
        self.bad_frames = 0
        #: Messages handed to the socket (for tests and diagnostics).
        self.sent = 0
        #: Sockets created; more than one means the link was re-established.
        self.connects = 0
        #: Error replies from the controller, by code.
        self.refused: dict[str, int] = {}
        #: The newest step the controller says it has seen (its heartbeats carry it, and
        #: its answer to each report while a sweep runs); None: not told yet.
        #: Written by this thread, read by the training thread (one int: no lock needed).
        self.controller_step: int | None = None
        #: The refusal of this run's registration (``conflict``: another live run holds the
        #: job's name) still in force; None: none. A notebook trial's re-attach after a
        #: kernel restart trained ~10 s uncontrolled while ``connected`` said True.
        self._refused: str | None = None
        self._warned: dict[str, float] = {}
        #: What the log says of the link (a run alone, a controller back).
        self.watch = LinkWatch(job, endpoint, liveness * heartbeat_s, liveness, self._started)
        self._last_error: str | None = None
        # After close: the newest message waiting to go on a link of its own, and the
        # thread sending (see send_late).
        self._late: wire.Validation | None = None
        self._late_thread: threading.Thread | None = None
        #: Messages sent after close, by outcome: answered, refused, unanswered.
        self.late: dict[str, int] = {}

    # -- training-thread side: queues only, never the socket -------------------------------

    def start(self) -> None:
        """Start the thread; it registers first."""
        self._thread.start()

    def put_report(self, report: wire.Report | wire.Validation) -> None:
        """Queue a report (or the run's last validation result, behind the reports); a full
        queue drops its oldest report and counts it."""
        with self._lock:
            if len(self._reports) == self._reports.maxlen:
                self.dropped += 1
            self._reports.append(report)
            self.last_report = (time.monotonic(), report.step)

    def put_control(self, message: wire.Ack) -> None:
        """Queue a control message; it is sent before any queued report."""
        with self._lock:
            self._control.append(message)

    def take_command(self) -> wire.Command | None:
        """The newest command received since the last call, if any."""
        if self._command is None:  # the common case, read without the lock
            return None
        with self._lock:
            command, self._command = self._command, None
        return command

    def reregister(self) -> None:
        """Register again on this link before anything else is sent (the run's identity or
        position changed: a resume, see :mod:`trimtab.client._resume`)."""
        self._need_register = True

    @property
    def connected(self) -> bool:
        """Whether the controller was heard from within the liveness window (``liveness``
        heartbeats): False until its first answer, and while it is absent or restarting."""
        if self._refused or self._stop.is_set():  # refused this run (conflict), or closed
            return False
        now = time.monotonic()
        return now - self._last_heard - self._stalled(now) < self._liveness * self._heartbeat_s

    @property
    def link(self) -> int:
        """The link (connection attempt) in use, counted from 1; reports carry it."""
        return self.connects

    @property
    def offline(self) -> bool:
        """Whether no controller was heard for a whole liveness window: since the last word
        from one, or since this transport started when none was ever heard (a report made
        in the first window of a run is not offline: its registration is on its way)."""
        now = time.monotonic()
        quiet = now - max(self._last_heard, self._started) - self._stalled(now)
        return quiet >= self._liveness * self._heartbeat_s

    def _stalled(self, now: float) -> float:
        """Seconds this thread has not come round its loop, beyond a poll, when that is a
        heartbeat or more (0 otherwise): another thread held the GIL (torch.compile, a long
        C call) or the process was stopped. It sent no heartbeat meanwhile, so no answer
        could come: that silence is its own, not the controller's. The training thread,
        whose compile it may have been, reads ``connected`` and ``offline`` through it
        before this thread's next turn takes the stall off the silence (:meth:`_excuse`)."""
        if self._stop.is_set():
            return 0.0
        stalled = now - self._turned - _POLL_MS / 1000.0
        return stalled if stalled >= self._heartbeat_s else 0.0

    def close(self, bye: wire.Bye | None = None, timeout_s: float = 1.0) -> None:
        """Send ``bye`` (best effort), stop the thread and wait at most ``timeout_s``."""
        self._bye = bye
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("trimtab client thread did not stop within %.1f s", timeout_s)
        elif self._own_context:
            self._context.term()

    def send_late(self, message: wire.Validation) -> None:
        """After :meth:`close`: send ``message`` (a validation result of the ended run) on a
        link of its own, from a daemon thread, so the caller never waits on the network; a
        newer one handed over while one is on its way replaces any still waiting (bounded).
        The controller answers it (a heartbeat, or an error reply that is logged); the
        interpreter's exit waits for the answer at most :data:`_LATE_WAIT_S`."""
        with self._lock:
            self._late = message
            if self._late_thread is not None:
                return  # the thread on its way takes it
            thread = self._late_thread = threading.Thread(
                target=self._send_late, name="trimtab-client-late", daemon=True)
            _LATE_THREADS.add(thread)
        thread.start()

    def _send_late(self) -> None:
        while True:
            with self._lock:
                message, self._late = self._late, None
                if message is None:
                    self._late_thread = None
                    return
            try:
                outcome = self._deliver(message)
            except Exception:  # the run is over: say so, never raise into the caller
                log.exception("trimtab: job %r: could not send a %s after close", self.job,
                              message.type)
                outcome = "unanswered"
            with self._lock:
                self.late[outcome] = self.late.get(outcome, 0) + 1

    def _deliver(self, message: wire.Validation) -> str:
        """One message on a link of its own; its outcome (answered, refused, unanswered)."""
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(_LATE_WAIT_S * 1000))  # bounded, whatever
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
            self._secure(sock)
            sock.connect(self.endpoint)
            try:
                sock.send(wire.encode(message))  # queued until the connection is up
                self.sent += 1
                answered = sock.poll(int(_LATE_WAIT_S * 1000))
            except zmq.Again:
                answered = False
            if not answered:
                log.warning("trimtab: job %r: no answer from %s within %.0f s to the %s sent "
                            "after the run ended; it may be lost", self.job, self.endpoint,
                            _LATE_WAIT_S, message.type)
                return "unanswered"
            try:
                reply = wire.decode(sock.recv())
            except wire.WireError:
                self.bad_frames += 1
                return "unanswered"
            if isinstance(reply, wire.Error):
                log.warning("trimtab: job %r: the controller refused the %s sent after the run "
                            "ended: %s: %s", self.job, message.type, reply.code, reply.detail)
                return "refused"
            return "answered"
        finally:
            sock.close(0)
            context.term()

    # -- thread side ------------------------------------------------------------------------

    def _secure(self, sock: zmq.Socket) -> None:
        """With :class:`CurveKeys`: the controller's public key and this client's pair."""
        if self._curve is not None:
            sock.curve_serverkey = self._curve.server_public
            sock.curve_publickey = self._curve.public
            sock.curve_secretkey = self._curve.secret

    def _new_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # a dead controller must never hold up close()
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection; we keep the rest
        # Whatever the other end sends, one frame never costs more than this much memory.
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
        self._secure(sock)
        ivl_ms = max(1, int(self._heartbeat_s * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL, min(ivl_ms, 100))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self._reconnect_max_s * 1000))
        if self._zmq_heartbeat:
            # ZMTP-level pings find a dead TCP peer even when the application is quiet.
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl_ms * self._liveness)
        sock.connect(self.endpoint)
        self.connects += 1
        self._need_register = True  # a new link, maybe to a restarted controller
        return sock

    def _run(self) -> None:
        sock: zmq.Socket | None = None
        backoff = self._heartbeat_s
        self._turned = time.monotonic()
        while not self._stop.is_set():
            try:
                if sock is None:
                    sock = self._new_socket()
                    deadline = time.monotonic() + self._liveness * self._heartbeat_s
                    next_beat = time.monotonic()
                if self._receive(sock):
                    deadline = time.monotonic() + self._liveness * self._heartbeat_s
                    backoff = self._heartbeat_s
                self._flush(sock)
                now = time.monotonic()
                deaf = self._stalled(now)
                if deaf:
                    # This thread did not run for a beat or more: another held the GIL
                    # (torch.compile, a long C call) or the process was stopped. It sent
                    # no heartbeat then, so no answer could come: that silence is its own,
                    # not the controller's, and does not count against the link.
                    deadline += deaf
                    self._excuse(deaf, now)
                    next_beat = now
                self._turned = now
                self.watch.update(now, self._last_heard)
                if now >= next_beat and not self._need_register:  # nothing before Register
                    next_beat = now + self._heartbeat_s
                    self._send(sock, wire.Heartbeat(job=self.job, step=self._step()))
                if now >= deadline:  # now: a stall since is the next turn's to take off
                    # Paranoid Pirate: silence for `liveness` beats; drop the socket, pause, retry.
                    log.debug("no word from %s; reconnecting in %.2f s", self.endpoint, backoff)
                    sock.close(linger=0)
                    sock = None
                    self._pause(backoff)
                    backoff = min(backoff * 2, self._reconnect_max_s)
            except Exception as exc:  # the training loop must never see a transport failure
                # Its traceback once; the same failure again at every retry only at DEBUG.
                report = log.exception if repr(exc) != self._last_error else log.debug
                self._last_error = repr(exc)
                report("trimtab client transport error; recreating the socket")
                if sock is not None:
                    sock.close(linger=0)
                sock = None
                self._pause(backoff)
                backoff = min(backoff * 2, self._reconnect_max_s)
        self._shutdown(sock)

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` between links (or until closed): a wait of this thread's own,
        not a stall (:meth:`_stalled` counts from its planned end)."""
        self._turned = time.monotonic() + seconds
        self._stop.wait(seconds)

    def _excuse(self, deaf: float, now: float) -> None:
        """Take ``deaf`` seconds in which this thread could not run off the silence: the
        controller counts as heard that much later (the first window, when none was
        heard yet, as started that much later), so that neither ``connected``, ``offline``
        (reports made right after would be set aside as made alone) nor the log reads
        the stall as a lost controller. A controller that did die meanwhile is found a
        liveness window later."""
        if self._last_heard > float("-inf"):
            self._last_heard = min(now, self._last_heard + deaf)
        else:
            self._started = min(now, self._started + deaf)
            self.watch.started = self._started

    def _receive(self, sock: zmq.Socket) -> bool:
        """Handle what has arrived; True when the controller was heard from."""
        heard = False
        if not sock.poll(_POLL_MS, zmq.POLLIN):
            return False
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return heard
            # A controller may put an empty delimiter first; the message is the last frame.
            try:
                message = wire.decode(frames[-1])
            except wire.WireError as exc:
                self.bad_frames += 1
                log.debug("ignored a bad frame from the controller: %s", exc)
                continue
            heard = True
            self._last_heard = time.monotonic()
            self._handle(message)

    def _handle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Command):
            if message.job != self.job:
                log.warning("ignored a command for job %r (this is %r)", message.job, self.job)
                return
            with self._lock:
                pending = self._command
                if pending is None or message.seq >= pending.seq:
                    self._command = message
        elif isinstance(message, wire.Heartbeat):
            if message.job == self.job:
                self.controller_step = message.step
                if self._refused is not None:
                    self._refused = None
                    log.warning("trimtab: job %r: the controller took this run's registration "
                                "(the run that held the name ended or went silent): it is "
                                "controlled from now on", self.job)
        elif isinstance(message, wire.Error):
            if message.code == "conflict":
                self._refused = message.code
            if message.code == "unknown_job":  # the controller forgot us (restarted): re-register
                self._need_register = True
            elif time.monotonic() - self._warned.get(message.code, float("-inf")) >= 60.0:
                # At most one line per code a minute: a refused job would otherwise log
                # once per report (e.g. ``forbidden``: its key does not own the job).
                self._warned[message.code] = time.monotonic()
                log.warning("controller refused a message: %s: %s", message.code, message.detail)
            self.refused[message.code] = self.refused.get(message.code, 0) + 1

    def _send(self, sock: zmq.Socket, message: wire.Message) -> bool:
        """One non-blocking send; False when no live connection can take it now."""
        try:
            sock.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.sent += 1
        return True

    def _flush(self, sock: zmq.Socket, burst: int = _SEND_BURST) -> None:
        if self._need_register:
            # Cleared before the registration is made: a ``reregister`` from the training
            # thread landing while it is made or sent (a resume's load_state_dict right after
            # the link came up) asks for one more, never is lost under it. A CI run: the
            # resume's registration was dropped, and the controller never heard of it.
            self._need_register = False
            register = self._register()
            if register is None:  # the guard is gone: its finalizer is ending this link
                self._need_register = True
                return
            if not self._send(sock, register.model_copy(update={"link": self.connects})):
                self._need_register = True
                return  # no live connection yet; the registration must go first
        queues: tuple[collections.deque, ...] = (self._control, self._reports)
        for queue in queues:
            while burst > 0:
                with self._lock:
                    if not queue:
                        break
                    item = queue[0]
                if not self._send(sock, item):
                    return  # nothing can go now; keep everything queued, in order
                with self._lock:
                    if queue and queue[0] is item:
                        queue.popleft()
                burst -= 1

    def _shutdown(self, sock: zmq.Socket | None) -> None:
        """Hand what is queued, then the Bye, to a link within ``_CLOSE_FLUSH_S``.

        Between links (a reconnect's pause, after a silence that may only have been this
        process's threads starved) one more link is opened for it, and a link that is not
        up yet is waited for, never past the bound: the acks of a last command and the Bye
        are not dropped because the run ended in a pause."""
        deadline = time.monotonic() + _CLOSE_FLUSH_S
        try:
            if sock is None:
                sock = self._new_socket()
            while True:
                self._flush(sock, burst=self._reports.maxlen or _SEND_BURST)
                with self._lock:
                    done = not (self._need_register or self._control or self._reports)
                if done or time.monotonic() >= deadline:
                    break
                sock.poll(5, zmq.POLLOUT)  # a link coming up
            if self._bye is not None:
                self._send(sock, self._bye)
            # Give what was handed to the socket a moment to leave, never longer.
            sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        except zmq.ContextTerminated:
            # A close interrupted (Ctrl-C) and called again terminated the context under
            # this flush: what it held is dropped, as a close past its bound drops it.
            log.debug("trimtab client transport: the context ended during the last flush")
        except Exception:
            log.exception("trimtab client transport error while closing")
