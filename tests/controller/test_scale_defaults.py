"""Scale-derived governor defaults: lr bounds by family and batch, clip bounds from the job's
own gradient norms, lr x wd coupling; explicit configuration always wins."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest
import torch
from prometheus_client import CollectorRegistry

from tests._decide import decided
from trimtab.controller.advance import advance
from trimtab.controller.config import ConfigError, ControllerConfig, PolicySpec, load_config
from trimtab.controller.engine import Engine
from trimtab.controller.governor import Governor, KnobMemory
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.controller.limits import GovernorConfig
from trimtab.controller.policy import Policy, Proposal
from trimtab.controller.scale import (
    ScaleContext,
    derive_limits,
    explicit_fields,
)
from trimtab.controller.state import JobState
from trimtab.protocol import wire

HERE = "tests.controller.test_scale_defaults"


def facts(optimizer: str = "AdamW", batch_size: int | None = 256, world_size: int = 1):
    return wire.ScaleFacts(
        param_count=1000,
        group_sizes=[1000],
        optimizer=optimizer,
        dtype="float32",
        device="cpu",
        batch_size=batch_size,
        world_size=world_size,
    )


def ctx(*args, **kw) -> ScaleContext:
    return ScaleContext.from_facts(facts(*args, **kw))


def job(optimizer: str = "AdamW", **knobs) -> JobState:
    return JobState.register(
        wire.Register(
            job="s", run_id="r", report_every=10, facts=facts(optimizer), knobs=wire.Knobs(**knobs)
        )
    )


def in_force(st: JobState) -> dict:
    """``knobs`` (effective), ``base`` and ``scale`` a client reports with ``st``'s controlled
    values in force on the user's own values (those it registered with)."""
    base, c = st.registered, st.knobs
    return {
        "knobs": wire.Knobs(
            lr=None if base.lr is None else base.lr * c.lr,
            momentum=c.momentum,
            weight_decay=None if base.weight_decay is None else base.weight_decay * c.weight_decay,
            clip=c.clip,
        ),
        "base": base.model_copy(update={"clip": None}),
        "scale": wire.Scale(
            lr=1.0 if c.lr is None else c.lr,
            weight_decay=1.0 if c.weight_decay is None else c.weight_decay,
        ),
    }


def report(st: JobState, **fields) -> wire.Report:
    """The job's next report, with ``st``'s controlled values in force (and the commands
    applied that put them there, as a client says)."""
    i = st.reports_seen + 1
    return wire.Report(job="s", seq=i, step=10 * i, window=10, loss_mean=1.0, **in_force(st),
                       **{"applied_seq": st.applied_seq, **fields})


def feed(st: JobState, n: int = 1, **fields) -> None:
    for _ in range(n):
        st.observe(report(st, **fields))


def apply(st: JobState, commands: dict[str, float]) -> None:
    """The client applied ``commands`` (controlled values, as its ack would say)."""
    st.on_applied(st.applied_seq + 1, st.knobs.model_copy(update=commands))


class Ask(Policy):
    """Asks for one fixed proposal at every decision."""

    name: ClassVar[str] = "ask"

    def __init__(self, proposal: Proposal) -> None:
        super().__init__()
        self.proposal = proposal

    def propose(self, view):
        return [self.proposal]


# -- lr bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "batch", "world", "expected"),
    [
        ("SGD", 256, 1, (1e-3, 1.0)),  # 0.1 x [1e-2, 10] at the reference batch
        ("SGD", 32, 1, (1.25e-4, 0.125)),  # linear: x 32/256
        ("SGD", 64, 16, (4e-3, 4.0)),  # global batch 1024: x 4
        ("AdamW", 256, 1, (1e-5, 1e-2)),  # 1e-3 x [1e-2, 10]
        ("AdamW", 64, 1, (5e-6, 5e-3)),  # square root: x sqrt(64/256)
        ("Adam", 1024, 1, (2e-5, 2e-2)),  # x sqrt(4)
        ("AdamW", None, 1, (1e-5, 1e-2)),  # batch unknown: unscaled
    ],
)
def test_the_sane_lr_range_follows_family_and_batch_rule(optimizer, batch, world, expected):
    lo, hi = ctx(optimizer, batch, world).lr_range()
    assert (lo, hi) == (pytest.approx(expected[0]), pytest.approx(expected[1]))


def test_no_range_for_an_optimizer_of_neither_family():
    assert ctx("LBFGS").lr_range() is None
    d = derive_limits(ctx("LBFGS"), GovernorConfig(), set(), wire.Knobs(lr=1.0))
    assert d.config == GovernorConfig() and d.notes == ()


