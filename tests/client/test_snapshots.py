"""The CUDA snapshot path, driven on CPU: pinned buffers allocated ahead of need off the
training thread and reused, copies on a side stream that the training stream waits for
(on the device) only before the next optimizer step, a copy not finished never restored,
and a file write in progress never holding up ``step()``."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from trimtab.client import CheckpointStore, attach
from trimtab.client import _checkpoint as ckpt_mod
from trimtab.client import _host_copy as copies_mod
from trimtab.client._checkpoint_files import WRITER_THREAD

pytestmark = pytest.mark.timeout(60)


class _Event:
    """A CUDA event's stand-in: done once the fake device ran the copies before it."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def query(self) -> bool:
        if self.device.auto:  # a device that is done whenever it is asked
            self.device.run(self)
        return self in self.device.ran


class FakeDevice:
    """Routes the store's CUDA path through CPU tensors: every strided tensor is "staged"
    into a pooled buffer; a copy's data moves only when the device "runs" it: when the
    training stream is fenced on it (everything after the fence waits for it) or when the
    test says so; a copy on the training stream itself runs at once (in stream order).
    ``auto``: the device is done with a copy whenever its event is asked."""

    def __init__(self, monkeypatch, auto: bool = True) -> None:
        self.auto = auto
        self.queued: list[tuple[_Event, list]] = []
        self.ran: set[_Event] = set()
        self.fences: list[_Event] = []
        self.sides: list[bool] = []
        self.allocs: list[str] = []  # the thread of every pinned allocation
        real_empty = copies_mod._empty_host

        def empty(key):
            self.allocs.append(threading.current_thread().name)
            return real_empty(key)

        monkeypatch.setattr(copies_mod, "_staged", lambda t: t.layout == torch.strided)
        monkeypatch.setattr(copies_mod, "_empty_host", empty)
        monkeypatch.setattr(copies_mod._CopyStreams, "copy",
                            lambda streams, device, pairs: self._queue(pairs, True))
        monkeypatch.setattr(copies_mod, "_current_copy",
                            lambda device, pairs: self._queue(pairs, False))
        monkeypatch.setattr(copies_mod, "_fence", lambda device, event: self._fence(event))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize"))

    def _queue(self, pairs: list, side: bool) -> _Event:
        event = _Event(self)
        self.queued.append((event, list(pairs)))
        self.sides.append(side)
        if not side:  # on the training stream: before anything queued after it, as here
            for dst, src in pairs:
                dst.copy_(src)
            self.ran.add(event)
        return event

    def _fence(self, event: _Event) -> None:
        self.fences.append(event)
        self.run(event)

    def run(self, event: _Event | None = None) -> None:
        """The device gets to ``event`` (default: to every copy queued)."""
        for ev, pairs in self.queued:
            if ev not in self.ran:
                for dst, src in pairs:
                    dst.copy_(src)
                self.ran.add(ev)
            if ev is event:
                return


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, opt, guard=None) -> None:
    x = torch.randn(16, 4)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    if guard is None:
        opt.step()
    else:
        guard.step(loss)


def _wait_ready(store: CheckpointStore) -> None:
    deadline = time.monotonic() + 10
    while not store._pool.ready():
        assert time.monotonic() < deadline, "pinned buffers never allocated"
        time.sleep(0.01)


def test_buffers_are_allocated_off_the_training_thread_and_reused(
    monkeypatch, dead_endpoint
) -> None:
    device = FakeDevice(monkeypatch)
    model, opt = _model()
    guard = attach(model, opt, job="snap", endpoint=dead_endpoint, report_every=5,
                   checkpoint_every=5, keep=2, heartbeat_s=0.05, nonfinite="zero")
    store = guard._store
    main = threading.current_thread().name
    # The attach snapshot's buffers, before training starts; the rest in the background.
    assert device.allocs.count(main) == len(model.state_dict())
    _train(model, opt, guard)  # the optimizer state exists now: buffers for it, ahead of need
    _wait_ready(store)
    reserved = len(device.allocs)
    assert device.allocs.count(main) == len(model.state_dict())
    assert set(device.allocs) == {main, "trimtab-pinned-alloc"}
    pinned: set[int] = set()
    for _ in range(60):
        _train(model, opt, guard)
        for ckpt in store._held.values():
            pinned |= {b.data_ptr() for b in ckpt._pinned}
    assert store.deferred == 0 and len(guard.checkpoints) >= 2
    assert len(device.allocs) == reserved  # 12 snapshots later: not one more allocation
    assert len(pinned) <= reserved  # the same buffers, over and over
    assert store.host_bytes > 0
    # Parameters and optimizer state go on the side stream; BN statistics, which the next
    # forward changes in place, on the training stream.
    assert True in device.sides and False in device.sides
    guard.close()


