"""What ``trimtab decisions`` makes of journal events: the rows a person reads."""

from __future__ import annotations

import pytest

from trimtab.controller.journal import EVENT_KINDS, Event
from trimtab.controller.timeline import Timeline, parse_kinds, parse_since


def _events(*specs: tuple) -> list[Event]:
    return [Event(i, 1000.0 + i, "job", kind, step, seq, data)
            for i, (kind, step, seq, data) in enumerate(specs, start=1)]


def _rows(events, **kw):
    timeline = Timeline(**kw)
    return [row for ev in events for row in timeline.feed(ev)]


def test_an_ack_repeating_an_acknowledged_command_is_shown_once_and_only_if_news():
    events = _events(
        ("command", 10, 1, {"scale": {"lr": 0.5}, "knobs": {}}),
        ("ack", 12, 1, {"scale": {"lr": 0.5}, "knobs": {"lr": 0.05}}),  # as commanded
        ("ack", 14, 1, {"scale": {"lr": 0.5}, "knobs": {"lr": 0.05}}),
        ("command", 20, 2, {"scale": {}, "knobs": {}, "mark_stable": 80}),
        ("ack", 22, 2, {"error": "mark_stable=80: no checkpoint at that step"}),
        ("ack", 24, 2, {"error": "mark_stable=80: no checkpoint at that step"}),
    )
    acks = [r for r in _rows(events) if r.kind == "ack"]
    assert [(r.step, r.change, r.why) for r in acks] == [
        (22, "#2 error", "mark_stable=80: no checkpoint at that step")]


def test_acks_asked_for_by_name_are_all_shown_with_what_was_applied():
    """A trial: `trimtab decisions JOB --kind ack` printed "nothing of kinds ack to show"
    for a job with acks; by default only acks that differ are rows, but one who asks for
    acks by name gets every one."""
    events = _events(
        ("command", 10, 1, {"scale": {"lr": 0.5}, "knobs": {"momentum": 0.8}}),
        ("ack", 12, 1, {"scale": {"lr": 0.5}, "knobs": {"lr": 0.05, "momentum": 0.8}}),
        ("command", 20, 2, {"scale": {}, "knobs": {}, "rollback_to": 0}),
        ("ack", 0, 2, {"scale": {"lr": 0.5}, "knobs": {"lr": 0.05}, "restored_step": 0}),
    )
    assert [r for r in _rows(events) if r.kind == "ack"] == []
    acks = [r for r in _rows(events, kinds=frozenset({"ack"}), every_ack=True)]
    assert [(r.step, r.change, r.why) for r in acks] == [
        (12, "#1 applied", "as asked: lr x0.5, momentum 0.8"),
        (0, "#2 applied", "as asked: restored step 0")]


def test_a_stable_mark_is_shown_at_the_step_it_was_marked_not_the_checkpoints():
    events = _events(
        ("report", 295, 30, {}),
        ("ack", 300, 3, {}),
        ("stable", 200, 3, {"step": 200, "source": "ack"}),
    )
    (row,) = _rows(events)
    assert (row.step, row.kind, row.why) == (300, "stable",
                                             "checkpoint 200 marked stable (ack)")


def test_a_withdrawn_command_is_shown_by_default_with_why():
    why = "it marks checkpoint 0 stable, which the client no longer holds (it lists 300)"
    (row,) = _rows(_events(("withdrawn", 520, 1, {"why": why, "mark_stable": 0})))
    assert (row.step, row.kind, row.change, row.why) == (
        520, "withdrawn", "command 1", f"withdrawn: {why}")


def test_a_decision_row_per_changed_knob_and_shadow_rows_marked():
    knobs = {"lr": {"current": 1.0, "commanded": 0.5, "policy": "plateau", "reason": "flat",
                    "limits": []},
             "momentum": {"current": 0.9, "commanded": None, "policy": "x", "reason": "hold",
                          "limits": []}}
    events = _events(("decision", 50, None, {"knobs": knobs}),
                     ("shadow", 60, None, {"knobs": knobs}))
    rows = _rows(events)
    assert [(r.kind, r.policy, r.knob, r.change, r.why) for r in rows] == [
        ("decision", "plateau", "lr", "x1 -> x0.5", "flat"),
        ("shadow", "plateau (shadow)", "lr", "x1 -> x0.5", "flat"),
    ]


def test_kinds_and_since_filter_rows_but_not_what_the_timeline_remembers():
    events = _events(
        ("command", 10, 1, {"knobs": {"momentum": 0.8}}),
        ("ack", 12, 1, {"knobs": {"momentum": 0.7}}),
    )
    assert [r.kind for r in _rows(events, kinds=frozenset({"ack"}))] == ["ack"]
    assert [r.kind for r in _rows(events, since=1001.5)] == ["ack"]
    assert _rows(events, since=2000.0) == []


def test_bad_kind_and_since_values_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"--kind 'decision,rolback': 'rolback' is not an "
                                         r"event kind; allowed: all, or a comma-separated"):
        parse_kinds("decision,rolback")
    assert parse_kinds("all") == frozenset(EVENT_KINDS)
    with pytest.raises(ValueError, match=r"--since '5 weeks': not a duration or a time; "
                                         r"allowed: a number with s, m, h or d"):
        parse_since("5 weeks")
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200.0


def test_a_command_row_names_what_it_carries_stop_advice_and_schedules_included():
    """A command that only advises stopping was shown as "live schedules" (the fallback of
    a command with no knob, mark or rollback)."""
    sched = {"knob": "lr", "kind": "sweep"}
    events = _events(
        ("command", 100, 1, {"scale": {}, "knobs": {}, "stop_advice": "plugin: done"}),
        ("command", 110, 2, {"scale": {}, "knobs": {}, "schedules": [sched]}),
        ("command", 120, 3, {"scale": {}, "knobs": {}, "schedules": []}),
        ("command", 130, 4, {"scale": {"lr": 0.5}, "knobs": {}, "schedules": []}),
    )
    rows = _rows(events, kinds=frozenset({"command"}))
    assert [r.change for r in rows] == ["stop advised", "lr live schedule",
                                        "live schedules stopped", "lr x0.5"]


def test_rows_name_the_key_a_request_or_registration_came_with():
    """--who is the person's word; the key is what the controller checked (security.md:
    ``trimtab decisions`` shows it)."""
    events = _events(
        ("register", 0, None, {"run_id": "r1", "key": "alice"}),
        ("manual", 10, None, {"action": "pause", "ok": True, "who": "oncall", "key": "ops",
                              "reason": "checking"}),
        ("manual", 20, None, {"action": "pause", "ok": False, "who": "x", "key": None,
                              "reason": "y", "detail": "not an operator key"}),
        ("lost", 30, None, {"silent_s": 6.0, "unheard": True}),
    )
    rows = _rows(events, kinds=frozenset({"register", "manual", "lost"}))
    assert [r.why for r in rows] == [
        "registered (new, run r1, key alice)",
        "oncall (key ops): checking",
        "x: y (refused: not an operator key)",
        "lost: not heard from since the controller started 6.0 s before",
    ]
