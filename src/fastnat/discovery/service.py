"""``fastnat://host:port``: fastnat's built-in registry service, and its client.

The service speaks the control protocol's framing (:mod:`fastnat.protocol`).
A connection starts with the dialler's hello with role ``R``
(:data:`~fastnat.protocol.ROLE_REGISTRY`) and the usual hello reply; then the
dialler sends any number of requests on the same connection, each answered in
turn:

* ``announce {key, value, ttl}`` -> ``OK``;
* ``lookup {key, max_values}`` -> ``OK`` with the list of live values;
* ``withdraw {key, value}`` -> ``OK``.

A cap reached (keys, values per key) is answered ``FULL`` with a message and
the connection stays open. A malformed, oversized or unknown request is
answered ``BAD_REQUEST`` with a message and the connection is closed (one
WARNING log line per dropped connection); the service goes on serving the
others.

Three pieces:

* :class:`RegistryService` holds the store (a bounded
  :class:`~fastnat.discovery.store.TTLStore`) and serves connections. A
  forwarder that read a hello with role ``R`` hands the connection over with
  :meth:`RegistryService.serve_connection`.
* :class:`RegistryServer` listens on its own port and reads the hello itself
  (a standalone registry).
* :class:`ServiceRegistry` is the client (a :class:`~fastnat.discovery.base.Registry`):
  one connection, kept open and reused, requests serialized.

Memory is bounded: messages are capped at
:data:`~fastnat.protocol.MAX_MESSAGE_SIZE`, the store has caps, connections
are capped (:attr:`RegistryLimits.max_connections`), a peer that does not say
hello within :attr:`RegistryLimits.handshake_timeout` is dropped, and one
that sends no request for :attr:`RegistryLimits.idle_timeout` is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import socket
import ssl as ssl_module
import urllib.parse
from collections.abc import Mapping
from typing import Any

from fastnat.aio._control import read_message
from fastnat.discovery.base import (
    DEFAULT_LOOKUP,
    Registry,
    validate_key,
    validate_max_values,
    validate_ttl,
    validate_value,
)
from fastnat.discovery.store import DEFAULT_MAX_KEYS, DEFAULT_MAX_VALUES_PER_KEY, StoreFull, TTLStore
from fastnat.errors import (
    AuthenticationError,
    ControlProtocolError,
    ForwarderBusyError,
    NATLayerError,
    RegistryUnavailableError,
)
from fastnat.ratelimit import AddressCounts, TokenBucket
from fastnat.protocol import (
    HELLO_SIZE,
    MAGIC,
    MAX_MESSAGE_SIZE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    REGISTRY_REQUESTS,
    ROLE_REGISTRY,
    SUPPORTED_VERSIONS,
    HelloReplyReader,
    HelloStatus,
    MessageReader,
    Reply,
    Status,
    _shown,
    check_registry_write_proof,
    encode_hello,
    encode_hello_reply,
    encode_reply,
    encode_request,
    hello_error,
    parse_hello,
    parse_reply,
    parse_request,
    registry_write_proof,
)
from fastnat.settings import SERVER_KEY_PREFIX, process_secret
from fastnat.tls import SHUTDOWN_TIMEOUT, client_tls, connect_failure, connect_options

__all__ = ["RegistryLimits", "RegistryService", "RegistryServer", "ServiceRegistry", "DEFAULT_TIMEOUT"]

log = logging.getLogger(__name__)

# The client's bound on connecting and on each request's round trip.
DEFAULT_TIMEOUT = 5.0
# A BAD_REQUEST reply quotes at most this much of the reason.
_MAX_REASON = 300
# What a lookup reply costs besides its values: the largest id, the status,
# the brackets.
_REPLY_OVERHEAD = len(encode_reply(0xFFFFFFFF, Status.OK, [])) - 4


@dataclasses.dataclass
class RegistryLimits:
    """The registry service's limits."""

    # Keys held; each costs its values and bookkeeping (well under 1 KiB for
    # the NAT layer's keys), so the default stays under ~100 MiB.
    max_keys: int = DEFAULT_MAX_KEYS
    # Values under one key: the forwarders of a fleet, or the forwarders one
    # server is registered at.
    max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY
    # Open connections (each a socket and a small buffer). Clients keep one
    # connection open, so this bounds the clients served at once.
    max_connections: int = 1_024
    # A peer must say hello within this time, or it is dropped.
    handshake_timeout: float = 10.0
    # A connection with no request for this long is closed (clients reconnect
    # at their next request). The NAT layer re-announces every 60 s.
    idle_timeout: float = 300.0
    # Requests are capped at this size (at most the protocol's cap).
    max_message_size: int = MAX_MESSAGE_SIZE
    # Open connections from one IP address. A client keeps one connection and
    # a host runs a few fastnat processes; 256 lets a NAT gateway's users
    # share an address while one address cannot take all max_connections.
    max_connections_per_ip: int = 256
    # Requests per second from one IP address, all its connections together
    # (a bucket of one second's worth, kept while the address has a
    # connection). The NAT layer makes a request or two per server per
    # minute; 1,000/s serves a busy host, while one address cannot keep the
    # service busy (a lookup may cost a 64 KiB reply). Past it, the
    # requests wait: reading pauses, nothing is refused.
    max_requests_per_ip_per_second: float = 1_000.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"RegistryLimits.{field.name} must be a positive number, got {value!r}")
            if field.type in (int, "int") and not isinstance(value, int):
                raise ValueError(f"RegistryLimits.{field.name} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"RegistryLimits.{field.name} must be finite, got {value!r}")
        if self.max_message_size > MAX_MESSAGE_SIZE:
            raise ValueError(f"RegistryLimits.max_message_size must be at most {MAX_MESSAGE_SIZE}")


def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return ("?", 0)


def _fit(values: list[str], budget: int) -> list[str]:
    """The longest prefix of ``values`` whose JSON list fits in ``budget`` bytes."""
    size = _REPLY_OVERHEAD
    for count, value in enumerate(values):
        size += len(json.dumps(value, ensure_ascii=False).encode()) + (1 if count else 0)
        if size > budget:
            return values[:count]
    return values


class _RegistryConnection(asyncio.Protocol):
    """One connection to the registry service."""

    _fastnat_accepts_views = True  # copies what it keeps

    def __init__(self, service: RegistryService, *, hello_done: bool, owner: RegistryServer | None = None) -> None:
        self.service = service
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.awaiting_hello = not hello_done
        self.buffer = bytearray()  # the hello, until complete
        self.reader = MessageReader(service.limits.max_message_size)
        # Fresh per connection, sent in the hello reply: write proofs are
        # bound to it, so one captured on a connection is useless on another.
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.ip_counted = False  # counted in the service's connections per address
        self.closed = False
        self.write_paused = False
        # A request read and held back by the per-address request rate.
        self.next_message: Any = None
        self.throttle_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start(transport, None)  # type: ignore[arg-type]

    def _start(self, transport: asyncio.Transport, peer: tuple[str, int] | None) -> None:
        self.transport = transport
        self.peer = peer if peer is not None else _peer_of(transport)
        service = self.service
        if service._closing:
            self.closed = True
            transport.abort()
            return
        if len(service._connections) >= service.limits.max_connections:
            # Say why, as a forwarder does when its handshakes are full.
            transport.write(encode_hello_reply(HelloStatus.BUSY, 0, bytes(NONCE_SIZE)))
            self._drop(f"{len(service._connections)} connections open (the cap)", "connections_full")
            return
        if not service._ip_acquire(self.peer[0]):
            transport.write(encode_hello_reply(HelloStatus.IP_CONNECTIONS, 0, bytes(NONCE_SIZE)))
            self._drop(
                f"{service.limits.max_connections_per_ip} connections open from {self.peer[0]} (max_connections_per_ip)",
                "ip_connections_full",
            )
            return
        self.ip_counted = True
        service._connections.add(self)
        service.counters["connections_total"] += 1
        self.counted = True
        if self.owner is not None:
            self.owner._connections.add(self)
        if self.awaiting_hello:
            self._arm(service.limits.handshake_timeout, self._hello_timed_out)
        else:
            transport.write(encode_hello_reply(HelloStatus.OK, PROTOCOL_VERSION, self.nonce))
            self._arm(service.limits.idle_timeout, self._idle_timed_out)

    def _arm(self, delay: float, callback: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def _hello_timed_out(self) -> None:
        self.timer = None
        self._drop(f"no hello within {self.service.limits.handshake_timeout:g} s", "handshake_timeout", abort=True)

    def _idle_timed_out(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info(
                "registry: closing connection from %s:%s, idle for %g s",
                *self.peer,
                self.service.limits.idle_timeout,
            )
            self.service.counters["idle_closed"] += 1
            self.close()

    def _drop(self, reason: str, counter: str = "bad_request", *, abort: bool = False) -> None:
        """Close the connection for cause: one WARNING line."""
        if self.closed:
            return
        log.warning("registry: closing connection from %s:%s: %s", self.peer[0], self.peer[1], reason)
        self.service.counters[f"dropped_{counter}"] += 1
        if abort:
            self.abort()
        else:
            self.close()

    def close(self) -> None:
        """Close after what was written is sent (a peer that does not read is
        cut off after the handshake timeout)."""
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self.timer is not None:
            self.timer.cancel()
        # A peer that does not read holds the transport open until its write
        # buffer drains: bound that.
        self.timer = asyncio.get_running_loop().call_later(self.service.limits.handshake_timeout, transport.abort)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.throttle_timer is not None:
            self.throttle_timer.cancel()
            self.throttle_timer = None
        if self.ip_counted:
            self.ip_counted = False
            self.service._ip_release(self.peer[0])
        if self.counted:
            self.counted = False
            self.service._connections.discard(self)
            if self.owner is not None:
                self.owner._connections.discard(self)
                self.owner._connection_gone()

    # A peer that sends requests and does not read the replies must not make
    # us buffer without bound (a few bytes of lookup can ask for 64 KiB of
    # reply): past the transport's high-water mark, stop answering and
    # reading until the peer has read.
    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume()

    def _resume(self) -> None:
        """Read and answer again, unless the peer's reading or the request
        rate still holds us back."""
        if self.transport is None or self.transport.is_closing() or self.closed:
            return
        if self.write_paused or self.throttle_timer is not None:
            return
        self.transport.resume_reading()
        try:
            self._process()
        except ControlProtocolError as exc:
            self._bad_request(str(exc), 0)

    def _throttle(self, wait: float) -> None:
        """Past the per-address request rate: read nothing, answer nothing for ``wait`` s."""
        assert self.transport is not None
        self.service.counters["throttled_requests"] += 1
        self.transport.pause_reading()
        self.throttle_timer = asyncio.get_running_loop().call_later(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttle_timer = None
        self._resume()

    def eof_received(self) -> bool:
        return False  # the peer is done: close our side too

    # -------------------------------------------------------------- input

    def data_received(self, data: Any) -> None:
        if self.closed:
            return
        try:
            self._received(bytes(data))
        except ControlProtocolError as exc:
            self._bad_request(str(exc), 0)

    def _received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.awaiting_hello:
            self.buffer += data
            if len(self.buffer) < HELLO_SIZE:
                head = bytes(self.buffer[: len(MAGIC)])
                if head != MAGIC[: len(head)]:
                    raise ControlProtocolError(f"not a fastnat hello (starts with {head!r})")
                return
            hello = parse_hello(bytes(self.buffer[:HELLO_SIZE]))
            data = bytes(self.buffer[HELLO_SIZE:])
            self.buffer = bytearray()
            if hello.version not in SUPPORTED_VERSIONS:
                self.transport.write(encode_hello_reply(HelloStatus.VERSION_UNSUPPORTED, 0, bytes(NONCE_SIZE)))
                self._drop(
                    f"protocol version {hello.version} (this registry speaks {list(SUPPORTED_VERSIONS)})", "version"
                )
                return
            if hello.role != ROLE_REGISTRY:
                self.transport.write(encode_hello_reply(HelloStatus.BAD_ROLE, 0, bytes(NONCE_SIZE)))
                self._drop(f"role {hello.role!r} (a registry serves role {ROLE_REGISTRY!r} only)", "bad_role")
                return
            self.awaiting_hello = False
            self.transport.write(encode_hello_reply(HelloStatus.OK, PROTOCOL_VERSION, self.nonce))
            self._arm(self.service.limits.idle_timeout, self._idle_timed_out)
        self.reader.feed(data, limit=0)  # buffered; parsed one at a time below
        self._process()

    def _process(self) -> None:
        """Answer the buffered requests, one at a time (so that the requests
        before a bad one are answered before the connection is dropped),
        while the peer reads the answers."""
        while not self.closed and not self.write_paused and self.throttle_timer is None:
            if self.next_message is None:
                messages = self.reader.feed(b"", limit=1)
                if not messages:
                    return
                self.next_message = messages[0]
            wait = self.service._request_wait(self.peer[0])
            if wait > 0:
                self._throttle(wait)
                return
            message, self.next_message = self.next_message, None
            self._handle(message)

    def _handle(self, message: Any) -> None:
        assert self.transport is not None
        request_id = message.get("id") if isinstance(message, dict) else None
        if type(request_id) is not int or not 0 <= request_id <= 0xFFFFFFFF:
            request_id = 0
        try:
            request = parse_request(message)
        except ControlProtocolError as exc:
            self._bad_request(str(exc), request_id)
            return
        name, value = request.request, request.value
        if name not in REGISTRY_REQUESTS:
            self._bad_request(f"request {name!r} is not for a registry connection", request_id)
            return
        service = self.service
        service.counters[name] += 1
        store = service.store
        if name != "lookup" and not service.write_allowed(name, value, self.nonce):
            service.counters["auth_failed"] += 1
            log.warning(
                "registry: refused %s of %s from %s:%s: wrong or missing proof",
                name, _shown(value["key"]), self.peer[0], self.peer[1],
            )
            self.transport.write(
                encode_reply(request.id, Status.AUTH_FAILED, f"{name} of {value['key']!r} needs a proof of the secret")
            )
            self._arm(service.limits.idle_timeout, self._idle_timed_out)
            return
        try:
            if name == "announce":
                store.announce(value["key"], value["value"], float(value["ttl"]))
                reply = encode_reply(request.id, Status.OK)
            elif name == "lookup":
                values = _fit(store.lookup(value["key"], value["max_values"]), MAX_MESSAGE_SIZE)
                reply = encode_reply(request.id, Status.OK, values)
            else:
                store.withdraw(value["key"], value["value"])
                reply = encode_reply(request.id, Status.OK)
        except StoreFull as exc:
            service.counters["full"] += 1
            reply = encode_reply(request.id, Status.FULL, str(exc))
        self.transport.write(reply)
        self._arm(service.limits.idle_timeout, self._idle_timed_out)

    def _bad_request(self, reason: str, request_id: int) -> None:
        if self.closed or self.transport is None:
            return
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 3] + "..."
        if not self.transport.is_closing():
            self.transport.write(encode_reply(request_id, Status.BAD_REQUEST, reason))
        self._drop(reason)


class RegistryService:
    """The registry: a bounded store of values with TTLs, served over connections.

    ``limits`` bounds the store and the connections; ``store`` shares an
    existing :class:`TTLStore` (its own caps then apply). A process that
    hosts the service can use the same store directly with
    ``MemoryRegistry(store=service.store)``.
    """

    def __init__(
        self,
        limits: RegistryLimits | None = None,
        *,
        store: TTLStore | None = None,
        secret: bytes | None = None,
        secrets: Mapping[str, bytes] | None = None,
    ) -> None:
        self.limits = limits or RegistryLimits()
        # With a secret (or per-id secrets), announce and withdraw must prove
        # it (see registry_write_proof); lookups stay open to anyone.
        self.secret = secret
        self.secrets = secrets
        if store is None:
            store = TTLStore(max_keys=self.limits.max_keys, max_values_per_key=self.limits.max_values_per_key)
        self.store = store
        self.counters: collections.Counter[str] = collections.Counter()
        self._connections: set[_RegistryConnection] = set()
        self._ip_connections = AddressCounts(self.limits.max_connections_per_ip)
        # The request-rate bucket of each address that has a connection.
        self._ip_requests: dict[str, TokenBucket] = {}
        self._closing = False

    def secret_for(self, key: str) -> bytes | None:
        """The secret a write to ``key`` must prove: a server id's own secret
        for its ``__NAT_SRV__<id>`` key when one is known, else the shared one."""
        if self.secrets is not None and key.startswith(SERVER_KEY_PREFIX):
            own = self.secrets.get(key[len(SERVER_KEY_PREFIX) :])
            if own is not None:
                return own
        return self.secret

    def write_allowed(self, request: str, value: dict[str, Any], nonce: bytes) -> bool:
        """Whether an ``announce`` or ``withdraw`` may change the store."""
        if self.secret is None and self.secrets is None:
            return True
        secret = self.secret_for(value["key"])
        return secret is not None and check_registry_write_proof(
            secret, nonce, request, value["key"], value["value"], value.get("proof")
        )

    def _ip_acquire(self, ip: str) -> bool:
        if not self._ip_connections.acquire(ip):
            return False
        if ip not in self._ip_requests:
            rate = self.limits.max_requests_per_ip_per_second
            self._ip_requests[ip] = TokenBucket(rate, rate, asyncio.get_running_loop().time())
        return True

    def _ip_release(self, ip: str) -> None:
        self._ip_connections.release(ip)
        if not self._ip_connections.count(ip):
            del self._ip_requests[ip]

    def _request_wait(self, ip: str) -> float:
        """0 if ``ip`` may make a request now (and it is counted), else the
        seconds until it may."""
        bucket = self._ip_requests.get(ip)
        if bucket is None:
            return 0.0
        now = asyncio.get_running_loop().time()
        if bucket.try_take(1, now):
            return 0.0
        return max(bucket.wait(now, 1), 0.001)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def serve_connection(
        self,
        transport: asyncio.Transport,
        initial_data: bytes = b"",
        peer: tuple[str, int] | None = None,
    ) -> None:
        """Take over ``transport``, whose hello (role ``R``, a supported
        version) the caller has read and not answered.

        Writes the hello reply, makes the connection's protocol this
        service's (``transport.set_protocol``), serves ``initial_data`` (the
        bytes that followed the hello) and resumes reading if the caller
        paused it. At the connection cap it answers ``BUSY`` and closes.
        Call it from the transport's event loop.
        """
        connection = _RegistryConnection(self, hello_done=True)
        transport.set_protocol(connection)
        connection._start(transport, peer)
        if connection.closed:
            return
        if initial_data:
            connection.data_received(initial_data)
        if not transport.is_closing() and not connection.write_paused and not transport.is_reading():
            transport.resume_reading()

    def stats(self) -> dict[str, Any]:
        """Keys, values, connections and counters (requests, drops, FULL replies)."""
        return {
            "keys": len(self.store),
            "values": self.store.value_count,
            "connections": len(self._connections),
            "addresses": len(self._ip_connections),
            "counters": dict(self.counters),
        }

    def close(self) -> None:
        """Close every connection; serve no more."""
        self._closing = True
        for connection in list(self._connections):
            connection.abort()


class RegistryServer:
    """A standalone registry service listening on ``host:port`` (port 0 picks one).

    ``service`` shares a :class:`RegistryService` (for example a forwarder's);
    by default the server has its own.
    """

    def __init__(
        self,
        host: str | None = "0.0.0.0",
        port: int = 0,
        service: RegistryService | None = None,
        *,
        limits: RegistryLimits | None = None,
        ssl: Any = None,
    ) -> None:
        if service is not None and limits is not None:
            raise ValueError("give either a service or limits, not both")
        self.host = host
        self.requested_port = port
        self.service = service if service is not None else RegistryService(limits)
        self.ssl = ssl
        self._server: asyncio.Server | None = None
        self._connections: set[_RegistryConnection] = set()
        self._all_gone: asyncio.Event | None = None

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _RegistryConnection(self.service, hello_done=False, owner=self),
            self.host,
            self.requested_port,
            ssl=self.ssl,
            # The TLS handshake gets the time a hello gets.
            ssl_handshake_timeout=self.service.limits.handshake_timeout if self.ssl is not None else None,
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT if self.ssl is not None else None,
        )
        log.info("registry listening on %s", ", ".join(f"{a[0]}:{a[1]}" for a in self.addresses))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        """``fastnat://host:port`` (``fastnats://`` with TLS) of the first address (after :meth:`start`)."""
        host, port = self.addresses[0]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        scheme = "fastnats" if self.ssl is not None else "fastnat"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    def close(self) -> None:
        """Stop listening and close the connections this server accepted."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()

    def _connection_gone(self) -> None:
        if not self._connections and self._all_gone is not None:
            self._all_gone.set()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        if self._connections:
            self._all_gone = asyncio.Event()
            if self._connections:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._all_gone.wait(), timeout)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout)

    async def __aenter__(self) -> RegistryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


# ------------------------------------------------------------------ client


def _parse_url(url: str) -> tuple[str, int, float | None]:
    if not isinstance(url, str):
        raise ValueError(f"a registry URL must be a string, not {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("fastnat", "fastnats"):
        raise ValueError(f"not a fastnat:// or fastnats:// registry URL: {url!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad registry URL {url!r}: {exc}") from None
    if not host or port is None or port == 0:
        raise ValueError(f"a fastnat registry URL looks like fastnat://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.fragment or parts.username or parts.password:
        raise ValueError(f"a fastnat registry URL has a host and a port only (and ?timeout=), got {url!r}")
    timeout = None
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name != "timeout":
            raise ValueError(f"unknown option {name!r} in registry URL {url!r} (known: timeout)")
        try:
            timeout = float(value)
        except ValueError:
            raise ValueError(f"timeout must be a number of seconds in {url!r}, got {value!r}") from None
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be positive in {url!r}, got {value!r}")
    return host, port, timeout


class _StaleConnection(Exception):
    """A reused connection failed before answering: worth one more try."""


class ServiceRegistry(Registry):
    """Client of the registry service at ``fastnat://host:port[?timeout=seconds]``.

    ``fastnats://host:port`` is the same over TLS: the service's certificate
    is verified against ``ssl`` (an ``ssl.SSLContext``, a CA file path or
    True for the system's CAs), by default the process's TLS setting
    (:func:`fastnat.configure`\\ ``(tls=...)``, ``FASTNAT_TLS_CA``), else the
    system's CAs. A ``fastnat://`` URL is always plain TCP.

    It keeps one connection open and sends requests on it one at a time (a
    lock serializes concurrent calls). A connection that was lost since its
    last use is replaced once per call. Each connect and each request is
    bounded by ``timeout`` (default 5 s). Errors: the service cannot be
    reached -> :class:`~fastnat.errors.RegistryUnavailableError` (a
    :class:`~fastnat.errors.ForwarderUnreachableError`, an ``OSError``); bad
    input -> ``ValueError``, before anything is sent; a cap reached ->
    ``ValueError`` with the service's message; a service that breaks the
    protocol -> :class:`~fastnat.errors.ControlProtocolError`.

    One instance serves one event loop at a time: its connection belongs to
    the loop that made it, so :meth:`close` it before that loop ends (a call
    from another loop drops the old connection and makes a new one).
    """

    def __init__(
        self, url: str, *, timeout: float | None = None, ssl: Any = None, secret: bytes | str | None = None
    ) -> None:
        host, port, url_timeout = _parse_url(url)
        if timeout is None:
            timeout = url_timeout if url_timeout is not None else DEFAULT_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url
        self.host = host
        self.port = port
        self.timeout = float(timeout)
        shown = f"[{host}]" if ":" in host else host
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        self.tls: ssl_module.SSLContext | None = None
        if scheme == "fastnats":
            self.tls = client_tls(ssl) or client_tls(True)
        self.where = f"registry {scheme}://{shown}:{port}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._next_id = 0
        # The secret announce and withdraw prove to a registry that demands it
        # (default: the process's, fastnat.configure(secret=) or FASTNAT_SECRET).
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._nonce: bytes | None = None  # the connection's, from its hello reply

    # ------------------------------------------------------------ contract

    async def announce(self, key: str, value: str, ttl: float) -> None:
        request = {"key": validate_key(key), "value": validate_value(value), "ttl": validate_ttl(ttl)}
        await self._call("announce", request)

    async def lookup(self, key: str, max_values: int = DEFAULT_LOOKUP) -> list[str]:
        request = {"key": validate_key(key), "max_values": validate_max_values(max_values)}
        values = await self._call("lookup", request)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or len(values) > max_values:
            raise ControlProtocolError(f"{self.where}: lookup answered {str(values)[:200]!r}, not a list of values")
        return values

    async def withdraw(self, key: str, value: str) -> None:
        await self._call("withdraw", {"key": validate_key(key), "value": validate_value(value)})

    async def close(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._loop is not asyncio.get_running_loop():
            self._forget()
            return
        self._reader = self._writer = None
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), self.timeout)

    # ------------------------------------------------------------ internals

    def _forget(self) -> None:
        """Drop the connection at once (its state is unknown)."""
        writer = self._writer
        self._reader = self._writer = None
        self._nonce = None
        if writer is None:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop is running:
            writer.transport.abort()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(writer.transport.abort)
        else:
            # Its loop is gone (not closed before the loop ended): end the TCP
            # connection at least, so that the service frees its side now;
            # the descriptor goes with the transport object.
            sock = writer.transport.get_extra_info("socket")
            with contextlib.suppress(Exception):
                sock.shutdown(socket.SHUT_RDWR)

    def _usable(self) -> bool:
        reader, writer = self._reader, self._writer
        return (
            reader is not None
            and writer is not None
            and not writer.is_closing()
            and not reader.at_eof()
            and reader.exception() is None
        )

    async def _call(self, name: str, value: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._lock is None:
            self._forget()
            self._loop = loop
            self._lock = asyncio.Lock()
        async with self._lock:
            reused = self._usable()
            if not reused:
                self._forget()
            try:
                return await self._exchange(name, value, reused)
            except _StaleConnection:
                pass
            # The connection was lost since its last use (the service
            # restarted, or closed it as idle): once more, on a new one.
            return await self._exchange(name, value, False)

    def _write_secret(self) -> bytes | None:
        if self._secret is not None:
            return self._secret
        return process_secret()

    async def _exchange(self, name: str, value: dict[str, Any], reused: bool) -> Any:
        """One request and its reply, connecting first if needed."""
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        request_id = self._next_id
        secret = self._write_secret() if name != "lookup" else None
        try:
            if self._writer is None:
                await self._connect()
                hello = encode_hello(ROLE_REGISTRY)
                if secret is None:
                    prefix, fresh = hello, True  # the request goes with the hello
                else:
                    # A proof needs the connection's nonce: the hello first.
                    assert self._reader is not None and self._writer is not None
                    self._writer.write(hello)
                    await asyncio.wait_for(self._read_hello(self._reader), self.timeout)
                    prefix, fresh = b"", False
            else:
                prefix, fresh = b"", False
            if secret is not None:
                assert self._nonce is not None
                proof = registry_write_proof(secret, self._nonce, name, value["key"], value["value"])
                value = {**value, "proof": proof}
            message = prefix + encode_request(request_id, name, value)
            assert self._reader is not None and self._writer is not None
            reader, writer = self._reader, self._writer
            writer.write(message)
            reply = await asyncio.wait_for(self._read_reply(reader, fresh), self.timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._forget()
            raise RegistryUnavailableError(f"{self.where}: no answer within {self.timeout:g} s") from None
        except NATLayerError:
            # Ours, naming the registry already: not an OSError of the socket
            # to describe again, nor a stale connection to try once more.
            self._forget()
            raise
        except (OSError, EOFError) as exc:
            self._forget()
            if reused:
                raise _StaleConnection(str(exc)) from None
            raise RegistryUnavailableError(f"{self.where}: {connect_failure(exc, self.tls is not None)}") from None
        except BaseException:
            # Cancelled (or worse) mid-request: the reply may still come, so
            # the connection is out of step; drop it.
            self._forget()
            raise
        if reply.id != request_id:
            self._forget()
            raise ControlProtocolError(f"{self.where}: reply to request {reply.id}, expected {request_id}")
        if reply.status == Status.OK:
            return reply.value
        if reply.status == Status.FULL:
            raise ValueError(str(reply.value or f"{self.where} is full"))
        if reply.status == Status.AUTH_FAILED:
            why = "the secret given is not the registry's" if secret is not None else "no secret is configured here"
            raise AuthenticationError(f"{self.where}: {name} refused ({why}): {reply.value}")
        self._forget()
        detail = f": {reply.value}" if reply.value else ""
        raise ControlProtocolError(f"{self.where}: {name} answered {reply.status}{detail}")

    async def _connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, **connect_options(self.tls, self.host, self.timeout)),
                self.timeout,
            )
        except (TimeoutError, asyncio.TimeoutError):
            raise RegistryUnavailableError(f"{self.where}: no connection within {self.timeout:g} s") from None
        except OSError as exc:
            raise RegistryUnavailableError(f"{self.where}: {connect_failure(exc, self.tls is not None)}") from None

    async def _read_reply(self, reader: asyncio.StreamReader, fresh: bool) -> Reply:
        if fresh:
            await self._read_hello(reader)
        try:
            message = await read_message(reader)
        except ControlProtocolError as exc:
            raise ControlProtocolError(f"{self.where}: {exc}") from None
        if message is None:
            raise ConnectionResetError("the connection closed before the reply")
        try:
            return parse_reply(message)
        except ControlProtocolError as exc:
            raise ControlProtocolError(f"{self.where}: {exc}") from None

    async def _read_hello(self, reader: asyncio.StreamReader) -> None:
        """Read the hello reply; keep its nonce (write proofs are bound to it)."""
        parser = HelloReplyReader()
        try:
            head = await reader.readexactly(HelloReplyReader.max_size() - 255)
            hello = parser.feed(head)
            if hello is None:  # the versions the service speaks follow
                hello = parser.feed(await reader.readexactly(head[-1]))
        except (asyncio.IncompleteReadError, ConnectionResetError):
            closed = "the connection closed during the hello"
            if self.tls is None:
                closed += " (if the registry serves TLS, use a fastnats:// URL)"
            raise RegistryUnavailableError(f"{self.where}: {closed}") from None
        except ControlProtocolError as exc:
            raise ControlProtocolError(f"{self.where}: not a fastnat registry ({exc})") from None
        assert hello is not None
        if hello.status == HelloStatus.BUSY:
            raise RegistryUnavailableError(f"{self.where}: the registry is at its connection limit (max_connections)")
        if hello.status == HelloStatus.IP_CONNECTIONS:
            raise RegistryUnavailableError(
                f"{self.where}: the registry is at its connection limit for this address (max_connections_per_ip)"
            )
        error = hello_error(hello, self.where)
        if isinstance(error, ForwarderBusyError):  # another limit of a forwarder hosting the registry
            raise RegistryUnavailableError(str(error))
        if error is not None:
            raise error
        self._nonce = hello.nonce
