"""Crash recovery, for real: the journal survives a kill in the middle of its writes and
refuses a damaged file; a ``trimtab serve`` killed with SIGKILL while a command is pending,
three training runs attached, resumes every job's state from the journal when restarted,
and no command is lost, reused or applied twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from bench.scenario_policies import python_path
from trimtab.client import attach
from trimtab.controller.journal import Journal, JournalError

from .support import Regression, assert_applied_in_order, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


# -- the journal file ------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from trimtab.controller.journal import Journal

    j = Journal(sys.argv[1])
    for n in range(10**9):
        with j.batch():  # one transaction: five events and the job's state
            for k in range(5):
                j.append("w", "report", step=n, seq=k, data={"pad": "x" * 300})
            j.save_state("w", {"batch": n})
        print(n, flush=True)  # printed only once committed
""")


def test_a_kill_in_the_middle_of_writes_loses_no_committed_event(tmp_path):
    path = tmp_path / "journal.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    committed = -1
    try:
        while committed < 400:  # a file of many pages, well past SQLite's first checkpoint
            committed = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)  # lands in some write, commit or checkpoint
        proc.wait(10)
    assert (tmp_path / "journal.db-wal").exists(), "killed with its WAL not checkpointed"

    j = Journal(str(path))  # passes its integrity check
    per_batch: dict[int, int] = {}
    for e in j.events("w"):
        per_batch[e.step] = per_batch.get(e.step, 0) + 1
    assert set(range(committed + 1)) <= set(per_batch), "a committed batch is missing"
    assert set(per_batch.values()) == {5}, "a batch is there in part"
    assert j.load_state("w") == {"batch": max(per_batch)}, "state and events commit together"


def test_a_damaged_journal_is_refused_by_name_with_what_to_do(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(str(path))
    with j.batch():
        for n in range(3000):
            j.append("d", "report", step=n, data={"pad": "y" * 100})
    j.close()  # the last connection: the WAL is checkpointed into the file
    raw = bytearray(path.read_bytes())
    page = 4096
    assert len(raw) > 20 * page
    raw[5 * page : len(raw) - 5 * page] = b"\x5a" * (len(raw) - 10 * page)  # pages of garbage
    path.write_bytes(bytes(raw))

    with pytest.raises(JournalError) as err:
        Journal(str(path))
    text = str(err.value)
    assert str(path) in text and "move it aside" in text and ".recover" in text, text

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trimtab.controller",
            "serve",
            "--bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--metrics-port",
            "0",
            "--journal",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert out.stderr.startswith(f"trimtab serve: cannot start: journal '{path}'"), out.stderr
    assert "Traceback" not in out.stderr


def test_a_database_that_is_not_a_journal_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    db.commit()
    db.close()
    with pytest.raises(
        JournalError,
        match=r"is an SQLite database but not a trimtab journal: "
        r"table 'events' has columns \('id', 'what'\)",
    ):
        Journal(str(path))


# -- the controller killed mid-run --------------------------------------------------------

# state_save_s: what reports alone change is saved within 0.2 s, so that the state the
# kill leaves (checked equal to the live one below) is the whole of it; commands and acks
# save at once whatever it is (test_handler checks what a kill within it loses).
CONFIG = """
resend_after_reports = 3
state_save_s = 0.2
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "divergence_guard"

[[policies]]
name = "bench.scenario_policies:Nudge"

[governor.lr]
cooldown_steps = 0
slew_ratio = 1000.0

[rollback]
stable_window_steps = 20
"""

JOBS = ("crash-0", "crash-1", "crash-2")
PAUSE_AT = 250  # a report: the command it brings stays pending while the run is paused
TOTAL = 400
# crash-0's loss is NaN for 20 calls from step 120 (skipped steps: it stays there), four
# report windows, so the guard sees one while no command is pending: a rollback, and the
# rollback state (budget used) is part of what must survive the kill.
NAN_AT, NAN_CALLS = 120, 20


@dataclass
class Run:
    """One training run in a thread; it stops stepping while ``paused`` is set."""

    job: str
    seed: int
    endpoint: str
    paused: threading.Event
    at_pause: threading.Event = field(default_factory=threading.Event)
    #: guard.applied_seq each time it changed.
    applied: list[int] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _train(self) -> None:
        task = Regression(seed=self.seed)
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
        poison = NAN_CALLS if self.job == "crash-0" else 0
        with attach(
            task.model,
            opt,
            job=self.job,
            endpoint=self.endpoint,
            report_every=5,
            heartbeat_s=0.5,
            checkpoint_every=20,
        ) as guard:
            while guard.global_step < TOTAL:
                if guard.global_step == PAUSE_AT and not self.at_pause.is_set():
                    self.at_pause.set()
                    while self.paused.is_set():
                        time.sleep(0.01)
                xb, yb = task.batch()
                loss = task.loss(xb, yb)
                if poison and guard.global_step >= NAN_AT:
                    poison, loss = poison - 1, loss * float("nan")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                guard.step(loss)
                if guard.applied_seq != (self.applied[-1] if self.applied else 0):
                    self.applied.append(guard.applied_seq)
                time.sleep(0.003)
            self.steps, self.lr_scale = guard.global_step, guard.scale.lr


@pytest.fixture
def nudge(monkeypatch):
    """The nudge policy (3% less LR at every report: a command for nearly every report)
    importable by ``trimtab serve`` subprocesses."""
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))


