"""Data shift on synthetic loss streams (step up, spike, climb), then on a real run."""

from __future__ import annotations

import random

import pytest

from trimtab.client import wire
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor, GovernorConfig
from trimtab.controller.policy import PolicyLoadError, load_policy
from trimtab.policies.data_shift import DataShift, level_shift

from .realrun import Run
from .streams import feed, job


def run(loss_at, n: int = 60, seed: int = 0, scale: float = 1.0, policy=None, closed=False,
        **report):
    """``(report, proposal)`` for each report that got one; closed=True applies them."""
    rng, st, pol = random.Random(seed), job(lr=1e-3), policy or DataShift()
    eng = Engine([pol], Governor(GovernorConfig(lr={"max_step_ratio": 4, "cooldown_steps": 0})))
    out = []
    for i in range(1, n + 1):
        feed(st, loss_mean=scale * (loss_at(i) + rng.gauss(0, 0.02)), grad_norm_mean=1.0,
             **report.get(i, {}))
        if closed:
            d = eng.decide(st)
            if d.commands:
                st.on_applied(st.applied_seq + 1, st.knobs.model_copy(update=d.commands))
                out.append((i, d.commands["lr"]))
        else:
            out += [(i, p) for p in pol.propose(st.view())]
    return out, st


def step_up(i: int) -> float:
    return 2.0 if i <= 30 else 2.5


def test_a_sustained_step_up_is_found_once_after_it_persists():
    hits, _ = run(step_up)
    first, p = hits[0]
    assert first == 34  # the 4th report at the new level
    assert p.value == pytest.approx(5e-4)
    assert p.reason.startswith("data shift at step 340: loss level up 2")
    # Then a re-warm of 10 reports, up to the LR in force before; after it, quiet.
    assert [i for i, _ in hits] == list(range(34, 45))
    assert hits[-1][1].value == pytest.approx(1e-3)


def test_closed_loop_cuts_ramps_back_and_ends():
    lrs, st = run(step_up, n=100, closed=True)
    assert lrs[0] == (34, pytest.approx(5e-4))
    assert [v for _, v in lrs] == sorted(v for _, v in lrs)  # up from the cut, monotone
    assert lrs[-1] == (44, pytest.approx(1e-3)) and st.knobs.lr == pytest.approx(1e-3)


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
    hits, _ = _with({i: {"knobs": wire.Knobs(lr=2e-3)} for i in range(31, 61)})
    assert hits == []
    hits, _ = _with({33: {"nonfinite_losses": 1}}, n=34)
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
    lrs = [c.knobs.lr for c in run_.commands]
    print("commands:", [(c.knobs.lr, c.reasons[0]) for c in run_.commands])
    assert quiet == []
    assert run_.commands[0].reasons[0].startswith("lr 0.05 -> 0.025 by data_shift: data shift")
    assert lrs[0] == pytest.approx(0.025) and lrs[-1] == pytest.approx(0.05)
    assert lrs == sorted(lrs)  # one cut, then only the ramp back up
    assert run_.reports[-1].knobs.lr == pytest.approx(0.05)
