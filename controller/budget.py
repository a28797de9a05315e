"""A time budget for each policy call: a policy that hangs is cut off, the others go on.

A hung Python function cannot be stopped from outside, so :class:`PolicyBudget` runs each
policy's ``propose`` on a worker thread and waits for its answer at most ``budget_s``. A
job's policies go to the worker together (:meth:`PolicyBudget.call_each`), called one after
the other, each with a budget of its own: one hand-over each way per report, however many
policies a job has. The rules:

- in time: the answer (or the exception the policy raised) is handed back as if the call
  had been made inline; the worker is kept for the next call;
- late, counted from when the call began on its worker (so a loaded host that is slow
  to schedule the worker does not count against the policy, up to ten budgets):
  :class:`PolicyTimeout` is raised (the engine disables the policy for that job,
  journals and counts it, and goes on with the others); the worker is abandoned — a daemon
  thread, never reused, that calls nothing more and is left to end by itself if the call
  ever returns — and the policies after it, and the next calls, get a fresh one;
- a policy with ``max_stuck`` abandoned calls still running is called no more, for any
  job: each later call raises :class:`PolicyTimeout` at once. So at most ``max_stuck``
  threads per policy are ever stuck.

While it waits the controller handles no other message, so a hang delays every job by one
budget, and a policy that hangs for every job by ``max_stuck`` budgets in all, then never
again; policies that answer in time cost one hand-over between threads and back per
report (tens of microseconds). A policy that sleeps or blocks on I/O while stuck costs
nothing more; one that spins in pure Python takes turns at the GIL and slows the
controller for as long as it spins (Python cannot kill a thread): restart the controller
to end it. Policies are
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
from collections.abc import Sequence
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
    """One daemon thread that runs the batches of calls handed to it, one batch at a time:
    the calls of one batch in order, their outcomes handed back together (one hand-over
    each way per batch, however many policies it holds)."""

    __slots__ = ("inbox", "outbox", "thread", "started", "done", "abandoned", "lock")

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[list[tuple[bool, Any]]] = queue.SimpleQueue()
        #: When the call in hand began (monotonic seconds); None: none begun yet.
        self.started: float | None = None
        #: The outcomes of the batch's calls done so far (the call in hand is the next).
        self.done: list[tuple[bool, Any]] = []
        #: Set by the caller when it gives up on the batch: no further call of it begins.
        self.abandoned = False
        #: Guards the move from one call to the next against the caller giving up.
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="trimtab-policy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:  # abandoned or closed: end once the current call is done
                return
            fns, arg = item
            for fn in fns:
                with self.lock:
                    if self.abandoned:
                        return
                    self.started = time.monotonic()
                try:
                    result = (True, fn(arg))
                except BaseException as exc:  # handed to the caller, who decides what it means
                    result = (False, exc)
                with self.lock:
                    self.done.append(result)
            with self.lock:
                self.started = None
                done = list(self.done)
            self.outbox.put(done)

    def wait(self, budget_s: float, calls: int) -> list[tuple[bool, Any]]:
        """The batch's outcomes, in order. Each call may take ``budget_s`` from when it
        *began*, and the batch waits at most :data:`_START_WAITS` budgets for its first to
        begin (a starved host delays that, and the policy is not to blame). Past that the
        batch is given up on: the outcomes of the calls done are returned, fewer than
        ``calls``; the call in hand is the one that overran."""
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
                    with self.lock:
                        ended = len(self.done) == calls  # just now: not late after all
                        if not ended:
                            self.abandoned = True
                            return list(self.done)
                    return self.outbox.get()  # on its way: the worker only hands it over


class PolicyBudget:
    """Calls ``policy.propose(view)`` on a worker thread, waiting ``budget_s`` per policy.

    See the module docstring for the rules. One controller thread calls it at a time, so
    one worker serves every policy; :meth:`call_each` hands it all of a job's policies at
    once.
    """

    def __init__(self, budget_s: float, *, max_stuck: int = 4) -> None:
        if not budget_s > 0:
            raise ValueError(f"budget_s = {budget_s!r}: must be > 0 seconds")
        if max_stuck < 1:
            raise ValueError(f"max_stuck = {max_stuck!r}: must be >= 1")
        self.budget_s = budget_s
        self.max_stuck = max_stuck
        self._worker: _Worker | None = None
        #: Threads of abandoned calls, by policy instance id (pruned as they end), with the
        #: policy (kept so that its id() cannot be reused meanwhile).
        self._stuck: dict[int, tuple[Policy, list[threading.Thread]]] = {}
        #: Calls cut off, by policy name, since start.
        self.timeouts: dict[str, int] = {}

    def call(self, policy: Policy, view: Any) -> Any:
        """What ``policy.propose(view)`` returns or raises; :class:`PolicyTimeout` if late."""
        ok, value = self.call_each([policy], view)[0]
        if ok:
            return value
        raise value

    def call_each(self, policies: Sequence[Policy], view: Any) -> list[tuple[bool, Any]]:
        """``(True, what propose returned)`` or ``(False, the exception)`` for each policy in
        order: one hand-over to the worker and one back for all of them. The exception is
        the policy's own, :class:`PolicyTimeout` for one late or not called (too many of its
        calls stuck), or a :class:`RuntimeError` for a ``BaseException`` (a plugin's
        ``SystemExit`` is never the controller's)."""
        outcomes: list[tuple[bool, Any] | None] = [None] * len(policies)
        todo = []
        for i, policy in enumerate(policies):
            _, stuck = self._stuck.get(id(policy), (policy, []))
            stuck[:] = [t for t in stuck if t.is_alive()]
            if len(stuck) >= self.max_stuck:
                outcomes[i] = (False, PolicyTimeout(
                    f"not called: {len(stuck)} earlier calls are still running past the time "
                    f"budget of {self.budget_s * 1000:g} ms"))
            else:
                todo.append(i)
        while todo:
            worker = self._worker
            if worker is None:
                worker = self._worker = _Worker()
            worker.done = []  # idle: its last batch was handed back
            worker.inbox.put(([policies[i].propose for i in todo], view))
            done = worker.wait(self.budget_s, len(todo))
            for i, (ok, value) in zip(todo, done, strict=False):  # done is short if one overran
                outcomes[i] = (True, value) if ok else (False, _as_exception(value))
            if len(done) == len(todo):
                break
            # The next call overran: its worker is abandoned, the rest go to a fresh one.
            late = todo[len(done)]
            policy = policies[late]
            self._worker = None
            worker.inbox.put(None)
            self._stuck.setdefault(id(policy), (policy, []))[1].append(worker.thread)
            self.timeouts[policy.name] = self.timeouts.get(policy.name, 0) + 1
            outcomes[late] = (False, PolicyTimeout(
                f"exceeded time budget of {self.budget_s * 1000:g} ms"))
            todo = todo[len(done) + 1:]
        return outcomes  # type: ignore[return-value]

    @property
    def stuck_threads(self) -> int:
        """Abandoned calls still running, over all policies."""
        return sum(t.is_alive() for _, ts in self._stuck.values() for t in ts)

    def close(self) -> None:
        """Let the idle worker end; stuck ones are daemons and end with the process."""
        if self._worker is not None:
            self._worker.inbox.put(None)
            self._worker = None


def _as_exception(value: BaseException) -> Exception:
    """A policy's ``SystemExit``, ``KeyboardInterrupt``: a policy error, never the
    controller's."""
    if isinstance(value, Exception):
        return value
    err = RuntimeError(f"{type(value).__name__}: {value}")
    err.__cause__ = value
    return err
