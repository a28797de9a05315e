"""attach() and Guard: the two lines a training loop needs.

The guard replaces ``optimizer.step()``. Per step it applies a pending command,
measures and clips the gradient on the device, skips a step whose gradients
are not finite, steps the optimizer and probes; per report window it sends one
report. Nothing it does waits on the controller.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import weakref
from types import TracebackType
from typing import Any

import torch
import zmq

from . import wire
from ._knobs import apply_knobs, check_optimizer, read_knobs
from ._probe import Grads, Probe
from ._transport import Transport

__all__ = ["attach", "Guard", "NONFINITE_MODES"]

log = logging.getLogger("trimtab.client")

#: Allowed values of ``nonfinite``.
NONFINITE_MODES: tuple[str, ...] = ("auto", "skip", "zero")


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _is_int(x: object, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _check_options(
    job: str, report_every: int, clip: float | None, batch_size: int | None,
    heartbeat_s: float, queue_size: int, nonfinite: str, liveness: int,
) -> None:
    try:
        wire.Heartbeat(job=job)
    except Exception:
        raise _invalid("job", job, "1-128 characters of A-Za-z0-9_.:@/-") from None
    checks = [
        ("report_every", report_every, _is_int(report_every, 1), "an int >= 1"),
        ("clip", clip, clip is None or _is_positive(clip), "None or a finite number > 0"),
        ("batch_size", batch_size, batch_size is None or _is_int(batch_size, 1),
         "None or an int >= 1"),
        ("heartbeat_s", heartbeat_s, _is_positive(heartbeat_s), "a number of seconds > 0"),
        ("queue_size", queue_size, _is_int(queue_size, 1), "an int >= 1"),
        ("nonfinite", nonfinite, nonfinite in NONFINITE_MODES, ", ".join(NONFINITE_MODES)),
        ("liveness", liveness, _is_int(liveness, 1), "an int >= 1"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise _invalid(name, value, allowed)


def _resolve_mode(nonfinite: str, optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """How a non-finite step is skipped: "fused", "skip" (host check) or "zero"."""
    if nonfinite == "zero":
        return "zero"
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return "fused"  # exact and sync-free: the fused kernel reads found_inf on the device
    if nonfinite == "skip" or device.type == "cpu":
        return "skip"
    return "zero"


def _facts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int | None
) -> tuple[wire.ScaleFacts, torch.device]:
    group_sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    if first is None:
        first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    facts = wire.ScaleFacts(
        param_count=sum(group_sizes), group_sizes=group_sizes, world_size=world,
        optimizer=type(optimizer).__name__, dtype=dtype, device=str(device)[:32],
        batch_size=batch_size,
    )
    return facts, device


class Guard:
    """Steps an optimizer for a training loop and keeps a trimtab controller informed.

    ``guard.step(loss)`` replaces ``optimizer.step()`` after ``loss.backward()``. It
    applies the newest controller command at the step boundary, computes the global
    gradient norm before clipping, clips to ``clip`` (as
    ``torch.nn.utils.clip_grad_norm_`` does), skips the step when the gradients are not
    finite, steps the optimizer and probes. Every ``report_every`` steps one report goes
    to the controller through a background thread; a controller that is absent, slow or
    restarting never blocks, slows or stops training.

    Knobs with several param groups: the job's ``lr`` and ``weight_decay`` are group
    0's. A command scales every group by ``target / group-0 value``, so groups keep
    their ratios and a group at 0 stays at 0 (when group 0's lr is 0 every group gets
    the target lr; when group 0's weight decay is 0 only group 0 changes). ``momentum``
    (``momentum``, or ``betas[0]`` for the Adam family) is set absolutely in every group
    that has one. ``clip`` is this guard's own threshold (``None``: no clipping); a
    command's ``None`` leaves a knob unchanged.

    Non-finite gradients: with a fused optimizer the step is skipped on the device
    (``found_inf``, as ``GradScaler`` does); on CPU the flag is read on the host and
    ``optimizer.step()`` is not called; on an accelerator with a non-fused optimizer
    ``nonfinite="zero"`` (the default there) zeroes that step's gradients without a sync
    (momentum and decoupled weight decay still act), while ``"skip"`` skips exactly at
    the cost of one sync per step. Skipped steps do not count in ``global_step``.

    >>> import torch
    >>> from trimtab.client import attach
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> with attach(model, opt, job="demo", endpoint="tcp://127.0.0.1:5555") as guard:
    ...     for _ in range(3):
    ...         loss = model(torch.randn(8, 4)).pow(2).mean()
    ...         opt.zero_grad()
    ...         loss.backward()
    ...         guard.step(loss)
    >>> guard.global_step
    3
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        job: str,
        endpoint: str = "tcp://127.0.0.1:5555",
        report_every: int = 10,
        clip: float | None = None,
        batch_size: int | None = None,
        heartbeat_s: float = 1.0,
        queue_size: int = 64,
        context: zmq.Context | None = None,
        nonfinite: str = "auto",
        liveness: int = 3,
        reconnect_max_s: float = 32.0,
    ) -> None:
        _check_options(job, report_every, clip, batch_size, heartbeat_s, queue_size,
                       nonfinite, liveness)
        check_optimizer(optimizer)
        self.model = model
        self.optimizer = optimizer
        self.job = job
        self.run_id = uuid.uuid4().hex
        self.report_every = report_every
        #: The clipping threshold in force (``None``: off); a command may change it.
        self.clip: float | None = None if clip is None else float(clip)
        #: Sequence number of the last command applied (0: none).
        self.applied_seq = 0
        self.facts, device = _facts(model, optimizer, batch_size)
        self.nonfinite_mode = _resolve_mode(nonfinite, optimizer, device)
        self._probe = Probe(optimizer, report_every, device)
        self._calls = 0
        self._skipped_closed = 0  # skips in windows already reduced
        self._open_skips_host = 0  # skips in the open window seen on the host ("skip" mode)
        self._report_seq = 0
        self._window_start = time.perf_counter()
        self._knobs = read_knobs(optimizer, self.clip)
        self._closed = False
        self._transport = Transport(
            endpoint, job, register=self._registration, step=self._host_step,
            context=context, heartbeat_s=heartbeat_s, liveness=liveness,
            queue_size=queue_size, reconnect_max_s=reconnect_max_s,
        )
        self._transport.start()
        # A script that ends without close() still says Bye and stops the thread at exit.
        self._finalizer = weakref.finalize(
            self, self._transport.close, wire.Bye(job=job, reason="exit")
        )

    # -- the step -----------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float) -> None:
        """Apply a pending command, clip, step the optimizer (unless non-finite) and probe."""
        if self._closed:
            raise RuntimeError("Guard.step() after close()")
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self._apply_command()
        probe = self._probe
        closing = probe.full
        grads = probe.grads()
        total = probe.measure(loss, grads)
        # Only the device-side skip paths need finiteness as a tensor; "skip" reads the norm.
        finite = None if self.nonfinite_mode == "skip" else torch.isfinite(total)
        self._clip(grads, total, finite)
        if closing:  # the window's one sampled update, for ||delta theta|| / ||theta||
            probe.snapshot()
        self._optimizer_step(total, finite)
        if closing:
            probe.update_ratio()
        probe.advance()
        self._calls += 1
        if closing:
            self._close_window()

    def _clip(self, grads: Grads, total: torch.Tensor, finite: torch.Tensor | None) -> None:
        coef: torch.Tensor | None = None
        if self.clip is not None:
            # clip_grad_norm_'s math; clamping instead of branching keeps it sync-free.
            coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
        if finite is not None and self.nonfinite_mode == "zero":
            # NaN * 0 is NaN, so clean the grads first; then a non-finite step scales by 0.
            for by_device in grads:
                for gs in by_device.values():
                    for g in gs:
                        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            keep = finite.float() if coef is None else coef
            coef = torch.where(finite, keep, torch.zeros_like(keep))
        if coef is None:
            return
        for by_device in grads:
            for device, gs in by_device.items():
                torch._foreach_mul_(gs, coef.to(device))

    def _optimizer_step(self, total: torch.Tensor, finite: torch.Tensor | None) -> None:
        opt = self.optimizer
        if finite is not None and self.nonfinite_mode == "fused":
            # GradScaler's protocol: the fused kernel skips the update where found_inf is 1.
            opt.found_inf = (~finite).float()  # type: ignore[attr-defined]
            opt.grad_scale = None  # type: ignore[attr-defined]
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale  # type: ignore[attr-defined]
        elif self.nonfinite_mode == "skip":
            # One read per step: free on CPU (no device queue to wait for); on an accelerator
            # this is the sync the user chose with nonfinite="skip".
            if not math.isfinite(total.item()):
                self._open_skips_host += 1
                return
            opt.step()
        else:
            opt.step()

    # -- commands and reports ----------------------------------------------------------------

    def _apply_command(self) -> None:
        command = self._transport.take_command()
        if command is None:
            return
        if command.seq > self.applied_seq:
            try:
                clip = command.knobs.clip
                if clip is not None and not clip > 0:
                    raise ValueError(f"clip={clip!r} is out of range; allowed: clip > 0")
                apply_knobs(self.optimizer, command.knobs)
                if clip is not None:
                    self.clip = clip
            except ValueError as exc:
                log.warning("command %d not applied: %s", command.seq, exc)
            self.applied_seq = command.seq
        # A repeated or old command is acknowledged again with what is in force, not re-applied.
        self._knobs = read_knobs(self.optimizer, self.clip)
        ack = wire.Ack(job=self.job, seq=command.seq, step=self._host_step(), knobs=self._knobs)
        self._transport.put_control(ack)

    def _close_window(self) -> None:
        try:
            stats = self._probe.collect()
            self._skipped_closed += stats.nonfinite_grads
            self._open_skips_host = 0
            if stats.steps == 0:
                return
            now = time.perf_counter()
            step_time, self._window_start = (now - self._window_start) / stats.steps, now
            self._knobs = read_knobs(self.optimizer, self.clip)  # an LR scheduler may move them
            self._report_seq += 1
            report = wire.Report(
                job=self.job, seq=self._report_seq, step=self._host_step(), window=stats.steps,
                loss_mean=stats.loss_mean, loss_last=stats.loss_last, loss_min=stats.loss_min,
                loss_max=stats.loss_max, grad_norm_mean=stats.grad_norm_mean,
                grad_norm_max=stats.grad_norm_max, grad_norm_std=stats.grad_norm_std,
                group_grad_norms=stats.group_grad_norms, update_ratio=stats.update_ratio,
                nonfinite_losses=stats.nonfinite_losses, nonfinite_grads=stats.nonfinite_grads,
                skipped_steps=stats.nonfinite_grads, step_time_s=step_time, knobs=self._knobs,
                dropped_reports=self._transport.dropped, applied_seq=self.applied_seq,
            )
        except Exception:  # a report that cannot be built must not stop training
            log.exception("trimtab could not build a report; window dropped")
            return
        self._transport.put_report(report)

    def _registration(self) -> wire.Register:
        # Called from the transport thread; reads only values the training thread swaps whole.
        return wire.Register(
            job=self.job, run_id=self.run_id, step=self._host_step(),
            report_every=self.report_every, facts=self.facts, knobs=self._knobs,
            applied_seq=self.applied_seq,
        )

    def _host_step(self) -> int:
        """global_step as far as the host knows without reading the device."""
        return self._calls - self._skipped_closed - self._open_skips_host

    # -- state --------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (mid-window on the sync-free paths: one sync)."""
        if self.nonfinite_mode == "skip" or self._closed:
            return self._skipped_closed + self._open_skips_host
        return self._skipped_closed + self._probe.skips_so_far()

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (skipped steps not counted)."""
        return self._calls - self.skipped_steps

    @property
    def knobs(self) -> wire.Knobs:
        """The knob values in force now, read from the optimizer."""
        return read_knobs(self.optimizer, self.clip)

    @property
    def dropped_reports(self) -> int:
        """Reports dropped because the send queue was full."""
        return self._transport.dropped

    @property
    def bad_frames(self) -> int:
        """Frames from the controller that did not decode and were ignored."""
        return self._transport.bad_frames

    @property
    def connected(self) -> bool:
        """Whether the controller was heard from within the liveness window."""
        return self._transport.connected

    def close(self, reason: str = "closed") -> None:
        """Report the open window, say Bye and stop the thread (waits at most about 1 s)."""
        if self._closed:
            return
        if self._probe.row:
            self._close_window()  # the last, partial window: one sync, at the end of the run
        self._closed = True
        self._finalizer.detach()
        self._transport.close(wire.Bye(job=self.job, step=self._host_step(), reason=reason[:1024]))

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close("closed" if exc_type is None else f"error: {exc_type.__name__}")


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Guard:
    """Attach a training loop to a trimtab controller: ``Guard(model, optimizer, **options)``.

    ``options`` are :class:`Guard`'s keyword arguments (``job`` is required).

    >>> guard = attach(model, optimizer, job="gpt-small", clip=1.0)  # doctest: +SKIP
    >>> loss.backward(); guard.step(loss)  # doctest: +SKIP
    """
    return Guard(model, optimizer, **options)
