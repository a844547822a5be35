"""A server id's byte rate limit and byte cap at the forwarder.

One :class:`ServerQuota` per registered id (when either limit is set) is the
:class:`~fastnat.splice.Meter` of every splice relaying a client of that id:

* **rate**: one token bucket for the id, charged with the bytes relayed in
  both directions together. A splice side whose read takes the balance below
  zero stops reading until the debt is paid (for the client's TCP side the
  kernel's buffers fill and TCP slows the client; for the stream side the
  window credit is withheld and the server's writes wait). No byte is
  buffered beyond the transports' usual limits, and none is dropped.
* **cap**: at most ``cap`` bytes are relayed for the id (both directions
  together, counted from its registration). The read that reaches the cap is
  relayed up to the cap only; then every relayed connection of the id is
  closed gracefully (what was relayed is delivered, then a FIN) and
  :attr:`exhausted` stays true until the id registers anew.
"""

from __future__ import annotations

import asyncio
import logging

from fastnat.ratelimit import TokenBucket
from fastnat.splice import Splice, _End

__all__ = ["BURST_SECONDS", "ServerQuota"]

log = logging.getLogger("fastnat.forwarder")

# The bucket saves up at most this many seconds' worth of bytes: enough that
# a steady stream pauses rarely (every ~100 ms, not every read), little
# enough that a burst barely shows over any second of traffic.
BURST_SECONDS = 0.1


class ServerQuota:
    """Byte rate (bytes/s, ``None``: none) and byte cap (``None``: none) of one id."""

    def __init__(self, server_id: str, rate: int | None, cap: int | None) -> None:
        self.server_id = server_id
        self._loop = asyncio.get_running_loop()
        self.bucket = None if rate is None else TokenBucket(rate, rate * BURST_SECONDS, self._loop.time())
        self.cap = cap
        self.used = 0
        self.splices: set[Splice] = set()
        self._held: set[_End] = set()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def exhausted(self) -> bool:
        """True once the cap is reached."""
        return self.cap is not None and self.used >= self.cap

    # the Meter protocol

    def allowance(self, n: int) -> int:
        if self.cap is None:
            return n
        return max(0, min(n, self.cap - self.used))

    def spent(self, end: _End, n: int) -> None:
        self.used += n
        bucket = self.bucket
        if bucket is not None:
            now = self._loop.time()
            bucket.take(n, now)
            wait = bucket.wait(now)
            if wait > 0:
                self._held.add(end)
                end.hold(True)
                if self._timer is None:
                    self._timer = self._loop.call_later(wait, self._release)
        if self.exhausted:
            self._cut_off()

    # internals

    def _release(self) -> None:
        self._timer = None
        assert self.bucket is not None
        wait = self.bucket.wait(self._loop.time())
        if wait > 0:
            self._timer = self._loop.call_later(wait, self._release)
            return
        held, self._held = self._held, set()
        for end in held:
            end.hold(False)

    def _cut_off(self) -> None:
        if self.splices:
            log.warning("%r reached its byte cap of %d bytes: closing its %d relayed connections", self.server_id, self.cap, len(self.splices))
        for splice in list(self.splices):
            splice.finish()

    def add(self, splice: Splice) -> None:
        """Meter ``splice`` (a relayed client of this id) from now on."""
        self.splices.add(splice)
        if self.exhausted:
            splice.finish()

    def discard(self, splice: Splice) -> None:
        """``splice`` ended: forget it."""
        self.splices.discard(splice)
        self._held.discard(splice.end_a)
        self._held.discard(splice.end_b)

    def close(self) -> None:
        """The id is gone: stop the timer (its splices end with the session)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held.clear()
