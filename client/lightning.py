"""A PyTorch Lightning callback that attaches a ``Trainer.fit`` run to a trimtab controller.

``pip install "trimtab[lightning]"``. The callback attaches in ``on_fit_start`` with
``hooks=True`` (see :mod:`trimtab.client._hooks`): Lightning calls
``optimizer.step(closure)``, the guard acts after the closure (training step, backward,
Lightning's own clipping) and before the update. The loss comes from
``on_before_backward``, multiplied back by ``accumulate_grad_batches`` (Lightning divides
it), and a step reports the mean over its micro-batches. Lightning's LR scheduler of
that optimizer is handed to the guard, so that a rollback restores its state; trimtab's
multiplier goes on top of its lr at every step (the knob model).

Rules:

- One optimizer (``trainer.optimizers[0]``); a second one is refused with an error.
- ``gradient_clip_val`` and trimtab's ``clip`` both set: both clip, Lightning's first
  (a warning says so); the reported gradient norm is the one after Lightning's clip.
- The controller's stop advice sets ``trainer.should_stop`` (Lightning ends the fit
  cleanly); ``monitor`` names a logged metric (lower is better) that is reported as
  the validation value after each validation run.
- Rollback: model and optimizer (and the scheduler) are restored in place at a step
  boundary; Lightning owns the loop, so ``trainer.global_step`` and the epoch and batch
  counters are not rewound, and the data loader is not repositioned.
- Resume: trimtab's state (``guard.state_dict()``, see :mod:`trimtab.client._resume`) is
  the callback's state in every checkpoint Lightning saves; ``trainer.fit(model,
  ckpt_path=...)`` with a ``TrimtabCallback`` of the same ``job`` loads it back in
  ``on_train_start``, once Lightning has restored the optimizer and scheduler and before
  the first step: the run continues with its knobs, counters and live schedules, as the
  same run on the controller.

>>> from trimtab.client.lightning import TrimtabCallback
>>> callback = TrimtabCallback(job="my-run", endpoint="tcp://127.0.0.1:5555", clip=1.0)
>>> trainer = pl.Trainer(callbacks=[callback])  # doctest: +SKIP
>>> trainer.fit(model)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the extra is not installed
    try:
        import lightning.pytorch as pl  # the unified `lightning` package
    except ImportError:
        raise ImportError(
            'trimtab.client.lightning needs PyTorch Lightning: pip install "trimtab[lightning]"'
        ) from None

import torch

from ._guard import Guard, sigterm_left_alone
from ._hooks import check_callback_options

__all__ = ["TrimtabCallback"]

log = logging.getLogger("trimtab.client")


class TrimtabCallback(pl.Callback):
    """Attach each ``fit`` to a trimtab controller; ``options`` are ``attach()``'s.

    ``job`` is required; ``hooks`` is always on and ``scheduler`` defaults to Lightning's
    scheduler of the optimizer. ``guard`` is the attached :class:`~trimtab.client.Guard`
    during a fit (``None`` before), kept after it for inspection.
    """

    def __init__(self, *, job: str, monitor: str | None = None, **options: Any) -> None:
        check_callback_options(monitor, options)
        self.job = job
        self.monitor = monitor
        self.options = options
        self.guard: Guard | None = None
        # trimtab's state from the checkpoint a fit resumes from (None: a fresh fit).
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """trimtab's part of a Lightning checkpoint: the guard's state (between steps)."""
        guard = self.guard
        if guard is None or guard._closed:
            return {} if self._resume is None else {"guard": self._resume}
        return {"guard": guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores a checkpoint: keep trimtab's state for ``on_train_start``
        (the optimizer and scheduler are restored after ``on_fit_start``)."""
        self._resume = state_dict.get("guard")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None and self._resume is not None:
            self.guard.load_state_dict(self._resume)
            self._resume = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"trainer.optimizers has {len(optimizers)} optimizers; "
                "allowed: exactly 1 for TrimtabCallback"
            )
        optimizer = optimizers[0]
        options = dict(self.options)
        if "scheduler" not in options:
            options["scheduler"] = _scheduler_of(trainer, optimizer)
        if trainer.gradient_clip_val and options.get("clip") is not None:
            log.warning(
                "trimtab: Trainer(gradient_clip_val=%s) and clip=%s both clip; "
                "Lightning clips first",
                trainer.gradient_clip_val,
                options["clip"],
            )
        with sigterm_left_alone():  # Lightning's own handler stops the fit on SIGTERM
            self.guard = Guard(pl_module, optimizer, job=self.job, hooks=True, **options)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.guard is not None and not self.guard._closed:
            # Lightning divides the loss by accumulate_grad_batches before backward.
            self.guard.observe_loss(loss.detach() * trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        guard = self.guard
        if guard is not None and guard.should_stop and not trainer.should_stop:
            log.warning(
                "trimtab: stopping the fit on the controller's advice: %s", guard.stop_reason
            )
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the fit too (the guard closed: trainer.validate() after fit()): the guard
        # sends it on a link of its own, to the ended run's results.
        if self.guard is None or self.monitor is None:
            return
        if trainer.sanity_checking:  # Lightning's pre-fit check says nothing of the run
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)  # a host read, once per validation run
        if math.isfinite(value):
            self.guard.report_validation(value)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None:
            self.guard.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.guard is not None:
            self.guard.close(f"error: {type(exception).__name__}")


def _scheduler_of(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Any:
    """Lightning's LR scheduler of ``optimizer`` (``None``: none)."""
    for config in getattr(trainer, "lr_scheduler_configs", []):
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is optimizer:
            return scheduler
    return None
