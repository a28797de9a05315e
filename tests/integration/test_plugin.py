"""The plugin SDK, for real: the example package in examples/policy-plugin installed (into a
directory of its own, not the venv), found through its entry point, run live and in shadow
mode by a ``trimtab serve`` subprocess, replayed offline; and a raising plugin isolated."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trimtab.client import attach

from .support import Regression, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy-plugin"
SHIFT_AT = 300  # the data changes here: the loss leaves its band
LR0 = 0.05

RAISING = '''
from trimtab.controller.policy import Policy


class Raising(Policy):
    """A buggy third-party policy: fine for two reports, then it raises."""

    name = "raising"

    def propose(self, view):
        if view.reports_seen >= 3:
            raise RuntimeError(f"boom at step {view.step}")
        return []
'''

BAND = 'config = { rise = 0.5, min_reports = 5 }'
COMMON = """
[signals]
alpha = 0.2

[governor.lr]
cooldown_steps = 20
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The example installed with pip into its own --target directory."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    # A copy, so the build leaves no build/ or egg-info in the repository.
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True, text=True)
    (target / "raising_policy.py").write_text(RAISING)
    return target


@pytest.fixture
def plugin_env(plugin_dir, monkeypatch):
    """The install directory on sys.path here and on PYTHONPATH for subprocesses."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return plugin_dir


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimtab.controller", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def run_job(srv, job: str, stop_after_cut: bool = True, steps: int = 900,
            before_bye=lambda: None) -> list[tuple[int, float]]:
    """Train a small regression whose data shifts at SHIFT_AT; returns (step, lr) seen.
    ``before_bye`` runs while the job is still live (its metric series end with it)."""
    task = Regression(seed=3)
    opt = torch.optim.SGD(task.model.parameters(), lr=LR0, momentum=0.9)
    seen = []
    with attach(task.model, opt, job=job, endpoint=srv.endpoint, report_every=5,
                heartbeat_s=0.2) as guard:
        for i in range(steps):
            if i == SHIFT_AT:
                task.y = 4.0 * task.y + 3.0  # new data: the loss jumps and stays up a while
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            seen.append((guard.global_step, guard.knobs.lr))  # what the step ran with
            time.sleep(0.003)
            if stop_after_cut and seen[-1][1] < LR0 and i > SHIFT_AT + 40:
                break
        before_bye()
    return seen


def test_the_installed_example_is_discovered_and_listed(plugin_env):
    dists = {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(plugin_env)])}
    assert "trimtab-example-policy" in dists
    from trimtab.controller.policy import discover, load_policy

    assert discover()["example_band"].value == "trimtab_example_policy:LossEmaBand"
    assert load_policy("example_band", {"rise": 0.2}).config.rise == 0.2

    out = cli("policies")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("example_band:"))
    # Not allowed: its entry point only; its code is not imported to list it.
    assert line == ("example_band: trimtab_example_policy:LossEmaBand "
                    "[not allowed: list it in allow_plugins]")

    cfg = plugin_env / "allow.toml"
    cfg.write_text('allow_plugins = ["example_*"]\n')
    out = cli("policies", "--config", str(cfg))
    lines = out.stdout.splitlines()
    line = next(ln for ln in lines if ln.startswith("example_band:"))
    assert line.endswith("LossEmaBand (rise=0.05, cut=0.5, min_reports=10) [allowed]")
    schema = lines[lines.index(line) + 1]
    assert '"rise":{"default":0.05,"exclusiveMinimum":0.0,"maximum":10.0,"type":"number"}' \
        in schema


def test_a_plugin_not_in_allow_plugins_is_refused_at_start(plugin_env, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[policies]]\nname = "example_band"\n')
    out = cli("serve", "--config", str(cfg), "--journal", str(tmp_path / "j.db"),
              "--metrics-port", "0", "--bind", "tcp://127.0.0.1:0")
    assert out.returncode == 2
    assert ("policy 'example_band' is not allowed: besides the built-in trimtab.policies.*, "
            "only policies listed in allow_plugins load (allow_plugins = [])") in out.stderr


LIVE_AND_SHADOW = f"""
allow_plugins = ["example_band"]
safety_net = false  # the plugin alone: what it decides, live and replayed


[[policies]]
name = "example_band"
{BAND}
jobs = ["live-*"]

