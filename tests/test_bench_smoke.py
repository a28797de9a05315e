"""The control-quality benchmark runs end to end: one task, two contenders, one seed."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_MISSING = "the bench extra is not installed (pip install -e '.[bench]')"
pytest.importorskip("matplotlib", reason=_MISSING)
pytest.importorskip("torch_lr_finder", reason=_MISSING)

CONTENDERS = ("onecycle_rangetest", "trimtab")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_quick_run_prints_a_row_per_contender_with_finite_numbers(tmp_path):
    cmd = [sys.executable, "-m", "bench", "run", "--quick", "--tasks", "noisy_quadratic",
           "--contenders", ",".join(CONTENDERS), "--seeds", "1", "--steps", "60",
           "--workers", "1", "--scenarios", "lr,target", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "## LR robustness" in out and "## Time to target" in out
    lr_section = out.split("## LR robustness")[1].split("### Summary")[0]
    for name in CONTENDERS:
        row = re.search(rf"^\| {name} \| ([^|]+) \| ([^|]+) \|", lr_section, re.M)
        assert row, f"no LR-robustness row for {name}:\n{lr_section}"
        best, median = (float(x) for x in row.groups())  # at its best LR, median ratio
        assert math.isfinite(best) and best > 0 and math.isfinite(median)
    oracle = re.search(r"Oracle: ([0-9.e+-]+)", lr_section)
    assert oracle and math.isfinite(float(oracle.group(1)))
    assert (tmp_path / "quality.md").read_text().startswith("# Control quality")
    assert (tmp_path / "quality_lr_noisy_quadratic.png").stat().st_size > 0


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_system_scenarios_print_overhead_and_capacity_and_rerender_from_json(
        tmp_path, monkeypatch):
    from bench import run

    monkeypatch.setitem(run.SYSTEM_SIZES, "quick", {
        "overhead": {"models": ["mlp"], "repeats": 1, "steps": 5, "warmup": 2},
        "capacity": {"jobs": [3], "seconds": 1.0}})
    assert run.main(["--quick", "--scenarios", "overhead,capacity", "--out", str(tmp_path),
                     "--name", "sys"]) == 0
    md = (tmp_path / "sys.md").read_text()
    assert "## Client overhead" in md and "## Controller capacity" in md
    assert re.search(r"^\| mlp \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", md, re.M), md
    assert re.search(r"^\| 3 \| 2 \|", md, re.M) and "largest N with p99" in md
    assert "## LR robustness" not in md  # no training runs were asked for
    # The runs file keeps the printed tables: a re-render gives them back.
    again = tmp_path / "again"
    assert run.main(["--quick", "--scenarios", "overhead,capacity", "--out", str(again),
                     "--name", "sys", "--from-json", str(tmp_path / "sys-runs.json")]) == 0
    assert (again / "sys.md").read_text().split("## Client overhead")[1] == md.split(
        "## Client overhead")[1]
