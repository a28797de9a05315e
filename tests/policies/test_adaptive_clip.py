"""Adaptive clipping on synthetic gradient-norm streams, then on a real run."""

from __future__ import annotations

import random

import pytest

from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.state import Sample
from trimtab.policies.adaptive_clip import AdaptiveClip, zclip_threshold
from trimtab.protocol import wire

from .realrun import Run
from .streams import feed, job


def stream(n: int, scale: float = 1.0, seed: int = 0, clip: float | None = None, spike_at=None):
    rng, st = random.Random(seed), job(clip=clip)
    for i in range(1, n + 1):
        g = scale * (1.0 + rng.gauss(0, 0.05)) * (20.0 if i == spike_at else 1.0)
        feed(st, loss_mean=1.0, grad_norm_mean=g, grad_norm_std=0.1 * scale,
             grad_norm_max=g * 1.2)
    return st


def test_quiet_until_warmed_up_then_a_threshold_above_the_norms():
    assert AdaptiveClip().propose(stream(9).view()) == []
    (p,) = AdaptiveClip().propose(stream(30).view())
    assert p.knob == "clip" and 1.15 < p.value < 1.6
    assert p.reason.startswith("clip threshold") and "over 30 reports" in p.reason


def test_the_threshold_is_scale_free():
    (a,) = AdaptiveClip().propose(stream(30).view())
    (b,) = AdaptiveClip().propose(stream(30, scale=10.0).view())
    assert b.value == pytest.approx(10 * a.value)


def test_a_threshold_in_force_within_the_deadband_is_left_alone():
    (p,) = AdaptiveClip().propose(stream(30).view())
    assert AdaptiveClip().propose(stream(30, clip=p.value * 1.05).view()) == []
    assert AdaptiveClip().propose(stream(30, clip=p.value * 2.0).view()) != []


def test_a_spike_does_not_drag_the_threshold_up():
    (calm,) = AdaptiveClip().propose(stream(40).view())
    (after,) = AdaptiveClip().propose(stream(40, spike_at=35).view())
    # The spike window's mean (20x) is clipped before it is folded in, as ZClip does.
    assert after.value < 1.2 * calm.value


def test_percentile_mode():
    st = job()
    for i in range(1, 101):
        feed(st, grad_norm_mean=float(i), grad_norm_std=0.0)
    (p,) = AdaptiveClip({"mode": "percentile", "percentile": 90}).propose(st.view())
    assert p.value == pytest.approx(90.1)


def test_zclip_threshold_helper():
    s = [Sample(10 * i, 10, grad_norm_mean=2.0, grad_norm_std=0.0) for i in range(12)]
    assert zclip_threshold(s, 0.1, 3.0, 5) == pytest.approx(2.0)
    assert zclip_threshold(s[:4], 0.1, 3.0, 5) is None


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"mode='ema': Input should be 'zscore' or "):
        load_policy("adaptive_clip", {"mode": "ema"})
    with pytest.raises(PolicyLoadError, match=r"z=0: Input should be greater than 0"):
        load_policy("adaptive_clip", {"z": 0})
    with pytest.raises(PolicyLoadError, match=r"zz=1: Extra inputs are not permitted"):
        load_policy("adaptive_clip", {"zz": 1})


def test_a_real_run_clips_above_its_norms_and_below_an_injected_spike(tmp_path):
    run = Run(tmp_path, ["adaptive_clip"], lr=0.05)
    try:
        run.train(150, scale_at={120: 30.0})  # the loss x30 at step 120: a gradient spike
    finally:
        run.close()
    clips = [c.knobs.clip for c in run.commands if c.knobs.clip is not None]
    healthy = [r for r in run.reports if r.step != 130]
    spike = next(r for r in run.reports if r.step == 130)
    print("clips commanded:", [round(c, 3) for c in clips])
    print("healthy window means:", [round(r.grad_norm_mean, 2) for r in healthy])
    print("spike window mean/max:", round(spike.grad_norm_mean, 2), round(spike.grad_norm_max, 2))
    assert clips and run.guard.clip in clips  # the last one may come after the last step
    final = clips[-1]
    assert all(r.grad_norm_mean < final for r in healthy)
    assert sum(r.grad_norm_max < final for r in healthy) >= len(healthy) // 2
    assert final < spike.grad_norm_mean < spike.grad_norm_max
    assert isinstance(run.commands[0], wire.Command)
