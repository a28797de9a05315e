"""ScaleContext: facts in, the global batch and the batch-size lr rule out."""

from __future__ import annotations

import math

import pytest

from trimtab.controller.governor import GovernorConfig
from trimtab.controller.scale import ScaleContext, derive_limits, optimizer_family
from trimtab.protocol import wire


def ctx(optimizer: str = "SGD", batch_size: int | None = 32, world_size: int = 8):
    return ScaleContext.from_facts(
        wire.ScaleFacts(
            param_count=30,
            group_sizes=[10, 20],
            optimizer=optimizer,
            dtype="bfloat16",
            device="cuda:0",
            batch_size=batch_size,
            world_size=world_size,
        )
    )


def test_the_context_carries_the_facts_and_the_global_batch():
    c = ctx()
    assert (c.param_count, c.group_sizes, c.world_size, c.global_batch_size) == (
        30,
        (10, 20),
        8,
        256,
    )
    assert ctx(batch_size=None).global_batch_size is None


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("SGD", "sgd"),
        ("ASGD", "sgd"),
        ("LARS", "sgd"),
        ("Adam", "adam"),
        ("AdamW", "adam"),
        ("FusedAdam", "adam"),
        ("NAdam", "adam"),
        ("RAdam", "adam"),
        ("Adamax", "adam"),
        ("Adafactor", "adam"),
        ("LAMB", "adam"),
        ("RMSprop", "adam"),
        ("Adagrad", "adam"),
        ("LBFGS", "other"),
        ("Rprop", "other"),
    ],
)
def test_optimizer_families(name, family):
    assert optimizer_family(name) == family


def test_adadelta_has_its_own_sane_range_not_adams():
    """Adadelta's lr scales an update already in the parameters' units (torch's default
    1.0, as pytorch/examples' mnist trains it): Adam's range [1e-5, 1e-2] put that run 100x
    over it and named it "adam family range" in the log. Its own is [0.01, 10] at batch
    256, the batch rule still Adam's (square root)."""
    facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="Adadelta",
                            dtype="float32", device="cpu", batch_size=64)
    ctx = ScaleContext.from_facts(facts)
    assert ctx.family == "adam" and ctx.lr_range() == pytest.approx((0.005, 5.0))
    d = derive_limits(ctx, GovernorConfig(), set(), wire.Knobs(lr=1.0))
    (note,) = d.notes
    assert "Adadelta's range [0.005, 5]" in note and "adam family" not in note
    assert d.config.lr.min_rel == pytest.approx(1e-3) and d.config.lr.max == pytest.approx(10.0)


def test_linear_for_sgd_square_root_for_adam():
    assert ctx("SGD").batch_lr_factor(64) == 4.0
    assert ctx("AdamW").batch_lr_factor(64) == 2.0
    assert ctx("AdamW").batch_lr_factor(1024) == pytest.approx(math.sqrt(0.25))
    assert ctx("SGD").batch_lr_factor(256) == 1.0


def test_a_rule_can_be_forced_and_unknowns_are_refused():
    assert ctx("LBFGS").batch_lr_factor(64, "sqrt") == 2.0
    assert ctx("AdamW").batch_lr_factor(64, "linear") == 4.0
    with pytest.raises(ValueError, match="optimizer 'LBFGS' is neither SGD- nor Adam-family"):
        ctx("LBFGS").batch_lr_factor(64)
    with pytest.raises(ValueError, match="needs the job's batch size"):
        ctx(batch_size=None).batch_lr_factor(64)
    with pytest.raises(ValueError, match="reference_batch_size must be >= 1, got 0"):
        ctx().batch_lr_factor(0)


def test_an_optimizer_that_reads_its_lr_once_has_its_lr_pinned():
    """Rprop's lr is read at its first step only: its multiplier bounds are [1, 1], so no
    command moves it and a rollback cuts none (the journal never says another is in force),
    whatever the configured band; the log says why."""
    facts = wire.ScaleFacts(param_count=10, group_sizes=[10], optimizer="Rprop",
                            dtype="float32", device="cpu", batch_size=256)
    d = derive_limits(ScaleContext.from_facts(facts), GovernorConfig(), set(),
                      wire.Knobs(lr=0.01))
    assert (d.config.lr.min_rel, d.config.lr.max_rel) == (1.0, 1.0)
    assert d.notes and "Rprop reads its lr only at its first step" in d.notes[0]
    sgd = facts.model_copy(update={"optimizer": "RMSprop"})
    d = derive_limits(ScaleContext.from_facts(sgd), GovernorConfig(), set(), wire.Knobs(lr=0.01))
    assert d.config.lr.max_rel > 1.0
