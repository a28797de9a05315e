"""A run preempted and resumed in a new process from the user's own checkpoint, attached
to a real ``trimtab serve`` (each process is a real subprocess: tests/integration/
resume_worker.py).

The user's checkpoint holds ``guard.state_dict()`` beside the model's, optimizer's and
scheduler's; the resumed process loads it after ``attach``. The run ends as the
uninterrupted one does, every step after the resume uses the knobs the uninterrupted run's
step used, and the controller follows the resume: from the step saved even when the old
process ran on past it, with no command applied twice and no stable mark of the old
process used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: The controller halves trimtab's lr multiplier every 100 steps (a live schedule sent at
#: registration): the knobs in force change over the run, and must continue exactly.
CONFIG = """
[[policies]]
name = "step_decay"
config = { step_size = 100, gamma = 0.5 }

[governor.lr]
cooldown_steps = 0
"""

ROOT = Path(__file__).resolve().parents[2]


def _worker(endpoint: str, workdir: Path, *args: str) -> dict:
    name = f"p{len(list(workdir.glob('p*.json')))}"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.resume_worker", endpoint, str(workdir),
         "--name", name, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    from .support import start_serve

    tmp = tmp_path_factory.mktemp("whole")
    srv = start_serve(tmp, None, None, CONFIG)
    try:
        return _worker(srv.endpoint, tmp, "--until", "300")
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def _knobs_by_step(run: dict) -> dict[int, dict]:
    return {step: knobs for step, knobs, _ in run["used"]}


@pytest.mark.parametrize("ran_to", [150, 220], ids=["at-the-save", "past-the-save"])
def test_a_run_resumed_in_a_new_process_ends_as_the_uninterrupted_one(
        serve_factory, tmp_path, uninterrupted, ran_to):
    srv = serve_factory(CONFIG)
    first = _worker(srv.endpoint, tmp_path, "--until", str(ran_to), "--save-at", "150",
                    "--die")
    journal = srv.journal()
    before = journal.events("resumable")
    sent_before = [e.seq for e in before if e.kind == "command"]
    assert first["step"] == ran_to and sent_before
    second = _worker(srv.endpoint, tmp_path, "--until", "300", "--resume")

    print(f"final loss: uninterrupted {uninterrupted['final']:.6f}, preempted at step "
          f"{ran_to} and resumed from step 150 {second['final']:.6f}")
    # Within 2% of the uninterrupted run's final loss (in fact the same run).
    assert second["final"] == pytest.approx(uninterrupted["final"], rel=0.02)
    # Every step after the resume used the knobs the uninterrupted run's step used: the
    # live schedule, multipliers, momentum and clip continued from the save.
    whole, resumed = _knobs_by_step(uninterrupted), _knobs_by_step(second)
    assert sorted(resumed) == list(range(151, 301))
    for step in (151, 152, 200, 201, 300):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-9), step
    assert resumed[201]["lr"] < resumed[199]["lr"]  # the schedule halved it at step 200
    # The controller followed the same run, resumed at the step saved.
    events = journal.events("resumable")
    regs = [e for e in events if e.kind == "register"]
    resume = next(e for e in regs if e.data["resumed"] == "resume")
    assert resume.data["resume_step"] == 150
    assert resume.data["run_id"] == first["run_id"] == second["run_id"]
    assert resume.data["checkpoints"] == [150]
    after = [e for e in events if e.id > resume.id]
    # Nothing applied twice: commands after the resume continue the sequence, and the new
    # process applied each command once, in order.
    cmds = [e for e in after if e.kind == "command"]
    assert all(c.seq > max(sent_before) for c in cmds)
    applied = [seq for _, _, seq in second["used"]]
    assert applied == sorted(applied) and applied[0] == first["used"][149][2]
    # No stable mark of the old process is used: marks and rollbacks after the resume name
    # only checkpoints the new process holds (from step 150 on).
    named = [c.data.get(k) for c in cmds for k in ("mark_stable", "rollback_to")]
    assert all(s is None or s >= 150 for s in named)
    assert not [e for e in after if e.kind == "rollback"]
    # Reports of the new process were observed (none refused as stale or abandoned).
    reports = [e for e in after if e.kind == "report"]
    assert reports and reports[0].step > 150
    assert not [e for e in after if e.kind in ("abandoned", "stale")]


def test_a_run_resumed_from_trimtabs_own_files_is_the_same_run(serve_factory, tmp_path,
                                                               uninterrupted):
    """A DDP user trial: resumed with load_stable + restore, the job registered as a new run,
    its step from 0 and trimtab's multipliers at 1, and its new files took the old ones'
    names. Each snapshot now carries the guard's state: restored with
    guard.load_state_dict(ckpt.guard_state), the run resumes as the same run, at the
    checkpoint's step, and goes on as the uninterrupted one."""
    srv = serve_factory(CONFIG)
    first = _worker(srv.endpoint, tmp_path, "--until", "260", "--files", "--die")
    from trimtab.client import load_stable

    saved = load_stable(tmp_path / "ckpt")
    assert saved is not None and 0 < saved.step < 260 and saved.guard_state is not None
    second = _worker(srv.endpoint, tmp_path, "--until", "300", "--files", "--resume")
    assert second["run_id"] == first["run_id"]
    resumed = _knobs_by_step(second)
    assert sorted(resumed) == list(range(saved.step + 1, 301))
    whole = _knobs_by_step(uninterrupted)
    for step in (saved.step + 1, 201, 300):  # the multiplier step_decay halved at 200 too
        assert resumed[step] == pytest.approx(whole[step], rel=1e-9), step
    assert second["final"] == pytest.approx(uninterrupted["final"], rel=0.02)
    regs = [e for e in srv.journal().events("resumable") if e.kind == "register"]
    resume = next(e for e in regs if e.data["resumed"] == "resume")
    assert resume.data["resume_step"] == saved.step
    assert resume.data["run_id"] == first["run_id"]


