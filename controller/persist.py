"""A job's state in the journal: :meth:`JobState.state_dict
<trimtab.controller.state.JobState.state_dict>` and back.

JSON-serialisable (no NaN or infinity), versioned (:data:`STATE_VERSION`), and strict: a
missing or unknown key is an error, so that a state written by another controller version
is refused with its name rather than half-loaded; only the keys added within a version
(:attr:`Persisted._ADDED`) may be missing, so that a journal written before them still
loads, and a state of an older version gets what it lacks (``_UPGRADES``). The controller
saves each live job's state with every command, ack, registration and end, and what
reports alone change once it is ``state_save_s`` old
(:meth:`~trimtab.controller.handler.Controller.save_due`); it
resumes a job that re-registers from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

from trimtab.controller.governor import _check_keys
from trimtab.controller.tracker import SignalConfig, SignalTracker
from trimtab.controller.view import Phase, Sample
from trimtab.protocol import wire

__all__ = ["STATE_VERSION", "Persisted"]

#: 3: the knob model (lr and weight decay held as multipliers); 4: ``resumes`` (a state of
#: version 3 loads with none).
STATE_VERSION = 4
#: Keys a state of an older version lacks, with the value it loads with.
_UPGRADES = {4: {"resumes": 0}}


class Persisted:
    """:class:`~trimtab.controller.state.JobState`'s persistence (a mixin: ``self`` is the
    job's state)."""

    _KEYS = frozenset({
        "version", "job", "run_id", "facts", "report_every", "signal_cfg", "initial", "knobs",
        "step", "reports_seen", "loss", "grad_norm", "loss_z", "grad_norm_z", "refs",
        "slope_points", "nonfinite_losses", "nonfinite_grads", "dropped_reports", "last_report",
        "memory", "last_change_step", "command_seq", "applied_seq", "last_command", "awaiting_ack",
        "disabled_policies", "decision_counts", "rollback", "shadow_memory", "shadow_counts",
        "history", "validations", "stop_advice", "phase", "phases_done", "found_lr",
        "corrections", "live", "branch_seq", "effective", "base", "registered", "signal_marks",
        "link", "resumes",
    })
    #: Keys added within :data:`STATE_VERSION`: a state without them (an older journal's)
    #: loads with them empty.
    _ADDED = frozenset({"validations_ema", "paused", "operator_actions", "signal_trail",
                        "checkpoint_keep", "nominal_lr", "resume_id", "nonfinite_faults",
                        "loss_z_before", "loss_trend", "warm_start", "lr_spread",
                        "shadow_phases", "loss_ref_before", "change_steps"})

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (no NaN or infinity) for the journal."""
        def dump(m: BaseModel | None) -> dict[str, Any] | None:
            return None if m is None else m.model_dump(mode="json")

        return {
            "version": STATE_VERSION, "job": self.job, "run_id": self.run_id,
            "facts": dump(self.facts), "report_every": self.report_every,
            "signal_cfg": dump(self.signal_cfg), "initial": dump(self.initial),
            "knobs": dump(self.knobs), "step": self.step, "reports_seen": self.reports_seen,
            **self.tracker.state_dict(),
            "nonfinite_losses": self.nonfinite_losses, "nonfinite_grads": self.nonfinite_grads,
            "dropped_reports": self.dropped_reports, "last_report": dump(self.last_report),
            "memory": {k: m.state_dict() for k, m in self.memory.items()},
            "last_change_step": dict(self.last_change_step),
            "change_steps": {k: [list(c) for c in v] for k, v in self.change_steps.items()},
            "command_seq": self.command_seq,
            "applied_seq": self.applied_seq, "last_command": dump(self.last_command),
            "awaiting_ack": self.awaiting_ack, "disabled_policies": dict(self.disabled_policies),
            "decision_counts": [
                [p, k, d, n] for (p, k, d), n in sorted(self.decision_counts.items())
            ],
            "rollback": self.rollback.state_dict(),
            "shadow_memory": {k: m.state_dict() for k, m in self.shadow_memory.items()},
            "shadow_counts": [
                [p, k, d, n] for (p, k, d), n in sorted(self.shadow_counts.items())
            ],
            "history": [s.to_list() for s in self.history],
            "validations": [[s, v] for s, v in self.validations],
            "validations_ema": [[s, v] for s, v in self.validations_ema],
            "stop_advice": self.stop_advice,
            "phase": None if self.phase is None else dataclasses.asdict(self.phase),
            "phases_done": [dataclasses.asdict(p) for p in self.phases_done.values()],
            "found_lr": self.found_lr,
            "corrections": dict(self.corrections),
            "live": {k: s.model_dump(mode="json") for k, s in self.live.items()},
            "branch_seq": self.branch_seq, "effective": dump(self.effective),
            "base": dump(self.base), "registered": dump(self.registered),
            "link": self.link, "resumes": self.resumes,
            "paused": None if self.paused is None else dict(self.paused),
            "operator_actions": dict(self.operator_actions),
            "checkpoint_keep": self.checkpoint_keep, "nominal_lr": self.nominal_lr,
            "resume_id": self.resume_id, "nonfinite_faults": self.nonfinite_faults,
            "loss_trend": self.loss_trend,
            "warm_start": self.warm_start, "lr_spread": self.lr_spread,
            "shadow_phases": dict(self.shadow_phases),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing or unknown keys are an error."""
        version = sd.get("version")
        if version not in range(3, STATE_VERSION + 1):
            raise ValueError(
                f"JobState state_dict version {version!r}, expected 3 to {STATE_VERSION} "
                "(states written before the knob model cannot be resumed)")
        for v in range(version + 1, STATE_VERSION + 1):  # an older state: what it lacks
            sd = {**_UPGRADES[v], **sd, "version": v}
        _check_keys("JobState", sd, set(self._KEYS) | (self._ADDED & sd.keys()))
        self.__init__(  # type: ignore[misc]  # re-run to reset everything not saved
            sd["job"], sd["run_id"], wire.ScaleFacts.model_validate(sd["facts"]),
            sd["report_every"], wire.Knobs.model_validate(sd["knobs"]),
            SignalConfig.model_validate(sd["signal_cfg"]), sd["step"], sd["applied_seq"],
        )
        self.initial = wire.Knobs.model_validate(sd["initial"])
        self.effective = wire.Knobs.model_validate(sd["effective"])
        self.base = wire.Knobs.model_validate(sd["base"])
        self.registered = wire.Knobs.model_validate(sd["registered"])
        self.link = int(sd["link"])
        self.reports_seen = sd["reports_seen"]
        self.tracker.load_state_dict({k: sd[k] for k in SignalTracker.KEYS if k in sd})
        self.nonfinite_losses, self.nonfinite_grads = sd["nonfinite_losses"], sd["nonfinite_grads"]
        self.dropped_reports = sd["dropped_reports"]
        if sd["last_report"] is not None:
            self.last_report = wire.Report.model_validate(sd["last_report"])
        _check_keys("JobState.memory", sd["memory"], set(wire.KNOBS))
        for knob, msd in sd["memory"].items():
            self.memory[knob].load_state_dict(msd)
        _check_keys("JobState.last_change_step", sd["last_change_step"], set(wire.KNOBS))
        self.last_change_step = dict(sd["last_change_step"])
        changes = sd.get("change_steps") or {}
        self.change_steps = {k: [[int(a), int(b), int(c)] for a, b, c in changes.get(k, [])]
                             for k in wire.KNOBS}
        self.command_seq = sd["command_seq"]
        if sd["last_command"] is not None:
            self.last_command = wire.Command.model_validate(sd["last_command"])
        self.awaiting_ack = sd["awaiting_ack"]
        self.disabled_policies = dict(sd["disabled_policies"])
        self.decision_counts = {(p, k, d): int(n) for p, k, d, n in sd["decision_counts"]}
        self.rollback.load_state_dict(sd["rollback"])
        _check_keys("JobState.shadow_memory", sd["shadow_memory"], set(wire.KNOBS))
        for knob, msd in sd["shadow_memory"].items():
            self.shadow_memory[knob].load_state_dict(msd)
        self.shadow_counts = {(p, k, d): int(n) for p, k, d, n in sd["shadow_counts"]}
        self.history.extend(Sample(*row) for row in sd["history"])
        self.validations.extend((int(s), float(v)) for s, v in sd["validations"])
        self.validations_ema.extend((int(s), float(v)) for s, v in sd.get("validations_ema", ()))
        self.stop_advice = sd["stop_advice"]
        self.phase = None if sd["phase"] is None else Phase(**sd["phase"])
        self.phases_done = {p["policy"]: Phase(**p) for p in sd["phases_done"]}
        self.found_lr = sd["found_lr"]
        self.corrections = {k: float(v) for k, v in sd["corrections"].items()}
        self.live = {k: wire.LiveSchedule.model_validate(v) for k, v in sd["live"].items()}
        self.branch_seq = int(sd["branch_seq"])
        self.resumes = int(sd["resumes"])
        self.paused = None if sd.get("paused") is None else dict(sd["paused"])
        self.operator_actions = {k: int(n) for k, n in sd.get("operator_actions", {}).items()}
        keep = sd.get("checkpoint_keep")
        self.checkpoint_keep = None if keep is None else int(keep)
        nominal = sd.get("nominal_lr")
        self.nominal_lr = None if nominal is None else float(nominal)
        self.nonfinite_faults = int(sd.get("nonfinite_faults", 0))
        self.loss_trend = bool(sd.get("loss_trend", True))
        self.warm_start = bool(sd.get("warm_start", False))
        self.lr_spread = float(sd.get("lr_spread", 1.0))
        self.shadow_phases = {str(k): int(v) for k, v in sd.get("shadow_phases", {}).items()}
        resume_id = sd.get("resume_id")
        self.resume_id = None if resume_id is None else str(resume_id)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Any:
        """A state restored from :meth:`state_dict` (for the journal's resume)."""
        state = cls.__new__(cls)
        state.load_state_dict(sd)
        return state
