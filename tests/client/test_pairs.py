"""Several optimizers in one loop (a GAN, an actor-critic): one guard per model-optimizer
pair, registered as a game; and the pairings a user can get wrong refused.

An examples trial (pytorch/examples' DCGAN): the discriminator's job got an LR range test
on every seed and ended 6% worse than bare; ``attach(netD, optimizerG)`` (the pair
swapped) was accepted and a rollback reset the wrong net while the journal said
'restored'; two guards on one optimizer each scaled its lr and one journaled the other's
lr as the user's."""

from __future__ import annotations

import threading

import pytest
import torch

from trimtab.client import attach
from trimtab.protocol import wire


def _pair(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 4)
    return net, torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))


def test_two_guards_in_one_process_register_as_a_game_unless_told(fake_controller, caplog):
    net_d, opt_d = _pair(0)
    net_g, opt_g = _pair(1)
    net_x, opt_x = _pair(2)
    d = attach(net_d, opt_d, job="gan-D", endpoint=fake_controller.endpoint, hooks=True,
               heartbeat_s=0.05)
    fake_controller.wait_for(lambda c: any(r.job == "gan-D" for r in c.of_type(wire.Register)))
    assert d.loss_trend  # alone in its process so far
    with caplog.at_level("INFO", logger="trimtab.client"):
        g = attach(net_g, opt_g, job="gan-G", endpoint=fake_controller.endpoint, hooks=True,
                   heartbeat_s=0.05)
    x = attach(net_x, opt_x, job="side", endpoint=fake_controller.endpoint, loss_trend=True,
               heartbeat_s=0.05)
    try:
        assert (d.loss_trend, g.loss_trend, x.loss_trend) == (False, False, True)
        assert "share this process" in caplog.text

        def last(job):
            return [r for r in fake_controller.of_type(wire.Register) if r.job == job][-1]

        fake_controller.wait_for(lambda c: last("gan-D").loss_trend is False
                                 and any(r.job == "gan-G" for r in c.of_type(wire.Register))
                                 and any(r.job == "side" for r in c.of_type(wire.Register)))
        assert last("gan-G").loss_trend is False and last("side").loss_trend is None
    finally:
        for guard in (d, g, x):
            guard.close()
    # Closed, they share nothing: a later guard alone is an ordinary run.
    alone = attach(*_pair(3), job="later", endpoint=fake_controller.endpoint)
    assert alone.loss_trend
    alone.close()


def test_a_swapped_pair_and_a_second_guard_on_one_optimizer_are_refused(dead_endpoint,
                                                                        caplog):
    net_d, opt_d = _pair(0)
    net_g, opt_g = _pair(1)
    with pytest.raises(ValueError, match=r"^model=Linear.* is invalid; allowed: the module "
                                         r"whose parameters the optimizer steps: none of its 2"):
        attach(net_d, opt_g, job="swapped", endpoint=dead_endpoint)
    first = attach(net_g, opt_g, job="twoA", endpoint=dead_endpoint)
    try:
        with pytest.raises(ValueError, match=r"optimizer=.*allowed: one no open guard in this "
                                             r"process steers \(job 'twoA' does"):
            attach(net_g, opt_g, job="twoB", endpoint=dead_endpoint)
    finally:
        first.close()
    # A model holding only some of the optimizer's parameters: a warning, not a refusal.
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*net_d.parameters(), extra], lr=0.1)
    with caplog.at_level("WARNING", logger="trimtab.client"):
        part = attach(net_d, opt, job="part", endpoint=dead_endpoint)
    part.close()
    assert "1 of the optimizer's 3 parameters are not the model's" in caplog.text


def test_a_second_guard_on_a_model_another_guard_holds_is_warned_of(dead_endpoint, caplog):
    """An optimizer trial: Muon for a model's matrices and AdamW for the rest, a guard each
    on the one model. A rollback by the AdamW job restored Muon's parameters too, while
    Muon's state, step and lr stayed and its journal said nothing. The second attach says
    so; a GAN's two nets (two models) are not warned of."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    first = attach(model, torch.optim.SGD(matrices, lr=0.1, momentum=0.9), job="mA",
                   endpoint=dead_endpoint)
    try:
        with caplog.at_level("WARNING", logger="trimtab.client"):
            second = attach(model, torch.optim.AdamW(rest, lr=1e-3), job="mB",
                            endpoint=dead_endpoint)
        second.close()
    finally:
        first.close()
    assert ("job 'mB': its model shares parameters with the model of job 'mA' (two "
            "optimizers on one model): a rollback by either guard restores every parameter"
            ) in caplog.text
    caplog.clear()
    net_d, opt_d = _pair(0)
    net_g, opt_g = _pair(1)
    with caplog.at_level("WARNING", logger="trimtab.client"):
        with attach(net_d, opt_d, job="gD", endpoint=dead_endpoint), \
                attach(net_g, opt_g, job="gG", endpoint=dead_endpoint):
            pass
    assert "shares parameters" not in caplog.text


def test_guards_attached_by_two_threads_are_two_runs_not_a_game(fake_controller):
    """An optuna study with n_jobs=2 runs two trials at once, each in a thread of its own:
    two ordinary runs, each with its range test and climb verdict."""
    guards = {}
    attached = threading.Barrier(2)

    def trial(seed: int) -> None:
        net, opt = _pair(seed)
        guards[seed] = attach(net, opt, job=f"trial-{seed}", endpoint=fake_controller.endpoint,
                              heartbeat_s=0.05)
        attached.wait(10)  # both open at once

    threads = [threading.Thread(target=trial, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert [guards[s].loss_trend for s in (0, 1)] == [True, True]
        fake_controller.wait_for(lambda c: {r.job for r in c.of_type(wire.Register)}
                                 == {"trial-0", "trial-1"})
        assert all(r.loss_trend is None for r in fake_controller.of_type(wire.Register))
    finally:
        for guard in guards.values():
            guard.close()
