"""The wheels a GPU machine that has torch but nothing else needs to run ``bench.gpu``.

    python -m bench.device_wheels [--python 3.12] [--out .whl]

Downloads, for the device's Python (binary wheels only, manylinux x86_64), trimtab's
dependencies other than torch and numpy (which the device has): pyzmq, pydantic,
prometheus-client, rich and theirs, as ``pyproject.toml`` lists them. Then prints the
command to run on the device from the repository root, where ``.whl/`` (ignored by git)
travels with the working tree when the run names it (the device tool's ``carry``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    export PYTHONUNBUFFERED=1 BENCH_GPU_COMMIT=<commit>
    timeout 290 python3 -m bench.gpu

The results come back under ``$OUT`` (``bench.gpu`` writes ``$OUT/gpu.md`` too).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What the device already has (its own CUDA build of torch, and numpy with it).
ON_DEVICE = frozenset({"torch", "numpy"})

PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def requirements(pyproject: str, python: str) -> list[str]:
    """``pyproject``'s dependencies that the device lacks, for Python ``python`` (those
    whose environment marker excludes it are left out)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from packaging.markers import Marker

    out = []
    for req in tomllib.loads(pyproject)["project"]["dependencies"]:
        spec, _, marker = req.partition(";")
        name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0].lower()
        if name in ON_DEVICE:
            continue
        if marker.strip() and not Marker(marker.strip()).evaluate(
                {"python_version": python, "python_full_version": f"{python}.0"}):
            continue
        out.append(spec.strip())
    return out


def command(reqs: list[str], python: str, out: str) -> list[str]:
    """The ``pip download`` that fetches them for the device."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", out]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + reqs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default="3.12", help="the device's Python (major.minor)")
    ap.add_argument("--out", default=str(ROOT / ".whl"))
    args = ap.parse_args(argv)
    reqs = requirements((ROOT / "pyproject.toml").read_text(), args.python)
    done = subprocess.run(command(reqs, args.python, args.out))
    if done.returncode != 0:
        return done.returncode
    wheels = sorted(p.name for p in Path(args.out).glob("*.whl"))
    print(f"{len(wheels)} wheels in {args.out}: {', '.join(wheels)}")
    # The commit as this checkout has it: the device's copy may carry older git metadata.
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip() or "<commit>"
    print("On the device, from the repository root (carry .whl):\n"
          "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
          "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD\n"
          f"  export PYTHONUNBUFFERED=1 BENCH_GPU_COMMIT={head}\n"
          "  timeout 290 python3 -m bench.gpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
