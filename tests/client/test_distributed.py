"""torch.distributed: real DDP jobs (gloo, CPU, torchrun) attached to a real ``trimtab serve``.

Each job runs ``dist_worker.py`` on every rank; every rank logs, per ``guard.step()``, its
global step, lr and a hash of its parameters' bytes, and the tests compare the ranks' logs
with each other and with the controller's journal. The pure parts (the command tensor,
the shard choice) are tested in-process.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trimtab.client import load_stable, shard_endpoint
from trimtab.client._dist import HEADER_SIZE, decode_command, encode_command, rank_directory
from trimtab.protocol import wire

from ..integration.support import assert_applied_in_order, free_port

WORKER = Path(__file__).with_name("dist_worker.py")
_GLOO = dist.is_available() and dist.is_gloo_available()


def TORCHRUN(test):  # noqa: N802 - used as a mark
    """Launches ranks with torchrun (gloo) and, most of them, a trimtab serve."""
    needs_gloo = pytest.mark.skipif(not _GLOO, reason="torch.distributed with gloo is missing")
    return pytest.mark.integration(needs_gloo(test))


REPORT_EVERY = 5

# Commands of every kind: marks (stable_window_steps), a rollback with an LR cut
# (divergence_guard on the NaN), and plain lr changes (step_decay). No resends: each
# command reaches the job once, so each must be acknowledged exactly once.
CONFIG = """
resend_after_reports = 1000

[[policies]]
name = "divergence_guard"

[[policies]]
name = "step_decay"
config = { step_size = 30, gamma = 0.7 }

[governor.lr]
cooldown_steps = 0

