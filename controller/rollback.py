"""Rollback: which checkpoints are stable, when to roll back to one, and how hard to cut.

Long runs die from loss spikes and non-finite values; the PaLM and OPT-175B reports
describe people restarting from a checkpoint taken before the spike with a lower
learning rate. Here that is automatic, and bounded:

* **Health.** Every report is judged once, by :func:`~trimtab.controller.health.assess`:
  non-finite values, a loss or gradient-norm spike (one-sided z-score, and a material
  rise), or a sustained climb (loss slope significantly positive over a full window) make
  it unhealthy. The same verdict reaches the ``divergence_guard`` policy.
* **Stable marking.** A checkpoint the client lists becomes a candidate when it shows up
  after the last unhealthy report;
  :func:`~trimtab.controller.rollback_rules.stable_to_mark` names the newest candidate
  that has then seen ``stable_window_steps`` steps and ``stable_min_reports`` reports,
  all healthy -- or, told the client's ``keep``, one its next snapshot drops before that
  window ends, after ``stable_min_reports`` healthy reports. One unhealthy report
  disqualifies every candidate not yet stable; a report of the health warm-up, not judged
  for spikes and climbs, is not one of those healthy reports.
* **Rollback.** :func:`~trimtab.controller.rollback_rules.plan_rollback` targets the newest
  stable checkpoint the client can still restore (while no stable one has a full window
  behind it -- the last resort taken at attach, or marked short of the window -- a spike
  or non-finite values go back instead to the newest checkpoint that had
  ``stable_min_reports`` healthy reports after it when the fault was judged, if newer,
  marked stable with the rollback -- the client then lets the older stable one go),
  with ``level`` = 1 + the rollbacks
  already ordered to a step within ``near_steps`` of it. The cut is relative to the
  values *in force at the fault* (the lr multiplier on the user's own schedule, the knob
  model): the lr multiplier becomes ``base_cut * cut_growth ** (level - 1)`` times the
  one in force at the first of those faults (at this fault for a first rollback), and
  never more than ``base_cut`` times the one in force now: escalation does not compound
  when the run already carries an earlier cut. The restore puts the user's schedule back
  at the checkpoint's position; the cut multiplies it from there (no cut for DDP replicas
  that parted, :data:`~trimtab.controller.health.UNCUT`: the restore alone mends
  them, and the lr goes back to the checkpoint's). After a rollback no
  climb rollback is ordered for ``cooldown_steps * cooldown_growth ** (level - 1)`` steps
  past the restored one (a climb is slow: the restored run needs those steps to show its
  new slope). Non-finite values are rolled back inside it (a run whose every step is
  skipped never gets past a cooldown counted in steps), and so is a spike, unless that
  would spend the budget's last rollback: both are damage an LR cut cannot repair (a spike
  right after a restore, the rest of a burst of bad batches, left a run at chance level to
  its end), and a burst of bad data longer than a report would otherwise use the whole
  budget at once and leave the rest of it unguarded. Past
  ``budget`` rollbacks near one spot the job enters alert: no more rollbacks for it, only
  governed LR cuts. The budget bounds every path: there is never an endless rollback
  loop. One exception, bounded too: a **stranded** run, every step of the last
  ``stranded_reports`` reports skipped (its weights or optimizer state blew up before the
  guard could skip: nothing changes from one step to the next, so neither an LR cut nor
  waiting can cure it), is still rolled back for non-finite values past the alert and the
  budget, each time one escalation deeper, up to ``stranded_budget`` more rollbacks near
  the spot; after them the engine advises stopping the run.
* **Planned rollback.** With ``to_step`` (:meth:`Proposal.roll_back`),
  :func:`~trimtab.controller.rollback_rules.plan_rollback` targets the checkpoint listed
  at that step, stable or not: the return to the start of a measurement phase (the LR
  range test's sweep), which the engine allows once per phase. It has ``level`` 0: it
  neither escalates later rollbacks nor counts against the budget, is not held back by a
  cooldown or an alert, and starts none; its LR is the value the phase measured (bounds
  only, :meth:`Governor.govern_rollback`).

This module holds the bookkeeping: the config, one :class:`RollbackState` per job (the
checkpoints listed, the candidates, the stable ones, the rollbacks ordered and settled)
and its records. The rules that read it (:func:`stable_to_mark`, :func:`plan_rollback`,
:func:`why_no_rollback`) are pure functions in :mod:`~trimtab.controller.rollback_rules`.
The engine records into a state what it decides, the ack handling what the client did.

>>> cfg = RollbackConfig()
>>> [round(cfg.cut(level), 3) for level in (1, 2, 3)]
[0.5, 0.25, 0.125]
>>> [cfg.cooldown(level) for level in (1, 2, 3)]
[100, 200, 400]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from trimtab.controller.governor import _check_keys
from trimtab.controller.health import DivergenceThresholds, Unhealthy

#: The unjudged report steps kept: a warm-up's (``warmup_reports`` is 20 by default).
_MAX_UNJUDGED = 1000

if TYPE_CHECKING:
    from trimtab.controller.view import JobView

__all__ = [
    "RollbackConfig",
    "Observation",
    "RollbackRecord",
    "RollbackPlan",
    "RollbackState",
]

_Pos = {"gt": 0.0, "allow_inf_nan": False}


class RollbackConfig(BaseModel):
    """Stable marking, escalation and budget; see the module docstring for the rules.

    >>> RollbackConfig(budget=2).near_steps
    1000
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Healthy steps needed after a checkpoint before it is marked stable...
    stable_window_steps: int = Field(200, ge=1)
    #: ...and healthy reports (so that a large report_every still gets several looks).
    stable_min_reports: int = Field(5, ge=1)
    #: What an unhealthy report is: the one judgement the rollback manager and the
    #: ``divergence_guard`` policy share (:mod:`~trimtab.controller.health`).
    health: DivergenceThresholds = Field(default_factory=DivergenceThresholds)
    #: LR factor of the first rollback near a spot, on the LR in force at the checkpoint.
    base_cut: float = Field(0.5, gt=0.0, lt=1.0)
    #: Each further rollback near the same spot multiplies the cut by this again.
    cut_growth: float = Field(0.5, gt=0.0, le=1.0)
    #: If set, each rollback also tightens clipping: ``clip * clip_tighten ** level`` when
    #: a clip was in force at the checkpoint, else a clip of ``clip_from_grad_norm`` x the
    #: gradient-norm EMA seen with the checkpoint, ``* clip_tighten ** (level - 1)``.
    clip_tighten: float | None = Field(None, gt=0.0, lt=1.0)
    clip_from_grad_norm: float = Field(2.0, **_Pos)
    #: No climb rollback until this many steps past the restored one (x growth per level;
    #: non-finite values are rolled back inside it, and spikes while that leaves the
    #: budget's last rollback unspent).
    cooldown_steps: int = Field(100, ge=0)
    cooldown_growth: float = Field(2.0, ge=1.0, allow_inf_nan=False)
    #: Rollbacks whose target steps lie within this distance are "near the same spot".
    near_steps: int = Field(1000, ge=0)
    #: Most rollbacks near one spot; one more asked for puts the job in alert.
    budget: int = Field(3, ge=1, le=100)
    #: A run is stranded after this many reports in a row with every step skipped (its
    #: weights or optimizer state are non-finite or overflow: no step can change them)...
    stranded_reports: int = Field(2, ge=1, le=100)
    #: ...and is still rolled back, past the budget and in alert, up to this many more
    #: times near one spot, each with the next escalation's (deeper) cut; after them the
    #: engine advises stopping the run.
    stranded_budget: int = Field(8, ge=0, le=100)

    def cut(self, level: int) -> float:
        """The LR factor of a rollback at escalation ``level`` (1 = first)."""
        return self.base_cut * self.cut_growth ** (level - 1)

    def cooldown(self, level: int) -> int:
        """Steps after the restored step during which no new rollback is ordered."""
        return int(round(self.cooldown_steps * self.cooldown_growth ** (level - 1)))


