"""The client against a real ROUTER playing controller: registration, reports, commands,
acks, an absent or late controller, re-registration and garbage frames."""

from __future__ import annotations

import logging
import math
import statistics
import time

import pytest
import torch

from trimtab.client import Guard, attach
from trimtab.protocol import wire

pytestmark = pytest.mark.timeout(30)


class Run:
    """A tiny regression run that records, independently of the guard, what each step saw."""

    def __init__(self, opt_factory=None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1)
        )
        weights = [p for n, p in self.model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.model.named_parameters() if n.endswith("bias")]
        factory = opt_factory or (lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9))
        self.opt = factory(
            [{"params": weights, "weight_decay": 1e-4}, {"params": biases, "lr": 0.1,
                                                         "weight_decay": 0.0}]
        )
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.ratios: list[float] = []
        #: Per step, the gradient and the update it made, flattened.
        self.grads: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor] = []
        self.steps = 0
        #: Per optimizer step, each group's (lr, momentum) that step ran with.
        self.used: list[tuple[list[float], list[float]]] = []
        self.opt.register_step_pre_hook(lambda opt, args, kwargs: self.used.append(
            ([g["lr"] for g in opt.param_groups], [g.get("momentum") for g in opt.param_groups])))

    def step(self, guard: Guard, poison: bool = False) -> None:
        x = torch.randn(8, 5)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        if poison:
            self.model[0].weight.grad[0, 0] = float("inf")
        grads = [p.grad for p in self.model.parameters()]
        self.losses.append(loss.item())
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())
        self.grads.append(torch.cat([g.reshape(-1) for g in grads]).clone())
        before = [p.detach().clone() for p in self.model.parameters()]
        guard.step(loss)
        delta = [p.detach() - b for p, b in zip(self.model.parameters(), before, strict=True)]
        self.deltas.append(torch.cat([d.reshape(-1) for d in delta]))
        self.ratios.append(
            (torch.nn.utils.get_total_norm(delta) / torch.nn.utils.get_total_norm(before)).item()
        )
        self.steps += 1


def _attach(run: Run, endpoint: str, **kw) -> Guard:
    kw.setdefault("heartbeat_s", 0.05)
    kw.setdefault("report_every", 5)
    return attach(run.model, run.opt, job="link-test", endpoint=endpoint, **kw)


def test_register_reports_command_ack(fake_controller) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint, batch_size=8) as guard:
        for _ in range(10):
            run.step(guard)
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 2)

        register = fake_controller.of_type(wire.Register)[0]
        assert fake_controller.messages[0] == register  # nothing goes before registration
        sizes = [sum(p.numel() for p in g["params"]) for g in run.opt.param_groups]
        assert register.facts == wire.ScaleFacts(
            param_count=sum(sizes), group_sizes=sizes, world_size=1, optimizer="SGD",
            dtype="float32", device="cpu", batch_size=8,
        )
        assert register.job == "link-test" and register.report_every == 5
        assert register.run_id == guard.run_id and len(register.run_id) == 32
        assert register.knobs == wire.Knobs(lr=0.05, momentum=0.9, weight_decay=1e-4)

        for i, report in enumerate(fake_controller.of_type(wire.Report)[:2]):
            losses, norms = run.losses[5 * i : 5 * i + 5], run.norms[5 * i : 5 * i + 5]
            assert (report.seq, report.step, report.window) == (i + 1, 5 * (i + 1), 5)
            assert report.loss_mean == pytest.approx(statistics.fmean(losses), rel=1e-5)
            assert report.loss_last == pytest.approx(losses[-1], rel=1e-6)
            assert report.loss_min == pytest.approx(min(losses), rel=1e-6)
            assert report.loss_max == pytest.approx(max(losses), rel=1e-6)
            assert report.grad_norm_mean == pytest.approx(statistics.fmean(norms), rel=1e-5)
            assert report.grad_norm_max == pytest.approx(max(norms), rel=1e-5)
            assert report.grad_norm_std == pytest.approx(statistics.pstdev(norms), rel=1e-3)
            assert len(report.group_grad_norms) == 2
            assert math.hypot(*report.group_grad_norms) <= report.grad_norm_max * (1 + 1e-5)
            assert report.update_ratio == pytest.approx(run.ratios[5 * i + 4], rel=1e-4)
            if i == 0:  # no update before the run's first step
                assert report.update_alignment is None
            else:  # the window's first gradient against the previous window's last update
                cos = torch.nn.functional.cosine_similarity(
                    run.grads[5 * i], -run.deltas[5 * i - 1], dim=0).item()
                assert report.update_alignment == pytest.approx(cos, abs=1e-5)
            assert report.nonfinite_grads == report.skipped_steps == 0
            assert report.step_time_s is not None and report.step_time_s > 0
            assert report.knobs == register.knobs and report.applied_seq == 0

        command = wire.Command(
            job="link-test", seq=1, scale=wire.ScaleTargets(lr=0.5),
            knobs=wire.Knobs(momentum=0.5, clip=2.0), reasons=["test"],
        )
        fake_controller.send(command)
        fake_controller.wait_for(lambda c: guard.applied_seq == 1,
                                 while_waiting=lambda: run.step(guard))
        # Between steps the groups hold the loop's own values; the step used them x0.5.
        assert [g["lr"] for g in run.opt.param_groups] == pytest.approx([0.05, 0.1])
        assert [g["momentum"] for g in run.opt.param_groups] == [0.9, 0.9]
        assert run.used[-1] == (pytest.approx([0.025, 0.05]), [0.5, 0.5])
        assert guard.clip == 2.0
        in_force = wire.Knobs(lr=0.025, momentum=0.5, weight_decay=1e-4, clip=2.0)
        assert guard.knobs == in_force and guard.scale == wire.Scale(lr=0.5)
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Ack)) == 1)
        ack = fake_controller.of_type(wire.Ack)[0]
        assert (ack.seq, ack.knobs, ack.scale) == (1, in_force, wire.Scale(lr=0.5))
        assert ack.base == wire.Knobs(lr=0.05, momentum=0.9, weight_decay=1e-4)

        # The same seq again, with other values: acknowledged with what is in force, not applied.
        fake_controller.send(command.model_copy(update={"scale": wire.ScaleTargets(lr=9.0)}))
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Ack)) == 2,
                                 while_waiting=lambda: run.step(guard))
        assert fake_controller.of_type(wire.Ack)[1].knobs == in_force
        assert run.used[-1][0] == pytest.approx([0.025, 0.05])
        fake_controller.wait_for(
            lambda c: any(r.applied_seq == 1 for r in c.of_type(wire.Report)),
            while_waiting=lambda: run.step(guard),
        )
    fake_controller.wait_for(lambda c: bool(c.of_type(wire.Bye)))


