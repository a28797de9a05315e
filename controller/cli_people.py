"""The read-only commands for people: ``trimtab decisions``, ``trimtab jobs``, ``trimtab top``.

    trimtab decisions [JOB] [--journal PATH] [--kind KINDS] [--since WHEN] [--follow] [--json]
    trimtab jobs [--journal PATH] [--all] [--json] [--wide]
    trimtab top [--journal PATH] [--all] [--interval SECONDS] [-n N]

Each opens the journal read-only (:class:`~trimtab.controller.journal.Journal`): a missing
journal or an unknown job is an error that says so (exit 2), and nothing is ever created or
written. Tables are drawn by ``rich``: on a terminal with colour, through a pipe as plain
aligned columns (no escape codes), wide enough that a row stays on one line.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trimtab.controller.jobs_view import JobLine, JobsView
from trimtab.controller.journal import Journal, JournalError, no_such_job
from trimtab.controller.timeline import DEFAULT_KINDS, Row, Timeline, parse_kinds, parse_since

__all__ = ["add_parsers"]

#: Through a pipe, tables are this wide (whatever $COLUMNS says): a row stays on one line,
#: for grep and for scripts.
PIPE_WIDTH = 220
#: ``trimtab jobs`` through a pipe or ``--wide``: no line is cut or folded short of this.
UNCUT_WIDTH = 100_000
#: ``--follow`` looks for new events this often.
FOLLOW_POLL_S = 0.5


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _fail(command: str, message: str) -> int:
    print(f"trimtab {command}: {message}", file=sys.stderr)
    return 2


def _open(path: str) -> Journal:
    return Journal(path, readonly=True)  # reading never creates a journal


# -- decisions ------------------------------------------------------------------------------

def _decision_table(with_job: bool, header: bool = True) -> Table:
    """The table's columns, fixed in width so that the rows ``--follow`` adds line up."""
    table = Table(box=None, show_header=header, header_style="bold", pad_edge=False,
                  show_edge=False)
    table.add_column("time", min_width=19, no_wrap=True)
    if with_job:
        table.add_column("job", min_width=12, no_wrap=True)
    table.add_column("step", min_width=6, justify="right", no_wrap=True)
    table.add_column("kind", min_width=9, no_wrap=True)
    table.add_column("policy", min_width=14, no_wrap=True)
    table.add_column("knob", min_width=5, no_wrap=True)
    table.add_column("from -> to", min_width=18, no_wrap=True)
    table.add_column("why", overflow="fold")
    return table


_STYLE = {"shadow": "dim", "rollback": "bold red", "restored": "red", "alert": "bold red",
          "restore_failed": "bold red",
          "policy_error": "red", "stable": "green"}


def _print_rows(console: Console, rows: list[Row], *, with_job: bool, as_json: bool,
                header: bool) -> None:
    if as_json:
        for row in rows:
            print(row.to_json(), flush=True)
        return
    if not rows:
        return
    table = _decision_table(with_job, header)
    for r in rows:
        cells = [r.when, *([r.job] if with_job else []),
                 "" if r.step is None else str(r.step), r.kind, r.policy, r.knob, r.change,
                 r.why]
        # As Text: a reason is a policy's free text, never rich markup ("[limited: ...]").
        table.add_row(*map(Text, cells), style=_STYLE.get(r.kind))
    _emit(console, table)


def _emit(console: Console, table: Table) -> None:
    """Print ``table``; through a pipe without the blanks rich pads each line with."""
    if console.is_terminal:
        console.print(table)
    else:
        with console.capture() as cap:
            console.print(table)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
    sys.stdout.flush()


