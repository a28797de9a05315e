"""guard.state_dict() / load_state_dict(): trimtab's part of the user's own checkpoint.

A run saves ``{"model", "optimizer", "scheduler", "trimtab": guard.state_dict()}`` and is
resumed in a new guard: the effective lr, momentum, weight decay and clip, the live
schedules, the step counters and the command sequence continue; the registration says it
is the same run, resumed, with the checkpoints the new guard holds.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from trimtab.client import Guard, attach
from trimtab.protocol import wire

JOB = "resume-test"


class Run:
    """A small regression trained with SGD + momentum, weight decay and a step scheduler."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                         torch.nn.Linear(16, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9,
                                   weight_decay=1e-3)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=7, gamma=0.8)
        g = torch.Generator().manual_seed(100)  # the same data in every process
        self.x = torch.randn(256, 6, generator=g)
        self.y = self.x[:, :1] * 2 - self.x[:, 1:2] + 0.1 * torch.randn(256, 1, generator=g)

    def step(self, guard: Guard, i: int) -> float:
        idx = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = torch.nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])
        self.opt.zero_grad()
        loss.backward()
        guard.step(loss)
        self.sched.step()
        return loss.item()

    def save(self, guard: Guard) -> dict:
        # Deep copies, as torch.save makes: the live tensors keep changing.
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                              "scheduler": self.sched.state_dict(),
                              "trimtab": guard.state_dict()})

    def load(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])


def _attach(run: Run, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    kw.setdefault("report_every", 5)
    return attach(run.model, run.opt, job=JOB, endpoint=endpoint, scheduler=run.sched, **kw)


def _deliver(guard: Guard, command: wire.Command) -> None:
    """Hand a command to the guard as its transport thread does on receiving it."""
    guard._transport._handle(command)


def _commanded(guard: Guard, run: Run, start: int) -> int:
    """Command multipliers, momentum, clip and a live lr schedule, and train past them."""
    cosine = wire.LiveSchedule(knob="lr", pieces=[wire.SchedulePiece(
        name="cosine", params={"lr": 1.0, "t_max": 200})], lo=0.05)
    _deliver(guard, wire.Command(job=JOB, seq=3, scale=wire.ScaleTargets(weight_decay=2.0),
                                 knobs=wire.Knobs(momentum=0.8, clip=0.7), lr_max=0.2,
                                 schedules=[cosine]))
    for i in range(start, start + 9):
        run.step(guard, i)
    return start + 9


def test_a_resumed_guard_continues_with_the_values_counters_and_run_it_was_saved_with(
        dead_endpoint) -> None:
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=10)
    i = _commanded(guard, run, 0)
    saved = run.save(guard)
    before = guard.knobs
    sd = saved["trimtab"]
    json.dumps(sd)  # plain values: a JSON file or a trainer's callback state takes it
    assert (sd["step"], sd["applied_seq"], sd["controls"]["momentum"]) == (9, 3, 0.8)
    # The uninterrupted run's next step, for comparison.
    run.step(guard, i)
    expected = guard.knobs
    expected_params = [p.detach().clone() for p in run.model.parameters()]
    guard.close()

    again = Run(seed=7)  # a new process: other weights until the user's state is loaded
    resumed = _attach(again, dead_endpoint, checkpoint_every=10)
    again.load(saved)
    resumed.load_state_dict(saved["trimtab"])
    assert (resumed.global_step, resumed.applied_seq, resumed.run_id) == (9, 3, guard.run_id)
    # Before its first step a guard tells what a step would use now (the scheduler has
    # moved the user's lr on since the save): all but the lr are the saved ones.
    now = resumed.knobs
    assert (now.momentum, now.weight_decay, now.clip) == (before.momentum, before.weight_decay,
                                                          before.clip)
    assert resumed.scale.weight_decay == 2.0 and resumed.clip == 0.7
    again.step(resumed, i)
    # The first step after the resume ran with the values the uninterrupted run's did
    # (the live cosine schedule continued at step 9, under the lr cap), and landed on
    # the same weights.
    assert resumed.knobs == expected
    assert all(torch.allclose(p, q) for p, q in
               zip(again.model.parameters(), expected_params, strict=True))
    # An old command is acknowledged, never applied again.
    _deliver(resumed, wire.Command(job=JOB, seq=3, knobs=wire.Knobs(momentum=0.5)))
    again.step(resumed, i + 1)
    assert resumed.knobs.momentum == 0.8 and resumed.applied_seq == 3
    resumed.close()


