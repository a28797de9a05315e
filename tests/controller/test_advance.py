"""Deciding changes nothing; committing is the one place a decision changes the job; advance
takes a report through both, for the live service and replay alike."""

from __future__ import annotations

import json

from trimtab.controller.advance import advance, commit, take
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.health import DivergenceThresholds
from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.state import JobState
from trimtab.policies.divergence_guard import DivergenceGuard
from trimtab.policies.lr_range_test import LrRangeTest
from trimtab.policies.plateau import Plateau
from trimtab.policies.warmup import Warmup
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="SGD",
                        dtype="float32", device="cpu")
EVERY = 10
#: No cooldown, slew or step limit: every change the policies ask for is sent.
LOOSE = Governor(GovernorConfig(lr=KnobLimits(), momentum=KnobLimits(max=0.999)))


def job() -> JobState:
    return JobState.from_register(wire.Register(
        job="j", run_id="r", report_every=EVERY, facts=FACTS,
        knobs=wire.Knobs(lr=0.1, momentum=0.9)))


def report(st: JobState, loss: float | None, **kw) -> wire.Report:
    step = st.step + EVERY
    kw.setdefault("checkpoints", [s for s in range(0, step + 1, 50)][-4:])
    kw.setdefault("applied_seq", st.command_seq)
    return wire.Report(job="j", seq=st.reports_seen + 1, step=step, window=EVERY,
                       loss_mean=loss, loss_min=loss, loss_max=loss, grad_norm_mean=1.0,
                       knobs=st.effective, base=st.base, scale=wire.Scale(lr=st.knobs.lr or 1.0),
                       **kw)


def snapshot(st: JobState) -> str:
    """Everything the job's state holds, as text (what the journal would store)."""
    return json.dumps(st.state_dict(), sort_keys=True, default=str)


def engine() -> Engine:
    return Engine([DivergenceGuard(), LrRangeTest({"when": "evidence"}), Plateau(),
                   Warmup({"warmup_steps": 500})], Governor())


def _feed(st: JobState, eng: Engine, losses) -> None:
    for loss in losses:
        out = advance(st, report(st, loss), eng)
        if out.command is not None:  # the client applies it at once and says so
            st.on_applied(out.command.seq, st.knobs)


def test_deciding_twice_on_the_same_state_gives_equal_decisions_and_changes_nothing():
    eng = engine()
    st = job()
    # Healthy at first, so a checkpoint is marked; then the run goes non-finite: the
    # decision orders a rollback, cuts the lr, rewinds the governor and ends any phase.
    _feed(st, eng, [2.0 - 0.01 * i for i in range(30)])
    take(st, report(st, None, nonfinite_losses=EVERY, nonfinite_grads=EVERY),
         DivergenceThresholds())
    before = snapshot(st)
    first, second = eng.decide(st), eng.decide(st)
    assert first == second
    assert first.rollback is not None and first.commands  # a decision with consequences
    assert snapshot(st) == before  # the job's state untouched, by both calls
    # The draft holds what the decision leaves; committing makes it the job's.
    command = commit(st, first)
    assert command is not None and command.rollback_to == first.rollback.target_step
    assert snapshot(st) != before and st.rollback.pending is not None
    assert st.pending_command == command


def test_a_decision_that_opens_a_phase_is_pure_too():
    eng = Engine([DivergenceGuard(), LrRangeTest({"when": "evidence"})], Governor())
    st = job()
    # A loss that does not fall: the range test's evidence of an lr far too low. Every
    # decision on the way is pure; the one that opens the sweep's phase too.
    for _ in range(40):
        take(st, report(st, 2.0), DivergenceThresholds())
        before = snapshot(st)
        first, second = eng.decide(st), eng.decide(st)
        assert first == second and snapshot(st) == before
        if first.draft.phase is not None:
            break
        command = commit(st, first)
        if command is not None:
            st.on_applied(command.seq, st.knobs)
    assert st.phase is None and first.draft.phase.policy == "lr_range_test"
    commit(st, first)
    assert st.phase == first.draft.phase


