"""The controller's Prometheus metrics, driven with frames through a real Controller."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from trimtab.controller.config import ControllerConfig, PolicySpec
from trimtab.controller.governor import LIMIT_NAMES
from trimtab.controller.handler import Controller
from trimtab.controller.health import CAUSES
from trimtab.controller.journal import Journal
from trimtab.controller.policy import Policy, Proposal
from trimtab.protocol import wire

PEER = b"peer-1"
HERE = "tests.controller.test_metrics"


class Seesaw(Policy):
    """Asks for the LR multiplier x0.01 when it is at or above its initial 1.0, else x100."""

    name = "seesaw"

    def propose(self, view):
        up = view.knobs.lr < view.initial.lr
        return [Proposal("lr", factor=100.0 if up else 0.01, reason="seesaw")]


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path, policies=("spike_guard",)) -> tuple[Controller, Clock]:
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"),
        metrics_port=0,
        job_timeout_s=12.0,
        allow_plugins=[f"{HERE}:*"],
        policies=[PolicySpec(name=n) for n in policies],
        governor={"lr": {"min_rel": 1e-3, "max_rel": 10, "max_step_ratio": 2}},
    )
    clock = Clock()
    ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry(), clock=clock)
    facts = wire.ScaleFacts(
        param_count=100, group_sizes=[100], optimizer="SGD", dtype="float32", device="cpu"
    )
    reg = wire.Register(job="j", run_id="r", report_every=10, facts=facts, **in_force())
    ctl.handle(PEER, wire.encode(reg))
    return ctl, clock


def in_force(lr: float = 1.0, base_lr: float = 0.1) -> dict:
    """``knobs`` (effective), ``base`` and ``scale`` with trimtab's lr multiplier ``lr`` on
    the user's own ``base_lr``."""
    return {"knobs": wire.Knobs(lr=base_lr * lr, momentum=0.9),
            "base": wire.Knobs(lr=base_lr, momentum=0.9), "scale": wire.Scale(lr=lr)}


def report(seq: int, lr: float = 1.0, loss: float = 1.0, applied_seq: int = 0,
           base_lr: float = 0.1, replica_spread: float | None = None) -> bytes:
    return wire.encode(
        wire.Report(
            job="j",
            seq=seq,
            step=10 * seq,
            window=10,
            loss_mean=loss,
            grad_norm_mean=2.0,
            grad_norm_max=3.5,
            grad_norm_std=0.25,
            update_ratio=1e-3,
            step_time_s=0.02,
            nonfinite_grads=1 if seq == 2 else 0,
            dropped_reports=seq // 3,
            applied_seq=applied_seq,
            replica_spread=replica_spread,
            **in_force(lr, base_lr),
        )
    )


def sample(ctl: Controller, name: str, **labels: str) -> float | None:
    text = generate_latest(ctl.metrics.registry).decode()
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
            return float(m.group(2))
    return None


def test_every_signal_of_the_last_report_is_a_job_series(tmp_path):
    ctl, clock = make(tmp_path)
    for seq in range(1, 16):
        ctl.handle(PEER, report(seq, loss=2.0 - 0.1 * seq))
    clock.t += 2.5
    state = ctl.jobs["j"]
    sig = state.signals()
    want = {
        "trimtab_job_loss": 0.5,
        "trimtab_job_grad_norm": 2.0,
        "trimtab_job_grad_norm_max": 3.5,
        "trimtab_job_grad_norm_std": 0.25,
        "trimtab_job_update_ratio": 1e-3,
        "trimtab_job_step_time_seconds": 0.02,
        "trimtab_job_step": 150.0,
        "trimtab_job_last_seen_age_seconds": 2.5,
        "trimtab_job_healthy": 1.0,
        "trimtab_job_reports_total": 15.0,
        "trimtab_job_dropped_reports_total": 5.0,
        "trimtab_job_loss_slope": sig.slope,
        "trimtab_job_loss_slope_t": sig.slope_t,
        "trimtab_job_loss_ema": sig.loss_ema,
    }
    for name, value in want.items():
        assert sample(ctl, name, job="j") == pytest.approx(value), name
    assert sig.slope == pytest.approx(-0.01)
    assert sample(ctl, "trimtab_job_zscore", job="j", signal="loss") == pytest.approx(sig.loss_z)
    assert sample(ctl, "trimtab_job_zscore", job="j", signal="grad_norm") is not None
    assert sample(ctl, "trimtab_job_nonfinite_total", job="j", kind="grad") == 1.0
    # Every report's handling is timed, not only those that brought a command (7 of 15
    # here: the fleet's latency panel was empty in any window without one).
    assert sample(ctl, "trimtab_decision_latency_seconds_count") == 15.0


