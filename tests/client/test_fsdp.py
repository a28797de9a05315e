"""FSDP2 (``fully_shard``): a real sharded job (gloo, CPU, torchrun, 2 ranks) attached to a
real ``trimtab serve``: global gradient norms, sharded snapshots, rollback and DCP files.

``fsdp_worker.py`` runs on every rank and logs, per ``guard.step()``, its global step, a
hash of its own shards, a hash of the gathered parameters and the gathered gradient's
norm; the test compares the ranks' logs with each other and with the controller's journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trimtab.client import attach
from trimtab.client._sharded import is_sharded, step_name

from ..integration.support import free_port, wait_for
from .test_distributed import CONFIG, REPORT_EVERY, TORCHRUN

WORKER = Path(__file__).with_name("fsdp_worker.py")
CLIP = 2.0

# Columns of a worker's row.
IT, STEP, LR, LOCAL, FULL, LOSS, STABLE, ROLLBACKS, NORM, DTENSOR_NORM, CLIPPED, ALIGN = range(12)


@pytest.fixture
def serve(serve_factory):
    return serve_factory(CONFIG)


def torchrun(out: Path, *args: str) -> list[dict]:
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@TORCHRUN
def test_a_gradient_missing_on_one_rank_leaves_the_alignment_unmeasured_not_hung(serve,
                                                                                  tmp_path):
    """The alignment's all-reduce is reached by every rank whatever its shards hold: a
    rank whose gradient is missing where the update was kept (rank 1 drops one at
    iteration 10, the first step of a report window) adds to the 'unmeasured' count, and
    that window reports no alignment on any rank; the windows around it do. Had that rank
    returned early, the other would wait in the all-reduce forever."""
    logs = torchrun(tmp_path / "out", "--endpoint", serve.endpoint, "--job", "fsdp2-drop",
                    "--report-every", str(REPORT_EVERY), "--cap", "25", "--drop-grad-at", "10")
    assert [len(log["rows"]) for log in logs] == [26, 26]
    journal = serve.journal()
    wait_for(lambda: journal.events("fsdp2-drop", "bye"))
    aligned = {r.step: r.data.get("update_alignment")
               for r in journal.events("fsdp2-drop", "report")}
    assert set(aligned) >= {5, 10, 15, 20, 25}, aligned
    assert aligned[5] is None  # the first window: no update before it
    assert aligned[15] is None, aligned
    assert all(aligned[s] is not None for s in (10, 20, 25)), aligned


@TORCHRUN
def test_fsdp_rollback_restores_every_rank_and_dcp_files_load_back(serve, tmp_path):
    ckpt = tmp_path / "ckpt"
    logs = torchrun(
        tmp_path / "out",
        "--endpoint",
        serve.endpoint,
        "--job",
        "fsdp2",
        "--clip",
        str(CLIP),
        "--report-every",
        str(REPORT_EVERY),
        "--checkpoint-dir",
        str(ckpt),
    )
    assert [log["rank"] for log in logs] == [0, 1]
    rows0, rows1 = logs[0]["rows"], logs[1]["rows"]
    assert len(rows0) == len(rows1)
    # Every rank at the same step with the same lr and the same gathered parameters after
    # every step; their own shards differ (each holds a different part).
    for a, b in zip(rows0, rows1, strict=True):
        assert (a[STEP], a[LR], a[FULL]) == (b[STEP], b[LR], b[FULL]), (a, b)
    assert rows0[5][LOCAL] != rows1[5][LOCAL]

    # The rollback: one, to the same stable step on every rank.
    journal = serve.journal()
    restored = journal.events("fsdp2", "restored")
    assert len(restored) == 1, [e.data for e in journal.events("fsdp2", "rollback")]
    target = restored[0].data["restored_step"]
    assert target > 0  # a snapshot with momentum buffers in the optimizer state
    assert [[r[0] for r in log["restored"]] for log in logs] == [[target], [target]]
    fault = logs[0]["fault_step"]
    assert target <= fault and rows0[1 + logs[0]["fault_iter"]][STEP] == fault  # skipped
    for log in logs:
        rows = log["rows"]
        first_time = next(r for r in rows if r[STEP] == target)
        # Right after the restore this rank's shards (parameters and momentum) are, bit for
        # bit, those it held when the snapshot was taken.
        assert log["restored"][0][1] == first_time[LOCAL]
        back = next(i for i, r in enumerate(rows) if i and r[ROLLBACKS] == 1)
        assert rows[back][STEP] == target
        assert (rows[back][LOCAL], rows[back][FULL]) == (first_time[LOCAL], first_time[FULL])
        # Training goes on from there: more steps, finite losses.
        tail = rows[back + 1 :]
        assert tail and tail[-1][STEP] == target + len(tail)
        assert all(r[LOSS] is not None for r in tail)

    # The reported gradient norm is the whole (gathered) gradient's, not a shard's: each
    # report's mean equals the mean of the gathered norms over its window's steps.
    reports = journal.events("fsdp2", "report")
    windows, window, rollbacks = [], [], 0
    for r in rows0[1:]:
        if r[ROLLBACKS] != rollbacks:  # the rollback's step probes nothing, drops the window
            rollbacks, window = r[ROLLBACKS], []
            continue
        window.append(r[NORM])
        if len(window) == REPORT_EVERY:
            windows.append(window)
            window = []
    assert len(reports) == len(windows)
    checked = 0
    for rep, window in zip(reports, windows, strict=True):
        if None in window:  # the NaN steps: counted, not averaged
            assert rep.data["nonfinite_grads"] == window.count(None)
            continue
        assert rep.data["grad_norm_mean"] == pytest.approx(sum(window) / len(window), rel=1e-4)
        assert rep.data["grad_norm_max"] == pytest.approx(max(window), rel=1e-4)
        checked += 1
    # The update alignment is the whole gradient's and update's too: each report before
    # the fault gives the cosine of its window's first gradient with the opposite of the
    # update the step before it made, as the gathered tensors give it (one all-reduce of
    # the ranks' sums; before, a sharded model reported none).
    firsts = [rows0[1 + i * REPORT_EVERY] for i in range(len(reports))]
    aligned = [(rep.data.get("update_alignment"), first[ALIGN])
               for rep, first in zip(reports, firsts, strict=True)
               if first[ROLLBACKS] == 0 and first[IT] < logs[0]["fault_iter"]]
    assert len(aligned) >= 3 and aligned[0] == (None, None), aligned
    for got, want in aligned[1:]:
        assert got == pytest.approx(want, abs=1e-4), aligned
    bad = [w for w in windows if None in w]  # the fault: a whole window among them
    assert any(all(v is None for v in w) for w in bad)
    assert checked == len(windows) - len(bad)
    # torch's own DTensor norm agrees; clipping used the global norm: the whole gradient
    # after the guard's clip has norm min(norm, clip) on every rank.
    finite = [r for r in rows0[1:] if r[NORM] is not None and r[CLIPPED] is not None]
    norms = sorted(r[NORM] for r in finite)
    assert norms[0] < CLIP < norms[-1], (norms[:3], norms[-3:])
    for r in finite:
        assert r[DTENSOR_NORM] == pytest.approx(r[NORM], rel=1e-5)
        assert r[CLIPPED] == pytest.approx(min(r[NORM], CLIP), rel=1e-4)

    # On disk: one complete DCP directory per checkpoint the ring holds, shared by the ranks.
    assert logs[0]["checkpoints"] == logs[1]["checkpoints"]
    dirs = [d for d in logs[0]["dirs"] if d.startswith("step-")]
    assert dirs == [step_name(s) for s in logs[0]["checkpoints"]]
    for d in dirs:
        assert (ckpt / d / ".metadata").is_file()
        assert sorted(p.name for p in (ckpt / d).glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    # A freshly built FSDP model and optimizer (other initial weights) load the newest
    # stable one back to that step's state: every rank's shards and the gathered whole.
    for log in logs:
        rows = log["rows"]
        step = log["loaded_step"]
        assert step == target  # no later checkpoint was marked stable in this short run
        at = [r for r in rows if r[STEP] == step]
        assert log["fresh_before"] != at[0][LOCAL]
        assert log["loaded"] == at[0][LOCAL] and log["loaded_full"] == at[0][FULL]


def test_a_model_without_dtensor_parameters_is_not_sharded():
    assert not is_sharded(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)))


@pytest.fixture
def one_rank():
    """A process group of one rank (gloo), for building DTensor models in this process."""
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_models_the_guard_cannot_reduce_are_refused_naming_the_parameter(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    partly = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    fully_shard(partly[0], mesh=mesh)
    opt = torch.optim.SGD(partly.parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"parameter '1.weight' is a plain tensor in a model with DTensor parameters; "
        r"allowed: every parameter sharded",
    ):
        attach(partly, opt, job="partly", endpoint=f"tcp://127.0.0.1:{free_port()}")
    mesh2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    hsdp = torch.nn.Linear(4, 1)
    fully_shard(hsdp, mesh=mesh2)
    with pytest.raises(
        ValueError,
        match=r"parameter 'weight' has placements=\(Replicate\(\), Shard\(dim=0\)\) on a 2-D "
        r"mesh; allowed: one Shard placement on a 1-D mesh",
    ):
        is_sharded(hsdp)
    whole = torch.nn.Linear(4, 1)
    fully_shard(whole, mesh=mesh)
    assert is_sharded(whole)


def test_extra_state_is_refused_with_a_sharded_model(one_rank):
    """A sharded model's snapshots are DCP's: the loop's own objects (extra_state) are refused
    as trimtab's weight average is, at attach, naming the option."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Linear(4, 1)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    with pytest.raises(ValueError, match=r"extra_state=\{'sched': <torch.optim.lr_scheduler."
                                         r"StepLR object at .*>\} is invalid; allowed: None "
                                         r"with an FSDP2-sharded model"):
        attach(model, opt, job="sharded-extra", endpoint=f"tcp://127.0.0.1:{free_port()}",
               extra_state={"sched": sched})


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file()}


