"""The controller-capacity benchmark runs end to end: a real controller, real generator
processes, a handful of jobs for about two seconds. No timing assertions."""

from __future__ import annotations

import math

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
