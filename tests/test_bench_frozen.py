"""bench.frozen runs and prints its table (the timings are printed, never asserted); the
ring's host memory is a count of bytes, and frozen-once holds less than every-time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_the_frozen_snapshot_bench_prints_both_modes():
    pytest.importorskip("peft")
    cmd = [sys.executable, "-m", "bench.frozen", "--layers", "1", "--width", "64",
           "--snapshots", "4", "--pairs", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    rows = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"\| (frozen once|every time) \| [\d.]+ \| ([\d.]+) \|", line)
        if m:
            rows[m[1]] = float(m[2])
    assert set(rows) == {"frozen once", "every time"}
    assert rows["frozen once"] < rows["every time"]
