"""A tiny character-level causal transformer on Python's own standard-library source; AdamW.

Text: the fixed, sorted list ``FILES`` of modules under ``sysconfig.get_paths()["stdlib"]``,
concatenated (what ships with the interpreter: nothing is downloaded). Characters map to 96
symbols (printable ASCII; anything else to one symbol). The last 10% is the validation
text, scored on 64 fixed windows. The text differs between Python versions, so the results
record its SHA-256.

Model: 2 pre-norm layers, d=64, 4 heads, MLP 256, context 32, no dropout (~110k params);
batch 16; weight decay 0.01.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig

import torch
from torch import nn

from bench.tasks import Run, Task

FILES = ("bisect.py", "colorsys.py", "contextlib.py", "copy.py", "fnmatch.py",
         "functools.py", "heapq.py", "keyword.py", "queue.py", "textwrap.py")
CTX = 32
VOCAB = 96


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train ids, val ids, sha256 of the text)."""
    root = sysconfig.get_paths()["stdlib"]
    text = "".join(open(os.path.join(root, f), encoding="utf-8").read() for f in FILES)
    raw = text.encode("ascii", "replace")
    # printable ASCII -> 0..94, newline -> 95, anything else (tabs) -> 0 (space)
    table = [b - 32 if 32 <= b < 127 else (VOCAB - 1 if b == 10 else 0) for b in range(256)]
    ids = torch.tensor(table, dtype=torch.long)[torch.frombuffer(bytearray(raw),
                                                                 dtype=torch.uint8).long()]
    n_val = len(ids) // 10
    return ids[:-n_val], ids[-n_val:], hashlib.sha256(raw).hexdigest()


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(CTX, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CTX),
                             persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.norm(self.body(h, mask=self.mask, is_causal=True)))


class CharTransformer(Task):
    def make(self, seed: int, width: int | None = None) -> Run:
        train, val, _ = corpus()
        starts = torch.linspace(0, len(val) - CTX - 2, 64).long()
        val_seq = torch.stack([val[s: s + CTX + 1] for s in starts.tolist()])
        torch.manual_seed(seed)
        model = TinyTransformer()

        def batches():
            g = torch.Generator().manual_seed(4000 + seed)
            while True:
                i = torch.randint(0, len(train) - CTX - 1, (16,), generator=g)
                seq = torch.stack([train[j: j + CTX + 1] for j in i.tolist()])
                yield seq[:, :-1], seq[:, 1:]

        def loss(m, seq_in, seq_out):
            return nn.functional.cross_entropy(m(seq_in).flatten(0, 1), seq_out.flatten())

        def train_loss(m, batch):
            return loss(m, *batch)

        def val_loss(m):
            return loss(m, val_seq[:, :-1], val_seq[:, 1:]).item()

        return Run(model, [{"params": list(model.parameters())}], batches, train_loss,
                   val_loss)


TASK = CharTransformer(name="char_transformer", family="adam",
                       steps={"quick": 300, "full": 1500}, ref_lr=3e-3, target=2.6,
                       weight_decay=0.01, evals=15,
                       description="2-layer char transformer (d=64, ctx 32) on stdlib "
                                   "source, AdamW, batch 16")
