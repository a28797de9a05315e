"""Which checkpoints a client's ring keeps: one rule, shared by both sides.

The client's store (:mod:`trimtab.client._checkpoint`, and its files) keeps its ``keep``
newest checkpoints plus the newest stable one; the controller, told ``keep`` at
registration (:class:`~trimtab.protocol.wire.Register`), applies the same rule to the
listing a report gives to know which checkpoint the next snapshot evicts
(:meth:`~trimtab.controller.view.JobView.evicted_next`), so the two never drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["evicted_next", "kept"]


def kept(steps: Iterable[int], stable: int | None, keep: int) -> set[int]:
    """Of the checkpoints at ``steps``, those a ring of ``keep`` keeps: the ``keep`` newest,
    and ``stable`` (the newest stable one, None: none) where it is among them.

    >>> sorted(kept([0, 40, 80, 120], 0, 3)), sorted(kept([0, 40, 80, 120], None, 3))
    ([0, 40, 80, 120], [40, 80, 120])
    >>> sorted(kept([0, 40, 80, 120, 160], 0, 3))
    [0, 80, 120, 160]
    """
    ordered = sorted(steps)
    out = set(ordered[-keep:])  # keep >= 1: attach refuses less, and so does the wire
    if stable is not None and stable in ordered:
        out.add(stable)
    return out


def evicted_next(held: Iterable[int], stable: int | None, keep: int) -> set[int]:
    """Of the checkpoints ``held`` (a listing, ``stable`` its newest stable one), those the
    ring drops when it takes its next snapshot (newer than every one held).

    >>> sorted(evicted_next([0, 40, 80], 0, 3)), sorted(evicted_next([0, 40, 80, 120], 0, 3))
    ([], [40])
    """
    ordered = sorted(held)
    if not ordered:
        return set()
    return set(ordered) - kept([*ordered, ordered[-1] + 1], stable, keep)
