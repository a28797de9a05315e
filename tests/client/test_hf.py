"""trimtab.client.hf: real transformers Trainer runs attached through TrimtabCallback.

The model is a tiny ``PreTrainedModel`` built from its config (nothing is downloaded).
"""

from __future__ import annotations

import logging

import pytest
import torch

from trimtab.protocol import wire

from ..integration.support import STEP_DECAY, start_serve, wait_for

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
from trimtab.client.hf import TrimtabCallback  # noqa: E402

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore"),
]


class TinyConfig(transformers.PretrainedConfig):
    model_type = "trimtab-tiny"

    def __init__(self, dim: int = 8, hidden: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim, self.hidden = dim, hidden


class TinyRegressor(transformers.PreTrainedModel):
    """An MLP that returns its mean-squared-error ``loss`` when given ``labels``."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(config.dim, config.hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(config.hidden, 1),
        )
        self.losses: list[float] = []

    def forward(self, x, labels=None):
        out = self.net(x)
        if labels is None:
            return {"logits": out}
        loss = torch.nn.functional.mse_loss(out, labels)
        if self.training:
            self.losses.append(loss.item())  # the test's own record of training losses
        return {"loss": loss, "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 2048, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class LrRecorder(transformers.TrainerCallback):
    """The lr each optimizer step ran with: a step pre-hook registered after trimtab's
    (this callback comes last), so it sees the values trimtab puts in around the step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
            optimizer = optimizer.optimizer
        self.handle = optimizer.register_step_pre_hook(
            lambda opt, a, k: self.lrs.append(opt.param_groups[0]["lr"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def _train(tmp_path, callbacks: list, max_steps: int, eval_dataset=None, resume_from=None,
           **kw):
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "out"),
        "max_steps": max_steps,
        "per_device_train_batch_size": 16,
        "learning_rate": 0.05,
        "optim": "sgd",
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **kw,
    })
    model = TinyRegressor(TinyConfig())
    recorder = LrRecorder()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Data(),
        eval_dataset=eval_dataset,
        callbacks=[*callbacks, recorder],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, model, recorder.lrs


@pytest.mark.integration
def test_train_takes_the_controllers_lr_and_acks(tmp_path) -> None:
    srv = start_serve(tmp_path, None, None, STEP_DECAY)
    try:
        callback = TrimtabCallback(
            job="hf", endpoint=srv.endpoint, report_every=5, heartbeat_s=0.05
        )
        trainer, model, lrs = _train(
            tmp_path,
            [callback],
            200,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            gradient_accumulation_steps=2,
        )
        guard = callback.guard
        assert guard.global_step == trainer.state.global_step == 200
        assert len(trainer.optimizer.optimizer._optimizer_step_pre_hooks) == 0  # closed
        journal = srv.journal()
        acks = wait_for(lambda: journal.events("hf", "ack"))
        # The command handed over step_decay: from its step on, every step ran at its lr.
        t0 = acks[0].step
        assert lrs[t0:] == [pytest.approx(0.05 * 0.5 ** (t // 30)) for t in range(t0, 200)]
        assert min(lrs) < 0.05
        reports = wait_for(
            lambda: len(journal.events("hf", "report")) == 40 and journal.events("hf", "report")
        )
        seqs = [c.seq for c in journal.events("hf", "command")]
        acked = list(dict.fromkeys(a.seq for a in acks))  # a resent command is re-acked
        assert acked and acked == seqs[: len(acked)]
        assert len(seqs) - len(acked) <= 1
        # The model's own loss, the mean over a step's two micro-batches.
        assert reports[0].data["loss_mean"] == pytest.approx(sum(model.losses[:10]) / 10, rel=1e-5)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_lr_command_composes_with_the_trainers_scheduler(tmp_path, fake_controller, caplog) -> None:
    callback = TrimtabCallback(
        job="hf", endpoint=fake_controller.endpoint, report_every=5, heartbeat_s=0.05, clip=5.0
    )

    class Command(transformers.TrainerCallback):  # the controller's command, once registered
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 20:
                fake_controller.wait_for(lambda c: c.of_type(wire.Register))
                fake_controller.send(wire.Command(job="hf", seq=1,
                                                  scale=wire.ScaleTargets(lr=0.25)))
            if state.global_step == 60:
                fake_controller.send(wire.Command(job="hf", seq=2, stop_advice="enough"))

    steps = 400
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        trainer, _, lrs = _train(tmp_path, [callback, Command()], steps, lr_scheduler_type="linear")
    assert trainer.state.global_step < steps  # stopped on the advice
    schedule = [0.05 * (1 - t / steps) for t in range(len(lrs))]
    ratios = [lr / s for lr, s in zip(lrs, schedule, strict=True)]
    assert ratios[0] == pytest.approx(1.0)
    changed = next(t for t, r in enumerate(ratios) if r != pytest.approx(1.0))
    # From the command on: the Trainer's linear decay times trimtab's multiplier. Sent after
    # step 20's end, it is taken at a step boundary after that: at the next step (index 20)
    # when it arrives in time, later when not, never earlier.
    assert changed >= 20 and all(r == pytest.approx(0.25) for r in ratios[changed:])
    ack = fake_controller.of_type(wire.Ack)[0]
    assert ack.seq == 1 and ack.knobs.lr == pytest.approx(lrs[changed])
    assert ack.base.lr == pytest.approx(schedule[changed]) and ack.scale.lr == 0.25
    assert callback.guard.stop_reason == "enough"
    assert any("both clip" in r.getMessage() for r in caplog.records)


def test_monitored_metric_goes_to_the_controller(tmp_path, fake_controller) -> None:
    callback = TrimtabCallback(
        job="hf", endpoint=fake_controller.endpoint, report_every=5, monitor="eval_loss"
    )
    seen: list[float] = []

    class Record(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics["eval_loss"])

    trainer, model, _ = _train(
        tmp_path,
        [callback, Record()],
        40,
        eval_dataset=Data(64),
        eval_strategy="steps",
        eval_steps=10,
    )
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) == 8
                             and c.of_type(wire.Bye))
    # The usual last line, an evaluation after training: after the Bye, on a link of its
    # own, naming the run (before, the closed guard dropped it).
    after = trainer.evaluate()["eval_loss"]
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Validation)) == 2)
    late = fake_controller.of_type(wire.Validation)[-1]
    assert (late.step, late.value, late.run_id) == (40, pytest.approx(after),
                                                    callback.guard.run_id)
    assert after == seen[4]
    assert fake_controller.messages[-1] == late
    fake_controller.wait_for(lambda c: callback.guard._transport.late == {"answered": 1})
    reports = fake_controller.of_type(wire.Report)
    reported = [r.validation for r in reports if r.validation is not None]
    # Each goes with the next report; the last evaluation (at step 40, after the last
    # report) goes on its own as the guard closes in on_train_end, before the Bye.
    assert len(seen) == 5 and reported == pytest.approx(seen[:3])  # the 5th: evaluate()
    final = fake_controller.of_type(wire.Validation)[:1]
    assert [(v.step, v.value, v.run_id) for v in final] == [(40, pytest.approx(seen[3]), None)]
    kinds = [m.type for m in fake_controller.messages]
    assert kinds.index("validation") > max(i for i, k in enumerate(kinds) if k == "report")
    assert kinds.index("validation") < kinds.index("bye")
    # Evaluation forward passes are not training losses: each window's are its steps' own.
    windows = [model.losses[i : i + 5] for i in range(0, 40, 5)]
    assert [r.loss_mean for r in reports] == pytest.approx([sum(w) / 5 for w in windows])


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"hooks=True is invalid; allowed: leave it out"):
        TrimtabCallback(job="hf", hooks=True)
    with pytest.raises(ValueError, match=r"monitor=3 is invalid; allowed: None or a metric"):
        TrimtabCallback(job="hf", monitor=3)


