"""The read-only commands (``decisions``, ``export``, ``replay``, ``rerun``) tell the truth:
a missing journal or an unknown job is an error that says so, and reading never creates,
extends or changes a file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
import torch

from trimtab.client import attach
from trimtab.controller.journal import Journal

from .support import Regression, cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "args, said",
    [
        (("decisions",), "trimtab decisions: no journal at trimtab-journal.db; trimtab serve "
                         "writes it (see --journal)"),
        (("decisions", "--journal", "nonexist.db"), "trimtab decisions: no journal at "
                                                    "nonexist.db; trimtab serve writes it"),
        (("decisions", "--journal", "nonexist.db", "--job", "demo"), "no journal at nonexist"),
        (("export", "demo"), "trimtab export: no journal at trimtab-journal.db; trimtab serve "
                             "writes it (see --journal)"),
        (("export", "demo", "--journal", "nonexist.db"), "trimtab export: no journal at "
                                                         "nonexist.db"),
        (("replay", "nonexist.db", "--policy", "plateau"), "trimtab replay: cannot read trace "
                                                           "'nonexist.db'"),
        (("rerun", "nonexist.db"), "trimtab rerun: cannot read trace 'nonexist.db'"),
    ],
)
def test_a_missing_journal_is_an_error_and_nothing_is_created(tmp_path, args, said):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert said in out.stderr
    assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no empty journal, no -wal or -shm files


@pytest.mark.parametrize("make", ["empty file", "other database"])
def test_a_file_that_is_no_journal_is_refused_unchanged(tmp_path, make):
    path = tmp_path / "other.db"
    if make == "empty file":
        path.write_bytes(b"")
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (body TEXT)")
        db.commit()
        db.close()
    before = _files(tmp_path)
    out = cli("decisions", "--journal", str(path), cwd=tmp_path)
    assert out.returncode == 2
    assert f"{str(path)!r} is an SQLite database but not a trimtab journal: it has no table " \
           "'events'" in out.stderr
    assert _files(tmp_path) == before  # no journal tables written into someone's file


def _run_a_job(endpoint: str, job: str) -> None:
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with attach(task.model, opt, job=job, endpoint=endpoint, report_every=5,
                heartbeat_s=0.1) as guard:
        for _ in range(40):
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
        assert wait_for(lambda: guard.connected)


def test_reading_a_real_journal_creates_nothing_and_refuses_an_unknown_job(
    serve_factory, tmp_path
):
    folder = tmp_path / "journal"
    folder.mkdir()
    srv = serve_factory("", journal=folder / "journal.db")
    _run_a_job(srv.endpoint, "cli-real")
    jpath = str(srv.journal_path)

    def said_bye() -> bool:
        journal = Journal(jpath, readonly=True)
        try:
            return bool(journal.events("cli-real", "bye"))
        finally:
            journal.close()

    assert wait_for(said_bye)

    # While serve runs (its -wal and -shm files are there): read through them.
    live = cli("decisions", "--journal", jpath, "--job", "cli-real", cwd=tmp_path)
    assert live.returncode == 0, live.stderr
    assert " register " in live.stdout and "registered (new, run " in live.stdout
    assert " bye " in live.stdout and "ended: closed" in live.stdout

    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
    before = _files(folder)
    # serve's clean close folded its WAL in; its lock file stays (released, not removed)
    assert list(before) == ["journal.db", "journal.db.lock"]

    out = cli("decisions", "cli-real", "--journal", jpath, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == live.stdout.splitlines()
    assert cli("export", "cli-real", "--journal", jpath, cwd=tmp_path).returncode == 0
    assert cli("jobs", "--journal", jpath, cwd=tmp_path).returncode == 0

    unknown = cli("decisions", "--journal", jpath, "--job", "nosuchjob", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.strip() == (
        f"trimtab decisions: no job 'nosuchjob' in journal {jpath!r} (jobs in it: cli-real)")
    typo = cli("decisions", "--journal", jpath, "--job", "cli-rael", cwd=tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.strip().endswith("(jobs in it: cli-real); did you mean 'cli-real'?")
    for args in (("decisions", "nosuchjob", "--journal", jpath),
                 ("export", "nosuchjob", "--journal", jpath),
                 ("replay", jpath, "--policy", "plateau", "--job", "nosuchjob"),
                 ("rerun", jpath, "--job", "nosuchjob")):
        refused = cli(*args, cwd=tmp_path)
        assert refused.returncode == 2, args
        assert f"no job 'nosuchjob' in journal {jpath!r} (jobs in it: cli-real)" \
            in refused.stderr, args

    # Nothing written, created or changed by any of the reads.
    assert _files(folder) == before
    logs = [p.name for p in tmp_path.glob("serve-*.log")]
    assert sorted(os.listdir(tmp_path)) == sorted(["journal", "trimtab.toml", *logs])


def test_a_window_of_only_non_finite_losses_is_read_by_every_command(serve_factory, tmp_path):
    """A report whose window had no finite loss carries ``loss_mean: null`` (and the other
    loss statistics null): every read-only command reads such a journal, and the report's
    row says so instead of failing on it."""
    srv = serve_factory("")
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with attach(task.model, opt, job="nanwin", endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.1) as guard:
        for i in range(30):
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            if 10 <= i < 15:
                loss = loss * float("nan")  # one whole report window of NaN losses
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
        assert wait_for(lambda: guard.connected)
    jpath = str(srv.journal_path)

    def reports() -> list:
        journal = Journal(jpath, readonly=True)
        try:
            return journal.events("nanwin", "report") if journal.events("nanwin", "bye") else []
        finally:
            journal.close()

    assert wait_for(reports)
    empty = [r for r in reports() if r.data.get("loss_mean", 0.0) is None]
    assert empty, "no report of a window without a finite loss was journaled"
    assert empty[0].data["loss_min"] is None and empty[0].data["nonfinite_losses"] == 5

    for args in (("decisions", "nanwin"), ("decisions",), ("decisions", "nanwin", "--json"),
                 ("decisions", "--kind", "all"), ("jobs",), ("jobs", "--json"),
                 ("export", "nanwin")):
        out = cli(*args, "--journal", jpath, cwd=tmp_path)
        assert out.returncode == 0 and out.stdout, (args, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)
    rows = [json.loads(ln) for ln in cli("decisions", "nanwin", "--journal", jpath, "--kind",
                                         "report", "--json", cwd=tmp_path).stdout.splitlines()]
    (row,) = [r for r in rows if r["step"] == empty[0].step and r["id"] == empty[0].id]
    assert row["change"] == "loss none finite"
    assert row["why"].startswith("5 non-finite losses, 5 non-finite gradients, grad norm none, "
                                 "lr ")
