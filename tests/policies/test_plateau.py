"""Plateau on synthetic loss streams: fires on flat or rising loss, stays quiet while it falls."""

from __future__ import annotations

import math
import random

import pytest

from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.state import JobState
from trimtab.controller.tracker import SignalConfig
from trimtab.policies.plateau import Plateau
from trimtab.protocol import wire

from .simclient import Client, one_param

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="AdamW",
                        dtype="bfloat16", device="cuda")
EVERY = 10
WINDOW = 20


def job(**registered) -> JobState:
    reg = wire.Register(job="p", run_id="r", report_every=EVERY, facts=FACTS,
                        knobs=wire.Knobs(lr=1e-3), base=wire.Knobs(lr=1e-3), **registered)
    return JobState.from_register(reg, SignalConfig(slope_window=WINDOW))


def feed(st: JobState, i: int, loss: float) -> None:
    """Report ``i`` of a loop whose own lr stays 1e-3, under trimtab's multiplier in force."""
    m = st.knobs.lr
    st.observe(wire.Report(job="p", seq=i, step=EVERY * i, window=EVERY, loss_mean=loss,
                           knobs=wire.Knobs(lr=1e-3 * m), base=wire.Knobs(lr=1e-3),
                           scale=wire.Scale(lr=m)))


def fires(loss_at, n: int = 300, seed: int = 0, policy: Plateau | None = None,
          **registered) -> list[int]:
    """Reports (1-based) at which plateau proposes, for loss_at(i) + N(0, 0.05) noise."""
    rng, st, pol = random.Random(seed), job(**registered), policy or Plateau()
    hits = []
    for i in range(1, n + 1):
        feed(st, i, loss_at(i) + rng.gauss(0.0, 0.05))
        if pol.propose(st.view()):
            hits.append(i)
    return hits


@pytest.mark.parametrize("seed", range(5))
def test_a_steadily_falling_noisy_loss_never_triggers(seed):
    # 0.02 per report against 0.05 noise: a clear trend over 20 reports.
    assert fires(lambda i: 6.0 - 0.02 * i, seed=seed) == []


#: The t-test alone (the fall-estimate criterion off), for the tests of its timing.
T_ONLY = {"min_fall": 1.0}


@pytest.mark.parametrize("seed", range(5))
def test_a_flat_noisy_loss_triggers_once_the_window_is_full(seed):
    hits = fires(lambda i: 2.0, seed=seed, policy=Plateau(T_ONLY))
    assert hits and hits[0] >= WINDOW
    # Without an lr change it keeps asking; a t-test at 2.0 lets ~2.5% of windows through.
    assert len(hits) > 0.9 * (300 - WINDOW + 1)
    # With the fall criterion (the default 1%), the windows whose estimate still falls by
    # 1% or more wait: fewer, and never one whose estimate falls that much.
    strict = fires(lambda i: 2.0, seed=seed)
    assert strict and set(strict) <= set(hits) and len(strict) < len(hits)


@pytest.mark.parametrize("seed", range(5))
def test_a_loss_still_falling_a_good_deal_is_mostly_no_plateau(seed):
    """Not significant (t about -1.6 in 0.05 noise) but falling 2.2% a window: the t-test
    alone calls most windows a plateau; with the fall criterion only those whose noisy
    estimate shows under 1% do (about one in five), far fewer."""
    falling = lambda i: 3.0 - 0.003 * i  # noqa: E731
    t_only = fires(falling, seed=seed, n=200, policy=Plateau(T_ONLY))
    strict = fires(falling, seed=seed, n=200)
    assert len(t_only) > 0.6 * (200 - WINDOW + 1)
    assert len(strict) < 0.4 * len(t_only)


