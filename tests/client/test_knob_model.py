"""The knob model on the loops users write: trimtab scales the user's own schedule.

For each kind of loop -- a loop that writes ``param_group["lr"]`` itself every iteration
(through ``guard.step`` and through ``hooks=True``), a ``LambdaLR`` warm-up + cosine, a
``OneCycleLR``, a ``StepLR`` handed to the guard, a Lightning fit and a Hugging Face
Trainer with their own schedules -- the lr each optimizer step ran with (recorded by a
step pre-hook registered after the guard's) is compared with the lr the same schedule
gives without trimtab:

- before any command the run is the user's, step for step;
- a commanded decrease (multiplier 0.5) lowers every following step to 0.5 x the
  schedule's own value for that step, and it persists across the loop's rewrites and the
  scheduler's steps; an increase (x1.5) raises it;
- param-group ratios (two groups, lr 0.05 and 0.1) are kept at every step;
- the ack's effective lr is the lr the first step under the command ran with;
- a rollback restores the schedule's position (the scheduler's state, or a loop that
  reads ``guard.global_step``) and the cut multiplies the schedule from there.

Commands are handed to the guard as its transport thread does on receiving them, at a
known iteration, so that the step they apply at is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from trimtab.client import Guard, attach
from trimtab.protocol import wire

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

PEAKS = (0.05, 0.1)  # two param groups: the user's ratio is 2
TOTAL, WARMUP = 60, 8


def warmup_cosine(t: int) -> float:
    """The user's schedule: linear warm-up, then cosine down to a tenth."""
    if t < WARMUP:
        return (t + 1) / WARMUP
    progress = min(1.0, (t - WARMUP) / (TOTAL - WARMUP))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=list(PEAKS), total_steps=TOTAL + 20),
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.6),
    # Warm-up, then cosine with warm restarts: schedulers chained, their state nested.
    "sequential": lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=8)], milestones=[5]),
}
KINDS = ["loop", "loop_hooks", *SCHEDULERS]


def _groups(model: torch.nn.Module) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": PEAKS[0], "weight_decay": 0.1},
            {"params": biases, "lr": PEAKS[1], "weight_decay": 0.0}]


def own_lrs(kind: str, steps: int) -> list[list[float]]:
    """Each group's lr for the optimizer step after ``p`` steps, without trimtab."""
    if kind.startswith("loop"):
        return [[peak * warmup_cosine(p) for peak in PEAKS] for p in range(steps)]
    opt = torch.optim.AdamW(_groups(torch.nn.Linear(2, 1)))
    sched = SCHEDULERS[kind](opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


class Loop:
    """A user's loop of one kind, attached; records (position, lrs) of every step run."""

    def __init__(self, kind: str, endpoint: str, **options) -> None:
        torch.manual_seed(0)
        self.kind = kind
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                         torch.nn.Linear(16, 1))
        self.opt = torch.optim.AdamW(_groups(self.model), betas=(0.9, 0.95))
        self.sched = SCHEDULERS[kind](self.opt) if kind in SCHEDULERS else None
        self.guard: Guard = attach(self.model, self.opt, job=f"knobs-{kind}", endpoint=endpoint,
                                   report_every=5, heartbeat_s=0.05, scheduler=self.sched,
                                   hooks=kind == "loop_hooks", **options)
        #: (steps taken before it, each group's lr) of every optimizer step that ran...
        self.ran: list[tuple[int, list[float]]] = []
        #: ... and each group's lr the loop or its scheduler had set for it.
        self.own: list[list[float]] = []
        self._own_now: list[float] = []
        # Registered after the guard's own hooks: it sees what the step runs with.
        self.opt.register_step_pre_hook(self._record)
        self.data = torch.Generator().manual_seed(1)

    def _record(self, opt, args, kwargs) -> None:
        self.ran.append((self.guard.global_step, [g["lr"] for g in opt.param_groups]))
        self.own.append(self._own_now)

    def step(self, poison: bool = False) -> None:
        if self.kind.startswith("loop"):  # the loop's own schedule, nanoGPT-style
            for group, peak in zip(self.opt.param_groups, PEAKS, strict=True):
                group["lr"] = peak * warmup_cosine(self.guard.global_step)
        x = torch.randn(32, 8, generator=self.data)
        loss = (self.model(x) - x[:, :1]).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if poison:
            self.model[0].weight.grad[0, 0] = float("nan")
        self._own_now = [g["lr"] for g in self.opt.param_groups]  # the user's, this step
        if self.kind == "loop_hooks":
            self.guard.observe_loss(loss)
            self.opt.step()
        else:
            self.guard.step(loss)
        if self.sched is not None:
            self.sched.step()

    def deliver(self, command: wire.Command) -> None:
        """Hand a command over as the transport thread does on receiving it."""
        self.guard._transport._handle(command)


