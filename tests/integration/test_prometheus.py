"""The shipped dashboards and alert rules against a real Prometheus scraping a real
``trimtab serve`` that steers real training runs (the scenario of bench/dashboard_png.py).

Every PromQL expression of every panel, annotation and template variable of both Grafana
dashboards is run through Prometheus' HTTP API and must return data; every alert rule
must fire in the scenario made for it (the rules are loaded with ``for:`` set to 0s, so a
short run can fire them; nothing else in them changes). Skipped only where the
``prometheus``/``promtool`` binaries are missing (.ci/run installs Debian's package).
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from bench.dashboard_png import (
    ALERTS,
    RULES,
    STALLED_S,
    Scenario,
    dashboard,
    missing_binaries,
    panels,
    substitute,
)
from trimtab.controller.health import CAUSES

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(420),
    pytest.mark.skipif(missing_binaries() is not None, reason=str(missing_binaries())),
]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    with Scenario(tmp_path_factory.mktemp("observe"), log=lambda _: None) as s:
        yield s


def _has_data(s: Scenario, target: dict, job: str) -> bool:
    expr = substitute(target["expr"], job)
    if target.get("instant"):
        return bool(s.prom.query(expr))
    return bool(s.prom.query_range(expr, s.start, s.end + 5))


@pytest.mark.parametrize("board", ["trimtab-fleet.json", "trimtab-job.json"])
def test_every_panel_query_returns_data(scenario, board):
    """For the per-job dashboard: with ``$job`` set to one of the scenario's jobs (a job
    without rollbacks has no rollback series, one without clipping no clip threshold)."""
    s = scenario
    empty = []
    count = 0
    for panel in panels(dashboard(board)):
        for target in panel["targets"]:
            count += 1
            if not any(_has_data(s, target, job)
                       for job in (s.SPIKE, s.RB, s.CHURN, s.DDP)):
                empty.append(f"{panel['title']}: {target['expr']}")
    assert count >= 15
    assert not empty, "no data for:\n" + "\n".join(empty)


@pytest.mark.parametrize("board", ["trimtab-fleet.json", "trimtab-job.json"])
def test_every_annotation_query_marks_the_rollbacks_and_knob_changes(scenario, board):
    s = scenario
    annotations = [a for a in dashboard(board)["annotations"]["list"] if "expr" in a]
    assert annotations
    for ann in annotations:
        got = s.prom.query_range(substitute(ann["expr"], s.SPIKE), s.start, s.end + 5)
        assert got, f"annotation {ann['name']!r} marks nothing: {ann['expr']}"
    rollbacks = next(a for a in annotations if a["name"] == "Rollbacks")
    got = s.prom.query_range(substitute(rollbacks["expr"], s.SPIKE), s.start, s.end + 5)
    reasons = {series["metric"].get("reason") for series in got}
    assert reasons <= set(CAUSES) and reasons  # the fleet's: ddp-1's replicas too


def test_the_job_variable_lists_the_live_jobs(scenario):
    (_, var) = dashboard("trimtab-job.json")["templating"]["list"]  # datasource, job
    assert var["query"]["query"] == "label_values(trimtab_job_step, job)"
    values = scenario.prom.api("label/job/values", **{"match[]": "trimtab_job_step"})
    assert {scenario.RB, scenario.SPIKE, scenario.CHURN, scenario.SILENT} <= set(values)


def test_every_alert_rule_fires_in_its_scenario(scenario):
    s = scenario
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == set(ALERTS)
    for rule in rules:
        expr = rule["expr"]
        if rule["alert"] == "TrimtabJobStalled":  # as the scenario's Prometheus has it
            expr = expr.replace("> 900", f"> {STALLED_S}")
        assert s.prom.query_range(expr, s.start, s.end + 5), rule["alert"]
    fired = s.prom.query('max_over_time(ALERTS{alertstate="firing"}[15m])')
    by_alert: dict[str, set[str]] = {}
    for series in fired:
        m = series["metric"]
        by_alert.setdefault(m["alertname"], set()).add(m.get("job", ""))
    assert set(by_alert) >= set(ALERTS), by_alert
    assert s.RB in by_alert["TrimtabRollbackBudgetExhausted"]
    assert s.SPIKE not in by_alert["TrimtabRollbackBudgetExhausted"]
    assert s.SILENT in by_alert["TrimtabJobSilent"]
    assert s.SILENT in by_alert["TrimtabJobStalled"]  # its heartbeats went on
    assert s.SILENT in by_alert["TrimtabJobLost"]
    assert by_alert["TrimtabDecisionChurn"] == {s.CHURN}
    assert s.CHURN in by_alert["TrimtabReportsDropped"]
    assert by_alert["TrimtabControllerDown"] == {"trimtab"}
    assert by_alert["TrimtabJobPausedLong"] == {s.SPIKE}  # the job a person paused


def test_the_controllers_metrics_pass_promtool(scenario):
    text = scenario.serve.metrics()
    assert 'job="churn-1"' in text and "trimtab_governor_clamps_total" in text
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
