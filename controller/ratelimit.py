"""Per-peer message rate limits: one token bucket per peer, in a table of bounded size.

A peer is one client connection (its ZeroMQ routing id), so jobs that share a CURVE key
do not share a budget. Each message takes one token; a bucket holds at most
``burst`` tokens and refills at ``messages_per_s``. A message that finds the bucket empty
is refused: the controller drops it unread, counts it in
``trimtab_message_errors_total{code="rate_limited"}``, and answers the peer with one
``rate_limited`` error at most every ``notify_every_s`` seconds, so a flood never turns
into a flood of replies.

The table keeps the ``max_peers`` most recently seen peers; the least recently seen one
is forgotten first, so memory stays bounded whatever the number of peers. (A forgotten
peer starts again with a full bucket; the bound is on memory, not on a peer that can
cycle through more than ``max_peers`` identities.)

>>> clock = iter([0.0, 0.0, 0.0, 0.5]).__next__
>>> limiter = RateLimiter(RateLimitConfig(messages_per_s=2, burst=2), clock=clock)
>>> [limiter.allow(b"peer") for _ in range(3)]
[True, True, False]
>>> limiter.allow(b"peer")  # half a second later: one token back
True
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RateLimitConfig", "TokenBucket", "RateLimiter"]


class RateLimitConfig(BaseModel):
    """``[rate_limit]`` in the controller's config. ``messages_per_s = 0`` turns it off."""

    model_config = ConfigDict(extra="forbid")

    #: Sustained messages per second one peer may send (every type counts).
    messages_per_s: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 500.0
    #: Messages a peer may send at once, above the sustained rate.
    burst: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    #: Peers tracked at once; the least recently seen is forgotten first.
    max_peers: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    #: At most one ``rate_limited`` reply per peer per this many seconds.
    notify_every_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 1.0


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; :meth:`take` spends one.

    >>> b = TokenBucket(rate=1.0, burst=1, now=0.0)
    >>> b.take(0.0), b.take(0.5), b.take(1.0)
    (True, False, True)
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "notified")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now
        #: When this peer was last told it is over its rate (-inf: never).
        self.notified = float("-inf")

    def take(self, now: float) -> bool:
        """Spend one token if there is one; refill first for the time gone by."""
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """Token buckets by peer in an LRU table of at most ``config.max_peers`` entries."""

    def __init__(
        self, config: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        #: Messages refused so far.
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.config.messages_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, peer: Hashable, now: float) -> TokenBucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = TokenBucket(self.config.messages_per_s, self.config.burst, now)
            self._buckets[peer] = bucket
            if len(self._buckets) > self.config.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket

    def allow(self, peer: Hashable) -> bool:
        """Whether ``peer`` may send one more message now (spends a token if so)."""
        if not self.enabled:
            return True
        now = self.clock()
        if self._bucket(peer, now).take(now):
            return True
        self.refused += 1
        return False

    def should_notify(self, peer: Hashable) -> bool:
        """Whether a refused ``peer`` gets a ``rate_limited`` reply now (at most one per
        ``notify_every_s``)."""
        now = self.clock()
        bucket = self._bucket(peer, now)
        if now - bucket.notified >= self.config.notify_every_s:
            bucket.notified = now
            return True
        return False
