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


def test_the_example_plugins_docstring_examples():
    """The example plugin (examples/policy-plugin) is what a plugin author copies first.
    Loaded from its file under a name of its own: another test installs a copy of it."""
    import importlib.util
    from pathlib import Path

    path = (Path(__file__).resolve().parents[1] / "examples" / "policy-plugin"
            / "trimtab_example_policy" / "__init__.py")
    spec = importlib.util.spec_from_file_location("example_policy_as_shipped", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
