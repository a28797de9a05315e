"""DivergenceGuard on synthetic streams: rolls back on divergence, quiet on healthy noise.

Each report is judged as the controller judges it (:func:`~trimtab.controller.advance.take`,
under ``[rollback.health]``); the guard proposes from that one verdict.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from trimtab.controller.advance import advance, take
from trimtab.controller.engine import Engine
from trimtab.controller.health import DivergenceThresholds, assess
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.state import JobState
from trimtab.policies.divergence_guard import DivergenceGuard
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="AdamW",
                        dtype="float32", device="cpu")
EVERY = 10


def job(**registered) -> JobState:
    reg = wire.Register(job="d", run_id="r", report_every=EVERY, facts=FACTS,
                        knobs=wire.Knobs(lr=1e-3), **registered)
    return JobState.from_register(reg)


def window(losses: list[float], grads: list[float]) -> dict:
    """A report's fields from the per-step losses and gradient norms of its window."""
    return {"loss_mean": sum(losses) / len(losses), "loss_min": min(losses),
            "loss_max": max(losses), "grad_norm_mean": sum(grads) / len(grads),
            "grad_norm_max": max(grads)}


def healthy(kind: str, rng: random.Random, i: int) -> dict:
    """One healthy report window of a stream ``kind``."""
    t = i * EVERY
    if kind == "gauss":  # a slow descent with Gaussian noise
        losses = [3.0 - 2e-4 * t + rng.gauss(0, 0.05) for _ in range(EVERY)]
        grads = [1.0 + rng.gauss(0, 0.1) for _ in range(EVERY)]
    elif kind == "early":  # a fast fall, the gradient norm rising then falling
        base, g = 1.0 + 4.0 * math.exp(-t / 400), 0.5 + 2.0 * (t / 300) * math.exp(1 - t / 300)
        losses = [base * (1 + rng.gauss(0, 0.03)) for _ in range(EVERY)]
        grads = [g * rng.lognormvariate(0, 0.3) for _ in range(EVERY)]
    else:  # "floor": near a loss floor, heavy-tailed, with rare hard batches (x50, x8)
        mean = 0.02 + 0.5 * math.exp(-t / 300)
        hard = [rng.random() < 0.002 for _ in range(EVERY)]
        losses = [rng.expovariate(1 / mean) * (50 if h else 1) for h in hard]
        grads = [0.2 * rng.lognormvariate(0, 0.3) * (8 if h else 1) for h in hard]
    return window(losses, grads)


def feed(st: JobState, i: int, knobs: wire.Knobs | None = None, **fields) -> None:
    """One report; ``knobs``: what the optimizer used (default: the job's)."""
    take(st, wire.Report(job="d", seq=i, step=EVERY * i, window=EVERY,
                         knobs=knobs or st.knobs, **fields), DivergenceThresholds())


def proposals(st: JobState, th: dict | None = None, **config) -> list:
    """The guard's proposals on the latest report; with thresholds ``th`` the report is
    judged again first, as a controller with those ``[rollback.health]`` values would."""
    view = st.view()
    if th is not None:
        view = dataclasses.replace(view, health=assess(view, DivergenceThresholds(**th)))
    return DivergenceGuard(config).propose(view)


def calm(st: JobState, n: int, seed: int = 0, kind: str = "gauss", start: int = 1) -> int:
    rng = random.Random(seed)
    for i in range(start, start + n):
        feed(st, i, **healthy(kind, rng, i))
    return start + n


def alarms(th: dict, kind: str, seeds: int = 20, n: int = 400) -> int:
    """Reports at which the guard fires on healthy streams, judged under thresholds ``th``."""
    hits = 0
    for seed in range(seeds):
        st, rng = job(), random.Random(seed)
        for i in range(1, n + 1):
            feed(st, i, **healthy(kind, rng, i))
            hits += bool(proposals(st, th))
    return hits


@pytest.mark.parametrize("kind", ["gauss", "early", "floor"])
def test_healthy_noisy_streams_never_trigger_at_the_defaults(kind):
    # 8,000 reports per kind. On real healthy runs (a spiral MLP, SGD and AdamW, 18 runs of
    # 300 reports) the defaults were silent too, except at real loss spikes (x8, x15).
    assert alarms({}, kind) == 0