def test_nonfinite_step_is_reported(fake_controller) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint) as guard:
        for i in range(5):
            run.step(guard, poison=i == 2)
        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Report)))
        report = fake_controller.of_type(wire.Report)[0]
        assert (report.nonfinite_grads, report.skipped_steps, report.step) == (1, 1, 4)
        finite = [n for n in run.norms if math.isfinite(n)]
        assert report.grad_norm_max == pytest.approx(max(finite), rel=1e-5)
        assert guard.global_step == 4


def test_no_controller_training_goes_on(dead_endpoint: str) -> None:
    run = Run()
    guard = _attach(run, dead_endpoint, report_every=2, queue_size=3)
    for _ in range(20):
        run.step(guard)
    assert guard.global_step == 20
    assert not guard.connected
    assert guard.dropped_reports == 10 - 3  # ten reports, room for three, oldest dropped
    guard.close()  # the test's timeout bounds it; a hang here fails the test
    assert not guard._transport._thread.is_alive()


def test_controller_that_appears_later(make_controller, unused_port: int) -> None:
    run = Run()
    with _attach(run, f"tcp://127.0.0.1:{unused_port}") as guard:
        for _ in range(7):
            run.step(guard)
        assert not guard.connected
        controller = make_controller(unused_port)  # binds only now, training under way
        controller.wait_for(
            lambda c: bool(c.of_type(wire.Register)) and bool(c.of_type(wire.Report))
            and guard.connected,
            while_waiting=lambda: run.step(guard),
        )
        assert controller.of_type(wire.Register)[0].run_id == guard.run_id


def test_reregisters_on_unknown_job(fake_controller) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint) as guard:
        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        for _ in range(3):
            run.step(guard)
        fake_controller.send(wire.Error(code="unknown_job", detail="who?", job="link-test"))
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Register)) == 2,
                                 while_waiting=lambda: run.step(guard))
        again = fake_controller.of_type(wire.Register)[1]
        assert again.run_id == guard.run_id and again.step >= 3


def test_silent_controller_triggers_reconnect_and_register(make_controller) -> None:
    controller = make_controller(answer_heartbeats=False)
    run = Run()
    with _attach(run, controller.endpoint) as guard:
        controller.wait_for(lambda c: len(c.of_type(wire.Register)) >= 2,
                            while_waiting=lambda: run.step(guard))
        assert guard._transport.connects >= 2