def test_a_snapshot_waits_for_its_buffers_rather_than_stalling(monkeypatch, dead_endpoint):
    device = FakeDevice(monkeypatch)
    gate = threading.Event()
    real = copies_mod._PinnedPool._allocate
    monkeypatch.setattr(copies_mod._PinnedPool, "_allocate",
                        lambda pool: (gate.wait(10), real(pool)))
    model, opt = _model()
    guard = attach(model, opt, job="snap", endpoint=dead_endpoint, report_every=5,
                   checkpoint_every=5, keep=2, heartbeat_s=0.05, nonfinite="zero")
    for _ in range(10):
        t0 = time.perf_counter()
        _train(model, opt, guard)
        assert time.perf_counter() - t0 < 1.0
    assert guard.checkpoints == [0] and guard._store.deferred == 2  # steps 5 and 10: later
    assert "trimtab-pinned-alloc" not in device.allocs
    gate.set()
    _wait_ready(guard._store)
    for _ in range(10):
        _train(model, opt, guard)
    assert guard.checkpoints == [15, 20]  # taken again at the next window ends
    guard.close()


def test_the_copy_is_ordered_before_the_next_optimizer_step(monkeypatch, dead_endpoint):
    """The fake device runs a copy only when the training stream is fenced on it: the
    snapshot then holds exactly the state at its step, so the fence came before the next
    optimizer step changed the parameters in place."""
    device = FakeDevice(monkeypatch, auto=False)
    model, opt = _model()
    guard = attach(model, opt, job="snap", endpoint=dead_endpoint, report_every=5,
                   checkpoint_every=5, keep=3, heartbeat_s=0.05, nonfinite="zero")
    device.run()
    _train(model, opt, guard)
    _wait_ready(guard._store)
    for _ in range(4):
        _train(model, opt, guard)
    assert guard.global_step == 5
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    fences = len(device.fences)
    _train(model, opt, guard)  # fenced before its optimizer step
    assert len(device.fences) == fences + 1
    _train(model, opt, guard)  # admitted now that its copy is done
    assert guard.checkpoints == [0, 5], guard._store.deferred
    ckpt = guard._store._held[5]
    assert all(torch.equal(ckpt.model[k], v) for k, v in expected.items())
    got = [s["exp_avg"] for s in ckpt.optimizer["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(got, moments, strict=True))
    assert not ckpt._sources  # the device tensors are no longer held
    guard.close()


def test_a_copy_not_finished_is_never_restored(monkeypatch) -> None:
    device = FakeDevice(monkeypatch, auto=False)
    model, opt = _model()
    store = CheckpointStore(keep=3)
    store.take(0, model, opt, block=True)
    assert store.steps() == []  # the copy has not run
    assert not store.mark_stable(0)
    device.run()
    device.auto = True
    store.poll()
    assert store.steps() == [0] and store.mark_stable(0)
    at0 = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        _train(model, opt)
    store.prepare(model, opt)
    _wait_ready(store)
    device.auto = False
    pending = store.take(3, model, opt)
    assert pending is not None and store.steps() == [0]
    assert not store.mark_stable(3)
    assert store.restore(3, model, opt)[0] is None  # not a rollback target
    restored, note = store.restore(0, model, opt)
    assert restored.step == 0 and note is None
    # Before overwriting the live tensors, the training stream waited for that copy.
    assert pending._events[0][1] in device.fences
    assert all(torch.equal(model.state_dict()[k], v) for k, v in at0.items())
    device.auto = True
    device.run()
    store.poll()
    assert store.steps() == [0]  # the abandoned trajectory's snapshot never appears


def test_a_write_in_progress_never_blocks_step(monkeypatch, tmp_path, dead_endpoint):
    FakeDevice(monkeypatch)
    started, release = threading.Event(), threading.Event()
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        assert threading.current_thread().name == WRITER_THREAD
        started.set()
        release.wait(30)  # a disk that takes its time
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    model, opt = _model()
    guard = attach(model, opt, job="snap", endpoint=dead_endpoint, report_every=5,
                   checkpoint_every=5, keep=2, checkpoint_dir=tmp_path, heartbeat_s=0.05,
                   nonfinite="zero")
    _train(model, opt, guard)
    _wait_ready(guard._store)
    assert started.wait(10)  # the attach snapshot's write is in progress, and stays so
    slowest = 0.0
    for _ in range(40):
        t0 = time.perf_counter()
        _train(model, opt, guard)
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 1.0
    assert len([s for s in guard.checkpoints if s > 0]) == 2  # the ring moved on meanwhile
    release.set()
    assert guard._store.flush(20)
    guard.close()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))[-1] == "ckpt-000000000040.pt"


