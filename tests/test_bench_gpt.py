"""The GPT tasks: the model trains, the user's own schedule is applied the way the user's
loop applies it (for every param group, keeping their ratios), contenders with their own
schedule replace it, and the LR x100 fault persists under every kind of schedule."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench import contenders, faults, recovery, run
from bench.loop import RunSpec, fault_start, train
from bench.tasks import UserSchedule, _module_tasks, load_tasks
from bench.tasks.gpt_char import GPTChar

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

KINDS = ("loop", "lambda", "onecycle")
#: Group 1's peak LR over group 0's in these tests (the task itself starts both equal).
RATIO = 0.3
STEPS = 30


def _task(kind: str | None) -> GPTChar:
    """gpt_KIND (``None``: the same task without a schedule) with group 1 at RATIO x the
    starting LR, so a schedule that ignored a group's own peak would show; 3 evaluations
    a run (the LRs are under test here, not the losses)."""
    base = load_tasks()["gpt_lambda" if kind is None else f"gpt_{kind}"]

    class Ratio(GPTChar):
        def make(self, seed, width=None):
            r = super().make(seed, width)
            r.param_groups[1]["lr"] = RATIO * self.ref_lr
            return r

    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields["evals"] = 3
    if kind is None:
        fields["schedule"] = None
    return Ratio(**fields)


def _train(task, contender: str, steps: int = STEPS, fault: str | None = None,
           endpoint: str | None = None):
    """The run, and what every optimizer step used: per step, each group's (lr, beta1)."""
    used: list[list[tuple[float, float]]] = []

    def record(opt, args, kwargs):
        used.append([(float(g["lr"]), float(g["betas"][0])) for g in opt.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        result = train(task, RunSpec(task.name, contender, task.ref_lr, 0, steps, None, fault),
                       endpoint)
    finally:
        handle.remove()
    return result, used


def _expected(kind: str, peaks: list[float], steps: int) -> list[list[tuple[float, float]]]:
    """The user's schedule, computed apart: each group's (lr, beta1) at every step."""
    schedule = UserSchedule(kind, warmup=0.1, min_ratio=0.1)
    if kind != "onecycle":
        return [[(p * schedule.factor(t, steps), 0.9) for p in peaks] for t in range(steps)]
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in peaks]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(ps, peaks,
                                                                         strict=True)])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append([(g["lr"], g["betas"][0]) for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _close(a, b) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-9) for ra, rb in zip(a, b, strict=True)
        for pa, pb in zip(ra, rb, strict=True) for x, y in zip(pa, pb, strict=True))


def test_the_gpt_model_trains_and_its_adamw_has_two_groups():
    task = load_tasks()["gpt_lambda"]
    r = task.make(0)
    assert [g["weight_decay"] for g in r.param_groups] == [0.1, 0.0]
    decayed = {id(p) for p in r.param_groups[0]["params"]}
    assert all(p.dim() == 2 for p in r.param_groups[0]["params"])
    assert id(r.model.tokens.weight) not in decayed and id(r.model.head.weight) in decayed
    result = train(task, RunSpec(task.name, "constant", task.ref_lr, 0, 60))
    assert result.final_val < result.init_val - 1.0, result.curve


@pytest.mark.parametrize("kind", KINDS)
def test_the_users_schedule_sets_the_lr_of_every_group_as_the_user_applies_it(kind):
    task = _task(kind)
    _, used = _train(task, "constant")
    assert _close(used, _expected(kind, [task.ref_lr, RATIO * task.ref_lr], STEPS)), used[:12]
    assert used[-1][0][0] != used[0][0][0]  # it really moved


def test_a_contender_that_keeps_the_schedule_keeps_it_zclip():
    task = _task("lambda")
    _, used = _train(task, "zclip")
    assert _close(used, _expected("lambda", [task.ref_lr, RATIO * task.ref_lr], STEPS))


def test_which_contenders_own_a_schedule():
    owners = {n for n, c in contenders.CONTENDERS.items() if c.owns_schedule}
    assert owners == {"warmup_cosine", "step_decay", "plateau", "onecycle_rangetest",
                      "schedulefree"}
    assert not contenders.trimtab_set("x", "plateau").owns_schedule


@pytest.mark.parametrize("contender, kinds", [("warmup_cosine", KINDS),
                                              ("schedulefree", ("onecycle",))])
