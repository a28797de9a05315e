"""``python -m bench.gpu`` on the CPU (CI has no GPU): every section runs, smaller, and the
result file holds every table; it also runs from a plain checkout (no install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_bench_gpu_runs_every_section_on_the_cpu(tmp_path) -> None:
    result = tmp_path / "gpu-cpu.md"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick",
                           "--out", str(result)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = result.read_text()
    assert text == (tmp_path / "out" / "gpu-cpu.md").read_text()  # $OUT gets the same
    assert text.strip() in done.stdout  # and everything written was printed
    for title in ("## env", "## overhead", "## snapshots", "## faults", "## writer"):
        assert title in text
    assert "0 section(s) failed" in text and "Traceback" not in text
    assert text.count("| mlp (SGD), scaled |") == 1
    assert "| memory ring + checkpoint_dir |" in text
    assert "| attached, fault |" in text
    # The writer's checkpoint loads back (a write that failed was once timed as one), and
    # the training thread's own small files are timed.
    assert "load (read_payload" in text and "did not load back" not in text
    assert "| sharded step's trimtab.pt, the training thread's share" in text


def test_a_failing_section_does_not_stop_the_others(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick",
                           "--sections", "nonsense,env", "--out", str(tmp_path / "r.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    text = (tmp_path / "r.md").read_text()
    assert "unknown section 'nonsense'" in text and "| torch |" in text
    assert "1 section(s) failed" in text


def test_bench_host_time_prints_the_snapshot_and_per_step_rows() -> None:
    """``python -m bench.host_time`` (the GPU figures' host side, measured anywhere) runs
    and prints every row: the snapshot's parts, the host time after the window's read,
    and both per-step models."""
    done = subprocess.run([sys.executable, "-m", "bench.host_time", "--repeats", "3",
                           "--layers", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert sum("snapshot: " in r for r in rows) == 8
    assert sum("host ms after the window's read" in r for r in rows) == 2
    assert sum("non-report step" in r for r in rows) == 2
    assert any("top-level aten ops: " in r for r in rows)


def test_the_device_wheels_are_trimtabs_dependencies_less_what_the_device_has() -> None:
    """``python -m bench.device_wheels`` fetches, for the device's Python, every dependency
    in pyproject.toml except torch and numpy (the device's own), markers applied."""
    from bench.device_wheels import command, requirements

    pyproject = (ROOT / "pyproject.toml").read_text()
    names = [r.split(">")[0].split("<")[0].split("=")[0] for r in requirements(pyproject,
                                                                            "3.12")]
    assert sorted(names) == ["prometheus-client", "pydantic", "pyzmq", "rich"]
    assert any(r.startswith("tomli") for r in requirements(pyproject, "3.10"))
    cmd = command(["pyzmq>=25"], "3.12", "out")
    assert cmd[-1] == "pyzmq>=25" and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
