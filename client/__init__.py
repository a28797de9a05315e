"""trimtab's client: attach a running PyTorch training loop to a trimtab controller.

>>> from trimtab.client import attach
>>> guard = attach(model, optimizer, job="gpt-small", clip=1.0)  # doctest: +SKIP
>>> for batch in data:  # doctest: +SKIP
...     loss = model(batch).loss
...     optimizer.zero_grad()
...     loss.backward()
...     guard.step(loss)  # instead of optimizer.step()
>>> guard.close()  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from ._guard import Guard, attach

__all__ = ["attach", "Guard", "__version__"]

try:
    __version__ = version("trimtab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
