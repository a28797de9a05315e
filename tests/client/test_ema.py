"""Weight averaging (``attach(..., ema=decay)``) on real CPU training: the average's values,
skipped steps left out on every non-finite path, no host reads, snapshots, files, rollbacks
ordered through a real ROUTER, and the EMA validation on the wire."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trimtab.client import Guard, attach, load_stable
from trimtab.client._checkpoint import Checkpoint, capture_rng
from trimtab.protocol import wire

from .conftest import count_host_reads

pytestmark = pytest.mark.timeout(60)

JOB = "ema-test"


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # A batch-norm layer: its running statistics are averaged too (use_buffers=True).
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7),
                               torch.nn.ReLU(), torch.nn.Linear(7, 1))


def _attach(model, opt, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    kw.setdefault("report_every", 5)
    return attach(model, opt, job=JOB, endpoint=endpoint, **kw)


def _step(model, opt, guard: Guard, poison: bool = False) -> None:
    x = torch.randn(16, 5)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    if poison:
        model[0].weight.grad[0, 0] = float("nan")
    guard.step(loss)


def _live(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's floating tensors in the average's order (parameters, then buffers)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return [t.detach().clone() for t in tensors if t.is_floating_point()]


def _averaged(guard: Guard) -> list[torch.Tensor]:
    return _live(guard.ema_model.module)


def _ema_state(guard: Guard) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in guard.ema_model.state_dict().items()}


def _command(seq: int, **kw) -> wire.Command:
    return wire.Command(job=JOB, seq=seq, **kw)


def _deliver(guard: Guard, command: wire.Command) -> None:
    """Hand a command to the guard as its transport thread does on receiving it."""
    guard._transport._handle(command)


def test_the_average_follows_the_weights_with_the_stated_decay(dead_endpoint) -> None:
    decay = 0.8
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen: list[list[torch.Tensor]] = []  # the model's tensors after each step
    with _attach(model, opt, dead_endpoint, ema=decay, checkpoint_every=0) as guard:
        assert isinstance(guard.ema_model, AveragedModel)
        for _ in range(12):
            _step(model, opt, guard)
            seen.append(_live(model))
        got = _averaged(guard)
        assert int(guard.ema_model.n_averaged) == guard.global_step == 12
    # The closed form: the first step taken is copied, each later one weighs 1 - decay.
    n = len(seen)
    for i, value in enumerate(got):
        expected = decay ** (n - 1) * seen[0][i] + sum(
            (1 - decay) * decay ** (n - 1 - t) * seen[t][i] for t in range(1, n))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # torch's own EMA rule over the same trajectory gives the same average.
    ref = [t.clone() for t in seen[0]]
    for later in seen[1:]:
        get_ema_multi_avg_fn(decay)(ref, later, None)
    for value, expected in zip(got, ref, strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # It is an average, not a copy: the weights and the batch-norm statistics differ (all but
    # the bias before the batch norm, which gets no gradient and never moves).
    differ = [not torch.allclose(a, b) for a, b in zip(got, seen[-1], strict=True)]
    assert differ == [True, False] + [True] * (len(got) - 2)


def _fused_sgd(ps):
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True)


@pytest.mark.parametrize(("make", "nonfinite", "mode"), [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), "auto", "skip"),
    (_fused_sgd, "auto", "fused"),
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), "zero", "zero"),
])
def test_a_skipped_step_is_not_averaged_in(make, nonfinite, mode, dead_endpoint) -> None:
    model = _model()
    opt = make(model.parameters())
    with _attach(model, opt, dead_endpoint, ema=0.9, nonfinite=nonfinite,
                 checkpoint_every=0) as guard:
        assert guard.nonfinite_mode == mode
        for _ in range(3):
            _step(model, opt, guard)
        before, raw_before = _ema_state(guard), _live(model)
        _step(model, opt, guard, poison=True)
        after = _ema_state(guard)
        # Not averaged in: the average and its count as they were (with "zero" the weights
        # still move, by momentum, and the average ignores that move too); the batch norm's
        # forward counter, copied rather than averaged, stays as of the last step taken too.
        assert all(torch.equal(before[k], after[k]) for k in before), mode
        assert int(after["module.1.num_batches_tracked"]) == 3
        assert int(model[1].num_batches_tracked) == 4
        if mode == "zero":
            assert not all(torch.equal(a, b) for a, b in zip(raw_before, _live(model),
                                                               strict=True))
        for _ in range(2):
            _step(model, opt, guard)
        assert not torch.equal(before["module.0.weight"], _ema_state(guard)["module.0.weight"])
        assert guard.skipped_steps == 1
        assert int(guard.ema_model.n_averaged) == guard.global_step == 5



@pytest.mark.parametrize(("make", "nonfinite"), [
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), "auto"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), "zero"),
], ids=["fused", "zero"])
def test_averaging_reads_nothing_from_the_device(make, nonfinite, dead_endpoint,
                                                 monkeypatch) -> None:
    """With the average on, a step reads what it reads without it: nothing, but the
    window's one copy at its end (and a snapshot step nothing more)."""
    reads = count_host_reads(monkeypatch)
    model = _model()
    opt = make(model.parameters())
    per_step = []
    with _attach(model, opt, dead_endpoint, ema=0.99, nonfinite=nonfinite, report_every=4,
                 checkpoint_every=4) as guard:
        for _ in range(12):
            x = torch.randn(16, 5)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            reads.clear()
            guard.step(loss)
            per_step.append(dict(reads))
        monkeypatch.undo()
        assert int(guard.ema_model.n_averaged) == 12 and guard.checkpoints == [4, 8, 12]
    for step, got in enumerate(per_step):
        assert got == ({"tolist": 1} if step % 4 == 3 else {}), f"step {step}: {got}"


