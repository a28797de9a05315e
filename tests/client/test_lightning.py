"""trimtab.client.lightning: real PyTorch Lightning fits attached through TrimtabCallback."""

from __future__ import annotations

import logging
import signal
import time

import pytest
import torch

from trimtab.protocol import wire

from ..integration.support import STEP_DECAY, start_serve, wait_for

pl = pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")
from trimtab.client.lightning import TrimtabCallback  # noqa: E402

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore"),
]


class Regression(pl.LightningModule):
    """A small MLP on noisy linear data; records each micro-batch's raw loss."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())  # the test's own record
        time.sleep(0.002)  # a step long enough for the controller to answer within a few
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(n: int = 4096, batch: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _trainer(callback: TrimtabCallback, max_steps: int, *others: pl.Callback,
             **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, *others],
        **kw,
    )


@pytest.mark.integration
def test_fit_takes_the_controllers_lr_and_acks(tmp_path) -> None:
    srv = start_serve(tmp_path, None, None, STEP_DECAY)
    try:
        model = Regression()
        callback = TrimtabCallback(
            job="pl", endpoint=srv.endpoint, report_every=5, heartbeat_s=0.05
        )
        trainer = _trainer(callback, 300, accumulate_grad_batches=2)
        trainer.fit(model, _loader())
        guard = callback.guard
        opt = trainer.optimizers[0]
        assert guard.global_step == trainer.global_step == 300
        assert len(opt._optimizer_step_pre_hooks) == 0  # closed at the end of the fit
        # step_decay's lr at the last step (t = 299) is what the last step ran with; the
        # optimizer holds the module's own lr between steps.
        assert guard.knobs.lr == pytest.approx(0.05 * 0.5 ** (299 // 30))
        assert opt.param_groups[0]["lr"] == 0.05

        journal = srv.journal()
        acks = wait_for(lambda: journal.events("pl", "ack"))
        reports = wait_for(
            lambda: len(journal.events("pl", "report")) == 60 and journal.events("pl", "report")
        )
        commands = journal.events("pl", "command")
        # Every command was acknowledged, once, but one sent after the last report.
        seqs = [c.seq for c in commands]
        acked = list(dict.fromkeys(a.seq for a in acks))  # a resent command is re-acked
        assert acked and acked == seqs[: len(acked)]
        assert len(seqs) - len(acked) <= 1
        # A report's loss is the mean over its steps' micro-batches, in the loss's own
        # units (Lightning's division by accumulate_grad_batches undone).
        first = model.losses[:10]
        assert reports[0].data["loss_mean"] == pytest.approx(sum(first) / 10, rel=1e-5)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_command_knobs_and_stop_advice_reach_the_trainer(fake_controller, caplog) -> None:
    model = Regression()
    callback = TrimtabCallback(
        job="pl", endpoint=fake_controller.endpoint, report_every=5, heartbeat_s=0.05, clip=5.0
    )

    class Command(pl.Callback):  # the controller's command once the job has registered
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 20:
                fake_controller.wait_for(lambda c: c.of_type(wire.Register))
                fake_controller.send(
                    wire.Command(
                        job="pl",
                        seq=1,
                        scale=wire.ScaleTargets(lr=0.2),
                        stop_advice="validation stopped improving",
                    )
                )

    trainer = _trainer(callback, 2000, gradient_clip_val=1.0)
    trainer.callbacks.append(Command())
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        trainer.fit(model, _loader())
    assert trainer.should_stop and trainer.global_step < 2000
    assert callback.guard.knobs.lr == pytest.approx(0.01)  # 0.2 x the module's 0.05
    fake_controller.wait_for(lambda c: c.of_type(wire.Ack))
    ack = fake_controller.of_type(wire.Ack)[0]
    assert ack.seq == 1 and ack.knobs.lr == pytest.approx(0.01)
    assert callback.guard.stop_reason == "validation stopped improving"
    assert any("both clip" in r.getMessage() for r in caplog.records)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"hooks=False is invalid; allowed: leave it out"):
        TrimtabCallback(job="pl", hooks=False)
    with pytest.raises(ValueError, match=r"monitor=3 is invalid; allowed: None or a metric"):
        TrimtabCallback(job="pl", monitor=3)


class WithValidation(Regression):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


def test_monitored_metric_goes_to_the_controller(fake_controller) -> None:
    callback = TrimtabCallback(
        job="pl", endpoint=fake_controller.endpoint, report_every=5, monitor="val_loss"
    )
    seen: list[float] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val_loss"]))

    trainer = _trainer(callback, 40, val_check_interval=10, limit_val_batches=2)
    trainer.callbacks.append(Record())
    model = WithValidation()
    trainer.fit(model, _loader(), _loader(256))
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) == 8
                             and c.of_type(wire.Bye))
    reported = [r.validation for r in fake_controller.of_type(wire.Report) if r.validation]
    # Each goes with the next report; the last validation (at step 40, after the last
    # report) goes on its own as the guard closes in on_fit_end, before the Bye.
    assert len(seen) == 4 and reported == pytest.approx(seen[:3])
    final = fake_controller.of_type(wire.Validation)
    assert [(v.step, v.value, v.run_id) for v in final] == [(40, pytest.approx(seen[3]), None)]
    # A validation after the fit (trainer.validate()): after the Bye, on a link of its own,
    # naming the run (before, the closed guard dropped it).
    trainer.validate(model, _loader(256), verbose=False)
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Validation)) == 2)
    late = fake_controller.of_type(wire.Validation)[-1]
    assert (late.step, late.value, late.run_id) == (40, pytest.approx(seen[4]),
                                                    callback.guard.run_id)
    fake_controller.wait_for(lambda c: callback.guard._transport.late == {"answered": 1})


def test_a_fit_resumed_from_a_lightning_checkpoint_continues_trimtabs_state(
        fake_controller, tmp_path) -> None:
    """trimtab's state is the callback's part of Lightning's checkpoint: a new fit from it
    (a new module, callback and trainer, as in a new process) continues with the knobs the
    controller commanded, the step counters and the same run on the controller, without
    the command being sent again."""
    first = TrimtabCallback(job="pl", endpoint=fake_controller.endpoint, report_every=5,
                            heartbeat_s=0.05, clip=5.0)

    class Command(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 10:
                fake_controller.wait_for(lambda c: c.of_type(wire.Register))
                fake_controller.send(wire.Command(
                    job="pl", seq=1, scale=wire.ScaleTargets(lr=0.5),
                    knobs=wire.Knobs(momentum=0.8, clip=2.0)))
                # In the guard's slot before the next step (a loaded host is slow to deliver).
                assert wait_for(lambda: first.guard._transport._command is not None)

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=30,
                                         save_top_k=-1, filename="{step}")

    def trainer(callbacks, steps):
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=callbacks, default_root_dir=tmp_path / "root")

    trainer([first, Command(), saver], 40).fit(Regression(), _loader())
    assert first.guard.applied_seq == 1 and first.guard.knobs.momentum == 0.8
    (ckpt,) = tmp_path.glob("step=30*.ckpt")
    registered = len(fake_controller.of_type(wire.Register))

    second = TrimtabCallback(job="pl", endpoint=fake_controller.endpoint, report_every=5,
                             heartbeat_s=0.05, clip=5.0)
    resumed = trainer([second], 60)
    resumed.fit(Regression(), _loader(), ckpt_path=str(ckpt))
    guard = second.guard
    assert guard.run_id == first.guard.run_id
    assert guard.global_step == resumed.global_step == 60
    assert guard.applied_seq == 1
    knobs = guard.knobs
    assert (knobs.lr, knobs.momentum, knobs.clip) == (pytest.approx(0.025), 0.8, 2.0)
    fake_controller.wait_for(lambda c: any(
        r.resume == 1 for r in c.of_type(wire.Register)[registered:]))
    reg = next(r for r in fake_controller.of_type(wire.Register)[registered:] if r.resume)
    assert (reg.run_id, reg.resume_step, reg.applied_seq) == (first.guard.run_id, 30, 1)
    assert reg.step >= 30 and reg.checkpoints == [30]


def test_weight_averaging_through_the_callback(fake_controller) -> None:
    """``ema=`` goes to attach; the average's validation, reported beside the raw one as
    docs/adapters.md shows (monitor unset), reaches the controller."""
    callback = TrimtabCallback(job="pl", endpoint=fake_controller.endpoint, report_every=5,
                               ema=0.9)
    g = torch.Generator().manual_seed(1)
    xv = torch.randn(64, 8, generator=g)
    yv = xv.sum(1, keepdim=True)
    sent: list[tuple[float, float]] = []

    class ReportBoth(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            guard = callback.guard
            with torch.no_grad():
                raw = torch.nn.functional.mse_loss(pl_module.net(xv), yv).item()
                avg = torch.nn.functional.mse_loss(guard.ema_model.module.net(xv), yv).item()
            guard.report_validation(raw, ema=avg)
            sent.append((raw, avg))

    trainer = _trainer(callback, 40, val_check_interval=10, limit_val_batches=1)
    trainer.callbacks.append(ReportBoth())
    trainer.fit(WithValidation(), _loader(), _loader(64))
    assert int(callback.guard.ema_model.n_averaged) == trainer.global_step == 40
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) == 8)
    both = [(r.validation, r.validation_ema) for r in fake_controller.of_type(wire.Report)
            if r.validation is not None]
    # Each goes with the next report; the last (at step 40) has none after it.
    assert len(sent) == 4 and both == [pytest.approx(s) for s in sent[:3]]
    assert all(raw != avg for raw, avg in sent)


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_fit_again_after_an_interrupted_fit_has_one_guard(fake_controller, interruption) -> None:
    """A fit interrupted at step 8 (an exception; Ctrl-C, which Lightning turns into
    ``SystemExit`` after its own shutdown) closes its guard in ``on_exception``: the next
    fit with the same callback and module is the only one hooked and counting."""
    callback = TrimtabCallback(job="pl", endpoint=fake_controller.endpoint, report_every=5,
                               heartbeat_s=0.05)
    model = Regression()
    hooks: list[int] = []  # trimtab's step hooks on the optimizer at each batch's end

    class Interrupt(pl.Callback):
        armed = True

        def on_train_batch_end(self, trainer, *args, **kwargs):
            hooks.append(len(trainer.optimizers[0]._optimizer_step_pre_hooks))
            if self.armed and trainer.global_step == 8:
                self.armed = False
                raise interruption("interrupted")

    interrupt = Interrupt()
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C while shutting down
    try:
        with pytest.raises(SystemExit if interruption is KeyboardInterrupt else interruption):
            _trainer(callback, 20, interrupt).fit(model, _loader())
    finally:
        signal.signal(signal.SIGINT, sigint)
    first = callback.guard
    assert first._closed and first.global_step == 8
    trainer = _trainer(callback, 20, interrupt)
    trainer.fit(model, _loader())
    assert callback.guard is not first and callback.guard.global_step == trainer.global_step == 20
    assert hooks == [1] * 28
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Bye)) == 2)
    assert fake_controller.of_type(wire.Bye)[0].reason == f"error: {interruption.__name__}"


class RollbackAt(pl.Callback):
    """Hands the trimtab guard a rollback to ``to`` once the trainer reaches ``at`` (as its
    transport thread does on receiving one)."""

    def __init__(self, trimtab: TrimtabCallback, at: int, to: int) -> None:
        self.trimtab, self.at, self.to = trimtab, at, to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            self.trimtab.guard._transport._handle(
                wire.Command(job=self.trimtab.job, seq=1, mark_stable=self.to,
                             rollback_to=self.to))


def test_a_rollback_leaves_the_trainers_step_ahead_by_the_steps_rolled_back_plus_one(
        dead_endpoint) -> None:
    """Lightning owns its loop: a rollback restores the model, optimizer and scheduler, and
    ``trainer.global_step`` runs on. The step that carries the rollback out updates nothing
    and Lightning counts it: ahead by the steps rolled back plus one (docs/adapters.md),
    and ``max_steps`` counts them."""
    callback = TrimtabCallback(job="pl-rb", endpoint=dead_endpoint, report_every=5,
                               checkpoint_every=5)
    trainer = _trainer(callback, 20, RollbackAt(callback, at=12, to=10))
    trainer.fit(Regression(), _loader())
    guard = callback.guard
    assert guard.rollbacks == 1 and trainer.global_step == 20
    assert trainer.global_step - guard.global_step == (12 - 10) + 1


@pytest.mark.integration
def test_the_callback_leaves_sigterm_to_lightning(fake_controller) -> None:
    """Lightning stops a fit at a step boundary on SIGTERM (its handler sets a flag; with
    SLURM it requeues). A plain guard closes on SIGTERM where nothing handles it, and
    Lightning composes a handler it finds with its own: the callback's guard installs none,
    and a plain guard's handler does nothing when another handler calls it."""
    import signal

    from trimtab.client import _guard

    seen = []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            handler = signal.getsignal(signal.SIGTERM)
            seen.append(list(getattr(handler, "signal_handlers", [handler])))

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    hooked = _guard._SIGTERM_HOOKED
    _guard._SIGTERM_HOOKED = False
    try:
        cb = TrimtabCallback(job="pl-sigterm", endpoint=fake_controller.endpoint)
        _trainer(cb, 3, Watch()).fit(Regression(), _loader())
        assert seen and _guard._on_sigterm not in seen[0]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Lightning's, undone
    finally:
        signal.signal(signal.SIGTERM, before)
        _guard._SIGTERM_HOOKED = hooked