@pytest.mark.parametrize("recreate", [False, True], ids=["kept", "re-created"])
def test_training_resumed_from_a_trainer_checkpoint_continues_trimtabs_state(
        tmp_path, fake_controller, recreate) -> None:
    """trimtab's state goes into the Trainer's checkpoints (trainer_state.json) and comes
    back with ``resume_from_checkpoint``, whether the Trainer keeps the callback given or
    re-creates it from its saved arguments (``restore_callback_states_from_checkpoint``)."""
    first = TrimtabCallback(job="hf", endpoint=fake_controller.endpoint, report_every=5,
                            heartbeat_s=0.05, clip=5.0)

    class Command(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                fake_controller.wait_for(lambda c: c.of_type(wire.Register))
                fake_controller.send(wire.Command(
                    job="hf", seq=1, scale=wire.ScaleTargets(lr=0.5),
                    knobs=wire.Knobs(clip=2.0)))
                # In the guard's slot before the next step (a loaded host is slow to deliver).
                assert wait_for(lambda: first.guard._transport._command is not None)
            if state.global_step == 40:  # preempted (the schedule is the 60 steps' one)
                control.should_training_stop = True

    kw = {"save_strategy": "steps", "save_steps": 30, "lr_scheduler_type": "linear"}
    _train(tmp_path, [first, Command()], 60, **kw)
    assert first.guard.applied_seq == 1
    registered = len(fake_controller.of_type(wire.Register))

    second = TrimtabCallback(job="hf", endpoint=fake_controller.endpoint, report_every=5,
                             heartbeat_s=0.05, clip=5.0)
    trainer, _, lrs = _train(tmp_path, [second], 60,
                             resume_from=str(tmp_path / "out" / "checkpoint-30"),
                             restore_callback_states_from_checkpoint=recreate, **kw)
    (callback,) = [c for c in trainer.callback_handler.callbacks
                   if isinstance(c, TrimtabCallback)]
    assert (callback is second) != recreate
    guard = callback.guard
    assert guard.run_id == first.guard.run_id and guard.global_step == 60
    assert guard.applied_seq == 1
    assert guard.clip == 2.0 and guard.scale.lr == 0.5
    assert guard.knobs.lr == pytest.approx(0.5 * 0.05 * (1 - 59 / 60))
    if not recreate:  # (a re-created callback's step hook runs after the recorder's)
        # Every step after the resume ran at the Trainer's (linear) lr times the multiplier.
        assert len(lrs) == 30 and all(lr == pytest.approx(0.5 * 0.05 * (1 - (30 + t) / 60))
                                      for t, lr in enumerate(lrs))
    fake_controller.wait_for(lambda c: any(
        r.resume == 1 for r in c.of_type(wire.Register)[registered:]))


def test_weight_averaging_through_the_callback(tmp_path, dead_endpoint) -> None:
    """``ema=`` goes to attach: the Trainer's every optimizer step (under accelerate's
    wrapper) is averaged in, and the average is not the model."""
    callback = TrimtabCallback(job="hf", endpoint=dead_endpoint, report_every=5, ema=0.9)
    trainer, model, _ = _train(tmp_path, [callback], 20)
    average = callback.guard.ema_model
    assert int(average.n_averaged) == trainer.state.global_step == 20
    ours = dict(average.module.named_parameters())
    assert ours.keys() == dict(model.named_parameters()).keys()
    assert all(not torch.equal(ours[n], p) for n, p in model.named_parameters())


class Tokens(torch.utils.data.Dataset):
    """Random token sequences for a causal LM, some label positions masked (-100), so that
    micro-batches hold different numbers of counted tokens."""

    def __init__(self, n: int = 256, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        masked = torch.rand(n, seq, generator=g) < 0.3
        self.labels = torch.where(masked, -100, self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _tiny_gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["num_items_in_batch", "mean"])
def test_reported_loss_is_the_trainers_logged_loss(tmp_path, fake_controller, accumulation,
                                                   loss_kwargs) -> None:
    """A model that takes the Trainer's loss kwargs (a GPT-2) gets ``num_items_in_batch``:
    its loss per micro-batch is that micro-batch's share of the step's token sum, and the
    step's loss is their sum; one that does not returns its mean, and the Trainer divides by
    the accumulation steps. Either way each report's loss is the Trainer's logged loss over
    the same steps."""
    model = _tiny_gpt2()
    if not loss_kwargs:
        model.accepts_loss_kwargs = False  # what the Trainer reads
    callback = TrimtabCallback(job="hf", endpoint=fake_controller.endpoint, report_every=5,
                               heartbeat_s=0.05)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback])
    trainer.train()
    assert trainer.model_accepts_loss_kwargs is loss_kwargs
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) == 2)
    reported = [r.loss_mean for r in fake_controller.of_type(wire.Report)]
    assert reported == pytest.approx(logged, rel=1e-5)