def test_with_hooks_the_optimizers_own_step_is_averaged_in(dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _attach(model, opt, dead_endpoint, ema=0.5, hooks=True, checkpoint_every=0) as guard:
        for _ in range(3):
            x = torch.randn(16, 5)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            guard.observe_loss(loss)
            opt.step()
        assert int(guard.ema_model.n_averaged) == 3
        assert not torch.equal(guard.ema_model.module[0].weight, model[0].weight)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), True, "0.999"])
def test_ema_option_is_checked(bad, dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"ema=.* is invalid; allowed: None \(no weight "
                                         r"averaging\) or a decay strictly between 0 and 1"):
        _attach(model, opt, dead_endpoint, ema=bad)


def test_without_ema_there_is_no_average_and_a_bad_ema_validation_is_refused(
        dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _attach(model, opt, dead_endpoint, checkpoint_every=0) as guard:
        assert guard.ema_model is None
        with pytest.raises(ValueError, match=r"ema=tensor\(1\.\) is invalid; allowed: None or "
                                             r"a Python int or float"):
            guard.report_validation(1.0, ema=torch.tensor(1.0))


def test_the_ema_validation_goes_out_beside_the_raw_one(fake_controller) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _attach(model, opt, fake_controller.endpoint, ema=0.9, checkpoint_every=0) as guard:
        for _ in range(3):
            _step(model, opt, guard)
        guard.report_validation(0.5, ema=0.25)
        for _ in range(5):
            _step(model, opt, guard)
        guard.report_validation(0.4, ema=float("nan"))  # only the raw one goes
        for _ in range(5):
            _step(model, opt, guard)
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 3,
                                 while_waiting=lambda: _step(model, opt, guard))
    first, second, third = fake_controller.of_type(wire.Report)[:3]
    assert (first.validation, first.validation_ema, first.validation_step) == (0.5, 0.25, 3)
    assert (second.validation, second.validation_ema) == (0.4, None)
    assert (third.validation, third.validation_ema) == (None, None)


