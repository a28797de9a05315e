"""``trimtab decisions``, ``trimtab jobs`` and ``trimtab top`` read a journal a real
``trimtab serve`` writes while real training runs report to it: a live policy that
changes the lr, a shadow policy, checkpoints marked stable. ``top`` runs in a
pseudo-terminal, as a person would see it."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from trimtab.client import attach
from trimtab.controller.journal import Journal

from .support import Regression, cli, start_serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: update_ratio cuts the lr at once on this task (its update/weight ratio is far above the
#: band); step_decay runs in shadow; checkpoints are marked stable after 20 steps.
CONFIG = """
[[policies]]
name = "update_ratio"
config = { min_reports = 2 }

[[policies]]
name = "step_decay"
shadow = true
config = { step_size = 30, gamma = 0.5 }

[governor.lr]
cooldown_steps = 0

[rollback]
stable_window_steps = 20
stable_min_reports = 2
"""


def train(endpoint: str, job: str, steps: int, folder: Path, stop=None) -> None:
    """A small real training run attached to the controller (``stop``: an Event that ends
    it early)."""
    torch.set_num_threads(1)
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    with attach(task.model, opt, job=job, endpoint=endpoint, report_every=5, heartbeat_s=0.1,
                checkpoint_every=20, checkpoint_dir=str(folder / f"ckpt-{job}")) as guard:
        for _ in range(steps):
            if stop is not None and stop.is_set():
                break
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            if stop is not None:
                time.sleep(0.01)  # a run a person watches: a few reports a second


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A live serve whose journal holds one finished job, ``people``."""
    folder = tmp_path_factory.mktemp("people")
    srv = start_serve(folder, None, None, CONFIG)
    try:
        train(srv.endpoint, "people", 150, folder)

        def said_bye() -> bool:
            j = Journal(str(srv.journal_path), readonly=True)
            try:
                return bool(j.events("people", "bye"))
            finally:
                j.close()

        assert wait_for(said_bye)
        yield srv, folder
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=30)


def _events(srv, kind: str, job: str = "people") -> list:
    j = Journal(str(srv.journal_path), readonly=True)
    try:
        return j.events(job, kind)
    finally:
        j.close()


def _json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_decisions_is_a_table_of_knob_changes_with_from_to_and_why(served):
    srv, folder = served
    out = cli("decisions", "people", "--journal", str(srv.journal_path), cwd=folder)
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split() == ["time", "step", "kind", "policy", "knob", "from", "->", "to",
                              "why"]
    first = _events(srv, "decision")[0].data["knobs"]["lr"]
    change = [ln for ln in lines if " decision " in ln][0]
    # 2026-01-31T14:00:00  10  decision  update_ratio  lr  x1 -> x0.8  update/weight ratio ...
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d +\d+ +decision +update_ratio +lr +"
                    rf"x{first['current']:.6g} -> x{first['commanded']:.6g} +"
                    rf"{re.escape(first['reason'])}$", change), change
    assert not any(ln.split()[2] == "ack" for ln in lines if len(ln.split()) > 2 and
                   "differs" not in ln and "error" not in ln)  # acks as commanded: hidden
    assert "ended: closed" in lines[-1]


def test_a_reason_in_brackets_is_shown_as_written_not_read_as_markup(served, tmp_path):
    """A reason is a policy's free text: the governor's own ``[limited: ...]`` note, or a
    plugin's ``[/x]``. The tables show it as written; before, rich read it as markup: the
    note vanished, and ``[/x]`` stopped ``trimtab decisions`` with a MarkupError."""
    srv, folder = served
    copy = tmp_path / "copy.db"
    src = sqlite3.connect(str(srv.journal_path))
    dst = sqlite3.connect(str(copy))
    src.backup(dst)
    src.close(), dst.close()
    first = _events(srv, "decision")[0]
    why = "band [/x] crossed [limited: bounds, max_step_ratio]"
    data = json.loads(json.dumps(first.data))
    data["knobs"]["lr"]["reason"] = data["reason"] = why
    j = Journal(str(copy))
    j.append("people", "decision", step=first.step + 1, seq=first.seq, data=data)
    j.commit()
    j.close()
    out = cli("decisions", "people", "--journal", str(copy), cwd=folder)
    assert out.returncode == 0, out.stderr
    assert any(ln.endswith(why) for ln in out.stdout.splitlines()), out.stdout
    out = cli("jobs", "--journal", str(copy), "--wide", cwd=folder)
    assert out.returncode == 0, out.stderr
    assert why in out.stdout, out.stdout


