"""Control-quality benchmark: every contender on every task, seed and starting LR.

    python -m bench run --quick                       # < 15 min on 2 cores, 2 seeds
    python -m bench run --full                        # more steps, 5 seeds, all faults
    python -m bench run --quick --scenarios lr,target --tasks digits_cnn --seeds 1
    python -m bench run --quick --trimtab-set spike=+spike_guard   # a candidate set

Scenarios (all runs share one pool of independent runs, deduplicated):

- ``lr``: LR robustness. Each contender at each starting LR of the task's grid (five
  points over four decades); per contender the best, median and worst final validation
  loss relative to the task's oracle, and the runs that diverged.
- ``target``: time to target. From the same runs: iterations to reach the task's target
  validation loss at the reference (grid-centre) LR and at the contender's best LR.
- ``scale``: the width sweep. Each contender at the LR that was its best at the smallest
  width, run at every width; the ratio to each width's own oracle.
- ``faults``: fault recovery (:mod:`bench.recovery`). Each contender at the task's
  reference LR meets the same fault at the same iteration; recovered fraction, iterations
  redone, iterations until back near the unfaulted run, final-loss ratio to it.
- ``overhead``: the client's cost (:mod:`bench.overhead`): step time attached vs bare on
  three models, run after the training runs, with the machine otherwise idle.
- ``capacity``: one controller under N simulated jobs (:mod:`bench.capacity`): reports/s
  handled, heartbeat and report->command latency, CPU and memory per job, the largest N
  with p99 under 10 ms. Sizes per mode: :data:`SYSTEM_SIZES`.

The oracle of a task (and width) is the best median-over-seeds final validation loss of
the hand-tuned schedules (warmup_cosine, step_decay) over a half-decade LR grid spanning
the same four decades. trimtab runs against one live ``trimtab serve`` subprocess with
its default configuration, started for the whole benchmark; each ``--trimtab-set`` runs
as the contender ``trimtab:NAME`` against its own controller (:mod:`bench.trimtab_sets`).

Lockstep (on unless ``--no-lockstep``): after every report a trimtab run waits until the
controller has answered it (:mod:`bench._lockstep`), so its commands apply at the same
step on a quiet or a loaded machine and a seed repeats exactly. The library never waits:
this is the benchmark's harness only, and it is what a run whose steps take longer than
the controller's reply (milliseconds) sees anyway. Without it trimtab runs are not
bit-repeatable: a command lands at whichever step follows its arrival.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from bench import contenders, recovery, trimtab_sets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib
from bench._serve import Controller
from bench.loop import RunResult, RunSpec
from bench.tasks import Task, load_tasks

__all__ = ["main", "plan", "execute", "report"]

#: Scenarios made of training runs (one shared pool of runs).
QUALITY = ("lr", "target", "scale", "faults")
#: Scenarios that measure trimtab itself, run after the pool (the machine otherwise idle).
SYSTEM = ("overhead", "capacity")
SCENARIOS = QUALITY + SYSTEM
RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"quick": {"seeds": 2}, "full": {"seeds": 5}}
#: The system scenarios' sizes: client overhead (:mod:`bench.overhead`, on the CPU) and
#: controller capacity (:mod:`bench.capacity`, 2 reports/s per job, 2 generator processes).
SYSTEM_SIZES = {
    "quick": {"overhead": {"models": ["mlp", "transformer", "wide_mlp"], "repeats": 5,
                           "steps": 60, "warmup": 10},
              "capacity": {"jobs": [1, 10, 50], "seconds": 5.0}},
    "full": {"overhead": {"models": ["mlp", "transformer", "wide_mlp"], "repeats": 20,
                          "steps": 100, "warmup": 20},
             "capacity": {"jobs": [1, 10, 20, 50, 100, 200, 400], "seconds": 10.0}},
}
#: Rough cost of one step, relative, to start the slowest runs first.
_COST = {"char_transformer": 30.0, "gpt_loop": 30.0, "gpt_lambda": 30.0, "gpt_onecycle": 30.0,
         "digits_cnn": 6.0, "width_mlp": 1.5, "noisy_quadratic": 0.5}


# ---------------------------------------------------------------- planning


def _steps(task: Task, mode: str, override: int | None) -> int:
    return override or task.steps[mode]


def grid_specs(task: Task, names: Iterable[str], seeds: int, steps: int,
               width: int | None) -> list[RunSpec]:
    """Each contender over the LR grid, and the oracle's schedules over its finer grid."""
    specs = [RunSpec(task.name, c, lr, s, steps, width)
             for c in names if contenders.get(c).applies_to(task)
             for lr in task.lr_grid for s in range(seeds)]
    specs += [RunSpec(task.name, c, lr, s, steps, width) for c in contenders.ORACLE_SCHEDULES
              for lr in task.oracle_grid for s in range(seeds)]
    return specs