def _decisions(args: argparse.Namespace) -> int:
    if args.job_pos and args.job and args.job_pos != args.job:
        return _fail("decisions", f"job given twice: {args.job_pos!r} and --job {args.job!r}")
    job = args.job_pos or args.job
    try:
        kinds = parse_kinds(args.kind) if args.kind else DEFAULT_KINDS
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        return _fail("decisions", str(exc))
    try:
        journal = _open(args.journal)
    except JournalError as exc:
        if not args.follow or os.path.exists(args.journal):
            return _fail("decisions", str(exc))
        # tail -F's way again: a journal that trimtab serve has not written yet is waited for.
        print(f"trimtab decisions: {exc}; following: waiting for it (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        journal = _wait_for_journal(args.journal)
        if journal is None:
            return 0
    try:
        if job is not None and not journal.has_job(job):
            if not args.follow:
                return _fail("decisions", no_such_job(journal, job))
            # tail -F's way: a job that has not registered yet is waited for.
            print(f"trimtab decisions: {no_such_job(journal, job)}; following: its events "
                  "show once it registers (Ctrl-C stops)", file=sys.stderr, flush=True)
        # Acks asked for by name (or 'all'): every one, not only those that differ.
        every_ack = args.kind is not None and "ack" in kinds
        timeline, console = Timeline(kinds, since, every_ack=every_ack), _console()
        with_job = job is None
        last = 0
        rows: list[Row] = []
        for ev in journal.iter_events(job):
            rows += timeline.feed(ev)
            last = ev.id
        _print_rows(console, rows, with_job=with_job, as_json=args.json, header=True)
        if not rows and not args.follow:
            print(f"trimtab decisions: nothing of kinds {', '.join(sorted(kinds))} to show"
                  + (f" since {args.since}" if since is not None else "")
                  + "; --kind all shows every event", file=sys.stderr)
        if args.follow:
            _follow(journal, job, timeline, last, console, with_job, args.json,
                    header=not rows)
    except KeyboardInterrupt:
        pass
    finally:
        journal.close()
    return 0


def _wait_for_journal(path: str) -> Journal | None:
    """The journal at ``path`` once a serve has written it (``None``: interrupted first)."""
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            if os.path.exists(path):
                try:
                    return _open(path)
                except JournalError:
                    continue  # created, its tables not yet: look again at the next poll
    except KeyboardInterrupt:
        return None


def _follow(journal: Journal, job: str | None, timeline: Timeline, last: int,
            console: Console, with_job: bool, as_json: bool, header: bool) -> None:
    """Print new events' rows as they are journaled, until interrupted. A journal read
    with no writer (opened ``immutable``) is opened again once a writer appears; one whose
    writer goes away mid-read is opened again at the next poll."""
    had_wal = os.path.exists(journal.path + "-wal")
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            try:
                if not had_wal and os.path.exists(journal.path + "-wal"):
                    raise sqlite3.OperationalError("a writer appeared")
                rows: list[Row] = []
                for ev in journal.iter_events(job, after_id=last):
                    rows += timeline.feed(ev)
                    last = ev.id
            except (sqlite3.Error, JournalError):
                journal.close()
                try:
                    journal = _open(journal.path)
                except JournalError:
                    continue  # moved aside or being replaced: look again at the next poll
                had_wal = os.path.exists(journal.path + "-wal")
                continue
            _print_rows(console, rows, with_job=with_job, as_json=as_json, header=header)
            header = header and not rows
    finally:
        journal.close()


# -- jobs and top ---------------------------------------------------------------------------

#: The jobs table's columns: name, justification, and for the free-text ones the fewest
#: columns they are cut to (with "…") to fit a terminal; the rest are never cut.
_JOB_COLUMNS = (("job", "left", 12), ("state", "left", 12), ("step", "right", None),
                ("lr", "right", None), ("momentum", "right", None), ("wd", "right", None),
                ("clip", "right", None), ("rollbacks", "right", None), ("alert", "left", 5),
                ("last decision", "left", 20))
#: What gives way when a terminal is too narrow, in this order: the gaps between columns
#: (two spaces to one), then the last decision, the alert, the state and the job's name,
#: each to its fewest columns (_JOB_COLUMNS), then the last decision to what is left.
_SHRINK_ORDER = ("gaps", "last decision", "alert", "state", "job")


def _job_cells(ln: JobLine) -> list[str]:
    k = ln.knobs

    def fmt(name: str) -> str:
        if name not in k:
            return ""
        return "off" if k[name] is None else f"{k[name]:.4g}"

    last = f"step {ln.last_decision_step}: {ln.last_decision}" if ln.last_decision else ""
    state = ln.state if ln.paused is None else f"{ln.state}, paused"
    return [ln.job, state, "" if ln.step is None else str(ln.step), fmt("lr"),
            fmt("momentum"), fmt("weight_decay"), fmt("clip"), str(ln.rollbacks),
            ln.alert or "", last]


def _fit(rows: list[list[str]], width: int) -> tuple[dict[str, int], bool]:
    """The widths the free-text columns are cut to so that a row fits ``width`` columns
    (see _SHRINK_ORDER), and whether the gaps between columns are one space. Numbers are
    never cut; on a terminal too narrow even for that, the lines run past its edge."""
    widths = {name: max([cell_len(name), *(cell_len(r[i]) for r in rows)])
              for i, (name, _, _) in enumerate(_JOB_COLUMNS)}
    fewest = {name: least for name, _, least in _JOB_COLUMNS if least is not None}
    cut: dict[str, int] = {}
    gap = 2

    def over() -> int:
        return sum(widths.values()) + gap * (len(widths) - 1) - width

    for name in _SHRINK_ORDER:
        if over() <= 0:
            break
        if name == "gaps":
            gap = 1
        elif widths[name] > fewest[name]:
            widths[name] = cut[name] = max(fewest[name], widths[name] - over())
    if over() > 0:
        cut["last decision"] = max(1, widths["last decision"] - over())
    return cut, gap == 1


def _jobs_table(lines: Iterable[JobLine], width: int | None = None) -> Table:
    """The jobs table, a line per job. ``width`` (a terminal's): the free text is cut with
    "…" to fit it (see :func:`_fit`); ``None`` (through a pipe, ``--wide``): nothing is
    cut, however long the lines."""
    lines = list(lines)
    rows = [_job_cells(ln) for ln in lines]
    cut, tight = _fit(rows, width) if width is not None else ({}, False)
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False,
                  collapse_padding=tight)
    for name, justify, _ in _JOB_COLUMNS:
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=cut.get(name))
    for ln, cells in zip(lines, rows, strict=True):
        table.add_row(*map(Text, cells), style="bold red" if ln.alert else (
            "green" if ln.state == "live" else None))
    return table


