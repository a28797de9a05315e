"""Fixtures: a factory of real ``trimtab serve`` subprocesses, stopped after each test."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from .support import Serve, free_port, start_serve


@pytest.fixture
def serve_factory(tmp_path):
    started: list[Serve] = []

    def factory(config: str = "", port: int | None = None, journal: Path | None = None) -> Serve:
        s = start_serve(tmp_path, port or free_port(), free_port(), config, journal)
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                s.proc.kill()
