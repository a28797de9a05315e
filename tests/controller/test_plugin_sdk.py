"""The plugin SDK without sockets: the allow-list, shadow policies through the engine and
the service, and offline replay of a recorded trace."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from tests._decide import decided
from trimtab.controller import replay as rp
from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.controller.limits import GovernorConfig
from trimtab.controller.policy import Policy, PolicyLoadError, Proposal, is_allowed, load_policy
from trimtab.controller.state import JobState
from trimtab.protocol import wire

from .test_handler import PEER, decoded, register, report


class Cut(Policy):
    """Halve the LR once the loss goes above 2."""

    name = "cut"

    def propose(self, view):
        loss = view.last.loss_mean if view.last is not None else None
        if loss is not None and loss > 2.0:
            return [Proposal("lr", factor=0.5, reason=f"loss {loss} > 2")]
        return []


class Boom(Policy):
    name = "boom"

    def propose(self, view):
        raise RuntimeError("boom")


class NanDetail(Policy):
    """Lowers the momentum with a detail JSON cannot hold."""

    name = "nan_detail"

    def propose(self, view):
        return [Proposal("momentum", value=0.5, reason="m", detail={"x": float("nan")})]


@pytest.fixture
def sdk_module(monkeypatch):
    mod = types.ModuleType("sdk_test_policies")
    mod.Cut, mod.Boom, mod.NanDetail = Cut, Boom, NanDetail
    monkeypatch.setitem(sys.modules, "sdk_test_policies", mod)
    return mod


# -- the allow-list -------------------------------------------------------------------------


def test_built_ins_are_always_allowed_and_others_only_when_listed(sdk_module):
    assert is_allowed("plateau", [])
    assert is_allowed("trimtab.policies.plateau:Plateau", [])
    assert not is_allowed("sdk_test_policies:Cut", [])
    assert not is_allowed("trimtab.policiesx.mod:X", [])
    assert is_allowed("sdk_test_policies:Cut", ["sdk_test_policies:*"])
    with pytest.raises(PolicyLoadError, match=r"policy 'sdk_test_policies:Cut' is not allowed: "
                       r".*allow_plugins = \['other'\]"):
        load_policy("sdk_test_policies:Cut", allow=["other"])
    assert isinstance(load_policy("sdk_test_policies:Cut", allow=["sdk_test_policies:Cut"]), Cut)


def test_a_refused_plugin_is_never_imported():
    with pytest.raises(PolicyLoadError, match="is not allowed"):
        load_policy("sdk_never_imported_mod:X", allow=[])
    assert "sdk_never_imported_mod" not in sys.modules


def test_the_controller_refuses_a_plugin_not_allowed_at_start(tmp_path, sdk_module):
    cfg = ControllerConfig(policies=[PolicySpec(name="sdk_test_policies:Cut")])
    with pytest.raises(PolicyLoadError, match=r"'sdk_test_policies:Cut' is not allowed.*"
                       r"allow_plugins = \[\]"):
        Controller(cfg, Journal(":memory:"), registry=CollectorRegistry())


def test_a_name_twice_needs_jobs_on_each_entry():
    with pytest.raises(ValidationError, match="policy 'plateau' is listed 2 times"):
        ControllerConfig(policies=[{"name": "plateau"}, {"name": "plateau", "shadow": True,
                                                         "jobs": ["a*"]}])
    cfg = ControllerConfig(policies=[{"name": "plateau", "jobs": ["b*"]},
                                     {"name": "plateau", "shadow": True, "jobs": ["a*"]}],
                           safety_net=False)
    assert [s.applies_to("abc") for s in cfg.policies] == [False, True]


# -- shadow in the engine ------------------------------------------------------------------


def job(lr=0.1) -> JobState:
    facts = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD", dtype="float32",
                            device="cpu")
    return JobState.register(wire.Register(job="j", run_id="r", report_every=10, facts=facts,
                                           knobs=wire.Knobs(lr=lr)))


def feed(st, step, loss):
    """A report with ``st``'s lr multiplier in force on the user's own lr."""
    base = st.registered.lr
    st.observe(wire.Report(job="j", seq=step, step=step, window=10, loss_mean=loss,
                           knobs=wire.Knobs(lr=base * st.knobs.lr), base=wire.Knobs(lr=base),
                           scale=wire.Scale(lr=st.knobs.lr)))


def test_a_shadow_pass_uses_its_own_memory_and_never_the_live_one():
    gov = Governor(GovernorConfig(lr={"cooldown_steps": 30}))
    engine = Engine([], gov, shadow_policies=[Cut()])
    st = job()
    seen = []
    for step in range(10, 80, 10):
        feed(st, step, 3.0)
        d = decided(engine, st)
        assert d.commands == {} and d.shadowed is not None and d.shadowed.commands == {}
        seen.append(d.shadowed.would_command.get("lr"))
    # Would halve (the multiplier on the job's own lr), then waits out its cooldown in the
    # shadow memory, and again.
    assert seen == [0.5, None, None, 0.5, None, None, 0.5]
    assert st.memory["lr"].history == [] and st.last_change_step["lr"] is None
    assert st.decision_counts == {} and st.shadow_counts == {("cut", "lr", "down"): 3}
    assert st.knobs.lr == 1.0 and st.effective.lr == 0.1


def test_a_raising_shadow_policy_is_disabled_and_the_live_ones_go_on():
    engine = Engine([Cut()], Governor(), shadow_policies=[Boom()])
    st = job()
    feed(st, 10, 3.0)
    d = decided(engine, st)
    assert d.commands == {"lr": 0.5}
    assert d.shadowed.errors == (("boom", "raised RuntimeError: boom"),)
    assert "boom" in st.disabled_policies


def test_shadow_memory_and_counts_round_trip_and_a_state_without_them_is_refused():
    st = job()
    st.note_shadow("lr", "cut", 1.0, 0.5, 100)
    back = JobState.from_state_dict(st.state_dict())
    assert back.shadow_counts == {("cut", "lr", "down"): 1}
    assert back.shadow_memory["lr"].history == st.shadow_memory["lr"].history
    # States written before shadow policies existed are older than the knob model: refused.
    old = st.state_dict()
    del old["shadow_memory"], old["shadow_counts"]
    with pytest.raises(ValueError, match=r"missing keys \['shadow_counts', 'shadow_memory'\]"):
        JobState.from_state_dict(old)


# -- shadow through the service ------------------------------------------------------------


def make(tmp_path, policies) -> Controller:
    cfg = ControllerConfig(journal=str(tmp_path / "j.db"), metrics_port=0,
                           allow_plugins=["sdk_test_policies:*"], policies=policies,
                           governor={"lr": {"cooldown_steps": 0}})
    return Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())


def test_a_shadow_policy_is_journaled_and_counted_but_never_sent(tmp_path, sdk_module):
    ctl = make(tmp_path, [{"name": "sdk_test_policies:Cut", "shadow": True, "jobs": ["j*"]},
                          {"name": "sdk_test_policies:Cut", "jobs": ["other"]}])
    ctl.handle(PEER, register())
    replies = []
    for seq in range(1, 6):
        replies += decoded(ctl.handle(PEER, report(seq, loss=3.0)))
    assert not any(isinstance(m, wire.Command) and m.scale.lr is not None for m in replies)
    shadow = ctl.journal.events("j1", "shadow")
    assert len(shadow) == 5 and shadow[0].data["shadow"] is True
    assert shadow[0].data["knobs"]["lr"]["commanded"] == pytest.approx(0.5)
    assert shadow[0].data["commands"] == {}
    assert not ctl.journal.events("j1", "decision")
    text = generate_latest(ctl.metrics.registry).decode()
    assert ('trimtab_shadow_decisions_total{direction="down",job="j1",knob="lr",'
            'policy="cut"} 5.0') in text
    # Nothing was decided live: every live decision counter is at zero (they start there).
    live = [ln for ln in text.splitlines() if ln.startswith("trimtab_decisions_total{")]
    assert live and all(ln.endswith(" 0.0") for ln in live)
    assert not any('policy="cut"' in ln for ln in live)  # a shadow policy has no live series


def test_the_same_plugin_is_live_for_the_jobs_its_entry_names(tmp_path, sdk_module):
    ctl = make(tmp_path, [{"name": "sdk_test_policies:Cut", "shadow": True, "jobs": ["x*"]},
                          {"name": "sdk_test_policies:Cut", "jobs": ["j*"]}])
    ctl.handle(PEER, register())
    (cmd,) = decoded(ctl.handle(PEER, report(1, loss=3.0)))
    assert isinstance(cmd, wire.Command) and cmd.scale.lr == pytest.approx(0.5)
    assert not ctl.journal.events("j1", "shadow")


def test_a_raising_plugin_is_isolated_through_the_service(tmp_path, sdk_module):
    ctl = make(tmp_path, [{"name": "sdk_test_policies:Boom"}, {"name": "sdk_test_policies:Cut"}])
    ctl.handle(PEER, register())
    (cmd,) = decoded(ctl.handle(PEER, report(1, loss=3.0)))
    assert cmd.scale.lr == pytest.approx(0.5)
    (err,) = ctl.journal.events("j1", "policy_error")
    assert err.data == {"policy": "boom", "error": "raised RuntimeError: boom"}
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_policy_errors_total{job="j1",policy="boom"} 1.0' in text


def test_a_plugins_unwritable_detail_is_a_policy_error_and_every_command_sent_is_journaled(
        tmp_path, sdk_module):
    ctl = make(tmp_path, [{"name": "sdk_test_policies:NanDetail"},
                          {"name": "sdk_test_policies:Cut"}])
    ctl.handle(PEER, register())
    (cmd,) = decoded(ctl.handle(PEER, report(1, loss=3.0)))
    assert cmd.scale.lr == pytest.approx(0.5) and cmd.knobs.momentum is None
    (err,) = ctl.journal.events("j1", "policy_error")
    assert err.data["policy"] == "nan_detail" and "detail must be JSON" in err.data["error"]
    (sent,) = ctl.journal.events("j1", "command")
    assert sent.seq == cmd.seq
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'trimtab_policy_errors_total{job="j1",policy="nan_detail"} 1.0' in text


# -- replay --------------------------------------------------------------------------------


def recorded(tmp_path) -> str:
    """A journal with one job's trace, recorded by a controller with no policies."""
    ctl = make(tmp_path, [])
    ctl.handle(PEER, register())
    for seq, loss in enumerate([1.0, 1.0, 3.0, 3.0, 1.0], 1):
        ctl.handle(PEER, report(seq, loss=loss))
    ctl.close()
    return str(tmp_path / "j.db")


