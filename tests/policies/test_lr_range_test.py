"""The LR range test: synthetic loss-vs-LR streams through the real engine, then a real run
through ``trimtab serve``.

The synthetic driver plays the client: the real Actuator on an AdamW whose own lr stays
``LR``, each report's loss a function of the lr its last step used (the effective lr:
``LR`` x trimtab's multiplier), the engine's decisions carried out as the guard does
(commands, stable marks and rollbacks, each acknowledged by the step that runs with it).
The range test sweeps the multiplier: its curve and ``found_lr`` are multipliers on ``LR``.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tests._decide import decided, decided_schedules
from trimtab.client import attach
from trimtab.controller.advance import take
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.health import DivergenceThresholds
from trimtab.controller.limits import GovernorConfig
from trimtab.controller.policy import Proposal, Rollback, Sweep, load_policy
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.rollback_rules import plan_rollback
from trimtab.controller.scale import ScaleContext, derive_limits
from trimtab.controller.state import JobState
from trimtab.policies.cosine import Cosine
from trimtab.policies.divergence_guard import DivergenceGuard
from trimtab.policies.lr_range_test import LrRangeTest, pick_lr, smooth
from trimtab.policies.one_cycle import OneCycle
from trimtab.policies.plateau import Plateau
from trimtab.protocol import wire

from ..integration.support import Regression, wait_for
from .simclient import Client, one_param
from .streams import EVERY, FACTS, job

LR = 1e-3
RB = RollbackConfig()
#: Multiplier bounds wide enough for a sweep of LR/100 .. LR*100 (the default stops at 10x).
WIDE = Governor({"lr": {"min_rel": 1e-3, "max_rel": 1e3}})


def client(lr: float = LR, checkpoints=(0, 100, 200)) -> Client:
    """A job whose loop trains an AdamW at its own ``lr`` (constant), with checkpoints."""
    return Client(one_param("AdamW", lr), facts=FACTS, checkpoints=checkpoints, rollback=RB)


def dip(best: float, blow: float = 30.0):
    """A loss lowest at ``best`` (quadratic in log LR) that explodes past ``blow * best``."""

    def loss(lr: float) -> float:
        x = math.log10(lr / best)
        return (1.0 + 0.5 * x * x) * math.exp(3.0 * max(lr / (best * blow) - 1.0, 0.0))

    return loss


def drive(
    engine: Engine,
    c: Client,
    loss_of,
    reports: int,
    listed=None,
    stop_on_rollback: bool = True,
    spread: float = 0.0,
):
    """``reports`` reports whose loss is ``loss_of(the effective lr of the window's last
    step)`` (inf: non-finite), the window's lowest ``spread`` below it, listing the
    checkpoints ``listed`` (None: those taken); every decision carried out by the client.
    Returns the decisions."""
    decisions = []
    for _ in range(reports):
        c.advance()
        loss = loss_of(c.act.used().lr)
        bad = not math.isfinite(loss)
        extra = {} if listed is None else {"checkpoints": [s for s in listed if s <= c.step]}
        if spread and not bad:
            extra["loss_min"] = loss * (1.0 - spread)
        d = c.exchange(engine, loss_mean=None if bad else loss,
                       nonfinite_losses=EVERY if bad else 0, **extra).decision
        decisions.append(d)
        if d.rollback is not None and stop_on_rollback:
            c.run(1)  # the step that runs from the restored checkpoint acknowledges it
            break
    return decisions


def finished(decisions):
    """The range test's ending proposal (its planned rollback)."""
    ends = [
        p
        for d in decisions
        for n, p in d.proposals
        if n == "lr_range_test" and p.to_step is not None
    ]
    assert len(ends) == 1, ends
    return ends[0]


def test_a_dip_then_blow_up_picks_the_lr_of_the_lowest_loss_over_ten():
    c = client()
    st = c.state
    policy = LrRangeTest({"when": "always",
                          "min_lr": 1e-5, "max_lr": 1e-1, "sweep_steps": 400, "beta": 0.0})
    assert policy.sweep_range(st.view()) == (pytest.approx(1e-2), pytest.approx(1e2))  # x LR
    ds = drive(Engine([policy], WIDE), c, dip(best=3e-3, blow=5.0), 60)
    end = finished(ds)
    curve = end.detail["curve"]
    lrs = [lr for lr, _ in curve]  # multipliers on LR
    i_min = min(range(len(curve)), key=lambda i: curve[i][1])
    # The sweep stopped on the blow-up, well before its end, past the dip.
    assert "x its lowest" in end.detail["stop"] and lrs[-1] < 1e-1 / LR
    assert lrs[i_min] < lrs[-1]
    # The pick: the sampled LR of the lowest loss, nearest the true minimum, over 10.
    assert end.detail["found_lr"] == pytest.approx(lrs[i_min] / 10)
    assert lrs[i_min] == min(lrs, key=lambda m: abs(math.log(m * LR / 3e-3)))
    # Rolled back with the found LR (kept in the job) to the checkpoint the sweep began at:
    # this synthetic loss depends on the LR alone, so the checkpoints within the sweep (at
    # 100 and 200) hold no loss below the one reported before the sweep, no progress to
    # keep (test_a_run_that_blew_up_before_its_sweep_keeps_nothing_of_it has a sweep that
    # keeps its progress).
    assert ds[-1].rollback.target_step == 0 == end.detail["checkpoint"]
    assert ds[-1].rollback.level == 0 and "kept" not in end.reason
    assert ds[-1].commands["lr"] == pytest.approx(lrs[i_min] / 10)
    assert st.found_lr == pytest.approx(lrs[i_min] / 10) and st.view().found_lr == st.found_lr
    assert st.step == 0 and st.knobs.lr == pytest.approx(st.found_lr)
    # The step the run restarted with used the found lr: the user's LR x the pick.
    assert c.trace[-1][:2] == (0, pytest.approx(LR * st.found_lr))
    assert st.effective.lr == pytest.approx(LR * st.found_lr) and st.base.lr == LR
    print(f"found lr x{st.found_lr:.3g} from {len(curve)} points")


@pytest.mark.parametrize("shift", [0.0, -1.2])
def test_a_loss_that_goes_below_zero_sweeps_to_its_blow_up_and_picks_the_same(shift):
    """A loss with a noise or likelihood term can go below 0: the same dip shifted down by
    1.2 bottoms out at -0.2. A ratio to a negative lowest says nothing (every loss is "4x"
    it: the sweep stopped at its first point below 0), so the stop measures the rise off
    such a lowest in units of the fall to it, and the sweep runs past the dip to the blow-up
    and picks as it does for the loss above 0."""
    c = client()
    policy = LrRangeTest({"when": "always",
                          "min_lr": 1e-5, "max_lr": 1e-1, "sweep_steps": 400, "beta": 0.0})
    above = dip(best=3e-3, blow=5.0)
    ds = drive(Engine([policy], WIDE), c, lambda lr: above(lr) + shift, 60)
    end = finished(ds)
    curve = end.detail["curve"]
    lrs = [lr for lr, _ in curve]
    i_min = min(range(len(curve)), key=lambda i: curve[i][1])
    assert curve[i_min][1] == pytest.approx(min(above(m * LR) for m in lrs) + shift)
    assert lrs[i_min] < lrs[-1] < 1e-1 / LR  # stopped past the dip, before the sweep's end
    assert "its lowest" in end.detail["stop"] and curve[-1][1] > 1.0
    assert lrs[i_min] == min(lrs, key=lambda m: abs(math.log(m * LR / 3e-3)))
    assert end.detail["found_lr"] == pytest.approx(lrs[i_min] / 10)


def test_a_short_sweep_is_smoothed_over_a_tenth_of_it_and_picks_at_the_dip():
    """An 80-step sweep (a short run's, as the benchmark fits it): smoothed at 0.98 per
    step the curve remembers ~50 steps, its lowest point lags to 5.6x the true best and
    the pick lands at 0.56x, where it should be about the best (1x) over 10. Smoothed over
    a tenth of the sweep, it is."""
    picks = {}
    for beta in (None, 0.98):
        c = client()
        policy = LrRangeTest({"when": "always", "min_lr": 1e-6, "max_lr": 1e-1,
                              "sweep_steps": 80})
        if beta is not None:
            policy.sweep_beta = lambda b=beta: b  # the old smoothing, for comparison
        end = finished(drive(Engine([policy], WIDE), c, dip(best=1e-3, blow=8.0), 30))
        picks[beta] = end.detail["found_lr"]
    assert LrRangeTest({"sweep_steps": 80}).sweep_beta() == pytest.approx(0.875)
    assert 0.05 < picks[None] < 0.3, picks  # about best / 10 (x1 / 10)
    assert picks[0.98] > 0.4, picks  # the lag the fix removes


def test_a_sweep_that_made_no_progress_by_a_checkpoint_goes_back_to_its_start():
    """A loss flat at 4 below 2e-3 that drops to ~1 only then: the checkpoints at 100 and
    200 hold states the sweep did not improve on its first (lr at step 200: 1e-3), so the
    run goes back to the checkpoint the sweep began at."""
    c = client()
    policy = LrRangeTest({"when": "always",
                          "min_lr": 1e-5, "max_lr": 1e-1, "sweep_steps": 400, "beta": 0.0})
    curve = dip(best=3e-3, blow=5.0)
    ds = drive(Engine([policy], WIDE), c, lambda lr: 4.0 if lr < 2e-3 else curve(lr), 60)
    end = finished(ds)
    assert end.detail["found_lr"] is not None
    assert ds[-1].rollback.target_step == 0 == end.detail["checkpoint"]
    assert "kept" not in end.reason and c.state.step == 0


