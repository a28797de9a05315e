"""Update-to-weight ratio band on synthetic streams, then on a real run from a too-small LR."""

from __future__ import annotations

import pytest

from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.policies.update_ratio import UpdateRatio

from .realrun import Run
from .simclient import Client, one_param
from .streams import feed, job


def with_ratio(*ratios: float, lr: float = 1e-3):
    st = job(lr=lr)
    for r in ratios:
        feed(st, loss_mean=1.0, update_ratio=r)
    return st


def test_too_small_raises_too_large_cuts_in_band_is_quiet():
    (up,) = UpdateRatio().propose(with_ratio(*[1e-4] * 5).view())
    assert (up.knob, up.factor) == ("lr", 1.25)
    assert up.reason == "update/weight ratio 0.0001 (EW over 5 reports) below [0.0005, 0.002]"
    (down,) = UpdateRatio().propose(with_ratio(*[1e-2] * 5).view())
    assert down.factor == pytest.approx(0.8)
    assert UpdateRatio().propose(with_ratio(*[1e-3] * 5).view()) == []


def test_the_factor_aims_at_the_middle_of_the_band_within_max_factor():
    narrow = UpdateRatio({"low": 9e-4, "high": 1.1e-3})
    (p,) = narrow.propose(with_ratio(*[1.2e-3] * 5).view())
    assert p.factor == pytest.approx((9e-4 * 1.1e-3) ** 0.5 / 1.2e-3)
    (q,) = narrow.propose(with_ratio(*[1e-2] * 5).view())
    assert q.factor == pytest.approx(0.8)


def test_one_noisy_sample_moves_nothing_and_needs_min_reports():
    assert UpdateRatio().propose(with_ratio(*[1e-3] * 5, 3e-3).view()) == []
    assert UpdateRatio().propose(with_ratio(*[1e-4] * 4).view()) == []


def test_only_reports_since_the_last_lr_change_count():
    st = with_ratio(*[1e-4] * 8)
    st.last_change_step["lr"] = 40
    assert UpdateRatio().propose(st.view()) == []  # 4 reports after the change
    st.last_change_step["lr"] = 30
    assert UpdateRatio().propose(st.view()) != []


def test_raises_stop_at_max_lr_rel():
    # max_lr_rel bounds trimtab's lr multiplier (10: ten times the user's own lr).
    st = with_ratio(*[1e-4] * 5, lr=1e-3)
    st.knobs = st.knobs.model_copy(update={"lr": 9.0})
    (p,) = UpdateRatio().propose(st.view())
    assert p.factor == pytest.approx(10 / 9)
    st.knobs = st.knobs.model_copy(update={"lr": 10.0})
    assert UpdateRatio().propose(st.view()) == []


def test_closed_loop_converges_into_the_band():
    # A ratio proportional to the LR the optimizer uses: 1e-4 at lr 1e-3, so the band needs
    # lr in [5e-3, 2e-2]. A client (the real Actuator on an SGD at lr 1e-3) carries out the
    # commands.
    client = Client(one_param(lr=1e-3))
    st, eng = client.state, Engine([UpdateRatio()], Governor(GovernorConfig(
        lr={"max_rel": 100, "max_step_ratio": 2, "cooldown_steps": 0})))
    for _ in range(200):
        client.advance()
        client.exchange(eng, loss_mean=1.0, update_ratio=0.1 * client.act.used().lr)
    assert 5e-4 <= 0.1 * st.effective.lr <= 2e-3
    assert st.effective.lr == pytest.approx(1e-3 * st.knobs.lr)  # the multiplier did it


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"low=0.01 must be below high=0.002"):
        load_policy("update_ratio", {"low": 0.01})
    with pytest.raises(PolicyLoadError, match=r"max_factor=3: Input should be less than or equal"):
        load_policy("update_ratio", {"max_factor": 3})


def test_a_real_run_from_a_too_small_lr_moves_toward_the_band(tmp_path):
    run = Run(tmp_path, ["update_ratio"], lr=1e-4)
    try:
        run.train(300)
    finally:
        run.close()
    ratios = [r.update_ratio for r in run.reports]
    lrs = [c.scale.lr for c in run.commands]  # trimtab's multipliers on the user's 1e-4
    print("lr multiplier commanded:", [f"{x:.3g}" for x in lrs])
    print("ratio first/last 5:", [f"{x:.3g}" for x in ratios[:5]],
          [f"{x:.3g}" for x in ratios[-5:]])
    assert lrs and all(b > a for a, b in zip([1.0, *lrs], lrs, strict=False))
    assert run.reports[-1].knobs.lr > 1e-4 == run.reports[-1].base.lr
    assert all(c.reasons[0].endswith("below [0.0005, 0.002]") for c in run.commands)
    assert sum(ratios[-5:]) > 1.5 * sum(ratios[:5])
