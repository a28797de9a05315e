"""Zero-code attach: a Guard driven by the optimizer's own step hooks (``hooks=True``).

For loops that cannot change: the loop keeps calling ``optimizer.step()``. A step
pre-hook (``Optimizer.register_step_pre_hook``) does what ``Guard.step`` does before
the update: it applies a pending command, measures the gradient norm on the device,
clips with the clip in force and arranges the non-finite handling; a step post-hook
probes the update and counts the step. The loss comes in with one call,
``guard.observe_loss(loss)``, any time between two steps (a tensor stays on its device).

The knobs go in last in the pre-hook and come out first in the post-hook: the step runs
with ``base x multiplier`` and the loop sees its own values again after it (see
:mod:`trimtab.client._knobs`).

The probe, the clip and the non-finite handling are ``Guard.step``'s own: the same
:class:`~trimtab.client._step.Step`. The guard's work before and after the optimizer
step comes in as two callables, so this module knows nothing of the guard itself.

A pre-hook cannot cancel the step, so a non-finite step is skipped per mode:

- ``"fused"`` (a fused optimizer): ``found_inf`` is set on the optimizer for that
  step, as ``GradScaler`` does; the kernel skips the update on the device, no sync.
- ``"skip"`` (the default on CPU): the norm is read on the host (one read per step,
  free on CPU); when it is not finite every gradient is set to ``None``, so
  ``optimizer.step()`` updates nothing: torch.optim's optimizers leave a parameter
  without a gradient alone (no update, no momentum, no weight decay, no step count).
  The gradients are gone after that step, as after ``zero_grad(set_to_none=True)``.
- ``"zero"`` (the default on an accelerator with a non-fused optimizer): as with
  ``Guard.step``, the gradients are zeroed on the device without a sync; momentum and
  decoupled weight decay still act for that step.

``optimizer.step(closure)`` (Lightning, closure-style loops): the gradients exist only
once the closure has run inside ``step()``, so the pre-hook wraps the closure and the
guard acts after its first call returns, before the update. A rollback drops the
step's gradients (``None``): that ``optimizer.step()`` updates nothing.

Losses: the step reports the mean of the losses observed since the previous step (one
per micro-batch when accumulating). A step with none reports no loss (the report's
loss fields are ``None``; the step is not counted as a non-finite loss), and the guard
warns once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ._probe import WindowStats
from ._step import Step

__all__ = ["Losses", "StepHooks", "check_callback_options"]

log = logging.getLogger("trimtab.client")


class StepHooks:
    """The step pre- and post-hooks of one guard's optimizer; ``remove()`` takes them off.

    ``prepare(loss)`` is the guard's work before the optimizer step (a command, the
    probe and clip of ``step``, the knobs engaged): it returns the step's norm and
    finiteness, or ``None`` when a rollback took the step. ``finish()`` is its work after
    the step (count, report, snapshot).

    >>> import torch
    >>> from trimtab.client import attach
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = attach(model, opt, job="demo", hooks=True, endpoint="tcp://127.0.0.1:5555")
    >>> for _ in range(3):
    ...     loss = model(torch.randn(8, 4)).pow(2).mean()
    ...     opt.zero_grad()
    ...     loss.backward()
    ...     guard.observe_loss(loss)
    ...     opt.step()
    >>> guard.global_step
    3
    >>> guard.close()
    >>> len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    (0, 0)
    """

    def __init__(
        self, step: Step,
        prepare: Callable[[torch.Tensor | float], tuple[torch.Tensor, torch.Tensor | None] | None],
        finish: Callable[[], None],
        recover: Callable[[], None] = lambda: None,
    ) -> None:
        self._step = step
        self._prepare = prepare
        self._finish = finish
        self._recover = recover  # closes a window an interrupted step left full (before
        # the loss is taken: its row is the next one)
        self._losses = Losses()
        #: Per probe row: whether that step had no observed loss (its NaN is not a bad loss).
        self._missing = [False] * len(step.probe.buf)
        self._armed = False  # the pre-part ran for the step in flight; the post-hook finishes it
        self._warned = False
        self._handles = _register(step.optimizer, self._pre, self._post)

    def observe(self, loss: torch.Tensor | float) -> None:
        """Add one loss to the step in progress (device ops only; no read)."""
        self._losses.observe(loss)

    def remove(self) -> None:
        """Take the hooks off the optimizer (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._disarm()

    def window_closed(self, stats: WindowStats) -> WindowStats:
        """Steps without an observed loss are reported without one, not as non-finite."""
        missing = sum(self._missing[: stats.steps])
        if not missing:
            return stats
        return replace(stats, nonfinite_losses=stats.nonfinite_losses - missing)

    # -- the hooks ----------------------------------------------------------------------------

    def _pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before()
            return None
        return self._wrap(closure, args, kwargs)

    def _wrap(self, closure: Callable[[], Any], args: tuple, kwargs: dict) -> tuple:
        fired = False

        def guarded() -> Any:
            nonlocal fired
            out = closure()
            if not fired:  # an optimizer may call the closure again; the guard acts once
                fired = True
                self._before()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": guarded}
        return (args[0], guarded, *args[2:]), kwargs

    def _before(self) -> None:
        if not self._handles:  # removed (the guard closed)
            return
        # A step that raised (or was interrupted) never reached its post-hook; it is not
        # counted, and a value the user wrote since is theirs (a stale release keeps it).
        self._disarm(stale=True)
        self._recover()
        loss = self._take_loss()
        grad = torch.is_grad_enabled()
        try:
            prepared = self._prepare(loss)
            if prepared is None:  # rolled back: gradients dropped, this step updates nothing
                return
            self._arm(*prepared)
        except Exception:  # trimtab never stops the run; this step goes on unguarded
            log.exception("trimtab step hook failed; the step goes on unguarded")
        finally:
            restore_grad_mode(grad)

    def _post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._step.act.release()  # the user's own lr and weight decay are back
        if not self._armed:
            return
        self._disarm()
        grad = torch.is_grad_enabled()
        try:
            self._finish()
        except Exception:
            log.exception("trimtab step hook failed after the step")
        finally:
            restore_grad_mode(grad)

    # -- helpers ------------------------------------------------------------------------------

    def _take_loss(self) -> torch.Tensor | float:
        mean = self._losses.take()
        self._missing[self._step.probe.row] = mean is None
        if mean is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "trimtab: optimizer.step() without guard.observe_loss(loss); "
                    "reports go without the loss"
                )
            return math.nan
        return mean

    def _arm(self, total: torch.Tensor, finite: torch.Tensor | None) -> None:
        step = self._step
        if step.arm(total, finite):
            # "skip" mode and not finite: without gradients the optimizer's step leaves
            # every parameter as it is.
            for group in step.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._armed = True

    def _disarm(self, stale: bool = False) -> None:
        self._step.act.release(stale)  # idempotent; a step that raised never reached _post
        self._step.disarm()
        self._armed = False


