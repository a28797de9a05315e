"""A nanoGPT-style training loop attached to a trimtab controller.

The loop is written the way GPT training scripts usually are: it computes its own
learning rate (linear warm-up, then cosine down to ``--min-lr``) from its iteration
counter and writes it into every param group at the top of each iteration, accumulates
gradients over ``--grad-accum`` micro-batches, clips them itself with
``clip_grad_norm_`` and calls ``optimizer.step()``. trimtab takes the loop as it is
(``hooks=True``): the lines marked ``trimtab`` are the whole change.

trimtab's lr is a *multiplier* on the loop's own lr, put in around each optimizer step
and taken off after it: the loop keeps writing its schedule, and a controller's decrease
is always a decrease from it. ``--trace FILE`` writes, for every optimizer step, the lr
each param group actually ran with (read by a step pre-hook registered after trimtab's),
so that it can be checked against what the controller's journal says.

    trimtab serve &
    python examples/train_gpt.py --job gpt --iters 300
    trimtab decisions --job gpt

The text is Python's own standard-library source (nothing is downloaded); the model is a
small decoder-only transformer. ``--no-trimtab`` runs the same loop bare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time

import torch
from torch import nn
from torch.nn import functional as F

from trimtab.client import attach

FILES = ("bisect.py", "colorsys.py", "contextlib.py", "copy.py", "fnmatch.py",
         "functools.py", "heapq.py", "keyword.py", "queue.py", "textwrap.py")


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level ids of the stdlib modules in ``FILES``: (train, val), a 90/10 split."""
    root = sysconfig.get_paths()["stdlib"]
    raw = b"".join(open(os.path.join(root, f), "rb").read() for f in FILES)
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    n_val = len(ids) // 10
    return ids[:-n_val], ids[-n_val:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, block: int = 64, d: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="gpt")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ap.add_argument("--no-trimtab", action="store_true", help="run the same loop bare")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup-iters", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--report-every", type=int, default=5)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trace", help="write the lr every optimizer step ran with (JSON)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train, val = load_text()

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = train if split == "train" else val
        ix = torch.randint(len(data) - args.block_size, (args.batch_size,))
        x = torch.stack([data[i:i + args.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + args.block_size] for i in ix])
        return x.to(args.device), y.to(args.device)

    def get_lr(it: int) -> float:
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        ratio = min(1.0, (it - args.warmup_iters) / max(1, args.iters - args.warmup_iters))
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (
            args.learning_rate - args.min_lr)

    @torch.no_grad()
    def estimate_val(model: nn.Module) -> float:
        model.eval()
        losses = [model(*get_batch("val")).item() for _ in range(10)]
        model.train()
        return sum(losses) / len(losses)

    model = GPT(block=args.block_size).to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95),
    )
    guard = None
    if not args.no_trimtab:
        guard = attach(model, optimizer, job=args.job, endpoint=args.endpoint,  # trimtab
                       hooks=True, report_every=args.report_every,  # trimtab
                       checkpoint_every=args.checkpoint_every,  # trimtab
                       batch_size=args.batch_size * args.grad_accum)  # trimtab
    trace: list[dict] = []
    if args.trace:
        optimizer.register_step_pre_hook(lambda opt, a, k: trace.append({
            "iter": iter_num, "step": guard.global_step if guard else iter_num,
            "lrs": [g["lr"] for g in opt.param_groups],
            "own": get_lr(iter_num)}))

    x, y = get_batch("train")
    t0 = time.perf_counter()
    iter_num = 0
    for iter_num in range(args.iters):
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % args.eval_interval == 0:
            print(f"iter {iter_num}: val loss {estimate_val(model):.4f}, lr {lr:.3g}", flush=True)
        for _ in range(args.grad_accum):
            loss = model(x, y) / args.grad_accum
            x, y = get_batch("train")  # the next batch, as nanoGPT fetches it
            loss.backward()
            if guard is not None:
                guard.observe_loss(loss * args.grad_accum)  # trimtab
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = estimate_val(model)
    print(f"iter {args.iters}: val loss {final:.4f} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    if guard is not None:
        print(f"trimtab: {guard.global_step} optimizer steps, {guard.rollbacks} rollbacks, "
              f"lr multiplier x{guard.scale.lr:.3g} at the end", flush=True)
        guard.close()  # trimtab
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as f:
            json.dump({"steps": trace, "final_val": final}, f)


if __name__ == "__main__":
    main()
