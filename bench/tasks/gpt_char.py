"""A small GPT-style character model trained the way most users train one: AdamW with two
param groups and a warm-up + cosine LR schedule, in three variants that differ only in
how the user's code applies that schedule (:class:`bench.tasks.UserSchedule`):

- ``gpt_loop``: the training loop writes each group's LR before every step from its own
  iteration counter;
- ``gpt_lambda``: a ``LambdaLR`` with the same warm-up + cosine, stepped after each step;
- ``gpt_onecycle``: ``OneCycleLR(max_lr = starting LR, total_steps = steps)`` with torch's
  defaults (it cycles AdamW's beta1 between 0.85 and 0.95 too).

Warm-up over the first 10% of the steps, then cosine down to a tenth of the peak (loop and
lambda give the same LRs at every step). The starting LR of a run is the schedule's peak.

Text: char_transformer's (Python's own standard-library source, 96 symbols, the last 10%
for validation, scored on 64 fixed windows; nothing is downloaded).

Model: a decoder-only transformer written here: token + learned position embeddings,
2 pre-LayerNorm blocks of causal self-attention (``scaled_dot_product_attention`` with
``is_causal=True``, 4 heads) and a GELU MLP (4x), a final LayerNorm and an untied linear
head without bias; d=64, context 32, no dropout (~0.11M parameters); batch 16. AdamW
(the benchmark's betas, 0.9 and 0.999) with weight decay 0.1 on the weights of linear
layers (group 0) and none on biases, LayerNorms and embeddings (group 1); both groups
start at the same LR.

Peak LR (``ref_lr``): swept with the bare user schedule (contender ``constant``), quick
budget (300 steps), seeds 0 and 1, final validation loss:

    gpt_lambda (gpt_loop gives the same LRs, and the same losses)
    lr 0.001: 2.2782, 2.2968  median 2.2875
    lr 0.002: 2.2233, 2.2359  median 2.2296
    lr 0.003: 2.2236, 2.2262  median 2.2249
    lr 0.005: 2.3085, 2.2170  median 2.2628
    lr 0.01: 2.4109, 2.3002  median 2.3556
    lr 0.02: 2.4681, 2.4851  median 2.4766
    lr 0.03: 2.6093, 2.5302  median 2.5697
    lr 0.05: 2.7220, 2.7313  median 2.7266
    gpt_onecycle
    lr 0.001: 2.2895, 2.2972  median 2.2934
    lr 0.003: 2.1767, 2.2225  median 2.1996
    lr 0.005: 2.2026, 2.2292  median 2.2159
    lr 0.01: 2.2478, 2.2230  median 2.2354
    lr 0.02: 2.3509, 2.2831  median 2.3170

so ``ref_lr = 3e-3`` for all three (best for both schedules); the LR grid spans
3e-5..0.3. ``target = 2.6``, as char_transformer's on the same text: at 3e-3 the
warm-up + cosine runs pass it near iteration 80 of 300. One quick run (300 steps, 15
evaluations, one torch thread) takes about 3.5 s (3.1-3.7 s measured for each variant on
a 2-core AMD EPYC VM shared with other work; char_transformer 3.7-3.9 s there), the first
run in a process about 1 s more; a full run (1500 steps) about five times that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bench.tasks import Run, Task, UserSchedule
from bench.tasks.char_transformer import VOCAB, corpus

__all__ = ["TASKS", "GPT", "GPTChar", "param_groups"]

CTX = 32
BATCH = 16
#: Validation windows (fixed, evenly spaced over the validation text).
VAL_WINDOWS = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A decoder-only character model.

    >>> model = GPT()
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 96])
    """

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = CTX) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        for m in self.modules():  # small normal weights, zero biases (GPT-2's scale)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.tokens(idx) + self.positions(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: linear layers' weights decay, everything else (biases,
    LayerNorms, embeddings) does not."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


class GPTChar(Task):
    def make(self, seed: int, width: int | None = None) -> Run:
        train, val, _ = corpus()
        starts = torch.linspace(0, len(val) - CTX - 2, VAL_WINDOWS).long()
        val_seq = torch.stack([val[s: s + CTX + 1] for s in starts.tolist()])
        torch.manual_seed(seed)
        model = GPT()

        def batches():
            g = torch.Generator().manual_seed(5000 + seed)
            while True:
                i = torch.randint(0, len(train) - CTX - 1, (BATCH,), generator=g)
                seq = torch.stack([train[j: j + CTX + 1] for j in i.tolist()])
                yield seq[:, :-1], seq[:, 1:]

        def loss(m, seq_in, seq_out):
            return F.cross_entropy(m(seq_in).flatten(0, 1), seq_out.flatten())

        def train_loss(m, batch):
            return loss(m, *batch)

        def val_loss(m):
            return loss(m, val_seq[:, :-1], val_seq[:, 1:]).item()

        return Run(model, param_groups(model, self.weight_decay), batches, train_loss,
                   val_loss)


def _task(kind: str) -> GPTChar:
    schedule = UserSchedule(kind, warmup=0.1, min_ratio=0.1)
    return GPTChar(name=f"gpt_{kind}", family="adam", steps={"quick": 300, "full": 1500},
                   ref_lr=3e-3, target=2.6, weight_decay=0.1, evals=15,
                   schedule=schedule,
                   description=f"2-layer GPT (d=64, ctx {CTX}) on stdlib source, AdamW "
                               f"(2 groups, decay 0.1/0), batch 16; {schedule.describe()}")


TASKS = tuple(_task(kind) for kind in ("loop", "lambda", "onecycle"))