def test_a_snapshot_due_at_a_window_end_is_taken_before_the_windows_read(
    monkeypatch, dead_endpoint
) -> None:
    """The snapshot's host work is queued before the window's one read (the sync), while a
    device would still be working through the step; its step is a bound until that read:
    a skipped step that puts ``global_step`` back before the multiple of ``every`` drops it
    (its buffers back in the pool), and a later one is labelled with the exact step and
    the guard's counters. Before it is labelled it is never listed or marked."""
    device = FakeDevice(monkeypatch)
    model, opt = _model()
    guard = attach(model, opt, job="snap", endpoint=dead_endpoint, report_every=5,
                   checkpoint_every=5, keep=3, heartbeat_s=0.05, nonfinite="zero")
    store = guard._store
    order: list[str] = []
    real_take, real_collect = store.take, guard._probe.collect

    def take(step, *args, **kwargs):
        order.append(f"take {step}")
        ckpt = real_take(step, *args, **kwargs)
        assert store.steps() == [0] and not store.mark_stable(step)  # not in the ring yet
        return ckpt

    def collect():
        order.append("read")
        return real_collect()

    monkeypatch.setattr(store, "take", take)
    monkeypatch.setattr(guard._probe, "collect", collect)
    _train(model, opt, guard)
    _wait_ready(store)
    free = sum(len(v) for v in store._pool._free.values())

    def train(nan: bool) -> None:
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if nan:
            next(model.parameters()).grad[0, 0] = float("nan")
        guard.step(loss)

    for i in range(2, 6):  # step 3 skipped: the window ends at global_step 4
        train(nan=i == 3)
    assert order == ["take 5", "read"] and guard.global_step == 4
    assert guard.checkpoints == [0] and not store._pending
    assert sum(len(v) for v in store._pool._free.values()) == free  # its buffers are back
    for i in range(6, 11):  # step 7 skipped: taken at most at 9, labelled 8 after the read
        train(nan=i == 7)
    assert order[2:] == ["take 9", "read"] and guard.global_step == 8
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    device.run()
    _train(model, opt, guard)  # admitted at the next step boundary
    assert guard.checkpoints == [0, 8]
    ckpt = store._held[8]
    assert ckpt.step == 8 and ckpt.counters == {"calls": 10}
    assert all(torch.equal(ckpt.model[k], v) for k, v in expected.items())
    guard.close()


def test_memory_keep_keeps_older_snapshots_on_disk_only(monkeypatch, tmp_path) -> None:
    FakeDevice(monkeypatch)
    model, opt = _model()
    with pytest.raises(ValueError, match="memory_keep=1 is invalid"):
        CheckpointStore(keep=3, memory_keep=1)
    store = CheckpointStore(keep=3, directory=tmp_path, memory_keep=1)
    for step in range(0, 40, 10):
        store.take(step, model, opt, block=True)
        assert store.flush(10)
        store.poll()
        _train(model, opt)
    assert store.steps() == [10, 20, 30] and sorted(store._held) == [30]
    assert store.mark_stable(20)
    restored, note = store.restore(20, model, opt)  # read from its file
    assert restored.step == 20 and note is None
    store.close()


@pytest.mark.parametrize("foreach", [True, False])
def test_the_copies_of_a_snapshot_are_queued_in_one_call_or_one_each(monkeypatch, foreach):
    """The snapshot step queues all its copies with torch's ``_foreach_copy_`` (one Python
    call for hundreds of tensors); a torch without it copies pair by pair. Either way
    every destination holds its source, dtypes and shapes mixed."""
    if not foreach:
        monkeypatch.delattr(torch, "_foreach_copy_", raising=False)
    srcs = [torch.randn(3), torch.randn(2, 5).to(torch.bfloat16), torch.arange(4)]
    dsts = [torch.empty_like(s) for s in srcs]
    copies_mod._copy_all(list(zip(dsts, srcs, strict=True)))
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs, strict=True))


class _Tied(torch.nn.Module):
    """Tied weights, a batch-norm buffer and an extra state that is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.note = {"seen": [1, 2]}

    def get_extra_state(self):
        return self.note

    def set_extra_state(self, state) -> None:
        self.note = state

    def forward(self, idx):
        return self.head(self.bn(self.emb(idx)))


def _tied_run():
    torch.manual_seed(0)
    model = _Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _tied_step(model, opt) -> None:
    idx = torch.randint(0, 6, (8,))
    loss = model(idx).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _same_tree(a, b) -> None:
    """Equal containers, keys, types and values (tensors by value)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        for k in a:
            _same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_tree(x, y)
    else:
        assert a == b


