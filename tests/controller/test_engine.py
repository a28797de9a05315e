"""The arbiter alone, then the engine: policies, failures, the governor, and what it records."""

from __future__ import annotations

import json

import pytest

from tests._decide import decided
from trimtab.controller.advance import take
from trimtab.controller.engine import Arbitration, Engine, arbitrate
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.rollback import RollbackConfig
from trimtab.controller.state import JobState
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="SGD",
                        dtype="float32", device="cpu")


def state(step: int = 1000, **knobs) -> JobState:
    knobs = knobs or {"lr": 0.1, "momentum": 0.9}
    return JobState.from_register(wire.Register(
        job="j", run_id="r", step=step, report_every=10, facts=FACTS, knobs=wire.Knobs(**knobs)))


def p(knob="lr", **kw) -> Proposal:
    return Proposal(knob, reason=kw.pop("reason", "because"), **kw)


class Fixed(Policy):
    """Proposes what it was built with; counts its calls."""

    def __init__(self, name: str, *proposals, returns=None, raises=None) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.proposals, self.returns, self.raises, self.calls = proposals, returns, raises, 0

    def propose(self, view):
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        return self.returns if self.returns is not None else list(self.proposals)


LOOSE = Governor(GovernorConfig(lr=KnobLimits(), momentum=KnobLimits(max=0.999)))


# -- the arbiter ------------------------------------------------------------------------


def test_the_largest_decrease_beats_holds_and_increases():
    arb = arbitrate(1.0, [("up", p(factor=2.0)), ("hold", p(hold=True)),
                          ("down", p(factor=0.8)), ("downer", p(value=0.5, reason="r"))])
    assert arb == Arbitration(0.5, "downer", "r")


def test_a_hold_beats_increases():
    arb = arbitrate(1.0, [("up", p(factor=1.5)), ("hold", p(hold=True, reason="wait"))])
    assert arb == Arbitration(None, "hold", "wait")


def test_a_factor_of_one_is_a_hold():
    assert arbitrate(1.0, [("up", p(factor=1.5)), ("same", p(factor=1.0))]).target is None


def test_the_smallest_increase_wins_among_increases():
    arb = arbitrate(1.0, [("big", p(factor=3.0)), ("small", p(value=1.2))])
    assert arb.target == 1.2 and arb.policy == "small"


def test_with_no_value_in_force_only_absolute_targets_count():
    arb = arbitrate(None, [("f", p("clip", factor=0.5)), ("a", p("clip", value=2.0)),
                           ("b", p("clip", value=1.0))])
    assert arb == Arbitration(1.0, "b", "because", ("f",))
    assert arbitrate(None, [("f", p("clip", factor=0.5))]) == Arbitration(None, unusable=("f",))


def test_nothing_proposed_is_no_change():
    assert arbitrate(1.0, []) == Arbitration(None)


# -- the engine -------------------------------------------------------------------------


def test_engine_arbitrates_then_governs_and_records_what_it_will_send():
    st = state()
    eng = Engine([Fixed("up", p(factor=1.5)), Fixed("down", p(factor=0.01, reason="spike"))],
                 Governor())
    d = decided(eng, st)
    kd = d.knobs["lr"]
    # The lr is trimtab's multiplier on the job's own lr: 1 at registration.
    assert (kd.current, kd.target, kd.policy, kd.reason) == (1.0, pytest.approx(1e-2), "down",
                                                             "spike")
    # The limit the value stopped at; the slew range (looser) would have stopped it later.
    assert kd.commanded == 0.5 and kd.limits == ("max_step_ratio",)
    assert d.commands == {"lr": 0.5}
    assert st.last_change_step["lr"] == 1000
    assert st.memory["lr"].history == [(1000, 1.0), (1000, 0.5)]
    assert st.decision_counts == {("down", "lr", "down"): 1}
    assert d.reasons() == ["lr x1 -> x0.5 by down: spike [limited: max_step_ratio]"]


def test_a_blocked_knob_is_decided_but_not_commanded_nor_recorded():
    st = state()
    eng = Engine([Fixed("tiny", p(factor=1.001))], Governor())
    d = decided(eng, st)
    assert d.knobs["lr"].commanded is None and d.knobs["lr"].limits == ("deadband",)
    assert d.commands == {} and d.reasons() == []
    assert st.last_change_step["lr"] is None and st.decision_counts == {}