def plan(tasks: dict[str, Task], names: list[str], scenarios: list[str], seeds: int,
         mode: str, steps: int | None, faults: tuple[str, ...] = ()) -> list[RunSpec]:
    """Phase-one runs: every task's grid (at its smallest width), every width's oracle,
    and the fault scenario's clean and faulted runs."""
    specs: list[RunSpec] = []
    for task in tasks.values():
        n = _steps(task, mode, steps)
        small = task.widths[0] if task.widths else None
        if {"lr", "target"} & set(scenarios) or ("scale" in scenarios and task.widths):
            specs += grid_specs(task, names, seeds, n, small)
        if "scale" in scenarios:
            for w in task.widths[1:]:
                specs += grid_specs(task, [], seeds, n, w)
        if "faults" in scenarios and task.name in recovery.FAULT_TASKS:
            specs += recovery.fault_specs(task, names, faults, seeds, n)
    return _dedupe(specs)


def scale_specs(tasks: dict[str, Task], names: list[str], results: list[RunResult],
                seeds: int) -> list[RunSpec]:
    """Phase two: each contender at its best smallest-width LR, at the other widths."""
    specs = []
    for task in tasks.values():
        if not task.widths:
            continue
        for c in names:
            lr, steps = best_lr(results, task, c, task.widths[0])
            if lr is not None:
                specs += [RunSpec(task.name, c, lr, s, steps, w)
                          for w in task.widths[1:] for s in range(seeds)]
    return _dedupe(specs)


def _dedupe(specs: list[RunSpec]) -> list[RunSpec]:
    return list({s.key: s for s in specs}.values())


# ---------------------------------------------------------------- running


#: contender -> (endpoint, journal or None): where its controller listens; the journal
#: puts its runs in lockstep.
_LINKS: dict[str, tuple[str, str | None]] = {}


def _init_worker(links: dict[str, tuple[str, str | None]], threads: int) -> None:
    import torch

    contenders.quiet_environment()
    torch.set_num_threads(threads)
    _LINKS.clear()
    _LINKS.update(links)


def _run_one(spec: RunSpec) -> dict:
    from bench.loop import train

    task = load_tasks()[spec.task]
    endpoint, journal = _LINKS.get(spec.contender, (None, None))
    return train(task, spec, endpoint, journal).to_dict()


def execute(specs: list[RunSpec], links: dict[str, tuple[str, str | None]], workers: int,
            log=lambda msg: None) -> list[RunResult]:
    """Run every spec: in ``workers`` spawned processes, or here with ``workers=1``; one
    torch thread each either way (on 2 shared cores, 2 threads per run were 20x slower
    for these small models: the threads spin waiting for each other). ``links`` maps a
    trimtab contender to its controller's (endpoint, journal for lockstep or None)."""
    order = sorted(specs, key=lambda s: -_COST.get(s.task, 1.0) * s.steps)
    out: list[RunResult] = []
    t0 = time.perf_counter()

    def done(d: dict) -> None:
        out.append(RunResult.from_dict(d))
        if len(out) % 25 == 0 or len(out) == len(order):
            log(f"  {len(out)}/{len(order)} runs, {time.perf_counter() - t0:.0f} s")

    if workers <= 1:
        _init_worker(links, 1)
        for spec in order:
            done(_run_one(spec))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (links, 1)) as pool:
            for d in pool.imap_unordered(_run_one, order, chunksize=1):
                done(d)
    return out