def test_the_replicas_spread_is_a_job_series_where_the_ranks_compare_it(tmp_path):
    ctl, _ = make(tmp_path)
    ctl.handle(PEER, report(1))
    assert sample(ctl, "trimtab_job_replica_spread", job="j") is None  # one process
    ctl.handle(PEER, report(2, replica_spread=0.0))
    assert sample(ctl, "trimtab_job_replica_spread", job="j") == 0.0
    ctl.handle(PEER, report(3, replica_spread=0.25))
    assert sample(ctl, "trimtab_job_replica_spread", job="j") == 0.25


def test_knob_bounds_are_the_governors_for_the_job(tmp_path):
    ctl, _ = make(tmp_path)
    gov = ctl.engine_for("j").governor  # the job's own, with limits derived from its scale
    assert gov is not ctl.engine.governor
    # For the lr, the bounds of what the governor steers: the multiplier (initial 1.0).
    for knob, initial in (("lr", 1.0), ("momentum", 0.9)):
        lo, hi = gov.bounds(knob, initial)
        assert sample(ctl, "trimtab_knob_bound", job="j", knob=knob, side="lower") == lo
        assert sample(ctl, "trimtab_knob_bound", job="j", knob=knob, side="upper") == hi
    assert sample(ctl, "trimtab_knob_bound", job="j", knob="lr", side="lower") == 1e-3
    assert sample(ctl, "trimtab_knob_bound", job="j", knob="lr", side="upper") == 10.0
    # clip is off (no value in force): no bounds drawn for it.
    assert sample(ctl, "trimtab_knob_bound", job="j", knob="clip", side="upper") is None


def test_knob_series_are_the_effective_value_the_users_base_and_the_multiplier(tmp_path):
    ctl, _ = make(tmp_path)
    # The user's scheduler moved its lr to 0.08; trimtab's multiplier 0.5 is on top of it.
    ctl.handle(PEER, report(1, lr=0.5, base_lr=0.08))
    assert sample(ctl, "trimtab_knob_value", job="j", knob="lr") == pytest.approx(0.04)
    assert sample(ctl, "trimtab_knob_base", job="j", knob="lr") == 0.08
    assert sample(ctl, "trimtab_knob_multiplier", job="j", knob="lr") == 0.5
    # Momentum is absolute: a value and a base, no multiplier; clip is off: no series.
    assert sample(ctl, "trimtab_knob_value", job="j", knob="momentum") == 0.9
    assert sample(ctl, "trimtab_knob_base", job="j", knob="momentum") == 0.9
    assert sample(ctl, "trimtab_knob_multiplier", job="j", knob="momentum") is None
    assert sample(ctl, "trimtab_knob_value", job="j", knob="clip") is None
    assert sample(ctl, "trimtab_knob_base", job="j", knob="clip") is None
    # The optimizer has no weight decay: no multiplier series for it either.
    assert sample(ctl, "trimtab_knob_multiplier", job="j", knob="weight_decay") is None


def test_governor_clamps_and_knob_reversals_are_counted_and_end_with_the_job(tmp_path):
    ctl, clock = make(tmp_path, policies=(f"{HERE}:Seesaw",))
    lr, seq, applied = 1.0, 0, 0  # trimtab's lr multiplier
    for _ in range(4):
        seq += 1
        (frame,) = [f for _, f in ctl.handle(PEER, report(seq, lr=lr, applied_seq=applied))]
        cmd = wire.decode(frame)
        lr, applied = cmd.scale.lr, cmd.seq
        ctl.handle(PEER, wire.encode(wire.Ack(job="j", seq=cmd.seq, step=10 * seq,
                                              **in_force(lr))))
        assert sample(ctl, "trimtab_knob_multiplier", job="j", knob="lr") == lr
    # x0.01 and x100 are both cut to the governor's x2 per decision: down, up, down, up.
    assert lr == pytest.approx(1.0)
    assert (
        sample(ctl, "trimtab_governor_clamps_total", job="j", knob="lr", limit="max_step_ratio")
        == 4.0
    )
    assert sample(ctl, "trimtab_knob_reversals_total", job="j", knob="lr") == 3.0
    assert sample(ctl, "trimtab_knob_reversals_total", job="j", knob="momentum") == 0.0
    ctl.handle(PEER, wire.encode(wire.Bye(job="j", step=50)))
    # Ended: the series stay through the metrics grace (a scrape sees the end), then go.
    assert sample(ctl, "trimtab_knob_reversals_total", job="j", knob="lr") == 3.0
    assert sample(ctl, "trimtab_job_live", job="j") == 0.0
    clock.t += ctl.config.metrics_grace_s + 1
    ctl.tick()
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'job="j"' not in text
    assert ctl.metrics.collector.clamps == {} and ctl.metrics.collector.reversals == {}