def test_derived_lr_bounds_join_the_relative_band_and_the_family_range():
    # A sensible start at 1e-3: the multiplier band [1e-3, 10] and the range [1e-5, 1e-2]
    # over the registered lr, [1e-2, 10] -> [1e-3, 10]; the effective lr capped at 1e-2.
    d = derive_limits(ctx("AdamW"), GovernorConfig(), set(), wire.Knobs(lr=1e-3))
    assert (d.config.lr.min_rel, d.config.lr.max_rel) == (pytest.approx(1e-3), pytest.approx(10))
    assert (d.config.lr.min, d.config.lr.max) == (None, pytest.approx(1e-2))
    # Everything else stays as configured.
    assert d.config.lr.max_step_ratio == 2.0 and d.config.clip == GovernorConfig().clip
    (note,) = d.notes
    assert note == (
        "lr multiplier bounds [0.001, 10], effective lr capped at 0.01: adam family range "
        "[1e-05, 0.01] (sqrt rule, global batch 256 vs 256) joined with the configured band "
        "around the registered lr 0.001"
    )


def test_the_cap_is_the_band_over_the_registered_lr_where_that_is_above_the_range():
    d = derive_limits(ctx("AdamW"), GovernorConfig(), set(), wire.Knobs(lr=0.1))
    assert d.config.lr.max == pytest.approx(1.0)  # 10 x 0.1, above the range's 1e-2


@pytest.mark.parametrize(
    ("lr", "old_hi", "new_hi"),
    [
        (1e-5, 1e-4, 1e-2),  # 100x too low: the old band stopped it at 10x
        (1e-1, 1.0, 1.0),  # 100x too high: already free to come down, and still is
    ],
)
def test_a_start_100x_off_can_be_moved_into_the_sane_range(lr, old_hi, new_hi):
    # Bounds are on the multiplier (1.0: the registered lr); the effective lr is the
    # multiplier times the user's lr, capped at the derived lr.max.
    d = derive_limits(ctx("AdamW"), GovernorConfig(), set(), wire.Knobs(lr=lr))
    new, old = Governor(d.config), Governor()
    assert old.bounds("lr", 1.0) == (pytest.approx(1e-3), pytest.approx(10.0))
    assert 10.0 * lr == pytest.approx(old_hi)
    lo, hi = new.bounds("lr", 1.0)
    assert min(hi * lr, d.config.lr.max) == pytest.approx(new_hi)
    # The sane range and the start (multiplier 1) are both inside.
    assert lo * lr <= 1e-5 * (1 + 1e-9) and lo <= 1.0 <= hi


def test_a_too_low_start_is_raised_past_10x_by_a_policy_only_with_derived_bounds():
    def run(governor: Governor) -> tuple[float, float]:
        st = job(lr=1e-5)
        eng = Engine([Ask(Proposal("lr", factor=2.0, reason="too slow"))], governor)
        for _ in range(700):  # 7000 steps; the slew limit allows 4x per 1000
            out = advance(st, report(st), eng)
            if out.command is not None:  # the client applies it before its next report
                apply(st, out.decision.commands)
        feed(st)
        return st.knobs.lr, st.effective.lr

    derived = derive_limits(ctx("AdamW"), GovernorConfig(), set(), wire.Knobs(lr=1e-5))
    # The relative band's 10x: multiplier 10, lr 1e-4.
    assert run(Governor()) == (pytest.approx(10.0), pytest.approx(1e-4))
    # The family range's top: multiplier 1000, lr 1e-2 (the derived cap, lr.max).
    assert run(Governor(derived.config)) == (pytest.approx(1000.0), pytest.approx(1e-2))
    assert derived.config.lr.max == pytest.approx(1e-2)


# -- explicit configuration wins ------------------------------------------------------------


def test_explicit_fields_are_those_of_the_knob_tables_given():
    cfg = ControllerConfig.model_validate({"governor": {"lr": {"max_rel": 5.0}}}).governor
    assert {"lr.max_rel", "lr.min_rel", "lr.min"} <= explicit_fields(cfg)
    assert not any(f.startswith("clip.") for f in explicit_fields(cfg))
    assert explicit_fields(ControllerConfig().governor) == set()