def test_train_again_after_an_interrupted_train_closes_the_first_guard(
        tmp_path, fake_controller, caplog) -> None:
    """The notebook pattern: ``trainer.train()`` interrupted (Ctrl-C at step 8: no
    ``on_train_end``), then ``trainer.train()`` again on the same Trainer. The first guard
    is closed when the second train begins, so only one guard is hooked and counts."""
    callback = TrimtabCallback(job="hf", endpoint=fake_controller.endpoint, report_every=5,
                               heartbeat_s=0.05)

    class CtrlC(transformers.TrainerCallback):
        armed = True
        hooks: list[int] = []  # trimtab's step hooks on the optimizer, at each step's end

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.hooks.append(len(optimizer.optimizer._optimizer_step_pre_hooks))
            if self.armed and state.global_step == 8:
                self.armed = False
                raise KeyboardInterrupt

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=16,
        learning_rate=0.05, optim="sgd", report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    model = TinyRegressor(TinyConfig())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                   callbacks=[callback, CtrlC()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    first = callback.guard
    assert not first._closed and first.global_step == 8
    with caplog.at_level(logging.INFO, logger="trimtab.client"):
        trainer.train()
    second = callback.guard
    assert second is not first and first._closed and first.global_step == 8
    assert second.global_step == trainer.state.global_step == 20
    assert CtrlC.hooks == [1] * 28
    optimizer = trainer.optimizer.optimizer
    assert len(optimizer._optimizer_step_pre_hooks) == 0  # the second guard closed too
    assert len(model._forward_hooks) == 0
    assert any("still open" in r.getMessage() for r in caplog.records)
    fake_controller.wait_for(lambda c: len(c.of_type(wire.Bye)) == 2)
    assert fake_controller.of_type(wire.Bye)[0].reason == "error: interrupted"


def test_resumed_from_a_checkpoint_without_trimtabs_state(tmp_path, dead_endpoint,
                                                          caplog) -> None:
    """A checkpoint written by a run without the callback: the resumed run attaches (its
    steps counted from the resume, with a warning that says so) and its own checkpoints
    hold trimtab's state, where the Trainer used to fail at the first save (KeyError:
    'TrimtabCallback' in its stateful_callbacks)."""
    kw = {"save_strategy": "steps", "save_steps": 10, "lr_scheduler_type": "linear"}
    _train(tmp_path, [], 20, **kw)
    callback = TrimtabCallback(job="hf", endpoint=dead_endpoint, report_every=5)
    with caplog.at_level(logging.WARNING, logger="trimtab.client"):
        trainer, _, _ = _train(tmp_path, [callback], 30, **kw,
                               resume_from=str(tmp_path / "out" / "checkpoint-10"))
    assert trainer.state.global_step == 30 and callback.guard.global_step == 20
    assert any("no trimtab state" in r.getMessage() and "step 10" in r.getMessage()
               for r in caplog.records)
    saved = transformers.TrainerState.load_from_json(
        str(tmp_path / "out" / "checkpoint-30" / "trainer_state.json"))
    assert saved.stateful_callbacks["TrimtabCallback"]["attributes"]["resume_state"]["step"] == 20


class RollbackAt(transformers.TrainerCallback):
    """Hands the trimtab guard a rollback to ``to`` once the Trainer reaches ``at`` (as its
    transport thread does on receiving one)."""

    def __init__(self, trimtab: TrimtabCallback, at: int, to: int) -> None:
        self.trimtab, self.at, self.to = trimtab, at, to

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.trimtab.guard._transport._handle(
                wire.Command(job=self.trimtab.job, seq=1, mark_stable=self.to,
                             rollback_to=self.to))


def test_a_rollback_leaves_the_trainers_step_ahead_by_the_steps_rolled_back_plus_one(
        tmp_path, dead_endpoint) -> None:
    """The Trainer owns its loop: a rollback restores the model, optimizer and scheduler, and
    ``state.global_step`` runs on. The step that carries the rollback out updates nothing
    and the Trainer counts it: ahead by the steps rolled back plus one (docs/adapters.md)."""
    callback = TrimtabCallback(job="hf-rb", endpoint=dead_endpoint, report_every=5,
                               checkpoint_every=5)
    trainer, _, _ = _train(tmp_path, [callback, RollbackAt(callback, at=12, to=10)],
                           max_steps=20)
    guard = callback.guard
    assert guard.rollbacks == 1
    assert trainer.state.global_step - guard.global_step == (12 - 10) + 1