def restore_grad_mode(enabled: bool) -> None:
    """Put autograd's mode back as the loop had it. The guard's measurements run under
    ``torch.no_grad()``, whose enter and exit are not atomic against an interrupt: a
    notebook trial's Ctrl-C inside one left autograd off for the whole process (2 of 100
    interrupts; every later ``loss.backward()`` failed). A host flag, no device work."""
    if torch.is_grad_enabled() != enabled:
        torch.set_grad_enabled(enabled)


class Losses:
    """The losses handed over for the coming optimizer step (one per micro-batch when
    accumulating), summed on their device; :meth:`take` gives their mean and starts again."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._n = 0

    def observe(self, loss: torch.Tensor | float) -> None:
        """Add one loss (device ops only; no read)."""
        if isinstance(loss, bool) or not isinstance(loss, (torch.Tensor, int, float)):
            raise ValueError(f"loss={loss!r} is invalid; allowed: a scalar tensor or a number")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            value = loss.detach().reshape(()).float()
        else:
            value = torch.tensor(float(loss))
        if self._sum is not None and self._sum.device != value.device:
            value = value.to(self._sum.device, non_blocking=True)
        self._sum = value if self._sum is None else self._sum + value
        self._n += 1

    def take(self) -> torch.Tensor | None:
        """The mean of the losses observed since the last take (``None``: none)."""
        total, n = self._sum, self._n
        self._sum, self._n = None, 0
        return total if total is None or n == 1 else total / n


def _register(opt: torch.optim.Optimizer, pre: Callable[..., Any],
              post: Callable[..., Any]) -> list[Any]:
    """The step hooks' handles on ``opt``; an optimizer that takes no step hooks (a wrapper
    that skips ``Optimizer.__init__`` and holds its optimizer where trimtab does not look)
    is refused, with nothing left registered."""
    handles: list[Any] = []
    try:
        handles.append(opt.register_step_pre_hook(pre))
        handles.append(opt.register_step_post_hook(post))
    except (AttributeError, TypeError):
        for handle in handles:
            handle.remove()
        raise ValueError(
            f"optimizer={type(opt).__name__} is invalid with hooks=True: it takes no step "
            f"hooks; allowed: a torch.optim.Optimizer, or a wrapper that holds one "
            "as .optimizer (accelerate's AcceleratedOptimizer)"
        ) from None
    return handles


def check_callback_options(monitor: object, options: dict[str, object]) -> None:
    """Refuse what a framework callback (Lightning's, Hugging Face's) cannot take: ``hooks``
    (always on: the framework calls ``optimizer.step()`` itself) and a ``monitor`` that is
    not a metric name."""
    if "hooks" in options:
        raise ValueError(
            f"hooks={options['hooks']!r} is invalid; allowed: leave it out "
            "(the callback always uses the optimizer's step hooks)"
        )
    if monitor is not None and not isinstance(monitor, str):
        raise ValueError(f"monitor={monitor!r} is invalid; allowed: None or a metric name")
