"""The ``faults`` scenario of ``python -m bench run``: fault recovery across every contender.

Every contender trains each fault task at the task's reference LR (the LR grid's centre)
once clean and once per fault and seed; the fault (:mod:`bench.faults`) starts at the same
iteration (``bench.loop.fault_start``: half the budget) and the same data position for
all of them. trimtab meets it attached to a live controller; the others meet it with
whatever their schedule, optimizer or clipping does. Per contender and fault:

- *recovered*: faulted runs whose final validation loss is finite and at most 10% above
  the same contender's unfaulted run of that seed (a seed whose unfaulted run diverged
  has no reference: it is counted apart);
- *redone*: iterations of the budget that did not advance the run (trimtab's rollbacks
  and skipped non-finite steps; 0 for contenders that never go back);
- *back within 10% after*: iterations from the fault's start to the first evaluation
  whose validation loss is within 10% of the unfaulted run's at that iteration
  (resolution: the evaluation interval; *never* if it did not come back);
- *final / unfaulted*: the final validation loss over the unfaulted run's (median and
  worst over seeds; *diverged* when non-finite).

Quick runs two faults, full all four (:data:`bench.faults.FAULTS`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bench import contenders, faults
from bench.loop import RunResult, RunSpec, fault_start
from bench.tasks import Task

__all__ = ["FAULT_TASKS", "MODE_FAULTS", "fault_specs", "recovery_delay", "fault_table",
           "fault_plot"]

#: The tasks the scenario runs on (when selected).
FAULT_TASKS = ("char_transformer", "digits_cnn", "gpt_lambda", "gpt_loop", "gpt_onecycle")
#: Faults per mode.
MODE_FAULTS = {"quick": ("scaled_inputs", "lr_100x"), "full": faults.FAULTS}
#: A faulted run is recovered within this relative distance of its unfaulted run.
WITHIN = 0.10
_WHAT = {
    "scaled_inputs": "poisoned batches: {n} batches with inputs x 1e3 (token inputs: "
                     "loss x 1e3)",
    "corrupt_targets": "corrupted labels: a burst of {n} batches with shuffled labels "
                       "(regression targets: noise x 1e3)",
    "nan_grad": "a NaN written into one gradient element, once",
    "lr_100x": "the user's code multiplies the LR (and its schedule's reference or peak LRs) "
               "by 100",
}


def reference_lr(task: Task) -> float:
    return task.lr_grid[len(task.lr_grid) // 2]


def fault_specs(task: Task, names: list[str], kinds: tuple[str, ...], seeds: int,
                steps: int) -> list[RunSpec]:
    """Each applicable contender at the reference LR: clean and with every fault."""
    lr = reference_lr(task)
    return [RunSpec(task.name, c, lr, s, steps, None, k)
            for c in names if contenders.get(c).applies_to(task)
            for k in (None, *kinds) for s in range(seeds)]


def recovery_delay(run: RunResult, clean: RunResult) -> int | None:
    """Iterations from the fault's start to the first evaluation within 10% of ``clean``."""
    at = fault_start(run.spec.steps)
    ref = dict(clean.curve)
    for it, v in run.curve:
        c = ref.get(it)
        if it >= at and c is not None and math.isfinite(v) and math.isfinite(c) \
                and v <= (1 + WITHIN) * c:
            return it - at
    return None


def _ratio(run: RunResult, clean: RunResult) -> float:
    ok = math.isfinite(run.final_val) and clean.final_val > 0
    return run.final_val / clean.final_val if ok else math.inf


def _fmt(x: float) -> str:
    return "diverged" if math.isinf(x) else f"{x:.3g}"


def _pairs(results: list[RunResult], task: str, contender: str, kind: str):
    by_key = {r.spec.key: r for r in results}
    for r in results:
        s = r.spec
        if s.task == task and s.contender == contender and s.fault == kind:
            clean = by_key.get(s.clean().key)
            if clean is not None:
                yield r, clean


def fault_stats(results, task: str, contender: str, kind: str) -> dict | None:
    """Recovered runs, iterations redone and lost, final ratios; pairs whose unfaulted run
    diverged (non-finite, or ended above its initial loss) have no reference and are only
    counted (``unfaulted_diverged``)."""
    pairs = sorted(_pairs(results, task, contender, kind), key=lambda p: p[0].spec.seed)
    if not pairs:
        return None
    bad = sum(c.diverged for _, c in pairs)
    pairs = [(r, c) for r, c in pairs if not c.diverged]
    if not pairs:
        return {"n": 0, "unfaulted_diverged": bad}
    ratios = [_ratio(r, c) for r, c in pairs]
    delays = [recovery_delay(r, c) for r, c in pairs]
    redone = [int(r.info.get("skipped_or_redone", 0)) for r, _ in pairs]
    return {"n": len(pairs), "unfaulted_diverged": bad,
            "recovered": sum(x <= 1 + WITHIN for x in ratios),
            "redone": statistics.median(redone),
            "delay": (statistics.median(delays) if None not in delays else None),
            "never": sum(d is None for d in delays),
            "median": statistics.median(ratios), "worst": max(ratios)}


