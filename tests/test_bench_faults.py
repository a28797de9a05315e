"""The benchmark's fault scenario: every contender meets the same real fault in a real run,
and trimtab's runs against a live controller repeat exactly in lockstep."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import contenders, faults
from bench._serve import Controller
from bench.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]

_MISSING = "the bench extra is not installed (pip install -e '.[bench]')"
pytest.importorskip("matplotlib", reason=_MISSING)
pytest.importorskip("zclip", reason=_MISSING)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# | fault | contender | recovered k/n | redone | back after | final ratio | worst | vs trimtab |
ROW = re.compile(r"^\| (\w+) \| ([\w:]+) \| (\d+)/(\d+) \| (\d+) \| ([^|]+) \| ([^|]+) \| "
                 r"([^|]+) \| ([^|]*)\|", re.M)


def test_every_contender_meets_the_fault_and_the_table_says_who_recovered(tmp_path):
    cmd = [sys.executable, "-m", "bench", "run", "--quick", "--tasks", "digits_cnn",
           "--contenders", "constant,zclip,trimtab", "--seeds", "1", "--steps", "60",
           "--workers", "1", "--scenarios", "faults", "--faults", "nan_grad",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    section = done.stdout.split("## Fault recovery")[1]
    rows = {m.group(2): m.groups() for m in ROW.finditer(section)}
    assert set(rows) == {"constant", "zclip", "trimtab"}, section
    for fault, *_ in rows.values():
        assert fault == "nan_grad"
    # A NaN in one gradient: plain SGD writes it into the weights and the run is lost;
    # trimtab's guard skips that step and the run goes on (its controller also halves the
    # LR, so it need not end within 10% of the clean run). Iterations redone count the LR
    # range test's return to its start too (its sweep takes the first fifth of the budget).
    assert rows["constant"][2:4] == ("0", "1") and rows["constant"][6].strip() == "diverged"
    assert rows["trimtab"][3] == "1" and int(rows["trimtab"][4]) >= 1, rows["trimtab"]
    assert 0.5 < float(rows["trimtab"][6]) < 3, rows["trimtab"]
    assert "loses to trimtab" in rows["constant"][8]
    assert (tmp_path / "quality_digits_cnn_nan_grad.png").stat().st_size > 0
    assert "fault at iteration 30 of 60" in section


def _resume_when_waited_on_or_past(pid: int, progress: list[int], waits: list[int],
                                   last: int) -> None:
    """SIGCONT ``pid`` once lockstep began a wait after the stop, or the loop got to
    iteration ``last`` (without lockstep nothing waits)."""
    start = waits[0]
    while waits[0] == start and progress[0] < last:
        time.sleep(0.001)
    os.kill(pid, signal.SIGCONT)


def _lr_run(ctl: Controller, job: str, stall: bool) -> list[float]:
    """digits_cnn with trimtab, the LR x100 at iteration 30; with ``stall`` the controller
    is stopped (SIGSTOP) just before that step until lockstep waits on it or the loop gets
    to iteration 40. Returns the LR after each iteration."""
    task = load_tasks()["digits_cnn"]
    run = task.make(0)
    setup = contenders.Setup(task, run, 0.03, 60, ctl.endpoint, job, ctl.journal)
    stepper = contenders.get("trimtab").build(setup)
    batches, lrs, progress, waits = run.batches(), [], [0], [0]
    if stepper.lockstep is not None:
        wait = stepper.lockstep._wait

        def counted(*args):
            waits[0] += 1
            return wait(*args)

        stepper.lockstep._wait = counted
    resumer = None
    try:
        for it in range(1, 46):
            progress[0] = it
            if it == 30:
                stepper.scale_lr(faults.LR_FACTOR)
            loss = run.train_loss(run.model, next(batches))
            stepper.optimizer.zero_grad()
            loss.backward()
            if it == 30 and stall:
                os.kill(ctl.proc.pid, signal.SIGSTOP)
                resumer = threading.Thread(target=_resume_when_waited_on_or_past,
                                           args=(ctl.proc.pid, progress, waits, 40))
                resumer.start()
            stepper.step(loss)
            lrs.append(stepper.lr_used())  # what the step ran with
    finally:
        progress[0] = 1_000
        if resumer is not None:
            resumer.join()
        info = stepper.close()
    assert info.get("lockstep_timeouts", 0) == 0
    return lrs


def test_lockstep_applies_a_command_at_the_step_after_its_report_even_when_it_is_late(
        tmp_path, monkeypatch):
    # A policy that answers every report with x0.9 on trimtab's lr multiplier (no cooldown):
    # each report's command must land at the very next step. (The x100 of the user's own
    # LR at step 30 is the user's: under the knob model trimtab multiplies it, it does not
    # clamp it, so the step after shows 0.9 x the user's 3.0 x the multiplier before.)
    from bench.scenario_policies import python_path

    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    config = tmp_path / "trimtab.toml"
    config.write_text('allow_plugins = ["bench.scenario_policies:*"]\n\n'
                      '[[policies]]\nname = "bench.scenario_policies:Nudge"\n'
                      'config = { factor = 0.9 }\n\n'
                      '[governor.lr]\ncooldown_steps = 0\nslew_ratio = 100.0\n')
    ctl = Controller(str(tmp_path), str(config))
    try:
        calm = _lr_run(ctl, "calm", False)
        stalled = _lr_run(ctl, "stalled", True)
    finally:
        ctl.stop()
    # The report at step 30 (its window ran at x0.9**5 of 0.03) brings x0.9 more, which
    # lands at step 31 however long the controller took (without lockstep the loop runs
    # on to step 40 while the controller is stopped, and the command lands after that).
    assert calm[28] == pytest.approx(0.03 * 0.9 ** 5)
    assert calm[29] == pytest.approx(3.0 * 0.9 ** 5)
    assert calm[30] == pytest.approx(3.0 * 0.9 ** 6), calm[25:40]
    assert stalled == calm
    assert all(math.isfinite(x) for x in calm)


def test_the_loops_schedule_and_a_bad_schedule_name():
    """The warm-up + cosine the fault benchmark's loop writes, and a refused name that says
    what is allowed (in the docstring's examples too)."""
    import doctest

    assert doctest.testmod(faults).failed == 0
    with pytest.raises(ValueError, match=r"schedule 'cosine' is unknown; allowed: constant, "
                                         r"warmup_cosine"):
        faults.scheduled_lr("cosine", 0)
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--schedules", "linear"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--schedules: schedule 'linear' is unknown" in done.stderr


def test_a_fault_on_the_gpu_path_is_rolled_back_to_an_early_snapshot_and_recovers(
    monkeypatch, tmp_path
) -> None:
    """The path a GPU run takes with a non-fused optimizer (``nonfinite="zero"``: nothing
    read from the device between reports, each snapshot taken before its window's read and
    labelled after it), driven on the CPU against a live controller: the fault is rolled
    back to such a snapshot and the run ends as good as the clean one."""
    import functools

    import trimtab.client

    monkeypatch.setattr(trimtab.client, "attach",
                        functools.partial(trimtab.client.attach, nonfinite="zero"))
    cfg = tmp_path / "trimtab.toml"
    cfg.write_text(faults.CONTROLLER_CONFIG)
    ctl = Controller(str(tmp_path), str(cfg))
    try:
        clean = faults.train(None, ctl.endpoint, "clean", 0)
        hit = faults.train("scaled_inputs", ctl.endpoint, "hit", 0)
    finally:
        ctl.stop()
    assert hit.restored and all(0 < s < faults.FAULT_AT and s % faults.CHECKPOINT_EVERY == 0
                                for s in hit.restored), hit.restored
    assert hit.steps == faults.TOTAL and faults.recovered(hit, clean), (hit, clean)


def test_an_early_fault_is_rolled_back_and_a_bad_fault_step_is_refused(tmp_path) -> None:
    """``--fault-at``: a fault at iteration 110 (the 22nd report, just past the health
    judgement's 20 warm-up reports, while the loss still falls fast and its EW variance
    still holds that fall) is rolled back to a checkpoint before it and the run recovers;
    a step outside the run is refused naming what is allowed."""
    cfg = tmp_path / "trimtab.toml"
    cfg.write_text(faults.CONTROLLER_CONFIG)
    ctl = Controller(str(tmp_path), str(cfg))
    try:
        clean = faults.train(None, ctl.endpoint, "clean", 0)
        hit = faults.train("corrupt_targets", ctl.endpoint, "hit", 0, fault_at=110)
    finally:
        ctl.stop()
    bare = faults.train("corrupt_targets", None, "bare", 0, fault_at=110)
    assert faults.damaged(bare, clean), (bare, clean)
    # The fault's rollback comes first; a range test the blow-up starts returns later to a
    # checkpoint of its sweep, which depends on the controller's pace (not in lockstep here:
    # a sweep runs at most three report windows past the step the controller has seen).
    assert hit.restored and 0 <= hit.restored[0] < 110, hit.restored
    assert faults.recovered(hit, clean), (hit, clean)
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--fault-at", "900"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--fault-at 900: allowed 1..899" in done.stderr