def test_the_resumed_guard_registers_as_the_same_run_resumed_with_its_checkpoints(
        fake_controller) -> None:
    run = Run()
    guard = _attach(run, fake_controller.endpoint, checkpoint_every=5, keep=2)
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
    # The registration tells the attach snapshot's step (origin), while it is held.
    assert fake_controller.of_type(wire.Register)[0].origin == 0
    for i in range(12):
        run.step(guard, i)
    guard._note_listing()  # as at the next window's end
    assert 0 not in guard.checkpoints and guard._listing[2] is None  # evicted: not told
    saved = run.save(guard)
    guard.close()

    again = Run(seed=3)
    resumed = _attach(again, fake_controller.endpoint, checkpoint_every=5)
    fake_controller.wait_for(lambda c: any(r.run_id != guard.run_id
                                           for r in c.of_type(wire.Register)))
    again.load(saved)
    resumed.load_state_dict(saved["trimtab"])
    fake_controller.wait_for(lambda c: c.of_type(wire.Register)[-1].resume == 1)
    reg = fake_controller.of_type(wire.Register)[-1]
    assert (reg.run_id, reg.step, reg.resume_step, reg.applied_seq) == (guard.run_id, 12, 12, 0)
    # The snapshot taken at attach (the new process's weights before the load) is gone:
    # the one held is of the resumed state, at the resumed step, and is the origin now.
    assert reg.checkpoints == [12] and reg.stable_step is None and reg.origin == 12
    # This process's resume has an id of its own, the same on every registration of it.
    first = fake_controller.of_type(wire.Register)[0]
    assert first.resume_id is None and reg.resume_id
    resumed._transport.reregister()
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Register)) >= 4)
    assert fake_controller.of_type(wire.Register)[-1].resume_id == reg.resume_id
    assert resumed.checkpoints == [12]
    for i in range(12, 16):
        again.step(resumed, i)
    # Reports continue the saved numbering (a controller refuses a report seq it has seen).
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Report)
                                            and c.of_type(wire.Report)[-1].step >= 15),
                             while_waiting=lambda: again.step(resumed, 0))
    seqs = [r.seq for r in fake_controller.of_type(wire.Report)]
    assert seqs[-1] > saved["trimtab"]["report_seq"]
    resumed.close()


def test_a_rollback_after_a_resume_restores_the_resumed_state_not_the_attach_one(
        dead_endpoint) -> None:
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=50)
    for i in range(20):
        run.step(guard, i)
    saved = run.save(guard)
    guard.close()

    again = Run(seed=11)
    resumed = _attach(again, dead_endpoint, checkpoint_every=50)
    again.load(saved)
    resumed.load_state_dict(saved["trimtab"])
    for i in range(20, 30):
        again.step(resumed, i)
    _deliver(resumed, wire.Command(job=JOB, seq=1, mark_stable=20, rollback_to=20))
    again.step(resumed, 30)
    assert resumed.global_step == 20 and resumed.rollbacks == 1
    assert all(torch.equal(p, saved["model"][k]) for k, p in again.model.state_dict().items())
    resumed.close()