# -- per-job state ------------------------------------------------------------------------


@dataclass
class RollbackRecord:
    """One rollback ordered: from which step, to which checkpoint, why, at which level."""

    from_step: int
    to_step: int
    cause: str
    reason: str
    level: int
    #: The lr multiplier in force at the fault (the base of the escalation).
    fault_lr: float | None = None
    #: Set when the client acknowledged the restore.
    restored_step: int | None = None
    #: Set when the client could not restore (and why).
    failed: str | None = None
    #: The mean loss of the report the rollback was decided on (None: not finite, or an
    #: older record).
    loss_from: float | None = None
    #: The seq of the command that carries it (None: an older record).
    seq: int | None = None


@dataclass(frozen=True)
class Observation:
    """What one report changed: checkpoints seen for the first time, its health, and a
    stable mark taken over from the client."""

    new_checkpoints: tuple[int, ...] = ()
    #: Of those, the ones that can never be marked stable (an unhealthy report at or after).
    disqualified: tuple[int, ...] = ()
    unhealthy: Unhealthy | None = None
    adopted_stable: int | None = None
    #: Why climb verdicts were turned off for the job with this report (None: they were
    #: not): the checkpoint a climb rollback restored scored as high as the run before it
    #: (:meth:`RollbackState.check_climb`).
    data_moved: str | None = None