[rollback]
stable_window_steps = 40
"""


@pytest.fixture
def serve(serve_factory):
    return serve_factory(CONFIG)


def torchrun(nproc: int, out: Path, *args: str, check: bool = True):
    out.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    logs = [
        json.loads((out / f"rank-{r}.json").read_text())
        for r in range(nproc)
        if (out / f"rank-{r}.json").exists()
    ]
    return proc, logs


def assert_in_step(logs: list[dict]) -> None:
    """Every rank has the same global step, lr and parameter bytes after every step."""
    first = logs[0]["rows"]
    for log in logs[1:]:
        assert len(log["rows"]) == len(first)
        for a, b in zip(first, log["rows"], strict=True):
            assert a[1:4] == b[1:4], f"rank 0 {a} vs rank {log['rank']} {b}"


def assert_acked_once(journal, job: str) -> list:
    commands = journal.events(job, "command")
    acks = journal.events(job, "ack")
    per_seq = collections.Counter(a.seq for a in acks)
    assert per_seq and set(per_seq.values()) == {1}, per_seq
    # Every command was applied (one superseded by an urgent rollback may not be, nor one
    # sent after the job's last report boundary).
    assert_applied_in_order(commands, sorted(per_seq), job)
    assert len(journal.events(job, "register")) == 1  # one link for the job, not per rank
    return acks


@TORCHRUN
def test_ddp_rollback_restores_every_rank_to_the_same_checkpoint(serve, tmp_path):
    proc, logs = torchrun(
        2,
        tmp_path / "out",
        "--endpoint",
        serve.endpoint,
        "--job",
        "ddp2",
        "--fault",
        "--after",
        "30",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--ema",
        "0.9",
    )
    assert [log["rank"] for log in logs] == [0, 1]
    assert_in_step(logs)
    # The weight average of the wrapped module: the same on every rank after every step.
    averages = [[r[7] for r in log["rows"][1:]] for log in logs]
    assert averages[0] == averages[1] and None not in averages[0]

    journal = serve.journal()
    acks = assert_acked_once(journal, "ddp2")
    restored = journal.events("ddp2", "restored")
    assert len(restored) == 1, [e.data for e in journal.events("ddp2", "rollback")]
    target = restored[0].data["restored_step"]
    assert [log["restored"] for log in logs] == [[target], [target]]
    assert any(a.data["restored_step"] == target for a in acks)
    # Rank 1 alone saw the NaN loss; the report (built on rank 0) counts it: the reduction.
    fault = logs[0]["fault_step"]
    rows0 = logs[0]["rows"]
    fault_row = rows0[1 + logs[0]["fault_iter"]]
    assert fault_row[1] == fault  # the step was skipped on every rank
    assert fault_row[4] is not None and math.isfinite(fault_row[4])
    nonfinite = [e for e in journal.events("ddp2", "report") if e.data["nonfinite_losses"]]
    assert nonfinite and nonfinite[0].step <= fault + REPORT_EVERY
    # After the rollback both ranks hold the checkpoint's parameters, bit for bit: the
    # hash logged when the run first stood at that step.
    for log in logs:
        rows = log["rows"]
        back = next(i for i, r in enumerate(rows) if r[6] == 1)
        assert rows[back][1] == target
        first_time = next(r for r in rows if r[1] == target)
        assert rows[back][3] == first_time[3]
        assert rows[back][7] == first_time[7]  # and the weight average with them
    # On disk: one directory per rank; each rank's newest stable file holds that same state.
    for log in logs:
        ckpt = load_stable(tmp_path / "ckpt" / f"rank-{log['rank']}")
        assert ckpt is not None and ckpt.step == target
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in ckpt.model.values()))
        assert digest.hexdigest()[:16] == next(r for r in log["rows"] if r[1] == target)[3]


@TORCHRUN
def test_replicas_parted_by_one_ranks_lr_are_rolled_back_to_a_checkpoint_they_agreed_at(
        serve, tmp_path):
    """A DDP trial: the loop wrote its own lr on rank 1 only; the replicas parted for good
    and the run went on, healthy by every signal, with two different models (here: x3 for
    three steps, after which nothing else is judged unhealthy). The ranks' parameter
    checksums are compared at each report; the parted report is unhealthy (``replicas``) and
    every rank goes back to a checkpoint at which the replicas agreed."""
    proc, logs = torchrun(2, tmp_path / "out", "--endpoint", serve.endpoint, "--job", "ddp-rl",
                          "--fault", "--rank-lr", "--after", "30")
    rows = [log["rows"] for log in logs]
    assert len(rows[0]) == len(rows[1])
    hashes = [[r[3] for r in rs] for rs in rows]
    fault_iter = logs[0]["fault_iter"]
    assert fault_iter is not None
    parted = [i for i, (a, b) in enumerate(zip(*hashes, strict=True)) if a != b]
    # The replicas agreed up to the fault, parted with rank 1's own lr, and agree again from
    # the restore on, to the end.
    assert parted and min(parted) == 1 + fault_iter
    back = next((i for i, r in enumerate(rows[0]) if r[6] == 1), None)
    assert back is not None, "the parted replicas were never rolled back"
    assert max(parted) < back and hashes[0][-1] == hashes[1][-1]

    journal = serve.journal()
    rollbacks = journal.events("ddp-rl", "rollback")
    assert [e.data["reason"] for e in rollbacks] == ["replicas"], [e.data for e in rollbacks]
    target = journal.events("ddp-rl", "restored")[0].data["restored_step"]
    assert rows[0][back][1] == target
    first_time = next(r for r in rows[0] if r[1] == target)
    assert rows[0][back][3] == rows[1][back][3] == first_time[3]
    # No lr cut: the parting was not the lr's; the first step after the restore runs at the
    # lr the run had when it first stood at that step (step_decay's commands move it later).
    assert rows[0][back + 1][2] == rows[1][back + 1][2] == first_time[2]
    spreads = [(e.step, e.data["replica_spread"]) for e in journal.events("ddp-rl", "report")]
    before = [s for step, s in spreads if step <= logs[0]["fault_step"]]
    assert before and set(before) == {0.0}  # measured, and identical, before the fault
    identical = [e.data["replicas_identical"] for e in journal.events("ddp-rl", "report")
                 if e.step <= logs[0]["fault_step"]]
    assert set(identical) == {True}
    assert any(s is not None and s > 1e-6 for _, s in spreads)


@TORCHRUN
def test_a_ddp_job_killed_resumes_from_trimtabs_files_as_the_same_run(serve, tmp_path):
    """Killed with no close (a preemption), the job comes back on 2 ranks from trimtab's own
    files: every rank loads the same stable step (ranks_agree) with the guard's state, and
    the controller follows the same run, resumed at that step, the replicas identical."""
    ckpt = str(tmp_path / "ckpt")
    _, first = torchrun(2, tmp_path / "a", "--endpoint", serve.endpoint, "--job", "ddp-res",
                        "--iters", "240", "--checkpoint-dir", ckpt, "--die")
    _, second = torchrun(2, tmp_path / "b", "--endpoint", serve.endpoint, "--job", "ddp-res",
                         "--iters", "40", "--checkpoint-dir", ckpt, "--resume-files")
    at = second[0]["resumed_at"]
    assert at is not None and 0 < at < 240 and second[1]["resumed_at"] == at
    # Each rank's guard goes on with its own identity (rank 0's is the job's on the link).
    assert [log["run_id"] for log in second] == [log["run_id"] for log in first]
    assert_in_step(second)
    # Both ranks start at that step with the weights the run had there, bit for bit.
    then = next(r for r in first[0]["rows"] if r[1] == at)
    assert [log["rows"][0][1] for log in second] == [at, at]
    assert [log["rows"][0][3] for log in second] == [then[3], then[3]]
    regs = serve.journal().events("ddp-res", "register")
    resumes = [e for e in regs if e.data["resumed"] == "resume"]
    assert len(resumes) == 1 and resumes[0].data["resume_step"] == at


@TORCHRUN
def test_ddp_reports_average_the_loss_and_commands_apply_at_one_step_on_4_ranks(serve, tmp_path):
    proc, logs = torchrun(
        4, tmp_path / "out", "--endpoint", serve.endpoint, "--job", "ddp4", "--until-lr-moves"
    )
    assert len(logs) == 4
    assert_in_step(logs)
    journal = serve.journal()
    acks = assert_acked_once(journal, "ddp4")
    # Commands (step_decay's live schedule, stable marks) were applied at report
    # boundaries, where they were broadcast, and moved the lr on every rank alike.
    assert acks and all(a.step % REPORT_EVERY == 0 for a in acks), [a.step for a in acks]
    assert len({r[2] for r in logs[0]["rows"]}) > 1
    # Each report's loss is the mean over ranks and steps of every rank's own losses.
    reports = journal.events("ddp4", "report")
    assert len(reports) == (len(logs[0]["rows"]) - 1) // REPORT_EVERY
    for k, rep in enumerate(reports):
        window = [log["rows"][1 + k * REPORT_EVERY : 1 + (k + 1) * REPORT_EVERY] for log in logs]
        losses = [r[4] for rows in window for r in rows]
        assert rep.data["loss_mean"] == pytest.approx(math.fsum(losses) / len(losses), rel=1e-5)
        assert rep.data["loss_mean"] != pytest.approx(
            math.fsum(r[4] for r in window[0]) / REPORT_EVERY, rel=1e-5
        )


@TORCHRUN
def test_ranks_attached_with_different_report_every_are_refused(tmp_path):
    proc, logs = torchrun(
        2,
        tmp_path / "out",
        "--endpoint",
        f"tcp://127.0.0.1:{free_port()}",
        "--job",
        "mismatch",
        "--uneven",
        check=False,
    )
    assert proc.returncode != 0 and not logs
    for rank in (0, 1):  # refused on every rank, so none waits in a collective
        assert (
            f"rank {rank}: attach refused: report_every differs across ranks (from 5 to 6; "
            f"this rank {5 + rank}); allowed: the same value on every rank"
        ) in proc.stderr


# -- in-process: the command tensor, checkpoint directories, sharding ---------------------


@pytest.mark.parametrize(
    "command",
    [
        None,
        wire.Command(
            job="j",
            seq=7,
            scale=wire.ScaleTargets(lr=1e-3),
            knobs=wire.Knobs(momentum=0.0, clip=2.5),
            lr_max=0.5,
            reasons=["plateau: slope not below 0"],
        ),
        wire.Command(
            job="j",
            seq=2**60,
            mark_stable=100,
            rollback_to=0,
            scale=wire.ScaleTargets(weight_decay=0.01),
            stop_advice="é" * 1000,
        ),
    ],
)
def test_command_travels_whole_in_a_fixed_header_and_its_wire_bytes(command):
    header, body = encode_command(command, step=123)
    assert header.shape == (HEADER_SIZE,) and header.dtype == torch.float64
    assert header.tolist() == [body.numel(), 123.0, 0.0, -1.0] and body.dtype == torch.uint8
    assert encode_command(None, step=5, alone=True)[0].tolist() == [0.0, 5.0, 1.0, -1.0]
    assert encode_command(None, step=5, seen=120)[0].tolist() == [0.0, 5.0, 0.0, 120.0]
    assert decode_command(bytes(body.tolist())) == command


def test_command_encoding_refuses_what_is_not_a_command():
    with pytest.raises(ValueError, match=r"step=9007199254740993 .*allowed: 0 to 2\*\*53"):
        encode_command(None, 2**53 + 1)
    with pytest.raises(wire.WireError, match="unexpected: expected a command, got a heartbeat"):
        decode_command(wire.encode(wire.Heartbeat(job="j")))
    with pytest.raises(wire.WireError, match="malformed"):
        decode_command(b"\x00\x01")


def test_rank_directory():
    assert rank_directory(None, 1) is None
    assert rank_directory("ckpt", 1) == Path("ckpt/rank-1")


def test_shard_endpoint_is_stable_even_and_moves_few_jobs():
    eps = [f"tcp://ctl-{i}:5555" for i in range(4)]
    jobs = [f"run-{i}" for i in range(2000)]
    placed = {j: shard_endpoint(j, eps) for j in jobs}
    assert placed == {j: shard_endpoint(j, list(reversed(eps))) for j in jobs}
    counts = collections.Counter(placed.values())
    assert set(counts) == set(eps) and min(counts.values()) > 0.8 * 500
    # A fifth controller takes about a fifth of the jobs, and only jobs moving to it move.
    more = eps + ["tcp://ctl-4:5555"]
    moved = [j for j in jobs if shard_endpoint(j, more) != placed[j]]
    assert all(shard_endpoint(j, more) == more[-1] for j in moved)
    assert 0.15 * len(jobs) < len(moved) < 0.25 * len(jobs)

    # The documented rule, so that any tool can compute it: the highest sha256 score wins.
    def score(endpoint, job):
        return int.from_bytes(hashlib.sha256(f"{endpoint}\n{job}".encode()).digest()[:8], "big")

    assert all(placed[j] == max(eps, key=lambda e, j=j: score(e, j)) for j in jobs[:50])
    # Removing one moves only that one's jobs.
    fewer = eps[1:]
    assert all(shard_endpoint(j, fewer) == placed[j] for j in jobs if placed[j] != eps[0])


@pytest.mark.parametrize(
    "job, endpoints, match",
    [
        ("bad job", ["tcp://a:1"], r"job='bad job' is invalid; allowed: 1-128 characters"),
        ("j", [], r"endpoints=\[\] is invalid; allowed: a non-empty list"),
        ("j", "tcp://a:1", r"endpoints='tcp://a:1' is invalid; allowed: a non-empty list"),
        ("j", ["tcp://a:1", "tcp://a:1"], r"\(a duplicate\); allowed: distinct"),
        ("j", ["tcp://a:1", ""], r"\(''\); allowed: distinct, non-empty"),
    ],
)
def test_shard_endpoint_refuses_bad_input(job, endpoints, match):
    with pytest.raises(ValueError, match=match):
        shard_endpoint(job, endpoints)


def _window_rank(rank: int, init: str, ranges: list, params: list, out: str) -> None:
    import torch.distributed as _dist

    from trimtab.client._dist import DistLink, param_checksum

    _dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        link = DistLink(rank, 2, torch.device("cpu"))
        got = []
        for r, p in zip(ranges, params, strict=True):
            mine = p[rank]
            checksum = None if mine is None else param_checksum(
                [torch.tensor(v, dtype=torch.float32) for v in mine])
            lr, spread, identical = link.reduce_window(tuple(r[rank]), checksum)
            got.append([*lr, spread, identical])
        Path(out, f"rank-{rank}.json").write_text(json.dumps(got))
    finally:
        _dist.destroy_process_group()


def test_the_replicas_compared_leave_out_what_ddp_was_told_to_ignore():
    from torch.nn.parallel import DistributedDataParallel

    from trimtab.client._dist import replicated_params

    inner = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    assert replicated_params(inner) == list(inner.parameters())
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(inner, ["1.weight"])
    outer = torch.nn.ModuleDict({"body": inner, "head": torch.nn.Linear(1, 1)})
    got = replicated_params(outer)
    assert [id(p) for p in got] == [id(p) for p in outer.parameters()
                                    if p is not inner[1].weight]


def test_a_windows_lr_range_is_every_ranks_and_the_replicas_are_compared(tmp_path):
    """A DDP trial: the loop set lr x100 on rank 1 only for three steps; the report's lr
    window said 0.05..0.05, rank 0's, and nothing in the journal showed the 5.0 rank 1 ran
    at, nor that the two replicas had parted for good. The window's range and the ranks'
    parameter checksums are reduced over ranks (one small MAX all-reduce)."""
    import torch.multiprocessing as mp

    ranges = [
        [(0.05, 0.05), (0.05, 5.0)],  # one rank's own lr x100
        [(None, None), (0.1, 0.2)],  # a rank with no step in the window
        [(None, None), (None, None)],
        [(0.001, 0.3), (0.01, 0.02)],
        [(0.1, 0.1), (0.1, 0.1)],
        [(0.1, 0.1), (0.1, 0.1)],
        [(0.1, 0.1), (0.1, 0.1)],
    ]
    same = [[3.0, 4.0], [1.0]]  # norms 5 and 1: checksum 6
    params = [
        [same, same],  # identical replicas
        [same, [[3.0, 4.0], [2.0]]],  # rank 1's parted: checksums 6 and 7
        [None, None],  # nothing compared
        [same, [[3.0, float("nan")], [1.0]]],  # non-finite: the non-finite checks' business
        [[[3.0, 4.0], [1.0 + 1e-6]], same],  # a single-precision ulp-scale difference
        [same, None],  # one rank took none (it could not): nothing compared
        [same, [[-3.0, 4.0], [1.0]]],  # a sign flipped: the norms cannot see it
    ]
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_window_rank, args=(init, ranges, params, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert [tuple(g[:2]) for g in got] == [(0.05, 5.0), (0.1, 0.2), (None, None),
                                               (0.001, 0.3), (0.1, 0.1), (0.1, 0.1),
                                               (0.1, 0.1)]
        spreads = [g[2] for g in got]
        assert spreads[:4] == [0.0, pytest.approx(1 / 7), None, None]
        assert 0 < spreads[4] < 1e-6  # a norm barely moved
        assert spreads[5] is None and spreads[6] == 0.0
        # The bytes: identical only for identical replicas; the ulp-scale nudge and the
        # sign flip, which the norms hardly or never see, differ.
        assert [g[3] for g in got] == [True, False, None, None, False, None, False]


def _ranks_files(directory: Path, marks: list[int], corrupt: int | None = None) -> None:
    """One rank's checkpoint files: snapshots at steps 10, 20 and 30 (a ring of 2 on disk,
    plus the newest stable one), ``marks`` marked stable in turn, the file at ``corrupt``
    damaged afterwards."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from trimtab.client import CheckpointStore

    store = CheckpointStore(keep=2, directory=directory)
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)  # the step, readable from the weights
        store.take(step, model, opt, block=True)
        store.poll()
        if step in marks:
            assert store.mark_stable(step)
    store.close()
    if corrupt is not None:
        path = directory / f"ckpt-{corrupt:012d}.pt"
        path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)


