"""The policy time budget: a hung policy is cut off and disabled for its job, the others go
on; alone, in the engine, and through a real ``trimtab serve`` with two training clients."""

from __future__ import annotations

import os
import re
import subprocess
import threading

import pytest
import torch

from bench.scenario_policies import python_path
from tests._decide import decided
from tests.integration.support import Regression, start_serve, wait_for
from trimtab.client import attach
from trimtab.controller.budget import PolicyBudget, PolicyTimeout
from trimtab.controller.config import ConfigError, load_config
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor
from trimtab.controller.limits import GovernorConfig, KnobLimits
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.state import JobState
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(
    param_count=1, group_sizes=[1], optimizer="SGD", dtype="float32", device="cpu"
)
LOOSE = Governor(GovernorConfig(lr=KnobLimits()))


def state(job: str) -> JobState:
    return JobState.from_register(
        wire.Register(
            job=job, run_id="r", step=1000, report_every=10, facts=FACTS, knobs=wire.Knobs(lr=0.1)
        )
    )


class HangsFor(Policy):
    """Hangs (until released) for the jobs it is told; proposes a hold otherwise."""

    name = "hangs"

    def __init__(self, *jobs: str) -> None:
        super().__init__()
        self.jobs, self.release, self.calls = set(jobs), threading.Event(), 0

    def propose(self, view):
        self.calls += 1
        if view is None or view.job in self.jobs:
            self.release.wait()
        return [Proposal("momentum", hold=True, reason="steady")]


class Halve(Policy):
    name = "halve"

    def propose(self, view):
        return [Proposal("lr", factor=0.5, reason="halve")]


@pytest.fixture
def hangs():
    policy = HangsFor("a")
    yield policy
    policy.release.set()  # let the abandoned threads end


def test_a_quick_call_answers_and_a_raising_one_raises_as_inline():
    budget = PolicyBudget(1.0)
    assert budget.call(Halve(), None)[0].factor == 0.5

    class Raises(Policy):
        name = "raises"

        def propose(self, view):
            raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        budget.call(Raises(), None)

    class Exits(Policy):
        name = "exits"

        def propose(self, view):
            raise SystemExit(3)

    with pytest.raises(RuntimeError, match="SystemExit: 3"):  # never the controller's exit
        budget.call(Exits(), None)
    assert budget.timeouts == {} and budget.stuck_threads == 0
    budget.close()


def test_a_hung_call_is_cut_off_and_the_next_job_gets_a_fresh_worker(hangs):
    budget = PolicyBudget(0.25)
    with pytest.raises(PolicyTimeout, match=r"^exceeded time budget of 250 ms$"):
        budget.call(hangs, state("a").view())
    assert budget.stuck_threads == 1 and budget.timeouts == {"hangs": 1}
    out = budget.call(hangs, state("b").view())  # the stuck worker is not reused
    assert out[0].hold and hangs.calls == 2
    hangs.release.set()
    assert wait_for(lambda: budget.stuck_threads == 0, timeout=5)
    budget.close()


def test_stuck_calls_are_bounded_then_the_policy_is_not_called_for_any_job(hangs):
    budget = PolicyBudget(0.25, max_stuck=2)
    for job in ("a", "a"):
        with pytest.raises(PolicyTimeout, match="exceeded"):
            budget.call(hangs, state(job).view())
    with pytest.raises(PolicyTimeout, match="not called: 2 earlier calls are still running"):
        budget.call(hangs, state("b").view())
    assert hangs.calls == 2 and budget.stuck_threads == 2
    hangs.release.set()
    assert wait_for(lambda: budget.stuck_threads == 0, timeout=5)
    assert budget.call(hangs, state("b").view())[0].hold  # callable again once they ended