def test_shadow_decisions_are_shown_and_marked(served):
    srv, folder = served
    assert _events(srv, "shadow"), "the shadow policy journaled nothing"
    rows = _json_rows(cli("decisions", "people", "--journal", str(srv.journal_path),
                          "--json", cwd=folder).stdout)
    shadow = [r for r in rows if r["kind"] == "shadow"]
    assert shadow and all(r["policy"] == "step_decay (shadow)" for r in shadow)
    assert all(r["policy"] != "step_decay" for r in rows)  # never shown as if it acted


def test_stable_marks_are_shown_at_the_step_they_were_marked(served):
    srv, folder = served
    marks = _events(srv, "stable")
    assert marks
    rows = _json_rows(cli("decisions", "people", "--journal", str(srv.journal_path),
                          "--json", "--kind", "stable", cwd=folder).stdout)
    assert [r["why"] for r in rows] == [
        f"checkpoint {m.data['step']} marked stable ({m.data['source']})" for m in marks]
    # The journal holds each mark at its checkpoint's step; the rows are at the step the
    # mark was made, after the checkpoint, so that steps never seem to go back.
    assert all(r["step"] > m.step for r, m in zip(rows, marks, strict=True))
    table = cli("decisions", "people", "--journal", str(srv.journal_path), cwd=folder)
    rows = [(ln.split()[2], int(ln.split()[1])) for ln in table.stdout.splitlines()[1:]
            if ln.split()[2] in ("stable", "decision")]
    decided = [step for kind, step in rows if kind == "decision"]
    assert decided == sorted(decided) and any(kind == "stable" for kind, _ in rows)
    # A mark is shown at or after the decision that ordered it (its ack's step). The
    # decision after it may be at an earlier step: an ack goes out before the reports queued
    # with it, so on a busy host it can reach the controller before them.
    for i, (kind, step) in enumerate(rows):
        if kind == "stable":
            assert step >= max([s for k, s in rows[:i] if k == "decision"], default=0), rows


def test_kind_since_and_json(served):
    srv, folder = served
    jpath = str(srv.journal_path)
    picked = _json_rows(cli("decisions", "people", "--journal", jpath, "--json", "--kind",
                            "proposal,report", cwd=folder).stdout)
    assert {r["kind"] for r in picked} == {"proposal", "report"}
    assert sum(r["kind"] == "report" for r in picked) == len(_events(srv, "report"))
    assert {"time", "step", "kind", "policy", "knob", "change", "why", "job"} <= set(picked[0])
    every = _json_rows(cli("decisions", "people", "--journal", jpath, "--json", "--kind",
                           "all", cwd=folder).stdout)
    assert {"register", "report", "checkpoint", "decision", "command", "bye"} <= {
        r["kind"] for r in every}

    recent = cli("decisions", "people", "--journal", jpath, "--json", "--since", "1d",
                 cwd=folder)
    default = cli("decisions", "people", "--journal", jpath, "--json", cwd=folder)
    assert recent.stdout == default.stdout and recent.stdout
    later = (datetime.now() + timedelta(hours=1)).isoformat(timespec="seconds")
    none = cli("decisions", "people", "--journal", jpath, "--since", later, cwd=folder)
    assert none.returncode == 0 and none.stdout == ""
    assert "nothing of kinds " in none.stderr and f"since {later}" in none.stderr
    bad = cli("decisions", "people", "--journal", jpath, "--since", "yesterday", cwd=folder)
    assert bad.returncode == 2
    assert "--since 'yesterday': not a duration or a time; allowed: a number with s, m, h " \
           "or d (10m, 2h, 1d), or an ISO time" in bad.stderr
    badkind = cli("decisions", "--journal", jpath, "--kind", "decisions", cwd=folder)
    assert badkind.returncode == 2
    assert "--kind 'decisions': 'decisions' is not an event kind; allowed: all" in badkind.stderr


