"""The container image's install, emulated without docker: the build context the
dockerignore lets through, the folders the Dockerfile copies, ``pip install --no-deps``, and
a controller that must run with nothing importable but the standard library and the
dependencies the Dockerfile installs (and theirs). A package the image lacks (``protocol/``
was not copied; ``rich`` was not installed) fails here as it fails in the image: at import.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _copied() -> list[str]:
    """The repository paths the Dockerfile copies into /src."""
    out = []
    for line in _dockerfile().splitlines():
        m = re.match(r"COPY\s+(.+)\s+\S+$", line)
        if m and "--from" not in line:
            out += [p.rstrip("/") for p in m.group(1).split()]
    return out


def _sent() -> set[str]:
    """The top-level paths the dockerignore sends to the build (``*``, then ``!path``)."""
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the dockerignore starts by ignoring everything"
    return {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}


def _installed() -> list[Requirement]:
    """The requirements the Dockerfile's second ``pip install`` names."""
    run = re.search(r"RUN pip install --no-deps \. \\\n\s+&& pip install (.+?) \\", _dockerfile())
    assert run, "the Dockerfile installs trimtab --no-deps, then the controller's dependencies"
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', run.group(1))]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_image_copies_every_package_and_the_build_context_holds_it():
    packages = set(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    copied = set(_copied())
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied
    missing = copied - _sent()
    assert not missing, f"copied but left out of the build context: {sorted(missing)}"


def test_the_image_installs_the_projects_dependencies_but_torch_and_numpy_at_their_ranges():
    """The same ranges as pyproject.toml (a dependency added there and not here leaves the
    image unable to start), minus the client's torch and numpy and the tomli that Python 3.11
    and up does not need (the image's Python is 3.12)."""
    assert re.search(r"^FROM python:3\.1[1-9]", _dockerfile(), re.M)
    project = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    wanted = {str(r) for r in project if r.name not in ("torch", "numpy") and (
        r.marker is None or r.marker.evaluate({"python_version": "3.12"}))}
    assert {str(r) for r in _installed()} == wanted


def _closure(names: list[str]) -> set[str]:
    """The top-level modules of these distributions and of everything they require (in this
    environment, with no extras): what ``pip install`` puts in the image besides trimtab."""
    owners = metadata.packages_distributions()
    dists, todo = set(), [n.lower().replace("_", "-") for n in names]
    while todo:
        name = todo.pop()
        if name in dists:
            continue
        dists.add(name)
        for req in metadata.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name.lower().replace("_", "-"))
    return {mod for mod, ds in owners.items()
            if any(d.lower().replace("_", "-") in dists for d in ds)}


#: Run with ``python -S`` (no site: the venv's editable trimtab is not on the path): only the
#: standard library, the image's trimtab (argv[1]) and the allowed third-party modules
#: (argv[2], as JSON) import; then ``trimtab ARGS`` runs as the image's entry point does.
RUNNER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, os, sys
    target, allowed, site = sys.argv[1], set(json.loads(sys.argv[2])), sys.argv[3]
    sys.path[:0] = [target, site]
    stdlib = os.path.dirname(os.__file__)
    stdlib = [stdlib, os.path.join(stdlib, "lib-dynload")]

    class ImageOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if (top in sys.stdlib_module_names or top in allowed or top == "trimtab"
                    or importlib.machinery.PathFinder.find_spec(top, stdlib) is not None):
                return None
            raise ModuleNotFoundError(f"No module named {top!r} (not in the image)", name=top)

    sys.meta_path.insert(0, ImageOnly())
    sys.argv = ["trimtab", *sys.argv[4:]]
    from trimtab.controller.cli import main
    try:
        code = main()
    except SystemExit as e:  # argparse's --help
        code = e.code
    print("loaded:", sorted(m for m in ("torch", "numpy") if m in sys.modules), flush=True)
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, list[str]]:
    """trimtab installed as the Dockerfile installs it (the context it copies, --no-deps)."""
    tmp = tmp_path_factory.mktemp("image")
    src = tmp / "src"
    src.mkdir()
    for path in _copied():
        assert path in _sent(), path
        subprocess.run(["cp", "-r", str(ROOT / path), str(src / path)], check=True)
    target = tmp / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    allowed = sorted(_closure([r.name for r in _installed()]))
    site = next(p for p in sys.path if p.endswith("site-packages"))
    return runner, [str(target), json.dumps(allowed), site]


def _image_trimtab(image, *args: str, **kw) -> subprocess.Popen:
    runner, fixed = image
    return subprocess.Popen([sys.executable, "-S", str(runner), *fixed, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TRIMTAB_CONFIG": ""},
                            **kw)


def test_the_images_trimtab_answers_help_and_lists_its_policies_without_torch(image):
    for args, says in [(["--help"], "serve"), (["policies"], "divergence_guard")]:
        proc = _image_trimtab(image, *args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert says in out, out
        assert "loaded: []" in out, out  # neither torch nor numpy


def test_the_images_controller_serves_and_stops_without_torch(image, tmp_path):
    proc = _image_trimtab(image, "serve", "--bind", "tcp://127.0.0.1:0", "--metrics-port", "0",
                          "--journal", str(tmp_path / "journal.db"))
    try:
        line = proc.stdout.readline()
        assert "ready on tcp://127.0.0.1:" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "loaded: []" in out, out


def test_a_package_the_image_lacks_fails_here_as_it_would_there(image):
    """The check itself: a module outside the image is refused, not found in the venv."""
    runner, (target, allowed, site) = image
    narrowed = json.dumps([m for m in json.loads(allowed) if m != "rich"])
    proc = subprocess.Popen([sys.executable, "-S", str(runner), target, narrowed, site, "jobs",
                             "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "No module named 'rich' (not in the image)" in err, err
