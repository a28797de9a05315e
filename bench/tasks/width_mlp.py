"""The same MLP at four widths on scikit-learn's digits; AdamW.

64 -> w -> w -> 10 with ReLU, w in (32, 64, 128, 256): 3.4k to 84k parameters (25x).
Standard parametrisation (PyTorch's default init), so the best Adam LR drifts with width,
which is what the scale scenario probes. Batch 64; cross-entropy; weight decay 0.01.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.tasks import Run, Task
from bench.tasks._data import classification_run, digits


class WidthMLP(Task):
    def make(self, seed: int, width: int | None = None) -> Run:
        w = width or self.widths[0]
        xt, yt, xv, yv = digits()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                              nn.Linear(w, 10))
        return classification_run(model, xt, yt, xv, yv, 64, 2000 + seed)


TASK = WidthMLP(name="width_mlp", family="adam", steps={"quick": 300, "full": 1000},
                ref_lr=1e-2, target=0.15, weight_decay=0.01, widths=(32, 64, 128, 256),
                description="MLP 64-w-w-10 on sklearn digits, AdamW, batch 64")
