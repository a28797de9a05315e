"""The files under deploy/: Prometheus configs and alert rules through promtool, the
Grafana dashboards and provisioning as Grafana's file provisioning reads them, and the
container, compose, systemd and Kubernetes files.

The dashboards' queries are checked against a real Prometheus in
tests/integration/test_prometheus.py; here every one of them is also parsed by promtool
(as a recording rule), which needs no server.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from bench.dashboard_png import panels, substitute
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.protocol import wire

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA = DEPLOY / "grafana"
BOARDS = {"trimtab-fleet.json": "trimtab-fleet", "trimtab-job.json": "trimtab-job"}
#: Every query of the dashboards names the datasource through their ``datasource`` variable:
#: provisioned, it defaults to the provisioned Prometheus (:data:`PROVISIONED`); imported by
#: hand into another Grafana, the user picks one.
DS = {"type": "prometheus", "uid": "${datasource}"}
PROVISIONED = {"type": "prometheus", "uid": "trimtab-prometheus"}

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian: apt-get install prometheus; .ci/run installs it)",
)


def _promtool(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def _board(name: str) -> dict:
    return json.loads((GRAFANA / "dashboards" / name).read_text())


def _exprs() -> list[str]:
    """Every PromQL expression of both dashboards (panels, annotations, variables) and of
    the alert rules, with Grafana's variables substituted."""
    out = []
    for name in BOARDS:
        board = _board(name)
        out += [substitute(t["expr"], "run-1") for p in panels(board) for t in p["targets"]]
        out += [substitute(a["expr"], "run-1") for a in board["annotations"]["list"] if "expr" in a]
    return out + [r["expr"] for g in _rules()["groups"] for r in g["rules"]]


def _rules() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())


# -- Prometheus ------------------------------------------------------------------------------


@promtool
@pytest.mark.parametrize(
    "config",
    ["prometheus/prometheus.yml", "compose/prometheus.yml", "kubernetes/prometheus-scrape.yml"],
)
def test_the_scrape_configs_pass_promtool_check_config(tmp_path, config):
    src = DEPLOY / config
    if config != "prometheus/prometheus.yml":  # they expect rules.yml beside them
        shutil.copy(src, tmp_path / "prometheus.yml")
        shutil.copy(DEPLOY / "prometheus" / "rules.yml", tmp_path / "rules.yml")
        src = tmp_path / "prometheus.yml"
    assert "SUCCESS: 8 rules found" in _promtool("check", "config", str(src))
    (scrape,) = yaml.safe_load(src.read_text())["scrape_configs"]
    # trimtab's own `job` label must win, and the rules expect job="trimtab".
    assert scrape["job_name"] == "trimtab" and scrape["honor_labels"] is True


@promtool
def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    _promtool("check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    out = _promtool("test", "rules", str(DEPLOY / "prometheus" / "rules.test.yml"))
    assert "SUCCESS" in out
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "rules.test.yml").read_text())
    )
    assert tested == {r["alert"] for g in _rules()["groups"] for r in g["rules"]}


@promtool
def test_every_dashboard_and_rule_expression_parses(tmp_path):
    """promtool parses each expression as a recording rule (no server needed)."""
    group = {
        "name": "parse",
        "rules": [{"record": f"check:expr{i}", "expr": e} for i, e in enumerate(_exprs())],
    }
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    _promtool("check", "rules", str(path))


def _controller_with_a_job(tmp_path) -> Controller:
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"), metrics_port=0, policies=[PolicySpec(name="spike_guard")]
    )
    ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())
    facts = wire.ScaleFacts(
        param_count=100, group_sizes=[100], optimizer="SGD", dtype="float32", device="cpu"
    )
    ctl.handle(
        b"p",
        wire.encode(
            wire.Register(
                job="run-1", run_id="r", report_every=10, facts=facts, knobs=wire.Knobs(lr=0.1)
            )
        ),
    )
    for seq in range(1, 25):
        loss = 50.0 if seq == 20 else 1.0 / seq
        ctl.handle(
            b"p",
            wire.encode(
                wire.Report(
                    job="run-1",
                    seq=seq,
                    step=10 * seq,
                    window=10,
                    loss_mean=loss,
                    grad_norm_mean=1.0,
                    grad_norm_max=1.5,
                    grad_norm_std=0.1,
                    update_ratio=1e-3,
                    step_time_s=0.01,
                    knobs=wire.Knobs(lr=0.1),
                    **({"validation": 0.5, "validation_step": 10 * seq,
                        "validation_ema": 0.4} if seq == 24 else {}),
                )
            ),
        )
    return ctl


@promtool
def test_the_controllers_metrics_pass_promtool_check_metrics(tmp_path):
    text = generate_latest(_controller_with_a_job(tmp_path).metrics.registry).decode()
    assert 'trimtab_knob_bound{job="run-1",knob="lr",side="upper"}' in text
    _promtool("check", "metrics", stdin=text)