def test_export_and_replay_rebuild_the_job_and_print_decisions(tmp_path, sdk_module):
    path = recorded(tmp_path)
    trace = rp.trace_records(Journal(path), "j1")
    assert [r.kind for r in trace] == ["register"] + ["report"] * 5
    assert trace[0].data["report_every"] == 10
    out = tmp_path / "t.jsonl"
    with open(out, "w") as f:
        assert rp.write_trace(trace, f) == 6
    again = rp.read_trace(out)
    assert again == rp.read_trace(path) == trace
    result = rp.replay(again, [Cut()], ControllerConfig(governor={"lr": {"cooldown_steps": 0}}))
    # The lr as trimtab's multiplier on the job's own lr (0.1).
    assert result.lines() == ["step 30: lr x1 -> x0.5 by cut: loss 3.0 > 2",
                              "step 40: lr x0.5 -> x0.25 by cut: loss 3.0 > 2"]
    # Each commanded multiplier is in force from the next report on: the lr it gives.
    assert [p.knobs["lr"] for p in result.points] == [0.1, 0.1, 0.1, 0.05, 0.025]
    assert [p.recorded["lr"] for p in result.points] == [0.1] * 5


def test_replay_holds_a_policy_to_the_live_time_budget(tmp_path):
    """A trial: a policy sleeping 3 s per call was disabled live (policy_budget_ms 1000)
    but replayed inline for three minutes, and a slow policy's proposals would have been
    decisions in replay that live never made."""
    import time as _time

    class Slow(Cut):
        name = "slow"

        def propose(self, view):
            _time.sleep(0.3)
            return super().propose(view)

    trace = rp.trace_records(Journal(recorded(tmp_path)), "j1")
    result = rp.replay(trace, [Slow()], ControllerConfig(policy_budget_ms=50))
    (first,) = result.decisions
    ((who, why),) = first.errors
    assert who == "slow" and "time budget of 50 ms" in why, why
    assert not first.commands
    inline = rp.replay(trace, [Slow()], ControllerConfig(policy_budget_ms=0,
                                                         governor={"lr": {"cooldown_steps": 0}}))
    assert [d.errors for d in inline.decisions] == [(), ()]