def test_a_run_too_hot_from_the_start_sweeps_again_from_its_first_checkpoint():
    """SGD far too hot: the loss blows up in the second report (evidence "too high"). The
    steps since the attach checkpoint may have ruined the model (a dead network sweeps to
    nothing), so the decision that opens the phase rolls the run back to step 0 and sends
    the sweep from there: one command, the rollback with the live sweep. The sweep then
    runs from step 0, ends with a pick and returns as usual."""
    c = client(checkpoints=(0, 10, 100, 200))
    st = c.state
    engine = Engine([LrRangeTest({"beta": 0.0, "min_lr": 1e-5, "max_lr": 1e-1})], WIDE,
                    live_schedules=True)
    c.advance()
    c.observe(loss_mean=2.3, loss_min=2.2, loss_max=2.4)
    c.send(decided(engine, st))
    c.advance()
    c.observe(loss_mean=40.0, loss_min=3.0, loss_max=90.0)  # a new high, 40x the lowest
    d = decided(engine, st)
    assert d.rollback is not None and d.rollback.target_step == 0 and d.rollback.planned
    assert st.phase is not None and st.phase.start_step == 0 and st.phase.checkpoint == 0
    (sweep,) = d.schedules
    assert sweep.knob == "lr" and sweep.pieces[0].origin == 0
    assert "from the checkpoint at step 0" in d.knobs["lr"].reason
    command = c.send(d)
    assert command.rollback_to == 0 and command.schedules
    ds = drive(engine, c, dip(best=1e-4, blow=5.0), 60)
    # The sweep ran from step 0: the first step after the restore was step 0, at the
    # sweep's first LR (1e-5), and the sweep's LR rose from there.
    assert c.trace[2 * EVERY][:2] == (0, pytest.approx(1e-5))
    end = finished(ds)
    assert end.detail["found_lr"] is not None and st.phase is None
    assert st.found_lr == pytest.approx(end.detail["found_lr"])
    # A sweep that started over stops at its turn (by default, only such a sweep may, and
    # end in place): this one's loss turned up 2.4x its low, past keep_within, so it
    # returns.
    assert st.phases_done["lr_range_test"].restarted
    assert end.detail["stop"].startswith("the loss turned up") and end.detail["end"] == "rollback"
    # Its first reports stood near what the checkpoint's weights gave: no bad data.
    assert st.phases_done["lr_range_test"].restarts == 0


def _opened_by_bad_batches(**config):
    """A run whose loss jumped 1e5x in its second report (a burst of corrupted batches): the
    range test opens from the attach checkpoint. Returns (engine, client, the decision)."""
    c = client(checkpoints=(0, 10, 100, 200))
    engine = Engine([LrRangeTest({"beta": 0.0, "min_lr": 1e-5, "max_lr": 1e-1, **config})],
                    WIDE, live_schedules=True)
    c.advance()
    c.observe(loss_mean=2.3, loss_min=2.2, loss_max=2.4)
    c.send(decided(engine, c.state))
    c.advance()
    c.observe(loss_mean=3e5, loss_min=2e5, loss_max=5e5)
    d = decided(engine, c.state)
    assert d.rollback is not None and d.rollback.target_step == 0
    assert c.state.phase.opened["before"] == [2.2, 2.4]  # the checkpoint's weights gave
    c.send(d)
    return engine, c, d


def test_a_sweep_meeting_bad_batches_starts_over_and_ends_in_place_once_they_are_gone():
    """The sweep's first reports, at LRs that barely move the weights, stand 1e5x above
    anything the checkpoint's weights gave: bad data, not the LR. The sweep starts over
    from its checkpoint (a planned rollback; the phase stays open) while they last, and
    once a report is clean again ends in place with no pick, at the run's own LR: the
    blow-up that opened it was the data's."""
    engine, c, _ = _opened_by_bad_batches()
    st = c.state
    for n in (1, 2):
        c.advance()
        c.observe(loss_mean=4e5, loss_min=3e5, loss_max=6e5)
        d = decided(engine, st)
        assert d.rollback is not None and d.rollback.planned and d.rollback.target_step == 0
        assert d.phase_end is None and st.phase is not None and st.phase.restarts == n
        assert "starts over from the checkpoint at step 0" in d.rollback.reason
        assert "bad data, not the LR" in d.rollback.reason
        command = c.send(d)
        assert command.rollback_to == 0
    # Kept with the job's state: a restarted controller counts on from there.
    assert JobState.from_state_dict(st.state_dict()).phase == st.phase
    c.advance()
    assert c.trace[-1][0] == EVERY - 1 and c.trace[-EVERY][0] == 0  # trained from step 0
    c.observe(loss_mean=2.25, loss_min=2.2, loss_max=2.3)
    d = decided(engine, st)
    assert d.rollback is None and d.phase_end is not None and d.phase_end.in_place
    assert d.phase_end.found_lr is None and st.found_lr is None and st.phase is None
    assert d.knobs["lr"].commanded == pytest.approx(1.0)  # the run's own LR
    assert "no pick" in d.knobs["lr"].reason and "data's" in d.knobs["lr"].reason
    c.send(d)
    c.run(1)
    assert c.trace[-1][1] == pytest.approx(LR)
    # One range test per job: a later jump opens none.
    assert not [p for _, p in decided(engine, st).proposals if p.sweep]


def test_bad_batches_past_the_restarts_end_the_sweep_back_at_the_checkpoint_and_own_lr():
    engine, c, _ = _opened_by_bad_batches(data_restarts=1)
    st = c.state
    outcomes = []
    for _ in range(2):
        c.advance()
        c.observe(loss_mean=4e5, loss_min=3e5, loss_max=6e5)
        d = decided(engine, st)
        outcomes.append(d)
        c.send(d)
    first, last = outcomes
    assert first.phase_end is None and first.rollback.target_step == 0
    assert last.phase_end is not None and not last.phase_end.in_place
    assert last.rollback.target_step == 0 and last.phase_end.found_lr is None
    assert "no pick" in last.rollback.reason and "after 1 restarts" in last.rollback.reason
    assert last.rollback.targets == {"lr": pytest.approx(1.0)}


def test_with_data_restarts_off_the_sweep_reads_the_bad_batches():
    engine, c, _ = _opened_by_bad_batches(data_restarts=0)
    c.advance()
    c.observe(loss_mean=4e5, loss_min=3e5, loss_max=6e5)
    d = decided(engine, c.state)
    assert d.rollback is None and c.state.phase.restarts == 0


def test_a_run_that_blew_up_before_its_sweep_keeps_nothing_of_it():
    """SGD far too hot: the loss went from ~10 to 1e27 before the sweep began (at step 10,
    checkpoint 0). The sweep's loss falls a little from that ruin; the checkpoints it took
    hold ruins too, so the run goes back to the sweep's own checkpoint (the clean start).
    The same curve after a healthy start keeps the sweep's progress."""
    def state(before):
        st = JobState.from_register(wire.Register(
            job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR),
            base=wire.Knobs(lr=LR), facts=FACTS))
        for i, (lo, mean) in enumerate(before, 1):
            st.observe(wire.Report(job="j", seq=i, step=5 * i, window=5, loss_mean=mean,
                                   loss_min=lo, loss_max=mean * 2, knobs=wire.Knobs(lr=LR),
                                   base=wire.Knobs(lr=LR), checkpoints=[0]))
        phase = st.begin_phase("lr_range_test", 0)
        st.observe(wire.Report(job="j", seq=9, step=40, window=5, loss_mean=1.0,
                               knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
                               checkpoints=[0, 20, 30], stable_step=0))
        return st.view(), phase

    curve = [(0.1, 8e27), (0.2, 6e27), (0.4, 4e27), (0.8, 9e27)]
    steps = [15, 20, 30, 40]
    policy = LrRangeTest()
    ruined, phase = state([(10.0, 3e13), (1e20, 1e27)])
    assert policy.resume_at(ruined, phase, curve, steps) == 0
    healthy, phase = state([(9e27, 9.5e27), (8.5e27, 9e27)])  # the same scale, no fall yet
    assert policy.resume_at(healthy, phase, curve, steps) == 30
    # The client listed 0 (stable), 20 and 30: 20 would be next to go; 30 is kept... and
    # had the lowest point been at 20, the return would go to the sweep's start, not to a
    # checkpoint the next snapshot may have evicted (seen: "rollback_to=80: no stable
    # checkpoint at that step (held: 0, 120, 160, 200)").
    early = [(0.1, 8e27), (0.2, 3e27), (0.4, 9e27), (0.8, 9.5e27)]
    assert policy.resume_at(healthy, phase, early, steps) == 0


def test_a_sweep_of_a_run_too_low_keeps_the_checkpoints_it_reached_below_its_pick():
    """The GPT whose loop writes its own LR, started 100x too low: its updates lined up,
    the sweep opened at step 75 (checkpoint 60) and ran x2 -> x333 with the loss still
    falling, picking x33. Its checkpoint at step 90 was taken at x12: every step before it
    ran at an LR below the pick, training the run would have done anyway. Its loss there
    (4.08) had not fallen below the pre-sweep windows' lowest losses (4.0), so it did not
    count as progress, and the run went back to 60: 50 steps lost, and in a loop whose
    own schedule a rollback does not rewind, lost from the schedule too."""
    st = JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
        facts=FACTS))
    for i in range(1, 16):  # steps 5 .. 75, healthy and slowly falling
        st.observe(wire.Report(job="j", seq=i, step=5 * i, window=5, loss_mean=4.5 - 0.02 * i,
                               loss_min=4.0, loss_max=4.6, knobs=wire.Knobs(lr=LR),
                               base=wire.Knobs(lr=LR), checkpoints=[0, 30, 60]))
    phase = st.begin_phase("lr_range_test", 60)
    st.observe(wire.Report(job="j", seq=16, step=110, window=5, loss_mean=3.2,
                           knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
                           checkpoints=[30, 60, 90], stable_step=60))
    curve = [(2.17, 4.124), (5.17, 4.118), (12.3, 4.084), (29.3, 3.943), (69.9, 3.772),
             (166.0, 3.464), (333.0, 3.219)]
    steps = [80, 85, 90, 95, 100, 105, 110]
    policy = LrRangeTest()
    assert policy.resume_at(st.view(), phase, curve, steps, found=33.3) == 90
    # A pick below the LR the checkpoint was reached at: what came before it ran hotter
    # than the run will now, and its loss is no progress: back to the sweep's start.
    assert policy.resume_at(st.view(), phase, curve, steps, found=10.0) == 60
    # No pick known (the old call): as before.
    assert policy.resume_at(st.view(), phase, curve, steps) == 60