@pytest.mark.parametrize("source", ["toml", "env"])
def test_lr_limits_set_in_the_config_are_not_derived(tmp_path, source):
    if source == "toml":
        path = tmp_path / "t.toml"
        path.write_text("[governor.lr]\nmin_rel = 0.5\nmax_rel = 2.0\n")
        cfg = load_config(path, env={}).governor
    else:
        cfg = load_config(env={"TRIMTAB_GOVERNOR__LR__MAX_REL": "2.0"}).governor
    d = derive_limits(ctx("SGD"), cfg, explicit_fields(cfg), wire.Knobs(lr=0.1))
    assert d.config.lr == cfg.lr and d.notes == ()
    assert Governor(d.config).bounds("lr", 1.0)[1] == pytest.approx(2.0)  # the multiplier's
    assert d.config.lr.max is None  # and no cap derived


def test_a_clip_table_leaves_the_lr_derivation_on():
    cfg = GovernorConfig(clip={"max": 5.0})
    d = derive_limits(ctx("SGD"), cfg, explicit_fields(cfg), wire.Knobs(lr=0.1))
    assert (d.config.lr.min_rel, d.config.lr.max_rel) == (pytest.approx(1e-3), pytest.approx(10))
    assert d.config.lr.max == pytest.approx(1.0) and len(d.notes) == 1
    assert d.config.clip == cfg.clip


def test_bad_values_name_the_field_value_and_rule():
    with pytest.raises(
        ConfigError,
        match=r"governor.wd_coupling = 'keep': Input should be "
        r"'follow' or 'keep_product'",
    ):
        load_config(overrides={"governor": {"wd_coupling": "keep"}}, env={})
    with pytest.raises(
        ConfigError,
        match=r"min_rel_grad_norm=3.0 is above "
        r"max_rel_grad_norm=2.0",
    ):
        load_config(
            overrides={"governor": {"clip": {"min_rel_grad_norm": 3.0, "max_rel_grad_norm": 2.0}}},
            env={},
        )


# -- the controller derives per job -----------------------------------------------------------


def register(job: str, optimizer: str, lr: float, batch: int) -> bytes:
    return wire.encode(
        wire.Register(
            job=job,
            run_id="r",
            report_every=10,
            knobs=wire.Knobs(lr=lr),
            facts=wire.ScaleFacts(
                param_count=100,
                group_sizes=[100],
                optimizer=optimizer,
                dtype="float32",
                device="cpu",
                batch_size=batch,
            ),
        )
    )


def test_each_job_gets_its_own_derived_governor_and_a_log_line(tmp_path, caplog):
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"), metrics_port=0, policies=[PolicySpec(name="plateau")]
    )
    ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="trimtab.controller"):
        ctl.handle(b"a", register("sgd-job", "SGD", 0.1, 32))
        ctl.handle(b"b", register("adam-job", "AdamW", 1e-3, 1024))
    sgd = ctl.engine_for("sgd-job").governor
    adam = ctl.engine_for("adam-job").governor
    # Multiplier bounds (x the registered lr: [1e-4, 1] and [1e-6, 2e-2]) and the lr cap.
    assert sgd.bounds("lr", 1.0) == (pytest.approx(1e-3), pytest.approx(10.0))
    assert sgd.limits("lr").max == pytest.approx(1.0)
    assert adam.bounds("lr", 1.0) == (pytest.approx(1e-3), pytest.approx(20.0))
    assert adam.limits("lr").max == pytest.approx(2e-2)
    assert ctl.engine_for("sgd-job").policies == ctl.engine.policies  # same policies
    assert ctl.engine.governor.bounds("lr", 1.0) == (pytest.approx(1e-3), pytest.approx(10.0))
    assert ctl.engine.governor.limits("lr").max is None
    lines = [r.getMessage() for r in caplog.records if "derived from its scale" in r.getMessage()]
    assert lines == [
        "job sgd-job: governor limit derived from its scale: lr multiplier bounds [0.001, 10], "
        "effective lr capped at 1: sgd family range [0.000125, 0.125] (linear rule, global "
        "batch 32 vs 256) joined with the configured band around the registered lr 0.1",
        "job adam-job: governor limit derived from its scale: lr multiplier bounds [0.001, 20], "
        "effective lr capped at 0.02: adam family range [2e-05, 0.02] (sqrt rule, global batch "
        "1024 vs 256) joined with the configured band around the registered lr 0.001",
    ]
    ctl.handle(b"a", wire.encode(wire.Bye(job="sgd-job", step=0, reason="done")))
    # Its governor and engine went with its record.
    assert "sgd-job" not in ctl._jobs and "adam-job" in ctl._jobs
    assert ctl._jobs["adam-job"].governor is not None
    ctl.close()