# ---------------------------------------------------------------- analysis


def _select(results, task, contender=None, width=None, lr=None):
    return [r for r in results if r.spec.task == task and r.spec.width == width
            and r.spec.fault is None
            and (contender is None or r.spec.contender == contender)
            and (lr is None or r.spec.lr == lr)]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def oracle(results: list[RunResult], task: Task, width: int | None) -> tuple[float, str]:
    """Best median-over-seeds final loss of the oracle schedules over the oracle grid."""
    best, label = math.inf, "none"
    for c in contenders.ORACLE_SCHEDULES:
        for lr in task.oracle_grid:
            runs = _select(results, task.name, c, width, lr)
            if runs:
                v = _median([r.final_val for r in runs])
                if v < best:
                    best, label = v, f"{c} @ lr {lr:g}"
    return best, label


def best_lr(results, task: Task, contender: str, width) -> tuple[float | None, int]:
    """The LR-grid point with the best median final loss for ``contender`` (and the run's
    steps); the oracle's finer grid is not used, so every contender picks from the same LRs."""
    by_lr = defaultdict(list)
    for r in _select(results, task.name, contender, width):
        if r.spec.lr in task.lr_grid:
            by_lr[r.spec.lr].append(r)
    if not by_lr:
        return None, 0
    lr = min(by_lr, key=lambda k: (_median([r.final_val for r in by_lr[k]]), k))
    return lr, by_lr[lr][0].spec.steps


def _ratio(v: float, ref: float) -> float:
    return v / ref if math.isfinite(v) and ref > 0 else math.inf


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "diverged"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def lr_table(results, task: Task, names: list[str]) -> tuple[list[str], dict]:
    width = task.widths[0] if task.widths else None
    ref, label = oracle(results, task, width)
    rows, stats = [], {}
    for c in names:
        runs = [r for r in _select(results, task.name, c, width) if r.spec.lr in task.lr_grid]
        if not runs:
            continue
        ratios = [_ratio(r.final_val, ref) for r in runs]
        by_lr = defaultdict(list)
        for r in runs:
            by_lr[r.spec.lr].append(_ratio(r.final_val, ref))
        best = min(_median(v) for v in by_lr.values())
        stats[c] = (best, _median(ratios), max(ratios), sum(r.diverged for r in runs), len(runs))
    tt = stats.get("trimtab")
    for c, (best, med, worst, div, n) in stats.items():
        vs = ""
        if tt and c != "trimtab":
            vs = ("beats trimtab" if med < tt[1] * 0.99 else
                  "loses to trimtab" if med > tt[1] * 1.01 else "ties")
        rows.append(f"| {c} | {_fmt(best)} | {_fmt(med)} | {_fmt(worst)} | {div}/{n} | {vs} |")
    w = f", width {width}" if width else ""
    head = [f"### {task.name}{w}: final validation loss / oracle over starting LRs "
            f"{', '.join(f'{x:g}' for x in task.lr_grid)}",
            "",
            f"Oracle: {ref:.4g} ({label}).",
            "",
            "| contender | at its best LR | median | worst | diverged | median vs trimtab |",
            "|---|---|---|---|---|---|"]
    return head + rows, stats