@pytest.mark.parametrize(("keep", "held", "stable", "back"), [
    (None, [0, 40], 0, 0),  # not told: the oldest of the ring (40) may go next
    (3, [0, 40], 0, 40),  # a ring of 3 holding 1: the next snapshot evicts nothing
    (3, [0, 40, 80, 120], 0, 0),  # full: the next snapshot evicts 40
    (1, [0, 40], 0, 0),  # a ring of 1: the next snapshot replaces 40
])
def test_a_sweeps_return_avoids_only_a_checkpoint_the_clients_next_snapshot_evicts(
        keep, held, stable, back):
    """The client keeps its ``keep`` newest checkpoints plus the newest stable one, and
    says ``keep`` when it registers. A checkpoint the next snapshot would evict may be gone
    before the command lands; any other is a safe return. Not knowing ``keep`` (an older
    client), the oldest of the ring is taken to go next, as before."""
    st = JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
        facts=FACTS, keep=keep))
    for i in range(1, 5):
        st.observe(wire.Report(job="j", seq=i, step=5 * i, window=5, loss_mean=2.3,
                               knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
                               checkpoints=[0]))
    phase = st.begin_phase("lr_range_test", 0, start=0)
    st.observe(wire.Report(job="j", seq=5, step=60, window=5, loss_mean=1.5,
                           knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
                           checkpoints=held, stable_step=stable))
    # The loss fell by step 40 and is lowest at 60.
    curve = [(0.01, 2.3), (0.02, 2.2), (0.04, 2.0), (0.08, 1.8), (0.16, 1.6), (0.32, 1.5)]
    steps = [10, 20, 30, 40, 50, 60]
    assert st.view().checkpoint_keep == keep
    assert LrRangeTest().resume_at(st.view(), phase, curve, steps) == back


@pytest.mark.parametrize("family_range", [True, False])
def test_a_run_registered_decades_too_low_sweeps_into_its_family_range(family_range):
    # AdamW registered at 1e-6, whose loss is lowest at 3e-3: the default band (1e-8 ..
    # 1e-5) never reaches it; joined with Adam's sane range (1e-5 .. 1e-2 at batch 256,
    # which the derived governor bounds admit too) the sweep crosses the dip.
    start = 1e-6
    c = client(start)
    st = c.state
    ctx = ScaleContext.from_facts(st.facts)
    gov = Governor(derive_limits(ctx, GovernorConfig(), set(), st.registered).config)
    policy = LrRangeTest({"when": "always", "end_in_place": False,
                          "sweep_steps": 400, "beta": 0.0, "family_range": family_range})
    lo, hi = policy.sweep_range(st.view())  # multipliers on the user's lr
    assert lo == pytest.approx(1 / 100)
    assert hi == pytest.approx(1e-2 / start if family_range else 10)
    ds = drive(Engine([policy], gov), c, dip(best=3e-3, blow=5.0), 60)
    found = finished(ds).detail["found_lr"]
    if family_range:
        assert 1e-4 <= start * found <= 1e-3 and st.knobs.lr == pytest.approx(found)
        assert st.effective.lr == pytest.approx(start * found)
    else:
        assert found <= 1
    print(f"family_range={family_range}: sweep x{lo:.3g} -> x{hi:.3g} of {start}, "
          f"found x{found:.3g}")


def test_the_sweep_range_relates_to_the_lr_the_loop_runs_at_and_holds_for_the_sweep():
    """A LambdaLR warm-up registers its first value: here 1/30 of the 3e-4 the loop then
    runs at. Adam's family range (1e-5 .. 1e-2) is absolute; as multipliers on the
    registered 1e-5 its top is x1000, which on the loop's 3e-4 swept to 0.3 (capped at the
    family's 1e-2 by the governor, while the curve said x1000) and picked 10x too high.
    It relates to the highest lr the loop has run at (x33 at the top), is recorded when
    the sweep opens, and holds while the loop's own lr decays under the sweep; the pick
    lands a tenth below the dip (3e-3) on the lr the loop runs at."""
    c = client(1e-5)
    st = c.state
    gov = Governor(derive_limits(ScaleContext.from_facts(st.facts), GovernorConfig(), set(),
                                 st.registered).config)
    c.opt.param_groups[0]["lr"] = 3e-4  # the loop's warm-up is over
    c.run(c.every)
    c.exchange(Engine([], gov), loss_mean=5.0)
    policy = LrRangeTest({"when": "always", "end_in_place": False, "sweep_steps": 400,
                          "beta": 0.0})
    assert policy.sweep_range(st.view()) == (pytest.approx(1e-2), pytest.approx(1e-2 / 3e-4))
    engine = Engine([policy], gov)
    loss = dip(best=3e-3, blow=5.0)
    drive(engine, c, loss, 1)
    assert st.phase is not None and st.phase.opened["range"] == [
        pytest.approx(1e-2), pytest.approx(1e-2 / 3e-4)]
    c.opt.param_groups[0]["lr"] = 2e-4  # the loop's own decay, under the sweep
    assert policy.sweep_range(st.view()) == (pytest.approx(1e-2), pytest.approx(1e-2 / 3e-4))
    # The range is part of the saved job state (a restarted controller sweeps on as before).
    saved = json.loads(json.dumps(st.state_dict()))
    assert JobState.from_state_dict(saved).phase.opened == st.phase.opened
    ds = drive(engine, c, loss, 60)
    end = finished(ds)
    assert max(lr for lr, _ in end.detail["curve"]) <= 1e-2 / 3e-4 * 1.0001
    assert 1e-4 <= 2e-4 * end.detail["found_lr"] <= 1e-3
    print(f"found x{end.detail['found_lr']:.3g} on the loop's 2e-4")


def test_with_live_schedules_the_sweep_goes_out_once_and_the_client_follows_it():
    c = client(checkpoints=(0,))
    st = c.state
    policy = LrRangeTest({"when": "always",
                          "min_lr": 1e-5, "max_lr": 1e-1, "sweep_steps": 400, "beta": 0.0})
    engine = Engine([policy], WIDE, live_schedules=True)
    decisions = drive(engine, c, dip(best=3e-3, blow=5.0), 60)
    first, *middle, last = decisions
    # One command carries the sweep: torch's ExponentialLR from the step the phase opened,
    # of the multiplier (1e-5 / LR = 0.01 to 1e-1 / LR = 100).
    (spec,) = first.schedules
    (piece,) = spec.pieces
    assert (piece.name, piece.origin) == ("exponential", EVERY)
    assert piece.params["lr"] == pytest.approx(1e-5 / LR, rel=1e-12)
    assert piece.params["gamma"] ** 400 == pytest.approx(1e-1 / 1e-5)
    assert first.commands == {"lr": pytest.approx(1e-5 / LR, rel=1e-12)}
    assert all(d.schedules is None and not d.commands for d in middle), "sent again"
    # The client followed it at every step of the sweep: the user's LR x the schedule.
    gamma = piece.params["gamma"]
    swept = [(s, lr) for s, lr, _ in c.trace if EVERY <= s < last.step]
    assert len(swept) == last.step - EVERY
    assert [lr for _, lr in swept] == [
        pytest.approx(LR * 1e-5 / LR * gamma ** (s - EVERY), rel=1e-12) for s, _ in swept]
    # The return stops it (schedules=[]) and sets the pick, read off the per-step curve.
    assert last.rollback.planned and last.schedules == () and st.live == {}
    curve = finished(decisions).detail["curve"]
    # Point k: the report at step (k + 2) x EVERY, the schedule's value at its last step.
    assert [lr for lr, _ in curve] == [
        pytest.approx(1e-5 / LR * gamma ** ((k + 1) * EVERY - 1), rel=1e-12)
        for k in range(len(curve))]
    assert last.commands["lr"] == pytest.approx(st.found_lr)
    # After the return the live sweep is gone: the run steps at LR x the pick.
    assert c.trace[-1][:2] == (0, pytest.approx(LR * st.found_lr))


def test_a_re_registration_mid_sweep_leaves_the_live_sweep_running():
    c = client(checkpoints=(0,))
    st = c.state
    engine = Engine([LrRangeTest({"when": "always",
                                  "min_lr": 1e-5, "max_lr": 1e-1})], WIDE, live_schedules=True)
    drive(engine, c, lambda lr: 1.0, 3)
    sweep = st.live["lr"]
    assert st.phase is not None and sweep.pieces[0].name == "exponential"
    # The reply to a register asks the schedule policies only (none here): it must not
    # stop the sweep (schedules=[]) nor send it again.
    d = decided_schedules(engine, st)
    assert d.schedules is None and st.live == {"lr": sweep}


def test_a_run_resumed_mid_sweep_in_a_new_process_ends_the_phase_at_its_starting_lr():
    """A new process resumed from the user's checkpoint saved mid-sweep holds none of the
    old one's checkpoints: the phase cannot return to its own. It ends at the first
    report after the resume, at the LR in force at its checkpoint, its live sweep stopped;
    nothing is restored and no other rollback is ordered."""
    c = client(checkpoints=(0,))
    st = c.state
    engine = Engine([LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1e-1})], WIDE,
                    live_schedules=True)
    drive(engine, c, lambda lr: 1.0, 4)
    assert st.phase is not None and st.phase.checkpoint == 0 and "lr" in st.live
    swept = c.act.used().lr
    assert swept != pytest.approx(LR)
    # The new process: the saved knobs and live sweep, one checkpoint, at the saved step.
    st.on_register(wire.Register(
        job=c.job, run_id=st.run_id, step=c.step, report_every=EVERY, facts=FACTS,
        knobs=c.act.used(), base=c.act.base(), scale=c.act.scale(),
        applied_seq=st.applied_seq, resume=1, checkpoints=[c.step],
        schedules=list(c.act.live.schedules)))
    c.checkpoints = (c.step,)
    (d,) = drive(engine, c, lambda lr: 1.0, 1)
    assert d.rollback is None and st.phase is None
    assert any("no longer holds the checkpoint at step 0" in r for r in d.reasons()), d.reasons()
    assert d.schedules == () and st.live == {}
    assert d.commands["lr"] == pytest.approx(1.0)
    c.run(1)
    assert c.trace[-1][1] == pytest.approx(LR)