def test_known_label_values_start_at_zero(tmp_path):
    ctl, _ = make(tmp_path)
    for code in wire.ERROR_CODES:
        assert sample(ctl, "trimtab_message_errors_total", code=code) == 0.0
    assert sample(ctl, "trimtab_rejected_peers_total", reason="handshake") == 0.0
    for cause in CAUSES:  # so that the first rollback is an increase, not a new series
        assert sample(ctl, "trimtab_rollbacks_total", job="j", reason=cause) == 0.0


def test_a_jobs_decision_and_clamp_counters_start_at_zero(tmp_path):
    """A decision, a governor clamp or a shadow decision counted for the first time showed
    on no dashboard: its series was born at 1, and increase() has no sample before it.
    Each policy of the job, the governor and a person (manual) start at zero on every knob
    in force, both ways, as does each governor limit; a knob not in force has none."""
    ctl, _ = make(tmp_path, policies=(f"{HERE}:Seesaw",))
    for policy in ("seesaw", "governor", "manual"):
        for direction in ("up", "down"):
            for knob in ("lr", "momentum"):
                assert sample(ctl, "trimtab_decisions_total", job="j", policy=policy,
                              knob=knob, direction=direction) == 0.0, (policy, knob)
    for limit in LIMIT_NAMES:
        assert sample(ctl, "trimtab_governor_clamps_total", job="j", knob="lr",
                      limit=limit) == 0.0
    assert sample(ctl, "trimtab_decisions_total", job="j", policy="seesaw", knob="clip",
                  direction="down") is None
    (frame,) = [f for _, f in ctl.handle(PEER, report(1))]
    cmd = wire.decode(frame)
    assert sample(ctl, "trimtab_decisions_total", job="j", policy="seesaw", knob="lr",
                  direction="down" if cmd.scale.lr < 1 else "up") == 1.0
    assert sample(ctl, "trimtab_governor_clamps_total", job="j", knob="lr",
                  limit="max_step_ratio") == 1.0


def test_a_new_run_of_a_job_inherits_no_direction_its_first_change_is_no_reversal(tmp_path):
    """Run 1 moves the lr down, then up (one reversal); run 2 of the same job name starts
    afresh and moves it down: no reversal of run 1's last move (it counted one, and
    TrimtabDecisionChurn counts those)."""
    ctl, _ = make(tmp_path, policies=(f"{HERE}:Seesaw",))
    lr, applied = 1.0, 0
    for seq in (1, 2):
        (frame,) = [f for _, f in ctl.handle(PEER, report(seq, lr=lr, applied_seq=applied))]
        cmd = wire.decode(frame)
        lr, applied = cmd.scale.lr, cmd.seq
        ctl.handle(PEER, wire.encode(wire.Ack(job="j", seq=cmd.seq, step=10 * seq,
                                              **in_force(lr))))
    assert sample(ctl, "trimtab_knob_reversals_total", job="j", knob="lr") == 1.0
    facts = wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="SGD",
                            dtype="float32", device="cpu")
    ctl.handle(PEER, wire.encode(wire.Register(job="j", run_id="r2", report_every=10,
                                               facts=facts, **in_force())))
    (frame,) = [f for _, f in ctl.handle(PEER, report(1))]
    assert wire.decode(frame).scale.lr < 1.0  # down, after run 1's last move up
    assert sample(ctl, "trimtab_knob_reversals_total", job="j", knob="lr") == 1.0
