"""A person steers a real training run through a real ``trimtab serve`` with the CLI:
``trimtab pause``, ``set`` (in bounds, and refused out of them), ``rollback`` and
``resume``, each checked where it lands: the journal, the knobs the optimizer used, the
run's step, the metrics and ``trimtab decisions``.

The run is a user's loop with its own ``LambdaLR`` decay, so ``set lr=`` is seen to
compose with the user's schedule (trimtab's multiplier on it). ``update_ratio`` is the
live policy: on this task it cuts the lr at once and again after each cooldown, so while
the run is paused its proposals are journaled and not acted on, and after ``resume`` it
acts again.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from trimtab.client import attach
from trimtab.controller.journal import Journal

from .support import Regression, cli, free_port, start_serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFIG = """
[[policies]]
name = "update_ratio"
config = { min_reports = 2 }

[[policies]]
name = "divergence_guard"

[governor.lr]
cooldown_steps = 20
min_rel = 0.05
max_rel = 2.0

[governor.momentum]
min = 0.5
max = 0.95

[rollback]
stable_window_steps = 20
stable_min_reports = 2
"""

JOB = "steered"


class Run(threading.Thread):
    """A user's loop with its own LambdaLR decay, attached; records what every step used."""

    def __init__(self, endpoint: str, folder: Path) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.folder = endpoint, folder
        self.stop = threading.Event()
        self.used: list[dict] = []  # per step: step, lr, base lr, momentum, applied seq
        self.error: BaseException | None = None
        self.guard = None

    def run(self) -> None:
        try:
            torch.set_num_threads(1)
            task = Regression(seed=7)
            opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s / 200))
            with attach(task.model, opt, job=JOB, endpoint=self.endpoint, report_every=5,
                        heartbeat_s=0.1, checkpoint_every=20, scheduler=sched,
                        checkpoint_dir=str(self.folder / "ckpt")) as guard:
                self.guard = guard
                while not self.stop.is_set():
                    xb, yb = task.batch()
                    loss = task.loss(xb, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    base = sched.get_last_lr()[0]
                    guard.step(loss)
                    sched.step()
                    k = guard.knobs
                    self.used.append({"step": guard.global_step, "lr": k.lr, "base": base,
                                      "momentum": k.momentum, "applied": guard.applied_seq})
                    time.sleep(0.01)
        except BaseException as exc:  # the test reports it
            self.error = exc


def events(srv, kind: str | None = None) -> list:
    j = Journal(str(srv.journal_path), readonly=True)
    try:
        return j.events(JOB, kind)
    finally:
        j.close()


def newest_id(srv) -> int:
    return max((e.id for e in events(srv)), default=0)


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("operate")
    srv = start_serve(folder, None, None, CONFIG)
    run = Run(srv.endpoint, folder)
    run.start()
    try:
        yield srv, run, folder
    finally:
        run.stop.set()
        run.join(timeout=60)
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
    assert run.error is None, run.error


def test_a_person_pauses_sets_is_refused_rolls_back_and_resumes_a_real_run(steered):
    srv, run, folder = steered
    op = ("--endpoint", srv.endpoint, "--who", "alice")
    # The policy acts on its own first, and a checkpoint is marked stable.
    assert wait_for(lambda: any("update_ratio" in " ".join(e.data["reasons"])
                                for e in events(srv, "command")), timeout=60)
    assert wait_for(lambda: events(srv, "stable"), timeout=60)

    # -- pause: the policy's proposals are journaled, not acted on ----------------------
    out = cli("pause", JOB, "--reason", "looking at the loss", *op, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert f"trimtab pause {JOB}: done: paused at step" in out.stdout
    paused_at = newest_id(srv)
    step0 = run.used[-1]["step"]
    assert wait_for(lambda: run.used[-1]["step"] >= step0 + 60, timeout=60)
    after = [e for e in events(srv) if e.id > paused_at]
    assert any(e.kind == "proposal" and e.data["policy"] == "update_ratio" for e in after)
    assert not [e for e in after if e.kind == "command"
                and "update_ratio" in " ".join(e.data["reasons"])]
    assert 'trimtab_job_paused{job="steered"} 1.0' in srv.metrics()
    out = cli("jobs", "--journal", str(srv.journal_path), "--json", cwd=folder)
    (line,) = [json.loads(x) for x in out.stdout.splitlines()]
    assert line["paused"].startswith("alice at step") and "looking at the loss" in line["paused"]
    out = cli("jobs", "--journal", str(srv.journal_path), cwd=folder)
    assert "live, paused" in out.stdout

    # -- set: the multiplier on the user's own (decaying) lr, and momentum ------------
    out = cli("set", JOB, "lr=x0.5", "momentum=0.8", "--reason", "halve it for a while",
              *op, cwd=folder)
    assert out.returncode == 0, out.stderr
    assert "done: command" in out.stdout and "lr x0.5" in out.stdout
    seq = max(e.seq for e in events(srv, "command") if "manual" in " ".join(e.data["reasons"]))
    acks = wait_for(lambda: [e for e in events(srv, "ack") if e.seq == seq], timeout=30)
    assert acks and acks[0].data["scale"]["lr"] == pytest.approx(0.5)
    assert acks[0].data["knobs"]["momentum"] == pytest.approx(0.8)
    # The CLI waited for that ack and printed the values the job's step used.
    used = re.search(r"applied after step (\d+), as its ack says: lr (\S+) \(x0\.5 of yours\), "
                     r"momentum 0\.8", out.stdout)
    assert used and int(used[1]) == acks[0].step
    assert used[2] == f"{acks[0].data['knobs']['lr']:.6g}"  # the acked lr, as printed
    assert wait_for(lambda: len([u for u in run.used if u["applied"] >= seq]) >= 10)
    used = [u for u in run.used if u["applied"] >= seq][1:10]
    for u in used:  # what the optimizer used: the user's lr of that step, halved
        assert u["lr"] == pytest.approx(0.5 * u["base"], rel=1e-6)
        assert u["momentum"] == pytest.approx(0.8)
    assert len({round(u["base"], 9) for u in used}) > 1  # the user's decay went on moving

    # -- out of bounds: refused, with the value and the range; nothing sent ---------------
    before = newest_id(srv)
    out = cli("set", JOB, "lr=x5", "--reason", "too much", *op, cwd=folder)
    assert out.returncode == 1, out.stdout
    assert "refused" in out.stderr and "out of the job's bounds" in out.stderr
    assert "(x2)]" in out.stderr  # max_rel 2
    out = cli("set", JOB, "momentum=0.99", "--reason", "too much", *op, cwd=folder)
    assert out.returncode == 1 and "[0.5, 0.95]" in out.stderr
    time.sleep(0.5)
    # Stable marks go on (the safety net); no knob was sent.
    assert not [e for e in events(srv, "command")
                if e.id > before and (e.data["scale"] or e.data["knobs"])]
    assert run.used[-1]["momentum"] == pytest.approx(0.8)

    # -- rollback to the newest stable checkpoint: the run goes back -------------------
    stable = max(e.data["step"] for e in events(srv, "stable"))
    out = cli("rollback", JOB, "--reason", "bad shard", *op, cwd=folder)
    assert out.returncode == 0, out.stderr
    said = re.search(r"roll back from step (\d+) to checkpoint (\d+)", out.stdout)
    at, target = int(said[1]), int(said[2])
    assert stable <= target < at
    restored = wait_for(lambda: [e for e in events(srv, "restored")
                                 if e.data.get("reason") == "manual"], timeout=30)
    assert restored and restored[0].data["restored_step"] == target
    steps = [u["step"] for u in run.used]
    assert any(b < a for a, b in zip(steps, steps[1:], strict=False))  # the run went back
    rollbacks = [e for e in events(srv, "rollback") if e.data["reason"] == "manual"]
    assert len(rollbacks) == 1 and "alice" in rollbacks[0].data["why"]

    # -- resume: the policy acts again --------------------------------------------------
    out = cli("resume", JOB, "--reason", "all good", *op, cwd=folder)
    assert out.returncode == 0, out.stderr
    resumed_at = newest_id(srv)
    assert wait_for(lambda: [e for e in events(srv, "command") if e.id > resumed_at
                             and "update_ratio" in " ".join(e.data["reasons"])], timeout=60)
    text = srv.metrics()
    assert 'trimtab_job_paused{job="steered"} 0.0' in text
    out = cli("jobs", "--journal", str(srv.journal_path), "--json", cwd=folder)
    assert json.loads(out.stdout)["paused"] is None
    for action, n in (("set", 1), ("pause", 1), ("resume", 1), ("rollback", 1)):
        assert f'trimtab_operator_actions_total{{action="{action}",job="steered"}} {n}.0' \
            in text
    assert 'trimtab_operator_requests_total{action="set",outcome="refused"} 2.0' in text

    # -- the journal tells who did what, and why ----------------------------------------
    manual = [e.data for e in events(srv, "manual")]
    assert [(m["action"], m["ok"]) for m in manual] == [
        ("pause", True), ("set", True), ("set", False), ("set", False), ("rollback", True),
        ("resume", True)]
    assert all(m["who"] == "alice" for m in manual)
    out = cli("decisions", JOB, "--journal", str(srv.journal_path), "--kind", "manual",
              "--json", cwd=folder)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["knob"], r["change"]) for r in rows if r["knob"]} == {
        ("lr", "set x0.5"), ("momentum", "set 0.8")}
    assert any("refused" in r["why"] and "alice: too much" in r["why"] for r in rows)


