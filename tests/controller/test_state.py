"""JobState: folding reports into signals, commands and acks, and its state_dict."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics

import pytest
from pydantic import ValidationError

from tests._decide import decided
from trimtab.controller.engine import Engine
from trimtab.controller.limits import MULTIPLIERS
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.signals import ema_var, ols_slope, zscore
from trimtab.controller.state import JobState
from trimtab.controller.tracker import SignalConfig
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=100, group_sizes=[100], optimizer="AdamW",
                        dtype="float32", device="cpu")
#: The user's own values (what the loop or its scheduler set).
KNOBS = wire.Knobs(lr=1e-3, momentum=0.9, weight_decay=0.01)
#: The controlled values with nothing changed: multipliers 1.0, momentum absolute.
UNCHANGED = wire.Knobs(lr=1.0, momentum=0.9, weight_decay=1.0)


def in_force(lr: float = 1.0, weight_decay: float = 1.0, base: wire.Knobs = KNOBS,
             **absolute) -> dict:
    """``knobs`` (effective), ``base`` and ``scale`` of a report, ack or registration with
    trimtab's multipliers ``lr`` and ``weight_decay`` on the user's ``base``."""
    return {
        "knobs": base.model_copy(update={"lr": base.lr * lr,
                                         "weight_decay": base.weight_decay * weight_decay,
                                         **absolute}),
        "base": base, "scale": wire.Scale(lr=lr, weight_decay=weight_decay),
    }


def register(**over) -> wire.Register:
    return wire.Register(**{"job": "j1", "run_id": "r1", "report_every": 10,
                            "facts": FACTS, **in_force(), **over})


def report(seq: int, **over) -> wire.Report:
    return wire.Report(**{"job": "j1", "seq": seq, "step": 10 * seq, "window": 10,
                          **in_force(), **over})


def command(seq: int, controls: dict[str, float], **over) -> wire.Command:
    """A command setting ``controls`` (controlled values: multipliers for lr and wd)."""
    scale = {k: v for k, v in controls.items() if k in MULTIPLIERS}
    absolute = {k: v for k, v in controls.items() if k not in MULTIPLIERS}
    return wire.Command(job="j1", seq=seq, scale=wire.ScaleTargets(**scale),
                        knobs=wire.Knobs(**absolute), **over)


def fed(n: int, cfg: SignalConfig | None = None, seed: int = 0) -> JobState:
    rng = random.Random(seed)
    st = JobState.from_register(register(), cfg)
    for i in range(1, n + 1):
        st.observe(report(i, loss_mean=3.0 - 0.001 * i + rng.gauss(0, 0.002),
                          grad_norm_mean=1.0 + rng.gauss(0, 0.05)))
    return st


def test_register_takes_the_job_facts_and_initial_knobs():
    st = JobState.from_register(register(step=500, applied_seq=7))
    v = st.view()
    assert (v.job, v.run_id, v.step, v.report_every) == ("j1", "r1", 500, 10)
    assert v.initial == UNCHANGED and v.knobs == UNCHANGED and v.facts == FACTS
    assert v.effective == KNOBS and v.base == KNOBS and v.registered == KNOBS
    assert st.next_command_seq() == 8 and st.next_command_seq() == 9


def test_a_registration_with_a_multiplier_in_force_keeps_initial_at_one():
    # A client reconnecting with trimtab's lr multiplier 0.5 on the user's lr.
    st = JobState.from_register(register(**in_force(lr=0.5)))
    v = st.view()
    assert v.initial == UNCHANGED and v.knobs == UNCHANGED.model_copy(update={"lr": 0.5})
    assert v.effective.lr == 5e-4 and v.base == KNOBS and v.registered == KNOBS


def test_a_registration_without_a_base_takes_the_effective_values_as_the_users():
    st = JobState.from_register(register(knobs=KNOBS, base=wire.Knobs()))
    assert st.base == KNOBS and st.registered == KNOBS and st.knobs == UNCHANGED


def test_observe_folds_loss_and_grad_norm_into_the_ew_moments():
    st = JobState.from_register(register(), SignalConfig(alpha=0.5))
    for i, (loss, g) in enumerate([(2.0, 1.0), (4.0, 3.0), (3.0, 2.0)], start=1):
        st.observe(report(i, loss_mean=loss, grad_norm_mean=g))
    m = v = None
    for n, x in enumerate([2.0, 4.0, 3.0], start=1):
        m, v = ema_var(m, v, x, max(0.5, 1 / n))
    s = st.view().signals
    assert (s.loss_ema, s.loss_var) == (pytest.approx(m), pytest.approx(v))
    assert s.grad_norm_ema == pytest.approx(m - 1.0)
    assert st.view().reports_seen == 3 and st.view().step == 30


def test_early_moments_are_the_plain_running_ones_until_alpha_takes_over():
    # Seeded with one sample, a fixed-alpha EW variance starts near 0 and would make
    # the first z-scores after warm-up far too large.
    xs = [2.0, 2.4, 1.7, 2.2, 1.9]
    st = JobState.from_register(register(), SignalConfig(alpha=0.1))
    for i, x in enumerate(xs, start=1):
        st.observe(report(i, loss_mean=x))
    s = st.view().signals
    assert s.loss_ema == pytest.approx(statistics.fmean(xs))
    assert s.loss_var == pytest.approx(statistics.pvariance(xs))


def test_z_scores_wait_for_warm_up_and_use_the_history_before_the_report():
    cfg = SignalConfig(z_warmup=5, alpha=0.2)
    st = JobState.from_register(register(), cfg)
    for i in range(1, 5):
        st.observe(report(i, loss_mean=2.0 + 0.01 * (-1) ** i))
        assert st.view().signals.loss_z is None
    st.observe(report(5, loss_mean=2.0))
    before = st.view().signals
    st.observe(report(6, loss_mean=2.5))
    z = st.view().signals.loss_z
    assert z == pytest.approx(zscore(2.5, before.loss_ema, before.loss_var, cfg.eps))
    assert z > 20


def test_a_report_without_a_finite_loss_counts_but_leaves_the_loss_signals_alone():
    st = fed(12)
    before = st.view().signals
    st.observe(report(13, loss_mean=None, nonfinite_losses=3, nonfinite_grads=1,
                      grad_norm_mean=1.0))
    v = st.view()
    assert v.signals.loss_ema == before.loss_ema and v.signals.loss_z is None
    assert v.signals.slope_n == before.slope_n
    assert v.signals.grad_norm_ema != before.grad_norm_ema
    assert (v.nonfinite_losses_total, v.nonfinite_grads_total) == (3, 1)
    assert v.last.nonfinite_losses == 3


def test_the_slope_window_is_bounded_and_measures_the_trend():
    st = fed(50, SignalConfig(slope_window=20))
    s = st.view().signals
    assert (s.slope_n, s.slope_window, s.slope_since_step) == (20, 20, 310)
    pts = list(st.tracker._points)
    assert s.slope == pytest.approx(ols_slope([p[0] for p in pts], [p[1] for p in pts])[0])
    assert s.slope == pytest.approx(-1e-4, rel=0.5) and s.slope_t < -5


def test_the_view_is_frozen():
    v = fed(3).view()
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.step = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        v.last_change_step["lr"] = 5  # type: ignore[index]


def test_reports_update_knobs_in_force_and_dropped_counts():
    st = fed(2)
    st.observe(report(3, **in_force(lr=0.5), dropped_reports=4))
    assert st.view().knobs.lr == 0.5 and st.dropped_reports == 4
    assert st.view().effective.lr == 5e-4 and st.view().base.lr == 1e-3
    last = st.view().history[-1]
    assert (last.lr, last.lr_used) == (0.5, 5e-4)


def test_reports_update_the_effective_and_base_values_as_the_users_schedule_moves():
    st = fed(2)
    # The user's scheduler halved its own lr; trimtab's multiplier 0.5 is on top of that.
    moved = KNOBS.model_copy(update={"lr": 5e-4})
    st.observe(report(3, **in_force(lr=0.5, weight_decay=2.0, base=moved)))
    v = st.view()
    assert v.knobs == wire.Knobs(lr=0.5, momentum=0.9, weight_decay=2.0)
    assert v.effective == wire.Knobs(lr=2.5e-4, momentum=0.9, weight_decay=0.02)
    assert v.base == moved and v.registered == KNOBS  # registration's values are kept


def test_pending_command_ack_and_stale_ack():
    st = fed(3)
    cmd = command(st.next_command_seq(), {"lr": 0.5})
    st.pending_command = cmd
    assert st.current("lr") == 0.5 and st.view().knobs.lr == 1.0
    assert st.view().pending == wire.Knobs(lr=0.5)
    ack = wire.Ack(job="j1", seq=cmd.seq, step=40, **in_force(lr=0.5))
    assert st.on_ack(ack) is True
    assert st.pending_command is None and st.applied_seq == 1
    assert st.view().knobs == wire.Knobs(lr=0.5, momentum=0.9, weight_decay=1.0)
    assert st.view().effective.lr == 5e-4 and st.view().base == KNOBS
    old = wire.Ack(job="j1", seq=1, step=40, **in_force())
    st.applied_seq = 2
    assert st.on_ack(old) is False and st.knobs.lr == 0.5 and st.effective.lr == 5e-4


def test_an_ack_updates_the_effective_and_base_values():
    st = fed(3)
    st.pending_command = command(st.next_command_seq(), {"lr": 0.5, "momentum": 0.8})
    moved = KNOBS.model_copy(update={"lr": 2e-3})  # the user's schedule at the ack's step
    st.on_ack(wire.Ack(job="j1", seq=1, step=40, **in_force(lr=0.5, base=moved, momentum=0.8)))
    assert st.knobs == wire.Knobs(lr=0.5, momentum=0.8, weight_decay=1.0)
    assert st.effective == wire.Knobs(lr=1e-3, momentum=0.8, weight_decay=0.01)
    assert st.base == moved


def test_a_report_an_ack_overtook_does_not_put_back_the_values_it_replaced():
    """Acks go out before queued reports, so on a busy host the ack of a command applied at
    step 120 can reach the controller before the report of step 115, made before it was
    applied. That report's values are the ones the command replaced: they are not what is
    in force (seen in a real serve's journal: the decision on report 115 said "x0.512 ->
    x0.4096", a change already acked, and sent it again)."""
    st = fed(3)
    st.pending_command = command(st.next_command_seq(), {"lr": 0.5})
    st.on_ack(wire.Ack(job="j1", seq=1, step=42, **in_force(lr=0.5)))
    st.observe(report(4, step=40, applied_seq=0, **in_force(lr=1.0)))  # made before it
    assert st.knobs.lr == 0.5 and st.effective.lr == 5e-4 and st.view().knobs.lr == 0.5
    assert st.applied_seq == 1 and st.pending_command is None
    assert st.view().history[-1].lr == 1.0  # its own window ran at x1: kept as it ran
    st.observe(report(5, step=50, applied_seq=1, **in_force(lr=0.5)))
    assert st.knobs.lr == 0.5


def test_a_report_that_shows_the_command_applied_clears_it():
    st = fed(3)
    st.pending_command = command(st.next_command_seq(), {"lr": 0.5})
    st.observe(report(4, applied_seq=0))
    assert st.pending_command is not None
    st.observe(report(5, applied_seq=1, **in_force(lr=0.5)))
    assert st.pending_command is None and st.applied_seq == 1


def test_on_register_keeps_signals_and_refuses_another_run():
    st = fed(5)
    ema = st.view().signals.loss_ema
    st.on_register(register(step=55, applied_seq=3))
    assert st.step == 55 and st.applied_seq == 3 and st.next_command_seq() == 4
    st.on_register(register(step=0))
    assert st.step == 55
    assert st.view().signals.loss_ema == ema
    with pytest.raises(ValueError, match="register for j1/r2 does not match the state of j1/r1"):
        st.on_register(register(run_id="r2"))


def test_observe_refuses_another_jobs_report():
    with pytest.raises(ValueError, match="report for job 'j2'"):
        fed(1).observe(report(2, job="j2"))


class _Halve(Policy):
    name = "halve"

    def propose(self, view):
        return [Proposal("lr", factor=0.5, reason="test"), Proposal("clip", value=1.0,
                                                                    reason="turn on")]


def _busy_state() -> JobState:
    st = fed(30, SignalConfig(slope_window=8, z_warmup=3))
    # A multiplier on a user's lr its scheduler moved: effective, base, registered all differ.
    st.observe(report(31, loss_mean=None, nonfinite_losses=2, loss_last=None,
                      **in_force(lr=0.5, base=KNOBS.model_copy(update={"lr": 2e-3}))))
    d = decided(Engine([_Halve()]), st)
    st.pending_command = command(st.next_command_seq(), d.commands, reasons=d.reasons())
    st.disable("broken", "raised RuntimeError: boom")
    st.nominal_lr = 4e-3  # the lr its scheduler scales, as a registration says it
    st.lr_spread = 270.0  # its head's lr over group 0's (layer decay)
    return st


def test_state_dict_is_json_and_round_trips():
    st = _busy_state()
    sd = st.state_dict()
    text = json.dumps(sd, allow_nan=False)
    back = JobState.from_state_dict(json.loads(text))
    assert back.state_dict() == sd
    assert back.view() == st.view()
    assert (back.knobs.lr, back.effective.lr, back.base.lr, back.registered.lr) == (
        0.5, 1e-3, 2e-3, 1e-3)
    assert (back.view().nominal_lr, back.view().lr_spread) == (4e-3, 270.0)
    assert back.decision_counts == {("halve", "lr", "down"): 1, ("halve", "clip", "up"): 1}
    # Both go on identically.
    nxt = report(32, loss_mean=2.9, grad_norm_mean=1.1, applied_seq=1)
    st.observe(nxt)
    back.observe(nxt)
    assert back.state_dict() == st.state_dict()


def test_state_dict_stays_json_when_signals_overflow():
    st = JobState.from_register(register())
    for i, x in enumerate([1e300, -1e300, 1e300], start=1):
        st.observe(report(i, loss_mean=x))
    json.dumps(st.state_dict(), allow_nan=False)


def test_load_state_dict_checks_its_keys():
    sd = _busy_state().state_dict()
    del sd["step"]
    with pytest.raises(ValueError, match=r"JobState state_dict: missing keys \['step'\]"):
        JobState.from_state_dict(sd)
    sd = _busy_state().state_dict()
    sd["bogus"] = 1
    with pytest.raises(ValueError, match=r"unexpected keys \['bogus'\]"):
        JobState.from_state_dict(sd)
    sd = _busy_state().state_dict()
    sd["memory"]["lr"]["extra"] = 0
    with pytest.raises(ValueError, match=r"KnobMemory state_dict: .*unexpected keys \['extra'\]"):
        JobState.from_state_dict(sd)
    sd = _busy_state().state_dict()
    sd["version"] = 99
    with pytest.raises(ValueError, match="version 99, expected 3 to 4"):
        JobState.from_state_dict(sd)


def test_a_state_written_before_the_knob_model_is_refused():
    sd = _busy_state().state_dict()
    sd["version"] = 2
    with pytest.raises(ValueError, match=r"version 2, expected 3 to 4 \(states written before the "
                                         r"knob model cannot be resumed\)"):
        JobState.from_state_dict(sd)


def test_signal_config_is_validated():
    with pytest.raises(ValidationError, match=r"slope_windw\n  Extra inputs are not permitted"):
        SignalConfig(slope_windw=5)
    with pytest.raises(ValidationError, match=r"slope_window\n  Input should be greater than or"):
        SignalConfig(slope_window=2)
    assert math.isclose(SignalConfig().alpha, 0.05)


@pytest.mark.parametrize("level", [0, 1])
def test_after_any_rollback_the_signals_are_those_at_the_checkpoint(level):
    """A planned rollback (the end of the LR range test's sweep) or a divergence rollback:
    the moments and the slope window go back with the run to the checkpoint's step. Back
    to the start of the run, that is afresh: the start-of-run loss is no spike against
    moments the sweep (or the diverging path) left behind."""
    from trimtab.controller.rollback import RollbackConfig, RollbackRecord

    st = fed(40)
    at_200 = st.tracker._marks[200]
    assert st.view().signals.loss_ema is not None
    st.rollback.pending = RollbackRecord(400, 0, "lr_range_test" if level == 0 else "nonfinite",
                                         "test", level)
    st.on_restored(0, RollbackConfig())
    sig = st.view().signals
    assert (sig.loss_ema, sig.grad_norm_ema, sig.slope_n) == (None, None, 0)
    st.observe(report(41, step=10, loss_mean=3.0, grad_norm_mean=1.0))
    assert st.view().signals.loss_z is None
    st = fed(40)
    st.on_restored(200, RollbackConfig())
    assert st.tracker._snapshot() == at_200


def test_a_checkpoints_signal_marks_hold_no_copy_of_the_slope_window():
    """The marks a rollback rewinds to share one trail of slope points instead of a copy
    each (they were most of a long job's saved state): a long job's state stays small, and
    every mark still gives back the slope window it had."""
    import json

    st = fed(1000)
    sd = st.state_dict()
    assert len(json.dumps(sd["signal_marks"])) + len(json.dumps(sd["signal_trail"])) < 20_000
    for step in (9400, 9700, 10_000):
        expected = fed(step // 10).signals()
        back = JobState.from_state_dict(json.loads(json.dumps(sd)))
        back.tracker.rewind(step)
        assert back.signals() == expected


def test_a_state_saved_with_the_points_in_each_mark_still_rewinds():
    """A journal written before the trail: its marks carry their slope points."""
    st = fed(300)
    sd = st.state_dict()
    trail = sd.pop("signal_trail")
    for step, snap in sd["signal_marks"]:
        points = [p for p in trail if p[0] <= step][-snap[5]:] if snap[5] else []
        snap[5] = points
    back = JobState.from_state_dict(sd)
    back.tracker.rewind(2800)
    assert back.signals() == fed(280).signals()
