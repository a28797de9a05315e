"""Journal size: bytes per report, and per day per job, without and with retention.

``python -m bench.journal [--days 3] [--every-s 5]`` drives one synthetic job through the
real controller (its default policies; reports with every field a real client fills, one
every ``--every-s`` seconds of simulated time, a fault now and then so that decisions,
commands and acks are journaled too) twice: retention off, and the default retention
(:mod:`trimtab.controller.retention`). It prints the rows and bytes of each journal
(after ``VACUUM``, so that freed pages do not count) and what that means for a job
reporting once a second: bytes per day kept without retention, and the steady-state size
with it (the full window whole, then one report a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time

from prometheus_client import CollectorRegistry

from trimtab.controller.config import ControllerConfig
from trimtab.controller.handler import Controller
from trimtab.controller.journal import Journal
from trimtab.controller.retention import RetentionConfig
from trimtab.protocol import wire

FACTS = wire.ScaleFacts(param_count=8_000_000, group_sizes=[6_000_000, 2_000_000],
                        optimizer="AdamW", dtype="bfloat16", device="cuda", batch_size=64)


def _report(seq: int, rng: random.Random, applied: int, lr: float, bad: bool,
            stable: int | None) -> wire.Report:
    loss = 2.0 / (1 + seq * 1e-4) * (1 + 0.05 * rng.random())
    g = 0.5 + 0.1 * rng.random()
    step = seq * 10
    return wire.Report(
        job="j", seq=seq, step=step, window=10, loss_mean=loss, loss_last=loss * 0.99,
        loss_min=loss * 0.95, loss_max=loss * 1.05, grad_norm_mean=g, grad_norm_max=g * 1.8,
        grad_norm_std=g * 0.3, group_grad_norms=[g * 0.9, g * 0.4], update_ratio=1e-3,
        nonfinite_grads=3 if bad else 0, step_time_s=0.08,
        knobs=wire.Knobs(lr=3e-4 * lr, momentum=0.9, weight_decay=0.1, clip=1.0),
        base=wire.Knobs(lr=3e-4, momentum=0.9, weight_decay=0.1), scale=wire.Scale(lr=lr),
        link=1, applied_seq=applied,
        checkpoints=sorted({*(s for s in range(step // 100 * 100 - 300, step + 1, 100)
                              if s >= 0), *([] if stable is None else [stable])}),
        stable_step=stable)


def run(path: str, retention: dict, days: float, every_s: float) -> dict:
    cfg = ControllerConfig(journal=path, metrics_port=0, retention=retention)
    journal = Journal(path)
    wall = [1_700_000_000.0]
    journal.clock = lambda: wall[0]
    ctl = Controller(cfg, journal, registry=CollectorRegistry(), clock=lambda: wall[0])
    ctl._compact_at = wall[0]  # noqa: SLF001 - simulated time starts here
    reg = wire.Register(job="j", run_id="r", report_every=10, facts=FACTS,
                        knobs=wire.Knobs(lr=3e-4, momentum=0.9, weight_decay=0.1, clip=1.0))
    ctl.handle(b"p", wire.encode(reg))
    rng = random.Random(0)
    applied, lr, stable = 0, 1.0, None
    n = int(days * 86400 / every_s)
    t0 = time.perf_counter()
    for seq in range(1, n + 1):
        wall[0] += every_s
        report = _report(seq, rng, applied, lr, seq % 2000 == 0, stable)
        for _, frame in ctl.handle(b"p", wire.encode(report)):
            msg = wire.decode(frame)
            if isinstance(msg, wire.Command):  # applied at once; a rollback is not simulated
                applied, lr = msg.seq, msg.scale.lr or lr
                stable = msg.mark_stable if msg.mark_stable is not None else stable
                ctl.handle(b"p", wire.encode(wire.Ack(
                    job="j", seq=msg.seq, step=seq * 10, scale=wire.Scale(lr=lr),
                    restored_step=msg.rollback_to,
                    knobs=wire.Knobs(lr=3e-4 * lr, momentum=0.9, weight_decay=0.1, clip=1.0))))
        ctl.tick()
    wall_s = time.perf_counter() - t0
    counts = dict(journal._db.execute(  # noqa: SLF001 - a benchmark reads its own journal
        "SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
    recent = journal._db.execute(  # noqa: SLF001
        "SELECT count(*) FROM events WHERE ts >= ?", (wall[0] - 86400,)).fetchone()[0]
    ctl.close()
    j = Journal(path)
    j.vacuum()
    j.close()
    size = os.path.getsize(path)
    return {"reports_sent": n, "rows": counts, "bytes": size, "wall_s": wall_s,
            "rows_last_day": recent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--every-s", type=float, default=5.0)
    args = ap.parse_args()
    print(f"bench.journal: {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, {args.days:g} simulated days, one report every "
          f"{args.every_s:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        off = run(os.path.join(tmp, "off.db"), {"compact_every_s": 0}, args.days, args.every_s)
        on = run(os.path.join(tmp, "on.db"), {}, args.days, args.every_s)
    print(f"{'':20s} {'reports kept':>12s} {'rows':>7s} {'bytes':>11s} {'B/report sent':>13s}"
          "  rows by kind")
    for name, r in (("retention off", off), ("default retention", on)):
        rows = sum(r["rows"].values())
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["rows"].items(), key=lambda x: -x[1]))
        print(f"{name:20s} {r['rows'].get('report', 0):12d} {rows:7d} {r['bytes']:11d} "
              f"{r['bytes'] / r['reports_sent']:13.1f}  {kinds}")
    # At 1 report/s: everything scales with the report rate but the thinned reports (one
    # a minute whatever the rate). Bytes per row: the journal's own average.
    ret = RetentionConfig()
    scale = args.every_s
    per_row_off = off["bytes"] / sum(off["rows"].values())
    per_day_off = off["bytes"] / args.days * scale
    per_row_on = on["bytes"] / sum(on["rows"].values())
    kept = sum(on["rows"].values()) - on["rows"].get("report", 0)  # all kinds but reports
    kept_day = kept / args.days * scale * per_row_on
    thinned_day = 86400 / ret.downsample_s * per_row_on
    window = ret.full_s * per_row_off * sum(off["rows"].values()) / off["reports_sent"]
    print(f"one job at 1 report/s, extrapolated: without retention {per_day_off / 1e6:.1f} MB "
          f"per day, kept for good; with the default retention the last {ret.full_s / 3600:g} h "
          f"whole ({window / 1e6:.1f} MB), then {(kept_day + thinned_day) / 1e6:.2f} MB per "
          f"older day ({kept_day / 1e6:.2f} MB of commands, acks, marks and acting "
          f"decisions, {thinned_day / 1e6:.2f} MB of reports thinned to one a minute)")

if __name__ == "__main__":
    main()
