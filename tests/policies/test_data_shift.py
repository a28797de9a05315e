"""Data shift on synthetic loss streams (step up, spike, climb), then on a real run."""

from __future__ import annotations

import random

import pytest

from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.policies.data_shift import DataShift, level_shift
from trimtab.protocol import wire

from .realrun import Run
from .simclient import Client, one_param
from .streams import feed, job


def run(loss_at, n: int = 60, seed: int = 0, scale: float = 1.0, policy=None, closed=False,
        **report):
    """``(report, proposal)`` for each report that got one; closed=True has a client
    (the real Actuator on an optimizer at lr 1e-3) carry out the engine's decisions and
    gives ``(report, lr multiplier commanded)``, with the client."""
    rng, pol = random.Random(seed), policy or DataShift()
    client = Client(one_param(lr=1e-3)) if closed else None
    st = client.state if client is not None else job(lr=1e-3)
    eng = Engine([pol], Governor(GovernorConfig(lr={"max_step_ratio": 4, "cooldown_steps": 0})))
    out = []
    for i in range(1, n + 1):
        fields = dict(loss_mean=scale * (loss_at(i) + rng.gauss(0, 0.02)), grad_norm_mean=1.0,
                      **report.get(i, {}))
        if client is not None:
            client.advance()
            d = client.exchange(eng, **fields).decision
            if d.commands:
                out.append((i, d.commands["lr"]))
        else:
            feed(st, **fields)
            out += [(i, p) for p in pol.propose(st.view())]
    return out, (client if client is not None else st)


def step_up(i: int) -> float:
    return 2.0 if i <= 30 else 2.5


def test_a_sustained_step_up_is_found_once_after_it_persists():
    hits, _ = run(step_up)
    first, p = hits[0]
    assert first == 34  # the 4th report at the new level
    assert p.value == pytest.approx(0.5)  # x the user's lr: half of it
    assert p.reason.startswith("data shift at step 340: loss level up 2")
    assert p.reason.endswith("re-warm from 0.5 to 1 over 10 reports")
    # Then a re-warm of 10 reports, up to the LR in force before; after it, quiet.
    assert [i for i, _ in hits] == list(range(34, 45))
    assert hits[-1][1].value == pytest.approx(1.0)


def test_closed_loop_cuts_ramps_back_and_ends():
    lrs, client = run(step_up, n=100, closed=True)
    assert lrs[0] == (34, pytest.approx(0.5))
    assert [v for _, v in lrs] == sorted(v for _, v in lrs)  # up from the cut, monotone
    assert lrs[-1] == (44, pytest.approx(1.0)) and client.state.knobs.lr == pytest.approx(1.0)
    # The optimizer stepped at half the user's lr right after the cut, at the user's own
    # lr again after the re-warm.
    used = {step: lr for step, lr, _ in client.trace}
    assert used[340] == pytest.approx(5e-4) and used[339] == pytest.approx(1e-3)
    assert used[999] == pytest.approx(1e-3) and client.state.effective.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_it_is_scale_free(scale):
    hits, _ = run(step_up, scale=scale)
    assert hits and hits[0][0] == 34


def test_quiet_on_a_flat_run_a_spike_a_climb_and_a_small_step():
    assert run(lambda i: 2.0)[0] == []
    assert run(lambda i: 5.0 if i == 31 else 2.0)[0] == []  # one report: the guards' business
    assert run(lambda i: 2.0 if i <= 30 else 2.0 + 0.2 * (i - 30))[0] == []  # divergence
    assert run(lambda i: 2.0 if i <= 30 else 2.06)[0] == []  # 3%: below min_rel_jump


def test_quiet_when_the_step_comes_with_an_lr_change_or_nonfinite_values():
    assert _with({})[0] != []
    # trimtab's lr multiplier doubled with the step (a command of another policy's).
    hits, _ = _with({i: {"scale": wire.Scale(lr=2.0)} for i in range(31, 61)})
    assert hits == []
    hits, _ = _with({33: {"nonfinite_losses": 1}}, n=34)
    assert hits == []


def test_quiet_when_the_step_comes_with_a_change_of_the_users_own_lr():
    assert _with({})[0] != []
    # The loop's own lr doubled with the step (its scheduler), trimtab's multiplier at 1.
    hits, _ = _with({i: {"base": wire.Knobs(lr=2e-3)} for i in range(31, 61)})
    assert hits == []


def _with(extra, n=60):
    rng, st, pol = random.Random(0), job(lr=1e-3), DataShift()
    hits = []
    for i in range(1, n + 1):
        feed(st, loss_mean=step_up(i) + rng.gauss(0, 0.02), grad_norm_mean=1.0,
             **extra.get(i, {}))
        hits += pol.propose(st.view())
    return hits, st


def test_level_shift_helper():
    assert level_shift([1.0, 1.1, 0.9, 1.0, 2.0, 2.1, 1.9, 2.0], 4, 3.0, 0.05, 0.5) == 1.0
    assert level_shift([1.0, 1.1, 0.9, 1.0, 2.0, 2.1, 1.9, None], 4, 3.0, 0.05, 0.5) is None


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"cut=1: Input should be less than 1"):
        load_policy("data_shift", {"cut": 1})
    with pytest.raises(PolicyLoadError, match=r"after=1: Input should be greater than or equal"):
        load_policy("data_shift", {"after": 1})


def test_a_real_run_whose_labels_get_noisier(tmp_path):
    run_ = Run(tmp_path, ["data_shift"], lr=0.05)
    try:
        run_.train(200)
        quiet = list(run_.commands)
        run_.noise = 3.0  # the data source turns noisy: the loss level steps up for good
        run_.train(300)
    finally:
        run_.close()
    lrs = [c.scale.lr for c in run_.commands]
    print("commands:", [(c.scale.lr, c.reasons[0]) for c in run_.commands])
    assert quiet == []
    assert run_.commands[0].reasons[0].startswith("lr x1 -> x0.5 by data_shift: data shift")
    assert lrs[0] == pytest.approx(0.5) and lrs[-1] == pytest.approx(1.0)
    assert lrs == sorted(lrs)  # one cut, then only the ramp back up
    assert run_.reports[-1].knobs.lr == pytest.approx(0.05)  # the user's own lr again
    assert run_.reports[-1].scale.lr == pytest.approx(1.0)
    assert run_.reports[-1].base.lr == 0.05
