"""``memory://[name]``: a registry inside this process (tests, single process set-ups).

Registries opened with the same name share one store.
"""

from __future__ import annotations

from fastnat.discovery.base import (
    DEFAULT_LOOKUP,
    Registry,
    validate_key,
    validate_max_values,
    validate_ttl,
    validate_value,
)
from fastnat.discovery.store import StoreFull, TTLStore

__all__ = ["MemoryRegistry"]

_stores: dict[str, TTLStore] = {}


class MemoryRegistry(Registry):
    """A registry in this process's memory."""

    def __init__(self, name: str = "", *, store: TTLStore | None = None) -> None:
        if store is None:
            store = _stores.get(name)
            if store is None:
                store = _stores[name] = TTLStore()
        self._store = store
        self.url = f"memory://{name}"

    async def announce(self, key: str, value: str, ttl: float) -> None:
        try:
            self._store.announce(validate_key(key), validate_value(value), validate_ttl(ttl))
        except StoreFull as exc:
            raise ValueError(str(exc)) from None

    async def lookup(self, key: str, max_values: int = DEFAULT_LOOKUP) -> list[str]:
        return self._store.lookup(validate_key(key), validate_max_values(max_values))

    async def withdraw(self, key: str, value: str) -> None:
        self._store.withdraw(validate_key(key), validate_value(value))
