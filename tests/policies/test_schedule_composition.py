"""Schedules composed with corrections, and live schedules, through the real engine.

A schedule is the base trajectory of its knob; other policies' factors are corrections
that persist on top of it (a plateau cut is not undone by the next scheduled value);
several schedules of one knob multiply as torch's ``ChainedScheduler``; a live schedule,
evaluated by the client's own code at every step with reports every 10 steps, follows
torch's scheduler at every optimizer step; the governor's limits still hold.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest
import torch
from torch.optim import lr_scheduler as sched

from tests._decide import decided, decided_schedules
from trimtab.controller.engine import Decision, Engine
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.controller.policy import Policy, Proposal, load_policy
from trimtab.controller.state import JobState
from trimtab.controller.tracker import SignalConfig
from trimtab.policies.cosine import Cosine
from trimtab.policies.plateau import Plateau
from trimtab.policies.step_decay import StepDecay
from trimtab.policies.warmup import Warmup
from trimtab.protocol import schedules

from ._schedule_cases import CASES, LR, OPENED, Case, make_optimizer, max_rel_err, torch_trace
from .simclient import Client

TOL = 1e-6
EVERY = 10


class Job:
    """A job under ``Engine(policies, governor)`` whose commands a client carries out (the
    real Actuator on a real optimizer at the user's constant lr ``LR``, live schedules
    evaluated by the client's own code), a report every ``every`` steps, and the
    schedules' reply to the registration taken before step 0."""

    def __init__(
        self,
        policies: Sequence[Policy],
        governor: GovernorConfig = OPENED,
        *,
        optimizer: str = "SGD",
        every: int = EVERY,
        live: bool = True,
        slope_window: int = 20,
        checkpoints: tuple[int, ...] = (),
    ) -> None:
        self.client = Client(make_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(2))]),
                             every=every, signal_cfg=SignalConfig(slope_window=slope_window),
                             checkpoints=checkpoints, job="c")
        self.engine = Engine(policies, Governor(governor), live_schedules=live)
        self.decisions: list[Decision] = []
        self.send(decided_schedules(self.engine, self.state))

    @property
    def state(self) -> JobState:
        return self.client.state

    @state.setter
    def state(self, state: JobState) -> None:
        self.client.state = state

    def send(self, d: Decision) -> None:
        assert not d.errors, d.errors
        self.decisions.append(d)
        self.client.send(d)

    def run(
        self, steps: int, loss: Callable[[int], float] = lambda t: 1.0, start: int = 0
    ) -> list[tuple[float, float | None]]:
        """``(lr, momentum)`` each optimizer step from ``start`` to ``steps`` uses."""
        c = self.client
        assert c.step == start, (c.step, start)
        first = len(c.trace)
        for t in range(start, steps):
            if t > c.reported and t % c.every == 0:
                d = c.exchange(self.engine, loss_mean=loss(t)).decision
                if d is not None:
                    assert not d.errors, d.errors
                    self.decisions.append(d)
            c.run(1)
        assert [s for s, _, _ in c.trace[first:]] == list(range(start, steps))
        assert all(g["lr"] == LR for g in c.opt.param_groups)  # the user's, untouched
        return [(lr, m) for _, lr, m in c.trace[first:]]


def _flat(seed: int = 0) -> Callable[[int], float]:
    rng = random.Random(seed)
    return lambda t: 1.0 + rng.gauss(0.0, 0.01)


class CutAt(Policy):
    """A correction at one step: ``factor`` on lr."""

    name = "cut_at"

    def __init__(self, step: int, factor: float) -> None:
        super().__init__()
        self.step, self.factor = step, factor

    def propose(self, view):
        if view.step == self.step:
            return [Proposal("lr", factor=self.factor, reason=f"cut at {self.step}")]
        return []


# -- corrections ----------------------------------------------------------------------


def test_a_plateau_cut_persists_under_cosine():
    c = Job([Cosine({"t_max": 2000}), Plateau()], slope_window=5)
    lrs = [lr for lr, _ in c.run(400, _flat())]
    ratios = [lr / schedules.cosine(t, LR, 2000) for t, lr in enumerate(lrs)]
    cuts = [round(math.log(r, 0.5), 9) for r in ratios]
    print(
        f"\nplateau under live cosine: corrections x0.5^k for k in {sorted(set(cuts))}; "
        f"first cut at step {cuts.index(1.0)}"
    )
    assert cuts[0] == 0.0 and max(cuts) >= 2
    assert all(float(k).is_integer() for k in cuts)  # lr = cosine(t) x 0.5^k, exactly
    # Never undone: the correction only grows, step after step, between the cuts too.
    assert all(b >= a for a, b in zip(cuts, cuts[1:], strict=False))
    assert c.state.corrections["lr"] == pytest.approx(0.5 ** max(cuts))


