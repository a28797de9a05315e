"""The distribution installs under the ``trimtab`` namespace only, with its CLI and plugins."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_wheel_holds_only_the_trimtab_namespace(tmp_path):
    # Build from a copy: setuptools leaves a trimtab.egg-info beside the sources, and one in
    # the checkout would shadow the installed metadata (entry points) for later imports.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "client", "controller", "policies", "protocol"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("trimtab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"trimtab", next(t for t in tops if t.endswith(".dist-info"))}
    for pkg in ("client", "controller", "policies", "protocol"):
        assert f"trimtab/{pkg}/__init__.py" in names
    assert "trimtab/protocol/wire.py" in names


def test_console_script_and_policy_entry_points_are_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("trimtab") == "trimtab.controller.cli:main"
    names = {ep.name for ep in entry_points(group="trimtab.policies")}
    assert {"plateau", "spike_guard"} <= names


def test_client_imports_no_controller_code():
    code = ("import sys, trimtab.client; "
            "bad = [m for m in sys.modules if m.startswith(('trimtab.controller', "
            "'trimtab.policies', 'prometheus_client', 'sqlite3'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT.parent))


def test_controller_starts_without_importing_torch():
    code = ("import sys, trimtab.controller.server, trimtab.controller.cli; "
            "assert 'torch' not in sys.modules, 'the controller imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT.parent))
