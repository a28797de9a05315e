"""Synthetic report streams for the history-reading policies' tests.

A report is what a client whose own lr stays as registered sends under the knob model:
``base`` the user's values, ``scale`` trimtab's multipliers in force, ``knobs`` the
effective values (base x multiplier; momentum and clip as they are in force).
"""

from __future__ import annotations

from trimtab.controller.state import JobState
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="AdamW",
                        dtype="float32", device="cpu")
EVERY = 10


def job(lr: float = 1e-3, clip: float | None = None) -> JobState:
    reg = wire.Register(job="s", run_id="r", report_every=EVERY, facts=FACTS,
                        knobs=wire.Knobs(lr=lr, clip=clip), base=wire.Knobs(lr=lr))
    return JobState.from_register(reg)


def feed(st: JobState, **fields) -> None:
    """One report ``EVERY`` steps after the last: the user's own values as registered
    (``base``) under the multipliers in force (``scale``, from ``st.knobs``) unless given,
    and the effective ``knobs`` they make unless given."""
    k = st.knobs
    scale = fields.pop("scale", wire.Scale(lr=1.0 if k.lr is None else k.lr,
                                           weight_decay=1.0 if k.weight_decay is None
                                           else k.weight_decay))
    base = fields.pop("base", st.registered)
    fields.setdefault("knobs", wire.Knobs(
        lr=None if base.lr is None else base.lr * scale.lr, momentum=k.momentum,
        weight_decay=None if base.weight_decay is None else base.weight_decay
        * scale.weight_decay, clip=k.clip))
    i = st.reports_seen + 1
    st.observe(wire.Report(job="s", seq=i, step=EVERY * i, window=EVERY, base=base,
                           scale=scale, **fields))
