"""The package's layering, read from the source: who may import whom, and no import circles.

Every ``import`` and ``from ... import`` in a module counts, wherever it sits: at the top,
inside a function (a lazy import), or under ``if TYPE_CHECKING:``. A circle hidden behind
``TYPE_CHECKING`` is still two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"client": "trimtab.client", "controller": "trimtab.controller",
            "policies": "trimtab.policies", "protocol": "trimtab.protocol"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return found


def _imported(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from pkg import name``
            # (a function, a class) depends on pkg itself.
            for a in node.names:
                sub = f"{module}.{a.name}"
                out.add(sub if sub in _MODULE_NAMES else module)
    return out


MODULES = _modules()
_MODULE_NAMES = set(MODULES)
IMPORTS = {name: _imported(name, path) for name, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    return {n: {m for m in deps if m in MODULES and m != n} for n, deps in IMPORTS.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_package_and_lazy_and_type_checking_imports():
    # The walk itself can fail: it must find the packages and read imports in every place.
    assert {n.rsplit(".", 1)[0] for n in MODULES} >= set(PACKAGES.values())
    assert "trimtab.protocol.wire" in MODULES
    assert "trimtab.protocol.schedules" in IMPORTS["trimtab.protocol.values"]
    # client/__init__ imports its parts lazily, inside __getattr__ and under TYPE_CHECKING.
    assert "trimtab.client._guard" in IMPORTS["trimtab.client"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_among_the_packages_modules():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("side", ["trimtab.controller", "trimtab.policies", "trimtab.protocol"])
def test_the_controller_side_never_imports_the_client(side):
    bad = {n: sorted(m for m in deps if m == "trimtab.client" or m.startswith("trimtab.client."))
           for n, deps in IMPORTS.items() if n == side or n.startswith(side + ".")}
    assert {n: v for n, v in bad.items() if v} == {}


def test_the_protocol_imports_neither_side_nor_torch():
    for name, deps in IMPORTS.items():
        if not name.startswith("trimtab.protocol"):
            continue
        bad = sorted(m for m in deps if m.split(".")[0] in ("torch", "numpy", "zmq")
                     or m.startswith(("trimtab.client", "trimtab.controller", "trimtab.policies")))
        assert bad == [], f"{name} imports {bad}"


#: The SDK module and its own internals (the schedule policies' base, which it exports).
SDK = {"trimtab.policies.sdk", "trimtab.policies._schedule_base", "trimtab.policies._lr_curve",
       "trimtab.policies"}
EXAMPLE_PLUGIN = ROOT / "examples" / "policy-plugin" / "trimtab_example_policy" / "__init__.py"


def _trimtab_imports(deps: set[str]) -> set[str]:
    return {m for m in deps if m == "trimtab" or m.startswith("trimtab.")}


def test_built_in_policies_and_the_example_plugin_import_only_the_sdk():
    users = {n: deps for n, deps in IMPORTS.items()
             if n.startswith("trimtab.policies.") and n not in SDK}
    users["example plugin"] = _imported("trimtab_example_policy", EXAMPLE_PLUGIN)
    assert len(users) >= 17  # every built-in policy, and the example
    bad = {n: sorted(m for m in _trimtab_imports(deps)
                     if m != "trimtab.policies.sdk" and not m.startswith("trimtab.policies.sdk."))
           for n, deps in users.items()}
    assert {n: v for n, v in bad.items() if v} == {}
    # Each does import it (the check above is not passed by importing nothing).
    assert all("trimtab.policies.sdk" in deps for deps in users.values())


def test_the_view_fields_in_the_policy_guide_are_the_codes():
    from trimtab.policies.sdk import fields_markdown

    doc = (ROOT / "docs" / "writing-policies.md").read_text(encoding="utf-8")
    begin = doc.index("-->\n", doc.index("<!-- view-fields")) + 4
    listed = doc[begin:doc.index("<!-- /view-fields -->")]
    generated = fields_markdown()
    assert listed.strip() == generated.strip(), "run python -m trimtab.policies.sdk"
    # Every field the view gives a policy is in the guide, with words, not a bare name.
    import dataclasses

    from trimtab.controller.view import JobView
    for f in dataclasses.fields(JobView):
        row = next(r for r in generated.splitlines() if f"`{f.name}`:" in r)
        assert row.rstrip(" |").split("|")[-1].strip(), f"{f.name} has no description"