def _jobs(args: argparse.Namespace) -> int:
    try:
        journal = _open(args.journal)
    except JournalError as exc:
        return _fail("jobs", str(exc))
    try:
        lines = JobsView(journal).lines(all_jobs=args.all)
    finally:
        journal.close()
    if args.json:
        for ln in lines:
            print(ln.to_json())
        return 0
    if not lines:
        print(f"trimtab jobs: no job live or heard from in the last day in {args.journal}"
              + ("" if args.all else "; --all lists every job"), file=sys.stderr)
        return 0
    console = Console(highlight=False)
    if console.is_terminal and not args.wide:
        _emit(console, _jobs_table(lines, width=console.width))
    else:  # through a pipe, or --wide: each job's line whole
        _emit(Console(highlight=False, width=UNCUT_WIDTH), _jobs_table(lines))
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _top(args: argparse.Namespace) -> int:
    """On a terminal, the jobs table refreshing in place, fitted to the terminal's width.
    Through a pipe (``top -b``'s batch mode): a frame every ``--interval``, each a title
    line and the table uncut, flushed as it is printed, for ``--iterations`` frames or
    until interrupted. SIGTERM ends it as Ctrl-C does (exit status 0)."""
    from rich.console import Group
    from rich.live import Live

    if not args.interval > 0:
        return _fail("top", f"--interval {args.interval}: must be a number of seconds > 0")
    if args.iterations is not None and args.iterations < 1:
        return _fail("top", f"--iterations {args.iterations}: must be a number of frames > 0")
    try:
        journal = _open(args.journal)
    except JournalError as exc:
        return _fail("top", str(exc))
    view = JobsView(journal)
    console = Console(highlight=False)
    batch = not console.is_terminal

    def title(lines: list[JobLine]) -> str:
        return (f"trimtab top: {args.journal} at {time.strftime('%H:%M:%S')}, "
                f"{sum(ln.state == 'live' for ln in lines)} live of {len(lines)}"
                + ("" if batch else " (Ctrl-C to quit)"))

    uncut = Console(highlight=False, width=UNCUT_WIDTH)

    def show(live: Live | None) -> None:
        lines = view.lines(all_jobs=args.all)
        if live is not None:  # fitted to the terminal's width, as it is now
            live.update(Group(Text(title(lines), no_wrap=True, overflow="ellipsis"),
                              _jobs_table(lines, width=console.width)), refresh=True)
        else:
            sys.stdout.write(title(lines) + "\n")
            _emit(uncut, _jobs_table(lines))  # flushed

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with nullcontext() if batch else Live(console=console, auto_refresh=False) as live:
            for frames in itertools.count(1):
                if frames > 1 and batch:
                    sys.stdout.write("\n")
                show(live)
                if frames == args.iterations:
                    break
                time.sleep(args.interval)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        journal.close()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``decisions``, ``jobs`` and ``top`` to the ``trimtab`` command."""
    dec = sub.add_parser("decisions", help="what the controller changed, sent and rolled "
                         "back, and why, as a table (one row per knob change)")
    dec.add_argument("job_pos", nargs="?", metavar="JOB", help="only this job")
    dec.add_argument("--job", help="only this job (the same as JOB)")
    dec.add_argument("--journal", default="trimtab-journal.db")
    dec.add_argument("--kind", metavar="KINDS",
                     help="event kinds, comma-separated, or 'all' (default: "
                          f"{','.join(sorted(DEFAULT_KINDS))}; also proposal, report, ...); "
                          "by default an ack shows only when it differs from its command "
                          "or failed, named here every ack shows")
    dec.add_argument("--since", metavar="WHEN",
                     help="only events since a duration ago (10m, 2h, 1d) or an ISO time")
    dec.add_argument("--follow", "-f", action="store_true",
                     help="keep printing new events as they are journaled (Ctrl-C stops)")
    dec.add_argument("--json", action="store_true", help="one JSON object per row")
    dec.set_defaults(func=_decisions)
    jobs = sub.add_parser("jobs", help="every job: state, step, knobs in force, last "
                          "decision, rollbacks, alert")
    jobs.add_argument("--journal", default="trimtab-journal.db")
    jobs.add_argument("--all", action="store_true",
                      help="every job (default: live ones and those heard in the last day)")
    jobs.add_argument("--json", action="store_true", help="one JSON object per job")
    jobs.add_argument("--wide", action="store_true",
                      help="on a terminal too, each job's line whole, however long (by "
                           "default the last decision and alert are cut to fit it, with …)")
    jobs.set_defaults(func=_jobs)
    top = sub.add_parser("top", help="the jobs table, refreshing in place (Ctrl-C quits)")
    top.add_argument("--journal", default="trimtab-journal.db")
    top.add_argument("--all", action="store_true", help="every job, not only recent ones")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--iterations", "-n", type=int, metavar="N",
                     help="stop after N frames (default: until Ctrl-C or SIGTERM); through "
                          "a pipe, -n 1 prints the table once")
    top.set_defaults(func=_top)
