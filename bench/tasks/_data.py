"""Data shared by tasks, loaded once per process (scikit-learn's bundled digits)."""

from __future__ import annotations

import functools

import torch

from bench.tasks import Run


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): sklearn's 1797 8x8 digits, a fixed 80/20 split.

    Pixels are scaled to [0, 1]; the split is a fixed permutation (seed 0), the same for
    every benchmark seed, so seeds vary initialisation and batch order only.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def minibatches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """An endless stream of random mini-batches drawn with a generator seeded by ``seed``."""

    def stream():
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(x), (size,), generator=g)
            yield x[idx], y[idx]

    return stream


def classification_run(model: torch.nn.Module, xt: torch.Tensor, yt: torch.Tensor,
                       xv: torch.Tensor, yv: torch.Tensor, batch: int, seed: int) -> Run:
    """A :class:`Run` training ``model`` with cross-entropy on (xt, yt), validated on (xv, yv)."""

    def train_loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    def val_loss(m):
        return torch.nn.functional.cross_entropy(m(xv), yv).item()

    return Run(model, [{"params": list(model.parameters())}],
               minibatches(xt, yt, batch, seed), train_loss, val_loss)
