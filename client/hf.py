"""A Hugging Face ``transformers`` TrainerCallback that attaches ``Trainer.train`` to trimtab.

``pip install "trimtab[hf]"``. The callback attaches in ``on_train_begin`` with
``hooks=True`` (see :mod:`trimtab.client._hooks`) on the optimizer under accelerate's
wrapper, so the guard acts inside the Trainer's ``optimizer.step()``, after the Trainer's
own clipping (``max_grad_norm``) and before the update. The Trainer's LR scheduler is
handed to the guard, so that a rollback restores its state; trimtab's multiplier goes on
top of its lr at every step (the knob model).

The loss: the Trainer hands callbacks only the logged loss (averaged over
``logging_steps``, read on the host), so the callback takes the model's own ``loss``
output with a forward hook on the model, on the device, in training mode only, and a step
reports what the Trainer logs for it (``training_step``'s losses summed over the step):

- a model that takes the Trainer's loss kwargs (``model_accepts_loss_kwargs``: its
  ``forward`` has ``**kwargs``, as the transformers models do) is called with
  ``num_items_in_batch``, the step's count of label tokens over all its micro-batches, and
  returns its micro-batch's share of the step's loss (its token sum over that count): the
  step's loss is the sum of its micro-batches' losses, handed to the guard in
  ``on_pre_optimizer_step``;
- any other model returns its micro-batch's mean and the Trainer divides it by the
  accumulation steps: the step's loss is the mean of its micro-batches' losses.

Its limits: a model that returns no ``loss`` (a custom ``compute_loss`` or
``compute_loss_func`` computes it outside the model) reports no loss; a Trainer subclass
that sets ``loss_is_scaled_for_ga`` against the rule above is not followed; under several
processes with ``average_tokens_across_devices`` (the count is over all ranks, and the
Trainer multiplies each rank's loss by their number), the reported loss is the Trainer's
divided by the number of processes.

Rules:

- ``max_grad_norm`` (the Trainer clips at 1.0 by default) and trimtab's ``clip`` both
  set: both clip, the Trainer first (a warning says so); set ``max_grad_norm=0`` to let
  trimtab own clipping.
- The controller's stop advice sets ``control.should_training_stop`` at the step's end;
  ``monitor`` names an evaluation metric (e.g. ``"eval_loss"``, lower is better) that
  is reported as the validation value after each evaluation.
- Rollback: model, optimizer and scheduler are restored in place at a step boundary;
  the Trainer owns the loop, so ``state.global_step``, the epoch and the data loader
  are not rewound.
- Resume: the callback is an ``ExportableState``: trimtab's state (``guard.state_dict()``,
  see :mod:`trimtab.client._resume`) goes into every checkpoint's ``trainer_state.json``,
  and ``trainer.train(resume_from_checkpoint=...)`` loads it back in ``on_train_begin``
  (the Trainer has restored model, optimizer and scheduler by then), before the first
  step. It does so whether or not ``restore_callback_states_from_checkpoint`` is set;
  when it is, the Trainer re-creates the callback from its saved arguments, which keep
  only the options that are plain values (an ``on_rollback`` function, a ZeroMQ context
  are not saved: leave that setting off to keep them).
  A checkpoint of a run without the callback has no trimtab state: the run attaches as
  a new one, its steps counted from the resume (a warning says so), and the callback puts
  its entry into the Trainer's state so that the next save can write it.

>>> from trimtab.client.hf import TrimtabCallback
>>> callback = TrimtabCallback(job="my-run", endpoint="tcp://127.0.0.1:5555")
>>> trainer = Trainer(model=model, args=args, callbacks=[callback])  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError:  # pragma: no cover - the extra is not installed
    raise ImportError('trimtab.client.hf needs transformers: pip install "trimtab[hf]"') from None

import torch

from ._guard import Guard
from ._hooks import check_callback_options

__all__ = ["TrimtabCallback"]

#: The weight average's file in a Trainer checkpoint folder (with ``ema=``).
EMA_FILE = "trimtab_ema.pt"

log = logging.getLogger("trimtab.client")


class TrimtabCallback(TrainerCallback, ExportableState):
    """Attach each ``train()`` to a trimtab controller; ``options`` are ``attach()``'s.

    ``job`` is required; ``hooks`` is always on and ``scheduler`` defaults to the
    Trainer's. ``guard`` is the attached :class:`~trimtab.client.Guard` during training
    (``None`` before), kept after it for inspection.
    """

    def __init__(self, *, job: str, monitor: str | None = None, **options: Any) -> None:
        check_callback_options(monitor, options)
        self.job = job
        self.monitor = monitor
        self.options = options
        self.guard: Guard | None = None
        self._forward_hook: Any = None
        #: The step's micro-batch losses so far that are shares of its sum (see _observe).
        self._shares: torch.Tensor | None = None
        #: trimtab's state to resume from (set by the Trainer when it re-creates the
        #: callback from a checkpoint; else read from the resumed ``TrainerState``).
        self.resume_state: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """The ``ExportableState`` the Trainer saves with each checkpoint (JSON): this
        callback's plain-valued arguments, and the guard's state."""
        guard = self.guard
        saved = (guard.state_dict() if guard is not None and not guard._closed
                 else self.resume_state)
        if saved is not None and saved.get("ema") is not None:
            saved = {**saved, "ema": None}  # tensors: in the checkpoint folder (on_save)
        args = {"job": self.job, "monitor": self.monitor,
                **{k: v for k, v in self.options.items() if _plain(v)}}
        return {"args": args, "attributes": {"resume_state": saved}}

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        *,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError(
                "TrimtabCallback needs the Trainer's model and optimizer; got "
                f"model={type(model).__name__}, optimizer={type(optimizer).__name__}"
            )
        self._close_interrupted()
        options = dict(self.options)
        if "scheduler" not in options and lr_scheduler is not None:
            options["scheduler"] = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if getattr(args, "max_grad_norm", 0) and options.get("clip") is not None:
            log.warning(
                "trimtab: TrainingArguments(max_grad_norm=%s) and clip=%s both clip; "
                "the Trainer clips first",
                args.max_grad_norm,
                options["clip"],
            )
        # The hooks go on the torch optimizer under accelerate's wrapper (see _wrapped).
        self.guard = Guard(model, optimizer, job=self.job, hooks=True, **options)
        self._forward_hook = model.register_forward_hook(self._observe, with_kwargs=True)
        saved = self.resume_state or _saved_state(state, type(self).__name__)
        self.resume_state = None
        step = getattr(state, "global_step", 0)
        if saved is None and step > 0:
            self._resumed_without_state(state, step)
        if saved is not None and step > 0:
            average = os.path.join(args.output_dir, f"checkpoint-{step}", EMA_FILE)
            if self.guard.ema_model is not None and os.path.exists(average):
                saved = {**saved, "ema": torch.load(average, weights_only=True)}
            self.guard.load_state_dict(saved)

    def _resumed_without_state(self, state: Any, step: int) -> None:
        """Resumed from a checkpoint a run without this callback wrote: its state holds no
        entry for the callback, which the Trainer's next save needs (it reads that entry
        before it writes it), so one is put in. A guard cannot start at a given step (its
        count comes back only with its own state): it counts from here, and says so."""
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks.setdefault(type(self).__name__, self.state())
        log.warning(
            "trimtab: resumed at step %d from a checkpoint with no trimtab state (written "
            "without TrimtabCallback): job %s starts as a new run, its steps counted from "
            "here (guard.global_step = state.global_step - %d)", step, self.job, step)

    def _close_interrupted(self) -> None:
        """Close the guard of a ``train()`` that never reached ``on_train_end`` (interrupted:
        Ctrl-C, an exception; then ``train()`` again on the same Trainer, as in a notebook):
        left open, its hooks would count the new run's steps on the reused optimizer beside
        the new guard's, under the same job."""
        guard = self.guard
        self._remove_forward_hook()
        self._shares = None
        if guard is not None and not guard._closed:
            log.warning("trimtab: the guard of an interrupted train() (job %s, step %d) was "
                        "still open; closing it", self.job, guard.global_step)
            guard.close("error: interrupted")

    def _remove_forward_hook(self) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The weight average's tensors (``ema=``) go into the checkpoint folder the Trainer
        just wrote (its trainer_state.json holds plain values only)."""
        guard = self.guard
        if guard is None or guard._closed or guard.ema_model is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(guard.ema_model.state_dict(), os.path.join(folder, EMA_FILE))

    def _observe(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any],
                 output: Any) -> None:
        guard = self.guard
        if not module.training or guard is None or guard._closed:
            return  # evaluation passes are not training steps
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        if kwargs.get("num_items_in_batch") is None:
            guard.observe_loss(loss)  # the micro-batch's mean: the step reports their mean
            return
        # The micro-batch's share of the step's token sum: the step's loss is their sum,
        # handed over before the optimizer step (on the device, no read).
        share = loss.detach().reshape(()).float()
        self._shares = share if self._shares is None else self._shares + share

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        shares, self._shares = self._shares, None
        guard = self.guard
        if shares is not None and guard is not None and not guard._closed:
            guard.observe_loss(shares)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        guard = self.guard
        if guard is not None and guard.should_stop and not control.should_training_stop:
            log.warning(
                "trimtab: stopping training on the controller's advice: %s", guard.stop_reason
            )
            control.should_training_stop = True
        return control

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # After train() too (the guard closed: trainer.evaluate() after training): the
        # guard sends it on a link of its own, to the ended run's results.
        if self.guard is None or self.monitor is None or not metrics:
            return
        value = metrics.get(self.monitor)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.guard.report_validation(float(value))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_forward_hook()
        if self.guard is not None:
            self.guard.close()


def _plain(value: Any) -> bool:
    """Whether ``value`` is a plain JSON value (what a TrainerState file can hold)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _saved_state(state: Any, name: str) -> dict[str, Any] | None:
    """trimtab's state in a resumed ``TrainerState`` (its ``stateful_callbacks``)."""
    entry = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    if not isinstance(entry, dict):
        return None
    saved = (entry.get("attributes") or {}).get("resume_state")
    return saved if isinstance(saved, dict) else None