def test_jobs_lists_the_job_its_knobs_and_last_decision(served):
    srv, folder = served
    jpath = str(srv.journal_path)
    lines = _json_rows(cli("jobs", "--journal", jpath, "--json", cwd=folder).stdout)
    (line,) = [ln for ln in lines if ln["job"] == "people"]
    j = Journal(jpath, readonly=True)
    state = j.load_state("people")
    j.close()
    last = _events(srv, "decision")[-1]
    assert line["job"] == "people" and line["state"] == "ended (closed)"
    assert line["step"] == state["step"] and line["knobs"] == state["effective"]
    assert line["last_decision_step"] == last.step
    assert line["last_decision"].startswith("lr x") and " by update_ratio: " in line[
        "last_decision"]
    assert line["rollbacks"] == 0 and line["alert"] is None
    table = cli("jobs", "--journal", jpath, cwd=folder)
    header, *rows = table.stdout.splitlines()
    (row,) = [r for r in rows if r.startswith("people ")]
    assert header.split()[:9] == ["job", "state", "step", "lr", "momentum", "wd", "clip",
                                  "rollbacks", "alert"]
    assert row.split()[:5] == ["people", "ended", "(closed)", str(state["step"]),
                               f"{state['effective']['lr']:.4g}"]


def test_unknown_job_and_missing_journal_are_errors(served, tmp_path):
    srv, folder = served
    jpath = str(srv.journal_path)
    for args in (("decisions", "peopel"), ("decisions", "--job", "peopel")):
        out = cli(*args, "--journal", jpath, cwd=folder)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip() == (f"trimtab decisions: no job 'peopel' in journal {jpath!r} "
                                      "(jobs in it: people); did you mean 'people'?")
    for command in ("decisions", "jobs", "top"):
        out = cli(command, "--journal", "missing.db", cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr.strip() == (f"trimtab {command}: no journal at missing.db; trimtab "
                                      "serve writes it (see --journal)")
        assert list(tmp_path.iterdir()) == []


def _read_until(lines: queue.Queue, predicate, timeout: float = 60.0) -> list[str]:
    """Lines from ``lines`` until one satisfies ``predicate`` (or the time is up)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        got.append(line)
        if predicate(line):
            break
    return got


def _ctrl_c_reaches() -> None:
    """In a child about to run a command a person ends with Ctrl-C: SIGINT acts. A suite run
    in the background of a non-interactive shell (``pytest &``) has it ignored, children
    inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _follow(folder, *args: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``trimtab decisions ARGS --kind register,bye --json --follow`` running, and the
    lines it prints as they come."""
    follow = subprocess.Popen(
        [sys.executable, "-m", "trimtab.controller", "decisions", *args,
         "--kind", "register,bye", "--json", "--follow"],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_ctrl_c_reaches)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in follow.stdout], daemon=True).start()
    return follow, lines


def test_follow_prints_events_as_they_are_journaled(served):
    srv, folder = served
    follow, lines = _follow(folder, "--journal", str(srv.journal_path))
    try:
        before = _read_until(lines, lambda ln: json.loads(ln)["kind"] == "bye")
        assert [json.loads(ln)["job"] for ln in before] == ["people", "people"]
        train(srv.endpoint, "late", 20, folder)
        after = _read_until(lines, lambda ln: json.loads(ln)["kind"] == "bye")
        assert [(r["job"], r["kind"]) for r in map(json.loads, after)] == [
            ("late", "register"), ("late", "bye")]
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=20) == 0, follow.stderr.read()


def test_follow_waits_for_a_job_that_has_not_registered_yet(served):
    """``decisions JOB --follow`` for a job not in the journal yet says so (with the jobs
    there, for a typo) and shows its events once it registers, as ``tail -F`` waits for a
    file (without ``--follow`` it stays an error: see
    test_unknown_job_and_missing_journal_are_errors)."""
    srv, folder = served
    jpath = str(srv.journal_path)
    follow, lines = _follow(folder, "soon", "--journal", jpath)
    try:
        said = follow.stderr.readline()
        assert said.startswith(f"trimtab decisions: no job 'soon' in journal {jpath!r} "
                               "(jobs in it: "), said
        assert said.rstrip().endswith("following: its events show once it registers "
                                      "(Ctrl-C stops)"), said
        train(srv.endpoint, "soon", 20, folder)
        got = _read_until(lines, lambda ln: json.loads(ln)["kind"] == "bye")
        assert [(r["job"], r["kind"]) for r in map(json.loads, got)] == [
            ("soon", "register"), ("soon", "bye")]
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=20) == 0, follow.stderr.read()


def test_follow_waits_for_a_journal_that_serve_has_not_written_yet(tmp_path):
    """``decisions --follow`` on a journal that does not exist yet (the serve not started)
    says so and shows the rows once a serve writes it, creating nothing itself meanwhile."""
    jpath = tmp_path / "later.db"
    follow, lines = _follow(tmp_path, "fresh", "--journal", str(jpath))
    srv = None
    try:
        said = follow.stderr.readline()
        assert said.strip() == (f"trimtab decisions: no journal at {jpath}; trimtab serve "
                                "writes it (see --journal); following: waiting for it "
                                "(Ctrl-C stops)"), said
        time.sleep(0.5)
        assert not jpath.exists()  # waiting reads nothing and creates nothing
        srv = start_serve(tmp_path, None, None, CONFIG, journal=jpath)
        train(srv.endpoint, "fresh", 20, tmp_path)
        got = _read_until(lines, lambda ln: json.loads(ln)["kind"] == "bye")
        assert [(r["job"], r["kind"]) for r in map(json.loads, got)] == [
            ("fresh", "register"), ("fresh", "bye")]
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=20) == 0, follow.stderr.read()
        if srv is not None:
            srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(timeout=30)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_top_refreshes_a_live_job_in_place_in_a_terminal(served):
    srv, folder = served
    stop = threading.Event()
    run = threading.Thread(target=train, args=(srv.endpoint, "watched", 100_000, folder, stop))
    run.start()
    pid, fd = pty.fork()
    if pid == 0:  # the child: trimtab top on the pseudo-terminal
        _ctrl_c_reaches()
        os.chdir(folder)
        os.execve(sys.executable, [sys.executable, "-m", "trimtab.controller", "top",
                                   "--journal", str(srv.journal_path), "--interval", "0.2"],
                  {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "30"})
    screen = ""
    steps: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(set(steps)) < 3:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                screen += os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            text = _ANSI.sub("", screen)
            steps = [int(m) for m in re.findall(r"watched\s+live\s+(\d+)", text)]
        assert len(set(steps)) >= 3, _ANSI.sub("", screen)[-3000:]
        assert steps == sorted(steps)  # the job's step grows on the screen
        assert "\x1b[" in screen  # drawn for a terminal: moved over, not scrolled
        assert "trimtab top: " in _ANSI.sub("", screen)
    finally:
        stop.set()
        run.join(timeout=60)
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def _in_terminal(folder, columns: int, *args: str) -> list[str]:
    """``trimtab ARGS`` run to its end on a pseudo-terminal ``columns`` wide, as a person
    sees it: its lines, without the escape codes."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal's size is set, as a terminal emulator sets it
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        os.chdir(folder)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        os.execve(sys.executable, [sys.executable, "-m", "trimtab.controller", *args],
                  {**env, "TERM": "xterm-256color"})
    out = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child ended and closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return _ANSI.sub("", out.decode()).replace("\r\n", "\n").splitlines()


def test_jobs_fits_a_terminal_a_line_per_job_and_wide_or_a_pipe_has_it_whole(served):
    """On a terminal 100 or 80 columns wide, ``trimtab jobs`` is a line per job: the
    numbers whole, the free text (the last decision first) cut with … to fit. ``--wide``,
    or a pipe, gives each job's line whole, however long."""
    srv, folder = served
    jpath = str(srv.journal_path)
    lines = _json_rows(cli("jobs", "--journal", jpath, "--json", cwd=folder).stdout)
    (people,) = [ln for ln in lines if ln["job"] == "people"]
    last = f"step {people['last_decision_step']}: {people['last_decision']}"
    lr = f"{people['knobs']['lr']:.4g}"
    assert len(last) > 100  # too long for the terminal: it must be cut
    for columns in (100, 80):
        shown = _in_terminal(folder, columns, "jobs", "--journal", jpath)
        assert len(shown) == 1 + len(lines), shown  # a header, then one line per job
        assert all(len(ln) <= columns for ln in shown), shown
        (row,) = [ln for ln in shown if ln.startswith("people ")]
        assert row.split()[3:5] == [str(people["step"]), lr], row  # never cut
        cell = row[shown[0].index("last"):]
        assert cell.endswith("…") and last.startswith(cell[:-1]), (cell, last)
        if columns == 100:
            assert len(cell) >= 10, cell
    wide = _in_terminal(folder, 100, "jobs", "--journal", jpath, "--wide")
    piped = cli("jobs", "--journal", jpath, cwd=folder).stdout.splitlines()
    for shown in (wide, piped):
        (row,) = [ln for ln in shown if ln.startswith("people ")]
        assert row.rstrip().endswith(last), row
        assert len(shown) == 1 + len(lines)


def test_top_through_a_pipe_prints_a_whole_frame_each_refresh_and_ends_on_sigterm(served):
    """``trimtab top | ...`` is ``top -b``: a frame (a title line, then the table, no line
    cut) every interval, each as it is made; SIGTERM ends it as Ctrl-C does, between
    frames; ``-n 1`` prints one frame and exits."""
    srv, folder = served
    jpath = str(srv.journal_path)
    (people,) = [ln for ln in _json_rows(cli("jobs", "--journal", jpath, "--json",
                                             cwd=folder).stdout) if ln["job"] == "people"]
    last = f"step {people['last_decision_step']}: {people['last_decision']}"
    top = subprocess.Popen([sys.executable, "-m", "trimtab.controller", "top", "--journal",
                            jpath, "--interval", "0.2"], cwd=folder, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in top.stdout], daemon=True).start()
    titles: list[int] = []
    got: list[str] = []
    try:  # two whole frames: up to the people row after the second title
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                len(titles) >= 2 and any(ln.startswith("people ") for ln in got[titles[1]:])):
            got += _read_until(lines, lambda ln: True, timeout=1)
            titles = [i for i, ln in enumerate(got) if ln.startswith("trimtab top: ")]
    finally:
        top.send_signal(signal.SIGTERM)
        assert top.wait(timeout=20) == 0, top.stderr.read()
    assert len(titles) >= 2, got
    for start in titles[:2]:
        frame = [ln.rstrip("\n") for ln in got[start:]]
        assert frame[0].startswith(f"trimtab top: {jpath} at "), frame
        assert frame[1].split()[:3] == ["job", "state", "step"], frame
        rows = frame[2:frame.index("")] if "" in frame else frame[2:]
        (row,) = [ln for ln in rows if ln.startswith("people ")]
        assert row.endswith(last), row  # no line cut to 80 columns
    assert top.stderr.read() == ""

    once = cli("top", "--journal", jpath, "-n", "1", cwd=folder, timeout=30)
    assert once.returncode == 0, once.stderr
    assert once.stdout.count("trimtab top: ") == 1
    assert any(ln.startswith("people ") and ln.endswith(last)
               for ln in once.stdout.splitlines())
