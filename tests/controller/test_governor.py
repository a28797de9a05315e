"""The governor: each limit alone, then a property test over arbitrary proposal streams."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from trimtab.controller.governor import Governed, Governor, KnobMemory
from trimtab.controller.limits import GovernorConfig, KnobLimits

NAN, INF = math.nan, math.inf


def gov(**lr) -> Governor:
    """A governor whose lr has only the given limits."""
    return Governor(GovernorConfig(lr=KnobLimits(**lr)))


def changed(g: Governor, mem: KnobMemory, cur: float, value: float, step: int) -> None:
    """Record a sent change, as the engine does."""
    mem.record(step, cur, value, g.limits("lr").slew_window_steps)


# -- config -----------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    c = GovernorConfig()
    assert (c.lr.min_rel, c.lr.max_rel, c.lr.max_step_ratio) == (1e-3, 10.0, 2.0)
    assert (c.lr.slew_ratio, c.lr.slew_window_steps) == (4.0, 1000)
    assert (c.lr.cooldown_steps, c.lr.deadband) == (50, 0.01)
    assert (c.momentum.min, c.momentum.max) == (0.0, 0.999)
    # lr and weight decay are multipliers on the user's own values: relative bounds only.
    assert (c.weight_decay.min_rel, c.weight_decay.max_rel) == (0.0, 10.0)
    assert (c.lr.min, c.lr.max, c.weight_decay.min, c.weight_decay.max) == (None,) * 4
    assert (c.clip.min, c.clip.max) == (1e-6, 1e6)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"min": 2.0, "max": 1.0}, r"min=2.0 is above max=1.0"),
        ({"min_rel": 5.0, "max_rel": 1.0}, r"min_rel=5.0 is above max_rel=1.0"),
        ({"max_step_ratio": 0.5}, r"max_step_ratio\n  Input should be greater than or equal to 1"),
        ({"slew_ratio": math.inf}, r"slew_ratio\n  Input should be a finite number"),
        ({"deadband": 1.5}, r"deadband\n  Input should be less than 1"),
        ({"max_step": 2}, r"max_step\n  Extra inputs are not permitted"),
    ],
)
def test_bad_limits_name_the_field(bad, match):
    with pytest.raises(ValidationError, match=match):
        KnobLimits(**bad)


def test_config_refuses_unknown_knobs():
    with pytest.raises(ValidationError, match=r"learning_rate\n  Extra inputs"):
        GovernorConfig(learning_rate={})


@pytest.mark.parametrize(
    ("knob", "field", "value"),
    [("lr", "min", 1e-5), ("weight_decay", "min", 0.0), ("weight_decay", "max", 0.05)],
)
def test_config_refuses_absolute_bounds_on_a_multiplier_naming_the_field(knob, field, value):
    with pytest.raises(ValidationError, match=(
            rf"governor\.{knob}\.{field} = {value!r}: {knob} is steered as a multiplier on "
            rf"your own {knob}.*bound the multiplier with min_rel / max_rel")):
        GovernorConfig(**{knob: {field: value}})


def test_the_lr_max_is_allowed_and_caps_the_effective_lr_not_the_multiplier():
    g = Governor(GovernorConfig(lr=KnobLimits(max=1e-2, max_rel=10.0)))
    assert g.limits("lr").max == 1e-2
    assert g.bounds("lr", 1.0) == (0.0, 10.0)
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 8.0, 0) == Governed(8.0, ())


# -- each limit -------------------------------------------------------------------------


def test_relative_and_absolute_bounds():
    # The lr multiplier (1.0 at registration) within [min_rel, max_rel].
    out = gov(min_rel=0.1, max_rel=10).govern("lr", KnobMemory(), 1.0, 1.0, 1000.0, 0)
    assert out == Governed(pytest.approx(10.0), ("bounds",))
    bare = Governor(GovernorConfig(momentum=KnobLimits(min=0.0, max=0.999, allow_zero=True)))
    out = bare.govern("momentum", KnobMemory(), 0.9, 0.9, 1.5, 0)
    assert out == Governed(0.999, ("bounds",))


def test_the_momentums_step_and_slew_are_ratios_of_the_steps_a_gradient_is_averaged_over():
    """A plugin's trial: momentum 0.9 -> 0.999 in one decision (about 100x the effective step
    of SGD) by default. The ratios are taken on 1 / (1 - momentum): 0.9 -> 0.95 at most."""
    g, mem = Governor(), KnobMemory()
    assert g.govern("momentum", mem, 0.9, 0.9, 0.999, 100) == Governed(
        pytest.approx(0.95), ("max_step_ratio",))
    assert g.govern("momentum", mem, 0.9, 0.9, 0.0, 100) == Governed(
        pytest.approx(0.8), ("max_step_ratio",))
    assert g.govern("momentum", mem, 0.9, 0.9, 0.92, 100) == Governed(0.92, ())
    mem.record(100, 0.9, 0.95, 1000)
    mem.record(200, 0.95, 0.975, 1000)  # 10 -> 40 steps: the window's 4x
    assert g.govern("momentum", mem, 0.975, 0.9, 0.99, 300) == Governed(None, ("slew",))


def test_absolute_bounds_beat_relative_ones_that_lie_outside_them():
    g = Governor(GovernorConfig(clip=KnobLimits(min=1.0, max=5.0, min_rel=10.0)))
    assert g.bounds("clip", 1.0) == (5.0, 5.0)


def test_a_knob_found_outside_its_bounds_is_brought_inside_whatever_else_applies():
    g = gov(min_rel=0.1, max_rel=10, max_step_ratio=2, cooldown_steps=100)
    mem = KnobMemory(last_change_step=10)
    # In cooldown, asked to go further up, and far from the bound: bounds still win.
    assert g.govern("lr", mem, 1000.0, 1.0, 2000.0, 20) == Governed(10.0, ("bounds",))
    assert g.govern("lr", mem, 1e-3, 1.0, NAN, 20) == Governed(0.1, ("bounds",))


def test_max_step_ratio_either_way():
    g = gov(max_step_ratio=2)
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 10.0, 0) == Governed(2.0, ("max_step_ratio",))
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 0.01, 0) == Governed(0.5, ("max_step_ratio",))
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 1.5, 0) == Governed(1.5, ())


def test_slew_over_a_window_counts_the_value_in_force_at_its_start():
    g = gov(slew_ratio=4, slew_window_steps=100)
    mem = KnobMemory()
    assert g.govern("lr", mem, 1.0, 1.0, 3.0, 0).value == 3.0
    changed(g, mem, 1.0, 3.0, 0)
    # 1.0 was in force when the window opened, so at most 4.0 until it leaves the window.
    assert g.govern("lr", mem, 3.0, 1.0, 9.0, 50) == Governed(4.0, ("slew",))
    changed(g, mem, 3.0, 4.0, 50)
    assert g.govern("lr", mem, 4.0, 1.0, 9.0, 99) == Governed(None, ("slew",))
    # At step 100 the change from 1.0 at step 0 is out; 3.0 was in force at the window start.
    assert g.govern("lr", mem, 4.0, 1.0, 20.0, 100) == Governed(12.0, ("slew",))


def test_a_change_never_goes_the_other_way_from_the_one_asked():
    """The value in force left the slew range on its own (a user's schedule, a client-side
    sweep took it to 0.18 while 1.0 is in the window): a cut asked from there must not come
    out as a raise to the range's floor (0.25); nothing is sent instead."""
    g = gov(slew_ratio=4, slew_window_steps=1000)
    mem = KnobMemory()
    changed(g, mem, 1.0, 0.5, 0)
    assert g.govern("lr", mem, 0.18, 1.0, 0.09, 100) == Governed(None, ("slew",))
    # Toward the range it may move, as far as the range allows.
    assert g.govern("lr", mem, 0.18, 1.0, 0.4, 100) == Governed(0.4, ())