@pytest.mark.parametrize("field", ["validation_ema", "update_alignment"])
def test_a_report_without_a_field_added_in_v2_has_no_such_field_on_the_wire(field) -> None:
    """A peer from before the field (which refuses unknown fields) still takes the report:
    the EMA's validation, and the update alignment (none in a report whose window had no
    earlier update to line up with, or from a client that does not measure it)."""
    report = wire.Report(job=JOB, seq=1, step=10, window=10, knobs=wire.Knobs(lr=0.1),
                         validation=1.0, validation_step=10)
    assert field not in json.loads(wire.encode(report))
    assert wire.decode(wire.encode(report)) == report
    with_it = report.model_copy(update={field: 0.75})
    assert json.loads(wire.encode(with_it))[field] == 0.75
    assert getattr(wire.decode(wire.encode(with_it)), field) == 0.75
    with pytest.raises(wire.WireError, match=field):
        wire.decode(wire.encode(report)[:-1] + f', "{field}": "x"}}'.encode())


def test_rollback_ordered_by_a_router_restores_the_average(fake_controller) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    at: dict[int, dict[str, torch.Tensor]] = {}  # the average when each step was first reached
    with _attach(model, opt, fake_controller.endpoint, ema=0.9, checkpoint_every=5,
                 keep=2) as guard:

        def train() -> None:
            _step(model, opt, guard)
            at.setdefault(guard.global_step, _ema_state(guard))

        for _ in range(12):
            train()
        fake_controller.wait_for(lambda c: any(5 in r.checkpoints
                                               for r in c.of_type(wire.Report)))
        fake_controller.send_until(_command(1, mark_stable=5),
                                   lambda c: guard.stable_step == 5, train)
        assert guard.global_step > 5
        assert not torch.equal(_ema_state(guard)["module.0.weight"], at[5]["module.0.weight"])
        fake_controller.send_until(_command(2, rollback_to=5),
                                   lambda c: guard.rollbacks == 1, train)

        # Back at step 5: the average (weights, batch-norm statistics, count) as it was there.
        assert guard.global_step == 5
        restored = _ema_state(guard)
        assert restored.keys() == at[5].keys()
        assert all(torch.equal(restored[k], at[5][k]) for k in restored)
        assert int(restored["n_averaged"]) == 5
        # Averaging goes on from there, and its validation reaches the controller.
        train()
        assert int(guard.ema_model.n_averaged) == 6
        guard.report_validation(1.5, ema=1.25)
        fake_controller.wait_for(
            lambda c: any(r.validation_ema == 1.25 for r in c.of_type(wire.Report)),
            while_waiting=train)
    report = next(r for r in fake_controller.of_type(wire.Report) if r.validation_ema == 1.25)
    assert (report.validation, report.validation_step, report.applied_seq) == (1.5, 6, 2)