def test_sigkill_with_a_command_pending_resumes_every_job_exactly(nudge, serve_factory):
    port = free_port()
    srv = serve_factory(CONFIG, port=port)
    paused = threading.Event()
    paused.set()
    runs = [Run(job, seed, srv.endpoint, paused) for seed, job in enumerate(JOBS)]
    threads = [threading.Thread(target=r, daemon=True) for r in runs]
    for t in threads:
        t.start()
    try:
        assert all(r.at_pause.wait(60) for r in runs), [r.error for r in runs]
        journal = srv.journal()
        # Every run has stopped right after its step PAUSE_AT; the two never rolled back sent
        # their report there (windows close every 5 calls). Wait until the controller has
        # handled them (and any ack before), then find the commands it left pending.
        assert wait_for(
            lambda: all(
                any(e.step == PAUSE_AT for e in journal.events(job, "report")) for job in JOBS[1:]
            )
        )
        time.sleep(0.5)

        def saved_whole(job: str) -> bool:  # the saved state holds the job's last report
            state, reports = journal.load_state(job), journal.events(job, "report")
            return state["last_report"]["seq"] == reports[-1].seq

        assert wait_for(lambda: all(saved_whole(job) for job in JOBS))  # state_save_s 0.2
        before = {job: journal.load_state(job) for job in JOBS}
        pending = {job: sd["last_command"] for job, sd in before.items() if sd["awaiting_ack"]}
        assert pending, "no command pending at the kill"
        assert any(
            cmd["scale"]["lr"] is not None for cmd in pending.values()
        ), pending
        for job, cmd in pending.items():
            assert not [a for a in journal.events(job, "ack") if a.seq == cmd["seq"]]
        assert before["crash-0"]["rollback"]["history"], "crash-0 was rolled back before"
        last_id = max(e.id for e in journal.events())
        srv.kill()

        journal = Journal(str(srv.journal_path))  # the file as the kill left it
        assert {job: journal.load_state(job) for job in JOBS} == before
        srv2 = serve_factory(CONFIG, port=port, journal=srv.journal_path)
        journal = srv2.journal()
        # The runs are still paused: their links re-register by themselves.
        regs = wait_for(
            lambda: all(journal.events(job, "register", after_id=last_id) for job in JOBS),
            timeout=30,
        )
        assert regs, "not every run registered again"
        for job in JOBS:
            again = journal.events(job, "register", after_id=last_id)
            assert {r.data["resumed"] for r in again} == {"journal"}, job
            # What the restarted controller holds is exactly what it held before the kill:
            # EMAs, slope window, governor memory (cooldowns, slew), rollback state and
            # budget, command sequence and the pending command; only the step moves on to
            # the one the run registered at, if it stepped after its last report, and the
            # link is the one it registered on (a new one if the client reconnected).
            now = journal.load_state(job)
            assert now["step"] == max(before[job]["step"], again[-1].step), job
            assert now["link"] == again[-1].data["link"] >= before[job]["link"], job
            moved = {"step": None, "link": None}
            assert {**now, **moved} == {**before[job], **moved}, job
        paused.clear()
        for t in threads:
            t.join(90)
    finally:
        paused.clear()
        for t in threads:  # never leave a run's link alive past the test
            t.join(90)
    assert [r.error for r in runs] == [None] * 3
    journal = srv2.journal()
    assert wait_for(lambda: all(journal.events(job, "bye") for job in JOBS))
    for run in runs:
        commands = journal.events(run.job, "command")
        seqs = [c.seq for c in commands]
        acks = journal.events(run.job, "ack")
        assert run.steps == TOTAL
        assert seqs == list(range(1, len(seqs) + 1)), f"{run.job}: a command seq reused/skipped"
        # Applied by the run once each, in order: none lost, none applied twice (one may
        # be left out where an urgent rollback superseded it, or the last, when the run
        # ended before it arrived).
        assert_applied_in_order(commands, run.applied, run.job)
        applied = [c for c in commands if c.seq in run.applied]
        # Acknowledged with the values commanded; a command sent again (its ack was late)
        # is acknowledged again with the same values, never applied again.
        assert {a.seq for a in acks} == set(run.applied), run.job
        for a in acks:
            sent = commands[a.seq - 1].data
            for knob, value in sent["knobs"].items():  # momentum, clip: absolute
                assert a.data["knobs"][knob] == pytest.approx(value), (run.job, a.seq, knob)
            for knob, value in sent["scale"].items():  # lr, weight decay: multipliers
                assert a.data["scale"][knob] == pytest.approx(value), (run.job, a.seq, knob)
        lr_commands = [c for c in applied if "lr" in c.data["scale"]]
        assert run.lr_scale == pytest.approx(lr_commands[-1].data["scale"]["lr"])
    for job, cmd in pending.items():
        acks = [a for a in journal.events(job, "ack") if a.seq == cmd["seq"]]
        assert acks and acks[0].id > last_id, "the pending command was applied after the restart"
        assert all(c.seq > cmd["seq"] for c in journal.events(job, "command", after_id=last_id))
