"""Live schedules: the client evaluates the controller's schedule before every optimizer step.

Client alone: values, clamping to the governor's bounds, param groups, momentum, bad
schedules refused on the wire and dropped at run time. With a real ``trimtab serve``: a
cosine and a OneCycle schedule sent in reply to the registration follow torch's
``CosineAnnealingLR`` / ``OneCycleLR`` at every optimizer step, from the first, with
reports every 10 steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim import lr_scheduler

from trimtab.client import attach
from trimtab.client._knobs import Actuator
from trimtab.client._live_schedule import LiveSchedules
from trimtab.protocol import schedules, wire

from ..integration.support import Regression, start_serve, wait_for

TOL = 1e-6


def _cosine(lr: float = 0.1, t_max: int = 100, **extra) -> wire.LiveSchedule:
    piece = wire.SchedulePiece(name="cosine", params={"lr": lr, "t_max": t_max})
    return wire.LiveSchedule(knob="lr", pieces=[piece], **extra)


def _sgd(groups=None, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.SGD:
    if groups is None:
        groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def test_the_lr_follows_the_schedule_step_by_step():
    live = LiveSchedules()
    live.replace([_cosine()])
    torch_opt = _sgd()
    ref = lr_scheduler.CosineAnnealingLR(torch_opt, T_max=100)
    for step in range(150):
        assert live.values(step)["lr"] == pytest.approx(
            torch_opt.param_groups[0]["lr"], rel=TOL, abs=1e-12
        )
        torch_opt.step()
        ref.step()
    assert live.values(149)["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 1.49)) / 2)


def test_the_exponential_sweep_follows_torchs_exponential_lr_and_stops_at_the_bound():
    # The LR range test's sweep: 1e-4 rising 10x every 50 steps, capped at the bound 0.05.
    piece = wire.SchedulePiece(name="exponential", params={"lr": 1e-4, "gamma": 10 ** 0.02},
                               origin=20)
    live = LiveSchedules()
    live.replace([wire.LiveSchedule(knob="lr", pieces=[piece], hi=0.05)])
    torch_opt = _sgd(lr=1e-4)
    ref = lr_scheduler.ExponentialLR(torch_opt, gamma=10 ** 0.02)
    for step in range(200):
        expected = 1e-4 if step < 20 else min(torch_opt.param_groups[0]["lr"], 0.05)
        assert live.values(step)["lr"] == pytest.approx(expected, rel=TOL), step
        if step >= 20:
            torch_opt.step()
            ref.step()
    assert live.values(199)["lr"] == 0.05


def test_values_are_clamped_to_the_bounds_sent_with_the_schedule():
    live = LiveSchedules()
    live.replace([_cosine(scale=2.0, lo=0.01, hi=0.15)])
    assert live.values(0)["lr"] == 0.15  # 2 x 0.1 = 0.2, above hi
    assert live.values(50)["lr"] == pytest.approx(0.1)  # 2 x 0.05 = 0.1, inside
    assert live.values(100)["lr"] == 0.01  # 2 x 0 = 0, below lo


def test_the_lr_schedule_multiplies_the_users_lr_in_every_group_and_sets_momentum():
    """The lr schedule's value is a multiplier on the user's own lr (the knob model): with
    groups at 1.0 and 0.1, the step at OneCycle's peak runs at 0.1 and 0.01, and momentum
    0.85 in both; between steps the groups hold the user's values."""
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))]},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1},
    ]
    opt = _sgd(groups, lr=1.0)
    params = {"max_lr": 0.1, "total_steps": 100}
    piece = wire.SchedulePiece(name="one_cycle", params=params)
    act = Actuator(opt, clip=None)
    act.live.replace(
        [
            wire.LiveSchedule(knob="lr", pieces=[piece]),
            wire.LiveSchedule(knob="momentum", pieces=[piece]),
        ]
    )
    act.engage(29)  # the peak: lr x0.1, momentum 0.85
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    assert [g["momentum"] for g in opt.param_groups] == [pytest.approx(0.85)] * 2
    act.release()
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.1]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert act.scale().lr == pytest.approx(0.1) and act.used().momentum == pytest.approx(0.85)


