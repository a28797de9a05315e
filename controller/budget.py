"""A time budget for each policy call: a policy that hangs is cut off, the others go on.

A hung Python function cannot be stopped from outside, so :class:`PolicyBudget` runs each
policy's ``propose`` on a worker thread of that policy's own and waits for its answer at
most ``budget_s``. The rules:

- in time: the answer (or the exception the policy raised) is handed back as if the call
  had been made inline; the worker is kept for the next call;
- late, counted from when the call began on its worker (so a loaded host that is slow
  to schedule the worker does not count against the policy, up to ten budgets):
  :class:`PolicyTimeout` is raised (the engine disables the policy for that job,
  journals and counts it, and goes on with the others); the worker is abandoned — a daemon
  thread, never reused, left to end by itself if the call ever returns — and the next
  call of that policy, for another job, gets a fresh one;
- a policy with ``max_stuck`` abandoned calls still running is called no more, for any
  job: each later call raises :class:`PolicyTimeout` at once. So at most ``max_stuck``
  threads per policy are ever stuck.

While it waits the controller handles no other message, so a hang delays every job by one
budget, and a policy that hangs for every job by ``max_stuck`` budgets in all, then never
again; a policy that answers in time costs one hand-over between threads (tens of
microseconds). A policy that sleeps or blocks on I/O while stuck costs nothing more; one
that spins in pure Python takes turns at the GIL and slows the controller for as long as
it spins (Python cannot kill a thread): restart the controller to end it. Policies are
called from one worker at a time, except that an abandoned call may still run while a
fresh worker calls the same instance for another job: policies must be pure functions of
the view and their config, as :class:`~trimtab.controller.policy.Policy` asks.

>>> from trimtab.controller.policy import Policy
>>> class Quick(Policy):
...     name = "quick"
...     def propose(self, view):
...         return []
>>> budget = PolicyBudget(0.5)
>>> budget.call(Quick(), None)
[]
>>> budget.close()
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trimtab.controller.policy import Policy

__all__ = ["PolicyBudget", "PolicyTimeout"]


#: How many budgets a call may wait to *begin* (the worker not yet scheduled) before it is
#: given up on all the same.
_START_WAITS = 10


class PolicyTimeout(Exception):
    """A policy did not answer within its time budget (or has too many calls stuck)."""


class _Worker:
    """One daemon thread that runs the calls handed to it, one at a time."""

    __slots__ = ("inbox", "outbox", "thread", "started")

    def __init__(self, name: str) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        #: When the call in hand began (monotonic seconds); None: idle.
        self.started: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"trimtab-policy-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:  # abandoned or closed: end once the current call is done
                return
            fn, arg = item
            self.started = time.monotonic()
            try:
                result = (True, fn(arg))
            except BaseException as exc:  # handed to the caller, who decides what it means
                result = (False, exc)
            self.started = None
            self.outbox.put(result)

    def wait(self, budget_s: float) -> tuple[bool, Any]:
        """The call's outcome, waiting at most ``budget_s`` from when the call *began*, and
        at most :data:`_START_WAITS` budgets for it to begin (a starved host delays that, and
        the policy is not to blame); raises :class:`queue.Empty` past that."""
        submitted = time.monotonic()
        timeout = budget_s
        while True:
            try:
                return self.outbox.get(timeout=timeout)
            except queue.Empty:
                now, started = time.monotonic(), self.started
                if started is not None:
                    timeout = started + budget_s - now
                else:
                    timeout = min(budget_s, submitted + _START_WAITS * budget_s - now)
                if timeout <= 0:
                    raise


class PolicyBudget:
    """Calls ``policy.propose(view)`` on the policy's worker thread, waiting ``budget_s``.

    See the module docstring for the rules. One controller thread calls it at a time.
    """

    def __init__(self, budget_s: float, *, max_stuck: int = 4) -> None:
        if not budget_s > 0:
            raise ValueError(f"budget_s = {budget_s!r}: must be > 0 seconds")
        if max_stuck < 1:
            raise ValueError(f"max_stuck = {max_stuck!r}: must be >= 1")
        self.budget_s = budget_s
        self.max_stuck = max_stuck
        self._workers: dict[int, tuple[Policy, _Worker]] = {}
        #: Threads of abandoned calls, by policy instance id (pruned as they end).
        self._stuck: dict[int, list[threading.Thread]] = {}
        #: Calls cut off, by policy name, since start.
        self.timeouts: dict[str, int] = {}

    def call(self, policy: Policy, view: Any) -> Any:
        """What ``policy.propose(view)`` returns or raises; :class:`PolicyTimeout` if late."""
        key = id(policy)
        stuck = self._stuck.get(key)
        if stuck:
            stuck[:] = [t for t in stuck if t.is_alive()]
            if len(stuck) >= self.max_stuck:
                raise PolicyTimeout(
                    f"not called: {len(stuck)} earlier calls are still running past the time "
                    f"budget of {self.budget_s * 1000:g} ms"
                )
        entry = self._workers.get(key)
        if entry is None:
            # The policy is kept with its worker so its id() cannot be reused meanwhile.
            entry = self._workers[key] = (policy, _Worker(policy.name))
        worker = entry[1]
        worker.inbox.put((policy.propose, view))
        try:
            ok, value = worker.wait(self.budget_s)
        except queue.Empty:
            del self._workers[key]
            worker.inbox.put(None)
            self._stuck.setdefault(key, []).append(worker.thread)
            self.timeouts[policy.name] = self.timeouts.get(policy.name, 0) + 1
            raise PolicyTimeout(f"exceeded time budget of {self.budget_s * 1000:g} ms") from None
        if ok:
            return value
        if isinstance(value, Exception):
            raise value
        # SystemExit, KeyboardInterrupt from a plugin: a policy error, never the controller's.
        raise RuntimeError(f"{type(value).__name__}: {value}") from value

    @property
    def stuck_threads(self) -> int:
        """Abandoned calls still running, over all policies."""
        return sum(t.is_alive() for ts in self._stuck.values() for t in ts)

    def close(self) -> None:
        """Let every idle worker end; stuck ones are daemons and end with the process."""
        for _, worker in self._workers.values():
            worker.inbox.put(None)
        self._workers.clear()
