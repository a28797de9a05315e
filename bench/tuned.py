"""Do no harm, and rescue a run started too hot: the ``tuned`` and ``hot`` scenarios.

``tuned``: every task at its tuned LR with its usual schedule (the GPT tasks' warm-up +
cosine, applied by the loop, ``LambdaLR`` or ``OneCycleLR``; a constant LR elsewhere),
bare (contender ``constant``) and attached to a live ``trimtab serve`` with its default
policy set (contender ``trimtab``), over ``--seeds`` seeds: the ratio attached / bare of
the final validation loss per seed. The aim: median <= 1.01 and worst <= 1.03 on every
task. The tuned LR is the bare run's best point of the task's LR grid in the committed
quality runs (``bench/results/quality-runs.json``), median over their seeds.

``hot``: the loop that writes its own schedule (``gpt_loop``), and the digits CNN's SGD
with momentum (a constant LR), started at 10x and 30x their tuned LR, attached: the final
loss over the tuned bare run's, per seed. The aim: within 1.25x, and no divergence. The
bare hot runs are printed beside them.

trimtab runs in lockstep with the controller (the benchmark's harness, never the
library's), so they repeat exactly.

    python -m bench.tuned --seeds 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from bench import run as bench_run
from bench._serve import Controller
from bench.loop import RunResult, RunSpec
from bench.tasks import load_tasks

__all__ = ["main", "tuned_lrs", "specs", "final_losses"]

RESULTS = Path(__file__).resolve().parent / "results"
HOT_TASKS = ("gpt_loop", "digits_cnn")
HOT_FACTORS = (10.0, 30.0)
#: The aims the scenario is held to.
TUNED_MEDIAN, TUNED_WORST, HOT_WORST = 1.01, 1.03, 1.25


def tuned_lrs(tasks, runs_file: Path) -> dict[str, float]:
    """Each task's tuned LR: the bare run's best LR-grid point in ``runs_file``."""
    results = [RunResult.from_dict(d) for d in json.loads(runs_file.read_text())["runs"]]
    out = {}
    for name, task in tasks.items():
        width = task.widths[0] if task.widths else None
        lr, _ = bench_run.best_lr(results, task, "constant", width)
        if lr is None:
            raise SystemExit(f"bench.tuned: no bare runs of {name} in {runs_file}")
        out[name] = lr
    return out


def specs(tasks, lrs: dict[str, float], seeds: int, steps: int | None) -> list[RunSpec]:
    """The tuned pairs of every task, and the hot runs of :data:`HOT_TASKS`."""
    out = []
    for name, task in tasks.items():
        n = steps or task.steps["quick"]
        width = task.widths[0] if task.widths else None
        for s in range(seeds):
            out += [RunSpec(name, c, lrs[name], s, n, width) for c in ("constant", "trimtab")]
    for hot in (t for t in HOT_TASKS if t in tasks):
        task = tasks[hot]
        n = steps or task.steps["quick"]
        width = task.widths[0] if task.widths else None
        for f in HOT_FACTORS:
            for s in range(seeds):
                out += [RunSpec(hot, c, lrs[hot] * f, s, n, width)
                        for c in ("constant", "trimtab")]
    return out


def final_losses(results: list[RunResult], task: str, contender: str,
                 lr: float) -> dict[int, float]:
    """Final validation loss per seed of ``contender``'s runs of ``task`` at ``lr``."""
    return {r.spec.seed: r.final_val for r in results
            if (r.spec.task, r.spec.contender) == (task, contender)
            and math.isclose(r.spec.lr, lr, rel_tol=1e-9)}


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.3f}"


def report(results: list[RunResult], tasks, lrs: dict[str, float]) -> tuple[list[str], bool]:
    """The two tables, and whether every aim was met."""
    lines = ["## tuned: attached / bare at the tuned LR (final validation loss, per seed)", "",
             "| task | tuned LR | bare (median) | attached (median) | ratio per seed | median "
             "| worst | aim met |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for name in tasks:
        bare = final_losses(results, name, "constant", lrs[name])
        att = final_losses(results, name, "trimtab", lrs[name])
        ratios = [att[s] / bare[s] for s in sorted(bare) if s in att]
        med, worst = statistics.median(ratios), max(ratios)
        met = med <= TUNED_MEDIAN and worst <= TUNED_WORST
        ok &= met
        lines.append(f"| {name} | {lrs[name]:g} | {statistics.median(bare.values()):.4f} | "
                     f"{statistics.median(att.values()):.4f} | "
                     f"{', '.join(f'{r:.3f}' for r in ratios)} | {med:.3f} | {worst:.3f} | "
                     f"{'yes' if met else 'no'} |")
    for hot in (t for t in HOT_TASKS if t in tasks):
        lr = lrs[hot]
        ref = final_losses(results, hot, "constant", lr)
        lines += ["", f"## hot: {hot} started at 10x and 30x its tuned LR {lr:g}, over the "
                  "tuned bare run (final validation loss, per seed)", "",
                  "| start | contender | ratio per seed | median | worst | diverged | aim met |",
                  "|---|---|---|---|---|---|---|"]
        for f in HOT_FACTORS:
            for c in ("constant", "trimtab"):
                got = final_losses(results, hot, c, lr * f)
                ratios = [got[s] / ref[s] for s in sorted(ref) if s in got]
                # Diverged as the quality benchmark counts it: non-finite, or above the
                # run's own initial validation loss.
                div = sum(1 for r in results if (r.spec.task, r.spec.contender) == (hot, c)
                          and math.isclose(r.spec.lr, lr * f, rel_tol=1e-9) and r.diverged)
                worst = max(ratios)
                met = worst <= HOT_WORST and div == 0
                if c == "trimtab":
                    ok &= met
                lines.append(f"| {f:g}x | {'bare' if c == 'constant' else 'trimtab'} | "
                             f"{', '.join(_fmt(r) for r in ratios)} | "
                             f"{_fmt(statistics.median(ratios))} | {_fmt(worst)} | {div} | "
                             f"{('yes' if met else 'no') if c == 'trimtab' else ''} |")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--tasks", help="comma-separated; default all")
    ap.add_argument("--steps", type=int, help="override every task's quick budget")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trimtab-config", help="TOML for trimtab serve (default: its defaults)")
    ap.add_argument("--runs", default=str(RESULTS / "quality-runs.json"),
                    help="runs file the tuned LRs are read from")
    ap.add_argument("--out", help="write the tables (Markdown) here; default: print only")
    args = ap.parse_args(argv)
    tasks = load_tasks()
    if args.tasks:
        tasks = {n: tasks[n] for n in args.tasks.split(",")}
    lrs = tuned_lrs(tasks, Path(args.runs))
    plan = specs(tasks, lrs, args.seeds, args.steps)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp, args.trimtab_config)
        try:
            results = bench_run.execute(plan, {"trimtab": (ctl.endpoint, ctl.journal)},
                                        args.workers, print)
        finally:
            ctl.stop()
    lines, ok = report(results, tasks, lrs)
    head = [f"# bench.tuned: {bench_run._machine()}; {len(plan)} runs in "
            f"{time.perf_counter() - t0:.0f} s; seeds 0..{args.seeds - 1}; trimtab config: "
            f"{args.trimtab_config or 'defaults'}", ""]
    bench_run.publish("\n".join(head + lines), args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
