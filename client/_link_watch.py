"""What the client says about its link: when the run is alone, and when it is not.

A wrong endpoint, a controller not started yet and a controller that died all look the
same from the training loop: ``guard.connected`` is False and training goes on at the last
applied values. :class:`LinkWatch` turns that into a few log lines, never a storm:

* one warning when no controller has answered within the first liveness window after
  attach (naming the endpoint and the job), or when one that answered goes silent for a
  window;
* a reminder every :data:`REMIND_S` while the silence lasts;
* one line when a controller answers again. It is a warning too: it closes a warning,
  and belongs wherever that one was shown (Python's default shows WARNING and above).

A link that drops and comes back again and again (a loaded host, a flaky network) is said
once per :data:`FLAP_S`: the drops in between are DEBUG lines, and the next warning counts
them. The transport thread calls :meth:`LinkWatch.update` on every turn of its loop; it
only compares clocks.
"""

from __future__ import annotations

import logging

__all__ = ["FLAP_S", "REMIND_S", "LinkWatch"]

log = logging.getLogger("trimtab.client")

#: While no controller answers, the warning is repeated this often (a reminder).
REMIND_S = 600.0
#: A drop this soon after the last one said is a DEBUG line, counted in the next warning.
FLAP_S = 60.0


class LinkWatch:
    """Logs the link's changes for job ``job`` at ``endpoint``; ``window`` is the liveness
    window in seconds (``liveness x heartbeat_s``), ``heartbeats`` that ``liveness``."""

    def __init__(self, job: str, endpoint: str, window: float, heartbeats: int,
                 started: float) -> None:
        self.job, self.endpoint = job, endpoint
        self.window, self.heartbeats, self.started = window, heartbeats, started
        #: Seconds between reminders (tests shorten it).
        self.remind_every_s = REMIND_S
        # When the silence was last said (None: not alone, or not said yet), whether it
        # was said as a warning, and since when the run has been alone.
        self._said: float | None = None
        self._loud = False
        self._since = 0.0
        # The last drop said as a warning, and the drops since that were not.
        self._drop_said = float("-inf")
        self._quiet_drops = 0

    def update(self, now: float, last_heard: float) -> None:
        """Say what changed since the last call: ``last_heard`` is when the controller was
        last heard from (``-inf``: never)."""
        quiet_since = max(last_heard, self.started)
        if now - quiet_since < self.window:  # heard from lately, or still in the first window
            if self._said is not None:
                say = log.warning if self._loud else log.debug
                say("trimtab: job %r reached the controller at %s after %.0f s without one",
                    self.job, self.endpoint, now - self._since)
                self._said = None
            return
        if self._said is None:
            self._said, self._since, self._loud = now, quiet_since, True
            if last_heard == float("-inf"):
                log.warning("trimtab: job %r has not reached a controller at %s within %.1f s "
                            "(%d heartbeats); training goes on uncontrolled until one answers "
                            "(guard.connected is False)", self.job, self.endpoint, self.window,
                            self.heartbeats)
            elif now - self._drop_said >= FLAP_S:
                more = (f" ({self._quiet_drops} more short drops since the last warning)"
                        if self._quiet_drops else "")
                log.warning("trimtab: job %r lost the controller at %s (no word for %.1f s); "
                            "training goes on uncontrolled, reconnecting%s", self.job,
                            self.endpoint, now - quiet_since, more)
                self._drop_said, self._quiet_drops = now, 0
            else:  # it dropped again soon after the last warning: counted, not shouted
                self._loud = False
                self._quiet_drops += 1
                log.debug("trimtab: job %r lost the controller at %s again", self.job,
                          self.endpoint)
        elif now - self._said >= self.remind_every_s:
            self._said, self._loud = now, True
            log.warning("trimtab: job %r still has no controller at %s (%.0f s without one)",
                        self.job, self.endpoint, now - self._since)