def test_steepest_picks_where_the_loss_falls_fastest():
    curve = [(1e-4, 1.0), (1e-3, 0.98), (1e-2, 0.6), (1e-1, 0.5), (1.0, 3.0)]
    assert pick_lr(curve, "steepest", 10.0) == 1e-2
    assert pick_lr(curve, "min", 10.0) == pytest.approx(1e-2)
    # Bias-corrected: a constant loss smooths to itself from the first point on.
    assert [round(x, 12) for _, x in smooth([(1, 2.0, 10)] * 3, 0.98)] == [2.0, 2.0, 2.0]


def test_a_flat_then_up_curve_picks_nothing_and_returns_at_the_registered_lr():
    c = client()
    st = c.state
    flat = lambda lr: 1.0 if lr < 2e-2 else 1.0 * math.exp(50 * (lr - 2e-2))  # noqa: E731
    ds = drive(Engine([LrRangeTest({"when": "always",
                                    "min_lr": 1e-5, "max_lr": 1.0})], WIDE), c, flat, 60)
    end = finished(ds)
    assert end.detail["found_lr"] is None and "never fell" in end.reason
    assert ds[-1].rollback.target_step == 0
    # Back at the user's own lr: multiplier 1.
    assert st.found_lr is None and st.knobs.lr == pytest.approx(1.0)
    assert c.trace[-1][:2] == (0, pytest.approx(LR)) and st.effective.lr == pytest.approx(LR)
    # Schedules keep the registered LR.
    assert Cosine({"t_max": 1000}).base_lr(st.view()) == 1.0


def test_a_sweep_over_batch_noise_neither_turns_up_nor_picks():
    """A loss the sweep's LRs do not move, each window's batches spread 3-20 around a mean
    of 8-10 (a small-batch regression started 10x too cold, as a user's trial journaled
    it): the smoothed loss's 8% dip and a window mean 1.66x the lowest are the batches,
    not the LR. The sweep does not stop at a "turn" and picks nothing; the same reports
    without the noise bar stop it at the turn with a pick below the run's LR (the trial's
    pick, a thousandth of its LR, stalled it: 9.24 against 0.98 bare)."""
    means = [8.4, 8.57, 7.52, 8.87, 8.45, 9.26, 9.20, 10.35, 9.09, 7.78, 12.47, 8.9, 9.1]

    def sweep(**cfg):
        c = client()
        policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1e-2,
                              "sweep_steps": 120, "end_in_place": "always", **cfg})
        engine = Engine([policy], WIDE)
        for i in range(14):
            c.advance()
            mean = means[i % len(means)]
            d = c.exchange(engine, loss_mean=mean, loss_min=3.0, loss_max=20.0).decision
            if d.phase_end is not None or d.rollback is not None:
                return next(p for n, p in d.proposals if n == "lr_range_test")
        raise AssertionError("the sweep did not end")

    end = sweep()
    assert end.detail["stop"].startswith("sweep done") and end.detail["found_lr"] is None
    assert "never fell 2% and 2 standard errors" in end.reason
    bare = sweep(min_drop_noise=0.0)
    assert bare.detail["stop"].startswith("the loss turned up")
    assert bare.detail["found_lr"] < 1e-2


def test_a_non_finite_loss_mid_sweep_stops_it_and_rolls_back():
    c = client()
    st = c.state
    nan_past = lambda lr: math.inf if lr > 1e-2 else dip(3e-3)(lr)  # noqa: E731
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0})
    ds = drive(Engine([policy, DivergenceGuard()], WIDE), c, nan_past, 60)
    end = finished(ds)
    assert "non-finite" in end.detail["stop"] and end.detail["curve"][-1][1] is None
    plan = ds[-1].rollback
    # The range test's return, not the guard's rollback (which the phase defers), to the
    # sweep's own checkpoint: the one before its lowest loss (100) is the oldest of the
    # client's ring, which its next snapshot may evict before the command lands.
    assert (plan.policy, plan.cause, plan.target_step) == ("lr_range_test", "lr_range_test",
                                                           end.detail["checkpoint"])
    assert end.detail["checkpoint"] == 0
    assert st.found_lr is not None and LR * st.found_lr < 1e-2 / 10 * 1.001


def turn_up(best: float, to: float = 1.55):
    """:func:`dip` up to 1.2x ``best``, then a loss of ``to`` (its lowest is 1): a run
    that turns up off its low at once, without blowing up."""
    below = dip(best, blow=1e9)
    return lambda lr: below(lr) if lr <= 1.2 * best else to


def test_a_sweep_whose_run_is_still_near_its_best_ends_in_place_with_no_rollback():
    # The loss turns up past its lowest (no blow-up): the sweep stops at the first report
    # 1.5x above the lowest, and the run, within 1.6x its best, off its low for one report
    # only and healthy (a noisy window, as at a high LR: its lowest loss is no spike), is
    # kept where it is: no rollback, the pick set as the lr in force, the phase journaled
    # as ended in place.
    c = client()
    st = c.state
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0,
                          "end_in_place": "always"})
    ds = drive(Engine([policy], WIDE, live_schedules=True), c, turn_up(best=3e-3), 40,
               spread=0.5)
    (d,) = [d for d in ds if d.phase_end is not None]
    (end,) = [p for n, p in d.proposals if n == "lr_range_test"]
    assert isinstance(end, Sweep) and end.ends_phase and end.to_step is None
    assert end.detail["stop"].startswith("the loss turned up") and end.detail["end"] == "in_place"
    assert "ended in place" in end.reason and "no rollback" in end.reason
    found = end.detail["found_lr"]
    assert 1e-4 < LR * found < 1e-3  # about the best lr / 10
    # No rollback, ordered or counted; the run never went back a step.
    assert all(x.rollback is None for x in ds) and st.rollback.rollbacks == {}
    steps = [s for s, *_ in c.trace]
    assert steps == sorted(steps)
    # The decision and the job's phase record say how it ended, where and at which lr.
    assert (d.phase_end.in_place, d.phase_end.end_step) == (True, d.step)
    assert d.phase_end.end_lr == pytest.approx(found) and d.commands["lr"] == pytest.approx(found)
    assert d.to_dict()["phase_end"]["in_place"] is True and d.to_dict()["rollback"] is None
    assert d.schedules == ()  # the live sweep stopped: the pick holds
    assert st.phase is None and st.found_lr == pytest.approx(found)
    done = st.phases_done["lr_range_test"]
    assert done.in_place and done.resume_step == d.step and done.end_lr == d.phase_end.end_lr
    # From there on the run trains at the pick, and a schedule would count from that step.
    assert c.trace[-1][1] == pytest.approx(LR * found)
    assert Cosine({"t_max": 2000}).step_origin(st.view()) == d.step


def test_the_return_is_kept_when_the_run_is_past_its_best_or_in_place_ends_are_off():
    # A blow-up past the low: the latest report is far above the lowest, the run goes back.
    c = client()
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0,
                          "end_in_place": "always"})
    ds = drive(Engine([policy], WIDE), c, dip(best=3e-3, blow=1.2), 60)
    (d,) = [d for d in ds if d.phase_end is not None]
    assert d.rollback is not None and d.phase_end.in_place is False
    assert d.phase_end.checkpoint == d.rollback.target_step and "kept" not in d.rollback.reason
    # A gentle rise past the low: when the loss is 1.5x its lowest, the run has trained
    # reports long at LRs too high for it, and goes back.
    c = client()
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0,
                          "end_in_place": "always"})
    ds = drive(Engine([policy], WIDE), c, dip(best=3e-3, blow=1e9), 60)
    assert ds[-1].rollback is not None and finished(ds).detail["end"] == "rollback"
    assert finished(ds).detail["stop"].startswith("the loss turned up")
    # The same turn as in the test above, with end_in_place off: the return, as before.
    c = client()
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0,
                          "end_in_place": False})
    ds = drive(Engine([policy], WIDE), c, turn_up(best=3e-3), 60)
    assert ds[-1].rollback is not None and finished(ds).detail["end"] == "rollback"
    # By default only a sweep that started over because the run ran too hot may end in
    # place: this one started where the run was (a run at too low an LR climbs far past
    # its pick), so it sweeps on past the turn and goes back.
    c = client()
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0})
    ds = drive(Engine([policy], WIDE), c, turn_up(best=3e-3), 60)
    assert not c.state.phases_done["lr_range_test"].restarted
    assert ds[-1].rollback is not None and finished(ds).detail["end"] == "rollback"
    assert not finished(ds).detail["stop"].startswith("the loss turned up")


@pytest.mark.parametrize("cause", ["nonfinite", "replicas"])
def test_persistent_non_finite_values_and_parted_replicas_outrank_an_end_in_place(cause):
    class EndsNow(LrRangeTest):
        def propose(self, view):
            if view.phase is not None:
                return [Proposal.end_in_place("lr", 0.5, "the run is at its best")]
            return super().propose(view)

    class Skipping(DivergenceGuard):
        name = "skipping"

        def propose(self, view):  # every step skipped, from the second report on
            if view.reports_seen < 2:
                return []
            return [Proposal.roll_back(cause, "every step skipped, or the replicas parted")]

    c = client()
    st = c.state
    engine = Engine([EndsNow({"when": "always"}), Skipping()], WIDE)
    ds = drive(engine, c, dip(3e-3), 3)
    assert st.phases_done["lr_range_test"].in_place is False
    plan = ds[-1].rollback
    # The phase's return to its checkpoint, for the damage, not an end in place.
    assert plan is not None and plan.cause == cause and plan.target_step == 0
    assert ds[-1].phase_end.in_place is False and c.state.step == 0


