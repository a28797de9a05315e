"""Guard.step on real CPU training: clipping, non-finite skips, options, no per-step syncs.

These guards point at an endpoint nobody listens on: the step must not care.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter

import pytest
import torch

from trimtab.client import Guard, attach

pytestmark = pytest.mark.timeout(30)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _backward(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y) * 50  # big enough for clipping to bite
    model.zero_grad()
    loss.backward()
    return loss


def _attach(model, opt, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    return attach(model, opt, job="unit", endpoint=endpoint, **kw)


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_clipping_matches_clip_grad_norm(dead_endpoint) -> None:
    model = _model()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    with _attach(model, opt, dead_endpoint, clip=0.5) as guard:
        for step in range(3):
            _backward(model, step)
            _backward(twin, step)
            pre = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
            assert pre > 0.5  # otherwise this test would not test clipping
            guard.step(_backward(model, step))
            twin_opt.step()
            post = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            assert post <= 0.5 + 1e-5
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad)
                torch.testing.assert_close(p, q)


def _poisoned_run(opt_factory, nonfinite: str, dead_endpoint: str, clip=None) -> Guard:
    """Two good steps, one with a NaN gradient, two good steps; check the NaN step did nothing."""
    model = _model()
    opt = opt_factory(model.parameters())
    with _attach(model, opt, dead_endpoint, nonfinite=nonfinite, report_every=3,
                 clip=clip) as guard:
        for step in range(2):
            guard.step(_backward(model, step))
        before, opt_before = _state(model), copy.deepcopy(opt.state_dict())
        loss = _backward(model, 2)
        next(model.parameters()).grad[0, 0] = float("nan")
        guard.step(loss)
        assert _same(before, _state(model))  # the step was skipped: params untouched
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert guard.skipped_steps == 1
        assert guard.global_step == 2
        if nonfinite != "zero":  # an exact skip leaves the optimizer state alone too
            for k, v in opt.state_dict()["state"][0].items():
                torch.testing.assert_close(v, opt_before["state"][0][k])
        for step in range(3, 5):
            guard.step(_backward(model, step))
        assert not _same(before, _state(model))  # and training goes on
        assert guard.global_step == 4 and guard.skipped_steps == 1
    return guard


def test_nonfinite_skip_on_cpu(dead_endpoint) -> None:
    guard = _poisoned_run(
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), "auto", dead_endpoint
    )
    assert guard.nonfinite_mode == "skip"


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_nonfinite_skip_fused_on_device(cls, dead_endpoint) -> None:
    kw = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    guard = _poisoned_run(lambda ps: cls(ps, lr=0.01, fused=True, **kw), "auto", dead_endpoint)
    assert guard.nonfinite_mode == "fused"


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nonfinite_zero(clip, dead_endpoint) -> None:
    guard = _poisoned_run(lambda ps: torch.optim.SGD(ps, lr=0.01), "zero", dead_endpoint, clip)
    assert guard.nonfinite_mode == "zero"


_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture
def sync_counter(monkeypatch) -> Counter:
    """Counts host reads of tensor values issued from trimtab.client code."""
    counts: Counter = Counter()

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("trimtab.client"):
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))
    return counts


@pytest.mark.parametrize(
    ("make", "nonfinite"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), "auto"),
        (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), "zero"),
    ],
    ids=["fused", "zero"],
)
def test_no_host_sync_per_step(make, nonfinite, sync_counter, dead_endpoint) -> None:
    model = _model()
    opt = make(model.parameters())
    guard = _attach(model, opt, dead_endpoint, clip=1.0, report_every=4, nonfinite=nonfinite)
    try:
        per_step = []
        for step in range(12):
            loss = _backward(model, step)
            sync_counter.clear()
            guard.step(loss)
            per_step.append(dict(sync_counter))
    finally:
        guard.close()
    for step, reads in enumerate(per_step):
        closes_window = step % 4 == 3
        assert reads == ({"tolist": 1} if closes_window else {}), f"step {step}: {reads}"


def test_skip_mode_reads_one_flag_per_step(sync_counter, dead_endpoint) -> None:
    """The counter sees reads: nonfinite="skip" without a fused kernel costs one per step."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with _attach(model, opt, dead_endpoint, report_every=100, nonfinite="skip") as guard:
        loss = _backward(model, 0)
        sync_counter.clear()
        guard.step(loss)
        assert dict(sync_counter) == {"item": 1}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("nonfinite", "maybe", r"nonfinite='maybe' is invalid; allowed: auto, skip, zero"),
        ("report_every", 0, r"report_every=0 is invalid; allowed: an int >= 1"),
        ("clip", -1.0, r"clip=-1\.0 is invalid; allowed: None or a finite number > 0"),
        ("queue_size", 0, r"queue_size=0 is invalid"),
        ("heartbeat_s", 0, r"heartbeat_s=0 is invalid"),
        ("job", "bad job!", r"job='bad job!' is invalid; allowed: 1-128 characters"),
    ],
)
def test_options_are_validated(option, value, message, dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"job": "unit", option: value}
    with pytest.raises(ValueError, match=message):
        attach(model, opt, endpoint=dead_endpoint, **kw)


