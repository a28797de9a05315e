"""Synthetic report streams for the history-reading policies' tests."""

from __future__ import annotations

from trimtab.client import wire
from trimtab.controller.state import JobState

FACTS = wire.ScaleFacts(param_count=1000, group_sizes=[1000], optimizer="AdamW",
                        dtype="float32", device="cpu")
EVERY = 10


def job(lr: float = 1e-3, clip: float | None = None) -> JobState:
    reg = wire.Register(job="s", run_id="r", report_every=EVERY, facts=FACTS,
                        knobs=wire.Knobs(lr=lr, clip=clip))
    return JobState.from_register(reg)


def feed(st: JobState, **fields) -> None:
    """One report ``EVERY`` steps after the last, with the knobs in force unless given."""
    fields.setdefault("knobs", st.knobs)
    i = st.reports_seen + 1
    st.observe(wire.Report(job="s", seq=i, step=EVERY * i, window=EVERY, **fields))