def test_the_next_decision_sees_the_cooldown_it_recorded():
    st = state()
    eng = Engine([Fixed("down", p(factor=0.5))], Governor())
    assert decided(eng, st).commands == {"lr": 0.5}
    st.pending_command = wire.Command(job="j", seq=1, scale=wire.ScaleTargets(lr=0.5))
    st.step += 10
    d = decided(eng, st)
    assert d.knobs["lr"].current == 0.5  # the pending command's value, not the old one
    assert d.commands == {} and d.knobs["lr"].limits == ("cooldown",)


def test_a_raising_policy_is_disabled_for_that_job_and_the_others_go_on():
    bad = Fixed("bad", raises=RuntimeError("boom"))
    good = Fixed("good", p(factor=0.5))
    eng = Engine([bad, good], LOOSE)
    st, other = state(), state()
    d = decided(eng, st)
    assert d.errors == (("bad", "raised RuntimeError: boom"),)
    assert st.disabled_policies == {"bad": "raised RuntimeError: boom"}
    assert d.commands == {"lr": 0.5}
    st.step += 100
    decided(eng, st)
    assert bad.calls == 1 and good.calls == 2
    decided(eng, other)  # another job still asks it
    assert bad.calls == 2


@pytest.mark.parametrize(
    ("returns", "why"),
    [
        ({"lr": 0.5}, "returned dict, not a list of Proposal"),
        ([0.5], "returned item 0 of type float, not a Proposal"),
        ("lr", "returned str, not a list of Proposal"),
    ],
)
def test_nonsense_disables_the_policy(returns, why):
    st = state()
    d = decided(Engine([Fixed("odd", returns=returns), Fixed("good", p(factor=0.5))], LOOSE), st)
    assert d.errors == (("odd", why),) and st.disabled_policies == {"odd": why}
    assert d.commands == {"lr": 0.5}


def test_a_forced_non_finite_proposal_disables_the_policy():
    forged = p(factor=0.5)
    object.__setattr__(forged, "factor", float("nan"))
    st = state()
    d = decided(Engine([Fixed("forger", returns=[forged])], LOOSE), st)
    assert "forger" in st.disabled_policies and "finite" in d.errors[0][1]
    assert d.knobs == {}


@pytest.mark.parametrize("detail", [{"x": float("nan")}, {"obj": object()}, {"s": {1, 2}}])
def test_a_detail_the_journal_cannot_write_disables_the_policy(detail):
    """A plugin's trial: ``detail={"x": nan}`` raised in the journal after the command was
    committed, so knob changes reached the run with no decision journaled."""
    class Odd(Policy):
        name = "odd"

        def propose(self, view):
            return [Proposal("lr", factor=0.5, reason="x", detail=detail)]

    st = state()
    d = decided(Engine([Odd(), Fixed("good", p("momentum", value=0.8))], LOOSE), st)
    ((who, why),) = d.errors
    assert who == "odd" and "detail must be JSON" in why, why
    assert d.commands == {"momentum": 0.8}


def test_a_reason_longer_than_a_commands_is_cut_where_it_is_made():
    long = Proposal("lr", factor=0.5, reason="why " * 30000)
    assert len(long.reason) == 1024 and long.reason.endswith("...")
    assert Proposal("lr", factor=0.5, reason="short").reason == "short"


def test_a_policy_that_cannot_build_a_proposal_is_disabled():
    class Sloppy(Policy):
        name = "sloppy"

        def propose(self, view):
            return [Proposal("lr", factor=float("inf"), reason="x")]

    st = state()
    d = decided(Engine([Sloppy()], LOOSE), st)
    why = "raised ValueError: lr factor must be a finite number, got inf"
    assert d.errors == (("sloppy", why),)


def test_a_knob_outside_its_bounds_is_corrected_without_any_proposal():
    st = state(momentum=1.5, lr=0.1)
    d = decided(Engine([], Governor()), st)
    kd = d.knobs["momentum"]
    assert d.commands == {"momentum": 0.999}
    assert kd.policy == "governor" and kd.limits == ("bounds",)
    assert "outside bounds [0, 0.999]" in kd.reason


def test_shadow_decisions_are_not_sent_nor_recorded():
    st = state()
    d = decided(Engine([Fixed("down", p(factor=0.5))], Governor(), shadow=True), st)
    assert d.shadow and d.commands == {} and d.would_command == {"lr": 0.5}
    assert st.memory["lr"].history == [] and st.decision_counts == {}


