"""A noisy quadratic model with a known optimum (after Zhang et al. 2019, "Which
Algorithmic Choices Matter at Which Batch Sizes?"); SGD + momentum.

Loss ``0.5 sum_i h_i (theta_i - c_i)^2`` in 1000 dimensions with curvatures
``h_i = 1 / i`` (condition number 1000), optimum ``c ~ N(0, I)`` drawn from the seed,
start at 0. A mini-batch adds gradient noise ``sqrt(h_i) * sigma * xi_i`` (``xi ~ N(0, 1)``,
sigma 0.5): its variance follows the curvature, as for a linear model's loss. The
validation loss is the exact sub-optimality ``L(theta) - L(c)``; its optimum is 0.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.tasks import Run, Task

DIM = 1000
SIGMA = 0.5


class NoisyQuadratic(Task):
    def make(self, seed: int, width: int | None = None) -> Run:
        g = torch.Generator().manual_seed(seed)
        h = 1.0 / torch.arange(1, DIM + 1, dtype=torch.float32)
        c = torch.randn(DIM, generator=g)
        model = nn.Module()
        model.theta = nn.Parameter(torch.zeros(DIM))

        def batches():
            gb = torch.Generator().manual_seed(3000 + seed)
            while True:
                yield torch.randn(DIM, generator=gb)

        def train_loss(m, xi):
            # E[loss] = the exact quadratic; its gradient carries sqrt(h) * sigma * xi noise
            d = m.theta - c
            return 0.5 * (h * d * d).sum() + (h.sqrt() * SIGMA * xi * m.theta).sum()

        def val_loss(m):
            d = m.theta - c
            return (0.5 * (h * d * d).sum()).item()

        return Run(model, [{"params": [model.theta]}], batches, train_loss, val_loss)


TASK = NoisyQuadratic(name="noisy_quadratic", family="sgd",
                      steps={"quick": 300, "full": 1000}, ref_lr=0.3, target=1.0,
                      description="1000-d quadratic, h_i = 1/i, sigma 0.5, SGD momentum 0.9")