def test_the_materiality_tests_are_what_keeps_heavy_tails_quiet():
    # On z-scores alone, rare hard batches near the loss floor look like gradient spikes.
    z_only = {"loss_min_rise": 0.0, "grad_norm_min_ratio": 1.0, "climb_min_rise": 0.0}
    assert alarms(z_only, "floor") >= 5
    assert alarms({"grad_norm_z": 4.0, "grad_norm_min_ratio": 1.0}, "gauss") > 0


def test_non_finite_values_roll_back_at_once_even_in_warm_up():
    st = job()
    feed(st, 1, loss_mean=None, nonfinite_losses=EVERY, nonfinite_grads=EVERY - 1)
    (prop,) = DivergenceGuard().propose(st.view())
    assert (prop.knob, prop.rollback, prop.factor) == ("lr", "nonfinite", 0.5)
    assert prop.reason == (f"non-finite values in the last report: {EVERY} losses, "
                           f"{EVERY - 1} gradients")
    assert proposals(st, {"nonfinite_min": EVERY + 1}) == []


def test_a_burst_of_skipped_bad_batches_is_no_fault_and_a_recurring_one_is():
    """Three bad batches in a row, skipped by the guard: the weights are as they were, no
    rollback; again in the next report (a burst over the report's end): still none; in a
    third report in a row: persistent."""
    st = job()
    nxt = calm(st, 30)
    feed(st, nxt, nonfinite_losses=3, nonfinite_grads=3)
    assert DivergenceGuard().propose(st.view()) == []
    feed(st, nxt + 1, nonfinite_losses=2, nonfinite_grads=2)
    assert DivergenceGuard().propose(st.view()) == []
    feed(st, nxt + 2, nonfinite_losses=1, nonfinite_grads=1)
    (prop,) = DivergenceGuard().propose(st.view())
    assert prop.rollback == "nonfinite"


def test_a_loss_spike_that_fills_the_window_rolls_back():
    st = job()
    nxt = calm(st, 50)
    feed(st, nxt, **window([4.0] * EVERY, [1.0] * EVERY))
    (prop,) = proposals(st, fallback_cut=0.3)
    z = st.view().signals.loss_z
    assert prop.rollback == "loss_spike" and prop.factor == 0.3 and z > 6
    assert prop.reason.startswith(f"loss spike: z={z:.1f} > 6, lowest loss of the window +")


def test_one_bad_batch_is_not_a_spike():
    st = job()
    nxt = calm(st, 50)
    losses = [2.95] * (EVERY - 1) + [25.0]  # lifts the mean, not the rest of the window
    feed(st, nxt, **window(losses, [1.0] * EVERY))
    assert st.view().signals.loss_z > 6 and DivergenceGuard().propose(st.view()) == []


def test_a_gradient_norm_explosion_rolls_back_a_burst_does_not():
    st = job()
    nxt = calm(st, 50)
    feed(st, nxt, **window([2.9] * EVERY, [6.0] * EVERY))  # 6x: z huge, but a burst
    assert st.view().signals.grad_norm_z > 10 and DivergenceGuard().propose(st.view()) == []
    st = job()
    nxt = calm(st, 50)
    feed(st, nxt, **window([2.9] * EVERY, [30.0] * EVERY))
    (prop,) = DivergenceGuard().propose(st.view())
    assert prop.rollback == "grad_spike" and "30x its EMA" in prop.reason


def test_no_spike_is_judged_in_warm_up():
    st = job()
    nxt = calm(st, 15)  # z-scores exist from report 11, spikes are judged after 20
    feed(st, nxt, **window([40.0] * EVERY, [40.0] * EVERY))
    assert DivergenceGuard().propose(st.view()) == []
    assert proposals(st, {"warmup_reports": 10}) != []


def _climbing(st: JobState, start: int, n: int, rate: float = 0.01, seed: int = 1,
              align: float | None = None) -> int:
    """Reports whose loss rises by ``rate`` per report from the current level; with
    ``align``, each carries an update alignment spread +-0.1 around it."""
    rng, level = random.Random(seed), st.view().signals.loss_ema
    for i in range(start, start + n):
        base = level + rate * (i - start + 1)
        extra = {} if align is None else {"update_alignment": align + rng.uniform(-0.1, 0.1)}
        feed(st, i, **window([base + rng.gauss(0, 0.02) for _ in range(EVERY)],
                             [1.0 + rng.gauss(0, 0.1) for _ in range(EVERY)]), **extra)
    return start + n