def test_a_process_killed_right_after_resuming_from_files_leaves_them_to_resume_from(
        serve_factory, tmp_path, uninterrupted):
    """A crash loop (a node that keeps dying a few steps into each restart): the resumed
    process wrote its snapshot of the resumed step over the stable file it had loaded,
    unmarked until the controller's first mark, so the next restart found an older
    checkpoint or none and started over. And each process left the one before's files on
    disk for good: a directory that grew by ``keep`` + 1 checkpoints per restart.

    Now the resumed step's file stays stable, and the process adopts its run's earlier files:
    the retention bound holds across restarts, and the steps after the resumed one (the
    crashed trajectory) go as a rollback's do."""
    from trimtab.client import load_stable
    from trimtab.client._checkpoint_files import scan

    srv = serve_factory(CONFIG)
    ckdir = tmp_path / "ckpt"
    first = _worker(srv.endpoint, tmp_path, "--until", "260", "--files", "--die")
    saved = load_stable(ckdir)
    assert saved is not None and 0 < saved.step < 260
    for _ in range(2):  # killed twice before its first report after the resume
        crashed = _worker(srv.endpoint, tmp_path, "--until", str(saved.step + 2), "--files",
                          "--resume", "--die")
        assert crashed["run_id"] == first["run_id"] and crashed["step"] == saved.step + 2
        again = load_stable(ckdir)
        assert again is not None and again.step == saved.step
        on_disk = scan(ckdir)
        assert max(e.step for e in on_disk) == saved.step, on_disk  # past it: gone
    last = _worker(srv.endpoint, tmp_path, "--until", "300", "--files", "--resume")
    assert last["run_id"] == first["run_id"] and last["step"] == 300
    assert last["final"] == pytest.approx(uninterrupted["final"], rel=0.02)
    on_disk = scan(ckdir)
    # keep (default 3) newest plus the newest stable: the first process's files are gone.
    assert len(on_disk) <= 4 and min(e.step for e in on_disk) > saved.step, on_disk
    assert len(list(ckdir.glob("ckpt-*.pt"))) == len(on_disk)


