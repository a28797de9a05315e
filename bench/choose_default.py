"""Choose trimtab's default policy set by measurement, not by taste.

    python -m bench.choose_default --quick --reuse bench/results/quality-runs.json
    python -m bench.choose_default --from-json bench/results/default-set-runs.json

Runs the LR-robustness scenario of ``python -m bench run`` for ``trimtab`` (the current
default set) and every candidate set (:data:`bench.trimtab_sets.CANDIDATES`, or the
``--set`` options), each against its own controller, and ranks them by the benchmark
issue's criterion: the *worst case over tasks* of the median (over every starting LR of
the grid and every seed) final validation loss relative to the task's oracle, where
worst cases within 5% of each other tie and the next-worst task decides (:func:`rank`);
sets tied on every task go by fewer diverged runs, then the smaller set. ``--reuse``
takes the oracle's and trimtab's runs from an earlier ``bench run`` with the same
settings.
Writes ``default-set.md`` (the ranking above the LR tables) and ``default-set-runs.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from bench import contenders, run, trimtab_sets
from bench.loop import RunResult
from bench.tasks import load_tasks

__all__ = ["rank", "ranking_table", "main"]

NAME = "default-set"


#: Worst-case medians within this fraction of each other are a tie, decided by the next
#: worst task (see :func:`rank`).
TOLERANCE = 0.05


def rank(stats: dict[str, dict[str, tuple]], sizes: dict[str, int] | None = None) -> list:
    """``stats[task][contender] = (best, median, worst, diverged, runs)`` (as
    ``bench.run.lr_table`` gives them) -> rows ``(contender, worst-case median, its task,
    diverged, runs)``, best first.

    The criterion is the worst case over tasks of the median ratio to the oracle. Two
    sets whose worst cases lie within :data:`TOLERANCE` of each other tie there, and their
    next-worst tasks decide, and so on (a minimax with a tolerance): otherwise a set a few
    percent better on a task where every set is far off would win while twice as bad on
    another. Sets that tie on every task go by fewer diverged runs, then fewer policies.

    >>> s = {"a": {"x": (1, 1.2, 2, 0, 5), "y": (1, 1.1, 9, 1, 5)},
    ...      "b": {"x": (1, 1.0, 1, 0, 5), "y": (1, 1.3, 3, 0, 5)}}
    >>> [r[0] for r in rank(s)]
    ['x', 'y']
    >>> s = {"a": {"x": (1, 6.0, 6, 0, 5), "y": (1, 6.2, 9, 0, 5)},
    ...      "b": {"x": (1, 4.0, 4, 0, 5), "y": (1, 2.0, 3, 0, 5)}}
    >>> [r[0] for r in rank(s)]  # 6.0 and 6.2 tie; on b, 2.0 beats 4.0
    ['y', 'x']
    """
    sizes = sizes or {}
    names = {c for per_task in stats.values() for c in per_task}
    rows, profile = [], {}
    for c in names:
        per = {t: stats[t][c] for t in stats if c in stats[t]}
        task = max(per, key=lambda t: per[t][1])
        rows.append((c, per[task][1], task, sum(v[3] for v in per.values()),
                     sum(v[4] for v in per.values())))
        profile[c] = sorted((v[1] for v in per.values()), reverse=True)

    def compare(a: tuple, b: tuple) -> int:
        for x, y in zip(profile[a[0]], profile[b[0]], strict=False):
            if abs(x - y) > TOLERANCE * min(x, y):
                return -1 if x < y else 1
        key_a, key_b = (a[3], sizes.get(a[0], 0), a[0]), (b[3], sizes.get(b[0], 0), b[0])
        return (key_a > key_b) - (key_a < key_b)

    rows.sort(key=functools.cmp_to_key(compare))
    return rows


def ranking_table(stats: dict, sets: dict[str, list]) -> list[str]:
    """The ranking as Markdown; ``sets`` maps a contender to its ``(policy, config)`` list."""
    sizes = {c: len(items) for c, items in sets.items()}
    tasks = list(stats)
    lines = ["## Default-set ranking", "",
             "Worst case over tasks of the median final validation loss / oracle (every "
             f"starting LR of the grid, every seed); worst cases within {TOLERANCE:.0%} of each "
             "other tie and the next-worst task decides, and so on; sets tied on every task "
             "go by fewer diverged runs, then fewer policies. First row: the measured "
             "choice.", "",
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
    candidate sets' policies into it, and the default set ``trimtab`` ran with; files
    written before that key existed get the controller's current default set)."""
    saved = json.loads(path.read_text())
    results = [RunResult.from_dict(d) for d in saved["runs"]]
    sets = {"trimtab": [tuple(i) for i in saved.get("default_set", trimtab_sets.default_items())]}
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
