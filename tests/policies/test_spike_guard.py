"""SpikeGuard on synthetic streams: fires on spikes and non-finite values, quiet otherwise."""

from __future__ import annotations

import random

import pytest

from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.controller.state import JobState
from trimtab.controller.tracker import SignalConfig
from trimtab.policies.spike_guard import SpikeGuard
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="AdamW",
                        dtype="float32", device="cpu")
WARMUP = 10


def job() -> JobState:
    reg = wire.Register(job="s", run_id="r", report_every=10, facts=FACTS,
                        knobs=wire.Knobs(lr=1e-3))
    return JobState.from_register(reg, SignalConfig(z_warmup=WARMUP))


def feed(st: JobState, i: int, **fields) -> None:
    st.observe(wire.Report(job="s", seq=i, step=10 * i, window=10, knobs=st.knobs, **fields))


def calm(st: JobState, n: int, seed: int = 0, start: int = 1) -> None:
    rng = random.Random(seed)
    for i in range(start, start + n):
        feed(st, i, loss_mean=3.0 - 0.002 * i + rng.gauss(0, 0.02),
             grad_norm_mean=1.0 + rng.gauss(0, 0.05))


def alarms(z_threshold: float, seeds: int = 20, n: int = 400) -> int:
    """Reports at which the guard fires on calm Gaussian streams."""
    pol, hits = SpikeGuard({"z_threshold": z_threshold}), 0
    for seed in range(seeds):
        st, rng = job(), random.Random(seed)
        for i in range(1, n + 1):
            feed(st, i, loss_mean=3.0 - 0.002 * i + rng.gauss(0, 0.02),
                 grad_norm_mean=1.0 + rng.gauss(0, 0.05))
            hits += bool(pol.propose(st.view()))
    return hits


def test_a_calm_noisy_stream_rarely_triggers():
    # z against an EW variance from ~2/alpha reports has heavier tails than a Gaussian:
    # at the defaults about 4e-4 false alarms per report (two signals); allow 1e-3.
    assert alarms(4.0) <= 8
    assert alarms(6.0) == 0


def test_a_loss_spike_triggers_with_its_z_in_the_reason():
    st = job()
    calm(st, 50)
    feed(st, 51, loss_mean=3.5, grad_norm_mean=1.0)
    (prop,) = SpikeGuard().propose(st.view())
    z = st.view().signals.loss_z
    assert (prop.knob, prop.factor) == ("lr", 0.5) and z > 4
    assert prop.reason == f"loss spike: z={z:.1f} > 4"


def test_a_grad_norm_spike_triggers():
    st = job()
    calm(st, 50)
    feed(st, 51, loss_mean=2.9, grad_norm_mean=3.0)
    (prop,) = SpikeGuard({"cut": 0.3}).propose(st.view())
    assert prop.factor == 0.3 and prop.reason.startswith("grad norm spike: z=")


def test_non_finite_values_trigger_even_without_a_loss():
    st = job()
    calm(st, 3)  # still warming up: only the non-finite rule can act
    feed(st, 4, loss_mean=None, nonfinite_losses=2, nonfinite_grads=1)
    (prop,) = SpikeGuard().propose(st.view())
    assert prop.reason == "non-finite values in the last report: 2 losses, 1 gradients"
    assert SpikeGuard({"on_nonfinite": False}).propose(st.view()) == []


def test_no_z_score_before_warm_up_so_no_spike():
    st = job()
    calm(st, WARMUP - 1)
    feed(st, WARMUP, loss_mean=30.0, grad_norm_mean=1.0)
    assert st.view().signals.loss_z is None and SpikeGuard().propose(st.view()) == []
    feed(st, WARMUP + 1, loss_mean=300.0, grad_norm_mean=1.0)
    assert SpikeGuard().propose(st.view()) != []


def test_a_sudden_drop_is_not_a_spike():
    st = job()
    calm(st, 50)
    feed(st, 51, loss_mean=1.0, grad_norm_mean=0.1)
    assert st.view().signals.loss_z < -4 and SpikeGuard().propose(st.view()) == []


def test_the_threshold_is_the_configured_one():
    st = job()
    calm(st, 50)
    feed(st, 51, loss_mean=3.0, grad_norm_mean=1.0)
    z = st.view().signals.loss_z
    assert 1 < z < 4
    assert SpikeGuard({"z_threshold": z - 0.1}).propose(st.view()) != []
    assert SpikeGuard({"z_threshold": z + 0.1}).propose(st.view()) == []


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"cut=0: Input should be greater than 0"):
        load_policy("spike_guard", {"cut": 0})