def test_a_state_loaded_after_attach_without_the_guard_state_is_the_last_resort(
        fake_controller, caplog) -> None:
    """The loop attaches, then loads its own checkpoint (model, optimizer, scheduler) but not
    trimtab's state. The snapshot taken at attach held the untrained weights: a rollback to
    it threw the trained run away (a trial: 1500 steps, the loss back from 0.0022 to 0.85),
    and the registration said nothing of the optimizer's state, so the LR range test swept
    the trained run. At the first step the guard sees the run changed since attach: the
    snapshot is taken again, of the loaded state, and the registration says warm_start."""
    run = Run()
    guard = _attach(run, fake_controller.endpoint, checkpoint_every=0)
    for i in range(20):
        run.step(guard, i)
    saved = run.save(guard)
    guard.close()

    again = Run(seed=11)
    resumed = _attach(again, fake_controller.endpoint, checkpoint_every=50)
    fake_controller.wait_for(lambda c: any(r.run_id == resumed.run_id
                                           for r in c.of_type(wire.Register)))
    assert not [r for r in fake_controller.of_type(wire.Register)
                if r.run_id == resumed.run_id][0].warm_start
    again.load(saved)
    with caplog.at_level("INFO", logger="trimtab.client"):
        for i in range(20, 30):
            again.step(resumed, i)
    assert "changed between attach and its first step" in caplog.text
    fake_controller.wait_for(lambda c: [r for r in c.of_type(wire.Register)
                                        if r.run_id == resumed.run_id][-1].warm_start)
    assert resumed.checkpoints == [0]
    _deliver(resumed, wire.Command(job=JOB, seq=1, mark_stable=0, rollback_to=0))
    again.step(resumed, 30)
    assert resumed.global_step == 0 and resumed.rollbacks == 1
    assert all(torch.equal(p, saved["model"][k]) for k, p in again.model.state_dict().items())
    # The schedule's position came back with it too (the attach snapshot's was 1).
    assert again.sched.last_epoch >= saved["scheduler"]["last_epoch"]
    resumed.close()


def test_a_run_left_as_attached_keeps_its_attach_snapshot(dead_endpoint, caplog) -> None:
    run = Run()
    before = copy.deepcopy(run.model.state_dict())
    guard = _attach(run, dead_endpoint, checkpoint_every=50)
    with caplog.at_level("INFO", logger="trimtab.client"):
        for i in range(10):
            run.step(guard, i)
    assert "changed between attach" not in caplog.text
    _deliver(guard, wire.Command(job=JOB, seq=1, mark_stable=0, rollback_to=0))
    run.step(guard, 10)
    assert guard.rollbacks == 1
    assert all(torch.equal(p, before[k]) for k, p in run.model.state_dict().items())
    guard.close()