def test_none_keeps_the_schedules_and_an_empty_list_stops_them():
    live = LiveSchedules()
    live.replace([_cosine()])
    live.replace(None)
    assert live.values(50)["lr"] == pytest.approx(0.05)
    live.replace([])
    assert live.values(0) == {}  # nothing scheduled: the commanded multiplier holds


def test_a_schedule_that_fails_at_run_time_is_dropped_and_training_goes_on(caplog):
    opt = _sgd()
    # Valid on the wire, but its momentum reaches 1 with a correction of 1.1 (a bug).
    piece = wire.SchedulePiece(name="one_cycle", params={"max_lr": 0.1, "total_steps": 10})
    act = Actuator(opt, clip=None)
    act.live.replace([wire.LiveSchedule(knob="momentum", pieces=[piece], scale=1.1),
                      _cosine()])
    act.engage(0)
    assert "live momentum schedule dropped at step 0" in caplog.text
    assert [s.knob for s in act.live.schedules] == ["lr"]
    assert opt.param_groups[0]["momentum"] == 0.9  # the user's, untouched
    act.release()


def test_a_stopped_schedule_leaves_its_last_value_in_force_unless_the_command_sets_one():
    """The controller counts on the value the run is at when it stops a live schedule; a
    rollback's restore drops it (it belongs to the path rolled back from)."""
    opt = _sgd(lr=0.1)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [_cosine(lr=1.0, t_max=100)])
    for step in range(50):
        act.engage(step)
        act.release()
    assert act.used().lr == pytest.approx(0.1 * schedules.cosine(49, 1.0, 100))
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [])  # stopped, no value with it
    act.engage(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedules.cosine(49, 1.0, 100))
    act.release()
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [_cosine(lr=1.0, t_max=100)])
    act.engage(60)
    act.release()
    act.command(wire.ScaleTargets(lr=0.3), wire.Knobs(), None, [])  # stopped with a value
    act.engage(61)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    act.release()
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [_cosine(lr=1.0, t_max=100)])
    act.engage(70)
    act.release()
    act.load_state_dict({"lr_scale": 0.7})  # a rollback to a checkpoint at x0.7
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [])
    act.engage(20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.07)
    act.release()


def test_a_rising_schedule_alone_is_dropped_for_the_lr_before_it_and_not_taken_up_again(
        caplog):
    """A controller trial: killed mid-sweep (a range test for a run too hot, from x0.0025 up
    to x10), the client held the sweep at its command's x0.0025, 1/400 of the run's own lr,
    for the remaining 1,770 steps; a controller back on the journal made it jump to the
    sweep's x10. Alone, a live lr schedule rising past its command's value is dropped and
    the run goes back to the multiplier in force before that command; a controller that
    answers again decides anew. A schedule falling below its command's value (a cosine) is
    followed alone as before."""
    opt = _sgd(lr=0.1)
    act = Actuator(opt, clip=None)
    act.command(wire.ScaleTargets(lr=0.8), wire.Knobs(), None, None)  # in force: x0.8
    sweep = wire.SchedulePiece(name="exponential",
                               params={"lr": 0.0025, "gamma": 4000 ** (1 / 200)}, origin=10)
    act.command(wire.ScaleTargets(lr=0.0025), wire.Knobs(), None,
                [wire.LiveSchedule(knob="lr", pieces=[sweep], hi=10.0)])
    for step in range(10, 60):  # the sweep rises, a controller watching
        act.engage(step)
        act.release()
    assert act.used().lr > 0.1 * 0.0025 * 5
    act.alone = True
    with caplog.at_level("WARNING", logger="trimtab.client"):
        act.engage(60)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.08)  # x0.8, the lr before the sweep
    act.release()
    assert not act.live.schedules and act.lr_scale == pytest.approx(0.8)
    assert "is dropped; the lr multiplier goes back to x0.8" in caplog.text
    act.alone = False  # a controller answers: nothing is taken up again
    for step in range(61, 300):
        act.engage(step)
        act.release()
    assert act.used().lr == pytest.approx(0.08)
    # A cosine below its command's value goes on alone.
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [_cosine(lr=0.8, t_max=100)])
    act.alone = True
    act.engage(50)
    assert act.live.schedules
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedules.cosine(50, 0.8, 100))
    act.release()