def test_a_job_that_is_not_live_and_no_controller_are_told_apart(steered):
    srv, _, folder = steered
    out = cli("pause", "nosuchjob", "--reason", "x", "--endpoint", srv.endpoint, cwd=folder)
    assert out.returncode == 1 and "not live on this controller" in out.stderr
    out = cli("pause", JOB, "--reason", "x", "--endpoint", f"tcp://127.0.0.1:{free_port()}",
              "--timeout", "0.5", cwd=folder)
    assert out.returncode == 2 and "no answer from a controller" in out.stderr


def test_with_sharded_controllers_the_request_goes_to_the_jobs_own(steered):
    """``--endpoint A,B``: the controller the job's client picks (``shard_endpoint``)."""
    from trimtab.client import shard_endpoint

    srv, run, folder = steered
    assert wait_for(lambda: events(srv, "register"), timeout=60)  # the job is live
    # srv's port is a free one, so its score is random: with 40,000 candidates the chance that
    # none scores above it (or none below) is 1 in 40,000, not 1 in 100 as it was
    others = [e for e in (f"tcp://127.0.0.1:{p}" for p in range(20000, 60000))
              if e != srv.endpoint]
    other = next(e for e in others if shard_endpoint(JOB, [e, srv.endpoint]) == srv.endpoint)
    wrong = next(e for e in others if shard_endpoint(JOB, [e, srv.endpoint]) == e)
    for action in ("pause", "resume"):
        out = cli(action, JOB, "--reason", "sharded", "--endpoint", f"{other},{srv.endpoint}",
                  cwd=folder)
        assert out.returncode == 0, out.stderr
    out = cli("pause", JOB, "--reason", "sharded", "--endpoint", f"{srv.endpoint},{wrong}",
              "--timeout", "0.5", cwd=folder)
    assert out.returncode == 2 and wrong in out.stderr  # this list puts the job elsewhere