def test_files_hold_the_average_and_a_resume_restores_it(dead_endpoint, tmp_path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with _attach(model, opt, dead_endpoint, ema=0.9, checkpoint_every=4,
                 checkpoint_dir=tmp_path) as guard:
        at: dict[int, dict[str, torch.Tensor]] = {}
        for _ in range(9):
            _step(model, opt, guard)
            at.setdefault(guard.global_step, _ema_state(guard))
        _deliver(guard, _command(1, mark_stable=8))
        _step(model, opt, guard)
        assert guard.stable_step == 8
    # A new process: model, optimizer and a guard with an average of its own, then the resume.
    model2 = _model(seed=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    with _attach(model2, opt2, dead_endpoint, ema=0.9, checkpoint_every=0) as guard2:
        assert not torch.equal(guard2.ema_model.module[0].weight, at[8]["module.0.weight"])
        ckpt = load_stable(tmp_path)
        assert ckpt.step == 8
        ckpt.restore(model2, opt2, ema=guard2.ema_model)
        restored = _ema_state(guard2)
        assert all(torch.equal(restored[k], at[8][k]) for k in at[8])
        _step(model2, opt2, guard2)
        assert int(guard2.ema_model.n_averaged) == 9  # it goes on from the checkpoint's count


def test_a_checkpoint_without_an_average_restarts_it() -> None:
    """A file written before weight averaging (or by a run without it): the average starts
    again from the restored weights at the next step taken."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ckpt = Checkpoint(step=3, model=copy.deepcopy(model.state_dict()),
                      optimizer=copy.deepcopy(opt.state_dict()), scheduler=None,
                      rng=capture_rng())
    payload = ckpt.payload()
    del payload["ema"]  # as in a file from before the field
    old = Checkpoint.from_payload(payload)
    assert old.ema is None
    average = AveragedModel(model, use_buffers=True)
    average.n_averaged.fill_(7)
    old.restore(model, opt, ema=average)
    assert int(average.n_averaged) == 0
    assert math.isfinite(float(average.module[0].weight.detach().sum()))


def test_on_the_cuda_path_the_average_is_copied_ahead_of_its_next_update(monkeypatch,
                                                                        dead_endpoint) -> None:
    """The CUDA snapshot path driven on CPU (test_snapshots' fake device runs a side-stream
    copy only when the training stream is fenced on it): the snapshot holds the average
    exactly as it was at its step, so its copy was ordered before the next update, and
    its pinned buffers are reserved ahead of need with the rest's."""
    from trimtab.client._host_copy import staged_layout

    from .test_snapshots import FakeDevice, _wait_ready

    device = FakeDevice(monkeypatch, auto=False)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = _attach(model, opt, dead_endpoint, ema=0.9, checkpoint_every=5, keep=3,
                    nonfinite="zero")
    device.run()
    _step(model, opt, guard)
    _wait_ready(guard._store)
    # Reserved after the first step: the snapshots' worth of model, optimizer and average.
    layout = staged_layout(model.state_dict(), opt.state_dict()["state"],
                           guard.ema_model.state_dict())
    want, copies = guard._store._pool._want, guard._store._copies
    assert all(want[k] >= n * copies for k, n in layout.items())
    for _ in range(4):
        _step(model, opt, guard)
    assert guard.global_step == 5
    expected = _ema_state(guard)
    _step(model, opt, guard)  # fenced before its optimizer step, then the average moves
    assert not torch.equal(_ema_state(guard)["module.0.weight"], expected["module.0.weight"])
    _step(model, opt, guard)  # admitted now that its copy is done
    assert guard.checkpoints == [0, 5] and guard._store.deferred == 0
    held = guard._store._held[5].ema
    assert held.keys() == expected.keys()
    assert all(torch.equal(held[k], v) for k, v in expected.items())
    guard.close()


def test_a_validation_of_the_path_rolled_back_from_is_not_sent_after_the_rollback(
        dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _attach(model, opt, dead_endpoint, ema=0.9, checkpoint_every=2,
                 report_every=100) as guard:
        for _ in range(3):
            _step(model, opt, guard)
        guard.report_validation(2.0, ema=1.5, step=1)  # measured before the checkpoint: kept
        _deliver(guard, _command(1, mark_stable=2))
        _step(model, opt, guard)
        _deliver(guard, _command(2, rollback_to=2))
        _step(model, opt, guard)
        assert guard.rollbacks == 1 and guard._reporter.validation == (2.0, 1)
        assert guard._reporter.validation_ema == 1.5
        for _ in range(2):
            _step(model, opt, guard)
        guard.report_validation(3.0, ema=2.5)  # at step 4, then a rollback to 2: dropped
        _deliver(guard, _command(3, rollback_to=2))
        _step(model, opt, guard)
        assert guard.rollbacks == 2 and guard.global_step == 2
        assert (guard._reporter.validation, guard._reporter.validation_ema) == (None, None)
