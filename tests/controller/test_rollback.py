"""Rollback state and rules: stable marking, planning, escalation, budget, persistence."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from trimtab.controller.advance import take
from trimtab.controller.rollback import RollbackConfig, RollbackRecord, RollbackState
from trimtab.controller.rollback_rules import plan_rollback, stable_to_mark, why_no_rollback
from trimtab.controller.state import JobState
from trimtab.protocol import wire
from trimtab.protocol.ring import kept

FACTS = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="SGD", dtype="float32",
                        device="cpu")
CFG = RollbackConfig(stable_window_steps=200, stable_min_reports=5)
#: The same without the health warm-up: every report is judged, so every healthy one counts.
JUDGED = RollbackConfig(stable_window_steps=200, stable_min_reports=5,
                        health={"warmup_reports": 0})


class Run:
    """A job fed with reports every ``every`` steps; checkpoints every ``ckpt_every``.
    ``lr`` is the user's own lr, ``scale`` trimtab's multiplier on it (the knob model)."""

    def __init__(self, every: int = 10, ckpt_every: int = 100, cfg: RollbackConfig = CFG,
                 lr: float = 0.1, clip: float | None = None, keep: int | None = None) -> None:
        self.every, self.ckpt_every, self.cfg = every, ckpt_every, cfg
        self.lr, self.scale, self.clip = lr, 1.0, clip
        #: With ``keep``, the listing is the client's ring (its ``keep`` newest and the
        #: newest stable one) and the registration says so; else the last 8 taken.
        self.keep = keep
        self.job = JobState.from_register(wire.Register(
            job="j", run_id="r", report_every=every, facts=FACTS, keep=keep,
            **self.in_force()))
        self.seq, self.step, self.ckpts = 0, 0, []
        self.obs = []

    @property
    def rb(self) -> RollbackState:
        return self.job.rollback

    def in_force(self) -> dict:
        """``knobs`` (effective), ``base`` and ``scale`` as the client reports them."""
        return {"knobs": wire.Knobs(lr=self.lr * self.scale, clip=self.clip),
                "base": wire.Knobs(lr=self.lr), "scale": wire.Scale(lr=self.scale)}

    def report(self, loss: float = 1.0, **over) -> None:
        self.seq += 1
        self.step += self.every
        if self.step % self.ckpt_every == 0:
            self.ckpts = [*self.ckpts, self.step][-8:]
            if self.keep is not None:
                self.ckpts = sorted(kept(self.ckpts, self.rb.stable_step, self.keep))
        fields = {"loss_mean": loss, "loss_min": loss * 0.99, "grad_norm_mean": 1.0,
                  "checkpoints": list(self.ckpts), **self.in_force(), **over}
        if self.keep is not None:
            fields.setdefault("stable_step", self.rb.stable_step)
        report = wire.Report(job="j", seq=self.seq, step=self.step, window=self.every, **fields)
        self.obs.append(take(self.job, report, self.cfg.health).observation)

    def to(self, step: int, **kw) -> None:
        while self.step < step:
            self.report(**kw)

    def mark(self) -> int | None:
        """Mark what is due, as the engine and an ack would."""
        due = stable_to_mark(self.rb, self.cfg, self.keep)
        if due is not None:
            self.rb.note_mark(due)
            self.rb.note_marked(due)
        return due

    def restore(self, step: int) -> int:
        self.step = step
        self.ckpts = [s for s in self.ckpts if s <= step]
        return self.job.on_restored(step, self.cfg)


# -- stable marking ------------------------------------------------------------------------


def test_a_checkpoint_is_marked_stable_only_after_a_healthy_window():
    run = Run(cfg=JUDGED)
    run.to(100)
    assert run.obs[-1].new_checkpoints == (100,) and run.rb.candidates == {100: 0}
    run.to(290)
    assert stable_to_mark(run.rb, CFG) is None  # 190 healthy steps: not yet
    run.to(300)
    assert stable_to_mark(run.rb, CFG) == 100  # 200 is not due yet
    assert run.mark() == 100 and run.rb.stable_step == 100 and run.rb.marked_stable == 1
    assert stable_to_mark(run.rb, CFG) is None


def test_a_checkpoint_the_ring_drops_before_its_window_ends_is_marked_before_it_goes():
    """A ring shorter than the window (a checkpoint every 50 steps, 3 kept: none is held
    200 steps): a candidate with ``stable_min_reports`` healthy reports is marked when the
    client's next snapshot would drop it. Without this no checkpoint but the one taken at
    attach ever became stable, and a rollback at step 300 lost the whole run."""
    run = Run(ckpt_every=50, keep=3, cfg=JUDGED)
    run.ckpts = [0]
    run.rb.note_mark(0)
    run.rb.note_marked(0)  # the last resort, as at the first report
    run.to(140)
    assert stable_to_mark(run.rb, CFG, 3) is None  # 0 (stable), 50, 100: the ring is not full
    run.to(150)  # 0, 50, 100, 150: the snapshot at 200 drops 50, healthy for 10 reports
    assert run.ckpts == [0, 50, 100, 150]
    assert run.mark() == 50
    run.to(200)  # the ring drops the last resort, now that 50 is stable
    assert run.ckpts == [50, 100, 150, 200] and run.mark() == 100
    marked = []
    for _ in range(10):
        run.to(run.step + 50)
        marked.append(run.mark())
    assert marked == list(range(150, 650, 50))
    # Too few reports after it (a report every 50 steps): not marked, even when dropped next.
    sparse = Run(every=50, ckpt_every=50, keep=3, cfg=JUDGED)
    sparse.to(150)
    assert sparse.ckpts == [50, 100, 150] and stable_to_mark(sparse.rb, CFG, 3) is None
    # A client that did not say its keep: the window as before.
    untold = Run(ckpt_every=50, cfg=JUDGED)
    untold.to(240)
    assert stable_to_mark(untold.rb, CFG) is None


def test_reports_of_the_health_warm_up_are_no_evidence_a_checkpoint_is_sound():
    """Spikes and climbs are judged from the 21st report the controller sees (the health
    warm-up: a controller started late meets a run mid-way, with nothing to measure a spike
    against). A warm-up report is not judged, so it is none of the healthy reports a mark
    needs: before, a 1000x loss spike in a late controller's first reports was taken as
    healthy, and checkpoints were marked stable across it while it lasted."""
    run = Run(ckpt_every=50)  # the default warm-up: 20 reports
    run.to(150)
    run.report(loss=1000.0)  # step 160: a spike no one judges
    assert run.rb.last_unhealthy_step is None
    run.to(200)  # report 20
    assert [run.rb.judged_after(c) for c in (50, 100, 150, 200)] == [0, 0, 0, 0]
    assert run.rb.candidates == {50: 15, 100: 10, 150: 5, 200: 0}  # what a young rule sees
    run.to(240)  # 190 steps after the checkpoint at 50, 4 judged reports: not yet
    assert stable_to_mark(run.rb, CFG) is None
    run.to(250)  # 200 steps, 5 judged reports
    assert [run.rb.judged_after(c) for c in (50, 100, 150, 200, 250)] == [5, 5, 5, 5, 0]
    assert stable_to_mark(run.rb, CFG) == 50
    judged = Run(ckpt_every=50, cfg=JUDGED)  # no warm-up: 50 was due at 250 as well...
    judged.to(150)
    assert judged.rb.candidates[50] == 10  # ...with 10 reports counted by then, not 0


def test_few_reports_are_not_a_window_even_when_the_steps_are():
    run = Run(every=100, ckpt_every=100, cfg=JUDGED)
    run.to(300)  # 200 steps after the checkpoint at 100, but only 2 reports
    assert stable_to_mark(run.rb, JUDGED) is None
    run.to(600)  # five healthy reports after it
    assert stable_to_mark(run.rb, JUDGED) == 100


def test_a_burst_of_skipped_steps_is_healthy_and_a_persistent_one_is_not():
    """Non-finite steps the guard skipped left the weights as they were: a burst of them (a
    few bad batches) that is over within the report, or the next one, is healthy -- no
    rollback, the checkpoint stays a candidate. Non-finite values in three reports in a
    row, or in every step of a report (the run is stranded), are persistent."""
    run = Run()
    run.to(150)
    run.report(nonfinite_grads=3, nonfinite_losses=3)  # step 160: a burst of three
    assert run.rb.last_unhealthy_step is None and 100 in run.rb.candidates
    run.report(nonfinite_losses=2)  # step 170: the burst ran over the report's end
    assert run.rb.last_unhealthy_step is None and 100 in run.rb.candidates
    run.report()
    run.report(nonfinite_grads=1)  # 190
    run.report(nonfinite_grads=1)  # 200
    assert run.rb.last_unhealthy_step is None
    run.report(nonfinite_grads=1)  # 210: in three reports in a row
    assert run.rb.last_unhealthy_step == 210 and run.rb.candidates == {}
    stranded = Run()
    stranded.to(150)
    stranded.report(nonfinite_grads=10, skipped_steps=10)  # 160: a whole report
    assert stranded.rb.last_unhealthy_step == 160


@pytest.mark.parametrize("isolated,unhealthy", [(0, 160), (1, 160), (3, None)])
def test_a_cap_on_the_steps_a_burst_may_have_is_configurable(isolated, unhealthy):
    """``nonfinite_isolated``: at most this many non-finite steps in one report are a burst
    (0: every one counts)."""
    cfg = RollbackConfig(stable_window_steps=200, stable_min_reports=5,
                         health={"nonfinite_isolated": isolated})
    run = Run(cfg=cfg)
    run.to(150)
    run.report(nonfinite_grads=3)
    assert run.rb.last_unhealthy_step == unhealthy


@pytest.mark.parametrize("fault", ["nonfinite_grads", "nonfinite_losses"])
def test_an_unhealthy_report_inside_the_window_disqualifies_the_checkpoint(fault):
    run = Run()
    run.to(150)
    run.report(**{fault: 10})  # step 160, inside the window of the checkpoint at 100
    assert run.rb.candidates == {} and run.rb.last_unhealthy_step == 160
    run.to(600)
    assert 100 not in run.rb.candidates
    # The checkpoint at 200 came after the fault: it is marked once its window is healthy.
    assert run.mark() == 400  # the newest due (200 and 300 are too)
    assert run.rb.stable == [400]


def test_a_checkpoint_first_listed_after_a_fault_at_or_before_it_never_counts():
    run = Run()
    run.to(90)
    run.report(nonfinite_grads=10, checkpoints=[])  # step 100: unhealthy, checkpoint not listed
    run.report()  # step 110 lists the checkpoint taken at 100
    assert run.obs[-1].new_checkpoints == (100,) and run.obs[-1].disqualified == (100,)
    run.to(400)
    assert 100 not in run.rb.candidates


def test_the_newest_due_checkpoint_is_marked_and_the_older_ones_are_dropped():
    run = Run(ckpt_every=50, cfg=JUDGED)
    run.to(360)
    assert stable_to_mark(run.rb, CFG) == 150
    run.mark()
    assert sorted(run.rb.candidates) == [200, 250, 300, 350]


def test_a_checkpoint_the_client_no_longer_lists_is_never_a_target():
    run = Run()
    run.to(500)
    assert run.mark() == 300
    run.report(checkpoints=[400, 500])  # 300 evicted from the ring
    assert run.rb.stable == [] and plan_rollback("loss_spike", "x", run.rb, CFG) is None
    assert why_no_rollback(run.rb, CFG)[0] == "no_stable"
    # Non-finite values with nothing stable: the oldest checkpoint still listed, not 300.
    assert plan_rollback("nonfinite", "x", run.rb, CFG).target_step == 400


def test_a_run_gone_non_finite_with_nothing_stable_goes_back_to_the_attach_checkpoint():
    run = Run()
    run.ckpts = [0]  # the snapshot the guard takes at attach
    run.to(150)  # checkpoints at 0 and 100 listed, none stable yet
    plan = plan_rollback("nonfinite", "every step skipped", run.rb, CFG)
    assert plan is not None and plan.target_step == run.rb.checkpoints[0] == 0
    assert plan_rollback("loss_spike", "x", run.rb, CFG) is None  # only for non-finite


def test_a_stable_mark_reported_by_the_client_is_adopted():
    run = Run()
    run.to(200)
    run.report(stable_step=100)
    assert run.obs[-1].adopted_stable == 100 and run.rb.stable_step == 100


def test_a_checkpoints_values_are_those_of_the_report_ending_at_its_step():
    run = Run()
    run.to(90)
    run.report(checkpoints=[])  # step 100: the checkpoint there is not listed yet
    run.scale = 0.5  # changed in the window after it
    run.report()  # step 110 lists the checkpoint at 100
    assert run.obs[-1].new_checkpoints == (100,)
    assert run.rb.at_checkpoint[100]["knobs"]["lr"] == 1.0
    # A checkpoint at a step no report ended at takes the first report listing it.
    run.report(checkpoints=[100, 115])  # step 120
    assert run.rb.at_checkpoint[115]["knobs"]["lr"] == 0.5


def test_the_checkpoint_at_registration_holds_the_registrations_values():
    run = Run()
    run.scale = 0.5
    run.report(checkpoints=[0])  # step 10 lists the guard's snapshot at attach
    assert run.rb.at_checkpoint[0]["knobs"]["lr"] == 1.0
    assert run.rb.at_checkpoint[0]["grad_norm_ema"] is None


def test_the_values_in_force_are_kept_for_the_newest_steps_only():
    run = Run()
    run.to(500)
    assert sorted(run.rb.in_force_at) == list(range(190, 510, 10))  # the newest 32
    assert run.mark() == 300
    run.to(550)
    run.rb.note_ordered(_plan(run))
    run.restore(300)
    assert max(run.rb.in_force_at) == 300  # the abandoned trajectory's are forgotten


# -- planning, escalation, budget ------------------------------------------------------------


def _stable_run(**kw) -> Run:
    run = Run(**kw)
    run.to(400)
    assert run.mark() == 200
    run.to(450)
    return run


def _plan(run: Run, cause: str = "nonfinite", reason: str = "why", cfg=None):
    """The plan the engine would make: relative to the controlled values in force now."""
    return plan_rollback(cause, reason, run.rb, cfg or run.cfg,
                         in_force=run.job.knobs.model_dump())


def test_the_plan_targets_the_newest_stable_checkpoint_with_the_lr_in_force_cut():
    run = _stable_run()
    run.scale = 0.5  # trimtab's multiplier changed since the checkpoint
    run.report()
    plan = _plan(run, "loss_spike", "loss spike: z=9", CFG)
    assert (plan.target_step, plan.from_step, plan.level, plan.cut) == (200, 460, 1, 0.5)
    # The cut is on the multiplier in force at the fault (0.5), not the checkpoint's (1.0).
    assert plan.restored["lr"] == 1.0 and plan.in_force["lr"] == 0.5
    assert plan.targets == {"lr": 0.25}
    assert plan.cooldown_steps == 100 and plan.reason == "loss spike: z=9"


def test_the_cut_is_on_the_multiplier_not_the_users_lr_however_its_schedule_moved():
    run = _stable_run()
    run.lr = 0.01  # the user's own schedule decayed 10x since the checkpoint
    run.report()
    plan = _plan(run)
    assert plan.restored["lr"] == 1.0 and plan.targets == {"lr": 0.5}


def test_parted_replicas_are_rolled_back_with_no_lr_or_clip_cut():
    """DDP replicas that parted (a loop's own lr on one rank) are mended by the restore;
    nothing says the run was too hot, so the lr is not cut (a permanent x0.5 on a tuned
    run for a fault that was not the lr's), nor the clip: the restore brings the
    checkpoint's values back."""
    cfg = RollbackConfig(stable_window_steps=200, stable_min_reports=5, clip_tighten=0.5)
    run = _stable_run()
    run.cfg, run.clip = cfg, 1.0
    run.report()
    plan = _plan(run, "replicas", "parted", cfg)
    assert (plan.target_step, plan.level, plan.cut, plan.targets) == (200, 1, 1.0, {})
    assert "no lr cut" in plan.describe()
    spike = _plan(run, "loss_spike", "z=9", cfg)
    assert spike.targets == {"lr": 0.5, "clip": 0.5} and "lr x0.5" in spike.describe()


def test_a_plan_without_the_values_in_force_cuts_from_the_checkpoints():
    run = _stable_run()
    run.scale = 0.5
    run.report()
    plan = plan_rollback("nonfinite", "x", run.rb, CFG)
    assert plan.in_force["lr"] == 1.0 and plan.targets == {"lr": 0.5}


def _roll(run: Run, cause: str = "nonfinite"):
    plan = _plan(run, cause)
    assert plan is not None, why_no_rollback(run.rb, run.cfg)
    run.rb.note_ordered(plan)
    lost = run.restore(plan.target_step)
    run.scale = plan.targets.get("lr", run.scale)  # the client applies the cut
    return plan, lost


def test_repeated_rollbacks_near_one_step_deepen_the_cut_and_lengthen_the_cooldown():
    run = _stable_run(cfg=RollbackConfig(budget=5))
    plans = []
    for _ in range(3):
        plan, lost = _roll(run)
        plans.append(plan)
        assert lost == plan.from_step - 200 and run.job.step == 200
        assert why_no_rollback(run.rb, run.cfg)[0] == "cooldown"
        run.to(200 + plan.cooldown_steps + 10)
    assert [p.level for p in plans] == [1, 2, 3]
    assert [p.cut for p in plans] == [0.5, 0.25, 0.125]
    # The multiplier at the checkpoint is 1.0 each time; the one in force at each fault is
    # the previous cut, and the escalation is measured from the first fault's (1.0).
    assert [p.restored["lr"] for p in plans] == [1.0, 1.0, 1.0]
    assert [p.in_force["lr"] for p in plans] == [1.0, 0.5, 0.25]
    assert [r.fault_lr for r in run.rb.history] == [1.0, 0.5, 0.25]
    assert [p.targets["lr"] for p in plans] == [0.5, 0.25, 0.125]
    assert [p.cooldown_steps for p in plans] == [100, 200, 400]
    assert run.rb.steps_lost == sum(p.from_step - 200 for p in plans)
    assert run.rb.rollbacks == {"nonfinite": 3} and run.rb.restored == 3


def test_past_the_budget_no_rollback_is_planned_and_the_reason_names_it():
    run = _stable_run(cfg=RollbackConfig(budget=2, cooldown_steps=0))
    _roll(run, "loss_spike")
    run.to(260)
    _roll(run, "nonfinite")
    run.to(260)
    assert plan_rollback("nonfinite", "again", run.rb, run.cfg) is None
    code, why = why_no_rollback(run.rb, run.cfg)
    assert code == "budget"
    assert why == ("rollback budget exhausted: 2 rollbacks within 1000 steps of step 200 "
                   "(budget 2): 450->200 (loss_spike), 260->200 (nonfinite)")
    run.rb.raise_alert(why)
    assert why_no_rollback(run.rb, run.cfg) == ("alert", f"job in rollback alert: {why}")


def test_escalation_does_not_compound_on_a_cut_already_in_force():
    run = _stable_run(cfg=RollbackConfig(budget=5))
    first, _ = _roll(run)
    run.to(200 + first.cooldown_steps + 10)
    run.scale = 0.1  # a policy cut the multiplier far below the first rollback's
    run.report()
    second = _plan(run)
    # Level 2 from the first fault's 1.0 would be 0.25: never above base_cut x in force.
    assert second.level == 2 and second.targets == {"lr": pytest.approx(0.05)}


def test_rollbacks_far_apart_do_not_escalate():
    run = _stable_run(cfg=RollbackConfig(budget=1, cooldown_steps=0, near_steps=1000))
    first, _ = _roll(run)
    run.to(1600)
    run.mark()
    run.to(1650)
    second, _ = _roll(run)
    assert (first.target_step, second.target_step) == (200, 1400)
    assert (first.level, second.level) == (1, 1)


def test_non_finite_values_and_spikes_are_rolled_back_inside_the_cooldown_climbs_are_not():
    """A spike right after a restore is damage the rollback did not prevent (the quality
    grid's digits CNN: the second and third poisoned batches came after the restore, the
    cooldown held their spike back, and the run sat at chance level to its end): it is
    rolled back, one escalation deeper -- but never with the budget's last rollback, which
    a burst of bad data longer than a report would use up at once (bench.faults' 20
    corrupted batches: three rollbacks, the alert, and the rest of the burst unguarded).
    A climb, slow, waits the cooldown out (the restored run has not shown its new slope)."""
    run = _stable_run()
    _roll(run)
    run.to(250)  # inside the cooldown (until 300)
    assert why_no_rollback(run.rb, CFG, "climb")[0] == "cooldown"
    assert plan_rollback("climb", "c", run.rb, CFG) is None
    for cause in ("loss_spike", "grad_spike", "nonfinite"):
        plan = plan_rollback(cause, "s", run.rb, CFG)
        assert (plan.target_step, plan.level) == (200, 2)
    _roll(run)  # the second, inside the cooldown; the next would be the budget's last (3)
    run.to(230)
    assert run.rb.cooldown_until > run.rb.step
    for cause in ("loss_spike", "grad_spike"):
        assert why_no_rollback(run.rb, CFG, cause)[0] == "cooldown"
    plan = plan_rollback("nonfinite", "NaN", run.rb, CFG)
    assert (plan.target_step, plan.level) == (200, 3)


@pytest.mark.parametrize("spread,identical,threshold,unhealthy", [
    (0.0, True, 0.0, None),  # identical replicas
    (0.0, False, 0.0, 160),  # a sign flipped: the norms agree, the bytes do not
    (5e-9, False, 0.0, 160),  # one weight nudged by 1e-3 in a large model
    (3e-3, False, 0.0, 160),  # parted: judged at once, inside the health warm-up too
    (5e-7, False, 1e-6, None),  # a mixed fleet's margin on the norms
    (3e-3, False, 1e-6, 160),
    (3e-3, False, None, None),  # not judged
])
def test_parted_replicas_are_unhealthy_from_the_first_report(spread, identical, threshold,
                                                              unhealthy):
    """Under DDP the ranks' parameters are compared at every report; replicas that parted
    (a loop's own lr on one rank, a device that corrupted a value) stay parted, so the
    report is unhealthy at once: the checkpoints after the last healthy report are not
    sound, on every rank alike. By default any difference in their bytes counts (a trial:
    a 1e-3 nudge of one weight moved the norms by 3.5e-9, a sign flip not at all)."""
    cfg = RollbackConfig(stable_window_steps=200, stable_min_reports=5,
                         health={"replica_spread": threshold})
    run = Run(cfg=cfg)
    run.to(150, replica_spread=0.0, replicas_identical=True)
    assert run.job.reports_seen < cfg.health.warmup_reports  # no spike is judged yet
    run.report(replica_spread=spread, replicas_identical=identical)
    assert run.rb.last_unhealthy_step == unhealthy
    if unhealthy is not None:
        assert run.job.health.cause == "replicas"
        assert "parameters parted" in run.job.health.reason and run.rb.candidates == {}


def test_parted_replicas_are_rolled_back_inside_the_cooldown_like_non_finite_values():
    """Waiting mends neither non-finite weights nor parted replicas: inside the cooldown
    they are rolled back even with the budget's last rollback, where a spike is not."""
    run = _stable_run()
    _roll(run)
    _roll(run)
    run.to(230)
    assert run.rb.cooldown_until > run.rb.step
    assert why_no_rollback(run.rb, CFG, "loss_spike")[0] == "cooldown"
    plan = plan_rollback("replicas", "parted", run.rb, CFG)
    assert (plan.target_step, plan.level) == (200, 3)


def test_parted_replicas_with_nothing_stable_go_back_to_the_attach_checkpoint():
    """Like a run gone non-finite: the weights there were sound on every rank (DDP makes
    every replica rank 0's at construction)."""
    run = Run()
    run.ckpts = [0]  # the snapshot the guard takes at attach
    run.to(150)
    assert plan_rollback("loss_spike", "s", run.rb, CFG) is None
    assert plan_rollback("replicas", "r", run.rb, CFG).target_step == 0


def test_nothing_is_planned_while_a_rollback_is_pending_or_without_a_stable_checkpoint():
    run = Run()
    run.to(300)
    assert why_no_rollback(run.rb, CFG) == ("no_stable", "no stable checkpoint to roll back to")
    run.to(400)
    run.mark()
    plan = plan_rollback("climb", "c", run.rb, CFG)
    run.rb.note_ordered(plan)
    assert why_no_rollback(run.rb, CFG)[0] == "pending"


def test_a_failed_restore_never_targets_that_checkpoint_again():
    run = Run(ckpt_every=50)
    run.to(600)
    run.mark()  # 400
    run.rb.note_marked(350)
    run.to(650)
    plan = plan_rollback("nonfinite", "x", run.rb, CFG)
    run.rb.note_ordered(plan)
    run.rb.note_failed("unknown checkpoint 400")
    assert run.rb.history[-1].failed == "unknown checkpoint 400"
    assert (run.rb.failed, run.rb.restored) == (1, 0)  # trimtab_rollback_failures_total
    assert run.rb.stable == [350] and run.rb.unusable == [400]
    run.report(stable_step=400)  # still listed, even claimed stable: not taken back
    assert run.rb.stable == [350] and plan_rollback("x", "x", run.rb, CFG).target_step == 350


def test_clip_tightens_when_configured():
    cfg = RollbackConfig(clip_tighten=0.5)
    with_clip = _stable_run(cfg=cfg, clip=2.0)
    assert plan_rollback("grad_spike", "g", with_clip.rb, cfg).targets["clip"] == 1.0
    without = _stable_run(cfg=cfg)
    plan = plan_rollback("grad_spike", "g", without.rb, cfg)
    assert plan.targets["clip"] == pytest.approx(2.0 * 1.0)  # 2 x the grad-norm EMA
    assert "clip" not in plan_rollback("grad_spike", "g", without.rb, CFG).targets


def test_a_restore_forgets_the_abandoned_trajectory():
    run = _stable_run()
    run.job.note_change("lr", "p", 1.0, 0.5, 1000)  # at step 450
    plan = plan_rollback("nonfinite", "x", run.rb, CFG)
    run.job.rewind_controls(plan.target_step)
    assert run.job.last_change_step["lr"] == 200 and run.job.memory["lr"].history == []
    run.rb.note_ordered(plan)
    assert run.job.view().signals.slope_n == 20
    run.restore(200)
    sig = run.job.view().signals  # the slope window as it stood at step 200, not after
    assert run.rb.checkpoints == [100, 200] and sig.slope_n == 20 and sig.slope_since_step == 10
    assert run.job.step == 200 and run.rb.cooldown_until == 300
    # A checkpoint listed from beyond the current step is from the abandoned run: ignored.
    run.report(checkpoints=[100, 200, 300])
    assert run.rb.checkpoints == [100, 200]


# -- persistence and config ------------------------------------------------------------------


def test_state_dict_round_trips_through_json():
    run = _stable_run(cfg=RollbackConfig(budget=1))
    _roll(run)
    run.to(400)
    plan = plan_rollback("nonfinite", "x", run.rb, run.cfg)
    assert plan is None
    run.rb.raise_alert(why_no_rollback(run.rb, run.cfg)[1])
    run.rb.note_ordered(plan_rollback("nonfinite", "x", _stable_run().rb, CFG))  # pending
    sd = json.loads(json.dumps(run.rb.state_dict(), allow_nan=False))
    back = RollbackState()
    back.load_state_dict(sd)
    assert back.state_dict() == run.rb.state_dict()
    assert back.pending is back.history[-1]
    job_sd = json.loads(json.dumps(run.job.state_dict(), allow_nan=False))
    assert JobState.from_state_dict(job_sd).rollback.state_dict() == sd
    sd["extra"] = 1
    with pytest.raises(ValueError, match=r"RollbackState state_dict: .*unexpected keys"):
        back.load_state_dict(sd)


def test_config_is_validated_and_escalates_as_documented():
    with pytest.raises(ValidationError, match=r"base_cut\n  Input should be less than 1"):
        RollbackConfig(base_cut=1.0)
    with pytest.raises(ValidationError, match=r"stable_windw\n  Extra inputs are not permitted"):
        RollbackConfig(stable_windw=5)
    cfg = RollbackConfig(base_cut=0.3, cut_growth=0.5, cooldown_steps=50, cooldown_growth=3)
    assert [cfg.cut(n) for n in (1, 2)] == [0.3, 0.15]
    assert [cfg.cooldown(n) for n in (1, 2, 3)] == [50, 150, 450]


def test_a_fault_recurring_inside_the_cooldown_with_the_budget_spent_is_an_alert_at_once():
    run = _stable_run(cfg=RollbackConfig(budget=1))
    _roll(run)
    run.to(250)  # inside the cooldown (until 300)
    assert why_no_rollback(run.rb, run.cfg)[0] == "budget"
    run = _stable_run(cfg=RollbackConfig(budget=2))
    _roll(run)
    run.to(250)
    assert why_no_rollback(run.rb, run.cfg)[0] == "cooldown"  # budget left: just wait


def test_a_stranded_run_is_rolled_back_past_the_alert_with_a_deeper_cut_each_time():
    """Every step of the run skipped (its weights or state blew up before the guard could
    skip): nothing changes from one step to the next, so no lr cut and no amount of waiting
    can cure it. Past the budget and in alert, it is still rolled back, once it is stranded
    for ``stranded_reports`` reports, each time with the next escalation's cut, up to
    ``stranded_budget`` more rollbacks; then no more (the engine advises stopping)."""
    cfg = RollbackConfig(budget=2, cooldown_steps=0, stranded_budget=2)
    run = _stable_run(cfg=cfg)
    for _ in range(2):
        _roll(run)
        run.to(260)
    code, why = why_no_rollback(run.rb, cfg, "nonfinite")
    assert code == "budget"
    run.rb.raise_alert(why)
    skipped = {"loss_mean": None, "loss_min": None, "grad_norm_mean": None,
               "nonfinite_losses": 10, "nonfinite_grads": 10, "skipped_steps": 10}
    levels = []
    for _ in range(2):
        run.report(**skipped)  # one report with every step skipped: not yet stranded
        assert why_no_rollback(run.rb, cfg, "nonfinite")[0] == "alert"
        run.report(**skipped)
        assert run.rb.skipped_reports == 2
        plan, _ = _roll(run)
        assert run.rb.skipped_reports == 0  # the restore starts the count again
        levels.append((plan.level, plan.cut))
        assert "stranded" in plan.reason
    assert levels == [(3, 0.125), (4, 0.0625)]
    # Only a stranded run: a spike in alert is still not rolled back.
    assert why_no_rollback(run.rb, cfg, "loss_spike")[0] == "alert"
    run.report(**skipped)
    run.report(**skipped)
    code, why = why_no_rollback(run.rb, cfg, "nonfinite")
    assert code == "budget" and "stranded" in why and "4 rollbacks" in why
    # A report with a step taken ends the stranding.
    run.report()
    assert run.rb.skipped_reports == 0


def test_signals_after_a_rollback_are_the_checkpoints():
    """A spike's 1e5 loss must not stay in the loss EMA once the spike is rolled back: the
    EW moments, z-score baselines and slope window come back as they were at the
    checkpoint's step."""
    run = Run()
    run.to(200, loss=1.0)
    at_checkpoint = run.job.signals()
    run.to(240, loss=0.9)
    run.report(loss=1e5)  # step 250: the spike
    assert run.job.signals().loss_ema > 1e3
    run.restore(200)
    assert run.job.signals() == at_checkpoint
    # A checkpoint older than every signal kept comes back with signals afresh.
    run.job.tracker._marks.clear()
    run.restore(100)
    fresh = run.job.signals()
    assert (fresh.loss_ema, fresh.slope_n, fresh.loss_ref) == (None, 0, None)


def test_a_climb_never_goes_back_to_the_last_resort_it_becomes_an_lr_cut_there():
    """The checkpoint taken at attach, marked stable as the last resort while nothing else
    is, is no climb's target: a climb is slow, and going back there throws away all the
    run trained (the growing-target run of bench.nonstationary --quick ended 9.5x bare
    after such a rollback; with an LR cut in place instead, 2.2x). Non-finite values and
    spikes still go back to it; a climb goes back to a checkpoint marked stable later."""
    cfg = RollbackConfig()
    rb = RollbackState()
    rb.note_origin(0, None)  # the registration's step: the last resort
    assert rb.last_resort == [0]
    rb.note_marked(0)
    rb.checkpoints, rb.step = [0, 100], 210
    assert rb.resort_marked == [0] and rb.stable == [0]
    code, why = why_no_rollback(rb, cfg, "climb")
    # Said as it is (a trial read "no stable checkpoint" right after 0 was marked stable).
    assert code == "no_stable" and why.startswith(
        "no stable checkpoint but the one taken at attach, which a climb does not go back to")
    for cause in ("loss_spike", "grad_spike", "nonfinite"):
        assert why_no_rollback(rb, cfg, cause) is None
        assert plan_rollback(cause, "x", rb, cfg).target_step == 0
    rb.note_marked(100)
    assert why_no_rollback(rb, cfg, "climb") is None
    assert plan_rollback("climb", "x", rb, cfg).target_step == 100
    back = RollbackState()
    back.load_state_dict(json.loads(json.dumps(rb.state_dict())))
    assert back.resort_marked == [0]


def test_an_early_spike_goes_back_to_the_young_checkpoint_before_it_not_to_attach():
    """A spike at step 150 of a run checkpointing every 30, when only the checkpoint taken
    at attach is stable (none has seen stable_window_steps yet): the rollback goes to the
    newest checkpoint with stable_min_reports healthy reports after it (120), marked stable
    with it, not to step 0 -- the quality grid's short runs lost every step since attach
    there. A second fault near it goes back to the last resort; a climb still does not."""
    run = Run(every=5, ckpt_every=30)
    run.ckpts = [0]
    run.rb.note_origin(0, None)
    run.report()
    run.rb.note_mark(0)
    run.rb.note_marked(0)  # the last resort, marked at the first report
    run.to(145, loss=1.0)
    assert run.rb.stable == [0] and sorted(run.rb.candidates) == [30, 60, 90, 120]
    run.report(loss=1e5)  # step 150: a spike, its checkpoint taken after the bad batch
    assert run.obs[-1].unhealthy.cause == "loss_spike" and run.rb.candidates == {}
    plan = plan_rollback("loss_spike", "spike", run.rb, CFG)
    assert plan.target_step == 120
    assert "to checkpoint 120, 5 healthy reports after it, marked stable" in plan.reason
    for cause in ("grad_spike", "nonfinite"):
        assert plan_rollback(cause, "x", run.rb, CFG).target_step == 120
    assert why_no_rollback(run.rb, CFG, "climb")[0] == "no_stable"
    # Ordered, marked and restored as the engine and the client would.
    run.rb.note_mark(120)
    run.rb.note_ordered(plan)
    run.rb.note_marked(120)
    run.restore(120)
    run.to(140, loss=1.0)
    run.rb.cooldown_until = None
    run.report(loss=1e5)  # the fault again: 120 is stable now, an escalation there
    plan = plan_rollback("loss_spike", "again", run.rb, CFG)
    assert (plan.target_step, plan.level) == (120, 2)
    # A young target whose rollback was not marked (it failed, say): a fault near it
    # again goes back to the last resort.
    fresh = RollbackState(step=300, checkpoints=[0, 240], stable=[0], resort_marked=[0],
                          before_verdict={240: 6})
    assert plan_rollback("loss_spike", "x", fresh, CFG).target_step == 240
    fresh.history.append(RollbackRecord(300, 240, "loss_spike", "x", 1))
    assert plan_rollback("loss_spike", "x", fresh, CFG).target_step == 0
    back = RollbackState()
    back.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    assert back.before_verdict == {240: 6}


def test_non_finite_values_with_nothing_stable_say_nothing_of_a_young_checkpoint():
    # The attach checkpoint, never marked (no first report's mark yet), is a candidate with
    # healthy reports after it: the rollback goes there as the oldest listed, and its
    # reason does not call it a young checkpoint.
    st = RollbackState(step=40, checkpoints=[0, 30], before_verdict={0: 6, 30: 1})
    plan = plan_rollback("nonfinite", "NaN", st, CFG)
    assert plan.target_step == 0 and plan.reason == "NaN"


def test_a_spike_goes_to_a_newer_young_checkpoint_while_the_stable_one_was_marked_short():
    """A checkpoint marked stable short of its window (a ring that would have dropped it)
    has no more evidence behind it than a young one: a spike goes to the newer young
    checkpoint, marked in the same command, and its reason says why. One marked after a
    full window keeps the rollback; a climb never takes the young one."""
    def state(short: list[int]) -> RollbackState:
        return RollbackState(step=300, checkpoints=[100, 240], stable=[100],
                             short_marked=short, before_verdict={240: 6})

    plan = plan_rollback("loss_spike", "spike", state([100]), CFG)
    assert plan.target_step == 240
    assert plan.reason == ("spike (to checkpoint 240, 6 healthy reports after it, marked "
                           "stable with this rollback: no stable checkpoint had a full "
                           "healthy window behind it yet)")
    assert plan_rollback("loss_spike", "spike", state([]), CFG).target_step == 100
    assert plan_rollback("climb", "c", state([100]), CFG).target_step == 100