def target_table(results, task: Task, names: list[str]) -> list[str]:
    width = task.widths[0] if task.widths else None
    mid = task.lr_grid[len(task.lr_grid) // 2]
    rows = []
    for c in list(names) + [n for n in contenders.ORACLE_SCHEDULES if n not in names]:
        runs = [r for r in _select(results, task.name, c, width) if r.spec.lr in task.lr_grid]
        if not runs:
            continue
        at_mid = [r.steps_to(task.target) for r in runs if r.spec.lr == mid]
        reached = [s for s in (r.steps_to(task.target) for r in runs) if s is not None]
        by_lr = defaultdict(list)
        for r in runs:
            by_lr[r.spec.lr].append(r.steps_to(task.target))
        best = [max(v) for v in by_lr.values() if all(s is not None for s in v)]
        mid_s = (_fmt(_median([float(s) for s in at_mid])) if at_mid and None not in at_mid
                 else "not reached")
        rows.append(f"| {c} | {mid_s} | {min(best) if best else 'not reached'} | "
                    f"{len(reached)}/{len(runs)} |")
    w = f", width {width}" if width else ""
    steps = runs[0].spec.steps if rows else 0
    return [f"### {task.name}{w}: iterations to validation loss <= {task.target:g} "
            f"(budget {steps}, evaluated every {max(1, steps // task.evals)})",
            "",
            f"| contender | at the reference LR {mid:g} | at its best LR | runs that reached it |",
            "|---|---|---|---|", *rows]


def scale_table(results, task: Task, names: list[str]) -> list[str]:
    refs = {w: oracle(results, task, w) for w in task.widths}
    params = {w: next((r.n_params for r in _select(results, task.name, width=w)), 0)
              for w in task.widths}
    head = [f"### {task.name}: final validation loss / that width's oracle, each contender "
            f"at its best LR at width {task.widths[0]}",
            "",
            "| contender | LR | " + " | ".join(f"w={w} ({params[w] / 1e3:.1f}k)"
                                             for w in task.widths) + " | worst |",
            "|---|---|" + "---|" * (len(task.widths) + 1)]
    rows = []
    for c in names:
        lr, _ = best_lr(results, task, c, task.widths[0])
        if lr is None:
            continue
        cells = [_ratio(_median([r.final_val for r in _select(results, task.name, c, w, lr)]),
                        refs[w][0]) for w in task.widths]
        rows.append(f"| {c} | {lr:g} | " + " | ".join(_fmt(x) for x in cells)
                    + f" | {_fmt(max(cells))} |")
    oracle_row = ("| oracle (per width) | — | "
                  + " | ".join(f"{refs[w][0]:.3g} ({refs[w][1]})" for w in task.widths)
                  + " | — |")
    return head + rows + [oracle_row]


# ---------------------------------------------------------------- output


def publish(text: str, out: str | None) -> None:
    """Print a benchmark's report, and write it to ``out`` (Markdown) when given."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "numpy", "scikit-learn", "schedulefree", "prodigyopt", "zclip",
                "torch-lr-finder", "matplotlib", "trimtab"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus ({cpu}){mem}"


def report(results, tasks, names, scenarios) -> tuple[str, dict]:
    """The Markdown tables, and the per-task LR-robustness stats."""
    lines: list[str] = []
    stats: dict = {}
    if "lr" in scenarios:
        lines += ["## LR robustness", ""]
        for task in tasks.values():
            table, stats[task.name] = lr_table(results, task, names)
            lines += table + [""]
        lines += summary(stats, names) + [""]
    if "target" in scenarios:
        lines += ["## Time to target", ""]
        for task in tasks.values():
            lines += target_table(results, task, names) + [""]
    if "scale" in scenarios:
        for task in tasks.values():
            if task.widths:
                lines += ["## Scale", ""] + scale_table(results, task, names) + [""]
    kinds = fault_kinds(results)
    if "faults" in scenarios and kinds:
        lines += ["## Fault recovery", "", *recovery.describe_faults(kinds), ""]
        for task in tasks.values():
            if task.name in recovery.FAULT_TASKS:
                lines += recovery.fault_table(results, task, names, kinds) + [""]
    return "\n".join(lines), stats


def system_sections(scenarios: list[str], mode: str, log) -> dict[str, str]:
    """Run the system scenarios asked for; their printed tables by scenario."""
    out: dict[str, str] = {}
    if "overhead" in scenarios:
        from bench import overhead

        o = SYSTEM_SIZES[mode]["overhead"]
        log(f"bench: overhead, {len(o['models'])} models x {o['repeats']} pairs")
        rows = overhead.measure(o["models"], o["repeats"], o["steps"], o["warmup"], 10, "cpu",
                                0, log)
        out["overhead"] = overhead.format_table(rows, o["repeats"], o["steps"], o["warmup"],
                                                10, "cpu", 0)
    if "capacity" in scenarios:
        from bench import capacity

        c = SYSTEM_SIZES[mode]["capacity"]
        log(f"bench: capacity, N = {c['jobs']}")
        rows = capacity.run_sweep(c["jobs"], 2.0, c["seconds"], 2, capacity.SEED, log)
        out["capacity"] = capacity.format_report(
            rows, capacity.header(c["jobs"], 2.0, c["seconds"], 2, capacity.SEED))
    return out


def system_report(sections: dict[str, str]) -> str:
    """The system scenarios' sections, their tables as printed."""
    lines: list[str] = []
    if "overhead" in sections:
        lines += ["## Client overhead", "",
                  "Step time attached to a live `trimtab serve` (default policies) over bare, "
                  "bare and attached runs alternating; the median over pairs "
                  "(`bench/overhead.py`; longer runs and CUDA: [overhead.md](overhead.md)).",
                  "", "```", sections["overhead"], "```", ""]
    if "capacity" in sections:
        lines += ["## Controller capacity", "",
                  "Simulated jobs in 2 generator processes on the same machine, against one "
                  "controller on loopback, unpinned (`bench/capacity.py`; up to 400 jobs, and "
                  "pinned: "
                  "[capacity.md](capacity.md)).", "", "```", sections["capacity"], "```", ""]
    return "\n".join(lines)


def fault_kinds(results: list[RunResult]) -> tuple[str, ...]:
    """The faults present in ``results``, in :data:`bench.faults.FAULTS` order."""
    from bench.faults import FAULTS

    have = {r.spec.fault for r in results}
    return tuple(k for k in FAULTS if k in have)


def summary(stats: dict, names: list[str]) -> list[str]:
    tasks = list(stats)
    head = ["### Summary: median (worst) ratio to the oracle per task; diverged runs in all",
            "",
            "| contender | " + " | ".join(tasks) + " | diverged |",
            "|---|" + "---|" * (len(tasks) + 1)]
    rows = []
    for c in names:
        cells, div, n = [], 0, 0
        for t in tasks:
            s = stats[t].get(c)
            if s is None:
                cells.append("n/a")
                continue
            cells.append(f"{_fmt(s[1])} ({_fmt(s[2])})")
            div, n = div + s[3], n + s[4]
        rows.append(f"| {c} | " + " | ".join(cells) + f" | {div}/{n} |")
    return head + rows


def plots(results, tasks, names, out: Path, name: str = "quality") -> list[Path]:
    """Final validation loss vs starting LR per contender, one PNG per task; and the
    width sweep's ratio to oracle vs parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for task in tasks.values():
        width = task.widths[0] if task.widths else None
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ref, _ = oracle(results, task, width)
        top = 0.0
        for c in names:
            runs = _select(results, task.name, c, width)
            lrs = sorted({r.spec.lr for r in runs if r.spec.lr in task.lr_grid})
            if not lrs:
                continue
            ys = [_median([r.final_val for r in runs if r.spec.lr == lr]) for lr in lrs]
            top = max([top] + [y for y in ys if math.isfinite(y)])
            style = dict(lw=2.5, color="black") if c == "trimtab" else dict(lw=1.2)
            ax.plot(lrs, [y if math.isfinite(y) else math.nan for y in ys], "o-", label=c,
                    **style)
            bad = [lr for lr, y in zip(lrs, ys, strict=True) if not math.isfinite(y)]
            if bad:
                ax.plot(bad, [top * 1.5] * len(bad), "x", color=ax.lines[-1].get_color(), ms=9)
        if math.isfinite(ref):
            ax.axhline(ref, color="grey", ls="--", label="oracle")
        made.append(_finish(plt, fig, ax, out / f"{name}_lr_{task.name}.png",
                            "starting LR (Prodigy: x / ref LR as its lr)",
                            "final validation loss (median over seeds; x = diverged)",
                            f"{task.name}: final validation loss vs starting LR"))
        if task.widths and any(r.spec.width == task.widths[-1] for r in results):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for c in names:
                lr, _ = best_lr(results, task, c, task.widths[0])
                if lr is None:
                    continue
                xs, ys = [], []
                for w in task.widths:
                    runs = _select(results, task.name, c, w, lr)
                    if runs:
                        xs.append(runs[0].n_params)
                        ys.append(_ratio(_median([r.final_val for r in runs]),
                                         oracle(results, task, w)[0]))
                style = dict(lw=2.5, color="black") if c == "trimtab" else dict(lw=1.2)
                ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], "o-", label=c,
                        **style)
            ax.axhline(1.0, color="grey", ls="--")
            made.append(_finish(plt, fig, ax, out / f"{name}_scale_{task.name}.png",
                                "parameters", "final val loss / that width's oracle",
                                f"{task.name}: LR tuned at the smallest width, carried over"))
    return made


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Log-log axes, labels, legend; save ``fig`` to ``path`` and close it."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Tasks trained on the standard-library text (its SHA-256 goes with the settings).
_STDLIB_TEXT = ("char_transformer", "gpt_lambda", "gpt_loop", "gpt_onecycle")


def settings_section(tasks, names, seeds, mode, steps=None) -> list[str]:
    from bench.tasks.char_transformer import corpus

    lines = ["## Settings", "", "| task | family | steps | LR grid | target | what |",
             "|---|---|---|---|---|---|"]
    for t in tasks.values():
        lines.append(f"| {t.name} | {t.family} | {_steps(t, mode, steps)} | "
                     f"{', '.join(f'{x:g}' for x in t.lr_grid)} | {t.target:g} | "
                     f"{t.description} |")
    lines += ["", "| contender | exact settings |", "|---|---|"]
    lines += [f"| {c} | {contenders.get(c).settings} |" for c in names]
    scheduled = [t.name for t in tasks.values() if t.schedule is not None]
    if scheduled:
        shown = dict.fromkeys([*names, *contenders.ORACLE_SCHEDULES])
        owners = [c for c in shown if contenders.get(c).owns_schedule]
        lines += ["", f"{', '.join(scheduled)} come with the user's own LR schedule (the "
                  "table above). Contenders that replace it with their own: "
                  f"{', '.join(owners) or 'none'}; every other contender keeps it, its "
                  "starting LR as the schedule's peak."]
    text = [n for n in _STDLIB_TEXT if n in tasks]
    if text:
        lines += ["", f"{', '.join(text)} text sha256: {corpus()[2]}"]
    return lines


def _controllers(tmp: str, args, names: list[str], sets: dict,
                 steps: dict[str, int]) -> dict[str, Controller]:
    """One live controller per trimtab contender: the default configuration (or
    ``--trimtab-config``) for ``trimtab``, exactly its policies for each candidate set
    (``steps``: each task's budget, for ``{steps}`` settings)."""
    ctls: dict[str, Controller] = {}
    try:
        for c in names:
            if not contenders.is_trimtab(c):
                continue
            d = Path(tmp) / c.replace(":", "_")
            d.mkdir()
            config = args.trimtab_config
            items = sets.get(c)
            if items is None and config is None:  # the default set, fitted to each budget
                items = trimtab_sets.default_items()
            if items is not None:
                base = (tomllib.loads(Path(config).read_text()) if config else None)
                config = str(d / "trimtab.toml")
                Path(config).write_text(trimtab_sets.to_toml(items, steps, base))
            ctls[c] = Controller(str(d), config)
    except BaseException:
        for ctl in ctls.values():
            ctl.stop()
        raise
    return ctls


def _run_all(args, tasks, names, scenarios, seeds, log, sets=None) -> list[RunResult]:
    kinds = recovery.MODE_FAULTS[args.mode] if args.faults is None else args.faults
    reuse: dict[tuple, RunResult] = {}
    if args.reuse:
        for d in json.loads(Path(args.reuse).read_text())["runs"]:
            r = RunResult.from_dict(d)
            reuse[r.spec.key] = r
    with tempfile.TemporaryDirectory() as tmp:
        budgets = {n: _steps(t, args.mode, args.steps) for n, t in tasks.items()}
        ctls = _controllers(tmp, args, names, sets or {}, budgets)
        links = {c: (ctl.endpoint, ctl.journal if args.lockstep else None)
                 for c, ctl in ctls.items()}
        try:
            specs = plan(tasks, names, scenarios, seeds, args.mode, args.steps, kinds)
            results = [reuse[s.key] for s in specs if s.key in reuse]
            specs = [s for s in specs if s.key not in reuse]
            log(f"bench: {len(specs)} runs ({args.mode}, seeds 0..{seeds - 1}, "
                f"{args.workers} workers)" + (f", {len(results)} reused" if reuse else ""))
            results += execute(specs, links, args.workers, log)
            if "scale" in scenarios:
                more = scale_specs(tasks, names, results, seeds)
                have = {r.spec.key for r in results}
                more = [s for s in more if s.key not in have]
                results += [reuse[s.key] for s in more if s.key in reuse]
                more = [s for s in more if s.key not in reuse]
                log(f"bench: scale, {len(more)} more runs")
                results += execute(more, links, args.workers, log)
        finally:
            for ctl in ctls.values():
                ctl.stop()
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench run", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--tasks", default=None, help="comma-separated; default all")
    ap.add_argument("--contenders", default=None, help="comma-separated; default all")
    ap.add_argument("--seeds", type=int, default=None, help="quick 2, full 5")
    ap.add_argument("--steps", type=int, default=None, help="override every task's budget")
    ap.add_argument("--faults", default=None,
                    help="comma-separated faults for the faults scenario; quick: "
                         f"{','.join(recovery.MODE_FAULTS['quick'])}, full: all")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes of one thread each; 1 = in this process")
    ap.add_argument("--trimtab-config", default=None,
                    help="TOML for trimtab serve (candidate sets: all but its policies)")
    ap.add_argument("--trimtab-set", action="append", default=[], metavar="NAME=POLICIES",
                    help="an extra contender trimtab:NAME running these policies, e.g. "
                         "spike=+spike_guard ('+': the default set plus); repeatable")
    ap.add_argument("--no-lockstep", dest="lockstep", action="store_false",
                    help="let trimtab's commands arrive asynchronously (not repeatable)")
    ap.add_argument("--reuse", default=None, metavar="RUNS_JSON",
                    help="take runs with the same settings from this runs file, not again")
    ap.add_argument("--name", default="quality",
                    help="results file stem: NAME.md, NAME-runs.json, NAME_*.png")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", default=None, metavar="RUNS_JSON",
                    help="re-render tables and plots from a runs file; runs nothing")
    return ap