class Double(Policy):
    """Asks for the lr x2 at every decision."""

    name: ClassVar[str] = "double"

    def propose(self, view):
        return [Proposal("lr", factor=2.0, reason="up")]


def test_a_command_carries_the_jobs_derived_cap_on_the_effective_lr(tmp_path):
    cfg = ControllerConfig(
        journal=str(tmp_path / "j.db"),
        metrics_port=0,
        allow_plugins=[f"{HERE}:*"],
        policies=[PolicySpec(name=f"{HERE}:Double")],
    )
    ctl = Controller(cfg, Journal(cfg.journal), registry=CollectorRegistry())
    ctl.handle(b"a", register("sgd-job", "SGD", 0.1, 32))
    report = wire.Report(
        job="sgd-job", seq=1, step=10, window=10, loss_mean=1.0, knobs=wire.Knobs(lr=0.1),
        base=wire.Knobs(lr=0.1),
    )
    (cmd,) = [wire.decode(f) for _, f in ctl.handle(b"a", wire.encode(report))]
    assert cmd.scale.lr == pytest.approx(2.0) and cmd.knobs.lr is None
    assert cmd.lr_max == pytest.approx(1.0)  # the job's own, derived from its scale
    ctl.close()


# -- clip bounds from the job's own gradient norms ----------------------------------------------


@pytest.mark.parametrize("norm", [1e-3, 1.0, 1e3])
def test_clip_targets_are_bounded_relative_to_the_jobs_gradient_norm(norm):
    st = job(lr=1e-3, clip=norm)
    eng = Engine(
        [Ask(Proposal("clip", value=norm * 1e4, reason="far too high"))],
        Governor(
            GovernorConfig(
                clip={"min": 1e-9, "max": 1e9, "min_rel_grad_norm": 0.1, "max_rel_grad_norm": 10.0}
            )
        ),
    )
    feed(st, 9, grad_norm_mean=norm)  # one short of the z-score warm-up (10)
    assert st.grad_norm_scale() is None
    first = decided(eng, st)
    assert first.commands["clip"] == pytest.approx(norm * 1e4)  # no scale yet: absolute only
    st2 = job(lr=1e-3, clip=norm)
    feed(st2, 10, grad_norm_mean=norm)
    assert st2.grad_norm_scale() == pytest.approx(norm)
    kd = decided(eng, st2).knobs["clip"]
    assert kd.commanded == pytest.approx(10 * norm) and kd.limits[0] == "bounds"


def test_default_clip_bounds_are_relative_to_the_gradient_norm():
    g = Governor()
    assert g.grad_norm_range("clip", 0.5) == (pytest.approx(0.05), pytest.approx(5.0))
    assert g.grad_norm_range("clip", None) is None
    assert g.grad_norm_range("lr", 0.5) is None
    out = g.govern("clip", KnobMemory(), 1.0, 1.0, 0.001, 0, grad_norm=0.5)
    assert out.value == pytest.approx(0.5) and out.limits == ("bounds", "max_step_ratio")


def test_a_clip_in_force_outside_the_scaled_range_is_not_moved_without_a_proposal():
    st = job(lr=1e-3, clip=1e3)
    feed(st, 20, grad_norm_mean=1e-3)
    assert decided(Engine([], Governor()), st).commands == {}


# -- lr x wd coupling ------------------------------------------------------------------------------


def coupled(optimizer: str, coupling: str, proposals: list[Proposal]) -> dict[str, float]:
    st = job(optimizer, lr=1e-3, weight_decay=0.1)
    feed(st)
    eng = Engine(
        [Ask(p) for p in proposals][:1]
        if len(proposals) == 1
        else [_named(p, i) for i, p in enumerate(proposals)],
        Governor(GovernorConfig(wd_coupling=coupling)),
    )
    return decided(eng, st).commands


def _named(p: Proposal, i: int) -> Policy:
    policy = Ask(p)
    policy.name = f"ask{i}"  # type: ignore[misc]
    return policy


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_keep_product_holds_lr_times_wd_when_a_policy_changes_only_lr(optimizer):
    out = coupled(optimizer, "keep_product", [Proposal("lr", factor=0.5, reason="decay")])
    # Multipliers on the user's lr (1e-3) and wd (0.1): their product stays 1, so the
    # effective lr x wd stays 1e-3 x 0.1.
    assert out == {"lr": pytest.approx(0.5), "weight_decay": pytest.approx(2.0)}
    assert out["lr"] * out["weight_decay"] == pytest.approx(1.0)


