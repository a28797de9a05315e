"""bench.plateau runs and prints a row per lr and seed (the losses are printed, never
asserted: the harm it shows is bench/results/plateau.md's to record)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_the_plateau_bench_prints_bare_and_attached_rows():
    cmd = [sys.executable, "-m", "bench.plateau", "--lrs", "0.05", "--seeds", "1",
           "--steps", "40"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 0.05 |")]
    assert len(rows) == 1
    assert re.fullmatch(r"\| 0\.05 \| 0 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|", rows[0])