def _names(ap, args) -> tuple[list[str], dict]:
    """The contenders to run and the candidate sets among them (name -> policies)."""
    names = args.contenders.split(",") if args.contenders else list(contenders.CONTENDERS)
    sets = {}
    for text in args.trimtab_set:
        try:
            name, items = trimtab_sets.parse_set(text)
        except ValueError as e:
            ap.error(str(e))
        c = contenders.trimtab_set(name, trimtab_sets.describe(items))
        if c.name in sets:
            ap.error(f"--trimtab-set {text!r}: the name {name!r} is given twice")
        sets[c.name] = items
        names.append(c.name)
    for n in names:
        try:
            contenders.get(n)
        except ValueError as e:
            ap.error(f"--contenders: {e}")
    return names, sets


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.mode = args.mode or "quick"
    scenarios = args.scenarios.split(",")
    bad = set(scenarios) - set(SCENARIOS)
    if bad:
        ap.error(f"--scenarios: unknown scenario(s) {sorted(bad)}; known: "
                 f"{', '.join(SCENARIOS)}")
    if args.faults is not None:
        from bench.faults import FAULTS

        args.faults = tuple(args.faults.split(","))
        wrong = [k for k in args.faults if k not in FAULTS]
        if wrong:
            ap.error(f"--faults: unknown fault(s) {wrong}; known: {', '.join(FAULTS)}")
    all_tasks = load_tasks()
    try:
        tasks = ({n: all_tasks[n] for n in args.tasks.split(",")} if args.tasks
                 else all_tasks)
    except KeyError as e:
        ap.error(f"--tasks: unknown task {e}; known: {', '.join(all_tasks)}")
    names, sets = _names(ap, args)
    seeds = args.seeds or MODES[args.mode]["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lockstep = "on" if args.lockstep else "off"
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = [RunResult.from_dict(d) for d in saved["runs"]]
        wall, started = saved["wall_s"], saved.get("started", started)
        lockstep = saved.get("lockstep", "off")
        for c, items in saved.get("trimtab_sets", {}).items():
            if c not in names:  # the candidate sets the runs were made with
                contenders.trimtab_set(c.split(":", 1)[1], trimtab_sets.describe(
                    [tuple(i) for i in items]))
                names.append(c)
        system = saved.get("system", {})
    else:
        results = (_run_all(args, tasks, names, scenarios, seeds, log, sets)
                   if set(QUALITY) & set(scenarios) else [])
        system = system_sections(scenarios, args.mode, log)
        wall = time.perf_counter() - t0
    cpu = sum(r.cpu_s for r in results if math.isfinite(r.cpu_s))
    text, _ = report(results, tasks, names, scenarios)
    text += system_report(system)
    cmd = "python -m bench " + " ".join(["run"] + (argv if argv is not None else sys.argv[2:]))
    if args.from_json:
        cmd = saved["command"]
        seeds = len({r.spec.seed for r in results})
    title = {"quality": "Control quality",
             "default-set": "trimtab's default policy set"}.get(args.name, args.name)
    header = [f"# {title} ({args.mode})", "",
              f"Command: `{cmd}`, {started}; wall time {wall:.0f} s with {args.workers} "
              f"worker(s), {len(results)} runs using {cpu:.0f} CPU-s in all (on an idle "
              f"machine about {cpu / max(1, args.workers):.0f} s of wall time).",
              f"Machine: {_machine()}.",
              f"Versions: {_versions()}.",
              f"Seeds: 0..{seeds - 1}. Scenarios: {', '.join(scenarios)}. Lockstep: "
              f"{lockstep} (see bench/run.py: with it on, trimtab runs repeat exactly).",
              "Ratios are final validation loss / the oracle's (1 = as good as the best "
              "hand-tuned schedule; below 1 beats it). *at its best LR* is the contender's best "
              "grid point (median over seeds); *median* and *worst* are over every grid "
              "point and seed; a run *diverged* if its final validation loss is non-finite "
              "or above its initial one.", ""]
    print("\n".join(header) + "\n" + text)
    made = (plots(results, tasks, names, out, args.name)
            if {"lr", "scale"} & set(scenarios) else [])
    if "faults" in scenarios:
        for task in tasks.values():
            for kind in fault_kinds(results)[:1]:
                path = recovery.fault_plot(results, task, kind, out, args.name)
                made += [path] if path else []
    md = "\n".join(header) + "\n" + text + "\n" + "\n".join(
        settings_section(tasks, names, seeds, args.mode, args.steps)) + "\n\nPlots: " + ", ".join(
        f"[{p.name}]({p.name})" for p in made) + "\n"
    (out / f"{args.name}.md").write_text(md)
    if not args.from_json:
        (out / f"{args.name}-runs.json").write_text(json.dumps(
            {"command": cmd, "started": started, "wall_s": wall, "lockstep": lockstep,
             "trimtab_sets": sets, "default_set": trimtab_sets.default_items(),
             "runs": [r.to_dict() for r in results],
             "system": system}))
    log(f"bench: wrote {out / (args.name + '.md')} and {len(made)} plots in {wall:.0f} s")
    return 0