def test_a_sustained_climb_rolls_back():
    st = job()
    nxt = _climbing(st, calm(st, 40), 25)
    (prop,) = DivergenceGuard().propose(st.view())
    sig = st.view().signals
    assert prop.rollback == "climb" and sig.slope_t > 4
    assert prop.reason.startswith("loss climbing: slope ")
    assert f"over {st.step - sig.slope_since_step} steps" in prop.reason
    # A climb the latest window dips out of is a bump, not a climb.
    ema = st.view().signals.loss_ema
    feed(st, nxt, **window([ema + 0.3] * (EVERY - 1) + [ema - 0.05], [1.0] * EVERY))
    assert st.view().signals.slope_t > 4 and DivergenceGuard().propose(st.view()) == []


def test_a_loss_registered_as_not_falling_is_never_judged_a_climb():
    """attach(loss_trend=False) (a PPO, whose value loss grows with its returns: 10 of 10
    tuned runs were rolled back for climbing in a trial): the same climb that rolls a
    supervised run back is no verdict; a spike still is."""
    st = job(loss_trend=False)
    assert not st.view().loss_trend
    nxt = _climbing(st, calm(st, 40), 25)
    assert st.view().signals.slope_t > 4
    assert assess(st.view(), DivergenceThresholds()) is None
    assert DivergenceGuard().propose(st.view()) == []
    ema = st.view().signals.loss_ema
    feed(st, nxt, **window([ema * 50] * EVERY, [1.0] * EVERY))
    assert assess(st.view(), DivergenceThresholds()).cause == "loss_spike"


@pytest.mark.parametrize("align, judged", [(0.25, False), (-0.05, True), (0.05, True)])
def test_a_climb_under_updates_that_each_go_downhill_is_no_verdict(align, judged):
    """A loss that climbs while nearly every update lines up with the next gradient (a
    tuned PPO, its value loss growing with the returns: median cos(g, -update) +0.2, 10
    of 10 runs rolled back in a trial) is a moving target, not a divergence; the same
    climb under updates spread around 0 (an overshooting run) still rolls back."""
    st = job()
    _climbing(st, calm(st, 40), 25, align=align)
    assert st.view().signals.slope_t > 4
    verdict = assess(st.view(), DivergenceThresholds())
    assert (verdict is not None and verdict.cause == "climb") is judged
    # Turned off, the gate judges every climb.
    assert assess(st.view(), DivergenceThresholds(climb_align=None)).cause == "climb"


def test_a_level_shift_is_no_climb_and_a_climb_after_a_jump_still_is():
    """The data got harder (a curriculum's next stage, a new data mixture): the loss jumps
    once, then falls as the run adapts. Over a slope window holding the jump that reads as
    a significant slope (a trial's regression, stage 2 at step 400, was rolled back 255
    steps at x0.5, its gradient norm up 2.5x); it is no climb. A jump that the loss keeps
    climbing after is one, as is a rise already under way before its largest jump, and a
    jump the loss stays flat after as its gradients fade (a network a bad step killed)."""
    def run(after_rate: float, th: DivergenceThresholds, before_rate: float = 0.0,
            grad_after: float = 1.5, lr_after: float = 1.0) -> list:
        st, rng = job(), random.Random(3)
        nxt = calm(st, 30)
        if before_rate:
            nxt = _climbing(st, nxt, 10, rate=before_rate)
        level = st.view().signals.loss_ema + 0.5  # the jump
        lr = wire.Knobs(lr=st.knobs.lr * lr_after)  # what the optimizer used after it
        causes = []
        for k in range(12):
            base = level + after_rate * k
            feed(st, nxt + k, knobs=lr,
                 **window([base + rng.gauss(0, 0.05) for _ in range(EVERY)],
                          [grad_after + rng.gauss(0, 0.01) for _ in range(EVERY)]))
            verdict = assess(st.view(), th)
            causes.append(None if verdict is None else verdict.cause)
        return causes
    # loss_z off: a jump this clean is also a loss spike, judged first; the climb is tested.
    default = DivergenceThresholds(loss_z=1e9)
    off = DivergenceThresholds(loss_z=1e9, climb_shift=None)
    assert "climb" in run(-0.01, off)  # the rule's own reading of the window
    assert "climb" not in run(-0.01, default)  # jumped, then falling: a level shift
    assert "climb" not in run(0.0, default)  # jumped, then flat
    # Jumped, then flat with its gradients fading: a network a bad step killed.
    assert "climb" in run(0.0, default, grad_after=0.1)
    # Jumped as the loop's own LR went up 2x (a ramp into instability): no shift.
    assert "climb" in run(0.0, default, lr_after=2.0)
    assert "climb" in run(0.03, default)  # jumped, then climbing on
    # A rise under way before its largest jump: a climb while the jump is too new to tell.
    assert run(-0.01, default, before_rate=0.02)[0] == "climb"


