"""Discovery: a registry of keys and values with TTLs, chosen by URL.

* ``memory://[name]``: inside this process;
* ``fastnat://host:port``: fastnat's built-in registry service, standalone
  (``fastnat registry``) or hosted by a forwarder on its own port;
  ``fastnats://host:port`` is the same over TLS;
* ``redis://host:port/db``: a Redis server, for fleets of forwarders.

See :class:`fastnat.discovery.base.Registry` for the contract.
"""

from __future__ import annotations

import urllib.parse

from fastnat.discovery.base import Registry

__all__ = ["Registry", "open_registry", "SUPPORTED_SCHEMES"]

SUPPORTED_SCHEMES = ("memory", "fastnat", "fastnats", "redis")


def open_registry(url: str, *, secret: bytes | None = None) -> Registry:
    """A registry client for ``url``; ValueError for an unknown or malformed URL.

    ``secret`` proves the right to write to a ``fastnat://`` (or ``fastnats://``) registry that
    demands it (default: the process's secret); Redis has its own access
    control (a password in the URL)."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"a registry URL looks like memory://, fastnat://host:port or redis://host:port/db, got {url!r}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "memory":
        from fastnat.discovery.memory import MemoryRegistry

        return MemoryRegistry(url.split("://", 1)[1])
    if scheme in ("fastnat", "fastnats"):
        from fastnat.discovery.service import ServiceRegistry

        return ServiceRegistry(url, secret=secret)
    if scheme in ("redis", "rediss"):
        from fastnat.discovery.redis import RedisRegistry

        return RedisRegistry(url)
    raise ValueError(f"unknown registry scheme {scheme!r} in {url!r}; use one of {', '.join(SUPPORTED_SCHEMES)}")
