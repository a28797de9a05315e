"""The examples in the docstrings run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import trimtab.client
import trimtab.controller
import trimtab.policies
import trimtab.protocol


def _modules() -> list[str]:
    names = []
    for pkg in (trimtab.client, trimtab.controller, trimtab.policies, trimtab.protocol):
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")
                  if not m.name.endswith("__main__")]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_example_plugins_docstring_examples(monkeypatch):
    """The example plugin (examples/policy-plugin) is what a plugin author copies first."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "policy-plugin"
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("trimtab_example_policy")
    assert Path(module.__file__).resolve().parent == root / "trimtab_example_policy"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
