"""Run the benchmarks from a plain checkout where trimtab is not installed.

The repository's folders ``client/``, ``controller/`` and ``policies/`` are the packages
``trimtab.client``, ``trimtab.controller`` and ``trimtab.policies`` once installed
(``[tool.setuptools] package-dir``). Without an install, :func:`ensure_trimtab` writes a
tiny ``trimtab`` package whose ``__path__`` is the repository root, plus the
distribution's metadata (version and the ``trimtab.policies`` entry points, read from
``pyproject.toml``), into a temporary folder, and puts that folder first on ``sys.path``
and ``PYTHONPATH`` (so a ``trimtab serve`` subprocess finds the same). Installed, it does
nothing.

>>> ensure_trimtab()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["ensure_trimtab"]

ROOT = Path(__file__).resolve().parents[1]


def _entry_points(pyproject: str) -> tuple[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    meta = tomllib.loads(pyproject)["project"]
    lines = []
    for group, eps in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
        lines.append("")
    scripts = meta.get("scripts", {})
    if scripts:
        lines.append("[console_scripts]")
        lines += [f"{name} = {target}" for name, target in scripts.items()]
    return "\n".join(lines) + "\n", meta["version"]


def ensure_trimtab() -> str | None:
    """Make ``import trimtab.client`` work; the folder added to the path, or ``None``."""
    try:
        importlib.import_module("trimtab.client")
        return None
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "trimtab" or m.startswith("trimtab.")]:
        del sys.modules[name]
    eps, version = _entry_points((ROOT / "pyproject.toml").read_text())
    shim = Path(tempfile.mkdtemp(prefix="trimtab-shim-"))
    (shim / "trimtab").mkdir()
    (shim / "trimtab" / "__init__.py").write_text(
        f"__path__ = [{str(ROOT)!r}]  # trimtab.client is {str(ROOT / 'client')!r}, ...\n")
    info = shim / f"trimtab-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: trimtab\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(eps)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(shim), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    importlib.import_module("trimtab.client")
    return str(shim)