def test_follow_is_the_default_and_leaves_wd_alone():
    assert GovernorConfig().wd_coupling == "follow"
    out = coupled("AdamW", "follow", [Proposal("lr", factor=0.5, reason="decay")])
    assert out == {"lr": pytest.approx(0.5)}


def test_no_coupling_where_decay_is_not_lr_times_wd_or_a_policy_set_wd():
    # Adam's L2 goes through its normalisation: lr x wd is not its decay.
    assert coupled("Adam", "keep_product", [Proposal("lr", factor=0.5, reason="d")]) == {
        "lr": pytest.approx(0.5)
    }
    out = coupled(
        "AdamW",
        "keep_product",
        [Proposal("lr", factor=0.5, reason="d"), Proposal("weight_decay", value=1.5, reason="w")],
    )
    assert out == {"lr": pytest.approx(0.5), "weight_decay": pytest.approx(1.5)}


def test_the_coupled_wd_stays_within_its_bounds():
    st = job("AdamW", lr=1e-3, weight_decay=0.1)
    feed(st)
    eng = Engine(
        [Ask(Proposal("lr", factor=0.5, reason="d"))],
        Governor(
            GovernorConfig(
                wd_coupling="keep_product",
                weight_decay={"min_rel": 0.0, "max_rel": 1.5, "allow_zero": True},
            )
        ),
    )
    kd = decided(eng, st).knobs["weight_decay"]
    # The wd multiplier would be 2.0; its bound is 1.5 (x the user's 0.1: 0.15).
    assert (kd.target, kd.commanded, kd.limits) == (pytest.approx(2.0), 1.5, ("bounds",))
    assert kd.reason == "wd_coupling=keep_product: lr x wd stays 1 as lr goes 1 -> 0.5"


# -- a real `trimtab serve`: a run started 100x too low is raised past 10x ---------------------

RAISE_CONFIG = """
[[policies]]
name = "divergence_guard"

[[policies]]
name = "update_ratio"
config = { low = 5e-3, high = 2e-2, max_lr_rel = 1000.0 }
"""
OLD_BOUNDS = """
[governor.lr]
min_rel = 1e-3
max_rel = 10.0
max_step_ratio = 2.0
slew_ratio = 4.0
slew_window_steps = 1000
cooldown_steps = 50
deadband = 0.01
reversal_window_steps = 200
reversal_min_change = 0.2
"""


def _too_low_run(tmp_path, config: str) -> tuple[float, str]:
    """AdamW at lr 1e-5 (its range at batch 64 is [5e-6, 5e-3]) for 4000 steps against a
    real ``trimtab serve``; the effective lr of the last step and the controller's log."""
    from trimtab.client import attach

    from ..integration.support import Regression, start_serve

    tmp_path.mkdir(parents=True, exist_ok=True)
    srv = start_serve(tmp_path, None, None, config)
    try:
        task = Regression(seed=0)
        opt = torch.optim.AdamW(task.model.parameters(), lr=1e-5, weight_decay=0.0)
        with attach(
            task.model,
            opt,
            job="too-low",
            endpoint=srv.endpoint,
            batch_size=64,
            report_every=10,
            checkpoint_every=0,
        ) as guard:
            for _ in range(4000):
                loss = task.loss(*task.batch(64))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                guard.step(loss)
            # Between steps the param groups hold the user's own lr (1e-5); the step used
            # it times trimtab's multiplier, capped at the derived lr.max.
            assert opt.param_groups[0]["lr"] == 1e-5
            used = guard.knobs.lr
        return used, srv.log()
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)


def test_a_real_run_started_100x_too_low_rises_past_10x_only_with_derived_bounds(
    tmp_path, one_thread
):
    derived_lr, log = _too_low_run(tmp_path / "derived", RAISE_CONFIG)
    old_lr, old_log = _too_low_run(tmp_path / "old", RAISE_CONFIG + OLD_BOUNDS)
    print(
        f"\nAdamW from lr 1e-5, 4000 steps: derived bounds -> lr {derived_lr:.3g}; "
        f"the old relative band, set explicitly -> lr {old_lr:.3g}"
    )
    assert ("job too-low: governor limit derived from its scale: lr multiplier bounds "
            "[0.001, 500], effective lr capped at 0.005") in log
    assert "lr bounds not derived from its scale (set in the configuration)" in old_log
    assert old_lr <= 1e-4 * (1 + 1e-9)  # stopped by the relative band's 10x
    assert 1e-4 < derived_lr <= 5e-3  # past it, within the family's range
