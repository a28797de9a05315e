"""Gradient noise on synthetic streams (CV and micro-batch noise scale), then on a real run."""

from __future__ import annotations

import math

import pytest

from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.state import Sample
from trimtab.policies.grad_noise import GradNoise, noise_to_batch, pooled_cv

from .realrun import Run
from .streams import feed, job


def with_cv(cv: float, n: int = 6, lr: float = 1e-3, scale: float = 1.0, **extra):
    st = job(lr=lr)
    for _ in range(n):
        feed(st, grad_norm_mean=2.0 * scale, grad_norm_std=2.0 * scale * cv, **extra)
    return st


def test_noisy_gradients_cut_the_lr_and_quiet_ones_raise_it_a_little():
    (down,) = GradNoise().propose(with_cv(0.8).view())
    assert (down.knob, down.factor) == ("lr", 0.8)
    assert down.reason == "grad-norm coefficient of variation 0.8 > 0.5 over 5 reports"
    (up,) = GradNoise().propose(with_cv(0.02).view())
    assert up.factor == pytest.approx(1.1)


def test_quiet_in_between_and_scale_free():
    assert GradNoise().propose(with_cv(0.3).view()) == []
    for scale in (1.0, 1000.0):
        (p,) = GradNoise().propose(with_cv(0.8, scale=scale).view())
        assert p.factor == 0.8


def test_quiet_until_a_window_after_the_last_lr_change():
    assert GradNoise().propose(with_cv(0.8, n=4).view()) == []
    st = with_cv(0.8, n=8)
    st.last_change_step["lr"] = 40  # reports at 50..80: four since the change
    assert GradNoise().propose(st.view()) == []
    st.last_change_step["lr"] = 30
    assert GradNoise().propose(st.view()) != []


def test_raises_stop_at_max_lr_rel():
    # max_lr_rel bounds trimtab's lr multiplier (2: twice the user's own lr).
    st = with_cv(0.02, lr=1e-3)
    st.knobs = st.knobs.model_copy(update={"lr": 1.9})
    (p,) = GradNoise().propose(st.view())
    assert p.factor == pytest.approx(2.0 / 1.9)
    st.knobs = st.knobs.model_copy(update={"lr": 2.0})
    assert GradNoise().propose(st.view()) == []


def test_quiet_on_a_window_with_steps_the_loop_clipped_itself():
    # Norms at the loop's own clip threshold are the threshold, not the gradient's spread.
    assert GradNoise().propose(with_cv(0.8, user_clipped_steps=1, user_clip=2.0).view()) == []
    assert GradNoise().propose(with_cv(0.02, user_clipped_steps=3, user_clip=2.0).view()) == []
    assert GradNoise().propose(with_cv(0.8, user_clipped_steps=0).view()) != []


def test_micro_batch_noise_scale_overrides_the_cv():
    # |G_small|^2 = 10, |G_big|^2 = 4 (norm 2, no spread), n = 4: B_simple/B = 6/6 = 1.
    s = Sample(10, 10, grad_norm_mean=2.0, grad_norm_std=0.0, micro_sq_norm_mean=10.0,
               micro_batches=4)
    assert noise_to_batch([s]) == pytest.approx(1.0)
    assert noise_to_batch([s, Sample(20, 10, grad_norm_mean=2.0)]) is None  # not all have it
    assert noise_to_batch([Sample(10, 10, grad_norm_mean=1.0, micro_sq_norm_mean=5.0,
                                  micro_batches=4)]) == math.inf
    # A low CV, but micro-batch gradients 30x the accumulated one's energy: noise dominates.
    (p,) = GradNoise().propose(with_cv(0.02, micro_sq_norm_mean=4.0 * 30,
                                       micro_batches=32).view())
    assert p.factor == 0.8 and "B_simple/B" in p.reason
    (q,) = GradNoise().propose(with_cv(0.3, micro_sq_norm_mean=4.09 * 1.1,
                                       micro_batches=8).view())
    assert q.factor > 1 and "B_simple/B" in q.reason


def test_pooled_cv_uses_the_spread_between_windows_too():
    a, b = Sample(10, 10, grad_norm_mean=1.0), Sample(20, 10, grad_norm_mean=3.0)
    assert pooled_cv([a, b]) == pytest.approx(0.5)


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"low=0.6 must be below high=0.5"):
        load_policy("grad_noise", {"low": 0.6})
    with pytest.raises(PolicyLoadError, match=r"up=2: Input should be less than or equal to 1.5"):
        load_policy("grad_noise", {"up": 2})


def test_a_real_run_with_gradient_accumulation(tmp_path):
    run = Run(tmp_path, ["grad_noise"], lr=0.05)
    try:
        run.train(100, micro=4)
    finally:
        run.close()
    reps = run.reports
    assert all(r.micro_batches == 4 for r in reps)
    # A micro-batch's gradient carries more noise than the mean of four: |G_small|^2 > |G_big|^2.
    big = [r.grad_norm_mean ** 2 + r.grad_norm_std ** 2 for r in reps]
    assert all(r.micro_sq_norm_mean > b for r, b in zip(reps, big, strict=True))
    rho = noise_to_batch([Sample.of(r) for r in reps])
    cv = pooled_cv([Sample.of(r) for r in reps])
    print(f"B_simple/B {rho:.3g}, cv {cv:.3g}; commands:",
          [(c.scale.lr, c.reasons) for c in run.commands])
    assert 0 < rho < math.inf
    lrs = [c.scale.lr for c in run.commands]  # trimtab's multipliers on the user's 0.05
    if rho > 4:  # as found here: noise-dominated steps, so the LR only goes down
        assert lrs and all(b < a for a, b in zip([1.0, *lrs], lrs, strict=False))
        assert reps[-1].knobs.lr < 0.05 and reps[-1].base.lr == 0.05
    assert all("B_simple/B" in c.reasons[0] for c in run.commands)
