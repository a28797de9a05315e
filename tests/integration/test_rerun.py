"""Replay shares the live service's path: a recorded live run, re-run, gives its commands.

A real training run is attached to a real ``trimtab serve`` (a fault rolled back; a run
started far too hot, swept from its attach checkpoint); its journal's trace of what the
client sent is then re-run through a fresh controller with the same config
(:func:`trimtab.controller.replay.rerun`), which must send exactly the commands the live
controller sent: same sequence numbers, multipliers, knobs, marks, rollbacks and reasons.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.faults import CONTROLLER_CONFIG, train
from trimtab.controller.config import load_config
from trimtab.controller.replay import rerun, trace_records

from .support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _live(event) -> tuple:
    d = event.data
    return (event.seq, d["scale"], d["knobs"], d["lr_max"], d["mark_stable"], d["rollback_to"],
            d["reasons"])


def _sent(command) -> tuple:
    return (command.seq, command.scale.model_dump(exclude_none=True),
            command.knobs.model_dump(exclude_none=True), command.lr_max, command.mark_stable,
            command.rollback_to, command.reasons)


@pytest.mark.parametrize(("kind", "lr_scale", "schedule"), [
    ("scaled_inputs", 1.0, "warmup_cosine"),  # stable marks, a rollback with an lr cut
    (None, 40.0, "constant"),  # the range test: a phase, a restart, a sweep, its return
])
def test_a_live_trace_re_run_gives_the_live_runs_commands(serve_factory, tmp_path, kind,
                                                          lr_scale, schedule):
    srv = serve_factory(CONTROLLER_CONFIG)
    job = f"live-{kind}-{lr_scale:g}"
    train(kind, srv.endpoint, job=job, journal=str(srv.journal_path), schedule=schedule,
          lr_scale=lr_scale)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    live = [_live(e) for e in journal.events(job, "command")]
    assert journal.events(job, "rollback") and any(c[4] is not None for c in live)
    config = load_config(tmp_path / "trimtab.toml", env={})

    again = [_sent(c) for c in rerun(trace_records(journal, job), config)]

    assert again == live
    # The comparison can fail: a controller that judges no report unhealthy and never
    # marks a checkpoint stable sends other commands for the same trace.
    blind = load_config(tmp_path / "trimtab.toml", env={}, overrides={"rollback": {
        "stable_window_steps": 10**6, "health": {"nonfinite_min": 10**6, "loss_z": 1e9,
                                                 "grad_norm_z": 1e9, "climb_t": 1e9}}})
    assert [_sent(c) for c in rerun(trace_records(journal, job), blind)] != live
    # The same from the command line, on the journal itself.
    out = subprocess.run([sys.executable, "-m", "trimtab.controller", "rerun",
                          str(srv.journal_path), "--job", job, "--config",
                          str(tmp_path / "trimtab.toml")],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("command ")]
    assert [int(ln.split()[1].rstrip(":")) for ln in lines] == [c[0] for c in live]
    assert any(f"roll back to {c[5]}" in ln for ln in lines for c in live if c[5] is not None)