def test_cooldown():
    g = gov(cooldown_steps=50)
    mem = KnobMemory()
    changed(g, mem, 1.0, 0.5, 100)
    assert g.govern("lr", mem, 0.5, 1.0, 0.25, 149) == Governed(None, ("cooldown",))
    assert g.govern("lr", mem, 0.5, 1.0, 0.25, 150) == Governed(0.25, ())


def test_deadband():
    g = gov(deadband=0.01)
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 1.005, 0) == Governed(None, ("deadband",))
    assert g.govern("lr", KnobMemory(), 1.0, 1.0, 1.02, 0) == Governed(1.02, ())


def test_hysteresis_drops_small_reversals_inside_the_window_only():
    g = gov(reversal_window_steps=200, reversal_min_change=0.2)
    mem = KnobMemory()
    changed(g, mem, 1.0, 2.0, 100)
    assert g.govern("lr", mem, 2.0, 1.0, 1.8, 300) == Governed(None, ("hysteresis",))
    assert g.govern("lr", mem, 2.0, 1.0, 1.5, 300) == Governed(1.5, ())
    assert g.govern("lr", mem, 2.0, 1.0, 2.2, 300) == Governed(2.2, ())  # same direction
    assert g.govern("lr", mem, 2.0, 1.0, 1.8, 301) == Governed(1.8, ())  # window over


@pytest.mark.parametrize("target", [NAN, INF, -INF, -1.0, 0.0, "0.1", None])
def test_invalid_targets_are_refused(target):
    assert Governor().govern("lr", KnobMemory(), 1.0, 1.0, target, 0) == Governed(
        None, ("invalid",)
    )