@dataclass(frozen=True)
class RollbackPlan:
    """A rollback :func:`plan_rollback` proposes; the engine governs ``targets``."""

    target_step: int
    from_step: int
    cause: str
    reason: str
    level: int
    #: The escalation's lr factor, on the multiplier in force at the first fault near here.
    cut: float
    cooldown_steps: int
    #: The controlled values in force at the checkpoint (what the restore brings back).
    restored: dict[str, float | None]
    #: Knob targets before the governor: lr, and clip when ``clip_tighten`` is set.
    targets: dict[str, float]
    #: The controlled values in force at the fault (what the cut is relative to).
    in_force: dict[str, float | None] = field(default_factory=dict)
    #: The policy that asked (set by the engine).
    policy: str = ""

    @property
    def planned(self) -> bool:
        """A planned rollback (level 0: to a named checkpoint, ending a phase)."""
        return self.level == 0

    def describe(self, lr: float | None = None, limits: Sequence[str] = ()) -> str:
        """One line for a Command's reasons and the log; ``lr`` and ``limits``: the lr
        multiplier the command carries and the governor limits that made it other than
        the cut asked (a controller trial: a reason said 'lr x0.25' of a command that
        carried x0.5, max_step_ratio's)."""
        if self.planned:
            return (f"planned rollback from step {self.from_step} to checkpoint "
                    f"{self.target_step} by {self.policy or '?'}: {self.cause}: "
                    f"{self.reason}")[:1024]
        cut = "no lr cut" if self.cut == 1.0 else f"lr x{self.cut:.3g}"
        if lr is not None and limits:
            cut += f" asked, x{lr:.6g} commanded [limited: {', '.join(limits)}]"
        return (f"rollback from step {self.from_step} to stable step {self.target_step} "
                f"(level {self.level}, {cut}) by {self.policy or '?'}: "
                f"{self.cause}: {self.reason}")[:1024]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record."""
        return asdict(self)


@dataclass
class RollbackState:
    """One job's checkpoints, stable marks, rollbacks and alert; see the module docstring."""

    #: Step of the latest report (goes back with a restore).
    step: int = 0
    #: Checkpoints the client can restore on this trajectory, oldest first.
    checkpoints: list[int] = field(default_factory=list)
    #: What was in force at each listed checkpoint's step (the controlled values the
    #: report ending at that step gave, else the first report listing it):
    #: ``{"knobs": {...}, "grad_norm_ema": x}``.
    at_checkpoint: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The same for the newest reported steps (and the registration), until a checkpoint
    #: at one of them is listed.
    in_force_at: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Candidates for stable: checkpoint step -> healthy reports after it.
    candidates: dict[int, int] = field(default_factory=dict)
    #: Checkpoints marked stable (and still listed), oldest first.
    stable: list[int] = field(default_factory=list)
    #: Checkpoints the client failed to restore: never targeted or adopted again.
    unusable: list[int] = field(default_factory=list)
    #: A mark_stable sent and not yet acknowledged.
    pending_mark: int | None = None
    #: Where the run was when this controller met it, or its user handed it over: the
    #: registration's step, and the client's origin (the snapshot taken at attach, or of
    #: the state a resumed process loaded, :attr:`wire.Register.origin`). The first of them
    #: the client lists is marked stable with the first report while nothing is, as the
    #: rollback target of last resort (empty: marked, or none).
    last_resort: list[int] = field(default_factory=list)
    #: A resume at this step from a save made in a healthy stretch of the run (this
    #: controller saw the run up to it, and no report near it was unhealthy): a spike
    #: soon after it, with nothing stable yet, goes back there (None: no such resume).
    clean_resume: int | None = None
    #: The last resort marked stable (while nothing else was): no climb's target -- a climb
    #: is slow, and going back to where the run was handed over throws away all it trained;
    #: an LR cut in place answers it there (empty: none marked).
    resort_marked: list[int] = field(default_factory=list)
    #: Checkpoints marked stable before a full ``stable_window_steps`` of healthy steps
    #: after them (a ring that would drop them first, the return of a measurement phase, a
    #: young rollback target): while every stable one is such or the last resort, a spike
    #: or non-finite values go back to the newest checkpoint with
    #: ``stable_min_reports`` healthy reports after it, if newer.
    short_marked: list[int] = field(default_factory=list)
    #: The steps of the reports not judged for spikes and climbs (the health warm-up's,
    #: newest last): a candidate's healthy reports include them, a stable mark's
    #: :meth:`judged_after` does not.
    unjudged: list[int] = field(default_factory=list)
    #: The rollback ordered and not yet acknowledged.
    pending: RollbackRecord | None = None
    last_unhealthy_step: int | None = None
    last_unhealthy: str | None = None
    history: list[RollbackRecord] = field(default_factory=list)
    #: No rollback is ordered before the run reaches this step.
    cooldown_until: int | None = None
    #: Why the job is in alert (budget exhausted); None: not in alert.
    alert: str | None = None
    #: Reports in a row, since the last restore, with every step skipped.
    skipped_reports: int = 0
    steps_lost: int = 0
    #: Rollbacks ordered, by cause.
    rollbacks: dict[str, int] = field(default_factory=dict)
    restored: int = 0
    #: Rollbacks the client could not restore (its ack said why; nothing was restored).
    failed: int = 0
    checkpoints_seen: int = 0
    marked_stable: int = 0
    #: The mean loss of the latest report (None: not finite).
    last_loss: float | None = None
    #: After a climb rollback's restore: the checkpoint's step, its loss when it was taken,
    #: the loss the rollback was decided on, and the restored run's first report losses
    #: (:meth:`check_climb`); None: nothing to check.
    climb_check: dict[str, Any] | None = None
    #: The step at which the restored checkpoint of a climb rollback scored as high as the
    #: run before it: the loss rose with the data, not the weights, and climb verdicts are
    #: off for the job from then on (None: they are on).
    climb_moved: int | None = None
    #: The candidates (checkpoint step -> healthy reports after it) as they stood when the
    #: last unhealthy report was judged, which cleared them: the young checkpoints a spike or
    #: non-finite values may go back to while no stable one has a full window behind it (see
    #: :func:`~trimtab.controller.rollback_rules.plan_rollback`).
    before_verdict: dict[int, int] = field(default_factory=dict)

    def judged_after(self, step: int) -> int:
        """The healthy reports after the checkpoint at ``step`` (a candidate) that were
        judged for spikes and climbs: those a stable mark needs."""
        return self.candidates.get(step, 0) - sum(1 for u in self.unjudged if u > step)

    @property
    def stable_step(self) -> int | None:
        """The newest checkpoint marked stable that the client still lists."""
        return self.stable[-1] if self.stable else None

    # -- what reports tell --------------------------------------------------------------

    def copy(self) -> RollbackState:
        """A copy with containers of its own (their items are never changed in place)."""
        return dataclasses.replace(
            self, checkpoints=list(self.checkpoints), at_checkpoint=dict(self.at_checkpoint),
            in_force_at=dict(self.in_force_at), candidates=dict(self.candidates),
            stable=list(self.stable), unusable=list(self.unusable), history=list(self.history),
            last_resort=list(self.last_resort), resort_marked=list(self.resort_marked),
            short_marked=list(self.short_marked), unjudged=list(self.unjudged),
            rollbacks=dict(self.rollbacks), before_verdict=dict(self.before_verdict))

    def observe(self, view: JobView, verdict: Unhealthy | None,
                judged: bool = True) -> Observation:
        """Take the latest report in ``view``: its health (``verdict``, the controller's one
        judgement of it, :func:`~trimtab.controller.health.assess`), and the checkpoints it
        lists. A report not ``judged`` for spikes and climbs (the health warm-up's, while
        the controller has seen too few to judge them) is kept in :attr:`unjudged`: it is
        none of the healthy reports a stable mark needs (:meth:`judged_after`)."""
        report = view.last
        if report is None:
            return Observation()
        self.step = report.step
        every = report.skipped_steps >= report.window
        self.skipped_reports = self.skipped_reports + 1 if every else 0
        loss = report.loss_mean
        self.last_loss = loss if loss is not None and math.isfinite(loss) else None
        moved = self.check_climb(report.step, self.last_loss)
        seen = {"knobs": view.knobs.model_dump(), "grad_norm_ema": view.signals.grad_norm_ema,
                "loss": self.last_loss}
        if verdict is not None:
            self.last_unhealthy_step, self.last_unhealthy = report.step, verdict.reason
            self.before_verdict = dict(self.candidates)
            self.candidates.clear()
        else:
            for c in self.candidates:
                if report.step > c:
                    self.candidates[c] += 1
        if not judged:
            self.unjudged = [*self.unjudged, report.step][-_MAX_UNJUDGED:]
        obs = self._take_listing(report.checkpoints, report.step, report.stable_step, seen,
                                 verdict, report=True)
        return obs if moved is None else dataclasses.replace(obs, data_moved=moved)

    def check_climb(self, step: int, loss: float | None) -> str | None:
        """After a climb rollback's restore, its first two reports' mean loss against the
        checkpoint's loss when it was taken and the loss the rollback was decided on. The
        restored weights are the checkpoint's: scoring as they did then, the climb was the
        run's doing and the rollback mended it; scoring at least halfway up to the loss it
        was decided on, the same weights do worse on what the run trains on now -- the data
        moved (a gradual curriculum, a target that grows with the returns, noisier data),
        not the weights, and a rollback replays into the same rise. Climb verdicts are
        then off for the job (:attr:`climb_moved`); non-finite values and spikes still roll
        it back. Returns why, once, when it turns them off."""
        check = self.climb_check
        if check is None or step <= check["to"] or loss is None:
            return None
        seen = [*check["seen"], loss]
        if len(seen) < 2:
            self.climb_check = {**check, "seen": seen}
            return None
        self.climb_check = None
        post, ckpt, before = sum(seen) / len(seen), check["ckpt"], check["from"]
        if post < ckpt + 0.5 * (before - ckpt):
            return None
        self.climb_moved = step
        return (f"the checkpoint at step {check['to']} restored by the climb rollback scores "
                f"{post:.4g} (when it was taken: {ckpt:.4g}; the run before the rollback: "
                f"{before:.4g}): the same weights do as badly as the run that climbed, so the "
                "loss rose with the data, not the weights; no more climb verdicts for this "
                "job (non-finite values and spikes still roll it back)")

    def _take_listing(self, checkpoints: list[int], step: int, claimed: int | None,
                      seen: dict[str, Any], verdict: Unhealthy | None,
                      report: bool) -> Observation:
        """The checkpoints a report (``report``) or a registration lists at ``step``, and the
        stable mark it claims: new ones become candidates (a report counts as one healthy
        report after those it follows; a registration counts none), the client's mark is
        adopted when nothing of ours is under way."""
        # A checkpoint past the current step belongs to a trajectory rolled back from.
        listed = sorted({s for s in checkpoints if s <= step})
        known = set(self.checkpoints)
        new = [s for s in listed if s not in known]
        bad = []
        for s in new:
            self.checkpoints_seen += 1
            self.at_checkpoint[s] = self.in_force_at.get(s, seen)
            newest = self.stable_step
            if self.last_unhealthy_step is not None and self.last_unhealthy_step >= s:
                bad.append(s)
            elif newest is None or s > newest:
                self.candidates[s] = 1 if report and step > s else 0
        self._keep(listed)
        self.note_in_force(step, seen)
        adopted = None
        if (claimed is not None and claimed in listed and claimed not in self.stable
                and claimed not in self.unusable
                and self.pending_mark is None and self.pending is None):
            self.note_marked(claimed)
            adopted = claimed
        return Observation(tuple(new), tuple(bad), verdict, adopted)

    def _keep(self, listed: list[int]) -> None:
        """Forget what the client can no longer restore."""
        keep = set(listed)
        self.checkpoints = list(listed)
        self.at_checkpoint = {s: v for s, v in self.at_checkpoint.items() if s in keep}
        self.candidates = {s: n for s, n in self.candidates.items() if s in keep}
        self.stable = [s for s in self.stable if s in keep]
        self.short_marked = [s for s in self.short_marked if s in keep]
        self.unusable = [s for s in self.unusable if s in keep]

    def note_in_force(self, step: int, seen: dict[str, Any]) -> None:
        """``seen`` was in force at ``step`` (a report's end, or the registration): what a
        checkpoint taken there holds."""
        self.in_force_at[step] = seen
        for old in sorted(self.in_force_at)[:-32]:  # bounded: checkpoints list within a few
            del self.in_force_at[old]

    def note_registered(self, step: int, listed: list[int], claimed: int | None,
                        seen: dict[str, Any]) -> Observation:
        """A registration lists the checkpoints the client holds and the newest one it has
        marked stable: a controller that has just started, restarted or followed a resume
        knows them before the first report, and takes the client's stable mark as its own
        (a report's listing does the same, :meth:`observe`; a registration is no report, so
        it counts no healthy one after a new candidate). Returns the checkpoints new to
        the controller and the mark adopted."""
        return self._take_listing(listed, step, claimed, seen, None, report=False)

    def note_resumed(self, step: int, origin: int | None = None,
                     applied_seq: int | None = None) -> None:
        """The run was resumed at ``step`` in a new process: a rollback or a mark sent to the
        old one is void, what happened after ``step`` never did, and the checkpoints are
        the new process's (its registration lists them, :meth:`note_registered`); its
        snapshot of the state it loaded (at ``origin``, else ``step``) is the last resort.
        The rollbacks decided after ``step`` that the save had not applied (its
        ``applied_seq``) leave the history that escalates and spends the budget: the
        resumed run never ran with their cuts, so a fault it replays is judged as the
        first one was (a preemption re-trial: the old process's rollback, withdrawn at the
        resume, made the replayed fault's level 2, x0.25, and the run ended at 3.30 where
        the uninterrupted one ended at 3.22)."""
        if self.pending is not None:
            self.pending.failed = f"the run was resumed at step {step} before it was applied"
            self.pending = None
        if applied_seq is not None:
            self.history = [r for r in self.history if r.from_step <= step
                            or (r.seq is not None and r.seq <= applied_seq)]
        self._go_back(step, [])
        self.unusable = []
        self.note_origin(step, origin)
        if self.cooldown_until is not None and self.cooldown_until > step:
            # A cooldown counted on the abandoned path: from the resumed step at most.
            self.cooldown_until = None

    def note_origin(self, step: int, origin: int | None) -> None:
        """The run as this controller meets it at ``step`` (a registration, a resume) and, as
        the client tells it, the step of its snapshot of the run as its user handed it over:
        the last resorts, in that order (:attr:`last_resort`)."""
        self.last_resort = [step] if origin is None else [step, origin]

    # -- what the engine records ----------------------------------------------------------

    def note_mark(self, step: int, short: bool = False) -> None:
        """A mark_stable for ``step`` is being sent; ``short``: before its full window."""
        self.pending_mark = step
        if short:
            self.short_marked = sorted({*self.short_marked, step})

    def note_ordered(self, plan: RollbackPlan, seq: int | None = None) -> RollbackRecord:
        """A rollback following ``plan`` is being sent (``seq``: its command's)."""
        rec = RollbackRecord(plan.from_step, plan.target_step, plan.cause, plan.reason,
                             plan.level, plan.in_force.get("lr"), loss_from=self.last_loss,
                             seq=seq)
        self.history.append(rec)
        del self.history[:-1000]  # bounded; escalation only looks near the current spot
        self.pending = rec
        self.rollbacks[plan.cause] = self.rollbacks.get(plan.cause, 0) + 1
        self.cooldown_until = plan.target_step + plan.cooldown_steps
        return rec

    def raise_alert(self, why: str) -> None:
        """No more rollbacks for this job."""
        self.alert = why

    # -- what acks tell ---------------------------------------------------------------------

    def note_marked(self, step: int) -> None:
        """The client marked the checkpoint at ``step`` stable."""
        if self.pending_mark == step:
            self.pending_mark = None
        if step in self.last_resort and not self.stable and step != self.clean_resume:
            # (A resume from a save made in a healthy stretch is no mere hand-over: a climb
            # after it, the loop replaying what the old process climbed on, goes back there.)
            self.resort_marked = [step]
        self.last_resort = []  # something is stable: no longer needed
        self.clean_resume = None
        if step not in self.stable:
            self.stable = sorted([*self.stable, step])
            self.marked_stable += 1
        self.candidates = {s: n for s, n in self.candidates.items() if s > step}
        if step not in self.checkpoints:
            self.checkpoints = sorted([*self.checkpoints, step])

    def mark_failed(self, step: int) -> None:
        """The client could not mark ``step`` stable: stop proposing it."""
        if self.pending_mark == step:
            self.pending_mark = None
        self.candidates.pop(step, None)

    def note_restored(self, step: int, cfg: RollbackConfig, from_step: int | None = None) -> int:
        """The client restored the checkpoint at ``step``, from ``from_step`` (its ack's
        ``rolled_back_from``: where the run stood when the command reached it, which on a
        fast loop is some steps past the report it was decided on; None: not told, the
        decision's step); returns the steps lost."""
        rec = self.pending
        self.pending = None
        lost = 0
        if rec is not None:
            rec.restored_step = step
            if from_step is not None:
                rec.from_step = from_step
            lost = max(rec.from_step - step, 0)
            # A planned rollback (level 0) starts no cooldown.
            self.cooldown_until = step + cfg.cooldown(rec.level) if rec.level else None
        self.steps_lost += lost
        self.restored += 1
        ckpt = (self.at_checkpoint.get(step) or {}).get("loss")
        self._go_back(step, [s for s in self.checkpoints if s <= step])
        self.climb_check = None
        if (rec is not None and rec.cause == "climb" and self.climb_moved is None
                and ckpt is not None and rec.loss_from is not None and rec.loss_from > ckpt):
            self.climb_check = {"to": step, "ckpt": ckpt, "from": rec.loss_from, "seen": []}
        return lost

    def _go_back(self, step: int, held: list[int]) -> None:
        """The run is at ``step`` again (a restore, a resume) holding the checkpoints
        ``held``: a mark under way is void, and what was in force or unhealthy after
        ``step`` happened on the path it left."""
        self.step = step
        self._keep(held)
        self.in_force_at = {s: v for s, v in self.in_force_at.items() if s <= step}
        self.unjudged = [s for s in self.unjudged if s <= step]
        self.pending_mark = None
        self.skipped_reports = 0
        if self.last_unhealthy_step is not None and self.last_unhealthy_step > step:
            self.last_unhealthy_step = None

    def note_failed(self, why: str) -> None:
        """The client could not restore: never target that checkpoint again."""
        rec = self.pending
        self.pending = None
        if rec is None:
            return
        rec.failed = why
        self.failed += 1
        self.stable = [s for s in self.stable if s != rec.to_step]
        self.candidates.pop(rec.to_step, None)
        self.unusable = sorted({*self.unusable, rec.to_step})

    def note_withdrawn(self, why: str) -> None:
        """The rollback under way was withdrawn unsent (its checkpoint is no longer held):
        counted as ordered and not restored, as a failed one (:meth:`note_failed`), but it
        never happened, so it leaves the history that escalates and spends the budget."""
        rec = self.pending
        self.note_failed(why)
        if rec is not None and rec in self.history:
            self.history.remove(rec)

    # -- persistence ------------------------------------------------------------------------

    _KEYS = frozenset({
        "step", "checkpoints", "at_checkpoint", "in_force_at", "candidates", "stable",
        "unusable",
        "pending_mark", "last_resort", "clean_resume", "resort_marked", "short_marked",
        "unjudged",
        "pending", "last_unhealthy_step", "last_unhealthy", "history", "cooldown_until",
        "alert", "steps_lost", "rollbacks", "restored", "checkpoints_seen", "marked_stable",
        "skipped_reports", "failed", "last_loss", "climb_check", "climb_moved",
        "before_verdict",
    })
    #: Keys a state saved by an older version lacks, with the value they then take.
    _ADDED = {"skipped_reports": 0, "last_resort": [], "clean_resume": None,
              "resort_marked": [], "failed": 0,
              "short_marked": [], "unjudged": [],
              "last_loss": None,
              "climb_check": None, "climb_moved": None, "before_verdict": []}

    def stranded(self, cfg: RollbackConfig) -> bool:
        """Whether every step of the last ``cfg.stranded_reports`` reports was skipped."""
        return self.skipped_reports >= cfg.stranded_reports

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        def ema(v: dict[str, Any]) -> dict[str, Any]:
            g = v.get("grad_norm_ema")
            return {**v, "grad_norm_ema": g if g is not None and math.isfinite(g) else None}

        sd = {k: getattr(self, k) for k in self._KEYS}
        sd["at_checkpoint"] = [[s, ema(v)] for s, v in sorted(self.at_checkpoint.items())]
        sd["in_force_at"] = [[s, ema(v)] for s, v in sorted(self.in_force_at.items())]
        sd["candidates"] = [[s, n] for s, n in sorted(self.candidates.items())]
        sd["before_verdict"] = [[s, n] for s, n in sorted(self.before_verdict.items())]
        sd["pending"] = None if self.pending is None else asdict(self.pending)
        sd["history"] = [asdict(r) for r in self.history]
        sd["checkpoints"], sd["stable"] = list(self.checkpoints), list(self.stable)
        sd["unusable"] = list(self.unusable)
        sd["last_resort"] = list(self.last_resort)
        sd["resort_marked"] = list(self.resort_marked)
        sd["short_marked"] = list(self.short_marked)
        sd["unjudged"] = list(self.unjudged)
        sd["rollbacks"] = dict(sorted(self.rollbacks.items()))
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing or unknown keys are an error."""
        sd = {**self._ADDED, **sd}
        _check_keys("RollbackState", sd, set(self._KEYS))
        self.__init__()  # type: ignore[misc]
        for k in self._KEYS - {"at_checkpoint", "in_force_at", "candidates", "pending",
                               "history", "before_verdict"}:
            setattr(self, k, sd[k])
        self.checkpoints, self.stable = [int(s) for s in sd["checkpoints"]], list(sd["stable"])
        self.unusable = [int(s) for s in sd["unusable"]]
        self.last_resort = [int(s) for s in sd["last_resort"]]
        self.resort_marked = [int(s) for s in sd["resort_marked"]]
        self.short_marked = [int(s) for s in sd["short_marked"]]
        self.unjudged = [int(s) for s in sd["unjudged"]]
        self.rollbacks = {str(k): int(n) for k, n in sd["rollbacks"].items()}
        self.at_checkpoint = {int(s): dict(v) for s, v in sd["at_checkpoint"]}
        self.in_force_at = {int(s): dict(v) for s, v in sd["in_force_at"]}
        self.candidates = {int(s): int(n) for s, n in sd["candidates"]}
        self.before_verdict = {int(s): int(n) for s, n in sd["before_verdict"]}
        self.history = [RollbackRecord(**r) for r in sd["history"]]
        if sd["pending"] is not None:
            # The pending record is always the newest of the history: keep them one object.
            pending = RollbackRecord(**sd["pending"])
            self.pending = self.history[-1] if self.history[-1:] == [pending] else pending