def fault_table(results: list[RunResult], task: Task, names: list[str],
                kinds: tuple[str, ...]) -> list[str]:
    """One Markdown table: every contender under every fault on ``task``."""
    steps = next((r.spec.steps for r in results if r.spec.task == task.name and r.spec.fault),
                 0)
    at = fault_start(steps)
    every = max(1, steps // task.evals)
    rows = []
    for kind in kinds:
        stats = {c: fault_stats(results, task.name, c, kind) for c in names}
        tt = stats.get("trimtab")
        tt = tt if tt and tt["n"] else None
        for c, st in stats.items():
            if st is None:
                continue
            if not st["n"]:
                rows.append(f"| {kind} | {c} | — | — | — | no reference: the unfaulted run "
                            f"diverged ({st['unfaulted_diverged']}) | — | |")
                continue
            vs = ""
            if tt and c != "trimtab":
                vs = ("beats trimtab" if st["median"] < tt["median"] * 0.99 else
                      "loses to trimtab" if st["median"] > tt["median"] * 1.01 else "ties")
            delay = (f"{st['delay']:.0f}" if st["delay"] is not None
                     else f"never in {st['never']}/{st['n']}")
            note = (f" ({st['unfaulted_diverged']} more: unfaulted run diverged)"
                    if st["unfaulted_diverged"] else "")
            rows.append(f"| {kind} | {c} | {st['recovered']}/{st['n']}{note} | "
                        f"{st['redone']:.0f} | {delay} | {_fmt(st['median'])} | "
                        f"{_fmt(st['worst'])} | {vs} |")
    return [f"### {task.name}: a fault at iteration {at} of {steps}, reference LR "
            f"{reference_lr(task):g} (evaluated every {every})",
            "",
            "| fault | contender | recovered | redone (median) | back within 10% after "
            "(median) | final / unfaulted (median) | worst | median vs trimtab |",
            "|---|---|---|---|---|---|---|---|", *rows]


def describe_faults(kinds: tuple[str, ...]) -> list[str]:
    return [f"- `{k}`: " + _WHAT[k].format(n=faults.SPAN.get(k, 1)) for k in kinds]


def fault_plot(results: list[RunResult], task: Task, kind: str, out: Path,
               name: str = "faults") -> Path | None:
    """One faulted trimtab run (seed 0): training loss, LR and trimtab's decisions over
    iterations, beside the constant-LR run meeting the same fault."""
    by = {(r.spec.contender, r.spec.fault, r.spec.seed): r for r in results
          if r.spec.task == task.name and r.spec.width is None and r.spec.seed == 0
          and r.spec.lr == reference_lr(task)}
    run = by.get(("trimtab", kind, 0))
    if run is None or not run.loss_trace:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = fault_start(run.spec.steps)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    others = [("constant", "tab:orange"), ("zclip", "tab:green")]
    for c, color in [*others, ("trimtab", "black")]:
        r = by.get((c, kind, 0))
        if r is None or not r.loss_trace:
            continue
        xs = range(1, len(r.loss_trace) + 1)
        ys = [v if math.isfinite(v) else math.nan for v in r.loss_trace]
        ax1.plot(xs, ys, color=color, lw=1.6 if c == "trimtab" else 0.8,
                 label=f"{c}, {kind}: training loss")
        ax2.plot(xs, r.lr_trace, color=color, lw=1.6 if c == "trimtab" else 0.8, label=c)
    clean = by.get(("trimtab", None, 0))
    if clean is not None:
        cx, cy = zip(*[(i, v) for i, v in clean.curve if math.isfinite(v)], strict=True)
        ax1.plot(cx, cy, "k--", lw=1, label="trimtab, no fault: validation loss")
    vx, vy = zip(*[(i, v) for i, v in run.curve if math.isfinite(v)], strict=True)
    ax1.plot(vx, vy, "ko", ms=3, label=f"trimtab, {kind}: validation loss")
    for ax in (ax1, ax2):
        ax.axvspan(at, at + faults.SPAN.get(kind, 1), color="red", alpha=0.15)
        for i, (it, step) in enumerate(run.info.get("rollback_at", [])):
            ax.axvline(it, color="red", ls=":", lw=1.2,
                       label=f"rollback to step {step}" if ax is ax1 else None)
            if ax is ax1 and i < 3:
                ax.annotate(f"rollback -> {step}", (it, 0.98), xycoords=("data", "axes fraction"),
                            fontsize=7, color="red", ha="left", va="top")
        ax.set_yscale("log")
    if task.schedule is None:  # under a user's schedule the LR changes every step
        changes = [i + 1 for i in range(1, len(run.lr_trace))
                   if run.lr_trace[i] != run.lr_trace[i - 1] and i + 1 != at]
        ax2.plot(changes, [run.lr_trace[i - 1] for i in changes], "v", color="black", ms=4,
                 label="trimtab LR command applied")
    ax1.set_ylabel("loss")
    ax2.set_ylabel("LR (group 0)")
    ax2.set_xlabel("iteration (the budget; a rollback does not give iterations back)")
    ax1.set_title(f"{task.name}: {kind} at iteration {at} (shaded), seed 0")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path = out / f"{name}_{task.name}_{kind}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