def test_an_end_in_place_opens_no_phase_and_carries_no_schedule():
    class Ends(LrRangeTest):
        def propose(self, view):
            return [Proposal.end_in_place("lr", 0.5, "nothing to end")]

    c = client()
    d = drive(Engine([Ends({"when": "always"})], WIDE), c, dip(3e-3), 1)[0]
    assert c.state.phase is None and d.commands == {} and d.phase_end is None
    piece = wire.SchedulePiece(name="exponential", params={"lr": 0.1, "gamma": 1.1}, origin=0)
    with pytest.raises(ValueError, match="ends_phase.*is a value, not a schedule"):
        Sweep("lr", 0.1, reason="x", ends_phase=True, schedule=piece)
    with pytest.raises(ValueError, match="ends_phase must be True or False"):
        Sweep("lr", 0.1, reason="x", ends_phase=1)  # type: ignore[arg-type]


def test_the_sweep_runs_through_the_governor_bounds_and_defers_the_other_policies():
    c = client()
    st = c.state
    gov = Governor()  # the defaults: bounds [1e-3, 10] x the registered LR (multiplier 1)
    lo, hi = gov.bounds("lr", 1.0)
    assert (lo, hi) == (pytest.approx(1e-3), pytest.approx(10.0))

    class Nervous(DivergenceGuard):
        name = "nervous"

        def propose(self, view):  # a guard that sees a divergence in every report
            return [Proposal.roll_back("climb", "loss rising")]

    policies = [
        Nervous(),
        Plateau(),
        LrRangeTest({"when": "always", "sweep_steps": 300, "max_factor": 100.0,
                     "end_in_place": False}),
        Cosine({"t_max": 2000}),
    ]
    ds = drive(Engine(policies, gov), c, dip(best=2e-3, blow=20.0), 80)
    # The opening decision marks the sweep's checkpoint stable (the client restores only
    # stable ones) and sends the sweep's first LR (x1/100 the user's).
    assert ds[0].mark_stable == 0 and ds[0].commands["lr"] == pytest.approx(1 / 100)
    sent = [d.commands["lr"] for d in ds if "lr" in d.commands]
    # Every value within the bounds, the top one cut to them ...
    assert all(lo <= v <= hi for v in sent) and max(sent) == pytest.approx(hi)
    # ... and well past what the rate limits allow: 2x a decision, 4x per 1000 steps.
    assert max(sent) / min(sent) > 100
    rising = [b / a for a, b in zip(sent, sent[1:-1], strict=False)]
    assert all(r >= 1 for r in rising), "the sweep only rises"
    # Only the range test's proposals acted: the guard asked for a rollback and the cosine
    # for its schedule at every report, and neither was applied.
    assert all({"nervous", "cosine"} <= {n for n, _ in d.proposals} for d in ds)
    assert all(d.rollback is None for d in ds[:-1])
    assert all(kd.policy == "lr_range_test" for d in ds for kd in d.knobs.values())
    assert all(d.mark_stable is None for d in ds[1:])
    plan = ds[-1].rollback
    assert plan.policy == "lr_range_test" and plan.level == 0
    assert plan.target_step == finished(ds).detail["checkpoint"] == 0
    found = st.found_lr
    assert found is not None and ds[-1].commands["lr"] == pytest.approx(found)
    # Not a divergence rollback: counted under its own cause, no escalation, no cooldown.
    assert st.rollback.rollbacks == {"lr_range_test": 1}
    assert st.rollback.cooldown_until in (None, 0)
    st.rollback.step = 300
    st.rollback.checkpoints = [0, 300]
    assert plan_rollback("loss_spike", "spike", st.rollback, RB).level == 1
    # Afterwards the phase is over: the cosine takes the found LR as its reference.
    assert Cosine({"t_max": 2000}).lr_for(st.view())[1] == found
    assert st.phase is None and [p.policy for p in st.phases_done.values()] == ["lr_range_test"]


def test_quiet_when_finished_also_after_a_restart_and_without_a_checkpoint():
    policy = LrRangeTest({"when": "always", "min_lr": 1e-5, "max_lr": 1.0, "beta": 0.0})
    c = client()
    st = c.state
    drive(Engine([policy], WIDE), c, lambda lr: 1.0, 3, listed=())
    assert st.phase is None and not st.phases_done, "no checkpoint: no sweep"
    assert policy.propose(st.view()) == []
    drive(Engine([policy], WIDE), c, dip(3e-3), 60)
    found = st.found_lr
    assert found is not None and policy.propose(st.view()) == []
    restarted = JobState.from_state_dict(st.state_dict())
    assert restarted.found_lr == found and restarted.phases_done == st.phases_done
    c.state = restarted
    ds = drive(
        Engine([load_policy("lr_range_test", {"when": "always",
                                              "min_lr": 1e-5, "max_lr": 1.0})], WIDE),
        c,
        dip(3e-3),
        5,
    )
    assert all(not d.proposals and not d.commands for d in ds)
    assert restarted.found_lr == found


def test_a_restart_mid_sweep_carries_on_from_the_job_state():
    cfg = {"when": "always", "min_lr": 1e-5, "max_lr": 1e-1, "sweep_steps": 400, "beta": 0.0}
    whole = client()
    drive(Engine([LrRangeTest(cfg)], WIDE), whole, dip(3e-3, blow=5.0), 60)
    c = client()
    st = c.state
    drive(Engine([LrRangeTest(cfg)], WIDE), c, dip(3e-3, blow=5.0), 5)
    assert st.phase is not None and st.found_lr is None
    restarted = JobState.from_state_dict(st.state_dict())
    assert restarted.phase == st.phase
    c.state = restarted
    drive(Engine([LrRangeTest(cfg)], WIDE), c, dip(3e-3, blow=5.0), 60)
    assert whole.state.found_lr is not None and restarted.found_lr == whole.state.found_lr


def test_a_policy_failing_mid_sweep_ends_the_phase_with_the_return():
    class Flaky(LrRangeTest):
        calls = 0

        def propose(self, view):
            Flaky.calls += 1
            if Flaky.calls > 4:
                raise RuntimeError("boom")
            return super().propose(view)

    c = client()
    st = c.state
    ds = drive(Engine([Flaky({"when": "always", "min_lr": 1e-5, "max_lr": 1.0})], WIDE), c,
               dip(3e-3), 10)
    plan = ds[-1].rollback
    assert plan.cause == "phase_aborted" and plan.target_step == 0
    # Back at the lr in force at the checkpoint: the user's own (multiplier 1).
    assert ds[-1].commands.get("lr", 1.0) == pytest.approx(1.0) and st.knobs.lr == 1.0
    assert c.trace[-1][:2] == (0, LR)
    assert st.phase is None and st.found_lr is None


def test_a_planned_rollback_is_only_for_the_policy_holding_the_phase():
    class Rogue(DivergenceGuard):
        name = "rogue"

        def propose(self, view):
            return [Proposal.roll_back("climb", "back", to_step=0, value=0.5)]

    c = client()
    d = drive(Engine([Rogue()], Governor()), c, lambda lr: 1.0, 1)[0]
    assert d.rollback is None and d.commands == {"lr": 0.5}
    assert "holds none" in d.knobs["lr"].reason
    with pytest.raises(ValueError, match="a planned rollback .* takes the LR to set"):
        Rollback("climb", reason="x", factor=0.5, to_step=3)
    with pytest.raises(ValueError, match="to_step must be a checkpoint step"):
        Proposal.roll_back("climb", "x", to_step=-1, value=1.0)
    with pytest.raises(ValueError, match="sweep proposal for lr takes an absolute value"):
        Sweep("lr", None, reason="x")  # type: ignore[arg-type]


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="min_lr=0.1 is not below max_lr=0.01"):
        load_policy("lr_range_test", {"min_lr": 0.1, "max_lr": 0.01})
    with pytest.raises(Exception, match="sweep_steps"):
        load_policy("lr_range_test", {"sweep_steps": 1})


def test_one_cycle_starts_at_its_start_fraction_of_the_found_lr():
    c = client()
    st = c.state
    rt = LrRangeTest({"when": "always", "end_in_place": False,
                      "min_lr": 1e-5, "max_lr": 1e-1, "beta": 0.0, "start_fraction": 1 / 25})
    oc = OneCycle({"total_steps": 1000, "cycle_momentum": False})
    ds = drive(Engine([rt, oc], WIDE), c, dip(3e-3), 60)
    found = st.found_lr
    assert ds[-1].commands["lr"] == pytest.approx(found / 25)
    assert oc.lr_for(st.view()) == (pytest.approx(found / 25), found)


# -- a real run ---------------------------------------------------------------------------

POST = 1000  # optimizer steps after the rollback, and of the fixed-LR baseline
CONFIG = f"""
[[policies]]
name = "lr_range_test"
config = {{ when = "always", sweep_steps = 200, max_factor = 1000.0, end_in_place = false }}

[[policies]]
name = "cosine"
config = {{ t_max = {POST}, eta_min = 0.0 }}

[governor.lr]
max_rel = 1000.0
"""

STEP_S = 0.003  # a realistic, if short, step: the controller answers within a few steps
#: A poor guess for this task (SGD + momentum; fixed LRs of 0.03-0.1 do best, 0.3 diverges),
#: as a first run's often is.
REGISTERED_LR = 0.001