def test_zero_is_a_valid_target_where_allowed():
    bare = Governor(GovernorConfig(momentum=KnobLimits(min=0.0, max=0.999, allow_zero=True)))
    assert bare.govern("momentum", KnobMemory(), 0.9, 0.9, 0.0, 0) == Governed(0.0, ())
    # By default in steps: 1 / (1 - m) at most halves per decision (see below).
    assert Governor().govern("momentum", KnobMemory(), 0.6, 0.9, 0.0, 0) == Governed(
        pytest.approx(0.2), ("max_step_ratio",))


def test_a_knob_with_no_value_in_force_takes_an_absolute_target_within_bounds():
    g = Governor()
    assert g.govern("clip", KnobMemory(), None, None, 1e9, 0) == Governed(1e6, ("bounds",))
    assert g.govern("clip", KnobMemory(), None, None, 5.0, 0) == Governed(5.0, ())


def test_a_zero_initial_value_pins_relative_bounds_at_zero():
    # 10 x 0 is 0: a knob with relative bounds that started at zero stays there.
    g = Governor(GovernorConfig(clip=KnobLimits(min_rel=0.5, max_rel=10.0)))
    assert g.bounds("clip", 0.0) == (0.0, 0.0)
    assert Governor().bounds("clip", None) == (1e-6, 1e6)


def test_the_weight_decay_multiplier_is_bounded_relative_to_one():
    # Its initial is the multiplier 1.0 (the user's own weight decay); a decay that started
    # off stays off on the client, where the multiplier scales a zero.
    assert Governor().bounds("weight_decay", 1.0) == (0.0, 10.0)


def test_memory_state_dict_round_trip_and_key_check():
    mem = KnobMemory()
    mem.record(10, 1.0, 2.0, 100)
    mem.record(200, 2.0, 1.5, 100)
    sd = mem.state_dict()
    other = KnobMemory()
    other.load_state_dict(sd)
    assert other == mem and other.last_direction == -1
    with pytest.raises(ValueError, match=r"missing keys \['history'\], unexpected keys \['h'\]"):
        other.load_state_dict({"h": [], "last_change_step": 1, "last_direction": 0})


def test_memory_keeps_only_the_slew_window_and_the_value_in_force_at_its_start():
    mem = KnobMemory()
    mem.record(0, 1.0, 2.0, 100)
    mem.record(60, 2.0, 3.0, 100)
    mem.record(200, 3.0, 4.0, 100)
    assert mem.history == [(60, 3.0), (200, 4.0)]


def test_after_a_rollback_the_slew_window_still_holds_what_ran_before_the_checkpoint():
    """A plugin's trial: raises to x2 at 30, x4 at 90 (the checkpoint at 900 ran at x4), x8
    at 1030, x16 at 1090; a rollback to 900 set x8; at 950 the plugin's next raise to x16
    went through, x1 -> x16 within 1000 steps of the run's final path, because the memory
    had dropped the values before step 90 with the window at 1090. The memory keeps the
    window behind the oldest checkpoint listed, so the rewind finds them."""
    g = gov(max_step_ratio=2.0, slew_ratio=4.0, slew_window_steps=1000)
    for keep_from, allowed in [(0, None), (None, 16.0)]:  # None: before the fix
        mem = KnobMemory()
        for step, cur, value in [(30, 1.0, 2.0), (90, 2.0, 4.0), (1030, 4.0, 8.0),
                                 (1090, 8.0, 16.0)]:
            mem.record(step, cur, value, 1000, keep_from)
        mem.rewind(900)
        mem.record(900, 4.0, 8.0, 1000, keep_from)  # the rollback's own change, at 900
        assert g.govern("lr", mem, 8.0, 1.0, 16.0, 950).value == allowed
    # Trimmed to the window behind keep_from, not kept for ever.
    mem = KnobMemory()
    for step in range(0, 5000, 100):
        mem.record(step, 1.0, 1.0 + step / 1e4, 1000, keep_from=3000)
    assert mem.history[0][0] == 2000 and mem.history[-1][0] == 4900
    # A checkpoint held for the whole run (the last resort at 0): at most ten windows back.
    mem = KnobMemory()
    for step in range(0, 30000, 100):
        mem.observe(step, 1.0, 1000, keep_from=0)
    assert mem.history[0][0] >= 29900 - 11 * 1000 and len(mem.history) <= 111


# -- the property ------------------------------------------------------------------------