def test_a_rising_schedule_is_held_at_its_leash_past_the_step_the_controller_has_seen():
    """A controller SIGSTOPped mid-sweep: the client, still within its liveness window,
    followed the sweep on, unwatched, from x2.5 to x764, and the run's weights went
    non-finite before the sweep was dropped. A live lr schedule now runs at most ``leash``
    steps past the newest step the controller says it has seen: held at its value there,
    it goes on once the controller has caught up. A falling schedule is not held."""
    opt = _sgd(lr=0.1)
    act = Actuator(opt, clip=None)
    sweep = wire.SchedulePiece(name="exponential", params={"lr": 0.01, "gamma": 1.05})
    schedule = wire.LiveSchedule(knob="lr", pieces=[sweep], hi=1000.0)
    act.command(wire.ScaleTargets(lr=0.01), wire.Knobs(), None, [schedule])
    act.leash, act.seen = 30, 100
    ran = []
    for step in range(100, 200):
        act.engage(step)
        ran.append(opt.param_groups[0]["lr"])
        act.release()
    expected = [0.1 * schedule.value(min(step, 130)) for step in range(100, 200)]
    assert ran == pytest.approx(expected, rel=TOL)
    assert act.held_steps == 69 and act.used().lr == pytest.approx(0.1 * schedule.value(130))
    act.seen = 190  # the controller caught up: the sweep goes on where it is due
    act.engage(200)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedule.value(200), rel=TOL)
    act.release()
    assert act.held_steps == 69
    # Not told yet what was seen (a controller from before the leash): not held.
    act.seen = None
    act.engage(400)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedule.value(400), rel=TOL)
    act.release()
    # A cosine falling far past the step seen runs on: its value there is the higher.
    act.command(wire.ScaleTargets(), wire.Knobs(), None, [_cosine(lr=1.0, t_max=100)])
    act.seen = 0
    act.engage(80)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedules.cosine(80, 1.0, 100))
    act.release()
    assert act.held_steps == 69
    # Held at its command's own value (the step seen is a leash short of where the sweep
    # begins) and alone: still a rising schedule nobody watches, dropped as any.
    late = wire.SchedulePiece(name="exponential", params={"lr": 0.01, "gamma": 1.05},
                              origin=200)
    before = act.live.last.get("lr", act.lr_scale)  # in force before the sweep's command
    act.command(wire.ScaleTargets(lr=0.01), wire.Knobs(), None,
                [wire.LiveSchedule(knob="lr", pieces=[late], hi=1000.0)])
    act.seen, act.alone = 100, True
    act.engage(250)
    assert not act.live.schedules and act.lr_scale == pytest.approx(before)
    act.release()


