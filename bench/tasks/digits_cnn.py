"""A small CNN on scikit-learn's bundled digits (8x8 images, 10 classes); SGD + momentum.

Conv(1->16, 3x3) - ReLU - Conv(16->32, 3x3) - ReLU - MaxPool(2) - Linear(512->64) - ReLU -
Linear(64->10), no batch norm (Schedule-Free would need its BN-statistics recipe);
batch 32; cross-entropy; weight decay 5e-4 on every parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.tasks import Run, Task
from bench.tasks._data import classification_run, digits


class DigitsCNN(Task):
    def make(self, seed: int, width: int | None = None) -> Run:
        xt, yt, xv, yv = digits()
        xt, xv = xt.view(-1, 1, 8, 8), xv.view(-1, 1, 8, 8)
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
        return classification_run(model, xt, yt, xv, yv, 32, 1000 + seed)


TASK = DigitsCNN(name="digits_cnn", family="sgd", steps={"quick": 400, "full": 1500},
                 ref_lr=0.03, target=0.15, weight_decay=5e-4,
                 description="CNN on sklearn digits, SGD momentum 0.9, batch 32")
