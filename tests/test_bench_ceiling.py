"""``python -m bench.ceiling`` runs end to end, small; its cooldown contender holds the LR
and then goes down in a straight line to 0 over the last part of the run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn",
                    reason="the bench extra is not installed (pip install -e '.[bench]')")


def test_the_cooldown_holds_the_lr_then_falls_in_a_line_to_zero():
    from bench.contenders import Setup, get
    from bench.tasks import load_tasks

    task = load_tasks()["noisy_quadratic"]
    run = task.make(0)
    stepper = get("cooldown20").build(Setup(task, run, 0.1, 10))
    batches = run.batches()
    used = []
    for _ in range(10):
        loss = run.train_loss(run.model, next(batches))
        stepper.optimizer.zero_grad()
        loss.backward()
        stepper.step(loss)
        used.append(stepper.lr_used())
    assert used == pytest.approx([0.1] * 8 + [0.1, 0.05])
    assert not get("cooldown10").applies_to(load_tasks()["gpt_loop"])  # it has a schedule


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_ceiling_and_cooldown_tables_for_one_task(tmp_path):
    out = tmp_path / "ceiling.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.ceiling", "--seeds", "2", "--tasks", "noisy_quadratic",
         "--steps", "30", "--workers", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    # Every point of the oracle's grid (9), with the best of them.
    row = re.search(r"^\| noisy_quadratic \| [0-9.]+ \(warmup_cosine @ lr [0-9.]+\) \| (.*) \| "
                    r"([0-9.e-]+) \| ([0-9.]+) \|$", text, re.M)
    assert row, text
    assert len(row.group(1).split(", ")) == 9
    for last in ("10", "20"):
        assert re.search(rf"^\| noisy_quadratic \| 0.03 \| last {last}% \| [0-9.]+, [0-9.]+ \| ",
                         text, re.M), text