def test_a_sweep_the_controller_stops_answering_is_held_until_it_answers_again(
        make_controller):
    """Through the guard and a real socket: a controller that stops answering (stalled, or
    stopped, inside the client's liveness window) holds the sweep three report windows past
    the last step it said it had seen; once it answers, the sweep goes on."""
    ctl = make_controller()
    task = Regression(seed=1)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.01)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    sweep = wire.SchedulePiece(name="exponential", params={"lr": 0.1, "gamma": 1.02})
    schedule = wire.LiveSchedule(knob="lr", pieces=[sweep], hi=10.0)
    # Heartbeats far apart: the client stays connected while the controller is silent.
    with attach(task.model, opt, job="leash", endpoint=ctl.endpoint, report_every=5,
                checkpoint_every=0, heartbeat_s=5.0) as guard:

        def step() -> None:
            loss = task.loss(*task.batch())
            opt.zero_grad()
            loss.backward()
            guard.step(loss)

        ctl.wait_for(lambda c: c.of_type(wire.Register))
        ctl.send(wire.Command(job="leash", seq=1, schedules=[schedule]))
        assert wait_for(lambda: guard._transport._command is not None, 10)
        for _ in range(20):
            step()
        ctl.wait_for(lambda c: c.of_type(wire.Ack))
        # Every report answered: the sweep follows its schedule.
        assert wait_for(lambda: guard._transport.controller_step == 20, 10)
        ctl.answer_heartbeats = False  # silent from here
        for _ in range(60):
            step()
        assert guard.connected and guard._transport.controller_step == 20
        assert used[20:35] == pytest.approx([0.01 * schedule.value(t) for t in range(20, 35)])
        assert used[35:] == pytest.approx([0.01 * schedule.value(35)] * 45)  # 20 + 3 x 5
        ctl.answer_heartbeats = True  # answers again, from its next report on
        step()
        assert wait_for(lambda: guard._transport.controller_step >= 80, 10)
        for _ in range(10):
            step()
        assert used[-1] == pytest.approx(0.01 * schedule.value(90), rel=TOL)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"lr": 0.1, "t_max": 0}, r"cosine: t_max=0 is invalid; allowed: an int >= 1"),
        ({"lr": 0.1}, r"cosine: missing parameters \['t_max'\]"),
        (
            {"lr": 0.1, "t_max": 5, "T_max": 5},
            r"cosine: unknown parameters \['T_max'\]; allowed: "
            r"lr, t_max, eta_min",
        ),
        ({"lr": -1.0, "t_max": 5}, r"cosine: lr=-1.0 is invalid; allowed: a finite number >= 0"),
    ],
)
def test_a_bad_schedule_is_refused_at_the_edge_naming_the_field(params, match):
    frame = wire.encode(wire.Command(job="j", seq=1)).replace(
        b'"schedules":null',
        b'"schedules":[{"knob":"lr","pieces":[{"name":"cosine","params":'
        + json.dumps(params).encode()
        + b"}]}]",
    )
    with pytest.raises(wire.WireError, match=match):
        wire.decode(frame)


def test_an_unknown_schedule_and_a_momentum_schedule_without_momentum_are_refused():
    with pytest.raises(ValueError, match=r"schedule 'cyclic' is unknown; allowed: constant"):
        wire.SchedulePiece(name="cyclic", params={})
    with pytest.raises(ValueError, match=r"schedules \['cosine'\] give no momentum"):
        wire.LiveSchedule(knob="momentum", pieces=[_cosine().pieces[0]])


