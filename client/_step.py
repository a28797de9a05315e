"""One optimizer step's own work, shared by ``Guard.step`` and the step hooks.

Both ways of driving a guard (the loop calls ``guard.step(loss)``, or it calls
``optimizer.step()`` and the optimizer's step hooks act around it, see
:mod:`trimtab.client._hooks`) run the same :class:`Step`: it probes the gradients on the
device, clips them with the clip in force, arranges the non-finite handling for the
optimizer step about to run, and counts the steps taken and skipped. What is around it
(commands, snapshots, reports) is the guard's; nothing here talks to the controller.

Non-finite gradients, per mode (chosen by ``_options._resolve_mode``):

- ``"fused"``: ``found_inf`` is set on the optimizer for that step, as ``GradScaler``
  does; the fused kernel skips the update on the device, no sync.
- ``"skip"``: the norm is read on the host (free on CPU; elsewhere the sync the user
  chose) and :meth:`Step.arm` says to skip the step; the skip is counted on the host.
- ``"zero"``: the gradients are zeroed on the device without a sync (in the clip);
  momentum and decoupled weight decay still act for that step.

A ``GradScaler`` (``torch.amp``) drives the step when the loop calls
``scaler.step(optimizer)`` with ``hooks=True``. For a non-fused optimizer it unscales the
gradients first and calls ``optimizer.step()`` only when they are finite: the hooks see
unscaled gradients, and an overflow step never reaches them. For an optimizer that takes
``found_inf`` itself (a fused one) it sets ``found_inf`` and ``grad_scale`` on the
optimizer and calls ``step()`` every time; :meth:`Step.measure` then divides the norms by
``grad_scale`` (the gradients stay scaled: the kernel unscales them, and a clip's factor
applies the same to scaled and unscaled ones), leaves the scaler's ``found_inf`` in charge
and has the probe mark the row with it. When the window closes, the scaler's skips are
taken off :attr:`Step.calls`: either way a step the scaler skipped is not an optimizer
step, not a skip of trimtab's and not a non-finite gradient. Nothing here unscales.

The host knows ``global_step`` without reading the device: in ``"skip"`` mode at every
step, on the sync-free paths at each window's end (:meth:`Step.window_closed`).

>>> import torch
>>> from trimtab.client._knobs import Actuator
>>> from trimtab.client._probe import Probe
>>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([p], lr=0.1)
>>> step = Step(opt, Probe(opt, 4, p.device), Actuator(opt, clip=1.0), mode="skip")
>>> p.grad = torch.full((2,), 3.0)
>>> total, finite = step.measure(torch.tensor(0.5), step.take_micro())
>>> step.run(total, finite); step.finish()
False
>>> round(float(total), 4), step.host_step, round(p.grad.norm().item(), 4)
(4.2426, 1, 1.0)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._knobs import Actuator
from ._probe import Grads, Probe

__all__ = ["Step"]


class Step:
    """Probe, clip and non-finite handling of one optimizer's steps, and their counts."""

    def __init__(self, optimizer: torch.optim.Optimizer, probe: Probe, act: Actuator,
                 mode: str, driver: Any = None) -> None:
        self.optimizer = optimizer
        #: What :meth:`run` steps: a wrapper of ``optimizer`` (accelerate's, see
        #: :mod:`trimtab.client._wrapped`), or ``None``: the optimizer itself.
        self.driver = driver
        self.probe = probe
        #: The knobs; :meth:`measure` clips with ``act.clip``.
        self.act = act
        #: The non-finite mode: ``"fused"``, ``"skip"`` or ``"zero"``.
        self.mode = mode
        #: Calls that reached the optimizer step (skipped ones included), less those a
        #: ``GradScaler`` skipped once a window's end told the host of them.
        self.calls = 0
        self.skipped_closed = 0  # skips in windows already reduced
        self.open_skips = 0  # skips in the open window seen on the host ("skip" mode)
        self._found_inf: torch.Tensor | None = None  # the fused step's skip flag, reused
        self._clip_t: tuple[float, torch.Tensor] | None = None  # the clip on the device
        self._fused = False  # found_inf is set on the optimizer for the step in flight
        #: Whether the step in flight updates the weights, for what follows it (the weight
        #: average): its finiteness on the device (``"fused"``, ``"zero"``), ``None`` when
        #: the host knows it is taken, ``False`` when the host skips it (``"skip"``).
        self.taken: torch.Tensor | bool | None = None
        self._micro_calls = 0  # note_micro_batch() calls since the last step
        self._micro_first: torch.Tensor | None = None
        self._micro_counts: list[int] = []  # micro-batches per noted step, this window

    @property
    def host_step(self) -> int:
        """``global_step`` as far as the host knows without reading the device."""
        return self.calls - self.skipped_closed - self.open_skips

    def skipped(self, closed: bool) -> int:
        """Steps skipped so far (mid-window on the sync-free paths: one sync, unless
        ``closed``: the guard is closed and its last window reduced)."""
        if self.mode == "skip" or closed:
            return self.skipped_closed + self.open_skips
        return self.skipped_closed + self.probe.skips_so_far()

    # -- micro-batches ------------------------------------------------------------------------

    def note_micro_batch(self) -> None:
        """After the first micro-batch of a step, its gradient norm on the device (no
        sync); the rest only count."""
        self._micro_calls += 1
        if self._micro_calls == 1:
            with torch.no_grad():
                norm = self.probe.total_norm(self.probe.grads())
                self._micro_first = norm * norm

    def take_micro(self) -> tuple[int, torch.Tensor | None]:
        """The micro-batches noted for the coming step and the first one's squared norm;
        the count starts again for the next step."""
        micro = self._micro_calls, self._micro_first
        self._micro_calls, self._micro_first = 0, None
        return micro

    def take_micro_counts(self) -> list[int]:
        """Micro-batches per noted step of the window just closed."""
        counts, self._micro_counts = self._micro_counts, []
        return counts

    # -- the step -----------------------------------------------------------------------------

    def measure(
        self, loss: torch.Tensor | float, micro: tuple[int, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probe and clip this step's gradients; the global norm before clipping and, on
        the device-side skip paths, its finiteness as a tensor (``"skip"`` reads the norm)."""
        probe = self.probe
        closing = probe.full
        grads = probe.grads()
        # Set here, before arm(), only by a GradScaler stepping an optimizer that takes
        # found_inf itself (see the module's docstring).
        scaler_inf = getattr(self.optimizer, "found_inf", None)
        total = probe.measure(loss, grads, getattr(self.optimizer, "grad_scale", None))
        if isinstance(scaler_inf, torch.Tensor):
            probe.note_scaler(scaler_inf)
        finite = None if self.mode == "skip" else torch.isfinite(total)
        n, first = micro
        if n >= 2 and first is not None:
            # |g_1|^2 of the first micro-batch in the accumulated gradient's units: the
            # accumulated gradient after one micro-batch is g_1 / n with a loss divided by
            # n (g_1 without), and n^2 puts both conventions on the scale of the total.
            probe.note_micro(first * float(n * n))
            self._micro_counts.append(n)
        self._clip(grads, total, finite, probe.flat)
        if closing:  # the window's one sampled update, for ||delta theta|| / ||theta||
            probe.snapshot()
        return total, finite

    def _clip(self, grads: Grads, total: torch.Tensor, finite: torch.Tensor | None,
              flat: list[torch.Tensor] | None = None) -> None:
        """Scale the gradients by the clip's factor (and, in ``"zero"`` mode, by 0 on a
        non-finite step) in one foreach call per device; ``flat``: all of them, on one
        device (as the probe measured them)."""
        coef: torch.Tensor | None = None
        clip = self.act.clip
        if clip is not None and clip > 0:
            # clip / max(norm, clip): 1 exactly up to the clip, clip / norm above it, 0 for an
            # infinite norm, NaN for a NaN one; two ops on a clip kept on the device, and no
            # branch (a branch would read the device). clip_grad_norm_ divides by norm + 1e-6.
            at = self._clip_on(clip, total.device)
            coef = at / torch.maximum(total, at)
        elif clip is not None:
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        if finite is not None and self.mode == "zero":
            # NaN * 0 is NaN, so clean the grads first; then a non-finite step scales by 0.
            # (torch has no foreach nan_to_num: one call per gradient.)
            for by_device in grads:
                for gs in by_device.values():
                    for g in gs:
                        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            # Without a clip: 1 on a finite step, 0 on a non-finite one; with a clip: its
            # factor on a finite step, 0 on a non-finite one (whose factor may be NaN).
            coef = finite.float() if coef is None else torch.where(finite, coef, 0.0)
        if coef is None:
            return
        if flat is not None:
            torch._foreach_mul_(flat, coef)
            return
        # One foreach call per device over every group's gradients.
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in grads:
            for device, gs in group.items():
                if device in by_device:
                    by_device[device] = by_device[device] + gs
                else:
                    by_device[device] = gs
        for device, gs in by_device.items():
            if gs:
                torch._foreach_mul_(gs, coef if device == coef.device else coef.to(device))

    def _clip_on(self, clip: float, device: torch.device) -> torch.Tensor:
        """The clip as a tensor on ``device``, made again only when it changes."""
        kept = self._clip_t
        if kept is None or kept[0] != clip or kept[1].device != device:
            kept = self._clip_t = (clip, torch.full((), clip, dtype=torch.float32,
                                                   device=device))
        return kept[1]

    def arm(self, total: torch.Tensor, finite: torch.Tensor | None) -> bool:
        """Arrange the non-finite handling for the optimizer step about to run; True: the
        step must not update anything (``"skip"`` mode, counted here). :meth:`disarm`
        after the step."""
        opt = self.optimizer
        self.taken = finite
        if self.mode == "fused" and finite is not None and not hasattr(opt, "found_inf"):
            # GradScaler's protocol: the fused kernel skips the update where found_inf is 1
            # (a GradScaler that set its own already skips non-finite steps: left alone).
            opt.found_inf = self._found_inf_of(finite)  # type: ignore[attr-defined]
            opt.grad_scale = None  # type: ignore[attr-defined]
            self._fused = True
        elif self.mode == "skip" and not math.isfinite(total.item()):
            # One read per step: free on CPU (no device queue to wait for); on an
            # accelerator this is the sync the user chose with nonfinite="skip".
            self.open_skips += 1
            self.taken = False
            return True
        return False

    def disarm(self) -> None:
        """Take off what :meth:`arm` set on the optimizer (idempotent)."""
        if self._fused:
            opt = self.optimizer
            for name in ("found_inf", "grad_scale"):
                if hasattr(opt, name):
                    delattr(opt, name)
            self._fused = False

    def run(self, total: torch.Tensor, finite: torch.Tensor | None) -> None:
        """The optimizer step itself, armed (``Guard.step``; the hooks' loop steps itself)."""
        try:
            if not self.arm(total, finite):
                (self.optimizer if self.driver is None else self.driver).step()
        finally:
            self.disarm()

    def _found_inf_of(self, finite: torch.Tensor) -> torch.Tensor:
        """``found_inf`` for a fused step: 1.0 where ``finite`` is False; one op, into a
        float32 buffer made once (the kernel reads it in stream order, before the next
        step writes it again)."""
        buf = self._found_inf
        if buf is None or buf.device != finite.device:
            buf = self._found_inf = torch.empty((), dtype=torch.float32, device=finite.device)
        return torch.logical_not(finite, out=buf)

    def finish(self) -> bool:
        """After the optimizer step: probe the update and count the step; True when the
        step closed the report window (the caller collects it)."""
        probe = self.probe
        closing = probe.full
        if closing:
            probe.update_ratio()
        probe.advance()
        self.calls += 1
        return closing

    # -- windows and rollbacks ----------------------------------------------------------------

    def window_closed(self, skipped: int, scaler_skips: int = 0) -> None:
        """A window was reduced with ``skipped`` non-finite steps and ``scaler_skips`` steps
        a ``GradScaler`` skipped: the host now knows them."""
        self.skipped_closed += skipped
        self.open_skips = 0
        self.calls -= scaler_skips  # not optimizer steps at all

    def restart(self, calls: int, step: int) -> None:
        """After a rollback: the checkpoint's counts; the open window is discarded."""
        self.calls = calls
        self.skipped_closed, self.open_skips = calls - step, 0
        self.probe.reset()
        self.act.take_window_lr()  # the discarded window's lrs
        self._micro_counts = []
