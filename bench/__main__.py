"""``python -m bench run --quick|--full [...]``: the control-quality benchmark.

The other benchmarks run as their own modules: ``python -m bench.faults`` (fault
recovery of one small MLP, bare vs trimtab), ``python -m bench.overhead`` (client
overhead), ``python -m bench.capacity`` (controller capacity) and
``python -m bench.choose_default`` (trimtab's default policy set, by measurement).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "run":
        print("usage: python -m bench run --quick|--full [--scenarios lr,target,scale,faults] "
              "[--tasks ...] [--contenders ...] [--seeds N] [--workers N] "
              "[--trimtab-set NAME=POLICIES ...]\n"
              "(see `python -m bench run --help`)", file=sys.stderr)
        return 2
    from bench.run import main as run_main

    return run_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