[[policies]]
name = "example_band"
{BAND}
shadow = true
jobs = ["shadow-*"]
""" + COMMON


def test_live_shadow_and_replay(plugin_env, serve_factory, tmp_path):
    srv = serve_factory(LIVE_AND_SHADOW)

    # Live: the plugin's decision reaches the optimizer, after the shift and not before.
    live = run_job(srv, "live-1")
    assert all(lr == LR0 for step, lr in live if step <= SHIFT_AT)
    assert live[-1][1] == pytest.approx(LR0 / 2), "example_band should have halved the LR"
    journal = srv.journal()
    (cmd, *_) = wait_for(lambda: [c for c in journal.events("live-1", "command")
                                  if "lr" in c.data["scale"]])
    assert cmd.step > SHIFT_AT and cmd.data["scale"]["lr"] == pytest.approx(0.5)
    assert any("by example_band: loss EMA" in r for r in cmd.data["reasons"])
    assert not journal.events("live-1", "shadow")

    # Shadow: journaled and counted, never sent; the LR never moves.
    scraped: list[str] = []
    shadow = run_job(srv, "shadow-1", stop_after_cut=False, steps=600,
                     before_bye=lambda: scraped.append(srv.metrics()))
    assert {lr for _, lr in shadow} == {LR0}
    events = wait_for(lambda: srv.journal().events("shadow-1", "shadow"))
    would = [e for e in events if e.data["knobs"].get("lr", {}).get("commanded")]
    assert would and would[0].step > SHIFT_AT
    assert would[0].data["shadow"] is True and would[0].data["commands"] == {}
    assert would[0].data["knobs"]["lr"]["commanded"] == pytest.approx(0.5)  # the multiplier
    assert would[0].data["knobs"]["lr"]["policy"] == "example_band"
    assert all("lr" not in c.data["scale"] for c in srv.journal().events("shadow-1", "command"))
    acks = srv.journal().events("shadow-1", "ack")
    assert all(a.data["knobs"]["lr"] == LR0 for a in acks)
    metrics = scraped[0]
    counted = [ln for ln in metrics.splitlines() if ln.startswith(
        'trimtab_shadow_decisions_total{direction="down",job="shadow-1",knob="lr",'
        'policy="example_band"}')]
    assert counted and float(counted[0].split()[-1]) >= 1
    # Nothing decided live for the shadow job: its live decision counters stay at zero
    # (they start there), and the shadow policy has none.
    live = [ln for ln in metrics.splitlines()
            if ln.startswith('trimtab_decisions_total{') and 'job="shadow-1"' in ln]
    assert live and all(ln.endswith(" 0.0") for ln in live)
    assert not any('policy="example_band"' in ln for ln in live)

    # Replay: export the live job's trace and run the plugin over it offline.
    cfg = tmp_path / "replay.toml"
    cfg.write_text(COMMON)
    trace = tmp_path / "live-1.jsonl"
    out = cli("export", "live-1", "--journal", str(srv.journal_path), "--out", str(trace))
    assert out.returncode == 0, out.stderr
    assert trace.read_text().splitlines()[0].startswith('{"kind": "register"')
    plot = tmp_path / "replay.png"
    out = cli("replay", str(trace), "--policy", "example_band", "--set", "rise=0.5",
              "--set", "min_reports=5", "--config", str(cfg), "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert "lr x1 -> x0.5 by example_band: loss EMA" in first
    _same_decision_step(first, cmd.step)
    assert "assumed applied at the next report" in out.stdout
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"

    # Replaying the shadow job from its journal gives the decision the shadow run journaled.
    out = cli("replay", str(srv.journal_path), "--job", "shadow-1", "--policy", "example_band",
              "--set", "rise=0.5", "--set", "min_reports=5", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert "lr x1 -> x0.5 by example_band" in first
    _same_decision_step(first, would[0].step)


def _same_decision_step(line: str, live_step: int) -> None:
    """Replay decides at the first report where the rule holds; live can be a report or two
    later, because no new decision is taken while an earlier command (a stable mark, say)
    awaits its ack, which a replay does not model."""
    replayed = int(line.split(":")[0].removeprefix("step "))
    assert live_step - 3 * 5 <= replayed <= live_step, (replayed, live_step)


ISOLATION = f"""
allow_plugins = ["example_band", "raising_policy:*"]
safety_net = false  # the two plugins alone

[[policies]]
name = "raising_policy:Raising"

[[policies]]
name = "example_band"
{BAND}
""" + COMMON


def test_a_raising_plugin_is_disabled_counted_and_the_other_goes_on(plugin_env, serve_factory):
    srv = serve_factory(ISOLATION)
    scraped: list[str] = []
    seen = run_job(srv, "iso-1", before_bye=lambda: scraped.append(srv.metrics()))
    assert seen[-1][1] == pytest.approx(LR0 / 2), "example_band went on after raising failed"
    journal = srv.journal()
    (err,) = wait_for(lambda: journal.events("iso-1", "policy_error"))
    assert err.data["policy"] == "raising"
    assert err.data["error"].startswith("raised RuntimeError: boom at step")
    (cmd, *_) = [c for c in journal.events("iso-1", "command") if "lr" in c.data["scale"]]
    assert cmd.step > err.step and any("by example_band" in r for r in cmd.data["reasons"])
    assert 'trimtab_policy_errors_total{job="iso-1",policy="raising"} 1.0' in scraped[0]
    assert "policy raising disabled for job iso-1: raised RuntimeError: boom" in srv.log()