def test_a_run_whose_own_lr_moves_is_left_to_its_schedule():
    """The user's schedule owns the lr: while the lr the run set itself moves (a cosine
    here), a flat loss is the schedule's business, not a plateau to cut."""
    st, rng, pol = job(), random.Random(4), Plateau()
    hits, own = [], 1e-3
    for i in range(1, 200):
        own = 1e-3 * (0.5 + 0.5 * math.cos(math.pi * i / 200))
        st.observe(wire.Report(job="p", seq=i, step=EVERY * i, window=EVERY,
                               loss_mean=2.0 + rng.gauss(0, 0.05), knobs=wire.Knobs(lr=own),
                               base=wire.Knobs(lr=own), scale=wire.Scale(lr=1.0)))
        hits += pol.propose(st.view())
    assert hits == []
    assert fires(lambda i: 2.0, policy=Plateau({"defer_to_schedule": False}))


def test_a_rising_loss_triggers():
    assert fires(lambda i: 2.0 + 0.02 * i, n=WINDOW) == [WINDOW]
    # ...but not one registered as not expected to fall (attach(loss_trend=False)).
    assert fires(lambda i: 2.0 + 0.02 * i, n=WINDOW, loss_trend=False) == []


def test_nothing_before_the_window_is_full_or_below_min_reports():
    assert fires(lambda i: 2.0, n=WINDOW - 1) == []
    assert fires(lambda i: 2.0, n=60, policy=Plateau({"min_reports": WINDOW + 1})) == []


def test_the_reason_quotes_slope_t_and_window():
    st, rng = job(), random.Random(1)
    for i in range(1, WINDOW + 1):
        feed(st, i, 2.0 + rng.gauss(0, 0.05))
    (prop,) = Plateau({"factor": 0.7, **T_ONLY}).propose(st.view())
    assert (prop.knob, prop.factor) == ("lr", 0.7)
    s = st.view().signals
    fall = -s.slope * 190 / abs(s.loss_ema)
    assert prop.reason == (f"loss plateau: slope {s.slope:.3g}/step, t={s.slope_t:.2f} > -2, "
                           f"{fall:+.2%} over 20 reports (190 steps)")


def test_after_a_cut_it_waits_for_a_window_clear_of_the_change():
    # A client (the real Actuator on an AdamW at lr 1e-3) carries out the commands.
    rng = random.Random(2)
    client = Client(one_param("AdamW", lr=1e-3), facts=FACTS,
                    signal_cfg=SignalConfig(slope_window=WINDOW))
    st, eng = client.state, Engine([Plateau(T_ONLY)], Governor())
    cuts = []
    for i in range(1, 200):
        client.advance()
        d = client.exchange(eng, loss_mean=2.0 + rng.gauss(0, 0.05)).decision
        if d.commands:
            cuts.append(i)
    assert cuts[0] == WINDOW
    # The next cut needs a full window of reports taken after the change; the governor's
    # slew limit (4x per 1000 steps) then holds off a third cut until step 1200.
    assert cuts == [20, 40, 120, 140]
    assert st.knobs.lr == 1 / 16  # trimtab's multiplier: the user's lr over 16
    assert client.trace[-1][1] == pytest.approx(1e-3 / 16) == st.effective.lr


def test_patience_steps_delays_the_next_cut():
    st, rng = job(), random.Random(3)
    pol = Plateau({"patience_steps": 1000, **T_ONLY})
    for i in range(1, 121):
        feed(st, i, 2.0 + rng.gauss(0, 0.05))
    st.last_change_step["lr"] = 500
    assert pol.propose(st.view()) == [] and st.step == 1200
    st.last_change_step["lr"] = 200
    assert pol.propose(st.view()) != []


def test_a_window_that_spans_an_lr_change_is_not_judged_whatever_the_patience():
    st, rng = job(), random.Random(4)
    pol = Plateau({"patience_steps": 10})
    for i in range(1, 41):
        feed(st, i, 2.0 + rng.gauss(0, 0.05))
    assert st.view().signals.slope_since_step == 210
    st.last_change_step["lr"] = 300
    assert pol.propose(st.view()) == []
    st.last_change_step["lr"] = 200
    assert pol.propose(st.view()) != []


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"factor=1.5: Input should be less than 1"):
        load_policy("plateau", {"factor": 1.5})
    with pytest.raises(PolicyLoadError, match=r"min_reports=2: Input should be greater than or"):
        load_policy("plateau", {"min_reports": 2})