def test_a_climb_across_an_lr_change_is_not_judged():
    st = job()
    nxt = calm(st, 40)
    st.note_change("lr", "someone", 1e-3, 2e-3, 1000)  # at the step of report 40
    guard, fired, rng = DivergenceGuard(), [], random.Random(1)
    level = st.view().signals.loss_ema
    for i in range(nxt, nxt + 30):
        base = level + 0.01 * (i - nxt + 1)
        feed(st, i, **window([base + rng.gauss(0, 0.02) for _ in range(EVERY)], [1.0] * EVERY))
        if guard.propose(st.view()):
            fired.append(st.view().signals.slope_since_step)
    assert fired and min(fired) > 400  # never while the window spans the change at 400
    # Without the change, the same climb is judged as soon as the window holds it.
    st2 = job()
    calm(st2, 40)
    _climbing(st2, nxt, 15)
    assert DivergenceGuard().propose(st2.view())[0].rollback == "climb"


def test_a_spike_that_begins_at_a_windows_first_step_is_caught_at_the_next_report():
    """The LR blows up at a window's first step (a minGPT trial: one step at 1000x its LR):
    that window's lowest loss is its first step's, from before the blow-up, so it is no
    spike there, and by the next report its mean has lifted the variance the z-score is
    measured against (z 56 then 1.7 in the trial: never caught, the run ended 24x worse).
    The next window standing whole above the EMA makes it one. Bad batches that the run
    got past leave the next window at the EMA: no spike."""
    for blew_up, expect in ((True, "loss_spike"), (False, None)):
        st = job()
        nxt = calm(st, 40)
        first = [3.0 - 2e-4 * nxt * EVERY]  # the first step's loss, from before it
        feed(st, nxt, **window(first + [40.0] * (EVERY - 1), [1.0] * EVERY))
        assert DivergenceGuard().propose(st.view()) == []  # its lowest is from before
        after = [30.0] * EVERY if blew_up else [2.9] * EVERY
        feed(st, nxt + 1, **window(after, [1.0] * EVERY))
        props = DivergenceGuard().propose(st.view())
        assert [p.rollback for p in props] == ([expect] if expect else [])
        if blew_up:
            assert "from the window before" in props[0].reason


def test_a_jump_too_large_for_the_ema_it_lifts_is_still_caught_at_the_next_report():
    """A controller trial: a loop's LR x100 bug (LambdaLR's base_lrs) under the user's own
    clip_grad_norm_(1.0), so no gradient spike: the loss went 0.049 -> 27.8 (window mean;
    its lowest 0.015, the step before the bug acted) -> 8.5 (lowest 0.685), then stayed at
    chance. The jump lifted the loss EMA 13-fold (alpha 0.05 of a 250x jump), and the next
    window's lowest loss was measured against that: below it, no spike, in 3 seeds of 4.
    The next window is measured against the EMA before the jump."""
    st = job()
    nxt = calm(st, 60, kind="floor")
    ema = st.view().signals.loss_ema
    first = [0.3 * ema]  # the first step's loss, from before the bug acted
    feed(st, nxt, **window(first + [25 * ema * 30] * (EVERY - 1), [0.9] * EVERY))
    assert DivergenceGuard().propose(st.view()) == []  # its lowest is from before
    feed(st, nxt + 1, **window([0.685 / 0.049 * ema] + [8.5 / 0.049 * ema] * (EVERY - 1),
                               [0.75] * EVERY))
    (prop,) = DivergenceGuard().propose(st.view())
    assert prop.rollback == "loss_spike" and "from the window before" in prop.reason


def test_the_most_urgent_cause_leads_and_every_cause_is_in_the_reason():
    st = job()
    nxt = calm(st, 50)
    feed(st, nxt, nonfinite_grads=EVERY, **window([6.0] * EVERY, [40.0] * EVERY))
    (prop,) = DivergenceGuard().propose(st.view())
    assert prop.rollback == "nonfinite"
    assert "loss spike" in prop.reason and "grad norm spike" in prop.reason