def test_the_copy_plan_is_reused_and_matches_the_walk(monkeypatch) -> None:
    """The cached plan gives the walk's snapshot exactly: same containers, _metadata, tied
    weights copied once (one buffer for both names), BN buffers on the training stream,
    the rest on the side stream, non-tensor values copied, not shared."""
    device = FakeDevice(monkeypatch)
    model, opt = _tied_run()
    _tied_step(model, opt)
    opt.state[model.emb.weight]["note"] = [3]  # a non-tensor entry in the optimizer's state
    store = CheckpointStore(keep=3)
    first = store.take(1, model, opt, block=True)
    plan = store._plan
    assert plan is not None
    second = store.take(2, model, opt, block=True)
    assert store._plan is plan  # nothing changed: not worked out again
    assert second.model["emb.weight"] is second.model["head.weight"]  # tied: copied once
    queued = [pairs for _, pairs in device.queued[-2:]]
    assert sum(len(p) for p in queued) == len(second._pinned)
    sides = dict(zip(device.sides[-2:], queued, strict=True))
    bn = {model.bn.running_mean.data_ptr(), model.bn.running_var.data_ptr(),
          model.bn.num_batches_tracked.data_ptr()}
    assert {src.data_ptr() for _, src in sides[False]} == bn
    assert not bn & {src.data_ptr() for _, src in sides[True]}
    walked_store = CheckpointStore(keep=3)
    monkeypatch.setattr(ckpt_mod, "flatten", lambda *a: None)
    walked = walked_store.take(2, model, opt, block=True)
    assert walked_store._plan is None
    _same_tree(second.model, walked.model)
    _same_tree(second.optimizer, walked.optimizer)
    model.note["seen"].append(9)
    opt.state[model.emb.weight]["note"].append(4)
    assert first.model["_extra_state"] == {"seen": [1, 2]}
    assert second.optimizer["state"][0]["note"] == [3]


def test_the_copy_plan_is_worked_out_again_when_the_state_changes(monkeypatch) -> None:
    """A rollback (new optimizer state tensors), a param group added, a parameter's data
    swapped: the next snapshot works the plan out again and holds exactly the live state."""
    FakeDevice(monkeypatch)
    model, opt = _tied_run()
    _tied_step(model, opt)
    store = CheckpointStore(keep=3)
    store.take(1, model, opt, block=True)
    assert store.mark_stable(1)

    def check(step: int) -> None:
        plan = store._plan
        ckpt = store.take(step, model, opt, block=True)
        assert store._plan is not plan, "the plan was not worked out again"
        _same_tree(ckpt.model, model.state_dict())
        _same_tree(ckpt.optimizer["state"], opt.state_dict()["state"])

    _tied_step(model, opt)
    store.restore(1, model, opt)  # load_state_dict: the optimizer's state is new tensors
    check(2)
    extra = torch.nn.Parameter(torch.randn(3))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    opt.step()
    check(3)
    with torch.no_grad():
        model.bn.running_mean.data = torch.full((4,), 7.0)  # same tensor object, new data
    check(4)
    assert torch.equal(store._held[4].model["bn.running_mean"], torch.full((4,), 7.0))


def test_the_windows_rows_are_read_from_their_staged_copy(monkeypatch) -> None:
    """On CUDA, ``Probe.stage`` queues the rows' copy to pinned memory ahead of a
    snapshot's copies and ``collect`` waits for that copy's event only, then reads the
    host copy; a row written after staging makes the stage stale, and the device's rows
    are read as before. (CPU stand-ins for the pinned rows and the event.)"""
    from trimtab.client._probe import Probe

    waited: list[bool] = []

    class Event:
        def record(self, stream=None) -> None:
            pass

        def synchronize(self) -> None:
            waited.append(True)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    p = torch.nn.Parameter(torch.ones(3))
    probe = Probe(torch.optim.SGD([p], lr=0.1), report_every=4, device=p.device)
    probe._host_rows = torch.full_like(probe.buf, float("nan"))  # as if pinned, on CUDA

    def write(loss: float) -> None:
        p.grad = torch.full((3,), 2.0)
        probe.measure(torch.tensor(loss), probe.grads())
        probe.advance()

    for loss in (1.0, 2.0):
        write(loss)
    probe.stage()
    probe.buf[:2, 0] = 99.0  # what the device does after the staged copy: not read
    stats = probe.collect()
    assert waited == [True] and stats.steps == 2 and stats.loss_mean == 1.5
    write(3.0)
    probe.stage()
    write(5.0)  # a row after the stage: the staged copy is not the window's
    stats = probe.collect()
    assert waited == [True] and stats.steps == 2 and stats.loss_mean == 4.0