def test_a_contender_with_its_own_schedule_replaces_the_users(contender, kinds):
    _, alone = _train(_task(None), contender)
    for kind in kinds:
        _, used = _train(_task(kind), contender)
        # The same LRs (and beta1: OneCycle would cycle it) as on the task without one.
        assert used == alone, (kind, used[:5], alone[:5])


@pytest.mark.parametrize("kind", KINDS)
def test_the_lr_100x_fault_persists_under_every_kind_of_schedule(kind):
    task = _task(kind)
    _, clean = _train(task, "constant", 24)
    faulted, used = _train(task, "constant", 24, "lr_100x")
    at = fault_start(24) - 1  # the step index of the fault's iteration
    assert len(used) == len(clean) == 24
    assert _close(used[:at], clean[:at])
    scaled = [[(lr * faults.LR_FACTOR, b1) for lr, b1 in step] for step in clean[at:]]
    assert _close(used[at:], scaled), (used[at:at + 3], scaled[:3])
    # The trace records the LR each step used (group 0).
    assert faulted.lr_trace == [float(f"{s[0][0]:.6g}") for s in used]


class _FakeGuard:
    """What the trimtab stepper needs of a guard, without a controller: it steps the
    optimizer, rolls back once (calling on_rollback) and reports an LR of its own."""

    def __init__(self, model, optimizer, **options):
        self.optimizer, self.options, self.global_step = optimizer, options, 0
        self.knobs = SimpleNamespace(lr=0.123)
        self.scale = SimpleNamespace(lr=1.0)
        self.calls = 0

    def step(self, loss):
        self.optimizer.step()
        self.global_step += 1
        self.calls += 1
        if self.calls == 20:
            self.global_step = 10
            self.options["on_rollback"](10)

    def close(self):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_trimtab_gets_the_users_scheduler_and_the_loop_steps_it(kind, monkeypatch):
    import trimtab.client

    guards = []

    def fake_attach(model, optimizer, **options):
        guards.append(_FakeGuard(model, optimizer, **options))
        return guards[-1]

    monkeypatch.setattr(trimtab.client, "attach", fake_attach)
    task = _task(kind)
    result, used = _train(task, "trimtab", fault="scaled_inputs", endpoint="tcp://127.0.0.1:9")
    scheduler = guards[0].options["scheduler"]
    assert (scheduler is None) == (kind == "loop")
    if scheduler is not None:
        assert isinstance(scheduler, (torch.optim.lr_scheduler.LambdaLR,
                                      torch.optim.lr_scheduler.OneCycleLR))
    # The rollback at step 20 leaves the loop's own iteration counter alone.
    assert _close(used, _expected(kind, [task.ref_lr, RATIO * task.ref_lr], STEPS))
    assert result.info["rollbacks"] == 1
    assert set(result.lr_trace) == {0.123}  # what the guard says it used


def test_every_quality_scenario_includes_the_gpt_tasks():
    tasks = load_tasks()
    specs = run.plan(tasks, ["constant", "zclip"], ["lr", "target", "scale", "faults"], 1,
                     "quick", None, ("lr_100x",))
    for kind in KINDS:
        name = f"gpt_{kind}"
        assert name in recovery.FAULT_TASKS
        mine = [s for s in specs if s.task == name]
        assert {s.lr for s in mine if s.contender == "constant"} == set(tasks[name].lr_grid)
        assert tasks[name].lr_grid[2] == tasks[name].ref_lr  # centred on the tuned peak
        assert {s.fault for s in mine} == {None, "lr_100x"}
        assert all(s.steps == tasks[name].steps["quick"] for s in mine)


def test_a_bad_schedule_or_tasks_tuple_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kind='cosine' is invalid; allowed: loop, lambda"):
        UserSchedule("cosine")
    with pytest.raises(ValueError, match=r"warmup=1.5 is out of range"):
        UserSchedule("loop", warmup=1.5)
    with pytest.raises(TypeError, match=r"bench.tasks.m: TASKS must be a non-empty tuple"):
        _module_tasks("m", SimpleNamespace(TASKS=("gpt",)))
    assert _module_tasks("m", SimpleNamespace(TASKS=(_task("loop"),)))[0].name == "gpt_loop"


@pytest.mark.parametrize("module", ["bench.tasks", "bench.tasks.gpt_char"])
def test_docstring_examples(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
