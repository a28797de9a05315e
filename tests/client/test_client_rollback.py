"""Checkpoints and rollback through the Guard: commands from a real ROUTER, errors in acks,
LR schedulers composed with trimtab's changes, and the options."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from trimtab.client import Guard, attach, load_stable
from trimtab.protocol import wire

from .conftest import count_host_reads

pytestmark = pytest.mark.timeout(30)


class Run:
    """A tiny regression run that keeps, by global_step, the state the guard left."""

    def __init__(self, seed: int = 0, sched=None) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
        weights = [p for n, p in self.model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.model.named_parameters() if n.endswith("bias")]
        self.opt = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.1}],
                                   lr=0.05, momentum=0.9)
        self.sched = None if sched is None else sched(self.opt)
        self.at: dict[int, tuple[list[torch.Tensor], dict]] = {}
        #: (global_step after the step, each group's lr the optimizer step ran with).
        self.lrs: list[tuple[int, list[float]]] = []
        self._ran: list[float] = []
        self.opt.register_step_pre_hook(lambda opt, args, kwargs: setattr(
            self, "_ran", [g["lr"] for g in opt.param_groups]))

    def step(self, guard: Guard, poison: bool = False) -> None:
        x = torch.randn(8, 5)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        if poison:
            self.model[0].weight.grad[0, 0] = float("nan")
        guard.step(loss)
        self.lrs.append((guard.global_step, list(self._ran)))
        # The first time each step is reached: a rollback must not overwrite what it was.
        self.at.setdefault(guard.global_step,
                           (self.params(), copy.deepcopy(self.opt.state_dict())))
        if self.sched is not None:
            self.sched.step()

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def is_at(self, step: int) -> bool:
        params, opt_state = self.at[step]
        momentum = [s["momentum_buffer"] for s in self.opt.state_dict()["state"].values()]
        return all(torch.equal(p, q) for p, q in zip(self.params(), params, strict=True)) and \
            all(torch.equal(m, s["momentum_buffer"])
                for m, s in zip(momentum, opt_state["state"].values(), strict=True))


def _attach(run: Run, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    kw.setdefault("report_every", 5)
    return attach(run.model, run.opt, job="ckpt-test", endpoint=endpoint,
                  scheduler=run.sched, **kw)


def _command(seq: int, **kw) -> wire.Command:
    return wire.Command(job="ckpt-test", seq=seq, **kw)




def _deliver(guard: Guard, command: wire.Command) -> None:
    """Hand a command to the guard as its transport thread does on receiving it."""
    guard._transport._handle(command)


def _last_ack(guard: Guard) -> wire.Ack:
    return guard._transport._control[-1]


def test_rollback_command_end_to_end(fake_controller, tmp_path) -> None:
    run = Run()
    seen: list[int] = []
    with _attach(run, fake_controller.endpoint, checkpoint_every=5, keep=2,
                 checkpoint_dir=tmp_path, on_rollback=seen.append) as guard:
        for _ in range(12):
            run.step(guard)
        fake_controller.wait_for(lambda c: any(5 in r.checkpoints for r in c.of_type(wire.Report)))
        stood: list[int] = []  # where the run stood before each step

        def train() -> None:
            stood.append(guard.global_step)
            run.step(guard)

        fake_controller.send_until(_command(1, mark_stable=5),
                                   lambda c: guard.stable_step == 5, train)
        # A knob change after the checkpoint: the rollback must take it back.
        fake_controller.send_until(_command(2, knobs=wire.Knobs(momentum=0.5)),
                                   lambda c: guard.applied_seq == 2, train)
        assert guard.global_step > 5 and not run.is_at(5)
        fake_controller.send_until(_command(3, rollback_to=5, scale=wire.ScaleTargets(lr=0.2),
                                            knobs=wire.Knobs(clip=0.5), reasons=["spike"]),
                                   lambda c: guard.rollbacks == 1, train)

        assert guard.global_step == 5 and run.is_at(5) and seen == [5]
        assert not any(a.seq == 3 for a in fake_controller.of_type(wire.Ack))  # not before...
        run.step(guard)  # ... the first step that runs with it
        assert run.lrs[-1][1] == pytest.approx([0.01, 0.02])
        assert [g["lr"] for g in run.opt.param_groups] == [0.05, 0.1]  # the loop's own values
        in_force = {"lr": pytest.approx(0.01), "momentum": 0.9, "weight_decay": 0.0, "clip": 0.5}
        # The momentum is back to the checkpoint's (the user's), the lr cut applied after.
        assert guard.knobs.model_dump() == in_force
        fake_controller.wait_for(lambda c: any(a.seq == 3 for a in c.of_type(wire.Ack)))
        ack = next(a for a in fake_controller.of_type(wire.Ack) if a.seq == 3)
        assert (ack.restored_step, ack.step, ack.error) == (5, 5, None)
        # Where the run stood when it carried the rollback out: the steps lost are from there.
        assert ack.rolled_back_from == stood[-1] > 5
        assert ack.knobs.model_dump() == in_force
        assert ack.scale == wire.Scale(lr=0.2) and ack.base.lr == 0.05

        fake_controller.wait_for(lambda c: any(r.applied_seq == 3 for r in c.of_type(wire.Report)),
                                 while_waiting=lambda: run.step(guard))
        report = next(r for r in fake_controller.of_type(wire.Report) if r.applied_seq == 3)
        assert report.stable_step == 5 and report.checkpoints[0] == 5
        assert report.step == 5 + report.window  # the window restarted at the restored step
        assert all(s <= report.step for s in report.checkpoints)
    assert load_stable(tmp_path).step == 5


def test_rollback_to_a_step_that_is_not_stable_restores_nothing(dead_endpoint) -> None:
    run = Run()
    with _attach(run, dead_endpoint, checkpoint_every=2) as guard:
        for _ in range(5):
            run.step(guard)
        before = run.params()
        _deliver(guard, _command(1, mark_stable=3, rollback_to=2,
                                 scale=wire.ScaleTargets(lr=0.4)))
        run.step(guard)
        ack = _last_ack(guard)
        assert ack.restored_step is None and guard.rollbacks == 0
        assert ack.error == ("mark_stable=3: no checkpoint at that step (held: 0, 2, 4); "
                             "rollback_to=2: no stable checkpoint at that step (stable: none); "
                             "nothing restored")
        assert guard.global_step == 6 and not run.is_at(4)  # the step was taken, not dropped
        assert not all(torch.equal(p, q) for p, q in zip(run.params(), before, strict=True))
        assert ack.knobs.lr == pytest.approx(0.02)  # knobs still applied
        assert run.lrs[-1][1][0] == pytest.approx(0.02)


def test_a_repeated_rollback_is_acknowledged_not_repeated(dead_endpoint) -> None:
    run = Run()
    with _attach(run, dead_endpoint, checkpoint_every=3) as guard:
        for _ in range(4):
            run.step(guard)
        _deliver(guard, _command(1, mark_stable=3))
        run.step(guard)
        _deliver(guard, _command(2, rollback_to=3))
        run.step(guard)
        assert guard.global_step == 3 and guard.rollbacks == 1
        run.step(guard)
        _deliver(guard, _command(2, rollback_to=3))  # the controller did not hear the ack
        run.step(guard)
        assert guard.rollbacks == 1 and guard.global_step == 5
        ack = _last_ack(guard)
        assert (ack.seq, ack.restored_step) == (2, 3)  # same outcome, not carried out again


def test_on_rollback_that_raises_is_reported_and_training_goes_on(dead_endpoint, caplog) -> None:
    run = Run()

    def broken(step: int) -> None:
        raise RuntimeError(f"cannot seek to {step}")

    with _attach(run, dead_endpoint, checkpoint_every=2, on_rollback=broken) as guard:
        for _ in range(3):
            run.step(guard)
        _deliver(guard, _command(1, mark_stable=2, rollback_to=2))
        with caplog.at_level(logging.WARNING, logger="trimtab.client"):
            run.step(guard)
        run.step(guard)  # the ack goes with the first step after the restore
        ack = _last_ack(guard)
        assert ack.restored_step == 2
        assert "on_rollback raised RuntimeError: cannot seek to 2" in ack.error
        assert guard.global_step == 3


def test_checkpoint_every_zero_turns_checkpoints_off(fake_controller, monkeypatch) -> None:
    from trimtab.client import _guard

    monkeypatch.setattr(_guard.CheckpointStore, "take",
                        lambda *a, **k: pytest.fail("a checkpoint was taken"))
    run = Run()
    with _attach(run, fake_controller.endpoint, checkpoint_every=0) as guard:
        for _ in range(6):
            run.step(guard)
        assert guard.checkpoints == [] and guard.stable_step is None
        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Report)),
                                 while_waiting=lambda: run.step(guard))
        fake_controller.send_until(
            _command(1, mark_stable=0, rollback_to=0, scale=wire.ScaleTargets(lr=0.6)),
            lambda c: bool(c.of_type(wire.Ack)), lambda: run.step(guard))
        ack = fake_controller.of_type(wire.Ack)[0]
        assert ack.restored_step is None and "checkpoints are off" in ack.error
        assert ack.knobs.lr == pytest.approx(0.03) and guard.rollbacks == 0
        report = fake_controller.of_type(wire.Report)[0]
        assert report.checkpoints == [] and report.stable_step is None


def test_sync_free_path_snapshots_at_window_ends_with_exact_steps(dead_endpoint) -> None:
    """nonfinite="zero": skips are known on the host only when a window closes, so the
    snapshot waits for it and carries the exact step (here 5: one step of 6 skipped)."""
    run = Run()
    with _attach(run, dead_endpoint, checkpoint_every=3, report_every=3,
                 nonfinite="zero") as guard:
        for i in range(6):
            run.step(guard, poison=i == 1)
        assert guard.checkpoints == [0, 5] and guard.global_step == 5
        for i in range(3):  # one more skip after the snapshot, in a closed window
            run.step(guard, poison=i == 0)
        assert (guard.global_step, guard.skipped_steps) == (7, 2)
        _deliver(guard, _command(1, mark_stable=5, rollback_to=5))
        run.step(guard)
        assert guard.global_step == 5 and guard.skipped_steps == 1 and run.is_at(5)


def test_snapshots_do_not_read_the_device(dead_endpoint, monkeypatch) -> None:
    """On the sync-free path a step that snapshots reads no more than the window's one copy."""
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=2, report_every=2, nonfinite="zero")
    reads = count_host_reads(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize"))
    per_step = []
    for _ in range(6):
        x = torch.randn(8, 5)
        loss = (run.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        run.opt.zero_grad()
        loss.backward()
        reads.clear()
        guard.step(loss)
        per_step.append(dict(reads))
    monkeypatch.undo()
    assert guard.checkpoints == [2, 4, 6]  # taken on steps 2, 4 and 6
    guard.close()
    assert per_step == [{}, {"tolist": 1}] * 3  # the window's copy, nothing for the snapshot


# -- LR schedulers --------------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 4) * 0.95 ** t),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.2, 0.4], total_steps=40),
}


def _reference_lrs(make, endpoint: str) -> dict[int, list[float]]:
    """The lr each optimizer step k uses, without trimtab commands."""
    run = Run(sched=make)
    with _attach(run, endpoint, checkpoint_every=0) as guard:
        for _ in range(24):
            run.step(guard)
    return dict(run.lrs)


def _close(a: list[float], b: list[float], factor: float) -> bool:
    return all(abs(x - factor * y) <= 1e-12 * abs(factor * y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_cut_composes_with_the_users_scheduler(name, dead_endpoint) -> None:
    reference = _reference_lrs(SCHEDULERS[name], dead_endpoint)
    run = Run(sched=SCHEDULERS[name])
    with _attach(run, dead_endpoint, checkpoint_every=0) as guard:
        for i in range(24):
            if i == 7:  # halve lr at step 7: a multiplier on the user's schedule
                _deliver(guard, _command(1, scale=wire.ScaleTargets(lr=0.5)))
            run.step(guard)
    for step, lrs in run.lrs:
        assert _close(lrs, reference[step], 0.5 if step >= 8 else 1.0), (step, lrs)


@pytest.mark.parametrize("back_to", [0, 6])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_rollback_restores_the_schedule(name, back_to, dead_endpoint) -> None:
    """After a rollback to step s with an lr cut, step k (> s) uses 0.5 x the lr the plain
    schedule gives step k: the scheduler's state came back, cut included. Step 0 is the
    snapshot taken at attach, after the scheduler's first step."""
    reference = _reference_lrs(SCHEDULERS[name], dead_endpoint)
    run = Run(sched=SCHEDULERS[name])
    with _attach(run, dead_endpoint, checkpoint_every=3, keep=5) as guard:
        for _ in range(10):
            run.step(guard)
        _deliver(guard, _command(1, mark_stable=back_to, rollback_to=back_to,
                                 scale=wire.ScaleTargets(lr=0.5)))
        run.lrs.clear()
        for _ in range(12):
            run.step(guard)
    assert guard.rollbacks == 1 and run.lrs[0][0] == back_to
    for step, lrs in run.lrs[1:]:
        assert _close(lrs, reference[step], 0.5), (step, lrs, reference[step])


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("checkpoint_every", -1, r"checkpoint_every=-1 is invalid; allowed: an int >= 0"),
        ("keep", 0, r"keep=0 is invalid; allowed: an int from 1 to 255"),
        ("keep", 256, r"keep=256 is invalid"),
        ("checkpoint_dir", 5, r"checkpoint_dir=5 is invalid; allowed: None or a directory"),
        ("on_rollback", "seek", r"on_rollback='seek' is invalid; allowed: None or a callable"),
        ("scheduler", "cosine", r"scheduler='cosine' is invalid; allowed: None or an LR sched"),
    ],
)
def test_checkpoint_options_are_validated(option, value, message, dead_endpoint) -> None:
    run = Run()
    with pytest.raises(ValueError, match=message):
        attach(run.model, run.opt, job="unit", endpoint=dead_endpoint, **{option: value})


def test_a_scheduler_of_another_optimizer_is_refused(dead_endpoint) -> None:
    run, other = Run(), Run()
    sched = torch.optim.lr_scheduler.StepLR(other.opt, step_size=2)
    with pytest.raises(ValueError, match=r"scheduler=.* is invalid; allowed: None or an LR"):
        attach(run.model, run.opt, job="unit", endpoint=dead_endpoint, scheduler=sched)


def test_a_checkpoint_dir_that_is_a_file_is_refused(dead_endpoint, tmp_path) -> None:
    run = Run()
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(ValueError, match=r"checkpoint_dir=.* is invalid; allowed: a directory"):
        attach(run.model, run.opt, job="unit", endpoint=dead_endpoint, checkpoint_dir=path)


@pytest.mark.parametrize("reseed", [True, False])
def test_a_rollback_does_not_redraw_the_batches_that_led_to_it(dead_endpoint, reseed) -> None:
    """A loop that draws its batches from torch's RNG (as nanoGPT's does) gets other batches
    after a rollback, since the restored RNG is re-seeded (from itself and the rollback
    count: the same run rolled back the same way draws the same); with
    ``reseed_on_rollback=False`` the restore replays the very same draws."""
    def drawn(rollback_at: int | None) -> dict[int, list[list[int]]]:
        torch.manual_seed(7)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        data = torch.randn(256, 4)
        out: dict[int, list[list[int]]] = {}
        with attach(model, opt, job="reseed", endpoint=dead_endpoint, checkpoint_every=5,
                    reseed_on_rollback=reseed) as guard:
            for it in range(20):
                if it == rollback_at:
                    guard._transport._handle(wire.Command(job="reseed", seq=1, mark_stable=5,
                                                          rollback_to=5))
                idx = torch.randint(0, 256, (8,))  # the loop's own batch, from torch's RNG
                out.setdefault(guard.global_step, []).append(idx.tolist())
                loss = model(data[idx]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                guard.step(loss)
        return out

    once, again = drawn(12), drawn(12)
    assert once == again  # deterministic for a given run and rollback
    # Positions 5 and 6 were each reached twice: before the rollback at 12, and after it.
    first, second = once[6]
    assert (first != second) if reseed else (first == second)


def test_a_process_killed_while_on_rollback_runs_resumes_with_the_rollbacks_values(
        dead_endpoint, tmp_path) -> None:
    """A preemption trial killed the process the moment its on_rollback ran (a loader
    seeking for seconds is a wide window): resumed from trimtab's files, it went on with
    the values of before the rollback. on_rollback now runs last, after the restored
    checkpoint's file says the rollback's values: what a process started then loads."""
    run = Run()
    loaded: list = []

    def on_rollback(step: int) -> None:  # the process is killed here; a new one loads
        loaded.append((step, load_stable(tmp_path).guard_state))

    with _attach(run, dead_endpoint, checkpoint_every=2, checkpoint_dir=tmp_path,
                 on_rollback=on_rollback) as guard:
        for _ in range(3):
            run.step(guard)
        assert guard._store.flush(10)
        _deliver(guard, _command(1, mark_stable=2, rollback_to=2,
                                 scale=wire.ScaleTargets(lr=0.5)))
        run.step(guard)
        run.step(guard)
        ack = _last_ack(guard)
        assert ack.restored_step == 2 and ack.error is None
    (step, state), = loaded
    assert step == 2
    assert state["rollbacks"] == 1 and state["applied_seq"] == 1
    assert state["controls"]["lr_scale"] == 0.5
