"""CURVE keys and the controller's ZAP authenticator (``zmq.auth``).

``trimtab keys generate DIR --name alice --name bob`` (:func:`generate_keys`) writes::

    DIR/server.key              the controller's public key: give it to every client
    DIR/server.key_secret       the controller's key pair: config ``curve_server_secret``
    DIR/clients/NAME.key_secret a client's key pair: give it to that client only
    DIR/clients/NAME.key        the same client's public key
    DIR/allowed/NAME.key        a copy of it: config ``curve_allowed_clients = "DIR/allowed"``
    DIR/operators/NAME.key      ``--operator NAME``: a person's public key, allowed to steer
                                jobs (``trimtab set``...): ``curve_operators = "DIR/operators"``

Running it again on the same DIR keeps the server keys and adds clients. To revoke a
client, delete its ``allowed/NAME.key``: the list is re-read when the directory changes,
and new handshakes with that key fail (connections already open stay open until they drop).

The authenticator runs pyzmq's ZAP handler in a thread of the server's context; a client
key not in the list never completes the handshake, so no message of it reaches the
controller, and each refusal is reported to ``on_deny``. The ZAP User-Id of an allowed
client is its z85 public key; the controller binds each job to it.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     made = generate_keys(d, ["alice"])
...     allowed = AllowList(f"{d}/allowed").keys()
>>> sorted(made), len(allowed)
(['alice'], 1)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "SERVER_PUBLIC",
    "SERVER_SECRET",
    "AuthError",
    "AllowList",
    "CurveAuthenticator",
    "generate_keys",
    "load_server_keys",
]

log = logging.getLogger("trimtab.controller")

SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AuthError(ValueError):
    """A key file or directory cannot be used; the message names it and says why."""


def generate_keys(directory: str | os.PathLike[str], names: Iterable[str],
                  operators: Iterable[str] = ()) -> dict[str, Path]:
    """Write the server key pair (unless present) and one key pair per client name and per
    operator name (a person who steers jobs: its public key goes to ``operators/``, not
    ``allowed/``); returns each one's key pair file by name. Secret files are readable by
    their owner only."""
    root = Path(directory)
    operators = list(operators)
    names = [*names, *operators]
    for name in names:
        if not _NAME.match(name) or name == "server":
            raise AuthError(
                f"client name {name!r} is invalid; allowed: 1-64 letters, digits, "
                "'_', '.', '-', and not 'server'"
            )
    if len(set(names)) != len(names):
        raise AuthError(f"client names {names!r} repeat a name; each must be unique")
    clients, allowed, ops = root / "clients", root / "allowed", root / "operators"
    for name in names:
        if (clients / f"{name}.key_secret").exists():
            raise AuthError(f"client {name!r} already has keys in {clients}; pick another name")
    for d in (root, clients, allowed, *([ops] if operators else [])):
        d.mkdir(parents=True, exist_ok=True)
    if not (root / SERVER_SECRET).exists():
        zmq.auth.create_certificates(root, "server")
        os.chmod(root / SERVER_SECRET, 0o600)
    out = {}
    for name in names:
        public, secret = zmq.auth.create_certificates(clients, name)
        os.chmod(secret, 0o600)
        shutil.copyfile(public, (ops if name in operators else allowed) / f"{name}.key")
        out[name] = Path(secret)
    return out


def load_server_keys(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The (public, secret) z85 keys in a ``server.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(
            f"curve_server_secret = {str(path)!r}: cannot read a key pair: {exc}"
        ) from None
    if secret is None:
        raise AuthError(
            f"curve_server_secret = {str(path)!r} holds only a public key; "
            "expected the server.key_secret file"
        )
    return public, secret


class AllowList:
    """The client public keys (``*.key``) in a directory, re-read when it changes; ``what``
    names the setting it comes from (for errors)."""

    def __init__(self, directory: str | os.PathLike[str],
                 what: str = "curve_allowed_clients") -> None:
        self.directory = Path(directory)
        self.what = what
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._named: dict[str, str] = {}
        self._keys: frozenset[bytes] = frozenset()
        self.keys()  # an unreadable directory fails at start, not at the first handshake

    def keys(self) -> frozenset[bytes]:
        """The allowed z85 public keys, as of the directory's last change."""
        self._reread()
        return self._keys

    def named(self) -> dict[str, str]:
        """The allowed z85 public keys (text) with their names (the files' stems)."""
        self._reread()
        return self._named

    def _reread(self) -> None:
        try:
            stamp = self.directory.stat().st_mtime_ns
        except OSError as exc:
            raise AuthError(f"{self.what} = {str(self.directory)!r}: {exc}") from None
        with self._lock:
            if stamp == self._stamp:
                return
            named = {}
            try:
                for path in sorted(self.directory.glob("*.key")):
                    public, _ = zmq.auth.load_certificate(path)
                    named[public.decode("ascii")] = path.stem
            except (OSError, ValueError) as exc:
                raise AuthError(f"{self.what} = {str(self.directory)!r}: {exc}") from None
            if self._stamp is not None:
                log.info("%s re-read from %s: %d keys", self.what, self.directory, len(named))
            self._named = named
            self._keys = frozenset(k.encode("ascii") for k in named)
            self._stamp = stamp


class CurveAuthenticator:
    """pyzmq's ZAP handler in a thread of ``context``, allowing the keys of ``allowed``.

    ``on_deny(reason)`` is called (in the handler's thread) for each refused handshake.
    One per context: ZAP handlers are found by a fixed in-process address.
    """

    def __init__(
        self,
        context: zmq.Context,
        allowed: AllowList,
        on_deny: Callable[[str], None] = lambda reason: None,
        operators: AllowList | None = None,
    ) -> None:
        self.allowed = allowed
        #: People's keys (``curve_operators``): they may connect too, to steer jobs.
        self.operators = operators
        self._on_deny = on_deny
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("trimtab.controller.zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """The ZAP handler's question: may ``client_key`` (z85) connect?"""
        try:
            ok = client_key in self.allowed.keys() or (
                self.operators is not None and client_key in self.operators.keys())
        except AuthError as exc:  # the directory went away: refuse everyone, say why
            log.error("%s; refusing every client", exc)
            ok = False
        if not ok:
            log.warning(
                "refused a client with an unlisted CURVE key %s",
                client_key.decode("ascii", "replace"),
            )
            self._on_deny("unknown_key")
        return ok

    def stop(self) -> None:
        self._auth.stop()