def test_a_process_killed_after_a_rollback_resumes_with_the_rollbacks_values(
        serve_factory, tmp_path):
    """A preemption trial: killed after a rollback and before the next stable mark, the
    run resumed from the restored checkpoint's file with the values in force when that
    file was written: the rollback's LR cut undone, its rollback uncounted, its command
    journaled as 'withdrawn, never applied' although the process had run with it. After a
    rollback the restored checkpoint's manifest holds the state the run goes on with."""
    from trimtab.client import load_stable

    srv = serve_factory(CONFIG + '\n[[policies]]\nname = "divergence_guard"\n')
    first = _worker(srv.endpoint, tmp_path, "--until", "195", "--files", "--spike-at", "170",
                    "--die")
    events = srv.journal().events("resumable")
    rollback = next(e for e in events if e.kind == "rollback")
    target = rollback.data["target"]
    assert first["rollbacks"] == 1 and target < 170
    # What the run went on with after the rollback (its first step after it).
    used = first["used"]
    back = next(i for i in range(1, len(used)) if used[i][0] < used[i - 1][0])
    assert used[back][0] == target
    _, knobs_after, seq_after = used[back + 1]
    saved = load_stable(tmp_path / "ckpt")
    assert saved is not None and saved.step == target
    state = saved.guard_state
    assert state["rollbacks"] == 1 and state["applied_seq"] == seq_after
    second = _worker(srv.endpoint, tmp_path, "--until", "300", "--files", "--resume")
    step_resumed, knobs_resumed, _ = second["used"][0]
    assert step_resumed == target + 1  # the same step as the one after the rollback
    assert knobs_resumed["lr"] == pytest.approx(knobs_after["lr"], rel=1e-9)
    assert second["rollbacks"] == 1
    later = [e for e in srv.journal().events("resumable") if e.id > rollback.id]
    assert not [e for e in later if e.kind == "withdrawn"], later


def test_a_run_resumed_twice_from_one_save_is_followed_and_rolled_back_after_it(
        serve_factory, tmp_path, uninterrupted):
    """Preempted twice before its next save: two processes resume from the same file. The
    controller follows each as a resume (none of the second's reports refused as stale),
    and the snapshot of the resumed state is the rollback target from the first report
    on: a spike the loop causes 20 steps after the resume is rolled back to it."""
    srv = serve_factory(CONFIG + '\n[[policies]]\nname = "divergence_guard"\n')
    first = _worker(srv.endpoint, tmp_path, "--until", "200", "--save-at", "150", "--die")
    _worker(srv.endpoint, tmp_path, "--until", "190", "--resume", "--die")
    third = _worker(srv.endpoint, tmp_path, "--until", "300", "--resume", "--spike-at", "170")
    print(f"final loss: uninterrupted {uninterrupted['final']:.6f}, resumed twice with a "
          f"spike at 170 {third['final']:.6f}, rollbacks {third['rollbacks']}")
    events = srv.journal().events("resumable")
    regs = [e for e in events if e.kind == "register"]
    resumes = [e for e in regs if e.data["resumed"] == "resume"]
    assert [r.data["resume_step"] for r in resumes] == [150, 150]
    assert len({r.data["resume_id"] for r in resumes}) == 2
    assert all(r.data["run_id"] == first["run_id"] for r in resumes)
    after = [e for e in events if e.id > resumes[-1].id]
    assert [e for e in after if e.kind == "report"]
    assert not [e for e in after if e.kind in ("abandoned", "stale")]
    # The resumed snapshot was marked stable with the first report, and the spike was
    # rolled back to it.
    marks = [e.step for e in after if e.kind == "stable"]
    assert marks and marks[0] == 150
    rollbacks = [e for e in after if e.kind == "rollback"]
    assert rollbacks and rollbacks[0].data["target"] == 150, rollbacks
    assert third["rollbacks"] >= 1 and third["step"] == 300
    assert third["final"] < 2 * uninterrupted["final"]


def test_the_resumable_example_survives_a_kill(serve_factory, tmp_path):
    """examples/train_resumable.py, killed with SIGKILL after a save and started again with
    the same arguments, resumes from its checkpoint and finishes; the controller follows
    the same run, resumed."""
    import signal

    srv = serve_factory(CONFIG)
    cmd = [sys.executable, str(ROOT / "examples" / "train_resumable.py"), "--job", "ex",
           "--endpoint", srv.endpoint, "--steps", "1000", "--save-every", "50",
           "--ckpt", str(tmp_path / "run.pt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    saved = []
    for line in proc.stdout:
        saved += [int(line.split()[2])] if line.startswith("saved step") else []
        if saved and saved[-1] >= 100:
            proc.send_signal(signal.SIGKILL)  # preempted, no clean-up
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed_at = int(out.stdout.split("resumed at step ")[1].split()[0])
    assert resumed_at >= 100 and resumed_at % 50 == 0
    assert "done at step 1000" in out.stdout
    regs = srv.journal().events("ex", "register")
    resume = [r for r in regs if r.data["resumed"] == "resume"]
    assert len(resume) == 1 and resume[0].data["resume_step"] == resumed_at
    assert resume[0].data["run_id"] == regs[0].data["run_id"]
