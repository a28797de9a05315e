"""CheckpointStore on real CPU training: the ring, exact restores, and the files on disk
(atomic, written off the training thread, checksummed, bounded)."""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import time

import numpy as np
import pytest
import torch

import trimtab.client._checkpoint_files as files_mod
from trimtab.client import CheckpointStore, load_stable
from trimtab.client import _host_copy as copies_mod
from trimtab.client._checkpoint_files import WRITER_THREAD, CheckpointFiles

pytestmark = pytest.mark.timeout(30)


class Run:
    """A small MLP, its optimizer and (optionally) a scheduler, trained on random batches."""

    def __init__(self, opt: str = "adam", scheduler: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
        )
        if opt == "adam":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-2, momentum=0.9)
        self.sched = (torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=0.05, total_steps=50)
                      if scheduler else None)

    def step(self) -> None:
        # Batches and dropout draw from torch's RNG: a restored RNG replays them exactly.
        x = torch.randn(16, 4)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def take(self, store: CheckpointStore, step: int):
        return store.take(step, self.model, self.opt, self.sched, clip=1.0,
                          counters={"calls": step})

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def _draws() -> tuple:
    return torch.randn(3).tolist(), np.random.rand(3).tolist(), random.random()


def _assert_same_state(a: dict, b: dict) -> None:
    """Two optimizer (or scheduler) state dicts, equal to the bit."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        elif isinstance(x, dict):
            _assert_same_state(x, y)
        else:
            assert x == y, key


def test_ring_keeps_the_k_newest_plus_the_newest_stable() -> None:
    run = Run()
    store = CheckpointStore(keep=2)
    run.take(store, 0)
    assert store.mark_stable(0) and store.stable_step == 0
    for step in (10, 20, 30):
        run.step()
        run.take(store, step)
    assert store.steps() == [0, 20, 30]  # 10 left the ring; stable 0 is kept besides the two
    assert store.mark_stable(20) and store.steps() == [20, 30]  # 0 is no longer the newest
    run.take(store, 40)
    run.take(store, 50)
    assert store.steps() == [20, 40, 50] and store.stable_step == 20
    assert not store.mark_stable(30)  # evicted: cannot be marked
    assert not store.mark_stable(7)  # never taken
    assert store.stable().step == 20


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_restore_reproduces_the_exact_state(opt: str) -> None:
    run = Run(opt, scheduler=True)
    store = CheckpointStore(keep=3)
    for _ in range(3):
        run.step()
    run.take(store, 3)
    params, opt_state = run.params(), copy.deepcopy(run.opt.state_dict())
    sched_state = copy.deepcopy(run.sched.state_dict())
    rng_state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    draws = _draws()
    torch.set_rng_state(rng_state[0])
    np.random.set_state(rng_state[1])
    random.setstate(rng_state[2])
    continued = []
    for _ in range(4):
        run.step()
        continued.append(run.params())
    _draws()
    assert store.mark_stable(3)
    for _ in range(2):  # twice: training after a restore must not write into the checkpoint
        restored, note = store.restore(3, run.model, run.opt, run.sched)
        assert (restored.step, note) == (3, None)
        assert all(torch.equal(p, q) for p, q in zip(run.params(), params, strict=True))
        moments = {"adam": {"exp_avg", "exp_avg_sq"}, "sgd": {"momentum_buffer"}}[opt]
        assert moments <= run.opt.state_dict()["state"][0].keys()  # compared just below
        _assert_same_state(run.opt.state_dict(), opt_state)
        _assert_same_state(run.sched.state_dict(), sched_state)
        assert _draws() == draws  # torch, numpy and random draw what they drew after the take
        restored.restore(run.model, run.opt, run.sched)  # the RNG again, for the replay
        for expected in continued:  # and training replays the same trajectory, bit for bit
            run.step()
            assert all(torch.equal(p, q) for p, q in zip(run.params(), expected, strict=True))
    assert restored.knobs.clip == 1.0 and restored.knobs.lr == opt_state["param_groups"][0]["lr"]


def test_restore_refuses_a_step_that_is_not_stable() -> None:
    run = Run()
    store = CheckpointStore(keep=3)
    run.take(store, 0)
    run.step()
    before = run.params()
    assert store.restore(0, run.model, run.opt) == (
        None, "rollback_to=0: no stable checkpoint at that step (stable: none)")
    assert store.restore(5, run.model, run.opt)[0] is None
    assert all(torch.equal(p, q) for p, q in zip(run.params(), before, strict=True))


def test_restore_drops_the_newer_checkpoints() -> None:
    run = Run()
    store = CheckpointStore(keep=3)
    for step in (0, 5, 10):
        run.take(store, step)
        run.step()
    store.mark_stable(0)
    store.mark_stable(5)
    store.restore(0, run.model, run.opt)  # an older stable one: 5 and 10 are in its future
    assert store.steps() == [0] and store.stable_step == 0


class _Event:
    """Stands in for a torch.cuda.Event whose copy has not finished."""

    done = False

    def query(self) -> bool:
        return self.done


def test_a_snapshot_is_unusable_until_its_copy_completes(monkeypatch, tmp_path) -> None:
    """The CUDA path's gate, driven on CPU: listed, markable, restorable and written only
    after event.query() says the device-to-host copy is done; nothing ever waits."""
    event = _Event()
    monkeypatch.setattr(copies_mod._HostCopier, "start",
                        lambda self: [(torch.device("cpu"), event, True)])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize"))
    run = Run()
    store = CheckpointStore(keep=2, directory=tmp_path)
    run.take(store, 0)
    store.poll()
    assert store.steps() == [] and not store.mark_stable(0)
    assert store.flush(5) and not list(tmp_path.glob("ckpt-*"))
    event.done = True
    store.poll()
    assert store.steps() == [0] and store.mark_stable(0)
    assert store.flush(5) and load_stable(tmp_path).step == 0
    store.close()


def test_files_are_written_atomically_off_the_training_thread(monkeypatch, tmp_path) -> None:
    saves = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        final = tmp_path / f"ckpt-{obj['step']:012d}.pt"
        saves.append((threading.current_thread().name, final.exists()))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = Run(scheduler=True)
    store = CheckpointStore(keep=2, directory=tmp_path)
    for step in (0, 10, 20):
        run.take(store, step)
        run.step()
    store.mark_stable(10)
    assert store.flush(10)
    # 0 may leave the ring before its write starts, and is then not written at all.
    assert len(saves) >= 2 and {name for name, _ in saves} == {WRITER_THREAD}
    assert not any(existed for _, existed in saves)  # never written in place
    assert threading.current_thread().name != WRITER_THREAD
    names = sorted(os.listdir(tmp_path))
    assert names == [f"ckpt-0000000000{s}.{ext}" for s in (10, 20) for ext in ("json", "pt")]
    for step in (30, 40):
        run.take(store, step)
    assert store.flush(10)
    # keep=2 newest plus the newest stable one, older than both.
    assert sorted(os.listdir(tmp_path)) == [
        f"ckpt-0000000000{s}.{ext}" for s in (10, 30, 40) for ext in ("json", "pt")]
    store.mark_stable(40)
    store.close()
    # keep=2 newest plus the newest stable one; 10, no longer the newest stable, is gone.
    assert sorted(os.listdir(tmp_path)) == [
        f"ckpt-0000000000{s}.{ext}" for s in (30, 40) for ext in ("json", "pt")]
    loaded = load_stable(tmp_path)
    assert loaded.step == 40 and loaded.knobs.clip == 1.0
    assert loaded.scheduler["last_epoch"] == run.sched.last_epoch


def test_a_write_killed_part_way_leaves_the_previous_stable_loadable(
    monkeypatch, tmp_path, caplog
) -> None:
    run = Run()
    store = CheckpointStore(keep=3, directory=tmp_path)
    run.take(store, 0)
    store.mark_stable(0)
    assert store.flush(10)
    stable_params = run.params()
    frozen, resume = threading.Event(), threading.Event()

    def killed_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of the temporary file, then "killed"
        frozen.set()
        resume.wait(10)
        raise OSError("simulated kill")

    monkeypatch.setattr(torch, "save", killed_save)
    run.step()
    run.take(store, 10)
    store.mark_stable(10)
    assert frozen.wait(10)
    # The moment of the kill: no final file, no manifest; the previous stable one loads.
    assert not (tmp_path / "ckpt-000000000010.pt").exists()
    assert not (tmp_path / "ckpt-000000000010.json").exists()
    assert [p.name for p in tmp_path.glob(".trimtab-*.tmp")]
    assert load_stable(tmp_path).step == 0
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        resume.set()
        assert store.flush(10)
    assert "write of step 10 failed: simulated kill" in caplog.text
    assert not list(tmp_path.glob(".trimtab-*.tmp"))
    loaded = load_stable(tmp_path)
    assert loaded.step == 0
    loaded.restore(run.model, run.opt)
    assert all(torch.equal(p, q) for p, q in zip(run.params(), stable_params, strict=True))
    store.close()


def test_a_rollback_during_a_write_never_lists_the_abandoned_checkpoint(
    monkeypatch, tmp_path
) -> None:
    run = Run()
    store = CheckpointStore(keep=3, directory=tmp_path)
    run.take(store, 0)
    store.mark_stable(0)
    assert store.flush(10)
    real = files_mod._write_manifest

    def rollback_meanwhile(directory, step, *args, **kwargs):
        real(directory, step, *args, **kwargs)
        if step == 10:  # the training thread rolls back to 0 while step 10 commits
            store.files.drop_after(0)

    monkeypatch.setattr(files_mod, "_write_manifest", rollback_meanwhile)
    run.step()
    run.take(store, 10)
    assert store.flush(10)
    assert store.files.steps() == [0]
    assert not list(tmp_path.glob("ckpt-000000000010.*"))
    store.close()


def test_leftovers_of_a_hard_kill_are_never_read(tmp_path) -> None:
    run = Run()
    store = CheckpointStore(keep=3, directory=tmp_path)
    run.take(store, 0)
    store.mark_stable(0)
    store.close()
    # What a kill -9 can leave: a partial temporary file; a data file renamed into place
    # whose manifest (the commit point) was never written.
    (tmp_path / ".trimtab-ckpt-000000000010.pt.abc.tmp").write_bytes(b"PK\x03 partial")
    (tmp_path / "ckpt-000000000010.pt").write_bytes(b"not committed")
    assert load_stable(tmp_path).step == 0
    CheckpointFiles(tmp_path, keep=3).close()  # a new writer clears the temporary files
    assert not list(tmp_path.glob("*.tmp"))


def test_a_corrupted_file_is_skipped_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    run = Run(scheduler=True)
    store = CheckpointStore(keep=3, directory=tmp_path)
    for step in (0, 10, 20):
        run.take(store, step)
        store.mark_stable(step)
        run.step()
    store.close()
    path = tmp_path / "ckpt-000000000020.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: loads.append(kw) or real_load(f, **kw))
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        loaded = load_stable(tmp_path)
    assert loaded.step == 10  # the next older valid one
    assert len(loads) == 1 and loads[0]["weights_only"] is True  # the bad file never unpickled
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning.getMessage()
    assert "checksum mismatch" in warning.getMessage() and "not loaded" in warning.getMessage()


def test_an_unreadable_manifest_is_skipped_with_a_warning(tmp_path, caplog) -> None:
    run = Run()
    store = CheckpointStore(keep=3, directory=tmp_path)
    for step in (0, 10):
        run.take(store, step)
        store.mark_stable(step)
    store.close()
    (tmp_path / "ckpt-000000000010.json").write_text("{ truncated")
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        assert load_stable(tmp_path).step == 0
    assert "ckpt-000000000010.json skipped: unreadable" in caplog.text


def test_a_new_runs_checkpoints_are_loaded_not_an_earlier_runs_at_higher_steps(
        tmp_path, caplog) -> None:
    """A DDP user trial: a fresh job started on a checkpoint_dir that held a finished run's
    files (stable at 225), was killed at step 82, and load_stable returned the old run's
    step 225, another job's weights. The newest stable checkpoint is the most recently
    written or marked one, whatever its step; a WARNING names the higher ones left."""
    old = Run(seed=1)
    store = CheckpointStore(keep=2, directory=tmp_path)
    for step in (200, 225):
        old.take(store, step)
        old.step()
    store.mark_stable(225)
    store.close()
    new = Run(seed=2)
    store = CheckpointStore(keep=2, directory=tmp_path)  # the new run, in the same folder
    new.take(store, 0)
    store.mark_stable(0)
    new.step()
    new.take(store, 25)
    store.close()
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        loaded = load_stable(tmp_path)
    assert loaded.step == 0
    seed2 = Run(seed=2)  # the new run's weights at its step 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.values(),
                                                 seed2.model.state_dict().values(), strict=True))
    assert "higher steps ([225])" in caplog.text


def test_the_snapshot_at_attach_leaves_an_earlier_runs_files_for_the_loop_to_resume_from(
        tmp_path, dead_endpoint, caplog) -> None:
    """A DDP trial of the resume from trimtab's files: attach took its snapshot of step 0
    and its writer wrote it over the earlier run's step 0 while the loop, between attach and
    its first step, was loading that very file: 'checksum mismatch ... not loaded' on both
    ranks, and nothing to resume from. The snapshot taken at attach is written from the
    first step on."""
    from trimtab.client import attach

    old = Run(seed=1)
    store = CheckpointStore(keep=2, directory=tmp_path)
    old.take(store, 0)
    store.mark_stable(0)
    store.close()
    before = (tmp_path / "ckpt-000000000000.pt").read_bytes()
    new = Run(seed=2)
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        guard = attach(new.model, new.opt, job="j", endpoint=dead_endpoint,
                       checkpoint_every=10, checkpoint_dir=tmp_path)
        time.sleep(0.2)  # the writer thread had all the time it needed
        loaded = load_stable(tmp_path)
    assert (tmp_path / "ckpt-000000000000.pt").read_bytes() == before
    assert loaded is not None and "checksum" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(
        loaded.model.values(), Run(seed=1).model.state_dict().values(), strict=True))
    loaded.restore(new.model, new.opt)
    loss = new.model(torch.randn(2, 4)).sum()
    loss.backward()
    guard.step(loss)  # the first step: now the snapshot of the run as handed over is written
    guard.close()
    assert (tmp_path / "ckpt-000000000000.pt").read_bytes() != before


def test_a_resumed_run_takes_over_its_own_files_only(tmp_path) -> None:
    """adopt (a process resuming run A at step 20): run A's files up to 20 become this
    store's (listed, the stable one stable, pruned to the bound), A's file after 20 goes,
    and another run's files and an older trimtab's, which name no run, stay as they were."""
    run = Run()
    older = CheckpointStore(keep=5, directory=tmp_path)
    for step, owner in ((0, None), (5, "B"), (10, "A"), (20, "A"), (30, "A")):
        older.take(step, run.model, run.opt, clip=1.0, counters={"calls": step},
                   run=None if owner is None else {"run_id": owner})
    for step in (5, 20):
        older.mark_stable(step)
    older.close()
    assert [(e.step, e.run) for e in files_mod.scan(tmp_path)] == [
        (0, None), (5, "B"), (10, "A"), (20, "A"), (30, "A")]

    store = CheckpointStore(keep=1, directory=tmp_path)
    assert store.adopt("A", 20)  # the file at the resumed step is stable
    assert store.flush(10)
    # keep=1: the newest (20, stable too) survives; 10 is pruned, 30 deleted.
    assert store.steps() == [20]
    assert [(e.step, e.run) for e in files_mod.scan(tmp_path)] == [
        (0, None), (5, "B"), (20, "A")]
    before = (tmp_path / "ckpt-000000000020.pt").read_bytes()
    run.take(store, 20)  # the snapshot of the resumed state leaves the stable file as it is
    assert store.mark_stable(20)  # as the guard marks it, the file it was loaded from stable
    assert store.flush(10) and store.stable_step == 20
    assert (tmp_path / "ckpt-000000000020.pt").read_bytes() == before
    assert load_stable(tmp_path).step == 20
    store.close()
    # Resumed at 30 from the loop's own checkpoint: A's stable file at 20 is kept on disk
    # but is no stable checkpoint of the resumed run (a fault would go back past 30).
    later = CheckpointStore(keep=1, directory=tmp_path)
    assert not later.adopt("A", 30)
    assert later.flush(10)
    assert later.steps() == [20] and later.stable_step is None
    later.close()


def test_a_report_lists_only_checkpoints_the_ring_still_holds_after_its_step(
        fake_controller) -> None:
    """A preemption trial: every Hugging Face run logged 'mark_stable=100: no checkpoint at
    that step (held: 0, 150, 200, 250)'. The report at step 250 listed the ring as it was
    before that step's snapshot, which dropped 100 right after; the controller marked 100
    as 'the client's next snapshot drops it'. A report at a snapshot's step lists the ring
    as that snapshot leaves it."""
    from trimtab.client import attach
    from trimtab.protocol import wire

    run = Run()
    guard = attach(run.model, run.opt, job="listing", endpoint=fake_controller.endpoint,
                   report_every=10, checkpoint_every=20, keep=2, heartbeat_s=0.05)
    held_after = {}
    for _ in range(80):
        x = torch.randn(16, 4)
        loss = (run.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        run.opt.zero_grad()
        loss.backward()
        guard.step(loss)
        held_after[guard.global_step] = set(guard.checkpoints)
    guard.close()
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))
    reports = [r for r in fake_controller.of_type(wire.Report) if r.step in held_after]
    assert len(reports) >= 7
    for r in reports:
        assert set(r.checkpoints) <= held_after[r.step], (r.step, r.checkpoints)


def test_a_restated_checkpoint_resumes_with_the_rollbacks_state_even_with_the_writer_busy(
        tmp_path) -> None:
    """A preemption re-trial: killed one step after a rollback, a run resumed without the
    rollback's cut (2 times in 14): the rewrite of the restored checkpoint's state was
    queued behind the writer's work. It is written at once, on the rollback's thread."""
    run = Run()
    store = CheckpointStore(keep=2, directory=tmp_path)
    state = {"format": 1, "job": "j", "run_id": "A", "resume": 0, "report_seq": 3,
             "applied_seq": 2, "should_stop": False, "stop_reason": None, "rollbacks": 0,
             "live": {"schedules": [], "last": {}}}
    store.take(0, run.model, run.opt, clip=1.0, counters={"calls": 0},
               controls={"lr_scale": 1.0}, run=state)
    store.mark_stable(0)
    assert store.flush(10)
    store.files.hold()  # the writer busy with a large checkpoint: nothing queued runs
    store.restate(0, {**state, "applied_seq": 5, "rollbacks": 1}, {"lr_scale": 0.5})
    loaded = load_stable(tmp_path)  # a process that starts now (this one killed)
    assert loaded.guard_state["controls"] == {"lr_scale": 0.5}
    assert loaded.guard_state["rollbacks"] == 1 and loaded.guard_state["applied_seq"] == 5
    assert loaded.controls == {"lr_scale": 1.0}  # a rollback to it restores these
    store.files.release()
    store.close()
    assert not list(tmp_path.glob("*.resume.json.tmp"))


def test_a_checkpoint_restated_before_its_file_is_written_keeps_the_restated_state(
        tmp_path) -> None:
    """The file of a checkpoint drops a restated state left by an earlier file of its step,
    but not its own: a rollback that restated it before the writer got to it."""
    run = Run()
    store = CheckpointStore(keep=2, directory=tmp_path)
    state = {"format": 1, "job": "j", "run_id": "A", "resume": 0, "report_seq": 3,
             "applied_seq": 2, "should_stop": False, "stop_reason": None, "rollbacks": 0,
             "live": {"schedules": [], "last": {}}}
    store.files.hold()  # nothing written yet
    store.take(0, run.model, run.opt, clip=1.0, counters={"calls": 0},
               controls={"lr_scale": 1.0}, run=state)
    store.mark_stable(0)
    store.restate(0, {**state, "rollbacks": 1}, {"lr_scale": 0.5})
    store.files.release()
    assert store.flush(10)
    assert load_stable(tmp_path).guard_state["controls"] == {"lr_scale": 0.5}
    store.close()


def test_marks_that_come_after_their_checkpoint_left_the_ring_space_the_snapshots_out(
        dead_endpoint, caplog) -> None:
    """A controller trial: at ~1 ms a step, the controller's stable marks came after their
    checkpoints left the ring (13 in a row, 'no checkpoint at that step'), and the only
    stable checkpoint stayed at step 700 of 40,000. A mark for a checkpoint the ring
    dropped doubles the snapshot interval (at most 8x), so that one stays until marked."""
    from trimtab.client import attach
    from trimtab.protocol import wire

    run = Run()
    guard = attach(run.model, run.opt, job="late-marks", endpoint=dead_endpoint,
                   checkpoint_every=10, keep=2, report_every=5)

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randn(16, 4)
            loss = (run.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            run.opt.zero_grad()
            loss.backward()
            guard.step(loss)

    def mark(seq: int, step: int) -> None:
        guard._transport._handle(wire.Command(job="late-marks", seq=seq, mark_stable=step))
        steps(1)

    try:
        steps(50)
        assert guard.checkpoints[-2:] == [40, 50]
        mark(1, 10)  # long dropped (a controller working off a stale backlog): no change
        assert guard._ckpts.every == 10
        with caplog.at_level("WARNING", logger="trimtab.client"):
            mark(2, 20)  # decided when 20 was held; the ring dropped it lately
        assert "snapshots are now taken every 20 steps (checkpoint_every=10)" in caplog.text
        steps(49)  # to step 100: every 20 from here
        assert [s for s in guard.checkpoints if s > 51] == [80, 100]
        mark(3, 80)  # in time now
        assert guard.stable_step == 80
        mark(4, 90)  # no checkpoint was taken there: not a late mark
        assert guard._ckpts.every == 20
        for seq, late in enumerate((60, 60, 60, 60), start=5):  # late again: never past 8x
            mark(seq, late)
        assert guard._ckpts.every == 20  # 60 is older than the stable 80: not late either
        steps(100)
        for seq, late in enumerate((160, 160, 160, 160), start=9):
            mark(seq, late)
        assert guard._ckpts.every == 80
    finally:
        guard.close()