def _acks(guard: Guard) -> list[wire.Ack]:
    return [m for m in guard._transport._control if isinstance(m, wire.Ack)]


def _ratios(ran, own) -> list[list[float]]:
    return [[lr / o for lr, o in zip(lrs, own[p], strict=True)] for p, lrs in ran]


@pytest.mark.parametrize("kind", KINDS)
def test_a_decrease_lowers_and_an_increase_raises_the_users_own_schedule(kind, dead_endpoint):
    run = Loop(kind, dead_endpoint, checkpoint_every=0)
    own = own_lrs(kind, TOTAL)
    with run.guard:
        for it in range(TOTAL):
            if it == 15:
                run.deliver(wire.Command(job=run.guard.job, seq=1,
                                         scale=wire.ScaleTargets(lr=0.5)))
            if it == 40:
                run.deliver(wire.Command(job=run.guard.job, seq=2,
                                         scale=wire.ScaleTargets(lr=1.5)))
            run.step()
            # Between steps the loop and its scheduler see their own values.
            if kind.startswith("loop"):
                assert [g["lr"] for g in run.opt.param_groups] == pytest.approx(own[it])
    assert [p for p, _ in run.ran] == list(range(TOTAL))
    ratios = _ratios(run.ran, own)
    expected = [1.0] * 15 + [0.5] * 25 + [1.5] * 20  # applied at the next step boundary
    for p, (r, want) in enumerate(zip(ratios, expected, strict=True)):
        assert r == [pytest.approx(want, rel=1e-12)] * 2, (kind, p, run.ran[p], own[p])
    # Both groups by the same multiplier: the user's ratio is kept at every step.
    assert all(lrs[1] / lrs[0] == pytest.approx(own[p][1] / own[p][0]) for p, lrs in run.ran)
    acks = _acks(run.guard)
    assert [(a.seq, a.step) for a in acks] == [(1, 15), (2, 40)]
    for ack in acks:  # the ack states what the first step under the command ran with
        assert ack.knobs.lr == pytest.approx(run.ran[ack.step][1][0], rel=1e-12)
        assert ack.base.lr == pytest.approx(own[ack.step][0], rel=1e-12)
    assert acks[0].scale.lr == 0.5 and acks[1].scale.lr == 1.5


@pytest.mark.parametrize("kind", ["loop", "lambda", "onecycle", "steplr"])
def test_a_rollback_restores_the_schedules_position_and_cuts_from_there(kind, dead_endpoint):
    """The run is at x0.8 when it rolls back to step 20 with x0.4 (half the multiplier in
    force at the fault): the schedule continues from step 20's own value, times 0.4."""
    run = Loop(kind, dead_endpoint, checkpoint_every=10, keep=5)
    own = own_lrs(kind, TOTAL)
    job = run.guard.job
    with run.guard:
        for it in range(45):
            if it == 5:
                run.deliver(wire.Command(job=job, seq=1, scale=wire.ScaleTargets(lr=0.8)))
            if it == 25:
                run.deliver(wire.Command(job=job, seq=2, mark_stable=20))
            if it == 35:
                run.deliver(wire.Command(job=job, seq=3, rollback_to=20,
                                         scale=wire.ScaleTargets(lr=0.4)))
            run.step()
        assert run.guard.rollbacks == 1
    # Step 35's boundary rolled back to 20: the next step runs at position 20, and on.
    positions = [p for p, _ in run.ran]
    assert positions == list(range(35)) + list(range(20, 29))
    ratios = _ratios(run.ran, own)
    assert all(r == [pytest.approx(1.0)] * 2 for r in ratios[:5])
    assert all(r == [pytest.approx(0.8)] * 2 for r in ratios[5:35])
    assert all(r == [pytest.approx(0.4)] * 2 for r in ratios[35:])
    ack = next(a for a in _acks(run.guard) if a.seq == 3)
    assert (ack.restored_step, ack.step) == (20, 20)
    assert ack.knobs.lr == pytest.approx(0.4 * own[20][0]) and ack.scale.lr == 0.4


