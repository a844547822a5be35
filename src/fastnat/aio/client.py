"""The client side of the NAT layer, for asyncio: reach a server by its id.

A client dials a forwarder, says hello as role ``C`` and sends one request in
the same write; on ``CONFIRMED`` the same TCP connection is the end-to-end
byte stream to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastnat.aio._control import HandshakeBuffer, read_message
from fastnat.errors import ControlProtocolError, ForwarderUnreachableError, NATLayerError
from fastnat.protocol import (
    ROLE_CLIENT,
    HelloReplyReader,
    Reply,
    Status,
    encode_hello,
    encode_request,
    hello_error,
    parse_reply,
    reply_error,
)
from fastnat.locate import (
    cached_forwarders,
    forget_server,
    forwarders_for_client,
    forwarders_for_server,
    remember_working,
)
from fastnat.settings import choose_forwarders, parse_address, registry_url
from fastnat.tls import client_tls, closed_during_hello, connect_failure, connect_options

__all__ = [
    "open_connection",
    "open_transport",
    "request",
    "external_address",
    "check_bidirectional",
    "combine_failures",
    "dial",
]

T = TypeVar("T")

# StreamReader limit of a client connection (as asyncio's default is 64 KiB,
# a larger one means fewer pauses on fast transfers).
DEFAULT_LIMIT = 256 * 1024


def _where(host: str, port: int) -> str:
    return f"forwarder {host}:{port}"


async def dial(where: str, connecting: Awaitable[T], timeout: float, tls: bool) -> T:
    """Await ``connecting`` (a connection, and its TLS handshake if ``tls``)
    within ``timeout``; a failure is a :class:`ForwarderUnreachableError`
    that says why (refused, timed out, certificate not trusted...)."""
    try:
        async with asyncio.timeout(timeout):
            return await connecting
    except (TimeoutError, asyncio.TimeoutError):
        what = "connection and TLS handshake" if tls else "connection"
        raise ForwarderUnreachableError(f"{where}: no {what} within {timeout:g} s") from None
    except OSError as exc:
        raise ForwarderUnreachableError(f"{where}: {connect_failure(exc, tls)}") from exc


async def read_hello_reply(reader: asyncio.StreamReader, where: str, tls: bool = False) -> Any:
    parser = HelloReplyReader()
    try:
        head = await reader.readexactly(HelloReplyReader.max_size() - 255)
        reply = parser.feed(head)
        if reply is None:
            reply = parser.feed(await reader.readexactly(head[-1]))
    except asyncio.IncompleteReadError:
        raise ControlProtocolError(f"{where}: {closed_during_hello(tls)}") from None
    except ControlProtocolError as exc:
        raise ControlProtocolError(f"{where}: {exc}") from None
    assert reply is not None
    return reply


async def request(
    host: str,
    port: int,
    name: str,
    value: Any = None,
    *,
    timeout: float = 5.0,
    limit: int = DEFAULT_LIMIT,
    ssl: Any = None,
    local_addr: tuple[str, int] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Reply]:
    """Send one client request to a forwarder; returns the connection and the reply.

    ``timeout`` bounds the connect and the handshake. Connection failures
    raise :class:`ForwarderUnreachableError`. ``ssl``: TLS to the forwarder
    (see :func:`fastnat.tls.client_tls`; None: the configured default).
    """
    where = _where(host, port)
    context = client_tls(ssl)
    reader, writer = await dial(
        where,
        asyncio.open_connection(host, port, limit=limit, local_addr=local_addr, **connect_options(context, host, timeout)),
        timeout,
        context is not None,
    )
    try:
        writer.write(encode_hello(ROLE_CLIENT) + encode_request(1, name, value))

        async def handshake() -> Reply:
            hello = await read_hello_reply(reader, where, context is not None)
            error = hello_error(hello, where)
            if error is not None:
                raise error
            message = await read_message(reader)
            if message is None:
                raise ForwarderUnreachableError(f"{where}: the connection closed before the reply")
            return parse_reply(message)

        try:
            async with asyncio.timeout(timeout):
                reply = await handshake()
        except (TimeoutError, asyncio.TimeoutError):
            raise ForwarderUnreachableError(f"{where}: no answer within {timeout:g} s") from None
        except (ConnectionError, ssl_module.SSLError) as exc:
            raise ForwarderUnreachableError(f"{where}: {exc}") from exc
        except ControlProtocolError as exc:
            if where in str(exc):
                raise
            raise type(exc)(f"{where}: {exc}") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer, reply


def combine_failures(what: str, failures: list[tuple[str, BaseException]]) -> NATLayerError:
    """One error naming every forwarder's failure (the seed raised one such error)."""
    if len(failures) == 1:
        error = failures[0][1]
        if isinstance(error, NATLayerError):
            error.failures = list(failures)
            return error
    causes = [e for _, e in failures if not isinstance(e, ForwarderUnreachableError)]
    cls = type(causes[-1]) if causes and isinstance(causes[-1], NATLayerError) else ForwarderUnreachableError
    detail = "; ".join(str(e) for _, e in failures)
    return cls(f"{what} failed on every forwarder tried: {detail}", failures=failures)


