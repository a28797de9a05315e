"""A validation result handed over after a run's last report reaches the controller.

A loop that evaluates at its last step, when that step ended a report window (an
evaluation every N steps with N a multiple of ``report_every``, the Hugging Face Trainer's
``eval_strategy="steps"`` at ``max_steps``), hands its result to ``report_validation``
after the last report went out; no step is left for a report to carry it. ``close()`` now
sends it on its own (``wire.Validation``), before the Bye. A real ``trimtab serve``: the
journal has it, ``trimtab decisions`` shows it, and ``/metrics`` exports it (the job's
series stay through the grace after its Bye), with the weight average's beside it.
Before, the run's final validation was lost, and no validation was exported at all.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from trimtab.client import attach

from .support import Regression, cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_validation_at_the_last_step_reaches_the_journal_and_metrics(serve_factory,
                                                                          one_thread):
    srv = serve_factory()
    task = Regression()
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    job = "final-eval"
    guard = attach(task.model, opt, job=job, endpoint=srv.endpoint, report_every=5)
    with guard:
        for step in range(1, 21):
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            if step % 10 == 0:  # an evaluation every 10 steps, the last at the last step
                with torch.no_grad():
                    value = task.loss(task.x, task.y).item()
                guard.report_validation(value, ema=value * 0.9)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    # The one at step 10 went with the next report; the one at step 20 on its own.
    carried = [(e.data["validation_step"], e.data["validation"])
               for e in journal.events(job, "report") if e.data.get("validation") is not None]
    assert [s for s, _ in carried] == [10]
    sent = journal.events(job, "validation")
    assert [(e.step, e.data["value"], e.data["ema"]) for e in sent] == [
        (20, value, pytest.approx(value * 0.9))]
    kinds = [e.kind for e in journal.events(job)]
    assert kinds.index("validation") < kinds.index("bye")
    shown = cli("decisions", job, "--journal", str(srv.journal_path)).stdout
    assert "sent as the run ended" in shown, shown
    text = srv.metrics()
    assert f'trimtab_job_validation{{job="{job}"}} {value!r}' in text, text[-3000:]
    assert f'trimtab_job_validation_ema{{job="{job}"}}' in text


def _trained(srv, job: str, steps: int, seed: int = 0):
    """A run of ``job`` on ``srv``, ``steps`` steps, closed: its task and guard."""
    task = Regression(seed=seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    with attach(task.model, opt, job=job, endpoint=srv.endpoint, report_every=5) as guard:
        for _ in range(steps):
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    return task, guard


def test_a_validation_after_close_reaches_the_ended_runs_results(serve_factory, one_thread):
    # An evaluation after training (trainer.evaluate() after train(), or a loop's own after
    # guard.close()): sent on a link of its own to the ended run's results.
    srv = serve_factory()
    job = "eval-after"
    task, guard = _trained(srv, job, 20)
    journal = srv.journal()
    wait_for(lambda: journal.events(job, "bye"))
    with torch.no_grad():
        value = task.loss(task.x, task.y).item()
    guard.report_validation(value)  # after close: before, silently lost
    wait_for(lambda: guard._transport.late)
    assert guard._transport.late == {"answered": 1}
    (sent,) = journal.events(job, "validation")
    assert (sent.step, sent.data["value"], sent.data["after_end"]) == (20, value, True)
    assert journal.load_state(job)["validations"][-1] == [20, value]
    shown = cli("decisions", job, "--journal", str(srv.journal_path)).stdout
    assert "sent after the run ended (an evaluation after training)" in shown, shown
    text = srv.metrics()
    assert f'trimtab_job_validation{{job="{job}"}} {value!r}' in text, text[-3000:]


def test_a_validation_after_close_for_a_run_no_longer_the_newest_is_refused(serve_factory,
                                                                             one_thread):
    srv = serve_factory()
    job = "eval-late"
    guards = []
    for seed in (1, 2):  # two runs of one job, one after the other
        guards.append(_trained(srv, job, 10, seed)[1])
        wait_for(lambda n=seed: len(srv.journal().events(job, "bye")) == n)
    guards[0].report_validation(0.5)
    wait_for(lambda: guards[0]._transport.late)
    assert guards[0]._transport.late == {"refused": 1}
    assert srv.journal().events(job, "validation") == []


def test_an_evaluation_as_the_scripts_last_line_is_delivered_before_exit(serve_factory,
                                                                         tmp_path):
    # The interpreter's exit waits (a bounded while) for the link that carries it: without
    # that wait the daemon thread dies with the process and the result is lost. Here the
    # controller is stopped (SIGSTOP) when the script hands it over and exits, and goes on
    # 1 s later (the exit waits 2 s at most): the script has long handed it over by then.
    srv = serve_factory()
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "from trimtab.client import attach\n"
        "model = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "guard = attach(model, opt, job='last-line', endpoint=sys.argv[1], report_every=5)\n"
        "for _ in range(10):\n"
        "    loss = model(torch.randn(8, 4)).pow(2).mean()\n"
        "    opt.zero_grad(); loss.backward(); guard.step(loss)\n"
        "guard.close()\n"
        "print('closed', flush=True)\n"
        "sys.stdin.readline()\n"
        "guard.report_validation(0.125)\n")
    proc = subprocess.Popen([sys.executable, str(script), srv.endpoint], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "closed\n"
        wait_for(lambda: srv.journal().events("last-line", "bye"))
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(1.0)
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
    journal = srv.journal()
    wait_for(lambda: journal.events("last-line", "validation"))
    (sent,) = journal.events("last-line", "validation")
    assert (sent.step, sent.data["value"], sent.data["after_end"]) == (10, 0.125, True)
