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