def test_the_sharded_snapshot_at_attach_leaves_the_directory_for_the_loop_to_load(
        one_rank, tmp_path):
    """An FSDP2 trial: the snapshot taken at attach was saved at once to step-0, over the
    stable directory of the run the loop was about to resume with load_sharded (a crash
    mid-load, and later the new process's random weights loaded as the run's). As on the
    unsharded path, it is saved from the first step on, of the run as loaded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trimtab.client._sharded import ShardedStore, load_sharded

    mesh = init_device_mesh("cpu", (1,))

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        fully_shard(model, mesh=mesh)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def weights(model) -> list[torch.Tensor]:
        return [p.full_tensor().clone() for p in model.parameters()]

    old, old_opt = build(1)
    store = ShardedStore(keep=2, directory=tmp_path)
    store.take(0, old, old_opt)
    store.mark_stable(0)
    assert store.flush(30)
    before = _dir_bytes(tmp_path / step_name(0))

    new, new_opt = build(2)
    guard = attach(new, new_opt, job="sharded-resume", checkpoint_every=10,
                   endpoint=f"tcp://127.0.0.1:{free_port()}", checkpoint_dir=tmp_path)
    try:
        assert guard._store.flush(30)
        assert _dir_bytes(tmp_path / step_name(0)) == before  # not saved over
        assert load_sharded(tmp_path, new, new_opt) == 0
        assert all(torch.equal(a, b) for a, b in zip(weights(new), weights(old), strict=True))
        loss = new(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss)  # the first step: the snapshot of the run as loaded is saved now
        # The earlier process's stable list stays until this one marks a step of its own.
        assert json.loads((tmp_path / "stable.json").read_text())["stable"] == [0]
        assert guard._store.mark_stable(0)  # as the controller marks it at its first report
        assert guard._store.flush(30)
    finally:
        guard.close()
    assert _dir_bytes(tmp_path / step_name(0)) != before
    check, check_opt = build(3)
    assert load_sharded(tmp_path, check, check_opt) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(check), weights(old), strict=True))


def test_a_sharded_directory_that_fails_to_load_falls_back_to_the_older_stable_one(
        one_rank, tmp_path, caplog):
    """An FSDP2 trial: a truncated shard file made DCP raise CheckpointException, a
    BaseException, which went past load_sharded's fallback to the training loop. It is
    skipped with a WARNING and the next older stable directory loads."""
    import logging

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trimtab.client._sharded import ShardedStore, load_sharded

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = ShardedStore(keep=3, directory=tmp_path)
    store.take(0, model, opt)
    at_0 = model.weight.full_tensor().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    store.take(10, model, opt)
    for step in (0, 10):
        store.mark_stable(step)
    assert store.flush(30)
    shard = next((tmp_path / step_name(10)).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        assert load_sharded(tmp_path, model, opt) == 0
    assert torch.equal(model.weight.full_tensor(), at_0)
    assert f"{step_name(10)} skipped" in caplog.text


def test_a_sharded_run_resumed_from_its_files_is_the_same_run_at_its_step(one_rank, tmp_path):
    """An FSDP2 trial: resumed with load_sharded, the job was a new run, its steps counted
    from 0 again; stable.json took the new numbering, and a second restart loaded the right
    weights as step 0. Each step directory now holds the guard's state beside the shards
    (trimtab.pt): the run resumes as itself at the step, with its scheduler, keeps the
    stable directory it resumed from as it is, and deletes its directories after it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trimtab.client._sharded import load_sharded, sharded_guard_state

    mesh = init_device_mesh("cpu", (1,))

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        guard = attach(model, opt, job="sharded-same-run", checkpoint_every=10,
                       endpoint=f"tcp://127.0.0.1:{free_port()}", checkpoint_dir=tmp_path,
                       scheduler=sched)
        return model, opt, sched, guard

    def train(model, opt, sched, guard, until: int) -> None:
        g = torch.Generator().manual_seed(7)
        while guard.global_step < until:
            x = torch.randn(8, 4, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            sched.step()

    model, opt, sched, guard = build(1)
    train(model, opt, sched, guard, 25)
    assert guard._store.mark_stable(20)  # as the controller would
    at_20 = guard._store._held[20]
    train(model, opt, sched, guard, 35)  # and on, past it: a directory at 30
    assert guard._store.flush(30) and (tmp_path / step_name(30)).is_dir()
    run_id = guard.run_id
    guard.close()  # its files as a kill leaves them once written (close marks nothing)
    assert (tmp_path / step_name(20) / "trimtab.pt").is_file()
    before = _dir_bytes(tmp_path / step_name(20))

    for restart in range(2):  # killed again before its first report, then resumed again
        model, opt, sched, guard = build(2 + restart)
        step = load_sharded(tmp_path, model, opt, sched)
        assert step == 20
        guard.load_state_dict(sharded_guard_state(tmp_path, step))
        assert guard.run_id == run_id and guard.global_step == 20
        assert sched.last_epoch == 20  # the loop's scheduler.step() after step 20, made
        assert all(torch.equal(p.full_tensor(), at_20.model[k]) for k, p in
                   zip(at_20.model, model.parameters(), strict=True))
        train(model, opt, sched, guard, 23)
        guard.close()
        assert _dir_bytes(tmp_path / step_name(20)) == before  # kept, not saved over
        assert not (tmp_path / step_name(30)).exists()  # the first process's past 20: gone
        assert json.loads((tmp_path / "stable.json").read_text())["stable"] == [20]


def _one_sharded_store(tmp_path):
    """A 1-rank FSDP2 Linear, its SGD, a guard's run state and a ShardedStore on
    ``tmp_path``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trimtab.client._sharded import ShardedStore

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"format": 1, "job": "j", "run_id": "A", "resume": 0, "report_seq": 3,
             "applied_seq": 2, "should_stop": False, "stop_reason": None, "rollbacks": 0,
             "live": {"schedules": [], "last": {}}}
    return model, opt, state, ShardedStore(keep=2, directory=tmp_path)


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_sharded_checkpoint_restated_after_a_rollback_resumes_with_its_state(
        one_rank, tmp_path, in_flight):
    """After a rollback to a sharded step, its trimtab.pt says what the run goes on with
    (the rollback counted, the cut in force), whether its directory was saved or still
    being saved when the rollback came; a kill then does not undo the rollback."""
    from trimtab.client._sharded import sharded_guard_state

    model, opt, state, store = _one_sharded_store(tmp_path)
    store.take(0, model, opt, counters={"calls": 0}, controls={"lr_scale": 1.0}, run=state)
    store.mark_stable(0)
    if not in_flight:
        assert store.flush(30)
    store.restate(0, {**state, "applied_seq": 5, "rollbacks": 1}, {"lr_scale": 0.5})
    assert store.flush(30)
    restated = sharded_guard_state(tmp_path, 0)
    assert restated["rollbacks"] == 1 and restated["applied_seq"] == 5
    assert restated["controls"] == {"lr_scale": 0.5}
    store.close()


def test_rank_0s_file_work_never_holds_the_snapshot_step(one_rank, tmp_path):
    """A sharded step's trimtab.pt (torch.save, fsync, rename) was written on the training
    thread at every snapshot: 8.8 ms median on this VM's disk (bench.gpu), more on a
    network filesystem. Rank 0's file work (trimtab.pt, stable.json, deletions) is done on
    an I/O thread of its own, in order: with that thread stuck, a snapshot and a stable
    mark return, and the files land, in order, once it goes on."""
    import threading

    from trimtab.client._sharded import sharded_guard_state

    model, opt, state, store = _one_sharded_store(tmp_path)
    gate = threading.Event()
    store.dcp._rank0(gate.wait)  # the I/O thread stuck (a slow filesystem)
    try:
        store.take(0, model, opt, counters={"calls": 0}, controls={"lr_scale": 1.0},
                   run=state)
        assert store.mark_stable(0)
        assert not (tmp_path / step_name(0) / "trimtab.pt").exists()
        assert not (tmp_path / "stable.json").exists()
    finally:
        gate.set()
    assert store.flush(30)
    assert sharded_guard_state(tmp_path, 0)["run_id"] == "A"
    assert json.loads((tmp_path / "stable.json").read_text())["stable"] == [0]
    store.close()
