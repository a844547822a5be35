"""Where to find forwarders, and which forwarders hold a server.

Forwarders advertise themselves in the registry under ``__NAT__FORWARDER__``
as ``ip*serverport*clientport``; a server announces the forwarders it is
registered at under ``__NAT_SRV__<id>`` as ``forwarderip*clientport`` (the
Seattle NAT layer's keys and formats; fastnat serves both roles on one port,
so the two ports are the same). A static list (``FASTNAT_FORWARDERS``) works
without any registry.

Clients remember, per server id, the forwarders that worked, and try them
first; an entry is dropped when it fails (as the seed did).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastnat.discovery import Registry, open_registry
from fastnat.errors import NATLayerError, NoForwarderError
from fastnat.settings import (
    FORWARDER_KEY,
    SERVER_KEY_PREFIX,
    no_forwarder_error,
    registry_url,
    static_forwarders,
)

__all__ = [
    "ForwarderAddress",
    "parse_forwarder_value",
    "server_key",
    "parse_server_value",
    "shared_registry",
    "forwarders_for_server",
    "forwarders_for_client",
    "remember_working",
    "forget_server",
    "close_registries",
]

log = logging.getLogger("fastnat.locate")

# The seed looked up at most 50 values.
LOOKUP_LIMIT = 50


@dataclasses.dataclass(frozen=True, slots=True)
class ForwarderAddress:
    """A forwarder: where servers dial (``port``) and where clients dial (``client_port``)."""

    host: str
    port: int
    client_port: int

    @property
    def client_address(self) -> tuple[str, int]:
        return (self.host, self.client_port)

    def advertisement(self) -> str:
        """The ``__NAT__FORWARDER__`` value."""
        return f"{self.host}*{self.port}*{self.client_port}"

    def server_value(self) -> str:
        """The ``__NAT_SRV__<id>`` value of a server registered here."""
        return f"{self.host}*{self.client_port}"


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return port


def parse_forwarder_value(value: str) -> ForwarderAddress:
    """Parse ``ip*serverport*clientport``; ValueError if malformed."""
    parts = value.split("*")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"not a forwarder advertisement: {value!r}")
    return ForwarderAddress(parts[0], _port(parts[1]), _port(parts[2]))


def server_key(server_id: str) -> str:
    return SERVER_KEY_PREFIX + server_id


def parse_server_value(value: str) -> tuple[str, int]:
    """Parse ``forwarderip*clientport``; ValueError if malformed."""
    host, sep, port = value.rpartition("*")
    if not sep or not host:
        raise ValueError(f"not a server's forwarder: {value!r}")
    return host, _port(port)


# One client per event loop and URL: a registry client's connection belongs
# to the loop that made it. Keyed weakly by the loop, so that a loop that has
# ended (asyncio.run returned) takes its clients, and their sockets, with it;
# close_registries() closes them properly before that.
_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, bytes | None], Registry]] = weakref.WeakKeyDictionary()
_closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


async def _close_at_loop_end(clients: dict[tuple[str, bytes | None], Registry]) -> AsyncIterator[None]:
    """Parked at its ``yield`` for the loop's lifetime. asyncio.run (and
    asyncio.Runner) finalise every async generator of a loop before closing
    it, which runs the ``finally`` here: the loop's registry clients are
    closed even by a program that never called close_registries()."""
    try:
        yield
    finally:
        for registry in list(clients.values()):
            try:
                await registry.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing %r: %s", registry, exc)
        clients.clear()


def shared_registry(url: str | None = None, *, secret: bytes | None = None) -> Registry | None:
    """The registry client for ``url`` (default: the configured one) on this
    loop; ``secret`` proves its writes (see :func:`~fastnat.discovery.open_registry`)."""
    url = url or registry_url()
    if not url:
        return None
    loop = asyncio.get_running_loop()
    clients = _registries.get(loop)
    registry = clients.get((url, secret)) if clients is not None else None
    if registry is not None:
        return registry
    registry = open_registry(url, secret=secret)  # a bad URL raises here, before anything is set up
    if clients is None:
        clients = _registries[loop] = {}
        closer = _close_at_loop_end(clients)
        _closers[loop] = closer  # a strong reference: the loop tracks it weakly
        loop.create_task(_park(closer))  # start it, so that the loop knows it
    clients[(url, secret)] = registry
    return registry


async def _park(closer: AsyncIterator[None]) -> None:
    # close_registries() may close the closer before this task first runs.
    with contextlib.suppress(StopAsyncIteration):
        await closer.__anext__()


async def close_registries() -> None:
    """Close this loop's registry clients (their connections); call it before
    the loop ends. :func:`fastnat.aio.run` does."""
    loop = asyncio.get_running_loop()
    clients = _registries.pop(loop, {})
    closer = _closers.pop(loop, None)
    if closer is not None:
        await closer.aclose()  # closes the clients
    for registry in clients.values():
        try:
            await registry.close()
        except Exception as exc:  # closing is best effort
            log.debug("closing %r: %s", registry, exc)


async def forwarders_for_server(
    explicit: tuple[str, int] | None = None, *, registry: Registry | None = None
) -> list[ForwarderAddress]:
    """Forwarders a server may register at: the explicit one; else those the
    registry lists (in random order, as the seed tried them), then the static
    list. Raises NoForwarderError when there is none."""
    if explicit is not None:
        return [ForwarderAddress(explicit[0], explicit[1], explicit[1])]
    found: list[ForwarderAddress] = []
    registry = registry or shared_registry()
    failure: BaseException | None = None
    if registry is not None:
        try:
            values = await registry.lookup(FORWARDER_KEY, LOOKUP_LIMIT)
        except (OSError, ValueError) as exc:
            failure = exc  # the static forwarders may still do
        else:
            for value in values:
                try:
                    found.append(parse_forwarder_value(value))
                except ValueError as exc:
                    log.warning("ignoring a bad forwarder advertisement in %s: %s", registry.url, exc)
            random.shuffle(found)
    for host, port in static_forwarders():
        address = ForwarderAddress(host, port, port)
        if address not in found:
            found.append(address)
    if not found:
        if failure is not None:
            raise NATLayerError(f"no forwarder found: the registry failed ({failure})") from failure
        if registry is not None:
            raise NoForwarderError(f"no forwarder is advertised in {registry.url} (all may be full or down)")
        raise no_forwarder_error()
    if failure is not None and registry is not None:
        # Logged only when going on without the registry; otherwise the error says it.
        log.warning("looking forwarders up in %s failed: %s; trying the static forwarders", registry.url, failure)
    return found


# server id -> client addresses of the forwarders that worked for it
_client_cache: dict[str, list[tuple[str, int]]] = {}


def remember_working(server_id: str, address: tuple[str, int]) -> None:
    """A forwarder reached ``server_id``: try it first next time."""
    _client_cache[server_id] = [address]


def forget_server(server_id: str) -> None:
    """Drop what is remembered of ``server_id`` (its forwarders failed)."""
    _client_cache.pop(server_id, None)


def cached_forwarders(server_id: str) -> list[tuple[str, int]]:
    return list(_client_cache.get(server_id, ()))


async def forwarders_for_client(
    server_id: str,
    explicit: tuple[str, int] | None = None,
    *,
    registry: Registry | None = None,
    fresh: bool = False,
) -> list[tuple[str, int]]:
    """Forwarders to try for ``server_id``: the explicit one; else the ones
    that worked before (without asking the registry, which may be slow or
    down); else, or with ``fresh``, those the registry lists for the id,
    then the static list. Raises NoForwarderError when there is none."""
    if explicit is not None:
        return [explicit]
    found = [] if fresh else cached_forwarders(server_id)
    if found:
        return found
    registry = registry or shared_registry()
    failure: BaseException | None = None
    if registry is not None:
        try:
            values = await registry.lookup(server_key(server_id), LOOKUP_LIMIT)
        except (OSError, ValueError) as exc:
            failure = exc  # the static forwarders may still do
        else:
            for value in values:
                try:
                    address = parse_server_value(value)
                except ValueError as exc:
                    log.warning("ignoring a bad entry for %r in %s: %s", server_id, registry.url, exc)
                    continue
                if address not in found:
                    found.append(address)
    for address in static_forwarders():
        if address not in found:
            found.append(address)
    if not found:
        if failure is not None:
            raise NATLayerError(f"cannot find {server_id!r}: the registry failed ({failure})") from failure
        if registry is not None:
            from fastnat.errors import ServerNotFoundError

            raise ServerNotFoundError(f"{server_id!r} is not announced in {registry.url}")
        raise no_forwarder_error()
    if failure is not None and registry is not None:
        log.warning("looking %r up in %s failed: %s; trying the static forwarders", server_id, registry.url, failure)
    return found