def test_a_loop_counting_its_own_iterations_keeps_its_position_through_a_rollback(
        dead_endpoint):
    """nanoGPT's loop derives its lr from its own iteration counter, which a rollback does
    not rewind (the data goes on too): the lr continues from that counter, times the cut."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ran: list[float] = []
    with attach(model, opt, job="iters", endpoint=dead_endpoint, checkpoint_every=5,
                heartbeat_s=0.05) as guard:
        opt.register_step_pre_hook(lambda o, a, k: ran.append(o.param_groups[0]["lr"]))
        for it in range(30):
            opt.param_groups[0]["lr"] = 0.1 * warmup_cosine(it)
            if it == 12:
                guard._transport._handle(wire.Command(job="iters", seq=1, mark_stable=10))
            if it == 20:
                guard._transport._handle(wire.Command(job="iters", seq=2, rollback_to=10,
                                                      scale=wire.ScaleTargets(lr=0.5)))
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        assert guard.rollbacks == 1 and guard.global_step == 10 + 9
    # Iteration 20 rolled back (no step); iterations 21.. run at 0.5 x their own lr.
    expected = [0.1 * warmup_cosine(it) for it in range(20)]
    expected += [0.05 * warmup_cosine(it) for it in range(21, 30)]
    assert ran == pytest.approx(expected, rel=1e-12)


def test_reduce_lr_on_plateau_composes_and_rolls_back_with_the_run(dead_endpoint):
    """ReduceLROnPlateau reads and writes the group's lr between steps, from a metric: it
    sees the user's own lr (trimtab's multiplier is on only around the step), so its cuts
    and trimtab's compose; a rollback brings back its counters with the lr it had then."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    ran: list[float] = []
    own: list[float] = []
    g = torch.Generator().manual_seed(0)
    with attach(model, opt, job="plateau-sched", endpoint=dead_endpoint, checkpoint_every=5,
                heartbeat_s=0.05, scheduler=sched) as guard:
        opt.register_step_pre_hook(lambda o, a, k: ran.append(o.param_groups[0]["lr"]))
        for it in range(40):
            if it == 3:
                guard._transport._handle(wire.Command(job=guard.job, seq=1,
                                                      scale=wire.ScaleTargets(lr=0.5)))
            if it == 12:
                guard._transport._handle(wire.Command(job=guard.job, seq=2, mark_stable=10))
            if it == 25:
                guard._transport._handle(wire.Command(job=guard.job, seq=3, rollback_to=10,
                                                      scale=wire.ScaleTargets(lr=0.25)))
            loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            own.append(opt.param_groups[0]["lr"])  # the user's lr for this step
            guard.step(loss)
            sched.step(1.0)  # a flat metric: a cut every second epoch (patience 1)
        assert guard.rollbacks == 1 and guard.global_step == 10 + 14
    del own[25]  # iteration 25 rolled back: no step ran
    multiplier = [1.0] * 3 + [0.5] * 22 + [0.25] * 14
    assert ran == pytest.approx([m * o for m, o in zip(multiplier, own, strict=True)],
                                rel=1e-12)
    # The scheduler went on halving; after the rollback it replays its own trajectory from
    # step 10 (its lr and counters as they were), under the new multiplier.
    assert own[:25] == pytest.approx([0.1 * 0.5 ** max(0, (i - 1) // 2) for i in range(25)])
    assert own[25:] == pytest.approx(own[10:24])


# -- trainers ------------------------------------------------------------------------------


def _data(n: int = 2048):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g)


def _check_trainer_run(ran: list[float], own: list[float], acks, k1: int, k2: int) -> None:
    """Commands delivered after steps k1 and k2 (x0.5, then x1.5) apply from the next."""
    m = [1.0] * (k1 + 1) + [0.5] * (k2 - k1) + [1.5] * (len(own) - k2 - 1)
    assert ran == [pytest.approx(f * o, rel=1e-9, abs=1e-15) for f, o in zip(m, own, strict=True)]
    assert [a.seq for a in acks] == [1, 2]
    assert [a.knobs.lr for a in acks] == [pytest.approx(ran[k1 + 1]), pytest.approx(ran[k2 + 1])]


def test_a_lightning_fit_with_its_own_scheduler(dead_endpoint):
    pl = pytest.importorskip("pytorch_lightning")
    from trimtab.client.lightning import TrimtabCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(_groups(self.net))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    ran: list[float] = []
    trimtab = TrimtabCallback(job="pl-knobs", endpoint=dead_endpoint, report_every=5,
                              heartbeat_s=0.05, checkpoint_every=0)

    def record(opt, args, kwargs):
        """Lightning steps with a closure, and the guard acts once it has run (the
        gradients exist only then): read the lr right after it, inside the step."""
        closure = kwargs["closure"]

        def after_closure():
            out = closure()
            ran.append(opt.param_groups[0]["lr"])
            return out

        return args, {**kwargs, "closure": after_closure}

    class Driver(pl.Callback):  # after trimtab's: its closure runs inside the guard's
        def on_fit_start(self, trainer, module):
            trainer.optimizers[0].register_step_pre_hook(record)

        def on_train_batch_end(self, trainer, *args):
            for k, seq, m in ((10, 1, 0.5), (30, 2, 1.5)):
                if trainer.global_step == k + 1:  # k + 1 steps done
                    trimtab.guard._transport._handle(wire.Command(
                        job="pl-knobs", seq=seq, scale=wire.ScaleTargets(lr=m)))

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(max_steps=TOTAL, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[trimtab, Driver()])
    trainer.fit(Module(), loader)
    own = [PEAKS[0] * warmup_cosine(p) for p in range(TOTAL)]
    _check_trainer_run(ran, own, _acks(trimtab.guard), 10, 30)


def test_a_hugging_face_trainer_with_its_own_schedule(tmp_path, dead_endpoint):
    transformers = pytest.importorskip("transformers")
    from trimtab.client.hf import TrimtabCallback

    class Config(transformers.PretrainedConfig):
        model_type = "knobs-regressor"

    class Regressor(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config) -> None:
            super().__init__(config)
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 1))

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = _data()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    ran: list[float] = []
    trimtab = TrimtabCallback(job="hf-knobs", endpoint=dead_endpoint, report_every=5,
                              heartbeat_s=0.05, checkpoint_every=0)

    class Driver(transformers.TrainerCallback):  # after trimtab's, as above
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            while hasattr(optimizer, "optimizer"):
                optimizer = optimizer.optimizer
            optimizer.register_step_pre_hook(
                lambda o, a, k: ran.append(o.param_groups[0]["lr"]))

        def on_step_end(self, args, state, control, **kwargs):
            for k, seq, m in ((10, 1, 0.5), (30, 2, 1.5)):
                if state.global_step == k + 1:
                    trimtab.guard._transport._handle(wire.Command(
                        job="hf-knobs", seq=seq, scale=wire.ScaleTargets(lr=m)))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=TOTAL, per_device_train_batch_size=32,
        learning_rate=PEAKS[0], lr_scheduler_type="cosine", warmup_steps=WARMUP,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0)
    trainer = transformers.Trainer(model=Regressor(Config()), args=args, train_dataset=Data(),
                                   callbacks=[trimtab, Driver()])
    trainer.train()
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAKS[0])
    sched = transformers.get_cosine_schedule_with_warmup(ref, WARMUP, TOTAL)
    own = []
    for _ in range(TOTAL):
        own.append(ref.param_groups[0]["lr"])
        ref.step()
        sched.step()
    assert len(ran) == TOTAL
    _check_trainer_run(ran, own, _acks(trimtab.guard), 10, 30)
