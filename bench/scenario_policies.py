"""Small policies the benchmark scenarios and the integration tests load as third-party
plugins: by dotted path (``bench.scenario_policies:Nudge``), allowed with
``allow_plugins = ["bench.scenario_policies:*"]``, in a ``trimtab serve`` subprocess that
has the repository root on its ``PYTHONPATH`` (:data:`REPO`).

- :class:`Nudge`: ``factor`` x the LR at every report (a command for nearly every report;
  the governor's cooldown spaces them);
- :class:`Seesaw`: halves the LR at or above its initial value, else doubles it (churn);
- :class:`Raising`: a buggy policy, fine for three reports, then it raises;
- :class:`Hanging`: a buggy policy that waits forever for the job ``hang-a``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from trimtab.controller.policy import Policy, Proposal

__all__ = ["REPO", "Nudge", "Seesaw", "Raising", "Hanging", "python_path"]

#: The repository root: on a subprocess's ``PYTHONPATH``, ``bench`` imports from it.
REPO = Path(__file__).resolve().parents[1]

_FOREVER = threading.Event()


def python_path(current: str | None = None) -> str:
    """A ``PYTHONPATH`` value: the repository root, then ``current`` (if any)."""
    return os.pathsep.join([str(REPO), *filter(None, [current])])


class NudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: float = Field(0.97, gt=0.0, allow_inf_nan=False)


class Nudge(Policy):
    """Asks for ``factor`` x the LR at every report."""

    name: ClassVar[str] = "nudge"
    Config: ClassVar[type[BaseModel]] = NudgeConfig

    def propose(self, view):
        return [Proposal("lr", factor=self.config.factor, reason="nudge")]  # type: ignore[attr-defined]


class Seesaw(Policy):
    """Halves the LR when it is at or above its initial value, else doubles it: churn."""

    name: ClassVar[str] = "seesaw"

    def propose(self, view):
        up = view.knobs.lr < view.initial.lr
        return [Proposal("lr", factor=2.0 if up else 0.5, reason="seesaw")]


class Raising(Policy):
    """A buggy policy: fine for three reports, then it raises."""

    name: ClassVar[str] = "raising"

    def propose(self, view):
        if view.reports_seen >= 3:
            raise RuntimeError(f"boom at step {view.step}")
        return []


class Hanging(Policy):
    """A buggy policy that waits forever for the job ``hang-a``, from its third report."""

    name: ClassVar[str] = "hanging"

    def propose(self, view):
        if view.job == "hang-a" and view.reports_seen >= 3:
            _FOREVER.wait()
        return []
