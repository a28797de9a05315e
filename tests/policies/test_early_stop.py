"""Early-stopping advice on synthetic validation streams, the engine's carrying of it, and a
real run that overfits."""

from __future__ import annotations

import pytest

from tests._decide import decided
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.policy import Advice, Policy, PolicyLoadError, Proposal, load_policy
from trimtab.controller.state import JobState
from trimtab.policies.early_stop import EarlyStop, stalled

from .realrun import Run
from .streams import feed, job


def with_validations(*values: float, scale: float = 1.0) -> JobState:
    st = job()
    for v in values:
        feed(st, loss_mean=1.0, validation=scale * v)
    return st


def test_improving_is_quiet_and_stalling_for_patience_advises_stop():
    assert EarlyStop().propose(with_validations(5, 4, 3, 2, 1, 0.9, 0.8).view()) == []
    assert EarlyStop().propose(with_validations(5, 4, 3, 3, 3, 3, 3).view()) == []  # 4 since
    (p,) = EarlyStop().propose(with_validations(5, 4, 3, 3, 3.1, 3, 3.2, 3).view())
    assert p.advice == "stop" and p.factor is None and p.value is None
    assert p.reason == ("validation 3 at step 80: no improvement on the best 3 (step 30) "
                        "for 5 results")


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_improvements_smaller_than_min_rel_delta_do_not_count_whatever_the_scale(scale):
    tiny = [3.0 - 1e-4 * i for i in range(6)]  # 3e-5 relative per result
    assert EarlyStop().propose(with_validations(4, *tiny, scale=scale).view()) != []
    assert EarlyStop({"min_rel_delta": 0}).propose(
        with_validations(4, *tiny, scale=scale).view()) == []


def test_stalled_helper_and_min_delta():
    assert stalled([], 1, 0.0, 0.0) is None
    assert stalled([(1, 3.0), (2, 2.5), (3, 2.4)], 1, 0.2, 0.0) == (2, 2.5, 1)


def test_the_engine_carries_advice_without_touching_knobs_or_blocking_raises():
    class Raise(Policy):
        name = "raise"

        def propose(self, view):
            return [Proposal("lr", factor=1.5, reason="up")]

    st = with_validations(3, 3, 3, 3, 3, 3)
    d = decided(Engine([EarlyStop(), Raise()], Governor()), st)
    assert d.stop_advice.startswith("early_stop: validation 3 at step 60: no improvement")
    assert d.commands == {"lr": pytest.approx(1.5)}  # x1.5 the user's lr: only Raise's
    assert d.to_dict()["stop_advice"] == d.stop_advice
    assert decided(Engine([Raise()], Governor()), with_validations(3)).stop_advice is None


def test_advice_proposals_are_validated():
    with pytest.raises(ValueError, match=r"advice must be one of stop, got 'pause'"):
        Advice(reason="x", advice="pause")
    # Advice is its own kind: it names no knob and carries no factor, value or hold.
    a = Proposal.advise_stop("x")
    assert isinstance(a, Advice) and (a.knob, a.factor, a.value, a.hold) == (None, None, None,
                                                                            False)
    with pytest.raises(TypeError, match="factor"):
        Advice(reason="x", factor=0.5)  # type: ignore[call-arg]


def test_validations_survive_state_dict_and_a_rollback_drops_later_ones():
    st = with_validations(5, 4, 3)
    again = JobState.from_state_dict(st.state_dict())
    assert again.view().validations == ((10, 5.0), (20, 4.0), (30, 3.0))
    assert [s.step for s in again.view().history] == [10, 20, 30]
    from trimtab.controller.rollback import RollbackConfig
    st.on_restored(20, RollbackConfig())
    assert st.view().validations == ((10, 5.0), (20, 4.0))
    assert [s.step for s in st.view().history] == [10, 20]


def test_config_is_validated():
    with pytest.raises(PolicyLoadError, match=r"patience=0: Input should be greater than or"):
        load_policy("early_stop", {"patience": 0})
    with pytest.raises(PolicyLoadError, match=r"min_delta=-1: Input should be greater than or"):
        load_policy("early_stop", {"min_delta": -1})


