"""The loop's own stateful objects (``attach(..., extra_state={name: obj})``) are snapshotted
with every checkpoint and rolled back with the model: an SWA average
(``torch.optim.swa_utils.AveragedModel``) and its ``SWALR`` schedule, and an object of the
loop's own whose ``load_state_dict`` adopts what it is given. Real (small) CPU training,
commands from a real ZeroMQ ROUTER on 127.0.0.1, real checkpoint files.

Two user trials found the defect: after a rollback the model had recovered and timm's
``ModelEmaV3`` (val 2.41 against 0.611), or an ``AveragedModel`` (2.25e9), still held the
diverged trajectory's average."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import SWALR, AveragedModel

from trimtab.client import Checkpoint, attach, load_stable
from trimtab.protocol import wire

from .conftest import count_host_reads

pytestmark = pytest.mark.timeout(60)

JOB = "extra-test"


class Tally:
    """A stateful object of the loop's own, neither a module nor a scheduler: its state is a
    tensor it grows in place and a list it appends to, and its ``load_state_dict`` adopts
    what it is given (as many hand-written ones do)."""

    def __init__(self) -> None:
        self.total = torch.zeros(3)
        self.seen: list[int] = []

    def update(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()  # in place: into whatever tensor it holds
        self.seen.append(len(self.seen))

    def state_dict(self) -> dict:
        return {"total": self.total, "seen": self.seen}

    def load_state_dict(self, sd: dict) -> None:
        self.total = sd["total"]
        self.seen = sd["seen"]


class Brittle:
    """An object whose state cannot be put back: its ``load_state_dict`` raises."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        raise RuntimeError("cannot go back")


