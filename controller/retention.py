"""A journal that lives for months: what is kept, what is thinned, what goes.

A job reporting once a second writes ~86,400 reports a day (about 1 KB of JSON each, ~1.8
KB on disk with SQLite's pages and index). Kept whole forever, one job's journal grows by
~150 MB a day. What a person or a replay needs later is not every report: it is every
decision that acted, every command, ack, rollback and alert, and the run's curve at a
coarser grain. So (``[retention]`` in the controller's config):

- **kept for good**: registrations, commands, acks, rollbacks, restores, alerts, stable
  marks, stop advice, policy errors, byes and losses, every decision that acted (a
  command, a mark, a rollback, an alert or advice) with its proposals, and the
  checkpoints that were marked stable or restored;
- **kept whole for** ``full_s`` (6 h): every report, and the per-report records of
  decisions that changed nothing (holds) with their proposals, and the shadow, stale and
  abandoned reports;
- **then thinned** to one report per job per ``downsample_s`` (60 s): the curve stays;
  the per-report records of decisions that changed nothing, shadow, stale and abandoned
  reports, and the checkpoints never marked stable go;
- **dropped after** ``max_age_s`` (90 days; 0: never): the thinned reports too;
- **the saved state of a job that ended**, and of runs a later run under its name
  replaced, **dropped after** ``ended_state_s`` (7 days; 0: never): each is ~20-30 KB
  (its signals' history) and only resumes that run from the user's checkpoint; later
  such a resume starts its controller state afresh. A fleet trial: 385 short trials left
  one such row each for good, 28 KB a trial once reports were thinned.

``trimtab serve`` compacts every ``compact_every_s``, in slices of at most ``batch_rows``
rows deleted, one per turn of its loop, between messages. Measured on a 2-core VM under
load (a journal of 200,000 reports, one a second): a slice takes ~0.04 s once the journal
is in its steady state, and ~0.3-0.45 s while a large backlog is worked off (the first
compaction of a journal kept whole for days: 37 slices, 17 s): messages wait that long
then. ``trimtab journal compact`` works a backlog off by hand, with serve stopped. Deleted
rows' pages are reused by SQLite; ``--vacuum`` gives them back to the file system.

>>> RetentionConfig().full_s, RetentionConfig().downsample_s
(21600.0, 60.0)
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RetentionConfig", "DETAIL_KINDS", "plan_sql"]


class RetentionConfig(BaseModel):
    """``[retention]``: how long the journal keeps what (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    #: Every report is kept this long (seconds).
    full_s: Annotated[float, Field(ge=0)] = 6 * 3600.0
    #: Older reports are thinned to one per job per this many seconds.
    downsample_s: Annotated[float, Field(gt=0)] = 60.0
    #: Thinned reports older than this are dropped (0: never).
    max_age_s: Annotated[float, Field(ge=0)] = 90 * 86400.0
    #: The saved states of ended jobs, and of runs replaced under a job's name, older than
    #: this are dropped (0: never).
    ended_state_s: Annotated[float, Field(ge=0)] = 7 * 86400.0
    #: ``trimtab serve`` compacts this often (0: never; ``trimtab journal compact`` then).
    compact_every_s: Annotated[float, Field(ge=0)] = 600.0
    #: Rows deleted per slice (one slice per turn of the serve loop).
    batch_rows: Annotated[int, Field(ge=100, le=1_000_000)] = 5000


#: Events that describe one report and nothing beyond it.
DETAIL_KINDS = ("report", "shadow", "stale", "abandoned")

#: A decision (or its proposals) that changed nothing: kept with its reports only.
_IDLE = ("json_extract(data, '$.commands') = '{}' AND json_extract(data, '$.rollback') IS NULL"
         " AND json_extract(data, '$.mark_stable') IS NULL AND json_extract(data, '$.alert')"
         " IS NULL AND json_extract(data, '$.stop_advice') IS NULL"
         " AND json_extract(data, '$.schedules') IS NULL")


def plan_sql(cfg: RetentionConfig, now: float) -> list[tuple[str, str, tuple]]:
    """``(what, SELECT of the ids to delete, args)`` for one compaction at ``now``."""
    full = now - cfg.full_s
    out: list[tuple[str, str, tuple]] = []
    kinds = ",".join(f"'{k}'" for k in DETAIL_KINDS if k != "report")
    # Shadow, stale and abandoned reports: only while the reports are kept whole.
    out.append(("per-report records", f"SELECT id FROM events WHERE ts < ? AND kind IN ({kinds})",
                (full,)))
    # Decisions that changed nothing, and the proposals of their steps.
    out.append(("idle decisions", f"SELECT id FROM events WHERE ts < ? AND kind = 'decision' "
                f"AND {_IDLE}", (full,)))
    # (Row-value IN over an uncorrelated subquery: SQLite builds its set once.)
    out.append(("proposals of idle decisions",
                "SELECT id FROM events WHERE ts < ? AND kind = 'proposal' AND (job, step) NOT IN "
                f"(SELECT job, step FROM events WHERE kind = 'decision' AND step IS NOT NULL "
                f"AND NOT ({_IDLE}))", (full,)))
    # Reports past the full window: the first of each job's downsample_s bucket stays.
    out.append(("thinned reports",
                "SELECT id FROM events WHERE ts < ? AND kind = 'report' AND id NOT IN "
                "(SELECT min(id) FROM events WHERE ts < ? AND kind = 'report' "
                "GROUP BY job, CAST(ts / ? AS INTEGER))", (full, full, cfg.downsample_s)))
    # Checkpoints first listed that were never marked stable nor restored: the marks and
    # restores (kept) name every checkpoint that mattered.
    out.append(("checkpoints never marked",
                "SELECT id FROM events WHERE ts < ? AND kind = 'checkpoint' AND (job, step) NOT IN "
                "(SELECT job, step FROM events WHERE kind IN ('stable', 'restored') "
                "AND step IS NOT NULL)", (full,)))
    if cfg.max_age_s > 0:
        out.append(("reports past max_age_s",
                    "SELECT id FROM events WHERE ts < ? AND kind = 'report'",
                    (now - cfg.max_age_s,)))
    return out