def test_the_guard_applies_a_commanded_schedule_every_step_and_acks_its_values(fake_controller):
    task = Regression(seed=3)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1)
    used: list[float] = []  # what each optimizer step ran with
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    with attach(
        task.model,
        opt,
        job="live-guard",
        endpoint=fake_controller.endpoint,
        report_every=10,
        checkpoint_every=0,
        heartbeat_s=0.2,
    ) as guard:
        fake_controller.wait_for(lambda c: c.of_type(wire.Register))
        # A multiplier schedule: 2 x the user's 0.1 down a cosine, floored at x0.01.
        fake_controller.send(
            wire.Command(job="live-guard", seq=1, schedules=[_cosine(lr=2.0, t_max=40, lo=0.01)])
        )
        # Wait for the command to reach the client (the test's only look inside the guard).
        assert wait_for(lambda: guard._transport._command is not None, 10)
        for _ in range(60):
            x, y = task.batch()
            loss = task.loss(x, y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
            assert opt.param_groups[0]["lr"] == 0.1  # the user's own between steps
        fake_controller.wait_for(lambda c: c.of_type(wire.Ack))
    expected = [0.1 * max(schedules.cosine(t, 2.0, 40), 0.01) for t in range(60)]
    assert used == pytest.approx(expected, rel=TOL)
    (ack,) = fake_controller.of_type(wire.Ack)
    assert ack.step == 0 and ack.knobs.lr == pytest.approx(0.2) and ack.base.lr == 0.1
    assert ack.scale.lr == pytest.approx(2.0)


# -- a real controller ------------------------------------------------------------------

#: Every governor limit opened (TOML has no null: wide values instead).
OPEN = """
[governor.{knob}]
max = 1e6
min_rel = 0.0
max_rel = 1e6
allow_zero = true
max_step_ratio = 1e9
slew_ratio = 1e9
cooldown_steps = 0
deadband = 0.0
reversal_window_steps = 0
"""


CASES = [
    (
        "cosine",
        "{ t_max = 120, eta_min = 0.001 }",
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=120, eta_min=0.001),
        False,
    ),
    (
        "one_cycle",
        "{ total_steps = 150 }",
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=150),
        True,
    ),
]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """One controller for both cases: each policy runs for its own job."""
    entries = "".join(
        f'[[policies]]\nname = "{p}"\nconfig = {c}\njobs = ["live-{p}"]\n\n' for p, c, *_ in CASES
    )
    config = (
        entries
        + OPEN.format(knob="lr")
        + OPEN.format(knob="momentum").replace("max = 1e6", "min = 0.0\nmax = 0.999")
    )
    srv = start_serve(tmp_path_factory.mktemp("serve"), None, None, config)
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=10)


def _torch_run(make, steps: int) -> list[tuple[float, float]]:
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        x, y = task.batch()
        loss = task.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return out


def _trimtab_run(srv, job: str, steps: int) -> tuple[list[tuple[float, float]], list]:
    task = Regression(seed=5)
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9)
    out = []
    # What each step used: the guard puts the knobs in around the optimizer step.
    opt.register_step_pre_hook(lambda o, a, k: out.append(
        (o.param_groups[0]["lr"], o.param_groups[0]["momentum"])))
    with attach(
        task.model,
        opt,
        job=job,
        endpoint=srv.endpoint,
        report_every=10,
        checkpoint_every=0,
        heartbeat_s=0.2,
    ) as guard:
        # The schedule comes in reply to the registration; start once it is here.
        assert wait_for(lambda: guard._transport._command is not None, 20)
        for _ in range(steps):
            x, y = task.batch()
            loss = task.loss(x, y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
    journal = srv.journal()
    return out, wait_for(lambda: journal.events(job, "command"))


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("policy", "config", "make", "momentum"), CASES, ids=[c[0] for c in CASES])
def test_a_live_schedule_matches_torch_at_every_step_through_trimtab_serve(
    serve, policy, config, make, momentum
):
    steps = 150
    ours, commands = _trimtab_run(serve, f"live-{policy}", steps)
    theirs = _torch_run(make, steps)
    lr_err = max(abs(a[0] - b[0]) / b[0] for a, b in zip(ours, theirs, strict=True))
    m_err = max(abs(a[1] - b[1]) / b[1] for a, b in zip(ours, theirs, strict=True))
    print(
        f"\n{policy} live through trimtab serve, report_every=10: max relative error over "
        f"{steps} steps: lr {lr_err:.3g}, momentum {m_err:.3g}; {len(commands)} command(s)"
    )
    assert lr_err <= TOL and m_err <= TOL
    # The schedule moved within every report window: it was not piecewise constant.
    assert all(ours[i][0] != ours[i + 1][0] for i in range(0, steps - 1, 10))
    # One command, the one that answered the registration, carried the whole schedule.
    assert len(commands) == 1 and commands[0].step == 0
    if momentum:
        assert len({m for _, m in ours}) > 10
