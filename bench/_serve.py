"""A live ``trimtab serve`` subprocess on loopback, shared by every benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

__all__ = ["Controller", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    """``trimtab serve`` with its journal in ``tmp`` and metrics off; ``stop()`` ends it.

    >>> ctl = Controller(tmp, config="trimtab.toml")  # doctest: +SKIP
    >>> attach(model, opt, job="bench", endpoint=ctl.endpoint)  # doctest: +SKIP
    """

    def __init__(self, tmp: str, config: str | None = None) -> None:
        port = free_port()
        #: The controller's journal (SQLite, WAL): readable while it runs.
        self.journal = os.path.join(tmp, "journal.db")
        cmd = [sys.executable, "-m", "trimtab.controller", "serve", "--bind",
               f"tcp://127.0.0.1:{port}", "--metrics-port", "0", "--journal",
               self.journal, "--log-level", "WARNING"]
        if config:
            cmd += ["--config", config]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            raise RuntimeError(f"trimtab serve did not start: {line!r}")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
