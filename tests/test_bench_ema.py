"""bench.ema runs and prints its table (the figures are printed, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_the_weight_average_bench_prints_a_row_per_model():
    cmd = [sys.executable, "-m", "bench.ema", "--models", "mlp", "--steps", "3",
           "--warmup", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| mlp |")]
    assert re.fullmatch(r"\| mlp \| 85,002 \| \d+ / \d+ \| \d+ / \d+ \| [\d.]+ \| n/a on cpu \|",
                        row), row