def _agree_rank(rank: int, init: str, root: str, out: str) -> None:
    import torch.distributed as _dist

    _dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = {}
        for case in sorted(os.listdir(root)):
            directory = Path(root, case, f"rank-{rank}")
            plain = load_stable(directory)
            agreed = load_stable(directory, ranks_agree=True)
            got[case] = [None if c is None else c.step for c in (plain, agreed)]
            if agreed is not None:
                assert agreed.model["weight"].flatten().tolist() == [float(agreed.step)] * 3
        Path(out, f"rank-{rank}.json").write_text(json.dumps(got))
    finally:
        _dist.destroy_process_group()


def test_ranks_resuming_from_their_own_files_load_the_same_step(tmp_path):
    """A DDP job killed while a stable mark was being written: rank 0's writer had marked
    30 (and let 10 go), rank 1's had not. Each rank loading its own newest stable file
    started its replica at another step (30 and 10); with ``ranks_agree`` both load the
    newest step they both hold that one marked stable."""
    import torch.multiprocessing as mp

    cases = {
        "a-killed-mid-mark": ([10, 30], [10]),
        "b-in-step": ([10, 30], [10, 30]),
        "c-corrupt-on-one": ([10, 30], [10, 30]),
        "d-nothing-stable": ([], []),
    }
    root = tmp_path / "ckpt"
    for case, marks in cases.items():
        for rank, m in enumerate(marks):
            _ranks_files(root / case / f"rank-{rank}", m,
                         corrupt=30 if case.startswith("c") and rank == 1 else None)
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_agree_rank, args=(init, str(root), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # [plain, agreed] per rank
    assert [g["a-killed-mid-mark"] for g in got] == [[30, 30], [10, 30]]
    assert [g["b-in-step"] for g in got] == [[30, 30], [30, 30]]
    # 30 fails its checksum on rank 1 and 10 is gone from rank 0: no step loads on both,
    # and neither rank starts from a step the other cannot.
    assert [g["c-corrupt-on-one"] for g in got] == [[30, None], [None, None]]
    assert [g["d-nothing-stable"] for g in got] == [[None, None], [None, None]]