def test_a_bad_state_is_refused_with_its_key_and_nothing_changes(dead_endpoint) -> None:
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=0)
    for i in range(3):
        run.step(guard, i)
    sd = guard.state_dict()
    guard.close()
    fresh = _attach(Run(), dead_endpoint, checkpoint_every=0)
    run_id = fresh.run_id
    cases = [
        ({**sd, "job": "other"}, r"job='other' is invalid; allowed: this guard's job"),
        ({**sd, "format": 2}, r"format=2 is invalid; allowed: 1"),
        ({**sd, "step": -1}, r"step=-1 is invalid; allowed: an int >= 0"),
        ({**sd, "calls": 1}, r"calls=1 is invalid; allowed: >= step=3"),
        ({**sd, "controls": {**sd["controls"], "clip": float("nan")}},
         r"controls.clip=nan is invalid; allowed: a finite number or None"),
        ({k: v for k, v in sd.items() if k != "live"}, r"missing keys \['live'\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad)
    with pytest.raises(TypeError, match="expects the dict guard.state_dict"):
        fresh.load_state_dict([1, 2])
    assert (fresh.run_id, fresh.global_step) == (run_id, 0)
    fresh.load_state_dict(sd)
    assert fresh.global_step == 3
    with pytest.raises(RuntimeError, match="call it once"):
        fresh.load_state_dict(sd)
    fresh.close()


def test_loading_after_the_first_step_is_refused(dead_endpoint) -> None:
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=0)
    sd = guard.state_dict()
    run.step(guard, 0)
    with pytest.raises(RuntimeError, match="before the first step"):
        guard.load_state_dict(sd)
    guard.close()


def test_the_weight_average_is_saved_and_resumed_with_the_guard(dead_endpoint) -> None:
    """With ``ema=`` the state carries the average's tensors: the resumed average is the
    saved one and goes on averaging as the uninterrupted one does; a state saved without
    one starts the average again from the resumed weights."""
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=0, ema=0.9)
    for i in range(8):
        run.step(guard, i)
    saved = run.save(guard)
    run.step(guard, 8)
    expected = [p.detach().clone() for p in guard.ema_model.parameters()]
    guard.close()
    again = Run(seed=5)
    resumed = _attach(again, dead_endpoint, checkpoint_every=0, ema=0.9)
    again.load(saved)
    resumed.load_state_dict(saved["trimtab"])
    assert int(resumed.ema_model.n_averaged) == 8
    again.step(resumed, 8)
    assert all(torch.allclose(p, q) for p, q in
               zip(resumed.ema_model.parameters(), expected, strict=True))
    resumed.close()
    plain = _attach(Run(seed=6), dead_endpoint, checkpoint_every=0, ema=0.9)
    plain.load_state_dict({**saved["trimtab"], "ema": None})
    assert int(plain.ema_model.n_averaged) == 0
    plain.close()


@pytest.mark.parametrize("per", ["step", "epoch"])
def test_a_run_resumed_from_trimtabs_files_keeps_its_scheduler_in_step(
        dead_endpoint, tmp_path, per) -> None:
    """An FSDP2/DDP trial: resumed with load_stable + restore + guard.load_state_dict, a
    cosine schedule ran one step behind, one more per resume: a snapshot is taken inside
    guard.step, before the loop's own scheduler.step() of that step. A loop that steps its
    scheduler after every optimizer step has it stepped for it at the resume; one that
    steps it every few steps (per epoch) is left as saved."""
    from trimtab.client import load_stable

    every = 1 if per == "step" else 4

    def train(run: Run, guard: Guard, start: int, stop: int) -> dict[int, float]:
        lrs = {}
        for i in range(start, stop):
            lrs[i + 1] = run.opt.param_groups[0]["lr"]  # what step i + 1 is scheduled at
            idx = slice((i * 32) % 256, (i * 32) % 256 + 32)
            loss = torch.nn.functional.mse_loss(run.model(run.x[idx]), run.y[idx])
            run.opt.zero_grad()
            loss.backward()
            guard.step(loss)
            if (i + 1) % every == 0:
                run.sched.step()
        return lrs

    def fresh(seed: int, directory) -> tuple[Run, Guard]:
        run = Run(seed=seed)
        run.sched = torch.optim.lr_scheduler.CosineAnnealingLR(run.opt, T_max=40)
        return run, _attach(run, dead_endpoint, checkpoint_every=10, checkpoint_dir=directory)

    run, guard = fresh(0, tmp_path / "whole")
    whole = train(run, guard, 0, 40)
    guard.close()

    run, guard = fresh(0, tmp_path / "ckpt")
    train(run, guard, 0, 27)
    assert guard._store.mark_stable(20)  # as the controller would
    guard.close()
    for restart in range(2):  # resumed twice from the same file: no lag either time
        run, guard = fresh(1 + restart, tmp_path / "ckpt")
        ckpt = load_stable(tmp_path / "ckpt")
        assert ckpt is not None and ckpt.step == 20
        ckpt.restore(run.model, run.opt, run.sched)
        guard.load_state_dict(ckpt.guard_state)
        resumed = train(run, guard, guard.global_step, 40)
        guard.close()
        assert resumed == pytest.approx({s: whole[s] for s in range(21, 41)}, rel=1e-12)