def test_advance_sends_ordinary_changes_only_once_the_pending_command_is_applied():
    eng = Engine([Warmup({"warmup_steps": 500})], LOOSE)
    st = job()
    out = advance(st, report(st, 2.0), eng)
    assert out.command is not None and st.pending_command == out.command
    # Not applied yet: the warm-up's next step waits (only a rollback would not).
    out2 = advance(st, report(st, 2.0, applied_seq=0), eng)
    assert out2.decision is None and out2.command is None
    assert st.pending_command == out.command
    # Applied: decided in full again.
    out3 = advance(st, report(st, 2.0), eng)
    assert out3.decision is not None and out3.command is not None
    assert out3.command.seq == out.command.seq + 1


class _Cut(Policy):
    """Asks for x0.8 of the lr multiplier at every report."""

    name = "cut"

    def propose(self, view):
        return [Proposal("lr", factor=0.8, reason="always")]


def test_the_cooldown_counts_from_the_step_a_change_was_applied_at():
    """A controller that fell behind (a slow policy) decided at step 10 what the run
    applied at step 130. Counted from 10, a 50-step cooldown let the next change through at
    the report of step 140, 10 steps after the first took effect; counted from the ack's
    step, not before 180."""
    from trimtab.controller.advance import settle_ack
    from trimtab.controller.rollback import RollbackConfig

    gov = Governor(GovernorConfig(lr=KnobLimits(cooldown_steps=50)))
    eng = Engine([_Cut()], gov)
    st = job()
    out = advance(st, report(st, 1.0), eng)
    assert out.command is not None and out.command.scale.lr == 0.8
    # The run goes on; its ack comes with step 130 (the reports between said applied_seq 0).
    while st.step < 120:
        assert advance(st, report(st, 1.0, applied_seq=0), eng).command is None
    ack = wire.Ack(job="j", seq=out.command.seq, step=130, knobs=wire.Knobs(lr=0.08),
                   base=wire.Knobs(lr=0.1), scale=wire.Scale(lr=0.8))
    settle_ack(st, ack, RollbackConfig())
    steps = []
    while st.step < 200:
        out = advance(st, report(st, 1.0), eng)
        if out.command is not None:
            steps.append(st.step)
            st.on_applied(out.command.seq, st.knobs)
    assert steps[0] == 180, steps


def test_a_knob_refused_in_an_ack_leaves_the_commands_mark_done():
    """The ack names what failed. A command that marks a checkpoint stable and sets a knob
    the client refuses (Rprop's lr, momentum for an optimizer without one) was marked: the
    controller recorded the mark as failed, and never took that checkpoint as stable. A
    failed mark, or a client error, is still a failed mark."""
    from trimtab.controller.advance import settle_ack
    from trimtab.controller.rollback import RollbackConfig
    from trimtab.protocol import wire

    facts = wire.ScaleFacts(param_count=1, group_sizes=[1], optimizer="Rprop",
                            dtype="float32", device="cpu")
    refused = ("knobs not applied: lr commanded, but Rprop reads its lr only at its first "
               "step (each parameter's step size adapts on its own after): a multiplier "
               "would change nothing it does")
    for error, marked in [(refused, True), (None, True),
                          ("mark_stable=100: no checkpoint at that step (held: 200)", False),
                          ("client error: RuntimeError: boom", False)]:
        st = JobState.register(wire.Register(job="j", run_id="r", report_every=10,
                                             facts=facts, knobs=wire.Knobs(lr=0.1)))
        st.rollback.checkpoints = [100]
        st.rollback.note_mark(100)
        st.pending_command = wire.Command(job="j", seq=1, mark_stable=100,
                                          scale=wire.ScaleTargets(lr=0.5))
        settle_ack(st, wire.Ack(job="j", seq=1, step=120, knobs=wire.Knobs(lr=0.1),
                                error=error), RollbackConfig())
        assert (st.rollback.stable == [100]) is marked, error