async def open_connection(
    server_id: str,
    port: int,
    *,
    forwarder: str | tuple[str, int] | None = None,
    timeout: float = 5.0,
    limit: int = DEFAULT_LIMIT,
    ssl: Any = None,
    local_addr: tuple[str, int] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``port`` of the server registered as ``server_id``.

    Shaped like :func:`asyncio.open_connection`; the connection is a plain
    TCP connection to the forwarder, relayed to the server. ``forwarder``
    names one (``"host:port"``); by default the configured ones are tried in
    order. ``ssl``: TLS to the forwarder, an ``ssl.SSLContext``, a CA file
    path, True (the system's CAs) or False (plain TCP); None takes the
    configured default (:mod:`fastnat.tls`). Statuses raise their own errors
    (:mod:`fastnat.errors`).
    """
    explicit = None if forwarder is None else parse_address(forwarder)
    failures: list[tuple[str, BaseException]] = []
    async for host, fport in _client_candidates(server_id, explicit, failures):
        try:
            reader, writer, reply = await request(
                host,
                fport,
                "client_init",
                {"server": server_id, "port": port},
                timeout=timeout,
                limit=limit,
                ssl=ssl,
                local_addr=local_addr,
            )
        except NATLayerError as exc:
            failures.append((_where(host, fport), exc))
            continue
        if reply.status == Status.CONFIRMED:
            remember_working(server_id, (host, fport))
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer
        writer.close()
        failures.append((_where(host, fport), reply_error(reply, f"{server_id!r} port {port} via {_where(host, fport)}")))
    forget_server(server_id)
    raise combine_failures(f"connecting to {server_id!r} port {port}", failures)


async def _client_candidates(
    server_id: str, explicit: tuple[str, int] | None, failures: list[tuple[str, BaseException]]
) -> AsyncIterator[tuple[str, int]]:
    """The forwarders to try for ``server_id``: those that worked before; if
    they all fail, a fresh lookup (the cache entry is dropped), skipping the
    ones tried."""
    tried: set[tuple[str, int]] = set()
    cached = explicit is None and bool(cached_forwarders(server_id))
    for fresh in ((False, True) if cached else (False,)):
        if fresh:
            forget_server(server_id)
        try:
            candidates = await forwarders_for_client(server_id, explicit, fresh=fresh)
        except NATLayerError as exc:
            if fresh and failures:
                failures.append(("lookup", exc))
                return
            raise
        for address in candidates:
            if address not in tried:
                tried.add(address)
                yield address


async def open_transport(
    server_id: str,
    port: int,
    *,
    forwarder: str | tuple[str, int] | None = None,
    timeout: float = 5.0,
    ssl: Any = None,
) -> tuple[asyncio.Transport, bytes, bool]:
    """Like :func:`open_connection`, but returns the bare TCP transport, the
    bytes the server already sent, and whether it already ended its side
    (FIN), for a protocol to take over (``transport.set_protocol``; reading
    is paused until it calls ``resume_reading``). For relays and tools that
    splice connections. Over TLS (``ssl``, as for :func:`open_connection`)
    the transport is asyncio's TLS transport, which cannot half-close."""
    explicit = None if forwarder is None else parse_address(forwarder)
    context = client_tls(ssl)
    loop = asyncio.get_running_loop()
    failures: list[tuple[str, BaseException]] = []
    async for host, fport in _client_candidates(server_id, explicit, failures):
        where = _where(host, fport)
        connecting = loop.create_connection(HandshakeBuffer, host, fport, **connect_options(context, host, timeout))
        try:
            transport, holder = await dial(where, connecting, timeout, context is not None)
        except ForwarderUnreachableError as exc:
            failures.append((where, exc))
            continue
        try:
            transport.write(encode_hello(ROLE_CLIENT) + encode_request(1, "client_init", {"server": server_id, "port": port}))
            deadline = loop.time() + timeout
            try:
                hello, _ = await holder.read_hello_reply(timeout)
            except ConnectionError:
                raise ControlProtocolError(f"{where}: {closed_during_hello(context is not None)}") from None
            error = hello_error(hello, where)
            if error is not None:
                raise error
            reply = parse_reply(await holder.read_message(max(0.0, deadline - loop.time())))
        except (TimeoutError, asyncio.TimeoutError):
            transport.abort()
            failures.append((where, ForwarderUnreachableError(f"{where}: no answer within {timeout:g} s")))
            continue
        except ConnectionError as exc:
            transport.abort()
            failures.append((where, ForwarderUnreachableError(f"{where}: {exc}")))
            continue
        except NATLayerError as exc:
            transport.abort()
            failures.append((where, exc))
            continue
        if reply.status != Status.CONFIRMED:
            transport.close()
            failures.append((where, reply_error(reply, f"{server_id!r} port {port} via {where}")))
            continue
        remember_working(server_id, (host, fport))
        transport.pause_reading()
        return transport, holder.take_rest(), holder.eof
    forget_server(server_id)
    raise combine_failures(f"connecting to {server_id!r} port {port}", failures)


async def _candidates(forwarder: str | tuple[str, int] | None) -> list[tuple[str, int]]:
    """Forwarders for a request any of them answers: explicit, else advertised, else static."""
    if forwarder is not None:
        return [parse_address(forwarder)]
    if registry_url():
        return [f.client_address for f in await forwarders_for_server()]
    return choose_forwarders()


async def _simple_request(
    forwarder: str | tuple[str, int] | None, name: str, value: Any, timeout: float, ssl: Any = None
) -> Any:
    failures: list[tuple[str, BaseException]] = []
    for host, port in await _candidates(forwarder):
        try:
            _reader, writer, reply = await request(host, port, name, value, timeout=timeout, ssl=ssl)
        except NATLayerError as exc:
            failures.append((_where(host, port), exc))
            continue
        if writer.get_extra_info("ssl_object") is not None:
            # The reply is read whole: nothing to wait for, and a TLS close
            # waits for the peer's close_notify (up to 30 s) before it lets
            # the socket go.
            writer.transport.abort()
        else:
            writer.close()
        if reply.status != Status.OK:
            failures.append((_where(host, port), reply_error(reply, f"{name} at {_where(host, port)}")))
            continue
        return reply.value
    raise combine_failures(name, failures)


async def external_address(
    forwarder: str | tuple[str, int] | None = None, *, timeout: float = 5.0, ssl: Any = None
) -> tuple[str, int]:
    """The address (ip, port) a forwarder sees this host connect from
    (``ssl`` as for :func:`open_connection`)."""
    value = await _simple_request(forwarder, "externaladdr", None, timeout, ssl)
    return str(value["ip"]), int(value["port"])


async def check_bidirectional(
    local_ip: str, port: int, forwarder: str | tuple[str, int] | None = None, *, timeout: float = 5.0, ssl: Any = None
) -> bool:
    """True when this host needs the NAT layer: a forwarder cannot dial
    ``local_ip:port`` back (the seed's ``nat_check_bi_directional``).

    Listens on ``local_ip:port`` for the forwarder's probe meanwhile (the
    probe is plain TCP; ``ssl`` is for the request to the forwarder).
    """

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(reader.read(64), timeout)
            writer.write(data)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(echo, local_ip, port)
    try:
        value = await _simple_request(forwarder, "bidirectional", {"ip": local_ip, "port": port}, timeout, ssl)
    finally:
        listener.close()
        await listener.wait_closed()
    return not bool(value["reachable"])
