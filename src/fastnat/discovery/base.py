"""The registry contract: keys mapping to values, each value with a TTL.

``announce(key, value, ttl)`` adds a value (or renews it); it expires ``ttl``
seconds after its last announce. ``lookup(key, max_values)`` returns live
values; ``withdraw(key, value)`` removes one at once. Every backend
(:mod:`~fastnat.discovery.memory`, :mod:`~fastnat.discovery.service`,
:mod:`~fastnat.discovery.redis`) implements :class:`Registry` and is chosen by
URL with :func:`fastnat.discovery.open_registry`.
"""

from __future__ import annotations

import abc
import math
from typing import Any

__all__ = [
    "Registry",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_LENGTH",
    "MAX_TTL",
    "MAX_LOOKUP",
    "DEFAULT_LOOKUP",
    "validate_key",
    "validate_value",
    "validate_ttl",
    "validate_max_values",
]

# Keys are the seed's ``__NAT_SRV__<id>`` (id up to 255 characters) and
# ``__NAT__FORWARDER__``: 512 leaves room, and bounds what a key costs.
MAX_KEY_LENGTH = 512
# Values are addresses such as ``ip*serverport*clientport``: 1 KiB is far
# above any of them.
MAX_VALUE_LENGTH = 1024
# A value lives at most a day without being announced again; the NAT layer
# uses 180 s.
MAX_TTL = 86_400.0
# A lookup returns at most this many values (the seed asked for 50).
MAX_LOOKUP = 1_000
DEFAULT_LOOKUP = 50


def _text(kind: str, text: Any, limit: int) -> str:
    if not isinstance(text, str):
        raise ValueError(f"a registry {kind} must be a string, not {type(text).__name__}")
    if not 1 <= len(text) <= limit:
        raise ValueError(f"a registry {kind} must be 1 to {limit} characters, got {len(text)}")
    if not text.isprintable():
        raise ValueError(f"a registry {kind} must be printable, got {text!r}")
    return text


def validate_key(key: Any) -> str:
    return _text("key", key, MAX_KEY_LENGTH)


def validate_value(value: Any) -> str:
    return _text("value", value, MAX_VALUE_LENGTH)


def validate_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"a registry ttl must be a number of seconds, got {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"a registry ttl must be above 0 and at most {MAX_TTL:g} s, got {ttl}")
    return float(ttl)


def validate_max_values(max_values: Any) -> int:
    if type(max_values) is not int or not 1 <= max_values <= MAX_LOOKUP:
        raise ValueError(f"max_values must be an integer from 1 to {MAX_LOOKUP}, got {max_values!r}")
    return max_values


class Registry(abc.ABC):
    """A key/value registry with a TTL per value (asyncio)."""

    url: str

    @abc.abstractmethod
    async def announce(self, key: str, value: str, ttl: float) -> None:
        """Add ``value`` under ``key``, or renew it, for ``ttl`` seconds."""

    @abc.abstractmethod
    async def lookup(self, key: str, max_values: int = DEFAULT_LOOKUP) -> list[str]:
        """Up to ``max_values`` live values of ``key``."""

    @abc.abstractmethod
    async def withdraw(self, key: str, value: str) -> None:
        """Remove ``value`` from ``key`` now (nothing happens if it is not there)."""

    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'url', '?')}>"
