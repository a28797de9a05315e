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


def _blocks(lang: str) -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "writing-policies.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_policy_guides_python_snippets_run_each_on_its_own(monkeypatch, capsys):
    """A plugin author's trial pasted section 3's snippets alone and got a NameError: each
    block runs by itself, with the example plugin importable as its README installs it."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"
                                    / "policy-plugin"))
    monkeypatch.delitem(sys.modules, "trimtab_example_policy", raising=False)
    blocks = _blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "writing-policies.md", "exec"), {})  # noqa: S102
    assert "lr x1 -> x0.5" in capsys.readouterr().out


def test_the_policy_guides_configs_load_and_the_range_test_keeps_the_lrs_other_limits():
    """A trial: the range-test config's [governor.lr] table widened the bounds and, since a
    knob's table replaces its defaults, switched every other lr limit off."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from trimtab.controller.config import ControllerConfig
    from trimtab.controller.limits import GovernorConfig

    blocks = [b for b in _blocks("toml") if "[project" not in b]  # not a pyproject.toml's
    assert blocks
    for block in blocks:
        cfg = ControllerConfig(**tomllib.loads(block))
        if "lr_range_test" in block:
            got = cfg.governor.lr.model_dump()
            want = {**GovernorConfig().lr.model_dump(), "max_rel": 100.0}
            assert got == want