def fit(task: Regression, opt, steps: int, guard=None, seen=None) -> float:
    """``steps`` steps (through ``guard`` when given, appending ``(step, lr it used)`` to
    ``seen``: the effective lr, the user's times trimtab's multiplier); the loss over the
    whole data set."""
    for _ in range(steps):
        xb, yb = task.batch()
        loss = task.loss(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is None:
            opt.step()
        else:
            guard.step(loss)
            if seen is not None:
                seen.append((guard.global_step - 1, guard.knobs.lr))
            # Between steps the param groups hold the user's own lr.
            assert opt.param_groups[0]["lr"] == REGISTERED_LR
            time.sleep(STEP_S)
    with torch.no_grad():
        return task.loss(task.x, task.y).item()


@pytest.fixture
def serve(serve_factory):
    return serve_factory(CONFIG)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_real_run_sweeps_rolls_back_and_trains_with_the_found_lr(serve, one_thread):
    srv = serve
    task = Regression(seed=3)
    opt = torch.optim.SGD(task.model.parameters(), lr=REGISTERED_LR, momentum=0.9)
    restored: list[int] = []
    with attach(
        task.model,
        opt,
        job="range",
        endpoint=srv.endpoint,
        report_every=10,
        checkpoint_every=100,
        on_rollback=restored.append,
    ) as guard:
        seen: list[tuple[int, float]] = []  # the sweep's steps, with the LR each used
        while not restored and guard.global_step < 600:
            fit(task, opt, 10, guard, seen)
        # Back to the sweep's start, or to a checkpoint the sweep reached before its lowest
        # loss (keeping its progress).
        assert len(restored) == 1 and restored[0] in (0, 100), restored
        fit(task, opt, 1, guard)
        lr_after = guard.knobs.lr
        loss = fit(task, opt, POST - 1, guard)
    base = Regression(seed=3)
    baseline = fit(
        base, torch.optim.SGD(base.model.parameters(), lr=REGISTERED_LR, momentum=0.9), POST
    )

    journal = srv.journal()
    acks = wait_for(
        lambda: [a for a in journal.events("range", "ack") if a.data["restored_step"] is not None]
    )
    assert acks and acks[0].data["restored_step"] == restored[0]
    ends = [e for e in journal.events("range", "decision") if e.data["rollback"]]
    assert ends and ends[0].data["rollback"]["cause"] == "lr_range_test"
    detail = next(p["detail"] for p in ends[0].data["proposals"]
                  if p.get("to_step") == restored[0])
    found, curve = detail["found_lr"], detail["curve"]
    print(
        f"found lr x{found:.4g} from a curve of {len(curve)} points (sweep "
        f"x{curve[0][0]:.3g} .. x{curve[-1][0]:.3g}, stopped: {detail['stop']}); loss after "
        f"{POST} steps {loss:.4f}, fixed lr {REGISTERED_LR}: {baseline:.4f}"
    )
    # The sweep went out once, live: from its arrival on, every step used the schedule's
    # LR exactly (so the curve does not depend on when commands arrived): the user's lr
    # times the schedule's multiplier.
    (sent,) = [s for e in journal.events("range", "decision") for s in e.data["schedules"] or ()
               if s["pieces"][0]["name"] == "exponential"]
    sweep = wire.LiveSchedule.model_validate(sent)
    back = next(i for i in range(1, len(seen)) if seen[i][0] < seen[i - 1][0])
    seen = seen[:back]  # the steps before the rollback
    followed = next(i for i, (s, lr) in enumerate(seen)
                    if lr == pytest.approx(REGISTERED_LR * sweep.value(s)))
    assert followed < 20 and len(seen) - followed > 50, (followed, len(seen))
    assert [lr for _, lr in seen[followed:]] == [
        pytest.approx(REGISTERED_LR * sweep.value(s), rel=1e-12) for s, _ in seen[followed:]]
    # The LR after the rollback: the found one (cosine at step 1 of POST from it).
    assert lr_after == pytest.approx(REGISTERED_LR * found, rel=0.01)
    # A sane pick for this model: inside the sweep, not at its ends, above the poor guess
    # (found is a multiplier on the registered lr).
    lo, hi = REGISTERED_LR / 100, REGISTERED_LR * 1000
    assert lo * 10 < REGISTERED_LR * found < hi / 10 and found > 1
    assert loss <= baseline, f"range test + cosine {loss:.4f} worse than fixed lr {baseline:.4f}"


def test_a_schedule_counts_its_steps_from_the_checkpoint_the_range_test_returned_to():
    st = job(LR)
    st.step = 100
    st.begin_phase("lr_range_test", 100)
    st.step = 300
    st.end_phase(0.02)
    st.step = 100  # rolled back
    cos = Cosine({"t_max": 1000})
    assert cos.step_origin(st.view()) == 100 and cos.lr_for(st.view()) == (0.02, 0.02)
    # A configured reference LR (absolute: x0.5 / LR), or use_found_lr=False, ignores the
    # range test.
    assert Cosine({"t_max": 1000, "lr": 0.5}).lr_for(st.view())[1] == pytest.approx(0.5 / LR)
    assert Cosine({"t_max": 1000, "use_found_lr": False}).step_origin(st.view()) == 0


# -- when the sweep runs: only on evidence the run's own LR is far off ----------------------


def _evidence(losses, spreads=None, nonfinite_at=None, used=None, aligned=None, lows=None,
              nonfinite=5, start=0, lasts=None, loss_trend=None, warm_start=None,
              ratios=None, config=None):
    """The range test's verdict on a job fed one report per loss (window 5, checkpoint 0
    listed, each report's health judged; ``used``: the loop's own LR per report, else
    ``LR``; ``aligned``: the update alignment per report; ``lows``: a report's lowest loss,
    where not the spread's; ``lasts``: a report's last loss, where not its mean;
    ``nonfinite`` non-finite steps in the reports ``nonfinite_at``
    (a number or a set); ``start``: the step of the registration; ``ratios``: the update
    ratio per report; ``config``: the policy's): the reason it starts its sweep at the
    last report, or None."""
    st = JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
        step=start, facts=wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
                                          dtype="float32", device="cpu"),
        loss_trend=loss_trend, warm_start=warm_start))
    bad = {nonfinite_at} if isinstance(nonfinite_at, int) else set(nonfinite_at or ())
    for i, loss in enumerate(losses, 1):
        spread = (spreads or {}).get(i, 1.05)
        take(st, wire.Report(
            job="j", seq=i, step=start + 5 * i, window=5, loss_mean=loss,
            loss_min=(lows or {}).get(i, loss / spread ** 0.5),
            loss_max=loss * spread ** 0.5, loss_last=(lasts or {}).get(i, loss),
            knobs=wire.Knobs(lr=used[i - 1] if used else LR),
            base=wire.Knobs(lr=used[i - 1] if used else LR),
            checkpoints=[start], nonfinite_grads=nonfinite if i in bad else 0,
            update_alignment=aligned[i - 1] if aligned else None,
            update_ratio=ratios[i - 1] if ratios else None), DivergenceThresholds())
    policy = LrRangeTest(config or {})
    out = policy.propose(st.view())
    _evidence.kind = (policy.evidence(st.view()) or (None,))[0]
    return (policy.far_off(st.view()), out)


def test_a_loss_registered_as_not_falling_is_never_evidence_nor_swept():
    """attach(loss_trend=False) (a PPO: its value loss grew 21.5 -> 24.1 in its first
    reports as the agent learned, read as "the loss rose", and the sweep's pick ended 5 of 5
    tuned runs at a tenth of bare's return): the same rise that starts a sweep of a
    supervised run starts none, and neither does a configured "always"."""
    rising = [2.0 + 0.1 * i for i in range(6)]
    assert "the loss rose" in _evidence(rising)[0] and _evidence.kind == "high"
    assert _evidence(rising, loss_trend=False)[1] == []
    st = JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR), loss_trend=False,
        facts=wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
                              dtype="float32", device="cpu")))
    take(st, wire.Report(job="j", seq=1, step=5, window=5, loss_mean=1.0,
                         knobs=wire.Knobs(lr=LR), checkpoints=[0]), DivergenceThresholds())
    assert LrRangeTest({"when": "always"}).propose(st.view()) == []


def test_a_rise_under_updates_that_each_go_downhill_is_no_evidence():
    """A loss that rises while nearly every update lines up with the next gradient: each
    step went downhill and the loss rose anyway, so what the run fits moves (a tuned PPO
    on CartPole, its value loss growing with the returns at +0.11..+0.30 from its first
    reports, was swept and ended at a tenth of bare's return). No evidence, either way:
    not "too high", and not the "too low" its alignments would otherwise say. A rise
    whose early alignments are all above 0 waits for a third; one at or below 0 among
    them (the benchmark's hot runs: -0.66 on the noisy quadratic at 100x, +0.19 then
    -0.11 on the digits CNN) keeps the rise's verdict."""
    rising = [2.0 + 0.1 * i for i in range(20)]
    ppo = [None, 0.11, 0.27, 0.25, 0.19, 0.2, 0.21, 0.19, 0.22, 0.22,
           0.21, 0.21, 0.19, 0.22, 0.22, 0.22, 0.2, 0.2, 0.23, 0.2]
    for n in range(2, 21):
        why, out = _evidence(rising[:n], aligned=ppo[:n])
        assert why is None and out == [], n
    # Without alignments (or with them turned off) the same rise starts the sweep.
    assert "the loss rose" in _evidence(rising[:3])[0]
    # Hot: an alignment at or below 0 among the first ones keeps the verdict.
    assert "the loss rose" in _evidence([2.0, 2.3], aligned=[None, -0.66])[0]
    why, (p,) = _evidence(rising[:3], aligned=[None, 0.19, -0.11])
    assert "the loss rose" in why and p.sweep and _evidence.kind == "high"
    # Every one above 0 but the median under the line: the rise stands at the third.
    assert _evidence(rising[:3], aligned=[None, 0.05, 0.1])[0] is None  # waits
    assert "the loss rose" in _evidence(rising[:4], aligned=[None, 0.05, 0.1, 0.08])[0]


