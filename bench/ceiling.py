"""What the LR-robustness table's oracle asks of a loop with a constant LR: ``ceiling``.

The quality benchmark's oracle (``bench.run.oracle``) is the best hand-tuned *schedule*
(warm-up + cosine or a step decay) at the best LR of a half-decade grid. trimtab steers a
multiplier on the loop's own LR: on a task whose loop holds its LR constant, a trimtab
that found the best LR at once, at no cost, would still run a constant LR. This prints,
for every task without a schedule of its own:

- ``ceiling``: the bare constant-LR run (contender ``constant``) at every point of the
  oracle's LR grid, median final validation loss over the quick grid's seeds / the oracle:
  the best of these is the lowest ratio any controller that keeps the loop's constant LR
  can reach on that task;
- ``cooldown``: at the task's tuned LR (as ``bench.tuned`` takes it), the same run with a
  linear cooldown to 0 over the last 10% or 20% of its steps (``bench.contenders.
  ConstantCooldown``), per seed over the bare run: what a decay added to a tuned run
  gains or costs, against ``bench.tuned``'s do-no-harm aim (median <= 1.01, worst <= 1.03).

Runs already in the runs file (the quality grid's bare runs) are taken from it, not made
again.

    python -m bench.ceiling --seeds 8 --out bench/results/ceiling.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from bench import run as bench_run
from bench.loop import RunResult, RunSpec
from bench.tasks import load_tasks
from bench.tuned import TUNED_MEDIAN, TUNED_WORST, final_losses, tuned_lrs

__all__ = ["main", "specs"]

RESULTS = Path(__file__).resolve().parent / "results"
COOLDOWNS = ("cooldown10", "cooldown20")
#: Seeds of the ceiling's grid: the quick grid's, so that its medians are the oracle's kind.
GRID_SEEDS = 2


def specs(tasks, lrs: dict[str, float], seeds: int, steps: int | None = None) -> list[RunSpec]:
    """The constant runs over each task's oracle grid, and the tuned runs with cooldowns
    (``steps``: every run's budget instead of the task's quick one)."""
    out = []
    for name, task in tasks.items():
        n, width = steps or task.steps["quick"], (task.widths[0] if task.widths else None)
        out += [RunSpec(name, "constant", lr, s, n, width)
                for lr in task.oracle_grid for s in range(GRID_SEEDS)]
        out += [RunSpec(name, c, lrs[name], s, n, width)
                for c in ("constant", *COOLDOWNS) for s in range(seeds)]
    return list({s.key: s for s in out}.values())


def report(results: list[RunResult], base: list[RunResult], tasks,
           lrs: dict[str, float]) -> list[str]:
    lines = ["## ceiling: a constant LR at every point of the oracle's grid, over the oracle",
             "", "Median over seeds 0..1 of the final validation loss / the oracle's (the "
             "quality benchmark's, from its runs file).", "",
             "| task | oracle | constant LR: ratio | best constant LR | its ratio |",
             "|---|---|---|---|---|"]
    for name, task in tasks.items():
        width = task.widths[0] if task.widths else None
        orc, label = bench_run.oracle(base, task, width)
        row = []
        for lr in task.oracle_grid:
            got = final_losses(results, name, "constant", lr)
            vals = [got[s] for s in range(GRID_SEEDS) if s in got]
            row.append((lr, statistics.median(vals) / orc if vals else math.nan))
        lr_best, best = min(row, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)
        cells = ", ".join(f"{lr:g}: {_fmt(r)}" for lr, r in row)
        lines.append(f"| {name} | {orc:.4g} ({label}) | {cells} | {lr_best:g} | {best:.2f} |")
    lines += ["", "## cooldown: at the tuned LR, a linear cooldown to 0 over the last 10% or "
              "20% of the steps, over the bare run (final validation loss, per seed)", "",
              "| task | tuned LR | cooldown | ratio per seed | median | worst | "
              f"within the tuned aim (<= {TUNED_MEDIAN}, <= {TUNED_WORST}) |",
              "|---|---|---|---|---|---|---|"]
    for name in tasks:
        bare = final_losses(results, name, "constant", lrs[name])
        for c in COOLDOWNS:
            got = final_losses(results, name, c, lrs[name])
            ratios = [got[s] / bare[s] for s in sorted(bare) if s in got]
            med, worst = statistics.median(ratios), max(ratios)
            ok = med <= TUNED_MEDIAN and worst <= TUNED_WORST
            lines.append(f"| {name} | {lrs[name]:g} | last {c.removeprefix('cooldown')}% | "
                         f"{', '.join(_fmt(r) for r in ratios)} | {_fmt(med)} | "
                         f"{_fmt(worst)} | {'yes' if ok else 'no'} |")
    return lines


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.3f}" if x < 10 else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds of the cooldown runs")
    ap.add_argument("--tasks", help="comma-separated; default every task without a schedule")
    ap.add_argument("--steps", type=int, help="override every task's quick budget")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", default=str(RESULTS / "quality-runs.json"),
                    help="the quality runs: the oracle, the tuned LRs, bare runs to reuse")
    ap.add_argument("--out", help="write the tables (Markdown) here; default: print only")
    args = ap.parse_args(argv)
    tasks = {n: t for n, t in load_tasks().items() if t.schedule is None}
    if args.tasks:
        tasks = {n: tasks[n] for n in args.tasks.split(",")}
    base = [RunResult.from_dict(d) for d in json.loads(Path(args.runs).read_text())["runs"]]
    lrs = tuned_lrs(tasks, Path(args.runs))
    plan = specs(tasks, lrs, args.seeds, args.steps)
    have = {r.spec.key: r for r in base}
    reused = [have[s.key] for s in plan if s.key in have]
    todo = [s for s in plan if s.key not in have]
    t0 = time.perf_counter()
    results = reused + bench_run.execute(todo, {}, args.workers, print)
    lines = report(results, base, tasks, lrs)
    head = [f"# bench.ceiling: {bench_run._machine()}", "",
            f"`python -m bench.ceiling --seeds {args.seeds}"
            f"{f' --steps {args.steps}' if args.steps else ''}`: {len(todo)} runs made in "
            f"{time.perf_counter() - t0:.0f} s with {args.workers} worker(s), {len(reused)} "
            f"taken from {Path(args.runs).name}; {bench_run._versions()}.", ""]
    bench_run.publish("\n".join(head + lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