def test_registered_and_config_validated():
    assert isinstance(load_policy("divergence_guard"), DivergenceGuard)
    with pytest.raises(PolicyLoadError, match=r"fallback_cut=1: Input should be less than 1"):
        load_policy("divergence_guard", {"fallback_cut": 1})
    with pytest.raises(PolicyLoadError, match=r"loss_zz=.*allowed fields: fallback_cut"):
        load_policy("divergence_guard", {"loss_zz": 3})
    # The thresholds are the controller's: the error says where they went.
    with pytest.raises(PolicyLoadError, match=r"loss_z: .*under \[rollback.health\]"):
        load_policy("divergence_guard", {"loss_z": 8})


def test_the_guard_acts_on_the_controllers_one_judgement():
    """One judgement per report, shared with stable marking: the guard follows the
    controller's [rollback.health] thresholds, and has none of its own."""
    def spike(health: DivergenceThresholds):
        st = job()
        engine = Engine([DivergenceGuard()], rollback=RollbackConfig(health=health))
        rng = random.Random(0)
        for i in range(1, 51):
            advance(st, wire.Report(job="d", seq=i, step=EVERY * i, window=EVERY,
                                    knobs=st.knobs, **healthy("gauss", rng, i)), engine)
        return st, advance(st, wire.Report(job="d", seq=51, step=EVERY * 51, window=EVERY,
                                           knobs=st.knobs,
                                           **window([4.0] * EVERY, [1.0] * EVERY)), engine)

    st, out = spike(DivergenceThresholds())
    assert out.health.cause == "loss_spike" and st.view().health == out.health
    assert [p.rollback for _, p in out.decision.proposals] == ["loss_spike"]
    # The same spike under a controller that asks for z > 100: no verdict, no proposal, and
    # the rollback manager saw a healthy report too.
    st, out = spike(DivergenceThresholds(loss_z=100))
    assert out.health is None and out.decision.proposals == ()
    assert st.rollback.last_unhealthy_step is None


@pytest.mark.parametrize("moved", [True, False])
def test_a_climb_the_restored_weights_score_as_high_as_turns_climb_verdicts_off(moved):
    """The counterfactual a climb rollback runs: the restored checkpoint's first two
    reports against its loss when it was taken. A loss that rises with the data (a target
    that grows with the loop's own iteration count, which a rollback does not rewind, as a
    value loss grows with the returns) is as high on the restored weights as on the run
    that climbed: climb verdicts go off for the job, journaled once, and the next climb
    rolls nothing back (before: 3 climb rollbacks and the budget's alert in a trial, a
    2-rank FSDP run whose target's scale grew 1 -> 3). A climb the weights made (keyed on
    the optimizer step, which the restore rewinds) is back at the checkpoint's loss on the
    restored weights: verdicts stay on, and the next climb is rolled back again."""
    from tests.policies.simclient import Client, one_param
    from trimtab.controller.advance import advance

    rb = RollbackConfig(cooldown_steps=0)
    c = Client(one_param("AdamW", 1e-3), facts=FACTS, checkpoints=tuple(range(0, 3000, 50)),
               rollback=rb)
    engine = Engine([DivergenceGuard()], rollback=rb)
    rng, it, moved_at, rollbacks = random.Random(0), 0, [], []

    def loss(step: int) -> float:
        t = it if moved else step  # the loop's own count, or the weights' (the step)
        return 1.0 + (0.0 if t < 400 else 0.0015 * (t - 400))

    for _ in range(150):
        c.advance()
        it += EVERY
        level = loss(c.step)
        out = advance(c.state, c._report(**window(
            [level * (1 + rng.gauss(0, 0.05)) for _ in range(EVERY)], [1.0] * EVERY)), engine)
        if out.observation.data_moved:
            moved_at.append(c.step)
        if out.command is not None:
            c.take(out.command)
            if out.command.rollback_to is not None:
                rollbacks.append((c.step, out.command.reasons))
                c.run(1)  # the step that runs from the restored checkpoint acknowledges it
    climbs = [r for r in rollbacks if any("climbing" in x for x in r[1])]
    if moved:
        # One climb rollback, and no rollback of any kind after it: the restored weights
        # scoring above the checkpoint's loss is what the check measures, not a spike.
        assert len(climbs) == len(rollbacks) == 1 and len(moved_at) == 1, (rollbacks, moved_at)
        assert c.state.view().climb_moved == moved_at[0]
    else:
        assert len(climbs) >= 2 and moved_at == [], (rollbacks, moved_at)