def test_a_run_whose_optimizer_had_stepped_before_it_was_attached_is_past_its_start():
    """An optimizer that held state at attach (a run continued from its own checkpoint,
    without trimtab's state) has run at its LR already: no evidence, as for a run the
    controller met past its start (a regression continued at its floor was swept on a 7%
    rise of noise, and ended 1.07x worse than bare)."""
    rising = [2.0 + 0.1 * i for i in range(6)]
    assert "the loss rose" in _evidence(rising)[0]
    assert _evidence(rising, warm_start=True) == (None, [])


def test_a_run_at_a_sane_lr_is_never_swept():
    """A loss that falls, with an ordinary spread inside each window: no evidence, no
    sweep, whatever the report (the default is ``when = "evidence"``)."""
    falling = [4.0 * 0.97 ** i for i in range(30)]
    for n in range(1, 31):
        why, out = _evidence(falling[:n])
        assert why is None and out == []


@pytest.mark.parametrize(("case", "expect"), [
    (dict(losses=[4.0, 3.8, 3.7], nonfinite_at=2), "non-finite values"),
    (dict(losses=[4.0, 3.9, 40.0]), "the loss blew up by the window"),
    (dict(losses=[2.3, 2.4, 2.5]), "the loss rose from 2.3"),
    (dict(losses=[2.31 - 0.001 * i for i in range(20)]), "it did not fall 2%"),
])
def test_each_kind_of_evidence_starts_the_sweep(case, expect):
    why, out = _evidence(**case)
    assert why is not None and expect in why
    (p,) = out
    assert p.sweep and expect in p.reason


def test_bad_batches_the_guard_skipped_are_no_evidence_and_persistent_ones_are():
    """Non-finite steps in a report are evidence of an LR far too high only where they
    persist (the health judgement's, shared with the divergence guard): a burst of bad
    batches the client skipped, over within a report or the next, leaves the run's LR
    alone (a trial: two NaN batches in a tuned Trainer run started a sweep from step 0)."""
    falling = [4.0 * 0.97 ** i for i in range(12)]
    assert _evidence(falling, nonfinite_at={3, 4}, nonfinite=2)[0] is None
    why, _ = _evidence(falling, nonfinite_at={3, 4, 5}, nonfinite=2)
    assert why is not None and "non-finite values" in why
    assert "non-finite values" in _evidence(falling[:3], nonfinite_at=3)[0]  # a whole report


def test_a_controller_that_meets_a_run_past_its_start_looks_for_no_evidence():
    """A controller started late (or restarted without its journal) meets a run that has
    trained a while: its first reports are no start of a run, and a loss that wobbles by
    5% at the floor is no LR far too high (a trial: a run at step 1505, loss 0.0008 ->
    0.001, swept from the checkpoint at 1400 and left at 0.04x its tuned LR)."""
    wobbling = [0.00082, 0.00105, 0.0009]
    why, _ = _evidence(wobbling)
    assert why is not None and "rose" in why  # at the start of a run, that is a rise
    assert _evidence(wobbling, start=1505)[0] is None
    # A notebook re-trial: a run whose name the controller took over from a dead one at
    # ~12 windows in (a kernel restarted, the cell attached again) was swept on a noise
    # rise, back to its attach snapshot. Met past its first windows: no evidence.
    assert _evidence([0.02732, 0.031, 0.03398], start=60)[0] is None
    assert _evidence([0.02732, 0.031, 0.03398], start=10)[0] is not None  # two windows late


def test_a_fast_fall_from_the_initial_loss_is_no_blow_up():
    """A regression loss that falls from ~20 to ~3 within its first windows, with the
    per-window spread of small noisy batches (the windows ``bench.faults`` measured on its
    MLP at its tuned SGD LR: spreads up to 7x): a window spanning 7x is a fall, not a
    blow-up, as long as the loss never passes its first high."""
    means = [9.25, 3.29, 4.42, 2.8, 2.37, 1.16, 1.0, 0.69]
    spreads = {1: 6.71, 2: 3.96, 3: 1.49, 4: 1.88, 5: 6.0}
    for n in range(1, len(means) + 1):
        assert _evidence(means[:n], spreads)[0] is None
    # The same start, then a new high far above the lowest loss: that is a blow-up.
    why, _ = _evidence([*means[:4], 60.0], spreads)
    assert why is not None and "blew up" in why


def test_noisy_batches_or_a_few_bad_ones_are_no_blow_up_and_no_rise():
    """A window's highest loss is one batch. Small noisy batches spread a healthy, falling
    window 7x (a trial: a regression at batch 8, AdamW at its tuned LR, one window 2.1 to
    14.5, was swept from step 0 and ended 35x its bare run), and three bad batches lift a
    window's mean 1e4-fold (a trial: Lightning, a tuned run, its own clip absorbing them):
    neither lifts a window's lowest loss, which is what a blow-up or a rise lifts."""
    noisy = [7.47, 5.56, 4.1, 3.2, 2.6, 2.2]
    assert _evidence(noisy, spreads={2: 6.8, 3: 5.0})[0] is None
    blip = [0.71, 0.3, 0.1, 0.05, 16767.0, 0.04]
    assert _evidence(blip, spreads={5: 1e9}, lows={5: 0.037}, lasts={5: 0.041})[0] is None
    # A run that never got far from its start, its mean lifted by its worst batches: that
    # is a rise (a CNN at 30x its LR, hovering at its initial 2.30, a window of 2.36-2.99).
    why, _ = _evidence([2.30, 2.22, 2.34, 2.52], lows={4: 2.36}, lasts={4: 2.36})
    assert why is not None and "rose" in why
    # One unusually low batch, then ordinary windows: no blow-up from it.
    assert _evidence(noisy, spreads={2: 6.8, 3: 5.0}, lows={2: 0.3})[0] is None
    # The same run when the whole window stands up: a rise; and when the window's mean and
    # its end are up, its start still low (a hot CNN turning up mid-window: digits at 10x,
    # 2.30 -> 0.81 -> a window of 1.90-4.84 ending high): a rise too.
    why, _ = _evidence([0.71, 0.3, 0.1, 0.9, 0.95], lows={4: 0.85, 5: 0.9})
    assert why is not None and ("rose" in why or "blew up" in why)
    why, _ = _evidence([2.30, 2.27, 1.27, 0.81, 2.64], lows={5: 0.7}, lasts={5: 4.8})
    assert why is not None and "rose" in why
    # ... and when the window ends lower, as it jumps whole above the window before
    # (digits at 10x: 0.53-1.23, then 1.90-4.84 ending at 1.97).
    why, _ = _evidence([2.30, 2.27, 1.27, 0.81, 2.64], spreads={4: (1.23 / 0.53)},
                       lows={4: 0.53, 5: 1.90}, lasts={5: 1.97})
    assert why is not None and "jumped" in why


def test_a_window_dipping_below_zero_is_no_blow_up():
    """A loss with a noise term (the noisy quadratic's, a negative log-likelihood's) can
    dip below 0 within a window: every loss is "4x" a negative lowest, so the ratio says
    nothing, and a window of 5.5-6.5 after a lowest of -0.6 in a run falling from 5 is no
    blow-up (the noisy quadratic at 10x its tuned LR was swept on it, and ended 1.28x its
    bare run; this one has risen past its start, which says so). Against a positive lowest,
    the same window still is one."""
    why, _ = _evidence([5.0, 2.0, 6.0], spreads={2: 4.0}, lows={2: -0.6, 3: 5.5})
    assert why is not None and "blew up" not in why and "rose" in why
    assert _evidence([5.0, 2.0], spreads={2: 4.0}, lows={2: -0.6})[0] is None
    why, _ = _evidence([5.0, 2.0, 6.0], spreads={2: 4.0}, lows={2: 0.6, 3: 5.5})
    assert why is not None and "blew up" in why


def test_a_loss_that_jumped_and_settled_at_its_start_is_too_hot_and_a_flat_one_too_cold():
    """Adam at 100x its LR: the loss jumps to ~40 within the first window and settles back
    at the initial ~2.3, where it stays (a dead network). No report after the first
    reaches a new high and the mean falls from the first report's, so only the first
    report's lowest loss (about the initial one) shows that nothing was learnt; the jump
    says which way the LR is off. A loss flat from the start says "too low"."""
    stuck = [10.0] + [2.34] * 19
    why, _ = _evidence(stuck, spreads={1: (10.0 / 2.3) ** 2})
    assert why is not None and "did not fall" in why and _evidence.kind == "high"
    why, _ = _evidence([2.31 - 0.001 * i for i in range(20)])
    assert why is not None and _evidence.kind == "low"


def test_a_flat_loss_whose_batch_noise_would_hide_the_fall_is_no_evidence():
    """A model trained to its floor, attached fresh (a fine-tune, a continued run): its
    reports do not fall 2%, but their batches spread the loss so widely that a 2% fall
    would not show (a regression at batch 32: 2% of the loss was 0.47-0.60 of two standard
    errors of a three-report mean; swept, the runs ended 1.04-1.15x worse than bare). The
    same flat means from windows spread 5% is evidence."""
    flat = [0.0136 * (1 + 0.005 * ((-1) ** i)) for i in range(20)]
    why, out = _evidence(flat)  # each window spread 1.05x: a fall of 2% would show
    assert "it did not fall 2%" in why and out[0].sweep
    noisy = dict.fromkeys(range(1, 21), 3.0)  # each window spread 3x: batches of 32
    assert _evidence(flat, spreads=noisy) == (None, [])


def test_a_flat_loss_under_the_loops_own_warm_up_is_no_evidence():
    """nanoGPT warms its LR up over 2000 iterations: over the first 20 reports the loss
    barely moves at a still tiny LR. That is the loop's schedule, not an LR far too low;
    the same flat loss at a steady LR is."""
    flat = [2.31 - 0.001 * i for i in range(20)]
    warm = [LR * (i + 1) / 200 for i in range(20)]
    assert _evidence(flat, used=warm)[0] is None
    assert "did not fall" in _evidence(flat, used=[LR] * 20)[0]