def test_a_real_run_that_overfits_is_advised_to_stop(tmp_path):
    run = Run(tmp_path, ["early_stop"], lr=1e-2, optimizer="adamw")
    run.fix_pool(64)  # 64 training samples: the validation loss soon rises
    vals = []
    try:
        for _ in range(40):
            run.train(20)
            vals.append(run.validate())
            run.guard.report_validation(vals[-1])
            if run.guard.should_stop:
                break
    finally:
        run.close()
    print("validation:", [round(v, 4) for v in vals], "stop:", run.guard.stop_reason)
    assert run.guard.should_stop and run.guard.global_step < 800
    assert run.guard.stop_reason.startswith("early_stop: validation ")
    advised = [c for c in run.commands if c.stop_advice is not None]
    assert len(advised) == 1
    best = min(vals)
    assert vals.index(best) <= len(vals) - 1 - 5


def with_both(raw: list[float], ema: list[float]) -> JobState:
    st = job()
    for r, e in zip(raw, ema, strict=True):
        feed(st, loss_mean=1.0, validation=r, validation_ema=e)
    return st


def test_with_a_weight_average_the_default_judges_the_better_of_the_two():
    # The raw weights stall from the 3rd evaluation on; their average, lagging behind,
    # keeps improving (and is ahead from the 5th on).
    raw = [5, 4, 3, 3, 3, 3, 3, 3]
    ema = [6, 5, 4, 3.5, 2.9, 2.8, 2.7, 2.6]
    view = with_both(raw, ema).view()
    assert view.validations_ema == tuple((10 * (i + 1), float(v)) for i, v in enumerate(ema))
    (p,) = EarlyStop({"source": "raw"}).propose(view)  # the raw series alone: stop
    assert p.reason == ("validation 3 at step 80: no improvement on the best 3 (step 30) for "
                        "5 results")
    assert EarlyStop().propose(view) == []  # the average still improves: go on
    assert EarlyStop({"source": "ema"}).propose(view) == []
    # Once neither improves for patience results, the default advises stopping too.
    stalled_both = with_both(raw + [3] * 5, ema + [2.6] * 5).view()
    (p,) = EarlyStop().propose(stalled_both)
    assert p.reason == ("validation (the better of raw and weight average) 2.6 at step 130: no "
                        "improvement on the best 2.6 (step 80) for 5 results")
    # Judging the average alone ignores raw weights that are ahead of a stalled average.
    (p,) = EarlyStop({"source": "ema"}).propose(with_both([5, 4, 3, 2, 1, 0.5, 0.4],
                                                          [6] * 7).view())
    assert p.reason.startswith("weight average's validation 6 at step 70")
    assert EarlyStop().propose(with_both([5, 4, 3, 2, 1, 0.5, 0.4], [6] * 7).view()) == []


def test_without_a_weight_average_the_default_is_the_raw_series():
    st = with_validations(5, 4, 3, 3, 3.1, 3, 3.2, 3)
    assert st.view().validations_ema == ()
    assert EarlyStop().propose(st.view()) == EarlyStop({"source": "raw"}).propose(st.view())
    assert EarlyStop({"source": "ema"}).propose(st.view()) == []
    with pytest.raises(PolicyLoadError, match=r"source='mean': Input should be 'best', 'raw' "
                                              r"or 'ema'"):
        load_policy("early_stop", {"source": "mean"})


def test_best_of_merges_by_step():
    from trimtab.policies.early_stop import best_of

    assert best_of([], [(1, 2.0)]) == [(1, 2.0)]
    assert best_of([(1, 3.0), (3, 1.0)], [(2, 2.0), (3, 1.5)]) == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_ema_validations_survive_state_dict_a_rollback_drops_later_ones_and_old_states_load():
    st = with_both([5, 4, 3], [5.5, 4.5, 3.5])
    sd = st.state_dict()
    again = JobState.from_state_dict(sd)
    assert again.view().validations_ema == ((10, 5.5), (20, 4.5), (30, 3.5))
    from trimtab.controller.rollback import RollbackConfig
    st.on_restored(20, RollbackConfig())
    assert st.view().validations_ema == ((10, 5.5), (20, 4.5))
    # A journal written before the weight average's validations: loads, with none.
    del sd["validations_ema"]
    old = JobState.from_state_dict(sd)
    assert old.view().validations_ema == () and len(old.view().validations) == 3
    # Any other key missing (or one unknown) is still refused, by name.
    del sd["validations"]
    with pytest.raises(ValueError, match=r"missing keys \['validations'\]"):
        JobState.from_state_dict(sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['validations_emma'\]"):
        JobState.from_state_dict({**st.state_dict(), "validations_emma": []})