def test_every_metric_the_dashboards_and_rules_use_is_exported(tmp_path):
    text = generate_latest(_controller_with_a_job(tmp_path).metrics.registry).decode()
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", text, re.M))
    names = {n for n, _ in exported}
    names |= {f"{n}_bucket" for n, kind in exported if kind == "histogram"}
    used = {m for e in _exprs() for m in re.findall(r"\btrimtab_\w+", e)}
    assert len(used) >= 30
    assert used <= names, f"not exported: {sorted(used - names)}"


# -- Grafana ---------------------------------------------------------------------------------


def test_the_provisioned_datasource_has_the_uid_the_dashboards_use():
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "trimtab.yml").read_text())[
        "datasources"
    ]
    assert (ds["type"], ds["uid"]) == (PROVISIONED["type"], PROVISIONED["uid"])
    for name in BOARDS:
        var = _board(name)["templating"]["list"][0]
        assert var["current"]["value"] == PROVISIONED["uid"]
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "trimtab.yml").read_text()
    )["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_a_dashboard_is_what_grafana_file_provisioning_takes(name):
    text = (GRAFANA / "dashboards" / name).read_text()
    board = json.loads(text)
    assert board["uid"] == BOARDS[name] and board["title"].startswith("trimtab / ")
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert "id" not in board or board["id"] is None  # provisioning assigns ids
    # Exported-for-import placeholders would stay unresolved under file provisioning.
    assert "${DS_" not in text and "__inputs" not in board and "__requires" not in board
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DS, panel["title"]
            assert t["expr"].strip() and "trimtab_" in t["expr"] or "up{" in t["expr"]
    for ann in board["annotations"]["list"]:
        if "expr" in ann:
            assert ann["datasource"] == DS and ann["enable"] is True
    assert any(a.get("name") == "Rollbacks" for a in board["annotations"]["list"])


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_a_dashboard_imported_by_hand_asks_for_its_datasource(name):
    """No datasource uid is hard-coded: a Grafana whose Prometheus has another uid imports
    the file as it is and picks the datasource in the dashboard's ``datasource``
    variable (of type datasource, Prometheus ones)."""
    text = (GRAFANA / "dashboards" / name).read_text()
    assert PROVISIONED["uid"] not in text.replace('"value": "trimtab-prometheus"', "")
    var = json.loads(text)["templating"]["list"][0]
    assert (var["name"], var["type"], var["query"]) == ("datasource", "datasource", "prometheus")
    assert text.count('"uid": "${datasource}"') >= 10


def test_the_job_dashboard_is_templated_on_job():
    board = _board("trimtab-job.json")
    (ds, var) = board["templating"]["list"]
    assert ds["name"] == "datasource"
    assert var["name"] == "job" and var["type"] == "query" and var["datasource"] == DS
    assert var["query"]["query"] == "label_values(trimtab_job_step, job)"
    for panel in panels(board):
        for t in panel["targets"]:
            assert 'job="$job"' in t["expr"], (panel["title"], t["expr"])
    names = {a["name"] for a in board["annotations"]["list"]}
    assert {"Rollbacks", "Knob changes"} <= names
    titles = {p["title"] for p in panels(board)}
    assert {"Loss, validation and LR", "Gradient norm and clip threshold",
            "Knob changes by policy"} <= titles


# -- container, compose, systemd, Kubernetes -------------------------------------------------


def test_the_dockerfile_installs_the_controller_without_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    # What it copies and installs, and that the controller runs so: tests/deploy/test_image.py
    assert "pip install --no-deps ." in text and "torch" not in text.split("RUN", 1)[1]
    assert 'ENTRYPOINT ["trimtab"]' in text and 'CMD ["serve"]' in text
    assert "USER trimtab" in text


def test_the_compose_file_runs_controller_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"controller", "prometheus", "grafana"}
    assert services["controller"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # nothing on the host's other addresses
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / "compose" / src).exists(), vol
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["controller:9108"]


def test_the_systemd_unit_runs_trimtab_serve():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((DEPLOY / "systemd" / "trimtab.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert " serve " in unit["Service"]["ExecStart"] + " "
    assert unit["Service"]["User"] == "trimtab" and unit["Service"]["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_kubernetes_manifests_fit_together():
    docs = [
        d
        for f in ("trimtab.yaml", "servicemonitor.yaml")
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / f).read_text())
        if d
    ]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    }
    dep, svc, mon = by_kind["Deployment"], by_kind["Service"], by_kind["ServiceMonitor"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == ports
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert svc["metadata"]["name"] == "trimtab"  # the job label TrimtabControllerDown expects
    assert by_kind["PrometheusRule"]["spec"] == _rules()


def test_the_deploy_readme_documents_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            rel = path.relative_to(DEPLOY).as_posix()
            assert rel in readme or path.name in readme, rel
