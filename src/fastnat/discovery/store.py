"""An in-memory store of values with TTLs, bounded, without a background scan.

Used by the ``memory://`` backend and by the built-in registry service.
Expiry is lazy: a key's expired values go when the key is touched, and a
heap of expiry times lets each operation also remove a few values of keys
nobody touches, so memory follows the live values without ever scanning
everything.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

from fastnat.discovery.base import DEFAULT_LOOKUP

__all__ = ["TTLStore", "StoreFull"]

# Defaults: a registry for a fleet holds a few entries per server.
DEFAULT_MAX_KEYS = 100_000
DEFAULT_MAX_VALUES_PER_KEY = 1_000
# Stale heap entries (values renewed or withdrawn since) are dropped as they
# surface; each operation removes at most this many expired values, which
# bounds the time one call can take.
_EXPIRE_PER_CALL = 64


class StoreFull(Exception):
    """A cap on keys or on values per key is reached."""


class TTLStore:
    """``key -> {value: expiry}`` with caps on keys and values per key."""

    def __init__(
        self,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_keys = max_keys
        self.max_values_per_key = max_values_per_key
        self._clock = clock
        self._data: dict[str, dict[str, float]] = {}
        self._heap: list[tuple[float, str, str]] = []
        # Values held (live or expired but not yet removed), kept up to date
        # so that no operation has to count them.
        self._count = 0

    def __len__(self) -> int:
        """Number of keys (with at least one value not yet removed)."""
        return len(self._data)

    @property
    def value_count(self) -> int:
        """Number of values held (including expired ones not yet removed)."""
        return self._count

    @property
    def heap_size(self) -> int:
        """Entries of the expiry heap (live and stale): stays proportional to :attr:`value_count`."""
        return len(self._heap)

    def _expire_some(self, now: float, limit: int | None = _EXPIRE_PER_CALL) -> None:
        heap = self._heap
        removed = 0
        while heap and heap[0][0] <= now and (limit is None or removed < limit):
            expiry, key, value = heapq.heappop(heap)
            values = self._data.get(key)
            if values is not None and values.get(value) == expiry:
                del values[value]
                self._count -= 1
                removed += 1
                if not values:
                    del self._data[key]
        # The heap holds at most one live entry per value plus stale ones
        # (values renewed or withdrawn since); rebuild it when stale entries
        # dominate, so that it stays proportional to the values held (even
        # when none are left).
        if len(heap) > 1024 and len(heap) > 4 * self._count:
            self._heap = [(e, k, v) for k, values in self._data.items() for v, e in values.items()]
            heapq.heapify(self._heap)

    def _live(self, key: str, now: float) -> dict[str, float] | None:
        values = self._data.get(key)
        if values is None:
            return None
        expired = [v for v, e in values.items() if e <= now]
        for v in expired:
            del values[v]
        self._count -= len(expired)
        if not values:
            del self._data[key]
            return None
        return values

    def announce(self, key: str, value: str, ttl: float) -> None:
        now = self._clock()
        self._expire_some(now)
        values = self._live(key, now)
        if values is None:
            if len(self._data) >= self.max_keys:
                # Expired keys may still be held (each call removes a few
                # expired values only): remove every expired value before
                # refusing. Each value is removed once, so this stays cheap.
                self._expire_some(now, None)
            if len(self._data) >= self.max_keys:
                raise StoreFull(f"the registry holds its maximum of {self.max_keys} keys")
            values = self._data[key] = {}
        elif value not in values and len(values) >= self.max_values_per_key:
            raise StoreFull(f"key {key!r} holds its maximum of {self.max_values_per_key} values")
        expiry = now + ttl
        if value not in values:
            self._count += 1
        values[value] = expiry
        heapq.heappush(self._heap, (expiry, key, value))

    def lookup(self, key: str, max_values: int = DEFAULT_LOOKUP) -> list[str]:
        now = self._clock()
        self._expire_some(now)
        values = self._live(key, now)
        if values is None:
            return []
        return list(itertools.islice(values, max_values))

    def withdraw(self, key: str, value: str) -> None:
        now = self._clock()
        self._expire_some(now)
        values = self._data.get(key)
        if values is not None and values.pop(value, None) is not None:
            self._count -= 1
            if not values:
                del self._data[key]
