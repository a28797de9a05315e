"""Choose trimtab's default policy set by measurement, not by taste.

    python -m bench.choose_default --quick --reuse bench/results/quality-runs.json
    python -m bench.choose_default --from-json bench/results/default-set-runs.json

Runs the LR-robustness scenario of ``python -m bench run`` for ``trimtab`` (the current
default set) and every candidate set (:data:`bench.trimtab_sets.CANDIDATES`, or the
``--set`` options), each against its own controller, and ranks them by the benchmark
issue's criterion: the *worst case over tasks* of the median (over every starting LR of
the grid and every seed) final validation loss relative to the task's oracle; ties (equal
to the three significant digits printed) go to fewer diverged runs, then to the smaller
set. ``--reuse`` takes the oracle's and trimtab's runs from an earlier ``bench run`` with
the same settings.
Writes ``default-set.md`` (the ranking above the LR tables) and ``default-set-runs.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import contenders, run, trimtab_sets
from bench.loop import RunResult
from bench.tasks import load_tasks

__all__ = ["rank", "ranking_table", "main"]

NAME = "default-set"


def rank(stats: dict[str, dict[str, tuple]], sizes: dict[str, int] | None = None) -> list:
    """``stats[task][contender] = (best, median, worst, diverged, runs)`` (as
    ``bench.run.lr_table`` gives them) -> rows ``(contender, worst-case median, its task,
    diverged, runs)``, best first.

    >>> s = {"a": {"x": (1, 1.2, 2, 0, 5), "y": (1, 1.1, 9, 1, 5)},
    ...      "b": {"x": (1, 1.0, 1, 0, 5), "y": (1, 1.3, 3, 0, 5)}}
    >>> [r[0] for r in rank(s)]
    ['x', 'y']
    """
    sizes = sizes or {}
    names = {c for per_task in stats.values() for c in per_task}
    rows = []
    for c in names:
        per = {t: stats[t][c] for t in stats if c in stats[t]}
        task = max(per, key=lambda t: per[t][1])
        rows.append((c, per[task][1], task, sum(v[3] for v in per.values()),
                     sum(v[4] for v in per.values())))
    # Medians equal to the 3 significant digits printed tie: fewer diverged runs, then
    # fewer policies win.
    rows.sort(key=lambda r: (float(f"{r[1]:.3g}"), r[3], sizes.get(r[0], 0), r[0]))
    return rows


def ranking_table(stats: dict, sets: dict[str, list]) -> list[str]:
    """The ranking as Markdown; ``sets`` maps a contender to its ``(policy, config)`` list."""
    sizes = {c: len(items) for c, items in sets.items()}
    tasks = list(stats)
    lines = ["## Default-set ranking", "",
             "Worst case over tasks of the median final validation loss / oracle (every "
             "starting LR of the grid, every seed); ties (equal to 3 significant digits) go to "
             "fewer diverged runs, then to fewer policies. First row: the measured choice.", "",
             "| rank | contender | policies | worst-case median | on task | "
             + " | ".join(tasks) + " | diverged |",
             "|---|---|---|---|---|" + "---|" * (len(tasks) + 1)]
    for i, (c, worst, task, div, n) in enumerate(rank(stats, sizes), 1):
        cells = [run._fmt(stats[t][c][1]) if c in stats[t] else "n/a" for t in tasks]
        what = trimtab_sets.describe(sets[c]) if c in sets else "?"
        lines.append(f"| {i} | {c} | {what} | {run._fmt(worst)} | {task} | "
                     + " | ".join(cells) + f" | {div}/{n} |")
    return lines


def from_runs(path: Path) -> list[str]:
    """The ranking of every trimtab contender in a runs file (``bench run`` writes the
    candidate sets' policies into it; ``trimtab`` is the controller's default set)."""
    saved = json.loads(path.read_text())
    results = [RunResult.from_dict(d) for d in saved["runs"]]
    sets = {"trimtab": [(p, {}) for p in trimtab_sets.default_set()]}
    sets.update({c: [tuple(i) for i in items]
                 for c, items in saved.get("trimtab_sets", {}).items()})
    have = {r.spec.task for r in results}
    tasks = {n: t for n, t in load_tasks().items() if n in have}
    names = sorted({r.spec.contender for r in results if contenders.is_trimtab(r.spec.contender)})
    for c in names:
        contenders.get(c)
    stats = {t.name: run.lr_table(results, t, names)[1] for t in tasks.values()}
    return ranking_table(stats, sets)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.choose_default",
                                 description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    ap.add_argument("--set", action="append", default=None, metavar="NAME=POLICIES",
                    help="a candidate set (repeatable); default: " + " ".join(
                        trimtab_sets.CANDIDATES))
    ap.add_argument("--from-json", default=None, metavar="RUNS_JSON",
                    help="rank the trimtab contenders of a runs file; runs nothing")
    args, rest = ap.parse_known_args(argv)
    if args.from_json:
        print("\n".join(from_runs(Path(args.from_json))))
        return 0
    sets = args.set if args.set is not None else list(trimtab_sets.CANDIDATES)
    run_args = [f"--{args.mode or 'quick'}", "--scenarios", "lr", "--contenders", "trimtab",
                "--name", NAME, *rest]
    for s in sets:
        run_args += ["--trimtab-set", s]
    code = run.main(run_args)
    if code:
        return code
    out = Path(rest[rest.index("--out") + 1]) if "--out" in rest else run.RESULTS
    table = from_runs(out / f"{NAME}-runs.json")
    print("\n".join(table))
    md = out / f"{NAME}.md"
    text = md.read_text()
    head, _, body = text.partition("\n## ")
    md.write_text(head + "\n" + "\n".join(table) + "\n\n## " + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
