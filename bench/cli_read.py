"""How long the commands for people take on a long journal.

``python -m bench.cli_read [--jobs 20] [--reports 5000]`` writes a journal of ``--jobs``
jobs, each with ``--reports`` reports and, every tenth report, a decision that cuts the
lr, its command and two acks (the second a resend's), plus a checkpoint marked stable
every hundred (events shaped as the controller journals them), then times, as
subprocesses as a person runs them: ``trimtab decisions JOB`` (which reads every event of
the job, reports included, to place marks and drop repeated acks), ``trimtab decisions``
of every job, and ``trimtab jobs``; and, in process, one ``trimtab top`` refresh after
a hundred new events (it reads only what is new).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

from trimtab.controller.jobs_view import JobsView
from trimtab.controller.journal import Journal

KNOBS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "clip": None}


def _report(seq: int) -> dict:
    return {"seq": seq, "step": seq * 10, "window": 10, "loss_mean": 1.0 / seq,
            "grad_norm_mean": 0.5, "knobs": KNOBS, "checkpoints": [], "stable_step": None}


def write(path: str, jobs: int, reports: int) -> int:
    """The journal; returns its number of events."""
    j = Journal(path)
    n = 0
    with j.batch():
        for k in range(jobs):
            job, lr, seq = f"job-{k:03d}", 1.0, 0
            j.append(job, "register", step=0, data={"resumed": "new", "run_id": f"r{k}"})
            n += 2  # and its bye
            for r in range(1, reports + 1):
                step = r * 10
                j.append(job, "report", step=step, seq=r, data=_report(r))
                n += 1
                if r % 10 == 0:
                    seq += 1
                    knobs = {"lr": {"current": lr, "target": lr * 0.99, "commanded": lr * 0.99,
                                    "policy": "plateau", "reason": "loss flat", "limits": []}}
                    j.append(job, "decision", step=step, data={"step": step, "knobs": knobs})
                    j.append(job, "command", step=step, seq=seq, data={
                        "scale": {"lr": lr * 0.99}, "knobs": {}, "reasons": ["lr cut"]})
                    lr *= 0.99
                    for late in (2, 4):
                        j.append(job, "ack", step=step + late, seq=seq, data={
                            "scale": {"lr": lr}, "knobs": KNOBS, "error": None})
                    n += 4
                if r % 100 == 0:
                    j.append(job, "stable", step=step - 50, data={"step": step - 50,
                                                                  "source": "ack"})
                    n += 1
            j.append(job, "bye", step=reports * 10, data={"reason": "closed"})
    j.close()
    return n


def _timed(*args: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "trimtab.controller", *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--reports", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal.db")
        n = write(path, args.jobs, args.reports)
        mb = os.path.getsize(path) / 1e6
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"journal of {args.jobs} jobs, {n} events, {mb:.1f} MB")
        one = _timed("decisions", "job-000", "--journal", path)
        print(f"trimtab decisions job-000: {one:.2f} s")
        print(f"trimtab decisions (all jobs): {_timed('decisions', '--journal', path):.2f} s")
        print(f"trimtab jobs: {_timed('jobs', '--journal', path):.2f} s")
        print(f"trimtab --help (the interpreter and imports, for scale): {_timed('--help'):.2f} s")
        j = Journal(path)  # a writer, as a running serve: top reads beside it
        view = JobsView(Journal(path, readonly=True))
        t0 = time.perf_counter()
        view.update()
        first = time.perf_counter() - t0
        for r in range(100):
            j.append("job-000", "report", step=10**6 + r, seq=10**6 + r, data=_report(r + 1))
        j.close()
        t0 = time.perf_counter()
        view.update()
        print(f"trimtab top: first frame {first:.2f} s, a refresh after 100 new events "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