def test_a_correction_persists_under_a_schedule_decided_per_report():
    c = Job([Cosine({"t_max": 1000}), CutAt(100, 0.5)], live=False)
    lrs = [lr for lr, _ in c.run(300)]
    # Per report, the lr in force is the one decided at the last report.
    expected = [
        schedules.cosine(t - t % EVERY, LR, 1000) * (0.5 if t >= 100 else 1.0) for t in range(300)
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert c.state.corrections == {"lr": 0.5} and c.state.live == {}


def test_without_a_schedule_a_factor_acts_on_the_value_in_force_as_before():
    c = Job([Plateau()], slope_window=5)
    lrs = [lr for lr, _ in c.run(200, _flat())]
    assert min(lrs) < LR and c.state.corrections == {} and c.state.live == {}


def test_an_absolute_value_from_another_policy_is_a_one_off_under_a_schedule():
    class Pin(Policy):
        name = "pin"

        def propose(self, view):
            # x0.1 the user's lr: an absolute value of the multiplier.
            return [Proposal("lr", value=0.1, reason="pin")] if view.step == 100 else []

    c = Job([Cosine({"t_max": 1000}), Pin()])
    lrs = [lr for lr, _ in c.run(130)]
    assert lrs[100:110] == pytest.approx([0.1 * LR] * 10)  # decreases win, for one decision
    assert lrs[125] == pytest.approx(schedules.cosine(125, LR, 1000))  # ... then the schedule
    assert c.state.corrections == {}


def test_a_rollback_cut_becomes_part_of_the_correction():
    class Spike(Policy):
        """A divergence seen once, at step 400: roll back (cut the lr in force by half)."""

        name = "spike"

        def propose(self, view):
            if view.step == 400:
                return [Proposal.roll_back("loss_spike", "spike")]
            return []

    c = Job([Cosine({"t_max": 1000}), Spike()], checkpoints=(0, 100))
    c.run(400)
    st = c.state
    c.client.observe(loss_mean=1.0)  # the report at step 400
    at_fault = st.knobs.lr  # the live cosine's multiplier in force at the fault
    assert at_fault == pytest.approx(schedules.cosine(399, 1.0, 1000))
    d = decided(c.engine, st)
    assert d.rollback is not None and d.rollback.target_step == 100 and d.rollback.cut == 0.5
    assert d.commands == {"lr": pytest.approx(0.5 * at_fault)}  # half the lr in force
    assert st.corrections["lr"] == pytest.approx(0.5)
    assert d.schedules == () and st.live == {}  # stopped until the next decision ...
    c.send(d)
    lrs = [lr for lr, _ in c.run(200, start=100)]
    (spec,) = next(x for x in c.decisions[-10:] if x.schedules).schedules  # ... which sends
    assert spec.scale == pytest.approx(0.5) and spec.value(160) == pytest.approx(  # it again,
        0.5 * schedules.cosine(160, 1.0, 1000))  # at half, from the restored step on
    assert lrs[-1] == pytest.approx(0.5 * schedules.cosine(199, LR, 1000))


# -- several schedules of one knob ----------------------------------------------------------


@pytest.mark.parametrize("live", [True, False], ids=["live", "per-report"])
def test_warmup_times_cosine_equals_torchs_chained_scheduler(live):
    steps = 300
    c = Job(
        [Cosine({"t_max": 200}), Warmup({"warmup_steps": 50, "start_factor": 0.1})],
        every=EVERY if live else 1,
        live=live,
    )
    ours = c.run(steps)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer("SGD", [p])
    chained = sched.ChainedScheduler(
        [
            sched.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=50),
            sched.CosineAnnealingLR(opt, T_max=200),
        ]
    )
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        chained.step()
    err = max(abs(a - b) / b if b else abs(a - b) for (a, _), b in zip(ours, theirs, strict=True))
    print(
        f"\nwarmup x cosine ({'live, report_every=10' if live else 'per report'}) vs "
        f"ChainedScheduler(LinearLR, CosineAnnealingLR): max relative error {err:.3g}"
    )
    assert err <= TOL
    assert theirs[0] == pytest.approx(0.1 * LR) and max(theirs) > 0.8 * LR


