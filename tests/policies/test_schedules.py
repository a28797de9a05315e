"""Schedules as policies: each matches its torch scheduler at every step, through the engine
with the governor's limits opened, on synthetic signal streams; configs fail with clear
messages; batch-size scaling follows the optimizer's family."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest
import torch

from tests._decide import decided
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.state import JobState
from trimtab.policies.cosine import Cosine
from trimtab.policies.one_cycle import OneCycle
from trimtab.policies.warmup import Warmup
from trimtab.protocol import wire

from ._schedule_cases import (
    CASES,
    LR,
    OPENED,
    STEPS,
    Case,
    EngineDriver,
    engine_trace,
    make_optimizer,
    max_rel_err,
    torch_trace,
)
from .simclient import one_param

TOL = 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_step_matches_torch_through_the_opened_engine(case: Case):
    ours, theirs = engine_trace(case), torch_trace(case)
    lr_err, mom_err = max_rel_err(ours, theirs)
    print(f"\n{case.id}: max relative error over {STEPS} steps: lr {lr_err:.3g}, "
          f"momentum {mom_err:.3g}")
    assert lr_err <= TOL and mom_err <= TOL
    # The schedule moved (the comparison is not between two constants), except constant's.
    assert len({lr for lr, _ in theirs}) > (0 if case.id == "constant" else 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_loss_stream_does_not_matter(case: Case):
    # Noisy, spiking and missing losses: a schedule is a function of the step alone.
    rng = random.Random(0)

    def loss(t: int) -> float | None:
        if t % 37 == 0:
            return None
        return 2.0 + rng.gauss(0.0, 0.3) + (50.0 if t % 91 == 0 else 0.0)

    assert engine_trace(case, 120, loss) == engine_trace(case, 120)


def test_one_cycle_moves_momentum_inversely_to_the_lr():
    pol = OneCycle({"total_steps": 100})
    points = [pol.lr_momentum_at(t, 1.0) for t in range(100)]
    peak = max(range(100), key=lambda t: points[t][0])
    assert peak == 29 and points[peak][1] == pytest.approx(0.85)
    assert points[0] == pytest.approx((1.0 / 25, 0.95))
    assert points[99] == pytest.approx((1.0 / 25 / 1e4, 0.95))
    for (lr0, m0), (lr1, m1) in pairwise(points):
        assert (lr1 - lr0) * (m1 - m0) <= 0.0


def test_one_cycle_holds_its_final_values_after_the_cycle():
    pol = OneCycle({"total_steps": 100})
    assert pol.lr_momentum_at(250, 0.1) == pol.lr_momentum_at(99, 0.1)


def test_one_cycle_proposes_momentum_only_for_a_job_that_has_one():
    with_m = EngineDriver(OneCycle({"total_steps": 10}), one_param("SGD", 0.1, momentum=0.9))
    without = EngineDriver(OneCycle({"total_steps": 10}), one_param("Adagrad", 0.1))
    assert without.state.knobs.momentum is None
    assert {p.knob for p in OneCycle({"total_steps": 10}).propose(
        with_m.state.view())} == {"lr", "momentum"}
    assert [p.knob for p in OneCycle({"total_steps": 10}).propose(
        without.state.view())] == ["lr"]
    assert [p.knob for p in OneCycle({"total_steps": 10, "cycle_momentum": False}).propose(
        with_m.state.view())] == ["lr"]


def test_the_reference_lr_is_the_registered_one_unless_configured():
    # The lr the optimizer uses: the user's own (multiplier 1), or the configured one.
    d = EngineDriver(Cosine({"t_max": 10}), make_optimizer("SGD", [torch.nn.Parameter(
        torch.zeros(2))], lr=0.3))
    assert d.decide(0)[0] == 0.3 and d.state.knobs.lr == 1.0
    d = EngineDriver(Cosine({"t_max": 10, "lr": 0.02}), make_optimizer("SGD", [
        torch.nn.Parameter(torch.zeros(2))], lr=0.3))
    assert d.decide(0)[0] == pytest.approx(0.02, rel=1e-12)
    assert d.state.knobs.lr == pytest.approx(0.02 / 0.3, rel=1e-12)


def test_an_absolute_lr_relates_to_the_lr_the_users_schedule_is_a_multiple_of():
    """A job registered early in its own warm-up (its lr 0.001 x its scheduler's 0.1):
    a configured absolute lr and cosine's eta_min are multipliers on the scheduler's lr
    (nominal_lr), not on the warm-up's value at registration (1000x too much). A client
    that does not tell it (a loop without a scheduler, an older client): the registered
    lr, as before."""
    def view(nominal):
        return JobState.from_register(wire.Register(
            job="w", run_id="r", report_every=10, knobs=wire.Knobs(lr=1e-4),
            base=wire.Knobs(lr=1e-4), nominal_lr=nominal,
            facts=wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
                                  dtype="float32", device="cpu"))).view()

    cos = Cosine({"t_max": 100, "lr": 0.05, "eta_min": 0.001})
    assert view(0.1).nominal_lr == 0.1 and view(None).nominal_lr is None
    assert cos.base_lr(view(0.1)) == pytest.approx(0.5)
    assert cos.formula_params(0.5, view(0.1))["eta_min"] == pytest.approx(0.01)
    assert cos.base_lr(view(None)) == pytest.approx(500.0)


def test_the_reason_names_the_schedule_and_step():
    view = EngineDriver(Cosine({"t_max": 100}), one_param("SGD", 0.1)).state.view()
    (p,) = Cosine({"t_max": 100}).propose(view)
    assert p.reason == "cosine at step 0: x1 (reference x1)"
    (p, q) = OneCycle({"total_steps": 100}).propose(
        EngineDriver(Cosine({"t_max": 1}), one_param("SGD", 0.1, momentum=0.9)).state.view())
    assert p.reason == "one_cycle at step 0 of 100: x0.04 (max_lr x1)"
    assert q.reason == "one_cycle at step 0 of 100: 0.95"


def test_under_the_default_governor_a_schedule_is_bounded_like_any_policy():
    # The default lr limits allow at most x2 per decision: a warm-up from 0.001 x lr
    # cannot jump to lr in one step (multiplier 1 -> 1000 on the user's 1e-4).
    st = JobState.from_register(wire.Register(
        job="s", run_id="r", report_every=10, step=100, knobs=wire.Knobs(lr=1e-4),
        base=wire.Knobs(lr=1e-4),
        facts=wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
                              dtype="float32", device="cpu")))
    d = decided(Engine([Warmup({"warmup_steps": 100, "lr": 0.1})], Governor()), st)
    ((_, proposal),) = d.proposals
    assert proposal.value == pytest.approx(1000.0)
    assert d.commands == {"lr": 2.0} and "max_step_ratio" in d.knobs["lr"].limits
    assert Governor(OPENED).config.lr.max_step_ratio is None


# -- batch-size scaling ---------------------------------------------------------------


def _view(optimizer: str, batch_size: int | None, world_size: int = 4, lr: float = LR):
    return EngineDriver(Cosine({"t_max": 1}), one_param(optimizer, lr),
                        batch_size=batch_size, world_size=world_size).state.view()


SCALED = {"t_max": 100, "scale_with_batch": True, "reference_batch_size": 256}


@pytest.mark.parametrize(("optimizer", "factor"), [
    ("SGD", 2.0),           # linear: Goyal et al. 2017
    ("AdamW", math.sqrt(2.0)),  # square root: Hoffer et al. 2017, Malladi et al. 2022
    ("Adam", math.sqrt(2.0)),
    ("RMSprop", math.sqrt(2.0)),
])
def test_batch_scaling_is_linear_for_sgd_and_square_root_for_adam(optimizer, factor):
    # 128 per rank x 4 ranks = 512 = 2 x the reference batch of 256.
    (p,) = Cosine(SCALED).propose(_view(optimizer, batch_size=128))
    assert p.value == pytest.approx(factor, rel=1e-12)  # x the user's lr


def test_batch_scaling_can_be_forced_and_is_off_by_default():
    (p,) = Cosine({**SCALED, "batch_scaling": "linear"}).propose(_view("AdamW", 128))
    assert p.value == pytest.approx(2.0)
    (p,) = Cosine({"t_max": 100}).propose(_view("AdamW", 128))
    assert p.value == 1.0  # the user's own lr


def test_a_smaller_batch_scales_down():
    (p,) = Cosine(SCALED).propose(_view("SGD", batch_size=16))  # 64 of 256
    assert p.value == pytest.approx(1 / 4)


def test_batch_scaling_without_a_batch_size_disables_the_policy_with_the_reason():
    d = EngineDriver(Cosine(SCALED), one_param("SGD", LR), batch_size=None)
    decision = decided(d.engine, d.state)
    assert decision.commands == {}
    ((name, error),) = decision.errors
    assert name == "cosine" and "client registered none (pass batch_size= to attach)" in error


def test_batch_scaling_refuses_to_guess_for_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer 'LBFGS' is neither SGD- nor Adam-family"):
        Cosine(SCALED).propose(_view("LBFGS", 128))
    (p,) = Cosine({**SCALED, "batch_scaling": "sqrt"}).propose(_view("LBFGS", 128))
    assert p.value == pytest.approx(math.sqrt(2))


def test_scaled_warmup_starts_at_the_reference_lr_as_goyal_et_al():
    # SGD at 4x the reference batch: lr 4 x 0.1, ramped from 0.1 (start factor 1/4).
    pol = Warmup({"warmup_steps": 10, "scale_with_batch": True, "reference_batch_size": 128})
    d = EngineDriver(pol, one_param("SGD", 0.1), batch_size=128, world_size=4)
    lrs = [d.decide(t)[0] for t in range(15)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.4) == lrs[14]
    assert lrs[5] == pytest.approx(0.25)


def test_unscaled_warmup_starts_from_zero():
    assert Warmup({"warmup_steps": 10}).lr_at(0, 0.1) == 0.0
    assert Warmup({"warmup_steps": 10}).lr_at(5, 0.1) == pytest.approx(0.05)


# -- configs --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "config", "match"), [
    ("cosine", {}, r"policy 'cosine': bad config: t_max=\{\}: Field required"),
    ("cosine", {"t_max": 0}, r"t_max=0: Input should be greater than or equal to 1"),
    ("cosine", {"t_max": 10, "Tmax": 5}, r"Tmax=5: Extra inputs are not permitted \(allowed "
                                         r"fields: scale_with_batch, .*t_max, eta_min\)"),
    ("cosine", {"t_max": 10, "lr": 0}, r"lr=0: Input should be greater than 0"),
    ("cosine", {"t_max": 10, "eta_min": -1}, r"eta_min=-1: Input should be greater than or"),
    ("step_decay", {"step_size": 10, "gamma": float("nan")}, r"gamma=nan: Input should be"),
    ("step_decay", {}, r"step_size=\{\}: Field required"),
    ("linear", {"total_iters": 10, "end_factor": 1.5}, r"end_factor=1.5: Input should be less"),
    ("linear", {"total_iters": 10, "start_factor": 0}, r"start_factor=0: Input should be "
                                                       r"greater than 0"),
    ("constant", {"factor": 2.0}, r"factor=2.0: Input should be less than or equal to 1"),
    ("inverse_sqrt", {"warmup_steps": 0}, r"warmup_steps=0: Input should be greater than"),
    ("warmup", {"warmup_steps": 5, "start_factor": 1.5}, r"start_factor=1.5: Input should be"),
    ("cosine", {"t_max": 10, "scale_with_batch": True},
     r"scale_with_batch=True needs reference_batch_size"),
    ("cosine", {"t_max": 10, "batch_scaling": "cubic"},
     r"batch_scaling='cubic': Input should be 'auto', 'linear' or 'sqrt'"),
    ("one_cycle", {}, r"total_steps=\{\}: Field required"),
    ("one_cycle", {"total_steps": 100, "pct_start": 0.005},
     r"pct_start=0.005 with total_steps=100 gives phases ending at steps \[-0.5, 99\]"),
    ("one_cycle", {"total_steps": 100, "pct_start": 0.6, "three_phase": True},
     r"gives phases ending at steps \[59.0, 118.0, 99\]; each must end after the previous"),
    ("one_cycle", {"total_steps": 100, "base_momentum": 0.96},
     r"base_momentum=0.96 is above max_momentum=0.95"),
    ("one_cycle", {"total_steps": 100, "max_momentum": 1.0},
     r"max_momentum=1.0: Input should be less than 1"),
    ("one_cycle", {"total_steps": 100, "anneal_strategy": "exp"},
     r"anneal_strategy='exp': Input should be 'cos' or 'linear'"),
])
def test_config_is_validated(name, config, match):
    with pytest.raises(PolicyLoadError, match=match):
        load_policy(name, config)


@pytest.mark.parametrize("name", ["constant", "step_decay", "linear", "cosine",
                                  "inverse_sqrt", "warmup", "one_cycle"])
def test_every_schedule_is_found_by_its_entry_point_name(name):
    cfg = {"step_decay": {"step_size": 5}, "linear": {"total_iters": 5},
           "cosine": {"t_max": 5}, "inverse_sqrt": {"warmup_steps": 5},
           "warmup": {"warmup_steps": 5}, "one_cycle": {"total_steps": 50}}.get(name, {})
    assert load_policy(name, cfg).name == name
