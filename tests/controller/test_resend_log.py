"""A command not applied yet is sent again; the line saying so is DEBUG and comes at most
once per job per ``RESEND_LOG_EVERY_S``, however many resends a burst of reports causes."""

from __future__ import annotations

import logging

from trimtab.controller.recorder import RESEND_LOG_EVERY_S
from trimtab.protocol import wire

from .test_handler import PEER, decoded, make, register, report


def _lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "not applied yet" in r.getMessage()]


def _commands(replies) -> int:
    return sum(isinstance(m, wire.Command) for m in decoded(replies))


def test_a_burst_of_resends_logs_one_debug_line_per_job(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="trimtab.controller")
    ctl, clock = make(tmp_path)
    for job in ("j1", "j2"):
        ctl.handle(PEER + job.encode(), register(job=job, run_id=job))
        for seq in range(1, 4):
            ctl.handle(PEER + job.encode(), report(seq, job=job))
        # A non-finite report: spike_guard cuts the lr; the client never applies it.
        assert _commands(ctl.handle(PEER + job.encode(), report(4, job=job, nonfinite=3))) == 1

    # A client flushing its backlog: many reports in the same instant, no ack.
    resent = {"j1": 0, "j2": 0}
    for seq in range(5, 45):
        for job in resent:
            resent[job] += _commands(ctl.handle(PEER + job.encode(),
                                                report(seq, job=job, nonfinite=3)))
    assert resent == {"j1": 20, "j2": 20}  # resent every resend_after_reports (2) reports
    lines = _lines(caplog)
    assert [r.getMessage() for r in lines] == [
        "job j1: command 1 not applied yet; sending it again",
        "job j2: command 1 not applied yet; sending it again",
    ]
    assert {r.levelno for r in lines} == {logging.DEBUG}

    # The interval later, the next resend is said again, with the ones it stands for.
    clock.t += RESEND_LOG_EVERY_S
    again = 0
    for seq in range(45, 47):
        again += _commands(ctl.handle(PEER + b"j1", report(seq, job="j1", nonfinite=3)))
    assert again == 1
    assert _lines(caplog)[-1].getMessage() == (
        "job j1: command 1 not applied yet; sending it again (19 more resends since the last "
        "line)")
    assert len(_lines(caplog)) == 3