def test_a_close_between_links_still_says_bye_and_sends_what_is_queued(make_controller) -> None:
    """A client that heard nothing for a while (a controller busy, or this process's
    threads starved) is in a reconnect's pause, holding no socket, when the run ends: its
    close opens one more link and sends the queued reports and the Bye, within the
    close's bound (the acks of a last rollback go the same way)."""
    import time

    controller = make_controller(answer_heartbeats=False)
    run = Run()
    with _attach(run, controller.endpoint, liveness=2) as guard:
        # Each silent link lives 2 beats (0.1 s), then a pause that doubles: 0.05 .. 1.6 s.
        controller.wait_for(lambda c: guard._transport.connects >= 6,
                            while_waiting=lambda: run.step(guard))
        time.sleep(0.3)  # link 6 is dropped; its pause (1.6 s) has begun
        seen = len(controller.messages)
        for _ in range(5):
            run.step(guard)  # one more report, queued while no link is up
        last = guard.global_step
    controller.wait_for(lambda c: bool(c.of_type(wire.Bye)), timeout_s=2.0)
    after = controller.messages[seen:]
    assert [m.type for m in after][-2:] == ["report", "bye"]
    assert after[-2].step == last


def test_the_registration_says_how_many_checkpoints_the_client_keeps(make_controller) -> None:
    """``keep``: with the listing, the controller knows which checkpoint the next snapshot
    evicts. A client without checkpoints leaves the field out of the frame (a field added
    within protocol v2: a controller from before it still takes the registration)."""
    import json

    for every, keep, said in ((10, 2, 2), (0, 3, None)):
        controller = make_controller()
        run = Run()
        with _attach(run, controller.endpoint, checkpoint_every=every, keep=keep):
            controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        register = controller.of_type(wire.Register)[0]
        assert register.keep == said
        assert ("keep" in json.loads(wire.encode(register))) == (said is not None)


def test_the_registration_says_the_lr_the_users_schedule_is_a_multiple_of(
    make_controller
) -> None:
    """``nominal_lr``: group 0's lr as the loop's torch scheduler was given it (its
    ``initial_lr``; ``max_lr`` for OneCycleLR), however far a warm-up has come when the
    job registers, so that an absolute lr a schedule policy is configured with relates to
    it. A loop without a scheduler leaves the field out of the frame (a field added within
    protocol v2: a controller from before it still takes the registration)."""
    import json

    def warmup(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

    def one_cycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.5, 0.8], total_steps=100)

    for make, said, at_registration in ((warmup, 0.05, 0.0005), (one_cycle, 0.5, 0.02),
                                        (None, None, 0.05)):
        controller = make_controller()
        run = Run()
        scheduler = None if make is None else make(run.opt)
        with _attach(run, controller.endpoint, scheduler=scheduler):
            controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        register = controller.of_type(wire.Register)[0]
        assert register.base.lr == pytest.approx(at_registration)
        assert register.nominal_lr == (None if said is None else pytest.approx(said))
        assert ("nominal_lr" in json.loads(wire.encode(register))) == (said is not None)


def test_bad_frames_are_counted_and_ignored(fake_controller) -> None:
    run = Run()
    with _attach(run, fake_controller.endpoint) as guard:
        fake_controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        fake_controller.send(b"\xff\x00 not json")
        fake_controller.send(b'{"v": 1, "type": "command", "job": "link-test"}')
        fake_controller.send(b'{"v": 99, "type": "heartbeat", "job": "link-test"}')
        fake_controller.send(b"[" * (wire.MAX_MESSAGE_BYTES + 1))
        fake_controller.wait_for(lambda c: guard.bad_frames == 4,
                                 while_waiting=lambda: run.step(guard))
        # The link survived: a valid command afterwards is still applied.
        fake_controller.send(wire.Command(job="link-test", seq=7,
                                          scale=wire.ScaleTargets(lr=0.2)))
        fake_controller.wait_for(lambda c: guard.applied_seq == 7,
                                 while_waiting=lambda: run.step(guard))
        assert guard.knobs.lr == pytest.approx(0.01)
        assert all(math.isfinite(p.sum().item()) for p in run.model.parameters())