class Where(Policy):
    """Records the thread each call ran on."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.threads = name, []

    def propose(self, view):
        self.threads.append(threading.get_ident())
        return []


def test_a_jobs_policies_go_to_one_worker_together_and_a_hang_among_them_costs_only_itself(
        hangs):
    first, last = Where("first"), Where("last")
    budget = PolicyBudget(0.25)
    out = budget.call_each([first, hangs, last], state("b").view())
    assert [ok for ok, _ in out] == [True, True, True] and out[1][1][0].hold
    # One hand-over for the three: they ran one after the other on one worker thread.
    assert first.threads == last.threads and first.threads[0] != threading.get_ident()
    out = budget.call_each([first, hangs, last], state("a").view())
    assert out[0] == (True, []) and out[2] == (True, [])
    assert not out[1][0] and str(out[1][1]) == "exceeded time budget of 250 ms"
    assert budget.timeouts == {"hangs": 1} and budget.stuck_threads == 1
    # The policy after the hung one ran on a fresh worker; the abandoned one called no more.
    assert first.threads[1] == first.threads[0] and last.threads[1] != first.threads[1]
    assert len(last.threads) == 2
    out = budget.call_each([first, last], state("b").view())
    assert first.threads[2] == last.threads[2] == last.threads[1], "the fresh one is kept"
    budget.close()


def test_the_engine_disables_a_hung_policy_for_its_job_only(hangs):
    engine = Engine([hangs, Halve()], LOOSE, budget=PolicyBudget(0.25))
    a, b = state("a"), state("b")
    decision = decided(engine, a)
    assert decision.errors == (("hangs", "exceeded time budget of 250 ms"),)
    assert a.disabled_policies == {"hangs": "exceeded time budget of 250 ms"}
    assert decision.commands == {"lr": 0.5}, "the other policy went on"  # x0.5 the job's lr
    again = decided(engine, a)
    assert again.errors == () and hangs.calls == 1, "not asked again for job a"
    decision_b = decided(engine, b)
    assert decision_b.errors == () and not b.disabled_policies
    assert [n for n, _ in decision_b.proposals] == ["hangs", "halve"]


def test_the_budget_is_configured_and_checked():
    assert load_config(env={}).policy_budget_ms == 1000.0
    assert load_config(env={"TRIMTAB_POLICY_BUDGET_MS": "0"}).policy_budget_ms == 0
    with pytest.raises(
        ConfigError,
        match=r"policy_budget_ms = -1: Input should be greater "
        r"than or equal to 0",
    ):
        load_config(env={"TRIMTAB_POLICY_BUDGET_MS": "-1"})
    with pytest.raises(ConfigError, match=r"policy_budget_ms = 100000: .*less than or equal"):
        load_config(env={"TRIMTAB_POLICY_BUDGET_MS": "100000"})


# -- for real: a ``trimtab serve`` subprocess, a plugin that hangs for one job --------------

CONFIG = """
policy_budget_ms = 300
allow_plugins = ["bench.scenario_policies:*"]

[[policies]]
name = "bench.scenario_policies:Hanging"

[[policies]]
name = "bench.scenario_policies:Nudge"
config = { factor = 0.9 }

[governor.lr]
cooldown_steps = 20
slew_ratio = 1000.0
"""


def _train(srv_endpoint: str, job: str, steps: int, seed: int, out: dict) -> None:
    task = Regression(seed=seed)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.05)
    lrs = []
    with attach(
        task.model, opt, job=job, endpoint=srv_endpoint, report_every=5, heartbeat_s=0.2
    ) as guard:
        for _ in range(steps):
            xb, yb = task.batch()
            loss = task.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            guard.step(loss)
            # The lr the step used: the user's own (0.05, back in the param group after the
            # step) times trimtab's multiplier.
            lrs.append(guard.knobs.lr)
            threading.Event().wait(0.004)
        out[job] = (guard.global_step, lrs, out["scrape"]() if "scrape" in out else "")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_plugin_hung_for_one_job_is_cut_off_while_the_other_job_is_served(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", python_path(os.environ.get("PYTHONPATH")))
    srv = start_serve(tmp_path, None, None, CONFIG)
    try:
        out: dict = {"scrape": srv.metrics}
        threads = [
            threading.Thread(target=_train, args=(srv.endpoint, job, 320, seed, out))
            for seed, job in enumerate(("hang-a", "hang-b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert srv.proc.poll() is None, "the controller is still up"
        journal = srv.journal()
        (err,) = wait_for(lambda: journal.events("hang-a", "policy_error"))
        assert err.data == {"policy": "hanging", "error": "exceeded time budget of 300 ms"}
        assert journal.events("hang-b", "policy_error") == []
        for job in ("hang-a", "hang-b"):
            steps, lrs, scraped = out[job]
            assert steps == 320
            # nudge went on for both jobs: LR commands applied all through the run.
            cmds = [c for c in journal.events(job, "command") if "lr" in c.data["scale"]]
            late = [c for c in cmds if c.step > err.step]
            assert len(late) >= 4, (job, [c.step for c in cmds], err.step)
            assert lrs[-1] < 0.05 * 0.9**4
            errors = re.findall(
                rf'trimtab_policy_errors_total{{job="{job}",policy="hanging"}} '
                r"(\S+)",
                scraped,
            )
            assert errors == (["1.0"] if job == "hang-a" else [])
        assert "policy hanging disabled for job hang-a: exceeded time budget of 300 ms" in srv.log()
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(10)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(10)
