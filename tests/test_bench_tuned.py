"""The do-no-harm benchmark (``python -m bench.tuned``) runs end to end, small: the tuned
pair and the hot runs of a task against a live controller, in its two tables."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn",
                    reason="the bench extra is not installed (pip install -e '.[bench]')")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_the_tuned_and_hot_tables_for_one_task(tmp_path):
    out = tmp_path / "tuned.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.tuned", "--seeds", "1", "--tasks", "digits_cnn",
         "--steps", "40", "--workers", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: an aim not met, printed
    text = out.read_text()
    assert "## tuned: attached / bare at the tuned LR" in text
    row = re.search(r"^\| digits_cnn \| ([0-9.e-]+) \| [0-9.]+ \| [0-9.]+ \| ([0-9., ]+) \|",
                    text, re.M)
    assert row, text
    # The hot runs of the digits CNN's SGD at 10x and 30x its tuned LR, bare and attached.
    assert "## hot: digits_cnn started at 10x and 30x its tuned LR" in text
    for start in ("10x", "30x"):
        for who in ("bare", "trimtab"):
            assert re.search(rf"^\| {start} \| {who} \| ", text, re.M), (start, who, text)
    assert (done.returncode == 0) == ("| no |" not in text)
