"""The policy SDK: everything a policy author needs, in one import.

A policy is a :class:`Policy` subclass with a ``name``, an optional pydantic ``Config``
and a ``propose(view)`` that reads a frozen :class:`JobView` and returns
:class:`Proposal` s; the engine arbitrates them and the governor bounds them (see
docs/writing-policies.md). The built-in policies import from this module only, so they
are its first users and the reference for a plugin::

    from trimtab.policies.sdk import JobView, Policy, Proposal

    class Halve(Policy):
        name = "halve"

        def propose(self, view: JobView) -> list[Proposal]:
            if view.health is not None:  # the controller judged the latest report unhealthy
                return [Proposal("lr", factor=0.5, reason=view.health.reason)]
            return []

What is here:

* **The base and the proposals:** :class:`Policy`, and the four kinds of proposal, each
  with only its own fields: :class:`Proposal` (a knob change), :class:`Rollback`,
  :class:`Sweep` and :class:`Advice` (built directly, or with :meth:`Proposal.roll_back`,
  :meth:`Proposal.sweep_value` and :meth:`Proposal.advise_stop`); :class:`PolicyLoadError`.
* **What a policy reads:** :class:`JobView` (its fields are listed in
  docs/writing-policies.md), :class:`Signals`, :class:`Sample` (one report of the
  history), :class:`Phase` (a measurement phase), :class:`Unhealthy` (the controller's
  judgement of the latest report, :attr:`JobView.health`), :data:`CAUSES` (and
  :data:`UNCUT`, the causes no lr cut mends), and the
  thresholds it is made under, :class:`DivergenceThresholds` (``[rollback.health]``).
* **Scale:** :class:`ScaleContext` (the job's optimizer family, global batch and the LR
  range that goes with them) and :class:`BatchScaling`.
* **Schedules:** :mod:`schedules` (the closed forms a live schedule names, shared with
  the client), :class:`SchedulePiece` (one piece of a live schedule on the wire), and the
  base of the schedule policies: :class:`SchedulePolicy`, :class:`ScheduleConfig`,
  :data:`LrField`, :func:`as_multiplier`, :func:`batch_factor`.
* **Running statistics:** :func:`ema`, :func:`ema_var`.
* **A sweep's loss-against-LR curve:** :func:`smooth`, :func:`stop_reason`, :func:`pick_lr`,
  :func:`fell_below`, :func:`past`, :func:`past_bar` (the LR range test's; fastai's and
  torch-lr-finder's conventions).
"""

from __future__ import annotations

import ast
import inspect
import re

from trimtab.controller import view as _view
from trimtab.controller.health import CAUSES, UNCUT, DivergenceThresholds, Unhealthy
from trimtab.controller.policy import Advice, Policy, PolicyLoadError, Proposal, Rollback, Sweep
from trimtab.controller.scale import BatchScaling, ScaleContext
from trimtab.controller.signals import ema, ema_var, lined_up
from trimtab.controller.view import JobView, Phase, Sample, Signals
from trimtab.policies._lr_curve import fell_below, past, past_bar, pick_lr, smooth, stop_reason
from trimtab.policies._schedule_base import (
    LrField,
    ScheduleConfig,
    SchedulePolicy,
    as_multiplier,
    batch_factor,
)
from trimtab.protocol import schedules
from trimtab.protocol.wire import SchedulePiece

__all__ = [
    "CAUSES", "UNCUT", "Advice", "BatchScaling", "DivergenceThresholds", "JobView", "LrField",
    "Phase", "Policy", "PolicyLoadError", "Proposal", "Rollback", "Sample", "ScaleContext",
    "ScheduleConfig", "SchedulePiece", "SchedulePolicy", "Signals", "Sweep", "Unhealthy",
    "as_multiplier", "batch_factor", "ema", "ema_var", "lined_up", "schedules",
    "fields_markdown",
    "smooth", "stop_reason", "pick_lr", "fell_below", "past", "past_bar",
]

#: The classes a policy reads, in the order docs/writing-policies.md lists them.
_READ = ("JobView", "Signals", "Sample", "Unhealthy")


def fields_markdown() -> str:
    """What a policy reads, as markdown tables: every field of :class:`JobView`,
    :class:`Signals`, :class:`Sample` and :class:`Unhealthy` with its type and the ``#:``
    comment above it in the source; fields under one comment share a row.
    docs/writing-policies.md embeds this text (a test keeps it current);
    ``python -m trimtab.policies.sdk`` prints it.
    """
    source = inspect.getsource(_view)
    lines = source.splitlines()
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    out: list[str] = []
    for name in _READ:
        rows: list[tuple[list[str], str]] = []
        for node in classes[name].body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            doc, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                doc.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            field = f"`{node.target.id}`: `{ast.unparse(node.annotation)}`"
            if doc or not rows:
                rows.append(([field], " ".join(doc)))
            else:
                rows[-1][0].append(field)
        out += [f"**`{name}`**", "", "| field | what it is |", "|---|---|"]
        out += [f"| {_cell('<br>'.join(fields))} | {_cell(_plain(doc))} |" for fields, doc in rows]
        out.append("")
    return "\n".join(out)


def _plain(doc: str) -> str:
    """reST to markdown: ``:func:`~a.b`` -> `b`, double backquotes -> single."""
    doc = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", doc)
    return doc.replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(fields_markdown())