# -- live schedules through the engine ------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_live_schedule_matches_torch_at_every_step_with_reports_every_10(case: Case):
    c = Job([load_policy(case.policy, case.config)], optimizer=case.optimizer)
    ours = c.run(300)
    lr_err, mom_err = max_rel_err(ours, torch_trace(case))  # type: ignore[arg-type]
    sent = sum(d.schedules is not None for d in c.decisions)
    print(
        f"\n{case.id} live, report_every={EVERY}: max relative error over 300 steps: "
        f"lr {lr_err:.3g}, momentum {mom_err:.3g}; schedules sent {sent} time(s)"
    )
    assert lr_err <= TOL and mom_err <= TOL
    assert sent == 1 and c.decisions[0].schedules  # once, before the first step


def test_a_drop_beyond_max_step_ratio_falls_back_to_governed_values_per_report():
    # Step decay by 10x at step 100, with at most x2 per decision: live up to the drop's
    # horizon, then per report through the governor, which halves the lr per decision.
    limits = KnobLimits(allow_zero=True, max_step_ratio=2.0)
    gov = GovernorConfig(
        lr=limits, momentum=OPENED.momentum, weight_decay=OPENED.weight_decay, clip=OPENED.clip
    )
    c = Job([StepDecay({"step_size": 100, "gamma": 0.1})], gov)
    lrs = [lr for lr, _ in c.run(160)]
    stopped = next(d for d in c.decisions if d.schedules == ())
    assert 80 <= stopped.step < 100 and lrs[99] == LR
    assert lrs[100:140:10] == pytest.approx([0.05, 0.025, 0.0125, 0.01])
    assert all(a / b <= 2.0 + 1e-12 for a, b in zip(lrs, lrs[1:], strict=False))
    # Once the schedule is within the governor's reach again, it goes live again.
    assert c.decisions[-1].knobs["lr"].live is not None and lrs[-1] == pytest.approx(0.01)


def test_the_governors_bounds_go_with_a_live_schedule():
    limits = KnobLimits(allow_zero=True, min_rel=0.1)  # multiplier >= 0.1: lr >= 0.01
    gov = GovernorConfig(
        lr=limits, momentum=OPENED.momentum, weight_decay=OPENED.weight_decay, clip=OPENED.clip
    )
    c = Job([Cosine({"t_max": 100})], gov)
    lrs = [lr for lr, _ in c.run(100)]
    (spec,) = c.decisions[0].schedules
    assert spec.lo == pytest.approx(0.1) and min(lrs) == pytest.approx(0.01)
    assert lrs[30] == pytest.approx(schedules.cosine(30, LR, 100))


def test_corrections_and_the_live_schedule_survive_a_controller_restart():
    c = Job([Cosine({"t_max": 1000}), CutAt(100, 0.5)])
    c.run(150)
    assert c.state.corrections == {"lr": 0.5}
    sd = c.state.state_dict()
    c.state = JobState.from_state_dict(sd)  # what the journal's resume does
    assert c.state.corrections == {"lr": 0.5} and c.state.live.keys() == {"lr"}
    lrs = [lr for lr, _ in c.run(300, start=150)]
    assert lrs[-1] == pytest.approx(0.5 * schedules.cosine(299, LR, 1000))
    # The restored controller knows the client's schedule: it sends nothing new.
    assert all(d.schedules is None for d in c.decisions[-15:])


def test_under_the_default_governor_a_live_schedule_keeps_the_slew_limit():
    # Cosine from 0.1 towards 0 over 3000 steps: live while the default lr limits allow
    # (x4 over any 1000 steps), then governed per report, never faster than x4 per 1000.
    c = Job([Cosine({"t_max": 3000})], GovernorConfig())
    lrs = [lr for lr, _ in c.run(3000)]
    worst = max(
        max(lrs[max(0, t - 1000) : t + 1]) / min(lrs[max(0, t - 1000) : t + 1]) for t in range(3000)
    )
    stopped = next(d.step for d in c.decisions if d.schedules == ())
    print(
        f"\ncosine under the default governor: live until step {stopped}, then per report; "
        f"largest change over any 1000 steps x{worst:.4g}"
    )
    assert worst <= 4.0 * (1 + 1e-9)
    assert lrs[:stopped] == pytest.approx([schedules.cosine(t, LR, 3000) for t in range(stopped)])
    assert lrs[-1] > schedules.cosine(2999, LR, 3000)  # held back by the governor