def test_decision_to_dict_is_json():
    d = decided(Engine([Fixed("down", p(factor=0.5)), Fixed("bad", raises=KeyError("x"))],
               Governor()), state())
    rec = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert rec["commands"] == {"lr": 0.5}
    assert rec["knobs"]["lr"]["policy"] == "down"
    assert rec["proposals"][0] == {"policy": "down", "knob": "lr", "factor": 0.5,
                                   "value": None, "hold": False, "reason": "because",
                                   "rollback": None}
    assert rec["errors"] == [{"policy": "bad", "error": "raised KeyError: 'x'"}]


def test_engine_refuses_duplicate_names_and_non_policies():
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        Engine([Fixed("a"), Fixed("a")])
    with pytest.raises(TypeError, match="is not a named trimtab Policy"):
        Engine([object()])  # type: ignore[list-item]


# -- rollback ---------------------------------------------------------------------------


def with_stable(step: int = 1000, at: int = 500, **knobs) -> JobState:
    """A job at ``step`` whose checkpoint at ``at`` is stable, taken with ``knobs``."""
    st = state(step, **knobs)
    st.rollback.step = step
    st.rollback.checkpoints = [at]
    st.rollback.at_checkpoint[at] = {"knobs": st.knobs.model_dump(), "grad_norm_ema": 1.0}
    st.rollback.note_marked(at)
    return st


def guard(cause: str = "nonfinite") -> Fixed:
    return Fixed("guard", Proposal.roll_back(cause, "NaN loss"))


def test_a_rollback_beats_every_decrease_and_carries_its_governed_cut():
    st = with_stable()
    d = decided(Engine([Fixed("down", p(factor=0.1, reason="spike")), guard()], LOOSE), st)
    plan = d.rollback
    assert (plan.target_step, plan.from_step, plan.level, plan.cause) == (500, 1000, 1, "nonfinite")
    assert plan.policy == "guard" and plan.reason == "NaN loss"
    assert d.commands == {"lr": 0.5} and list(d.knobs) == ["lr"]
    assert d.knobs["lr"].current == 1.0 and d.mark_stable is None
    assert d.reasons() == [
        "rollback from step 1000 to stable step 500 (level 1, lr x0.5) by guard: nonfinite: "
        "NaN loss",
        "lr x1 -> x0.5 by guard: rollback to step 500 (level 1): NaN loss",
    ]
    assert st.rollback.pending.to_step == 500 and st.rollback.rollbacks == {"nonfinite": 1}
    assert d.to_dict()["rollback"]["target_step"] == 500


def test_without_a_stable_checkpoint_a_rollback_is_a_governed_cut():
    st = state()
    d = decided(Engine([guard()], Governor()), st)
    assert d.rollback is None and d.commands == {"lr": 0.5}
    assert d.knobs["lr"].reason == "NaN loss (no rollback: no stable checkpoint to roll back to)"
    assert st.rollback.pending is None and st.rollback.history == []
    # ... which the governor's cooldown then holds like any other change.
    st.step += 10
    assert decided(Engine([guard()], Governor()), st).knobs["lr"].limits == ("cooldown",)


def _report(st: JobState, step: int, checkpoints: list[int], loss: float = 2.0) -> None:
    take(st, wire.Report(job="j", seq=st.reports_seen + 1, step=step, window=10,
                         loss_mean=loss, knobs=st.effective, checkpoints=checkpoints),
         RollbackConfig().health)


def test_the_checkpoint_taken_at_attach_is_marked_stable_with_the_first_report():
    """The attach checkpoint holds the run as its user handed it over: the first decision
    marks it stable, so that the client keeps it until a newer one is stable (a run too hot
    from its first steps keeps something worth returning to); later decisions mark only
    checkpoints healthy for a full window."""
    st = state(step=0)
    engine = Engine([], Governor())
    _report(st, 10, [0])
    d = decided(engine, st)
    assert d.mark_stable == 0
    st.rollback.note_marked(0)
    _report(st, 20, [0, 20])
    assert decided(engine, st).mark_stable is None
    # Registered late (a controller started after the job, at step 500): the checkpoint at
    # the registration step, where the client holds one, is the run as this controller met
    # it; an older one (300, 400) is never marked without a healthy window after it.
    late = state(step=500)
    _report(late, 510, [300, 400, 500])
    assert decided(engine, late).mark_stable == 500
    late2 = state(step=500)
    _report(late2, 510, [300, 400])
    assert decided(engine, late2).mark_stable is None


