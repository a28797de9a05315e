"""What the policy time budget costs a policy that answers in time.

    python -m bench.policy_budget [--calls 20000] [--repeats 5]

Calls a real built-in policy (``plateau``) on a real job view, inline and through
:class:`~trimtab.controller.budget.PolicyBudget` (a hand-over to the policy's worker thread
and back), and prints microseconds per call for each and their difference, the median of
``--repeats`` runs. The difference is what ``policy_budget_ms > 0`` adds to every policy
call; a decision calls each configured policy once.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from trimtab.controller.budget import PolicyBudget
from trimtab.controller.policy import load_policy
from trimtab.controller.state import JobState
from trimtab.protocol import wire

__all__ = ["main", "measure"]


def _view():
    facts = wire.ScaleFacts(
        param_count=10**6, group_sizes=[10**6], optimizer="SGD", dtype="float32", device="cpu"
    )
    st = JobState.from_register(
        wire.Register(job="b", run_id="r", report_every=10, facts=facts, knobs=wire.Knobs(lr=0.1))
    )
    for i in range(1, 60):
        st.observe(
            wire.Report(
                job="b",
                seq=i,
                step=10 * i,
                window=10,
                loss_mean=2.0 / (1 + 0.01 * i),
                knobs=wire.Knobs(lr=0.1),
            )
        )
    return st.view()


def measure(calls: int) -> tuple[float, float]:
    """``(inline, budgeted)`` microseconds per call of the plateau policy."""
    policy, view = load_policy("plateau"), _view()
    budget = PolicyBudget(1.0)
    for _ in range(min(calls, 1000)):  # warm both paths
        budget.call(policy, view)
        policy.propose(view)
    t0 = time.perf_counter()
    for _ in range(calls):
        policy.propose(view)
    t1 = time.perf_counter()
    for _ in range(calls):
        budget.call(policy, view)
    t2 = time.perf_counter()
    budget.close()
    return (t1 - t0) / calls * 1e6, (t2 - t1) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.policy_budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rows = [measure(args.calls) for _ in range(args.repeats)]
    inline = statistics.median(r[0] for r in rows)
    budgeted = statistics.median(r[1] for r in rows)
    print(
        f"{platform.machine()}, Python {platform.python_version()}, "
        f"{args.calls} calls x {args.repeats}"
    )
    print(f"plateau.propose inline:      {inline:8.2f} us/call")
    print(f"plateau.propose with budget: {budgeted:8.2f} us/call")
    print(f"added by the budget:         {budgeted - inline:8.2f} us/call (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