def test_updates_that_keep_lining_up_with_the_next_gradient_say_the_lr_is_too_low():
    """A loss that falls steadily (no flat-loss evidence), but each update lines up with
    the next gradient: the hypergradient says a larger LR would have gone further. Only the
    second half of the evidence window counts (every run's first steps line up); at a
    tuned LR the alignment sits near zero; under the loop's own warm-up it is no evidence."""
    falling = [4.0 * 0.97 ** i for i in range(20)]
    early_only = [0.5] * 10 + [0.02] * 10
    assert _evidence(falling, aligned=early_only)[0] is None
    tuned = [0.5] * 10 + [0.05, -0.1, 0.04, -0.02, 0.1, 0.0, 0.03, -0.05, 0.02, 0.01]
    assert _evidence(falling, aligned=tuned)[0] is None
    cold = [0.5] * 10 + [0.3, 0.2, 0.25, 0.1, 0.28, 0.22, 0.31, 0.19, 0.26, 0.24]
    why, (p,) = _evidence(falling, aligned=cold)
    assert "median cos(g, -update) +0.24 > 0.15" in why and _evidence.kind == "low"
    assert p.sweep and "lined up" in p.reason
    # Fewer than five reports with an alignment: nothing said yet.
    assert _evidence(falling[:14], aligned=cold[:14])[0] is None
    # A median over the line is not enough while two in five (or three in ten) say
    # otherwise: a noisy tuned run (a small-batch regression, one sampled step per report)
    # whose first five late reports have a median of +0.17, and whose ten do not line up
    # (as journaled in a user's trial; swept, it ended 1.07x worse than bare).
    noisy = [0.5] * 10 + [0.254, 0.171, 0.498, -0.043, -0.301, -0.233, 0.591, 0.241,
                          -0.063, -0.34]
    for n in range(15, 21):
        assert _evidence(falling[:n], aligned=noisy[:n])[0] is None
    # One in five against is allowed: a run far too low whose sampled step once was not.
    once = cold[:12] + [-0.05] + cold[13:]
    assert "(9 of them above 0)" in _evidence(falling, aligned=once)[0]
    warm = [LR * (i + 1) / 40 for i in range(20)]
    assert _evidence(falling, aligned=cold, used=warm)[0] is None


def test_a_sweep_of_a_run_too_low_begins_at_its_lr_and_never_picks_below_it():
    """Evidence says the run's own LR is too low (its updates line up with the next
    gradient); the sweep begins there, not at a hundredth of it, and its loss still falls at
    the sweep's top: "min / 10" would hand the run its own LR back (the width MLP's 10x-too-
    low runs lost 2.5-4.5% that way); the pick is halfway up, in log, to the lowest loss."""
    c = client()
    engine = Engine([LrRangeTest({"sweep_steps": 100, "beta": 0.0})], WIDE)
    decisions = []
    for _ in range(60):
        c.advance()
        lr = c.act.used().lr
        d = c.exchange(engine, loss_mean=1.0 / (1.0 + lr / LR), update_alignment=0.3).decision
        decisions.append(d)
        if d.rollback is not None:
            break
    first = next(p for d in decisions for n, p in d.proposals
                 if n == "lr_range_test" and p.sweep)
    assert first.value == pytest.approx(1.0, rel=0.03) and "lined up" in first.reason
    end = finished(decisions)
    best = min(end.detail["curve"], key=lambda p: p[1])[0]
    assert best == end.detail["curve"][-1][0]  # still falling at the top
    assert end.detail["found_lr"] == pytest.approx(math.sqrt(1.0 * best), rel=0.03)
    assert end.detail["found_lr"] > 1.0 and "halfway" in end.reason


def test_past_the_start_of_the_run_no_evidence_counts():
    rising = [2.0] + [2.5] * 25  # rose at once, but the verdict is only taken early on
    assert _evidence(rising[:5])[0] is not None
    assert _evidence(rising)[0] is None


def test_in_shadow_the_sweep_is_journaled_once_as_live_would_open_it():
    """A sweep cannot run in shadow (its later proposals read the run's own sweep). The
    shadow decision that live would open the phase with carries the sweep's first value
    with the bounds only (live's phase values are past the governor's step limits), says
    what live would then do, and the range test proposes nothing more in shadow for the
    job, also after a controller restart. Before: at every report a shadow row proposing
    the same opening, governed as an ordinary change (x1 -> x0.5, then held by the
    cooldown and shown as 'would propose')."""
    c = client()
    policy = LrRangeTest({"when": "always", "sweep_steps": 60})
    lo, _ = policy.sweep_range(c.state.view())
    engine = Engine([], WIDE, shadow_policies=[policy])
    shadowed = []
    for _ in range(12):
        c.advance()
        d = c.exchange(engine, loss_mean=1.0).decision
        assert d.commands == {} and d.rollback is None  # nothing live
        shadowed.append(d.shadowed)
    opened = [s for s in shadowed if any(n == "lr_range_test" for n, _ in s.proposals)]
    assert len(opened) == 1, [s.to_dict()["knobs"] for s in opened]
    kd = opened[0].knobs["lr"]
    assert (kd.current, kd.commanded) == (1.0, pytest.approx(lo))
    assert "max_step_ratio" not in kd.limits and "sweep cannot run in shadow" in kd.reason
    # Kept with the job's state: a restarted controller asks it nothing more either.
    back = JobState.from_state_dict(json.loads(json.dumps(c.state.state_dict())))
    assert back.shadow_phases == c.state.shadow_phases == {"lr_range_test": opened[0].step}


def test_a_run_resumed_at_its_start_is_at_its_start_for_the_evidence():
    """A preemption re-trial: killed at step 120 with only step 0 stable and resumed there,
    the run never had its range test (final loss 0.0119 against 0.0089 uninterrupted): the
    evidence window counted every report the controller had seen, those of the path the
    resume set aside too, and was over by step 90 of the resumed path. It counts the
    reports of the run's path."""
    facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="AdamW",
                            dtype="float32", device="cpu")
    st = JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR),
        step=0, facts=facts))

    def report(seq: int, step: int, loss: float) -> None:
        take(st, wire.Report(job="j", seq=seq, step=step, window=5, loss_mean=loss,
                             loss_min=loss, loss_max=loss, loss_last=loss,
                             knobs=wire.Knobs(lr=LR), base=wire.Knobs(lr=LR), checkpoints=[0]),
             DivergenceThresholds())

    for i in range(1, 25):  # the killed process: 24 reports of a steady fall
        report(i, 5 * i, 4.0 * 0.99 ** i)
    st.on_resumed(wire.Register(job="j", run_id="r", report_every=5, knobs=wire.Knobs(lr=LR),
                                base=wire.Knobs(lr=LR), step=0, facts=facts, resume=1,
                                resume_step=0, checkpoints=[0]))
    for i, loss in enumerate([0.00082, 0.00105, 0.0009], 1):  # a rise, at the run's start
        report(i, 5 * i, loss)
    assert st.reports_seen == 27
    why = LrRangeTest().far_off(st.view())
    assert why is not None and "rose" in why


def test_no_sweep_for_an_optimizer_that_reads_its_lr_once():
    """torch's Rprop reads its lr only at its first step (an optimizer trial: x0.01 left its
    updates 1.94x larger): a sweep of its multiplier would measure nothing. Configured to
    run always, the range test still opens no phase for it; AdamW's does."""
    rprop = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="Rprop",
                            dtype="float32", device="cpu")
    c = Client(one_param("Rprop", LR), facts=rprop, checkpoints=(0, 100, 200), rollback=RB)
    engine = Engine([LrRangeTest({"when": "always"})], WIDE, live_schedules=True)
    assert not any(d.proposals for d in drive(engine, c, lambda lr: 1.0, 4))
    assert c.state.phase is None
    c = client()
    drive(engine, c, lambda lr: 1.0, 2)
    assert c.state.phase is not None


def test_a_rise_under_small_updates_is_a_plateaus_noise_not_evidence():
    """A sweep trial's tanh MLP at its best lrs: its loss on a plateau near its initial
    value for 100-150 steps rose 5-7% over its first reports (the batches' noise) with
    update ratios of 0.004-0.013, was swept from step 0 and ended near its initial loss in
    5 of 12 runs (python -m bench.plateau). The same rise with updates of a too-hot start
    (the digits CNN at 10x: 0.05-0.12) starts the sweep; so does it with the gate off."""
    plateau = [0.626, 0.658, 0.635]
    assert _evidence(plateau, ratios=[0.0067, 0.0064, 0.0045]) == (None, [])
    why, (p,) = _evidence(plateau, ratios=[0.023, 0.032, 0.076])
    assert "the loss rose" in why and p.sweep
    off = {"rise_update_ratio": None}
    assert "the loss rose" in _evidence(plateau, ratios=[0.0067, 0.0064, 0.0045],
                                        config=off)[0]
    # Reports that carry no ratio (an older client): the rise stands, as before.
    assert "the loss rose" in _evidence(plateau)[0]


def test_a_gated_rise_leaves_the_run_to_the_rules_for_an_lr_too_low():
    """A rise the update-ratio gate sets aside is no evidence of an lr too high, and only
    that: a run that then does not fall over its first 20 reports under tiny updates is
    still found too cold (the gate once returned early, and no later rule read the run)."""
    flat = [1.0, 1.06] + [1.0] * 18
    why, out = _evidence(flat, ratios=[0.001] * 20)
    assert "did not fall" in why and _evidence.kind == "low", why
    assert out and out[0].sweep
    # At the rise itself, nothing yet (the gate), where the gate off says "rose".
    assert _evidence(flat[:3], ratios=[0.001] * 3)[0] is None
    assert "the loss rose" in _evidence(flat[:3], ratios=[0.001] * 3,
                                        config={"rise_update_ratio": 1e-12})[0]