def test_the_attach_checkpoint_is_marked_with_the_first_report_when_registered_after_it():
    """A client whose registration goes out a few steps into the run (its transport thread
    connects while the loop already trains: ``hooks=True``, a fast first step) tells the
    step of its attach snapshot as ``origin``: that one is marked with the first report,
    not left unmarked for a whole stable window."""
    engine = Engine([], Governor())
    for step, origin in ((8, 0), (1, 0)):
        st = JobState.from_register(wire.Register(
            job="j", run_id="r", step=step, report_every=10, facts=FACTS,
            knobs=wire.Knobs(lr=0.1, momentum=0.9), checkpoints=[0], origin=origin))
        _report(st, 10, [0])
        assert decided(engine, st).mark_stable == 0, step
    # An older client tells no origin: the registration's step, as before (none held there).
    old = state(step=8)
    _report(old, 10, [0])
    assert decided(engine, old).mark_stable is None
    # A late controller meets a run whose attach snapshot is still held: the checkpoint at
    # the registration comes first where the client holds one, else the origin.
    late = JobState.from_register(wire.Register(
        job="j", run_id="r", step=500, report_every=10, facts=FACTS,
        knobs=wire.Knobs(lr=0.1, momentum=0.9), origin=0))
    _report(late, 510, [0, 300, 400, 500])
    assert decided(engine, late).mark_stable == 500
    late2 = JobState.from_register(wire.Register(
        job="j", run_id="r", step=500, report_every=10, facts=FACTS,
        knobs=wire.Knobs(lr=0.1, momentum=0.9), origin=0))
    _report(late2, 510, [0, 400])
    assert decided(engine, late2).mark_stable == 0


def test_the_cooldown_does_not_hold_a_rollback_and_counts_from_the_checkpoint_after():
    st = with_stable()
    gov = Governor()
    st.note_change("lr", "plateau", 1.0, 0.8, 1000)  # at 1000: lr is cooling down
    st.knobs = wire.Knobs(lr=0.8, momentum=0.9)
    d = decided(Engine([guard()], gov), st)
    # The cut is relative to the multiplier in force at the fault (0.8), not the checkpoint's.
    assert d.rollback is not None and d.commands == {"lr": pytest.approx(0.4)}
    assert "cooldown" not in d.knobs["lr"].limits
    # The memory holds the rollback's change at the checkpoint's step, not the abandoned one.
    assert st.memory["lr"].history == [(500, 1.0), (500, pytest.approx(0.4))]
    assert st.last_change_step["lr"] == 500
    st.on_restored(500, RollbackConfig())
    st.pending_command = None
    st.knobs = wire.Knobs(lr=0.4, momentum=0.9)
    st.step = 520  # ordinary changes wait out the cooldown from the rollback
    kd = decided(Engine([Fixed("down", p(factor=0.5))], gov), st).knobs["lr"]
    assert kd.commanded is None and kd.limits == ("cooldown",)


def test_the_governor_bounds_and_step_ratio_per_level_still_bound_the_cut():
    deep = RollbackConfig(base_cut=0.01)
    st = with_stable()
    d = decided(Engine([guard()], Governor(), rollback=deep), st)
    assert d.commands == {"lr": 0.5} and d.knobs["lr"].limits == ("max_step_ratio",)
    # The command's reason says what it carries, not only the cut asked (a controller
    # trial: 'lr x0.25' on a command that carried x0.5).
    assert d.reasons()[0].startswith(
        "rollback from step 1000 to stable step 500 (level 1, lr x0.01 asked, x0.5 "
        "commanded [limited: max_step_ratio]) by guard")
    st = with_stable()
    floor = Governor(GovernorConfig(lr=KnobLimits(min_rel=0.8)))
    d = decided(Engine([guard()], floor, rollback=deep), st)
    assert d.commands == {"lr": pytest.approx(0.8)} and d.knobs["lr"].limits == ("bounds",)


