"""The controller-capacity benchmark runs end to end: a real controller, real generator
processes, a handful of jobs for about two seconds. No timing assertions."""

from __future__ import annotations

import math
import os

import pytest

from bench import capacity


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_small_sweep_answers_every_job_and_prints_finite_rows():
    rows = capacity.run_sweep([5], rate=5.0, seconds=2.0, procs=2)
    assert len(rows) == 1
    row = rows[0]
    assert row.jobs == 5
    assert row.jobs_answered == 5, "every simulated job got heartbeat replies"
    assert row.errors == {}
    assert row.offered > 0 and row.handled > 0 and row.answered > 0.9
    for x in (row.handled, row.hb_p50_ms, row.hb_p99_ms, row.cpu_pct, row.rss_mb):
        assert math.isfinite(x) and x >= 0
    text = capacity.format_report(rows, ["# header"])
    assert text.splitlines()[0] == "# header"
    assert "| 5 | 5 |" in text
    assert "largest N with p99 < 10 ms:" in text
    assert "scale-out:" in text


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_pinned_the_controller_and_the_generators_run_on_separate_cpus(monkeypatch):
    pins = capacity.pinning()
    if pins is None:
        pytest.skip("needs 2 CPUs")
    seen = {}
    real = capacity._pin_process

    def spy(pid, cpus):
        real(pid, cpus)
        tids = os.listdir(f"/proc/{pid}/task")
        seen["controller"] = {frozenset(os.sched_getaffinity(int(t))) for t in tids}

    monkeypatch.setattr(capacity, "_pin_process", spy)
    (row,) = capacity.run_sweep([3], rate=5.0, seconds=1.0, procs=1, pin=True)
    assert row.jobs_answered == 3 and row.errors == {}
    assert seen["controller"] == {frozenset(pins[0])}  # every thread of it
    assert row.generator_cpus == sorted(pins[1])
    assert not pins[0] & pins[1]
    head = "\n".join(capacity.header([3], 5.0, 1.0, 1, 0, pin=True))
    assert f"the controller pinned to CPU {sorted(pins[0])}" in head
