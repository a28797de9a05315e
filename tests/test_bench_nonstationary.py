"""The benchmark of loops whose loss is not one fixed objective
(``python -m bench.nonstationary``) runs end to end, small: a curriculum regression, a
growing target and a toy GAN, bare and attached to a live default controller, in one
table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_the_curriculum_growing_and_gan_rows(tmp_path):
    out = tmp_path / "nonstationary.md"
    done = subprocess.run([sys.executable, "-m", "bench.nonstationary", "--quick",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# bench.nonstationary: ") and "trimtab config: defaults" in text
    num = r"([0-9.]+)"
    cur = re.search(rf"^\| curriculum \| switch at 100, lr 0.003, 250 steps \| {num} \| {num} "
                    rf"\| {num} \| (\d+) \| (\d+) \|$", text, re.M)
    grow = re.search(rf"^\| growing \| target x1 -> x3 over 375 steps, lr 0.003 \| {num} \| "
                     rf"{num} \| {num} \| (\d+) \| (\d+) \|$", text, re.M)
    gan = re.search(rf"^\| gan \| seed 1, 400 steps \(modes \d\) \| {num} \| {num} "
                    rf"\(modes \d\) \| {num} \| (\d+) \| (\d+) \|$", text, re.M)
    assert cur and grow and gan, text
    for row in (cur, grow, gan):
        bare, attached, ratio = (float(row.group(i)) for i in (1, 2, 3))
        assert ratio == pytest.approx(attached / bare, rel=1e-3, abs=1e-3)
    # The mean squared error of a regression that trained: below its initial one (~0.6).
    assert 0.0 < float(cur.group(1)) < 0.5
