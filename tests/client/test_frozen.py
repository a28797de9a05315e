"""Frozen parameters (a LoRA base, a frozen backbone) copied once for every snapshot: held
once in host memory, never pooled, put back only when they moved, and a change torch did
not count never answered with a stale copy."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.client.test_snapshots import FakeDevice, _wait_ready
from trimtab.client import CheckpointStore, attach, load_stable

pytestmark = pytest.mark.timeout(120)


def _frozen_base(seed: int = 0):
    """A frozen two-layer base and a trainable head, the optimizer on the head only."""
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    base.requires_grad_(False)
    model = torch.nn.Sequential(base, torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model[1].parameters(), lr=1e-2)


def _train(model, opt, steps: int = 1) -> None:
    for _ in range(steps):
        x = torch.randn(16, 32)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_the_frozen_base_is_copied_once_and_shared_by_every_snapshot() -> None:
    model, opt = _frozen_base()
    store = CheckpointStore(keep=3)
    _train(model, opt)
    taken = []
    for step in range(1, 6):
        taken.append(store.take(step, model, opt))
        _train(model, opt, 3)
    for name in ("0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias"):
        assert len({id(c.model[name]) for c in taken}) == 1, name  # one copy, shared
        assert torch.equal(taken[-1].model[name], model.state_dict()[name])
    assert len({id(c.model["1.weight"]) for c in taken}) == 5  # the head: one each
    assert store.frozen_bytes == _bytes(model[0])


def test_a_rollback_restores_the_head_and_leaves_the_unchanged_base_untouched() -> None:
    model, opt = _frozen_base()
    store = CheckpointStore(keep=3)
    _train(model, opt)
    first = store.take(1, model, opt)
    assert store.mark_stable(1)
    head_then = {k: v.clone() for k, v in model[1].state_dict().items()}
    versions = [p._version for p in model[0].parameters()]
    _train(model, opt, 5)
    restored, note = store.restore(1, model, opt)
    assert restored is first and note is None
    assert all(torch.equal(model[1].state_dict()[k], v) for k, v in head_then.items())
    # The base was not copied onto itself: its tensors were not written at all.
    assert [p._version for p in model[0].parameters()] == versions


def test_a_base_changed_in_place_is_copied_again_and_an_older_rollback_puts_it_back() -> None:
    model, opt = _frozen_base()
    store = CheckpointStore(keep=3)
    _train(model, opt)
    old = store.take(1, model, opt)
    assert store.mark_stable(1)
    original = model[0][0].weight.clone()
    # The loop loads other base weights (load_state_dict: an in-place copy torch counts).
    model[0][0].load_state_dict({"weight": original * 2, "bias": model[0][0].bias})
    new = store.take(2, model, opt)
    assert new.model["0.0.weight"] is not old.model["0.0.weight"]
    assert torch.equal(new.model["0.0.weight"], original * 2)
    assert torch.equal(old.model["0.0.weight"], original)  # the older snapshot's stays
    store.restore(1, model, opt)
    assert torch.equal(model[0][0].weight, original)


def test_a_change_through_data_is_never_answered_with_a_stale_copy(caplog) -> None:
    """A teacher updated as ``p.data.mul_(m)`` inside the attached model: torch does not
    count it, so a rollback cannot trust the copy; it leaves the tensor, says so, and
    copies it into every snapshot from then on."""
    model, opt = _frozen_base()
    store = CheckpointStore(keep=3)
    _train(model, opt)
    first = store.take(1, model, opt)
    assert store.mark_stable(1)
    model[0][0].weight.data.mul_(0.5)  # not counted by _version
    now = model[0][0].weight.clone()
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        store.restore(1, model, opt)
    assert torch.equal(model[0][0].weight, now)  # not the stale copy
    assert "changed since they were copied without torch counting it" in caplog.text
    assert "0.0.weight" in caplog.text
    later = store.take(2, model, opt)
    assert "0.0.weight" not in later.frozen and "0.2.weight" in later.frozen
    assert later.model["0.0.weight"] is not first.model["0.0.weight"]
    model[0][0].weight.data.mul_(0.5)
    assert store.mark_stable(2)
    store.restore(2, model, opt)  # copied at step 2 as any tensor: put back
    assert torch.equal(model[0][0].weight, now)


def test_the_pool_holds_no_frozen_buffers_and_a_frozen_copy_in_flight_is_never_restored(
        monkeypatch) -> None:
    """On the CUDA path (driven on CPU): the base's pinned copy is allocated once, outside
    the pool; a later snapshot that shares a copy still in flight is not usable until it
    is done."""
    device = FakeDevice(monkeypatch, auto=False)
    model, opt = _frozen_base()
    _train(model, opt)
    store = CheckpointStore(keep=2)
    store.prepare(model, opt)
    _wait_ready(store)
    head_sd = sum(t.numel() * t.element_size() for t in model[1].state_dict().values())
    optim = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    assert store.host_bytes == (2 + 2) * (head_sd + optim)  # no base in the pool
    first = store.take(1, model, opt)  # its copies queued, not run
    assert store.frozen_bytes == _bytes(model[0])
    assert device.allocs.count("MainThread") == 4  # the base's four tensors, once
    assert store.steps() == [] and not store.mark_stable(1)  # not restorable yet
    second = store.take(2, model, opt)
    assert second.model["0.0.weight"] is first.model["0.0.weight"]
    assert device.allocs.count("MainThread") == 4  # not again
    device.run()
    device.auto = True
    store.poll()
    assert store.steps() == [1, 2]
    assert torch.equal(second.model["0.0.weight"], model[0][0].weight)


def test_a_file_of_a_snapshot_with_a_frozen_base_is_whole(tmp_path) -> None:
    model, opt = _frozen_base()
    store = CheckpointStore(keep=3, directory=tmp_path)
    _train(model, opt)
    store.take(1, model, opt)
    assert store.mark_stable(1)
    assert store.flush(30)
    fresh, fresh_opt = _frozen_base(seed=5)  # another base: the file must bring its own
    _train(fresh, fresh_opt)
    load_stable(tmp_path).restore(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in
               zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    store.close()


def test_a_peft_lora_run_holds_its_base_once_and_rolls_back_its_adapters(dead_endpoint):
    """A real peft LoRA model on a tiny GPT-2, attached as a fine-tune is."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128,
                                     n_positions=32)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                fan_in_fan_out=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    guard = attach(model, opt, job="lora", endpoint=dead_endpoint, checkpoint_every=5,
                   report_every=5, keep=3)
    try:
        ids = torch.randint(0, 128, (4, 16))
        for _ in range(21):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
        store = guard._store
        held = [store._held[s] for s in sorted(store._held)]
        assert len(held) >= 3
        base = [n for n, p in model.named_parameters() if not p.requires_grad]
        lora = [n for n, p in model.named_parameters() if p.requires_grad]
        assert base and lora and all("lora_" in n for n in lora)
        sd_names = {n for n in held[0].model}
        shared = [n for n in sd_names if len({id(c.model[n]) for c in held}) == 1]
        frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                           if not p.requires_grad)
        assert store.frozen_bytes == frozen_bytes
        assert all(n in shared for n in held[-1].frozen)
        assert not any("lora_" in n for n in held[-1].frozen)
        # A rollback to the oldest puts its adapters back and leaves the base alone.
        oldest = held[0]
        assert store.mark_stable(oldest.step)
        versions = {n: p._version for n, p in model.named_parameters() if not p.requires_grad}
        restored, note = store.restore(oldest.step, model, opt)
        assert restored is oldest and note is None
        live = model.state_dict()
        assert all(torch.equal(live[n], oldest.model[n]) for n in oldest.model)
        assert versions == {n: p._version for n, p in model.named_parameters()
                            if not p.requires_grad}
    finally:
        guard.close()