SPECIAL = st.sampled_from([NAN, INF, -INF, 0.0, -0.0, -1.0, 1e300, 1e-300, 5e-324, 1.0])
NUMBER = st.one_of(
    SPECIAL, st.floats(0.9, 1.1), st.floats(0.1, 10), st.floats(allow_nan=True, allow_infinity=True)
)
# "drift": the value in force moves on its own (the user's schedule), nothing recorded.
PROPOSAL = st.tuples(st.sampled_from(["factor", "value", "drift"]), NUMBER)
STRICT = GovernorConfig(
    lr=KnobLimits(min_rel=0.01, max_rel=5, max_step_ratio=1.5, slew_ratio=2.0,
                  slew_window_steps=300, cooldown_steps=20, deadband=0.05,
                  reversal_window_steps=100, reversal_min_change=0.3),
    weight_decay=KnobLimits(min_rel=0, max_rel=5, allow_zero=True, max_step_ratio=3,
                            slew_ratio=5, slew_window_steps=50),
)
# lr and weight decay are multipliers (1.0: the user's own values), momentum and clip absolute.
INITIAL = {"lr": 1.0, "momentum": 0.9, "weight_decay": 1.0, "clip": 1.0}


@settings(max_examples=300, deadline=None)
@given(
    config=st.sampled_from([GovernorConfig(), STRICT]),
    knob=st.sampled_from(sorted(INITIAL)),
    moves=st.lists(st.tuples(st.integers(0, 400), PROPOSAL), max_size=60),
)
def test_no_proposal_stream_gets_past_the_governor(config, knob, moves):
    g, lim, mem = Governor(config), getattr(config, knob), KnobMemory()
    lo, hi = g.bounds(knob, INITIAL[knob])
    cur, step, last = INITIAL[knob], 0, None
    sent, drifted = [], False
    # The momentum's ratios are on 1 / (1 - m), the steps a gradient is averaged over.
    f = (lambda m: 1.0 / (1.0 - m)) if knob == "momentum" else (lambda m: m)
    for inc, (kind, x) in moves:
        step += inc
        if kind == "drift":
            if math.isfinite(x) and x > 0:
                cur = min(max(cur * min(max(x, 0.1), 10.0), lo), hi)
                drifted = True
            continue
        target = cur * x if kind == "factor" else x
        out = g.govern(knob, mem, cur, INITIAL[knob], target, step)
        if out.value is None:
            continue
        v = out.value
        assert lo <= v <= hi and v != cur
        # Never the other way from the one asked, nor past the target.
        assert min(cur, target) <= v <= max(cur, target), (cur, target, v)
        if lim.max_step_ratio is not None and cur > 0:
            assert max(f(v), f(cur)) / min(f(v), f(cur)) <= lim.max_step_ratio * (1 + 1e-9)
        assert last is None or step - last >= lim.cooldown_steps
        assert cur == 0 or abs(v - cur) / cur >= lim.deadband
        mem.record(step, cur, v, lim.slew_window_steps)
        sent.append((step, f(v)))
        cur, last = v, step
    if lim.slew_ratio is not None and not drifted:  # the slew range is the commands' own
        _assert_slew(sent, f(INITIAL[knob]), lim.slew_window_steps, lim.slew_ratio)


def _assert_slew(sent, initial, window, ratio):
    """Every window ending at a change: its values and the one in force at its start."""
    for end, _ in sent:
        start = end - window
        before = [v for s, v in sent if s <= start]
        seen = [before[-1] if before else initial]
        seen += [v for s, v in sent if start < s <= end]
        assert max(seen) / min(seen) <= ratio * (1 + 1e-9), (end, seen)


def test_limits_name_the_ones_the_value_stopped_at_not_every_range_the_target_missed():
    """A reason's ``[limited: ...]`` said ``slew`` for a 4x move under slew_ratio 100 (a
    plugin author's trial): every range the target fell outside was named. Now only those
    whose edge the value stopped at."""
    def gov(**lim) -> Governor:
        return Governor(GovernorConfig(lr=KnobLimits(**{"cooldown_steps": 0, **lim})))

    # The step ratio is the tightest: the slew range and the bounds would stop it later.
    out = gov(max_step_ratio=2, slew_ratio=4, max_rel=10).govern(
        "lr", KnobMemory(), current=1.0, initial=1.0, target=1000.0, step=100)
    assert out == Governed(2.0, ("max_step_ratio",))
    # The slew window is the tightest.
    out = gov(max_step_ratio=4, slew_ratio=2, max_rel=10).govern(
        "lr", KnobMemory(), current=1.0, initial=1.0, target=1000.0, step=100)
    assert out == Governed(2.0, ("slew",))
    # Two edges at the same value: both named.
    out = gov(max_step_ratio=2, slew_ratio=2, max_rel=10).govern(
        "lr", KnobMemory(), current=1.0, initial=1.0, target=1000.0, step=100)
    assert out == Governed(2.0, ("max_step_ratio", "slew"))
    # A looser slew range is not named when the step ratio set the value (the trial's case).
    out = gov(max_step_ratio=2, slew_ratio=100, max_rel=1000).govern(
        "lr", KnobMemory(), current=1.0, initial=1.0, target=4.0, step=100)
    assert out == Governed(2.0, ("max_step_ratio",))