class Run:
    """SGD on a small regression with SWA beside it: after each ``guard.step`` the loop
    averages the weights in and steps ``SWALR``, as torch's SWA recipe does. ``at[step]``
    is every object's state right after the ``guard.step`` that first reached ``step``
    (what that step's snapshot holds); ``restored`` the same right after each rollback."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.swa = AveragedModel(self.model)
        self.swa_sched = SWALR(self.opt, swa_lr=0.01, anneal_epochs=20)
        self.tally = Tally()
        self.at: dict[int, dict] = {}
        self.restored: list[tuple[int, dict]] = []

    @property
    def extra(self) -> dict:
        return {"swa": self.swa, "swa_sched": self.swa_sched, "tally": self.tally}

    def state(self) -> dict:
        return {
            "model": [p.detach().clone() for p in self.model.parameters()],
            "swa": {k: v.detach().clone() for k, v in self.swa.state_dict().items()},
            "swa_sched": copy.deepcopy(self.swa_sched.state_dict()),
            "tally": {"total": self.tally.total.clone(), "seen": list(self.tally.seen)},
        }

    def step(self, guard) -> None:
        x = torch.randn(8, 5)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        rollbacks = guard.rollbacks
        guard.step(loss)
        if guard.rollbacks != rollbacks:
            self.restored.append((guard.global_step, self.state()))
        self.at.setdefault(guard.global_step, self.state())
        # The loop's own work after the step: averaging, its schedule, its tally.
        self.swa.update_parameters(self.model)
        self.swa_sched.step()
        self.tally.update(loss)


def _same(a: dict, b: dict, names=("model", "swa", "swa_sched", "tally")) -> bool:
    def eq(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k])
                                                                        for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(map(eq, x, y))
        return x == y

    return all(eq(a[n], b[n]) for n in names)


def _attach(run: Run, endpoint: str, **kw):
    kw.setdefault("heartbeat_s", 0.05)
    kw.setdefault("report_every", 5)
    kw.setdefault("extra_state", run.extra)
    return attach(run.model, run.opt, job=JOB, endpoint=endpoint, **kw)


def _command(seq: int, **kw) -> wire.Command:
    return wire.Command(job=JOB, seq=seq, **kw)




def _ack(controller, seq: int, step) -> wire.Ack:
    """The ack of command ``seq`` (it goes out with the first step that runs with it)."""
    controller.wait_for(lambda c: any(a.seq == seq for a in c.of_type(wire.Ack)),
                        while_waiting=step)
    return next(a for a in controller.of_type(wire.Ack) if a.seq == seq)


def test_a_rollback_restores_the_swa_average_its_schedule_and_the_loops_own_state(
        fake_controller) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint, checkpoint_every=5, keep=2) as guard:

        def train() -> None:
            run.step(guard)

        for _ in range(7):
            train()
        fake_controller.mark_stable(guard, 5, seq=1, train=train)
        for _ in range(3):
            train()
        moved = run.state()
        assert guard.global_step > 5
        for name in ("swa", "swa_sched", "tally"):  # each moved on past the checkpoint
            assert not _same(moved, run.at[5], names=[name]), name
        fake_controller.send_until(_command(2, rollback_to=5),
                                   lambda c: guard.rollbacks == 1, train)

        # Right after the rollback every object is as it was when step 5 was first reached,
        # with the model.
        step, state = run.restored[0]
        assert step == 5
        assert _same(state, run.at[5])
        assert int(state["swa"]["n_averaged"]) == 4  # averaged in after steps 1-4
        assert state["swa_sched"]["last_epoch"] == 4
        ack = _ack(fake_controller, 2, train)
        assert (ack.restored_step, ack.error) == (5, None)

        # Training goes on from there, writing into the objects (the tally into the very
        # tensor its load_state_dict adopted), and a second rollback to the same checkpoint
        # finds it intact.
        for _ in range(4):
            train()
        assert guard.global_step > 5 and not _same(run.state(), run.at[5])
        fake_controller.send_until(_command(3, rollback_to=5),
                                   lambda c: guard.rollbacks == 2, train)
        step, state = run.restored[1]
        assert step == 5 and _same(state, run.at[5])
        assert _ack(fake_controller, 3, train).error is None


def test_files_carry_the_extra_state_to_a_rollback_and_to_load_stable(fake_controller,
                                                                      tmp_path) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint, checkpoint_every=4, keep=3, memory_keep=1,
                 checkpoint_dir=tmp_path) as guard:

        def train() -> None:
            run.step(guard)

        for _ in range(5):
            train()
        fake_controller.mark_stable(guard, 4, seq=1, train=train)
        # Once newer ones are written, step 4 is held on disk only.
        fake_controller.wait_for(lambda c: 4 not in guard._store._held and guard.global_step
                                 >= 12, while_waiting=train)
        fake_controller.send_until(_command(2, rollback_to=4),
                                   lambda c: guard.rollbacks == 1, train)
        step, state = run.restored[0]
        assert step == 4 and _same(state, run.at[4])
        assert _ack(fake_controller, 2, train).error is None
        for _ in range(3):
            train()
    # A new process: fresh objects, loaded from the newest stable file.
    fresh = Run(seed=1)
    assert not _same(fresh.state(), run.at[4], names=["swa", "tally"])
    ckpt = load_stable(tmp_path)
    assert ckpt.step == 4 and sorted(ckpt.extra) == ["swa", "swa_sched", "tally"]
    ckpt.restore(fresh.model, fresh.opt, extra_state=fresh.extra)
    assert _same(fresh.state(), run.at[4])


def test_a_checkpoint_without_a_name_restores_the_others_and_says_what_it_lacked(
        fake_controller, tmp_path, caplog) -> None:
    run = Run()
    # Written by a run that kept only its SWA average with its checkpoints.
    with _attach(run, fake_controller.endpoint, checkpoint_every=4, checkpoint_dir=tmp_path,
                 extra_state={"swa": run.swa}) as guard:
        for _ in range(5):
            run.step(guard)
        fake_controller.mark_stable(guard, 4, seq=1, train=lambda: run.step(guard))
    fresh = Run(seed=1)
    before = fresh.state()
    ckpt = load_stable(tmp_path)
    assert ckpt.step == 4
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        ckpt.restore(fresh.model, fresh.opt, extra_state=fresh.extra)
    after = fresh.state()
    assert _same(after, run.at[4], names=["model", "swa"])
    assert _same(after, before, names=["swa_sched", "tally"])  # left as they were
    lacked = [r.getMessage() for r in caplog.records if "extra state" in r.getMessage()]
    assert len(lacked) == 1
    assert "step 4" in lacked[0] and "'swa_sched'" in lacked[0] and "'tally'" in lacked[0]
    assert "'swa'" not in lacked[0].replace("'swa_sched'", "")

    # A file from a run without any extra state (or from before the field): the same.
    payload = ckpt.payload()
    del payload["extra"]
    old = Checkpoint.from_payload(payload)
    caplog.clear()
    other = Run(seed=2)
    untouched = other.state()
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        old.restore(other.model, other.opt, extra_state=other.extra)
    assert _same(other.state(), run.at[4], names=["model"])
    assert _same(other.state(), untouched, names=["swa", "swa_sched", "tally"])
    lacked = [r.getMessage() for r in caplog.records if "extra state" in r.getMessage()]
    assert len(lacked) == 1 and all(f"'{n}'" in lacked[0] for n in other.extra)


def test_a_load_state_dict_that_raises_is_reported_in_the_ack_and_the_rest_restored(
        fake_controller) -> None:
    run = Run()
    brittle = Brittle()
    extra = {"brittle": brittle, **run.extra}  # first: the others are restored after it
    with _attach(run, fake_controller.endpoint, checkpoint_every=5,
                 extra_state=extra) as guard:

        def train() -> None:
            run.step(guard)
            brittle.n += 1

        for _ in range(6):
            train()
        fake_controller.mark_stable(guard, 5, seq=1, train=train)
        train()
        fake_controller.send_until(_command(2, rollback_to=5),
                                   lambda c: guard.rollbacks == 1, train)
        step, state = run.restored[0]
        assert step == 5 and _same(state, run.at[5])
        assert guard.global_step == 5 and guard.rollbacks == 1
        ack = _ack(fake_controller, 2, train)
        assert ack.restored_step == 5
        assert ack.error is not None
        assert "extra_state['brittle']" in ack.error
        assert "RuntimeError: cannot go back" in ack.error


class _NoLoad:
    def state_dict(self) -> dict:
        return {}


class _NotCallable:
    state_dict = {}
    load_state_dict = None


class _Raises:
    def state_dict(self) -> dict:
        raise RuntimeError("not ready")

    def load_state_dict(self, sd) -> None:
        pass


class _NotADict:
    def state_dict(self):
        return [1, 2]

    def load_state_dict(self, sd) -> None:
        pass


class _NumpyState:
    def state_dict(self) -> dict:
        return {"best": np.float64(0.5)}

    def load_state_dict(self, sd) -> None:
        pass


_OBJECT = "an object with callable state_dict\\(\\) and load_state_dict\\(state_dict\\)"


@pytest.mark.parametrize(("make", "match"), [
    (lambda r: [r.swa], r"extra_state=<list> is invalid; allowed: None or a dict "
                        r"of name \(str\) -> " + _OBJECT),
    (lambda r: {1: r.swa}, r"extra_state name=1 is invalid; allowed: a non-empty str"),
    (lambda r: {"": r.swa}, r"extra_state name='' is invalid; allowed: a non-empty str"),
    (lambda r: {"x": object()}, r"extra_state\['x'\]=<object object at .*> is invalid; "
                                r"allowed: " + _OBJECT),
    (lambda r: {"x": _NoLoad()}, r"extra_state\['x'\]=.*_NoLoad.* is invalid; allowed: "
                                 + _OBJECT),
    (lambda r: {"x": _NotCallable()}, r"extra_state\['x'\]=.* is invalid; allowed: " + _OBJECT),
    (lambda r: {"a": r.swa, "b": r.swa}, r"extra_state\['b'\]=<AveragedModel> is invalid; "
                                         r"allowed: an object not given already \(as "
                                         r"extra_state\['a'\]\)"),
    (lambda r: {"m": r.model}, r"extra_state\['m'\]=<Sequential> is invalid; allowed: an "
                               r"object not given already \(as the model: it is restored "
                               r"anyway\)"),
    (lambda r: {"o": r.opt}, r"extra_state\['o'\]=<SGD> is invalid; allowed: an object not "
                             r"given already \(as the optimizer"),
    (lambda r: {"x": _Raises()}, r"extra_state\['x'\]=.*_Raises.* is invalid; allowed: an "
                                 r"object whose state_dict\(\) returns a dict \(it raised "
                                 r"RuntimeError: not ready\)"),
    (lambda r: {"x": _NotADict()}, r"extra_state\['x'\]=.*_NotADict.* is invalid; allowed: an "
                                   r"object whose state_dict\(\) returns a dict \(it returned "
                                   r"a list\)"),
], ids=["not-a-dict", "int-name", "empty-name", "plain-object", "no-load", "not-callable",
        "twice", "the-model", "the-optimizer", "state-dict-raises", "state-not-a-dict"])
def test_attach_refuses_extra_state_it_cannot_keep(make, match, dead_endpoint) -> None:
    run = Run()
    with pytest.raises(ValueError, match=match):
        _attach(run, dead_endpoint, extra_state=make(run))


def test_attach_refuses_the_scheduler_twice_and_state_a_file_cannot_hold(dead_endpoint,
                                                                         tmp_path) -> None:
    run = Run()
    sched = torch.optim.lr_scheduler.StepLR(run.opt, step_size=3)
    with pytest.raises(ValueError, match=r"extra_state\['s'\]=<torch.optim.lr_scheduler.StepLR"
                                         r".* is invalid; allowed: an object not given already "
                                         r"\(as the scheduler: it is restored anyway\)"):
        _attach(run, dead_endpoint, scheduler=sched, extra_state={"s": sched})
    # In memory any state goes; a checkpoint file loads with weights_only=True only.
    with _attach(run, dead_endpoint, extra_state={"best": _NumpyState()}) as guard:
        assert guard.checkpoints == [0]
    with pytest.raises(ValueError, match=r"extra_state\['best'\]=.*_NumpyState.* is invalid; "
                                         r"allowed: with checkpoint_dir, an object whose "
                                         r"state_dict\(\) holds only containers, numbers, "
                                         r"strings and tensors"):
        _attach(run, dead_endpoint, checkpoint_dir=tmp_path,
                extra_state={"best": _NumpyState()})


def test_extra_state_reads_nothing_from_the_device(dead_endpoint, monkeypatch) -> None:
    """With extra state on a sync-free path a step reads what it reads without: nothing but
    the window's one copy at its end (a snapshot step no more)."""
    reads = count_host_reads(monkeypatch)
    run = Run()
    run.opt = torch.optim.SGD(run.model.parameters(), lr=0.05, momentum=0.9, fused=True)
    run.swa_sched = SWALR(run.opt, swa_lr=0.01, anneal_epochs=20)
    per_step = []
    with _attach(run, dead_endpoint, report_every=4, checkpoint_every=4) as guard:
        for _ in range(12):
            x = torch.randn(8, 5)
            loss = (run.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            run.opt.zero_grad()
            loss.backward()
            reads.clear()
            guard.step(loss)
            per_step.append(dict(reads))
            run.swa.update_parameters(run.model)
            run.swa_sched.step()
            run.tally.update(loss)
        monkeypatch.undo()
        assert guard.checkpoints == [4, 8, 12]
    for step, got in enumerate(per_step):
        assert got == ({"tolist": 1} if step % 4 == 3 else {}), f"step {step}: {got}"


def test_on_the_cuda_path_extra_state_is_copied_in_stream_order(monkeypatch,
                                                                dead_endpoint) -> None:
    """The CUDA snapshot path driven on CPU (test_snapshots' fake device runs a side-stream
    copy only when the training stream is fenced on it). The loop changes its objects right
    after ``guard.step``, before the next optimizer step's fence: their copies must be
    ordered before that (on the training stream), so the snapshot holds them exactly as at
    its step; their pinned buffers are reserved ahead of need with the model's."""
    from trimtab.client._host_copy import staged_layout

    from .test_snapshots import FakeDevice, _wait_ready

    device = FakeDevice(monkeypatch, auto=False)
    run = Run()
    guard = _attach(run, dead_endpoint, checkpoint_every=5, keep=3, nonfinite="zero")
    device.run()
    run.step(guard)
    _wait_ready(guard._store)
    layout = staged_layout(run.model.state_dict(), run.opt.state_dict()["state"],
                           {n: o.state_dict() for n, o in run.extra.items()})
    want, copies = guard._store._pool._want, guard._store._copies
    assert all(want[k] >= n * copies for k, n in layout.items())
    for _ in range(6):
        run.step(guard)
    assert guard.checkpoints == [0, 5] and guard._store.deferred == 0
    held = guard._store._held[5].extra
    expected = run.at[5]
    assert torch.equal(held["tally"]["total"], expected["tally"]["total"])
    assert held["tally"]["seen"] == expected["tally"]["seen"]
    assert held["swa"].keys() == expected["swa"].keys()
    assert all(torch.equal(held["swa"][k], v) for k, v in expected["swa"].items())
    assert held["swa_sched"] == expected["swa_sched"]
    guard.close()