def test_replay_rebuilds_what_the_registration_said_of_the_clients_checkpoints():
    """A replayed job knows how many checkpoints its client keeps, the lr its scheduler
    scales, its param groups' lr spread, whether its loss is expected to fall and whether
    its optimizer had stepped, as the live one did, so a policy that reads them (the range
    test's return and its evidence, a schedule with an absolute lr) decides the same."""
    seen = []

    class Keeps(Policy):
        name = "keeps"

        def propose(self, view):
            seen.append((view.checkpoint_keep, view.nominal_lr, view.lr_spread,
                         view.loss_trend, view.warm_start))
            return []

    facts = {"param_count": 1, "group_sizes": [1], "optimizer": "SGD", "dtype": "float32",
             "device": "cpu"}
    told = {"keep": 3, "nominal_lr": 0.5, "lr_spread": 270.0, "loss_trend": False,
            "warm_start": True}
    for said, expect in ((told, (3, 0.5, 270.0, False, True)),
                         ({}, (None, None, 1.0, True, False))):
        seen.clear()
        register = {"job": "j", "run_id": "r", "facts": facts, "knobs": {"lr": 0.1},
                    "report_every": 10, **said}
        trace = [rp.TraceRecord("register", 0, None, register)]
        trace += [rp.TraceRecord("report", s, s // 10, {"step": s, "window": 10,
                                                        "loss_mean": 1.0, "knobs": {"lr": 0.1}})
                  for s in (10, 20)]
        rp.replay(trace, [Keeps()])
        assert seen == [expect, expect]


