"""Policy API: Proposal validation, the base class, and loading by name or dotted path."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
from pydantic import BaseModel, ConfigDict

from trimtab.controller import policy as policy_mod
from trimtab.controller.policy import (
    Policy,
    PolicyLoadError,
    Proposal,
    discover,
    load_policy,
)
from trimtab.policies.plateau import Plateau
from trimtab.policies.spike_guard import SpikeGuard

# -- Proposal ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 0.5, "value": 1.0}, r"exactly one of factor, value or hold=True; got \['factor', 'value'\]"),  # noqa: E501
        ({}, "exactly one of factor, value or hold=True; got none"),
        ({"factor": 0.5, "hold": True}, r"got \['factor', 'hold'\]"),
        ({"factor": float("nan")}, "lr factor must be a finite number, got nan"),
        ({"factor": 0.0}, r"lr factor must be > 0, got 0.0"),
        ({"value": -1.0}, r"lr value must be >= 0, got -1.0"),
        ({"value": True}, "lr value must be a finite number, got True"),
        ({"hold": 1}, "hold must be True or False, got 1"),
    ],
)
def test_proposal_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Proposal("lr", reason="r", **kwargs)


def test_proposal_needs_a_known_knob_and_a_reason():
    with pytest.raises(ValueError, match="knob 'beta2' is not one of lr, momentum"):
        Proposal("beta2", factor=0.5, reason="r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a non-empty reason"):
        Proposal("lr", factor=0.5, reason="  ")
    assert Proposal("lr", hold=True, reason="wait").hold is True


# -- the base class ---------------------------------------------------------------------


class Every(Policy):
    name = "every"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = 10

    def propose(self, view):
        return []


def test_policy_takes_a_dict_a_config_or_nothing():
    assert Every().config.n == 10
    assert Every({"n": 3}).config.n == 3
    assert Every(Every.Config(n=4)).config.n == 4
    with pytest.raises(TypeError, match="config must be a dict or Config, got int"):
        Every(5)  # type: ignore[arg-type]


def test_policy_needs_propose():
    class NoPropose(Policy):
        name = "nope"

    with pytest.raises(TypeError, match="abstract method"):
        NoPropose()  # type: ignore[abstract]


# -- loading ----------------------------------------------------------------------------


def test_discover_lists_the_shipped_policies_sorted():
    found = discover()
    assert list(found) == sorted(found)
    assert found["plateau"].value == "trimtab.policies.plateau:Plateau"
    assert found["spike_guard"].value == "trimtab.policies.spike_guard:SpikeGuard"


def test_discover_keeps_the_first_of_duplicate_names(monkeypatch):
    eps = [EntryPoint("b", "z.mod:B", "trimtab.policies"), EntryPoint("a", "y.mod:A2",
           "trimtab.policies"), EntryPoint("a", "x.mod:A1", "trimtab.policies")]
    monkeypatch.setattr(policy_mod, "entry_points", lambda group: eps)
    assert {k: v.value for k, v in discover().items()} == {"a": "x.mod:A1", "b": "z.mod:B"}
    assert list(discover()) == ["a", "b"]


def test_a_built_in_wins_over_a_plugin_of_the_same_name(monkeypatch):
    eps = [EntryPoint("plateau", "aaa.first:Plateau", "trimtab.policies"),
           EntryPoint("plateau", "trimtab.policies.plateau:Plateau", "trimtab.policies")]
    monkeypatch.setattr(policy_mod, "entry_points", lambda group: eps)
    assert discover()["plateau"].value == "trimtab.policies.plateau:Plateau"
    assert [(a.value, b.value) for a, b in policy_mod.ignored()] == [
        ("aaa.first:Plateau", "trimtab.policies.plateau:Plateau")]
    assert isinstance(load_policy("plateau", allow=["*"]), Plateau)


def test_load_by_entry_point_name_with_config():
    pol = load_policy("plateau", {"t_crit": 3.0})
    assert isinstance(pol, Plateau) and pol.config.t_crit == 3.0
    assert isinstance(load_policy("spike_guard"), SpikeGuard)


@pytest.mark.parametrize(
    "path", ["trimtab.policies.spike_guard:SpikeGuard", "trimtab.policies.spike_guard.SpikeGuard"]
)
def test_load_by_dotted_path(path):
    assert isinstance(load_policy(path, {"cut": 0.25}), SpikeGuard)


def test_unknown_name():
    with pytest.raises(PolicyLoadError, match=r"policy 'platoe' not found: no entry point of "
                       r"that name in group 'trimtab.policies' \(known: [a-z_, ]*divergence_guard, "
                       r"[a-z_, ]*plateau, [a-z_, ]*spike_guard"):
        load_policy("platoe")


def test_an_unimportable_module():
    with pytest.raises(PolicyLoadError, match=r"policy 'no_such_pkg.mod:X': cannot import "
                       r"'no_such_pkg.mod': ModuleNotFoundError"):
        load_policy("no_such_pkg.mod:X")


def test_a_missing_attribute():
    with pytest.raises(PolicyLoadError, match=r"module 'trimtab.policies.plateau' has no "
                       r"attribute 'Plato'"):
        load_policy("trimtab.policies.plateau:Plato")


def test_an_entry_point_that_fails_to_load(monkeypatch):
    eps = [EntryPoint("broken", "no_such_pkg_q:Thing", "trimtab.policies")]
    monkeypatch.setattr(policy_mod, "entry_points", lambda group: eps)
    with pytest.raises(PolicyLoadError, match=r"policy 'broken': cannot load entry point "
                       r"'no_such_pkg_q:Thing': ModuleNotFoundError"):
        load_policy("broken")


def test_not_a_policy():
    with pytest.raises(PolicyLoadError, match=r"policy 'trimtab.controller.governor:Governor': "
                       r".*Governor'> is not a trimtab Policy subclass"):
        load_policy("trimtab.controller.governor:Governor")


def test_a_policy_without_a_name(monkeypatch):
    import types

    mod = types.ModuleType("fake_policies_mod")

    class Nameless(Policy):
        def propose(self, view):
            return []

    mod.Nameless = Nameless
    monkeypatch.setitem(__import__("sys").modules, "fake_policies_mod", mod)
    with pytest.raises(PolicyLoadError, match="class .*Nameless sets no name"):
        load_policy("fake_policies_mod:Nameless")


def test_bad_config_value_names_field_value_and_allowed():
    with pytest.raises(PolicyLoadError, match=r"policy 'plateau': bad config: t_crit=-1: "
                       r"Input should be greater than 0"):
        load_policy("plateau", {"t_crit": -1})


def test_bad_config_field_lists_the_allowed_fields():
    with pytest.raises(PolicyLoadError, match=r"policy 'spike_guard': bad config: z=3: Extra "
                       r"inputs are not permitted \(allowed fields: z_threshold, cut, "
                       r"on_nonfinite\)"):
        load_policy("spike_guard", {"z": 3})


def test_config_must_be_a_mapping():
    with pytest.raises(PolicyLoadError, match="config must be a mapping, got list"):
        load_policy("plateau", [1])  # type: ignore[arg-type]


def test_a_typo_is_not_found_with_the_closest_names_even_where_plugins_are_restricted():
    # allow_plugins = [] (the default): a name no policy has is still a typo, not a refusal.
    for allow in (None, []):
        with pytest.raises(PolicyLoadError) as info:
            load_policy("platau", allow=allow)
        message = str(info.value)
        assert message.startswith("policy 'platau' not found: no entry point of that name in "
                                  "group 'trimtab.policies' (known: adaptive_clip, ")
        assert message.endswith(", and not a dotted path; did you mean 'plateau'?")
        assert "allow_plugins" not in message


def test_an_installed_plugin_not_in_allow_plugins_is_refused_and_its_typo_not_found(
    monkeypatch,
):
    eps = [*discover().values(), EntryPoint("loss_band", "acme_band:LossBand", "trimtab.policies")]
    monkeypatch.setattr(policy_mod, "entry_points", lambda group: eps)
    with pytest.raises(PolicyLoadError, match=r"^policy 'loss_band' is not allowed: besides the "
                       r"built-in trimtab.policies.\*, only policies listed in allow_plugins "
                       r"load \(allow_plugins = \['other'\]\)$"):
        load_policy("loss_band", allow=["other"])
    with pytest.raises(PolicyLoadError, match=r"^policy 'loss_bnd' not found: .*\(known: .*"
                       r"loss_band.*\), and not a dotted path; did you mean 'loss_band'\?$"):
        load_policy("loss_bnd", allow=["other"])
    # Nothing close: the known names, and no guess.
    with pytest.raises(PolicyLoadError, match=r"and not a dotted path$"):
        load_policy("xyzzy", allow=[])
