"""Snapshots of a LoRA fine-tune: the frozen base held once, against copied every time.

    python -m bench.frozen [--layers 6] [--width 512] [--snapshots 8] [--keep 3]

A peft LoRA model (rank 8 on the attention's ``c_attn``) on a GPT-2 of ``--layers``
blocks of ``--width``, AdamW on the adapters. For each mode, alternating (frozen-once,
every-time, frozen-once, ...), a ring of ``--keep`` snapshots is filled by
``--snapshots`` takes with a training step between them; printed: the median time of a
take, and the host bytes the ring holds (distinct tensors of the held snapshots' model and
optimizer state, plus the frozen copy). "every-time" is the store with its frozen-parameter
sharing switched off, as snapshots were before it. CPU: the copies are clones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _model(layers: int, width: int):
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_head=8, n_embd=width, vocab_size=8192,
                                     n_positions=128)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                peft.LoraConfig(r=8, target_modules=["c_attn"],
                                                fan_in_fan_out=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def _held_bytes(store) -> int:
    seen, total = set(), 0
    for ckpt in store._held.values():
        tensors = list(ckpt.model.values())
        for s in ckpt.optimizer["state"].values():
            tensors += [t for t in s.values() if torch.is_tensor(t)]
        for t in tensors:
            if torch.is_tensor(t) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _run(model, opt, ids, snapshots: int, keep: int, shared: bool) -> tuple[float, int]:
    from trimtab.client import CheckpointStore, _frozen

    store = CheckpointStore(keep=keep)
    if not shared:
        store._frozen.names = lambda *a: set()  # type: ignore[method-assign]
    times = []
    for i in range(snapshots):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        t0 = time.perf_counter()
        store.take(i + 1, model, opt)
        times.append(time.perf_counter() - t0)
    assert isinstance(store._frozen, _frozen.FrozenParts)
    return statistics.median(times[1:]), _held_bytes(store)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.frozen")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, opt = _model(args.layers, args.width)
    ids = torch.randint(0, 8192, (2, 64))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"# bench.frozen: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, Python {platform.python_version()}, 1 thread")
    print(f"# GPT-2 {args.layers}x{args.width} + LoRA r=8: {frozen:,} frozen, "
          f"{trained:,} trained parameters; keep={args.keep}, {args.snapshots} takes")
    rows: dict[str, list[tuple[float, int]]] = {"frozen once": [], "every time": []}
    for _ in range(args.pairs):
        rows["frozen once"].append(_run(model, opt, ids, args.snapshots, args.keep, True))
        rows["every time"].append(_run(model, opt, ids, args.snapshots, args.keep, False))
    print("| mode | take, median ms | ring host MB |")
    print("|---|---:|---:|")
    for mode, got in rows.items():
        ms = statistics.median(t for t, _ in got) * 1e3
        mb = statistics.median(b for _, b in got) / 2**20
        print(f"| {mode} | {ms:.2f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
