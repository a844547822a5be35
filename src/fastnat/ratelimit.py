"""Sans-IO pieces of the abuse limits: a token bucket and per-address counts.

Neither reads a clock or touches a socket: the caller passes the time in,
and decides what to do when a limit is reached (pause reading, refuse).
"""

from __future__ import annotations

import collections

__all__ = ["AddressCounts", "TokenBucket"]


class TokenBucket:
    """``rate`` units per second, with at most ``burst`` saved up.

    :meth:`take` always succeeds and may leave the balance negative: the
    bytes were already read, and the debt is paid by waiting :meth:`wait`
    seconds (the caller stops reading meanwhile). :meth:`try_take` takes
    only what is there.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError(f"a token bucket needs a positive rate and burst, got {rate!r} and {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.balance = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.balance = min(self.burst, self.balance + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def take(self, amount: float, now: float) -> None:
        """Spend ``amount`` (the balance may go below zero)."""
        self._refill(now)
        self.balance -= amount

    def try_take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` if the balance covers it; False (nothing spent) otherwise."""
        self._refill(now)
        if self.balance < amount:
            return False
        self.balance -= amount
        return True

    def wait(self, now: float, amount: float = 0.0) -> float:
        """Seconds until the balance reaches ``amount`` (0 if it has)."""
        self._refill(now)
        return max(0.0, (amount - self.balance) / self.rate)


class AddressCounts:
    """How many of something (connections, handshakes) each address holds,
    with a cap per address. An address whose count drops to zero is
    forgotten, so the table only holds addresses in use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: collections.Counter[str] = collections.Counter()
        self.total = 0

    def acquire(self, address: str) -> bool:
        """Count one more for ``address``; False (nothing counted) at the cap."""
        if self._counts[address] >= self.limit:
            if not self._counts[address]:
                del self._counts[address]
            return False
        self._counts[address] += 1
        self.total += 1
        return True

    def release(self, address: str) -> None:
        """Count one less for ``address`` (one that :meth:`acquire` counted)."""
        left = self._counts[address] - 1
        if left < 0:
            del self._counts[address]
            raise ValueError(f"released {address!r} more often than acquired")
        self.total -= 1
        if left:
            self._counts[address] = left
        else:
            del self._counts[address]

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)

    def __len__(self) -> int:
        """Addresses holding at least one."""
        return len(self._counts)