def test_closed_guard_refuses_steps(dead_endpoint) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _attach(model, opt, dead_endpoint) as guard:
        guard.step(_backward(model, 0))
    assert not guard._transport._thread.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        guard.step(_backward(model, 1))


def test_injected_context_is_used_and_left_open(dead_endpoint) -> None:
    import zmq

    context = zmq.Context()
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with _attach(model, opt, dead_endpoint, context=context) as guard:
            guard.step(_backward(model, 0))
            assert guard._transport._context is context
        assert not context.closed  # the caller owns it; the guard must not terminate it
    finally:
        context.term()


def test_a_group_whose_params_have_no_grads_is_measured_as_zero(dead_endpoint) -> None:
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)  # a frozen first layer: its group has no gradients at all
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), "lr": 0.01}], lr=0.1)
    with _attach(model, opt, dead_endpoint, report_every=2) as guard:
        for step in range(4):
            guard.step(_backward(model, step))
        assert guard.global_step == 4
        stats = guard._probe.buf[:, :4].tolist()  # last window's rows: loss, norm, g0, g1
    assert all(row[2] == 0.0 and row[3] > 0.0 for row in stats)


def _two_group_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=1e-3, fused=True)


def _step_loss(model) -> torch.Tensor:
    model.zero_grad()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    return loss


def test_a_non_report_step_launches_a_bounded_number_of_ops(dead_endpoint) -> None:
    """The guard's own work on a non-report step (clip, fused skip flag, two groups of 20
    tensors): one foreach norm and one foreach scale for all groups, not one per group;
    the total and group norms written into the row by one norm; the clip's factor in two
    ops; no per-step conversions or views: at most 10 top-level aten ops (it was 23, then
    16)."""
    from torch.profiler import ProfilerActivity, profile

    model, opt = _two_group_model()
    with _attach(model, opt, dead_endpoint, clip=1.0, report_every=10) as guard:
        assert guard.nonfinite_mode == "fused"
        guard.step(_step_loss(model))
        loss = _step_loss(model)
        real, opt.step = opt.step, lambda *a, **k: None  # the guard's own ops only
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                guard.step(loss)
        finally:
            opt.step = real
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    counts = Counter(top)
    assert counts["aten::_foreach_norm"] == 1 and counts["aten::_foreach_mul_"] == 1, counts
    assert len(top) <= 10, counts


def test_group_norms_are_each_groups_own_norm(dead_endpoint) -> None:
    """One foreach norm over all groups, reduced per group: each column is its group's
    get_total_norm, the total all gradients' (to float32 rounding: the reductions run in
    another order), and found_inf's buffer is reused step to step."""
    model, opt = _two_group_model()
    with _attach(model, opt, dead_endpoint, report_every=10) as guard:
        for step in range(3):
            loss = _step_loss(model)
            want = [torch.nn.utils.get_total_norm([p.grad for p in g["params"]])
                    for g in opt.param_groups]
            guard.step(loss)
            row = guard._probe.buf[step]
            torch.testing.assert_close(row[2:4], torch.stack(want), rtol=1e-6, atol=0)
            torch.testing.assert_close(row[1], torch.linalg.vector_norm(torch.stack(want)),
                                       rtol=1e-6, atol=0)
            if step == 0:
                flag = guard._step._found_inf
            assert guard._step._found_inf is flag and flag.item() == 0.0