def test_reports_made_before_a_controller_is_heard_are_marked_offline(make_controller,
                                                                     unused_port) -> None:
    """A report made while the client heard no controller says so; a controller that comes
    up later takes it as the past it did not see live (never evidence)."""
    import time

    run = Run()
    with _attach(run, f"tcp://127.0.0.1:{unused_port}") as guard:
        time.sleep(0.3)  # past the liveness window (3 beats of 0.05 s) with no controller
        for _ in range(20):
            run.step(guard)
        controller = make_controller(unused_port)
        controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 4 and guard.connected,
                            while_waiting=lambda: run.step(guard))
        controller.wait_for(lambda c: not c.of_type(wire.Report)[-1].offline,
                            while_waiting=lambda: run.step(guard))
    reports = controller.of_type(wire.Report)
    offline = [r.offline for r in reports]
    assert offline[:4] == [True] * 4  # the four windows made before it was there
    first_live = offline.index(False)
    assert all(not o for o in offline[first_live:])
    # The link the client registered on: reports made later carry it; those made before
    # the controller was there went under earlier links (reconnect attempts) or this one.
    (register,) = controller.of_type(wire.Register)[-1:]
    assert register.link >= 1 and all(r.link == register.link for r in reports[first_live:])


class _Mixed(torch.nn.Module):
    """bf16 weights beside fp32 ones (a norm kept in fp32 in a bf16 model)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = torch.nn.Linear(5, 7).to(torch.bfloat16)
        self.head = torch.nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(x.to(torch.bfloat16))).float())


def test_the_update_alignment_is_reported_for_mixed_dtype_parameters(fake_controller) -> None:
    """The range test's and the climb's alignment checks read it: a model whose weights
    are not all of one dtype must report it too (it was None for every report)."""
    torch.manual_seed(0)
    model = _Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads, deltas = [], []
    with attach(model, opt, job="mixed", endpoint=fake_controller.endpoint,
                heartbeat_s=0.05, report_every=5) as guard:
        for _ in range(15):
            x = torch.randn(8, 5)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grads.append(torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]))
            before = [p.detach().float().clone() for p in model.parameters()]
            guard.step(loss)
            deltas.append(torch.cat([(p.detach().float() - b).reshape(-1)
                                     for p, b in zip(model.parameters(), before, strict=True)]))
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Report)) >= 3)
    reports = fake_controller.of_type(wire.Report)[:3]
    assert reports[0].update_alignment is None  # no update before the first step
    for i, report in enumerate(reports[1:], 1):
        cos = torch.nn.functional.cosine_similarity(grads[5 * i], -deltas[5 * i - 1],
                                                    dim=0).item()
        assert report.update_alignment == pytest.approx(cos, abs=0.02)  # bf16 arithmetic


def test_the_registration_says_whether_the_optimizer_had_stepped(fake_controller) -> None:
    """A fresh optimizer registers no warm start; one whose state was loaded from a run
    that trained registers one (the controller's range test then looks for no evidence)."""
    trained = Run()
    with _attach(trained, fake_controller.endpoint) as guard:
        for _ in range(3):
            trained.step(guard)
        fake_controller.wait_for(lambda c: c.of_type(wire.Register))
    assert fake_controller.of_type(wire.Register)[0].warm_start is None
    fake_controller.messages.clear()
    again = Run()
    again.opt.load_state_dict(trained.opt.state_dict())
    with _attach(again, fake_controller.endpoint):
        fake_controller.wait_for(lambda c: c.of_type(wire.Register))
    assert fake_controller.of_type(wire.Register)[0].warm_start is True


def _hold_the_gil(at_least_s: float) -> float:
    """Hold the GIL in one C call, a big-integer product, for at least ``at_least_s``
    (as torch.compile's Python-side work holds it for seconds): how long it held."""
    exponent = 1_000_000
    while True:
        x, y = 3**exponent, 7**exponent
        start = time.monotonic()
        x * y  # noqa: B018 - the product is the point: one call that never lets go
        held = time.monotonic() - start
        if held >= at_least_s:
            return held
        exponent *= 2


def test_a_stall_of_this_process_is_not_a_lost_controller(fake_controller, caplog) -> None:
    """The transport thread cannot run while another holds the GIL (a compile on a small
    host held it 3.1 s, past the liveness window). It sent no heartbeat then, so no
    answer came: that silence is its own. The link stays up (no new socket, no second
    registration, no "lost the controller" line), ``connected`` holds, and the reports made
    right after are not set aside as made alone (``offline``). Before: the socket was
    dropped and the run registered again, warned, and its next report went out offline."""
    run = Run()
    with caplog.at_level(logging.DEBUG, logger="trimtab.client"), \
            _attach(run, fake_controller.endpoint) as guard:
        fake_controller.wait_for(lambda c: guard.connected and c.of_type(wire.Report),
                                 while_waiting=lambda: run.step(guard))
        links, registered = guard._transport.connects, len(fake_controller.of_type(wire.Register))
        seen = len(fake_controller.messages)
        held = _hold_the_gil(0.6)
        connected = guard.connected
        for _ in range(5):
            run.step(guard)  # a report, made right after the stall
        fake_controller.wait_for(lambda c: any(isinstance(m, wire.Report)
                                               for m in c.messages[seen:]))
        time.sleep(0.3)  # the transport's turns after the stall
        assert guard.connected
    assert held > 3 * 3 * 0.05  # three liveness windows (3 beats of 0.05 s)
    assert connected
    assert guard._transport.connects == links
    assert len(fake_controller.of_type(wire.Register)) == registered
    assert "lost the controller" not in caplog.text
    after = [m for m in fake_controller.messages[seen:] if isinstance(m, wire.Report)]
    assert after and not any(r.offline for r in after)


def test_a_controller_that_fell_silent_during_a_stall_is_still_found(fake_controller,
                                                                     caplog) -> None:
    """The stall is taken off the silence, not the silence after it: a controller that
    stopped answering while this process stalled is found a liveness window later."""
    run = Run()
    with caplog.at_level(logging.DEBUG, logger="trimtab.client"), \
            _attach(run, fake_controller.endpoint) as guard:
        fake_controller.wait_for(lambda c: guard.connected, while_waiting=lambda: run.step(guard))
        links = guard._transport.connects
        fake_controller.answer_heartbeats = False
        _hold_the_gil(0.6)
        fake_controller.wait_for(lambda c: guard._transport.connects > links, timeout_s=5.0,
                                 while_waiting=lambda: run.step(guard))
        assert not guard.connected
    assert "lost the controller" in caplog.text


def test_the_registration_says_how_far_the_groups_lrs_spread(make_controller) -> None:
    """``lr_spread``: the highest param group lr over group 0's (this Run's biases run at
    twice its weights' lr), what an absolute lr relates to. A run whose group 0 has the
    highest lr leaves the field out of the frame (a field added within protocol v2: a
    controller from before it still takes the registration)."""
    import json

    for factory, said in ((None, 2.0),
                          (lambda groups: torch.optim.SGD(groups[0]["params"], lr=0.05), None)):
        controller = make_controller()
        run = Run(factory)
        with _attach(run, controller.endpoint):
            controller.wait_for(lambda c: bool(c.of_type(wire.Register)))
        register = controller.of_type(wire.Register)[0]
        assert register.lr_spread == said
        assert ("lr_spread" in json.loads(wire.encode(register))) == (said is not None)


def test_a_validation_after_close_never_waits_on_the_network(dead_endpoint, caplog) -> None:
    """With no controller to answer, report_validation() after close returns at once; the
    link of its own gives up after its bounded wait and says so; a newer result handed over
    meanwhile replaces the one waiting (at most one thread, one message in hand)."""
    caplog.set_level(logging.WARNING, logger="trimtab.client")
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, opt, job="late-dead", endpoint=dead_endpoint, heartbeat_s=0.05) as guard:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss)
    transport = guard._transport
    t0 = time.perf_counter()
    guard.report_validation(0.5)
    while transport._late is not None:  # the thread has it in hand
        time.sleep(0.001)
    for value in (0.4, 0.3):
        guard.report_validation(value)
    assert time.perf_counter() - t0 < 0.5  # handed to a thread: nothing waited here
    deadline = time.monotonic() + 10
    while sum(transport.late.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    # The first went out at once; 0.4 was replaced by 0.3 while it waited: two sends.
    assert transport.late == {"unanswered": 2}
    assert transport._late is None and transport._late_thread is None
    said = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert len(said) == 2 and "after the run ended; it may be lost" in said[0]


def test_a_reregistration_asked_while_the_registration_is_sent_is_not_lost(
        fake_controller) -> None:
    """A resume's ``load_state_dict`` asks for a registration again right after the link
    came up, while the transport thread was still sending the first: that ask must be
    answered by a second registration (a CI run lost it, and the controller never heard
    of the resume)."""
    run = Run()
    guard = attach(run.model, run.opt, job="rereg", endpoint=fake_controller.endpoint,
                   heartbeat_s=0.05)
    transport = guard._transport
    make = transport._register
    asked = []

    def made_then_asked_again():
        message = make()
        if not asked:  # the training thread's call landing between make and send
            asked.append(True)
            transport.reregister()
        return message

    transport._register = made_then_asked_again
    try:
        fake_controller.wait_for(lambda c: len(c.of_type(wire.Register)) >= 2, timeout_s=5.0)
        assert asked == [True]
    finally:
        guard.close()
