"""attach() and Guard: the two lines a training loop needs.

The guard replaces ``optimizer.step()``. Per step it applies a pending command,
measures and clips the gradient on the device, skips a step whose gradients
are not finite, steps the optimizer and probes; per report window it sends one
report. Nothing it does waits on the controller. Every ``checkpoint_every`` steps it
snapshots the run; a controller's command can mark a snapshot stable or roll the run
back to a stable one.

The guard is a facade over its parts: the step in :mod:`~trimtab.client._step`, the
commands in :mod:`~trimtab.client._commands`, the snapshots and rollbacks in
:mod:`~trimtab.client._checkpointing`, the report windows in
:mod:`~trimtab.client._report_window`; its properties are
:class:`~trimtab.client._guard_state.GuardState`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import zmq

from trimtab.protocol import wire

from ._checkpoint import CheckpointStore
from ._checkpointing import Checkpointing, open_store
from ._commands import Commands
from ._compiled import CompileNote
from ._dist import DistLink, param_checksum, rank_directory, replicated_params
from ._ema import Ema, check_decay
from ._guard_state import GuardState
from ._hooks import Losses, StepHooks, restore_grad_mode
from ._knobs import Actuator, check_optimizer, lr_spread, nominal_lr
from ._options import (
    NONFINITE_MODES,
    _check_checkpoint_options,
    _check_extra_state,
    _check_options,
    _check_switches,
    _check_validation,
    _facts,
    _invalid,
    _refused,
    _resolve_mode,
    _shown,
    check_endpoint,
    check_pairing,
    ring_too_short,
)
from ._probe import Probe
from ._report import Reporter
from ._report_window import ReportWindow
from ._resume import load_state, run_state, state_of
from ._scheduler_hold import SchedulePattern
from ._sharded import ShardNorms, is_sharded
from ._step import Step
from ._transport import Transport, load_curve_keys
from ._wrapped import check_wrapper, syncs, unwrap

__all__ = ["attach", "Guard", "NONFINITE_MODES"]

log = logging.getLogger("trimtab.client")


class Guard(GuardState):
    """Steps an optimizer for a training loop and keeps a trimtab controller informed.

    ``guard.step(loss)`` replaces ``optimizer.step()`` after ``loss.backward()``. It
    applies the newest controller command at the step boundary, computes the global
    gradient norm before clipping, clips to ``clip`` (as
    ``torch.nn.utils.clip_grad_norm_`` does), skips the step when the gradients are not
    finite, steps the optimizer and probes. Every ``report_every`` steps one report goes
    to the controller through a background thread; a controller that is absent, slow or
    restarting never blocks, slows or stops training.

    The knob model (see :mod:`trimtab.client._knobs`): the loop's code or scheduler owns
    each param group's ``lr`` and ``weight_decay``; trimtab's are multipliers on them,
    put in just before the optimizer step and taken off right after it, so every group
    keeps its ratio to the others and the loop sees its own values between steps. The
    job's ``lr`` and ``weight_decay`` are group 0's. ``momentum`` (``momentum``, or
    ``betas[0]`` for the Adam family) is absolute, put in around the step in every group
    that has one once commanded. ``clip`` is this guard's own threshold (``None``: no
    clipping); a command's ``None`` leaves a knob unchanged. A command's ack goes out with
    the first optimizer step that runs with it, stating that step's values.

    Non-finite gradients: with a fused optimizer the step is skipped on the device
    (``found_inf``, as ``GradScaler`` does); on CPU the flag is read on the host and
    ``optimizer.step()`` is not called; on an accelerator with a non-fused optimizer
    ``nonfinite="zero"`` (the default there) zeroes that step's gradients without a sync
    (momentum and decoupled weight decay still act), while ``"skip"`` skips exactly at
    the cost of one sync per step. Skipped steps do not count in ``global_step``.

    Checkpoints (``checkpoint_every > 0``): at attach, then after the optimizer step
    whenever ``global_step`` reaches the next multiple of ``checkpoint_every``, the guard
    snapshots model, optimizer, ``scheduler``, RNG states (torch, CUDA, numpy,
    ``random``), ``clip`` and its step counters: the ``keep`` newest in host memory plus
    the newest stable one and, with ``checkpoint_dir``, each also in an atomically
    written, checksummed file (see :class:`~trimtab.client.CheckpointStore`). On the
    sync-free device paths the host learns of skipped steps when a report window
    closes, so there a snapshot waits for the first window end past the multiple. On
    CUDA the copies run on a side stream into pinned buffers allocated ahead of need in
    the background; a snapshot due before its buffers exist waits for the next chance.
    ``memory_keep`` (default ``keep``; fewer needs ``checkpoint_dir``) bounds the
    snapshots held in host memory: older ones, once written, live on disk only.

    Rollback: a command's ``mark_stable`` marks a checkpoint stable (a rollback
    target); its ``rollback_to`` restores a stable one at this step boundary (a step
    not held, or not stable, restores nothing: the ack's ``error`` says why, and the
    command's knobs still apply). That
    ``guard.step()`` then drops its gradients (they come from the abandoned trajectory)
    and takes no step; ``global_step`` is the checkpoint's, the open report window is
    discarded, the command's knobs are applied over the restored ones (multipliers,
    momentum and clip come back with the checkpoint; the loop's own lr with the
    optimizer's and the scheduler's state), the restored checkpoint's file is told the
    values the run goes on with, and then ``on_rollback(step)`` is called. The
    data stream is not rewound (the batches since the checkpoint are skipped); reposition
    a loader in ``on_rollback`` to replay them. With ``reseed_on_rollback`` (the default)
    the restored RNG states are re-seeded from themselves and the rollback count (see
    :func:`~trimtab.client._checkpoint.reseed_rng`), so that a loop drawing its batches
    from torch's RNG does not draw the ones that led to the fault again; ``False`` restores
    them exactly (the same draws again).

    Weight averaging (``ema``: a decay strictly between 0 and 1, e.g. ``0.999``; ``None``,
    the default: off): after each optimizer step taken, an exponential moving average of
    the model's weights and buffers is updated on the device without a sync; a skipped step
    (non-finite gradients, on every path) is not averaged in. ``guard.ema_model`` is the
    average, a ``torch.optim.swa_utils.AveragedModel``: evaluate it and report its result
    beside the raw one with ``report_validation(value, ema=...)``. It is snapshotted and
    rolled back with the model, and ``load_stable(d).restore(..., ema=guard.ema_model)``
    puts it back on resume. See :mod:`trimtab.client._ema`.

    ``loss_trend=False`` says the loss is not expected to fall as the run learns (a
    policy-gradient loss such as PPO's, whose value term grows with the returns; a GAN's
    generator): the controller then draws nothing from its trend or curve (no ``climb``
    rollback, no range test, no plateau cut); non-finite values and spikes are still
    rolled back. Left out (``None``), it is True, unless another guard attached by the same
    thread is open (a GAN's two optimizers, an actor-critic's): then both register False.
    Guards attached by different threads (a sweep's concurrent trials) are separate runs.
    A guard is refused on an optimizer another open guard steers, and for a model none of
    whose parameters the optimizer steps.

    The loop's own state (``extra_state``: a dict of name -> object with ``state_dict()``
    and ``load_state_dict()``, e.g. ``{"swa": swa_model, "swa_sched": swalr, "ema":
    timm_model_ema}``): every snapshot holds each object's ``state_dict()`` as it is when
    the optimizer step at the snapshot's step is done (before what the loop does after
    ``guard.step()``), copied as the model's state is (no host sync; on CUDA into pinned
    buffers, in stream order on the training stream, since the loop changes them between
    steps), and a rollback puts it back with ``load_state_dict`` (a module's copies into its
    tensors; any other object gets a copy, so the checkpoint stays intact), so it is at the
    model's step again; the files hold it too, and ``load_stable(d).restore(...,
    extra_state={...})`` puts it back on resume. A checkpoint that holds no state for a name
    leaves that object as it is (a warning names it); an object whose ``load_state_dict``
    raises is reported in the rollback's ack, the rest restored. Refused at attach: an
    object without the two methods, one given twice or that the guard restores anyway (the
    model, the optimizer, the scheduler), one whose ``state_dict()`` is not a dict or, with
    ``checkpoint_dir``, holds what a file cannot (it loads with ``weights_only=True``); and
    any with an FSDP2-sharded model.

    CURVE (a controller configured with keys): ``server_key`` is the controller's
    ``server.key`` and ``client_key`` this client's ``clients/NAME.key_secret``, both from
    ``trimtab keys generate``; the link is then authenticated and encrypted.

    LR schedulers: any schedule composes (the knob model), and nothing needs the
    scheduler for that; pass ``scheduler=`` so that a rollback restores its state (the
    schedule's position) with the model and optimizer, and call ``scheduler.step()``
    after ``guard.step()``.

    Live schedules: a command may hand over the controller's schedules (an lr multiplier,
    and momentum for OneCycle); from then on the guard evaluates them before every
    optimizer step at ``global_step`` (host arithmetic, no device read; see
    :mod:`trimtab.client._live_schedule`) until a newer command replaces them.

    Under ``torch.distributed`` (an initialised process group of more than one rank, e.g.
    DDP under ``torchrun``) attach on every rank with the same options: only rank 0 talks to
    the controller; each report carries the loss averaged over ranks (one all-reduce per
    report); each command is broadcast from rank 0 at a report boundary and applied by every
    rank at the same step, acknowledged once; checkpoint files go to
    ``checkpoint_dir/rank-<r>``. Gradients must be in sync across ranks before ``step``
    (DDP does that), and every rank must step and ``close()`` in lockstep. A model sharded
    with FSDP2's ``fully_shard`` gets global gradient norms and sharded checkpoints (DCP
    directories ``checkpoint_dir/step-<N>``): see :mod:`trimtab.client._sharded`.

    Mixed precision, compiled models, accumulation (docs/adapters.md has the recipes): with
    a ``torch.amp.GradScaler`` attach with ``hooks=True`` and keep ``scaler.step(optimizer);
    scaler.update()``: the guard measures and clips unscaled gradients, and a step the scaler
    skips is neither counted in ``global_step`` nor a skip or a fault of trimtab's (see
    :mod:`trimtab.client._step`); ``guard.step`` takes no scaler. bf16 autocast needs
    nothing. A ``torch.compile``d model attaches as it is (``graph_breaks``: dynamo's count;
    see :mod:`trimtab.client._compiled`). Accumulating gradients, call ``step`` once per
    optimizer step with the mean of the micro-batches' losses (``observe_loss`` per
    micro-batch with the hooks).

    Loops that cannot change (``hooks=True``): the loop keeps calling ``optimizer.step()``
    and the optimizer's step hooks do what ``guard.step`` does around it; the loss comes
    in with ``guard.observe_loss(loss)`` (without it, reports go without the loss), and
    ``close()`` takes the hooks off. See :mod:`trimtab.client._hooks` for how a non-finite
    step is skipped there and how ``optimizer.step(closure)`` is handled.

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
        reconnect_max_s: float = 8.0,
        checkpoint_every: int = 100,
        keep: int = 3,
        checkpoint_dir: str | os.PathLike | None = None,
        memory_keep: int | None = None,
        scheduler: Any = None,
        on_rollback: Callable[[int], None] | None = None,
        server_key: str | os.PathLike | None = None,
        client_key: str | os.PathLike | None = None,
        hooks: bool = False,
        reseed_on_rollback: bool = True,
        ema: float | None = None,
        extra_state: dict[str, Any] | None = None,
        loss_trend: bool | None = None,
    ) -> None:
        _check_options(job, report_every, clip, batch_size, heartbeat_s, queue_size,
                       nonfinite, liveness)
        _check_switches(hooks, reseed_on_rollback, loss_trend)
        #: Whether the loss is expected to fall as the run learns (registered).
        self.loss_trend = loss_trend is not False
        self._loss_trend_given = loss_trend is not None
        # A wrapper (accelerate's): the guard works on the torch optimizer under it and
        # steps through it. See trimtab.client._wrapped.
        wrapper, optimizer = optimizer, unwrap(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise _invalid("optimizer", f"{type(wrapper).__name__} {wrapper!r}"[:200],
                           "a torch.optim.Optimizer (or a wrapper holding one as .optimizer, "
                           "as accelerate's does): trimtab steers its param_groups, and a "
                           "loop that updates the parameters by hand has none")
        check_wrapper(wrapper, hooks)
        _check_checkpoint_options(checkpoint_every, keep, checkpoint_dir, scheduler,
                                  optimizer, on_rollback)
        short = ring_too_short(checkpoint_every, keep, report_every)
        if short:
            log.warning(short)
        extra = _check_extra_state(extra_state, model=model, optimizer=optimizer,
                                   wrapper=wrapper, scheduler=scheduler,
                                   checkpoint_dir=checkpoint_dir)
        check_optimizer(optimizer)
        # The optimizer stepped before it was handed over (its state loaded from a run
        # that trained): told to the controller with each registration.
        self._warm_start = any(bool(s) for s in optimizer.state.values())
        check_decay(ema)
        check_endpoint(endpoint)
        check_pairing(model, optimizer)
        _end_abandoned_guards()
        steering = next((g for g in _OPEN.values() if not g._closed
                         and g.optimizer is optimizer), None)
        if steering is not None:
            # Each would scale the lr the other put in, and journal the other's as the
            # user's (an examples trial: one said base 0.025 for a user's 0.05).
            raise _refused("optimizer", _shown(wrapper), f"one no open guard in this process "
                           f"steers (job {steering.job!r} does: close it first)")
        mine = {id(p) for p in model.parameters()}
        sharing = next((g for g in _OPEN.values() if not g._closed
                        and any(id(p) in mine for p in g.model.parameters())), None)
        if sharing is not None:
            # An optimizer trial: Muon for a model's matrices, AdamW for the rest, a guard
            # each. The AdamW job's rollback restored every parameter, Muon's too, while
            # Muon's optimizer state, step and lr stayed, and its job journaled nothing.
            log.warning(
                "trimtab: job %r: its model shares parameters with the model of job %r (two "
                "optimizers on one model): a rollback by either guard restores every "
                "parameter of the model, but only its own optimizer's state, step count and "
                "lr, and the other job's journal does not show it. Attach each guard to the "
                "submodule its optimizer steps where the split allows (a GAN's nets); see "
                "docs/adapters.md",
                job, sharing.job)
        with _OPEN_LOCK:  # checked and held at once: two threads attaching one job name
            other = _OPEN.get(job)
            if job in _ATTACHING or (other is not None and not other._closed):
                # Two guards on one job would mix two runs' reports (and roll one back for
                # the other's faults): a GAN's two optimizers are two jobs; a sweep's
                # concurrent trials too (an optuna study with n_jobs=2 under one name: both
                # passed this check before either was open, and the second's controller
                # refused it, 'conflict').
                raise _invalid("job", job, "a job no open guard in this process has (close "
                                           "that one first, or give each optimizer, or each "
                                           "concurrent trial, a job of its own, e.g. 'gan-D' "
                                           "and 'gan-G', f'trial-{trial.number}')")
            _ATTACHING.add(job)
        try:
            curve = load_curve_keys(server_key, client_key)
            self.model = model
            #: The torch optimizer (under accelerate's wrapper, when attached with one).
            self.optimizer = optimizer
            self._wrapper = None if wrapper is optimizer else wrapper
            self._micro_losses = Losses()  # guard.step on a wrapper's micro-batches
            self.job = job
            self.run_id = uuid.uuid4().hex
            # Resumes of this run from a saved guard state (see trimtab.client._resume).
            self._resumes = 0
            self._resumed_here = False
            self._resume_step: int | None = None
            self._resume_id: str | None = None  # made by load_state_dict (see _resume)
            # Whether the loop steps its scheduler after a given step (for a snapshot's resume).
            self._sched_pattern = SchedulePattern()
            self.report_every = report_every
            # The knobs: multipliers on the user's lr and weight decay, momentum, clip.
            self._act = Actuator(optimizer, None if clip is None else float(clip))
            # A sweep runs at most three report windows past the newest step the controller
            # has seen (a window to make the report, one for it to be decided on, one of
            # slack): never far up a sweep that nobody watches.
            self._act.leash = 3 * report_every
            self._hooks: StepHooks | None = None
            self.facts, device = _facts(model, optimizer, batch_size)
            self._compile_note = CompileNote(model)  # torch.compile: see trimtab.client._compiled
            # Under torch.distributed: rank 0 links to the controller, all ranks act in step.
            self._dist = DistLink.detect(device)
            # FSDP2 (DTensor shards): global norms and sharded snapshots, see _sharded.
            self._sharded = is_sharded(model)
            if self._dist is not None:
                self._dist.check_same(report_every=report_every, checkpoint_every=checkpoint_every)
                if not self._sharded:  # DCP directories hold every rank's shards together
                    checkpoint_dir = rank_directory(checkpoint_dir, self._dist.rank)
            self.nonfinite_mode = _resolve_mode(nonfinite, optimizer, device)
            self._probe = Probe(optimizer, report_every, device)
            if self._sharded:
                self._probe.sharding = ShardNorms.of(model)
            # Probe, clip, non-finite handling and the step counts: see trimtab.client._step.
            self._step = Step(optimizer, self._probe, self._act, self.nonfinite_mode,
                              driver=self._wrapper)
            self._reporter = Reporter(job)  # the first window's clock starts here
            if ema is not None and self._sharded:
                raise _invalid("ema", ema, "None with an FSDP2-sharded model (its weight average "
                                           "would need sharded snapshots of its own)")
            if extra and self._sharded:
                raise _refused("extra_state", _shown(extra_state), "None with an FSDP2-sharded "
                               "model (its snapshots are DCP's, of the model and optimizer only)")
            # The weight average (None: off): see trimtab.client._ema.
            self._ema = None if ema is None else Ema(model, ema)
            self._closed = False
            self._ended = False  # close() done to its end (Bye sent, threads stopped)
            if hooks:  # the loop calls optimizer.step() itself: see trimtab.client._hooks
                # First: an optimizer that takes no hooks is refused before anything starts.
                self._hooks = StepHooks(self._step, self._prepare, self._finish_step,
                                        self._close_unfinished)
            self._store = None
            self._transport = None
            try:
                self._start(
                    model=model, optimizer=optimizer, endpoint=endpoint, job=job,
                    context=context, heartbeat_s=heartbeat_s, liveness=liveness,
                    queue_size=queue_size, reconnect_max_s=reconnect_max_s, curve=curve,
                    checkpoint_every=checkpoint_every, keep=keep, checkpoint_dir=checkpoint_dir,
                    memory_keep=memory_keep, scheduler=scheduler, on_rollback=on_rollback,
                    reseed_on_rollback=reseed_on_rollback, extra=extra,
                )
            except BaseException:
                self._abandon()
                raise
            # The thread that attached it: a game's players are attached by one loop's thread.
            self._thread = threading.get_ident()
            _OPEN[job] = self
            _a_game_if_shared(self)
            _hook_sigterm()
        finally:
            with _OPEN_LOCK:
                _ATTACHING.discard(job)

    def _start(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, endpoint: str,
               job: str, context: zmq.Context | None, heartbeat_s: float, liveness: int,
               queue_size: int, reconnect_max_s: float, curve: Any, checkpoint_every: int,
               keep: int, checkpoint_dir: str | os.PathLike | None, memory_keep: int | None,
               scheduler: Any, on_rollback: Callable[[int], None] | None,
               reseed_on_rollback: bool, extra: dict[str, Any]) -> None:
        """The checkpoints, the commands, the report window and the link, in that order: the
        link starts last, once nothing else can fail, so that an attach that fails leaves
        no job registered with the controller."""
        self._store = (None if not checkpoint_every
                       else open_store(keep, checkpoint_dir, memory_keep, self._sharded))
        # Snapshots on schedule, mark stable, rollback: see trimtab.client._checkpointing.
        self._ckpts = Checkpointing(
            self._store, checkpoint_every, model=model, optimizer=optimizer,
            scheduler=scheduler, act=self._act, step=self._step, reporter=self._reporter,
            on_rollback=on_rollback, reseed=reseed_on_rollback, ema=self._ema, extra=extra,
        )
        # Each snapshot carries the guard's state, so that its file resumes the same run.
        me = weakref.ref(self)
        self._ckpts.run_state = lambda: run_state(me())  # type: ignore[arg-type]
        if self._store is not None:
            self._ckpts.take_origin()  # the early rollback target
        # What the run was handed over as, to tell at the first step whether the loop loaded
        # a state after attach (see _handed_over_again).
        self._handed = self._fingerprint()
        # The checkpoints held, as the registration tells them (read by the transport thread):
        # their steps, the newest stable one, and the origin's (Checkpointing.origin).
        self._listing: tuple[list[int], int | None, int | None] = ([], None, None)
        self._note_listing()

        # The transport thread reaches the guard only weakly (see _Link): a guard the loop
        # dropped unclosed is collected, and its finalizer ends the link.
        link = _Link(self)

        def make_transport() -> Transport:
            return Transport(
                endpoint, job, register=link.registration, step=link.step,
                context=context, heartbeat_s=heartbeat_s, liveness=liveness,
                queue_size=queue_size, reconnect_max_s=reconnect_max_s, curve=curve,
            )

        self._transport = (make_transport() if self._dist is None
                           else self._dist.transport(make_transport))
        # Commands, acks and the values in force (read by the registration from now on).
        self._commands = Commands(job, self._act, self._transport, self._ckpts)
        # Closing a report window (rows, stats, report): see trimtab.client._report_window.
        self._window = ReportWindow(
            probe=self._probe, step=self._step, reporter=self._reporter,
            commands=self._commands, transport=self._transport, store=self._store,
            dist=self._dist, hooks=self._hooks,
            # DDP replicas compared at each report; sharded ranks hold different shards.
            checksum=(None if self._dist is None or self._sharded
                      else lambda: param_checksum(replicated_params(self.model))),
            snapshot_due=self._ckpts.due,
        )
        self._transport.start()
        # A script that ends without close() still reports its last window, says Bye at
        # its last step and stops the threads at exit; a guard dropped unclosed before the
        # exit is ended when it is collected. The finalizer holds the guard weakly.
        self._finalizer = weakref.finalize(
            self, _finish, weakref.ref(self), self._transport, self._store, link
        )

    def _abandon(self) -> None:
        """Undo a failed attach: the hooks off the optimizer, the checkpoint store's writer
        and the link (not started: no job registered) closed."""
        self._closed = self._ended = True
        if self._hooks is not None:
            self._hooks.remove()
        if self._store is not None:
            self._store.close(timeout_s=1.0)
        if self._transport is not None:
            self._transport.close()

    # -- the step -----------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float) -> None:
        """Apply a pending command, clip, step the optimizer (unless non-finite) and probe."""
        if self._closed:
            raise RuntimeError("Guard.step() after close()")
        if self._hooks is not None:
            raise RuntimeError("Guard.step() with hooks=True: the loop calls optimizer.step() "
                               "itself and hands the loss to guard.observe_loss(loss)")
        if self._wrapper is not None:
            # accelerate: a micro-batch its wrapper would not step is no step of the guard's.
            self._micro_losses.observe(loss)
            if not syncs(self._wrapper):
                return
            loss = self._micro_losses.take()  # the mean over the step's micro-batches
        grad = torch.is_grad_enabled()
        try:
            self._close_unfinished()
            prepared = self._prepare(loss)
            if prepared is not None:
                try:
                    self._step.run(*prepared)
                finally:
                    self._act.release()  # the user's own lr and weight decay are back
                self._finish_step()
        finally:
            restore_grad_mode(grad)  # whatever interrupted a measurement's no_grad block

    def _prepare(
        self, loss: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Before the optimizer step: command, probe, clip. ``None``: a rollback took the step."""
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        if self._step.calls == 0 and self._handed is not None:
            self._handed_over_again()
        self._ckpts.before_step()
        micro = self._step.take_micro()
        if self._commands.take():
            # Rolled back: these gradients were computed on the abandoned trajectory.
            self.optimizer.zero_grad(set_to_none=True)
            # A process resumed from the restored checkpoint's file goes on as this one
            # does now: with the rollback's values, counted, its command applied.
            self._ckpts.restate(run_state(self), self._act.state_dict())
            error = self._ckpts.call_on_rollback()  # last: the file says the values now
            if error is not None:
                self._commands.note_error(error)
            return None
        total, finite = self._step.measure(loss, micro)
        self._ckpts.fence()  # snapshot copies in flight finish first, on the device
        if self._dist is None and self._transport is not None:
            # (Under torch.distributed rank 0's link state travels with its commands.)
            self._act.alone = not self._transport.connected
            self._act.seen = self._transport.controller_step
        # Last, so that only the optimizer step runs between engage and release.
        self._act.engage(self._host_step())  # host floats only (tensor entries: on device)
        if self._commands.owed:
            self._commands.acknowledge(self._host_step())  # with the values this step uses
        return total, finite

    def _fingerprint(self) -> tuple[Any, ...]:
        """What changes when the loop loads a state into the run: the parameters' version
        counters (``load_state_dict`` copies into them), how many parameters the optimizer
        holds state for and the scheduler's position. Host values only, no device read."""
        try:
            versions: tuple[int, ...] | None = tuple(
                p._version for p in self.model.parameters())
        except Exception:  # a parameter type without version counters: not told apart
            versions = None
        sched = self._ckpts.scheduler
        position = (None if sched is None else
                    (getattr(sched, "last_epoch", None), getattr(sched, "_step_count", None)))
        return versions, len(self.optimizer.state), position

    def _handed_over_again(self) -> None:
        """At the first step: when the loop loaded a state into the model, optimizer or
        scheduler after ``attach`` (a pretrained or resumed checkpoint, without
        ``guard.load_state_dict``), the snapshot taken at attach holds the state before it:
        it is taken again, of the run as it is handed over now (the rollback target of last
        resort), and an optimizer that holds state now tells the controller the run
        continues (``warm_start``: no LR range test on it). Once, before the first step."""
        handed, self._handed = self._handed, None
        if self._fingerprint() == handed:
            return
        log.info("trimtab: job %s: the run's state changed between attach and its first step "
                 "(a checkpoint loaded after attach): the snapshot of the run as handed over "
                 "is taken again now", self.job)
        if self._store is not None:
            self._ckpts.replace_all()
            self._note_listing()
        if not self._warm_start and any(bool(v) for v in self.optimizer.state.values()):
            self._warm_start = True
            if self._transport is not None:
                self._transport.reregister()  # the registration now says warm_start

    def _close_unfinished(self) -> None:
        """Close a window the last step filled but was interrupted (a notebook's Ctrl-C)
        before closing: every later step would fail on a row past the window's end (the
        interrupt fuzz test, tests/client/test_interrupts.py, found it). Under
        torch.distributed an interrupt on one rank is the job's end anyway: left alone."""
        if self._probe.row >= self.report_every and self._dist is None:
            self._window.close()
            self._note_listing()

    def _finish_step(self) -> None:
        """After the optimizer step: average the weights in, probe the update, count the
        step, report, snapshot."""
        if self._ema is not None:
            self._ema.after_step(self._step.taken)
        closing = self._step.finish()
        sched = self._ckpts.scheduler
        if sched is not None:  # a host int
            self._sched_pattern.observe(self._step.calls, getattr(sched, "last_epoch", None))
        if self._step.calls == 1:
            self._ckpts.prepare()
        early = False
        if closing:
            # A snapshot due at this window's end is taken before the window's one read,
            # behind it in the device's queue (see Checkpointing.take_early).
            early = (self._dist is None and self.nonfinite_mode != "skip"
                     and self._ckpts.may_be_due())
            ckpt = None
            if early:
                self._probe.stage()
                ckpt = self._ckpts.take_early()
            try:
                self._window.close()
            finally:
                if early:
                    self._ckpts.settle(ckpt)
            self._note_listing()
            self._compile_note.window_closed(self.job)
            if self._dist is not None:  # every rank takes rank 0's command, at this step
                self._dist.exchange(self._host_step())
                self._act.alone = self._dist.alone  # and its link state
                self._act.seen = self._dist.seen
        # global_step is known on the host every step in "skip" mode, else at window ends.
        if (closing and not early) or self.nonfinite_mode == "skip":
            self._ckpts.take_if_due()

    # -- commands and reports ----------------------------------------------------------------

    def report_validation(self, value: float, step: int | None = None,
                          ema: float | None = None) -> None:
        """Hand the controller a validation result (lower is better) with the next report
        (one handed over after the last report, as at a run's last step, goes on its own as
        the guard closes).

        ``value`` must be a Python number (call ``.item()`` on a tensor: this method never
        reads the device); ``step`` defaults to the step the host knows now; ``ema`` is the
        same validation of the weight average (:attr:`ema_model`, or one of your own),
        reported beside it. A newer result before the next report replaces this one; a
        non-finite one is logged and dropped (a non-finite ``ema`` alone: only it).

        After :meth:`close` (an evaluation after training: ``trainer.evaluate()`` after
        ``train()``), the result goes at once on a link of its own, from a thread of its own,
        and the controller adds it to the ended run's results; ``step`` defaults to the
        run's last.
        """
        _check_validation(value, step, ema)
        if not math.isfinite(value):
            log.warning("trimtab: non-finite validation value %r not reported", value)
            return
        if ema is not None and not math.isfinite(ema):
            log.warning("trimtab: non-finite validation value of the weight average %r not "
                        "reported", ema)
            ema = None
        at = self._host_step() if step is None else step
        if self._closed:
            self._transport.send_late(wire.Validation(
                job=self.job, step=at, value=float(value),
                ema=None if ema is None else float(ema), run_id=self.run_id))
            return
        self._reporter.validation = (float(value), at)
        self._reporter.validation_ema = None if ema is None else float(ema)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """With ``hooks=True``: hand over a loss for the coming ``optimizer.step()`` (kept on
        its device; several calls before one step report their mean)."""
        if self._hooks is None:
            raise RuntimeError("observe_loss() needs attach(..., hooks=True); "
                               "without hooks pass the loss to guard.step(loss)")
        self._hooks.observe(loss)

    def note_micro_batch(self) -> None:
        """Call after each micro-batch's ``backward()`` when accumulating gradients, for the
        gradient-noise-scale estimate. After the first micro-batch of a step it measures the
        gradient norm on the device (no sync); the rest only count. Optional."""
        self._step.note_micro_batch()

    def _registration(self) -> wire.Register:
        # Called from the transport thread; reads only values the training thread swaps whole.
        knobs, base, scale = self._commands.in_force
        checkpoints, stable, origin = self._listing
        return wire.Register(
            job=self.job, run_id=self.run_id, step=self._host_step(),
            report_every=self.report_every, facts=self.facts, knobs=knobs, base=base,
            scale=scale, applied_seq=self.applied_seq, resume=self._resumes,
            resume_step=self._resume_step, resume_id=self._resume_id,
            checkpoints=checkpoints, stable_step=stable, origin=origin,
            schedules=list(self._act.live.schedules),
            keep=None if self._store is None else self._store.keep,
            nominal_lr=self._nominal_lr,
            loss_trend=None if self.loss_trend else False,
            warm_start=True if self._warm_start else None,
            lr_spread=self._lr_spread,
        )

    def _note_listing(self) -> None:
        """Keep the checkpoints held, and the lr the loop's scheduler scales, for the next
        registration (swapped whole: the transport thread reads them; the store and the
        param groups are the training thread's)."""
        self._nominal_lr = nominal_lr(self.optimizer.param_groups)
        self._lr_spread = lr_spread(self.optimizer.param_groups)
        store = self._store
        if store is None:
            self._listing = ([], None, None)
            return
        held = store.steps()
        origin = self._ckpts.origin
        self._listing = (held[-wire.MAX_LISTED:], store.stable_step,
                         origin if origin in held else None)

    # -- the user's checkpoint: resume in a new process ------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """trimtab's state for the user's checkpoint, to resume from in a new process with
        :meth:`load_state_dict`: the multipliers, momentum, clip and live schedules in force,
        the step counters, the last command applied and the run's identity on the
        controller (plain Python values). See :mod:`trimtab.client._resume`."""
        return state_of(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s dict: after ``attach`` and after loading the
        model's, optimizer's and scheduler's state, before the first step. The run continues
        with the values in force when it was saved, as the same job on the controller, which
        sets aside what it saw after this step. See :mod:`trimtab.client._resume`."""
        load_state(self, state_dict)

    def _host_step(self) -> int:
        """global_step as far as the host knows without reading the device."""
        return self._step.host_step

    @property
    def ema_model(self) -> torch.nn.Module | None:
        """The weight average (``attach(..., ema=decay)``), a
        ``torch.optim.swa_utils.AveragedModel`` to evaluate as the model; ``None``: off."""
        return None if self._ema is None else self._ema.model

    # -- state: the properties (global_step, knobs, checkpoints, ...) are GuardState's -------

    def close(self, reason: str = "closed", checkpoint_timeout_s: float = 60.0) -> None:
        """Report the open window, finish queued checkpoint writes (at most
        ``checkpoint_timeout_s``), say Bye and stop the thread (at most about 1 s)."""
        # Under torch.distributed the partial window is a collective: only on a clean close.
        self._end(reason, checkpoint_timeout_s,
                  last_window=self._dist is None or not reason.startswith("error"))

    def _end(self, reason: str, checkpoint_timeout_s: float, *, last_window: bool) -> None:
        """:meth:`close`, and the finalizer's at exit: ``last_window``, whether the open,
        partial window is reported."""
        if self._ended:
            return
        if not self._closed:
            if self._hooks is not None:
                self._hooks.remove()
            self._act.release()
            if self._commands.owed:  # a command taken after the last step ran
                self._commands.acknowledge(self._host_step())
            if self._probe.row and last_window:
                self._window.close()  # the last, partial window: one sync, at the run's end
            pending = self._reporter.validation
            if pending is not None and last_window:
                # Handed over after the last report (an evaluation at the last step, which
                # ended a window): no step is left for a report to carry it.
                self._transport.put_report(wire.Validation(
                    job=self.job, step=pending[1], value=pending[0],
                    ema=self._reporter.validation_ema))
                self._reporter.validation = self._reporter.validation_ema = None
            self._closed = True
        # A close interrupted from here on (a notebook's Ctrl-C while checkpoint writes
        # finish) is finished by the next close(): a notebook trial's left its threads and
        # link up, the job live on the controller, and a new attach under its name refused.
        if self._store is not None:
            self._store.close(checkpoint_timeout_s)
        self._finalizer.detach()
        self._transport.close(wire.Bye(job=self.job, step=self._host_step(), reason=reason[:1024]))
        self._ended = True

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close("closed" if exc_type is None else f"error: {exc_type.__name__}")


#: The open guards of this process, by job (weakly: a guard never closed is not kept alive
#: by it): a second guard on a job one already has is refused.
_OPEN: weakref.WeakValueDictionary[str, Guard] = weakref.WeakValueDictionary()
#: Job names of guards being attached (checked and added under _OPEN_LOCK).
_ATTACHING: set[str] = set()
_OPEN_LOCK = threading.Lock()


_SIGTERM_HOOKED = False


def hook_sigterm() -> bool:
    """Install trimtab's SIGTERM handler now, from the main thread: every guard open when a
    SIGTERM comes says Bye (``terminated (SIGTERM)``) before the process ends as it would
    have. ``attach`` does this itself from the main thread; guards attached by other threads
    (an optuna study's ``n_jobs=2`` trials) cannot (Python sets signal handlers from the
    main thread only): call it once before the study starts. A handler of the user's is
    left alone. Whether trimtab's handler is in place."""
    _hook_sigterm()
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


_WARNED_THREAD = False


def _hook_sigterm() -> None:
    """Where nothing else handles SIGTERM (its default action: the process dies at once,
    no ``atexit``), the open guards close on it, with a Bye, before that default action
    ends the process with its usual status. A fleet trial: every trial a sweep stopped with
    SIGTERM died without its Bye, was marked lost 30 s later and fired TrimtabJobSilent and
    TrimtabJobLost (49 and 41 alerts in an hour). A handler of the user's (or a trainer's)
    is left alone; only from the main thread (where Python runs handlers)."""
    global _SIGTERM_HOOKED, _WARNED_THREAD
    if _SIGTERM_HOOKED:
        return
    if threading.current_thread() is not threading.main_thread():
        if not _WARNED_THREAD and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _WARNED_THREAD = True
            # A sweep trial: two concurrent trials SIGTERMed said no Bye, were marked lost
            # 30 s later and fired TrimtabJobLost.
            log.warning("trimtab: attached from a thread other than the main one: a SIGTERM "
                        "ends this process without the guards' Bye (the controller marks "
                        "them lost); call trimtab.client.hook_sigterm() once from the main "
                        "thread (before the study starts) to have them say Bye")
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # no SIGTERM, or not the main interpreter
        return
    _SIGTERM_HOOKED = True


@contextlib.contextmanager
def sigterm_left_alone():  # type: ignore[no-untyped-def]
    """Guards made inside leave SIGTERM to their trainer (Lightning's handles it: it stops
    the fit at a step boundary, which closes the guard)."""
    global _SIGTERM_HOOKED
    was, _SIGTERM_HOOKED = _SIGTERM_HOOKED, True
    try:
        yield
    finally:
        _SIGTERM_HOOKED = was or signal.getsignal(signal.SIGTERM) is _on_sigterm


def _on_sigterm(signum: int, frame: object) -> None:
    global _SIGTERM_HOOKED
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return  # called by a handler installed over this one: that one decides
    # Between two bytecodes of the loop, maybe mid-step: no last window (it would read the
    # device mid-step), queued checkpoint writes get 10 s, the Bye at most 0.25 s.
    for guard in list(_OPEN.values()):
        with contextlib.suppress(Exception):
            guard._end("terminated (SIGTERM)", 10.0, last_window=False)
    _SIGTERM_HOOKED = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _a_game_if_shared(new: Guard) -> None:
    """Several open guards in one process are one loop's several optimizers: a GAN's
    generator and discriminator, an actor-critic's two nets. Their losses are a game's,
    not expected to fall as each learns (the other moves), so a guard left at
    ``loss_trend=None`` registers ``loss_trend=False`` (again, if it registered already):
    no climb verdict, no range test, no plateau cut; spikes and non-finite values are
    still rolled back. An examples trial: a tuned DCGAN's discriminator got an LR range
    test on 3 seeds of 3 (its updates lined up with the next gradient), up to x50 its lr,
    and ended 6% worse (a pixel-space Frechet distance)."""
    # Attached from the same thread: guards attached by other threads are other runs (an
    # optuna study's n_jobs=2 trials, each in a thread of its own, are two ordinary runs).
    guards = [g for g in _OPEN.values() if not g._closed and g._thread == new._thread]
    if len(guards) < 2:
        return
    flipped = [g for g in guards if not g._loss_trend_given and g.loss_trend]
    for g in flipped:
        g.loss_trend = False
        if g._transport is not None:
            g._transport.reregister()
    if flipped:
        log.info("trimtab: guards of jobs %s share this process (a GAN's or an actor-critic's "
                 "optimizers): registered with loss_trend=False, no climb verdict or range "
                 "test (attach(..., loss_trend=True) keeps them)",
                 ", ".join(repr(g.job) for g in guards))


class _Link:
    """What the transport thread calls on its guard (the registration, the step count),
    through a weak reference: a running thread holding the guard's bound methods kept every
    guard alive until the process ended. An optuna-style sweep whose pruned trials raised
    out of their loops without ``close()`` kept each trial's guard open, its threads, link
    and checkpoint ring with it: every later trial's guard counted them as the other
    players of a game (no climb verdict, no range test, no plateau cut), and one attached
    under the same job name was refused. Dropped, a guard is now collected like any object,
    and its finalizer ends the link (:func:`_finish`)."""

    __slots__ = ("_guard", "job", "last_step", "last_at")

    def __init__(self, guard: Guard) -> None:
        self._guard = weakref.ref(guard)
        self.job = guard.job
        #: The step the link read last, and when: the Bye's, when the guard is gone.
        self.last_step = guard._host_step()
        self.last_at = time.monotonic()

    def registration(self) -> wire.Register | None:
        """The guard's registration; ``None`` once it is gone (its link is ending)."""
        guard = self._guard()
        if guard is None:
            return None
        message = guard._registration()
        self.last_step, self.last_at = message.step, time.monotonic()
        return message

    def step(self) -> int:
        guard = self._guard()
        if guard is not None:
            self.last_step, self.last_at = guard._host_step(), time.monotonic()
        return self.last_step


#: Threads ending the links of guards collected unclosed (see _finish), joined by the next
#: attach (a new guard under the same job name registers after the old run's Bye) and at
#: exit (a careless sweep's last trial, dropped just before it, lost its Bye with the
#: thread).
_ENDING: list[threading.Thread] = []


@atexit.register
def _join_ending() -> None:
    deadline = time.monotonic() + 12.0
    while _ENDING:
        _ENDING.pop().join(max(0.0, deadline - time.monotonic()))


def _end_abandoned_guards() -> None:
    """Before a new guard is checked against the open ones: collect those dropped unclosed
    (reference cycles keep a guard until the cyclic collector runs) and let their links end,
    at most about 12 s (their queued checkpoint writes get 10). Only when another guard is
    open: a full collection at attach costs a few milliseconds to a second in a large
    process, once."""
    if any(not g._closed for g in _OPEN.values()):
        gc.collect()
    while _ENDING:
        _ENDING.pop().join(12.0)


def _end_dropped(job: str, transport: Transport, store: CheckpointStore | None,
                 step: int) -> None:
    """A dropped guard's end: its queued checkpoint writes finished, a Bye at ``step`` (the
    last one the link read or a report carried: the run went at least that far, and the
    reason says so) and its threads stopped."""
    log.warning("trimtab: job %r: its guard was dropped without close() (a loop that ended by "
                "an exception, an object let go): its link said Bye at step %d, the last it "
                "knew of, and its threads stopped. Use `with attach(...) as guard:` or close() "
                "in a finally block to end a run at its own step", job, step)
    if store is not None:
        store.close(timeout_s=10.0)
    transport.close(wire.Bye(job=job, step=step, reason="abandoned: the guard was dropped "
                             "without close() (at least this step)"))


def _finish(guard: weakref.ref[Guard], transport: Transport,
            store: CheckpointStore | None, link: _Link | None = None) -> None:
    """A guard never closed, at interpreter exit: what ``close("exit")`` does, so that the
    journal has its last window and its Bye at the step it ended at. Queued checkpoint
    writes get 10 s (the files stay consistent either way). Under torch.distributed the
    partial window is not reported: its reduction is a collective, and at exit the other
    ranks may be gone."""
    live = guard()
    if live is not None:  # at exit, a guard still referenced
        live._end("exit", 10.0, last_window=live._dist is None)
        return
    if link is None:
        if store is not None:
            store.close(timeout_s=10.0)
        transport.close(None)
        return
    # Collected unclosed, by whichever thread ran the collector (the training thread, or
    # the transport's own: it cannot join itself): ended on a thread of its own, so that
    # no step waits for the checkpoint writes or the Bye.
    # The step read last, by the link or by the last report: not the highest (a rollback
    # rewinds the step count; a pruned trial's last report said 190 for a run that had
    # been rolled back to 72).
    step = link.last_step
    reported = transport.last_report
    if reported is not None and reported[0] > link.last_at:
        step = reported[1]
    ending = threading.Thread(target=_end_dropped, name="trimtab-dropped", daemon=True,
                              args=(link.job, transport, store, step))
    try:
        ending.start()
    except RuntimeError:  # the interpreter is shutting down: no new thread, end it here
        _end_dropped(link.job, transport, store, step)
        return
    _ENDING.append(ending)


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Guard:
    """Attach a training loop to a trimtab controller: ``Guard(model, optimizer, **options)``.

    ``options`` are :class:`Guard`'s keyword arguments (``job`` is required).

    >>> guard = attach(model, optimizer, job="gpt-small", clip=1.0)  # doctest: +SKIP
    >>> loss.backward(); guard.step(loss)  # doctest: +SKIP
    """
    return Guard(model, optimizer, **options)