def test_replay_errors_name_the_problem(tmp_path):
    with pytest.raises(rp.TraceError, match="--set expects key=value, got 'rise'"):
        rp.parse_sets(["rise"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "report"}\n')
    with pytest.raises(rp.TraceError, match=r"bad.jsonl:1: not a trace line \(KeyError"):
        rp.read_trace(bad)
    with pytest.raises(rp.TraceError, match=r"no job 'nope' in journal .* \(jobs in it: j1\)"):
        rp.read_trace(recorded(tmp_path), "nope")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimtab.controller", *args],
                          capture_output=True, text=True, timeout=60)


def test_replay_cli_validates_set_values_naming_the_key(tmp_path):
    out = cli("replay", recorded(tmp_path), "--policy", "plateau", "--set", "t_crit=abc")
    assert out.returncode == 2
    assert "policy 'plateau': bad config: t_crit='abc': Input should be a valid number" \
        in out.stderr


def test_export_then_replay_cli_with_a_plot(tmp_path):
    path = recorded(tmp_path)
    trace, png = tmp_path / "t.jsonl", tmp_path / "p.png"
    assert cli("export", "j1", "--journal", path, "--out", str(trace)).returncode == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text("[governor.lr]\ncooldown_steps = 0\n")
    out = cli("replay", str(trace), "--policy", "spike_guard", "--set", "z_threshold=1.5",
              "--config", str(cfg), "--plot", str(png), "--holds")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2].startswith("# spike_guard on j1: ")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_replay_shows_what_the_governor_held_with_holds_and_counts_only_changes(tmp_path):
    """``--holds`` prints the wishes a hold or the governor kept (before, such a decision
    was dropped and the flag printed nothing more); the summary counts changes, and a
    policy disabled is said as such, not counted as a decision."""
    path = recorded(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[governor.lr]\ncooldown_steps = 50\n")
    out = cli("replay", path, "--policy", "tests.controller.test_plugin_sdk:Cut",
              "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    plain = out.stdout.splitlines()
    assert plain[0] == "step 30: lr x1 -> x0.5 by cut: loss 3.0 > 2" and len(plain) == 2
    assert plain[1].startswith("# cut on j1: 1 decisions, 1 held over 5 reports"), plain
    out = cli("replay", path, "--policy", "tests.controller.test_plugin_sdk:Cut",
              "--config", str(cfg), "--holds")
    lines = out.stdout.splitlines()
    assert lines[0] == plain[0]
    assert lines[1] == "step 40: lr held at x0.5, wanted x0.25 by cut: loss 3.0 > 2 " \
        "[limited: cooldown]", lines
    assert lines[2].startswith("# cut on j1: 1 decisions, 1 held over 5 reports"), lines
    out = cli("replay", path, "--policy", "tests.controller.test_plugin_sdk:Boom")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step 10: policy boom disabled: "), lines
    assert lines[1].startswith("# boom on j1: 0 decisions, 1 policies disabled over"), lines


def test_the_plot_does_not_join_a_rolled_back_path_to_the_one_it_returned_to(
        tmp_path, monkeypatch):
    """A plugin trial: `replay --plot` drew one line through the recorded reports, so after
    a rollback the loss at step 180 was joined to the restored run's at step 110. Each line
    now only goes forward in steps; the path left is drawn apart, faint."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from trimtab.controller.replay import ReplayPoint, ReplayResult, plot

    steps = [10, 20, 30, 40, 50, 60, 30, 40, 50, 60, 70]
    result = ReplayResult(job="j", points=[
        ReplayPoint(step=s, loss=1.0 / (i + 1), grad_norm=1.0, knobs={"lr": 0.1},
                    recorded={"lr": 0.1}) for i, s in enumerate(steps)])
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    plot(result, tmp_path / "p.png")
    lines = [line for ax in figs[0].axes for line in ax.get_lines()
             if len(line.get_xdata()) > 1]
    assert lines
    for line in lines:
        xs = list(line.get_xdata())
        assert all(b > a for a, b in zip(xs[:-1], xs[1:], strict=True)), (line.get_label(), xs)
    faint = [line for line in lines if line.get_alpha() == 0.3]
    # loss, grad norm, lr replayed and recorded: each has the abandoned 20..60 drawn apart
    assert sorted(list(line.get_xdata()) for line in faint) == [[20, 30, 40, 50, 60]] * 4
    kept = [line for line in figs[0].axes[0].get_lines() if line.get_label() == "loss"]
    assert list(kept[0].get_xdata()) == [10, 20, 30, 40, 50, 60, 70]
    plt.close(figs[0])
