"""Fixtures for every test: a factory of real ``trimtab serve`` subprocesses, stopped after
each test, torch on one thread, and the guards a failed test left open closed after it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.integration.support import Serve, start_serve


@pytest.fixture
def serve_factory(tmp_path):
    started: list[Serve] = []

    def factory(config: str = "", port: int | None = None, journal: Path | None = None) -> Serve:
        s = start_serve(tmp_path, port, None, config, journal)
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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: real training beside a controller subprocess on a
    busy two-core machine otherwise crawls (oversubscribed intra-op threads), and small
    matrices train fastest on one thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The slowest test files, started first: under ``-n 2 --dist loadfile`` each file runs in
#: one worker, and the soak (about 100 s) collected in its place, near the end, kept one
#: worker busy alone for its last minute and a half.
_FIRST = ("tests/integration/test_soak.py", "tests/integration/test_prometheus.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return _FIRST.index(path) if path in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: every other test keeps its order


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _close_what_a_failure_left_open(request) -> Iterator[None]:
    """A test that fails before its ``close()`` leaves its guard open in the process, and
    every later guard of that worker then counts as its game's other player (no climb
    verdict, no range test, no plateau cut) or is refused its job's name: a CI run's one
    failure became 17. The guards a failed test opened are closed after it; a passing
    test's are left alone (a module's fixture may hold one across its tests)."""
    from trimtab.client import _guard

    before = {id(g) for g in _guard._OPEN.values()}
    yield
    if not request.node.stash.get(_FAILED, False):
        return
    for guard in list(_guard._OPEN.values()):
        if id(guard) not in before and not guard._closed:
            guard.close("the test failed")