def test_past_the_budget_the_decision_raises_the_alert_and_cuts_instead():
    cfg = RollbackConfig(budget=1, cooldown_steps=0)
    st = with_stable()
    eng = Engine([guard()], LOOSE, rollback=cfg)
    assert decided(eng, st).rollback is not None
    st.on_restored(500, cfg)
    st.pending_command = None
    st.step = st.rollback.step = 600
    d = decided(eng, st)
    assert d.rollback is None and d.alert.startswith("rollback budget exhausted: 1 rollbacks")
    assert st.rollback.alert == d.alert and d.commands == {"lr": 0.5}
    assert "no rollback: rollback budget exhausted" in d.knobs["lr"].reason
    st.step = st.rollback.step = 700
    again = decided(eng, st)
    assert again.alert is None and again.rollback is None  # raised once, then just cuts


def test_a_checkpoint_due_is_marked_unless_rolling_back_or_in_shadow():
    st = with_stable()
    st.rollback.checkpoints = [500, 700]
    st.rollback.candidates[700] = 10
    assert decided(Engine([], LOOSE), st).mark_stable == 700
    assert st.rollback.pending_mark == 700
    st = with_stable()
    st.rollback.checkpoints = [500, 700]
    st.rollback.candidates[700] = 10
    assert decided(Engine([], LOOSE, shadow=True), st).mark_stable is None
    d = decided(Engine([guard()], LOOSE), st)
    assert d.rollback is not None and d.mark_stable is None


def test_a_shadow_rollback_is_decided_but_not_recorded():
    st = with_stable()
    d = decided(Engine([guard()], LOOSE, shadow=True), st)
    assert d.rollback.target_step == 500 and d.commands == {}
    assert st.rollback.pending is None and st.memory["lr"].history == []


def test_a_rollback_proposal_must_be_an_lr_cut_with_a_cause():
    with pytest.raises(ValueError, match=r"a rollback cause must match"):
        Proposal.roll_back("Not OK", "x")
    with pytest.raises(ValueError, match=r"fallback factor < 1.*got factor=1.5"):
        Proposal.roll_back("nonfinite", "x", fallback_factor=1.5)
    # A rollback is its own kind, always for the lr: a knob change cannot carry one.
    assert Proposal.roll_back("nonfinite", "x").knob == "lr"
    with pytest.raises(TypeError, match="rollback"):
        Proposal("clip", factor=0.5, reason="x", rollback="nonfinite")  # type: ignore[call-arg]


def test_the_jobs_governor_memory_reaches_back_to_its_oldest_checkpoint():
    """What a rollback to the oldest checkpoint listed needs for the slew window (see
    test_governor): the job passes that checkpoint to its knobs' memory, and a change
    counts its direction from the value the run was using, not the one a restore brings."""
    st = state(step=0)
    st.rollback.checkpoints = [100, 900]
    for step, cur, value in [(30, 1.0, 2.0), (90, 2.0, 4.0), (1030, 4.0, 8.0)]:
        st.note_change("lr", "p", cur, value, 200, step=step)
    assert st.memory["lr"].history[:2] == [(30, 1.0), (30, 2.0)]  # kept: before 100
    st.note_change("lr", "guard", 4.0, 8.0, 200, step=900, ran=16.0)  # a rollback's cut
    assert st.decision_counts[("guard", "lr", "down")] == 1


def test_a_value_the_knob_can_never_take_disables_the_policy_with_a_reason():
    """A trial: ``Proposal("lr", value=0.0)`` passed the SDK and the governor refused it at
    every decision, with no log line, no policy error and the policy left enabled."""
    class Zero(Policy):
        name = "zero"

        def propose(self, view):
            return [Proposal("lr", value=0.0, reason="stop training")]

    st = state()
    d = decided(Engine([Zero(), Fixed("good", p(factor=0.5))], LOOSE), st)
    assert d.errors == (("zero", "proposed lr value 0, which the lr's limits do not allow "
                                 "([governor.lr] allow_zero = false)"),)
    assert "zero" in st.disabled_policies
    assert d.commands == {"lr": 0.5}
    # A schedule at its end (a cosine to eta_min = 0) is no error: the client follows it.
    from trimtab.policies.cosine import Cosine

    st = state(step=500)
    d = decided(Engine([Cosine({"t_max": 100})], LOOSE), st)
    assert d.errors == () and "cosine" not in st.disabled_policies
    # Where the knob allows zero, zero is a value like any other.
    st = state()
    bare = Governor(GovernorConfig(momentum=KnobLimits(min=0.0, max=0.999, allow_zero=True)))
    d = decided(Engine([Fixed("off", p("momentum", value=0.0))], bare), st)
    assert d.errors == () and d.commands == {"momentum": 0.0}
