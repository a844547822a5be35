"""The server side of the NAT layer, for asyncio: be reachable by an id.

A server dials a forwarder (it can dial out even from behind a NAT), says
hello as role ``S``, and its TCP connection becomes a multiplexer session.
Over a control stream it registers its id and ports. For each client the
forwarder opens a stream whose first message is the ``open`` request (port
and the client's address); the server accepts it and hands the stream to the
handler registered for that port.

One id has one :class:`Registration` (one session) per event loop, whatever
the number of ports; with ``persist`` it survives the loss of its forwarder
by reconnecting (to the same or another one) with capped, jittered
exponential backoff and registering everything again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from fastnat.aio._control import FirstMessage, read_message
from fastnat.aio.client import combine_failures
from fastnat.aio.session import MuxSession
from fastnat.aio.stream import MuxStream, StreamTransport
from fastnat.errors import ControlProtocolError, ForwarderUnreachableError, NATLayerError
from fastnat.mux_config import MuxConfig
from fastnat.protocol import (
    ROLE_SERVER,
    HelloReplyReader,
    Status,
    encode_hello,
    encode_reply,
    encode_request,
    hello_error,
    parse_reply,
    parse_request,
    registration_proof,
    reply_error,
    validate_port,
    validate_server_id,
)
from fastnat.settings import choose_forwarders, get_settings, secret_from_env

__all__ = ["Registration", "NATServer", "start_server", "ErrorDelegate"]

log = logging.getLogger("fastnat.server")

ErrorDelegate = Callable[[Any, str, BaseException], Any]
# A port's handler gets the accepted stream's transport and any bytes that
# arrived with the open request.
StreamHandler = Callable[[StreamTransport, bytes], None]

# Reading the forwarder's open request on a new stream: it is the stream's
# first message and follows the stream's SYN at once.
_OPEN_REQUEST_TIMEOUT = 10.0

# (loop, server id) -> its registration
_registrations: dict[tuple[int, str], Registration] = {}


class _HelloClient(asyncio.Protocol):
    """Holds a fresh connection until MuxSession.from_transport takes it over."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionResetError("the forwarder closed the connection")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read_hello_reply(self, timeout: float) -> tuple[Any, bytes]:
        """The forwarder's hello reply, and the bytes that followed it."""
        parser = HelloReplyReader()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.buffer:
                reply = parser.feed(bytes(self.buffer))
                self.buffer.clear()
                if reply is not None:
                    return reply, parser.rest
            if self.error is not None:
                raise self.error
            self.waiter = loop.create_future()
            await asyncio.wait_for(self.waiter, max(0.0, deadline - loop.time()))


class Registration:
    """One server id at a forwarder, with its ports and their handlers."""

    def __init__(
        self,
        server_id: str,
        *,
        forwarder: tuple[str, int] | None = None,
        secret: bytes | None = None,
        persist: bool = True,
        config: MuxConfig | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.server_id = validate_server_id(server_id)
        self._forwarder = forwarder
        settings = get_settings()
        self._secret = secret if secret is not None else (settings.secret or secret_from_env())
        self.persist = persist
        self._config = config or settings.mux_config
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self.ports: dict[int, StreamHandler] = {}
        self.error_delegates: list[ErrorDelegate] = []
        self.session: MuxSession | None = None
        self.forwarder_address: tuple[str, int] | None = None
        self._control: MuxStream | None = None
        self._control_lock = asyncio.Lock()
        self._request_id = 0
        self._alive = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reconnects = 0

    # ----------------------------------------------------------- state

    @property
    def alive(self) -> bool:
        """True while connected to a forwarder and registered there."""
        return self._alive and self.session is not None and not self.session.is_closing()

    def __repr__(self) -> str:
        where = f"{self.forwarder_address[0]}:{self.forwarder_address[1]}" if self.forwarder_address else "-"
        return f"<Registration {self.server_id!r} at {where} ports={sorted(self.ports)} alive={self.alive}>"

    # ----------------------------------------------------------- setup

    def _candidates(self) -> list[tuple[str, int]]:
        if self._forwarder is not None:
            return [self._forwarder]
        found = choose_forwarders()
        if self.forwarder_address in found:  # the one that worked goes first
            found.remove(self.forwarder_address)
            found.insert(0, self.forwarder_address)
        return found

    async def start(self) -> None:
        """Connect and register (trying each forwarder in turn); raise if none accepts."""
        await self._connect_any()
        self._supervisor = self._loop.create_task(self._supervise())

    async def _connect_any(self) -> None:
        failures: list[tuple[str, BaseException]] = []
        for host, port in self._candidates():
            try:
                await self._connect(host, port)
                return
            except (NATLayerError, OSError) as exc:
                failures.append((f"forwarder {host}:{port}", exc))
        raise combine_failures(f"registering {self.server_id!r}", failures)

    async def _connect(self, host: str, port: int) -> None:
        where = f"forwarder {host}:{port}"
        loop = self._loop
        settings = get_settings()
        try:
            transport, hello = await asyncio.wait_for(
                loop.create_connection(_HelloClient, host, port), self._connect_timeout
            )
        except (TimeoutError, asyncio.TimeoutError):
            raise ForwarderUnreachableError(f"{where}: no connection within {self._connect_timeout:g} s") from None
        except OSError as exc:
            raise ForwarderUnreachableError(f"{where}: {exc.strerror or exc}") from exc
        session: MuxSession | None = None
        try:
            transport.write(encode_hello(ROLE_SERVER))
            try:
                reply, rest = await hello.read_hello_reply(self._connect_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise ForwarderUnreachableError(f"{where}: no hello within {self._connect_timeout:g} s") from None
            except ConnectionError as exc:
                raise ForwarderUnreachableError(f"{where}: {exc}") from exc
            except ControlProtocolError as exc:
                raise ControlProtocolError(f"{where}: {exc}") from None
            error = hello_error(reply, where)
            if error is not None:
                raise error
            session = MuxSession.from_transport(
                transport,
                client=True,
                config=self._config,
                initial_data=rest,
                keepalive_interval=settings.keepalive_interval,
                keepalive_timeout=settings.keepalive_timeout,
            )
            control = await session.open_stream()
            self.session, self._control, self.forwarder_address = session, control, (host, port)
            proof = registration_proof(self._secret, reply.nonce, self.server_id) if self._secret else None
            await self._request("reg_serv", {"server": self.server_id, "proof": proof}, where)
            for registered_port in list(self.ports):
                await self._request("reg_port", {"server": self.server_id, "port": registered_port}, where)
        except BaseException:
            if session is not None:
                session.close()
            else:
                transport.abort()
            self.session = None
            self._control = None
            raise
        self._alive = True
        self._spawn(self._accept_streams(session))
        log.info("%r registered at %s", self.server_id, where)

    async def _request(self, name: str, value: Any, where: str | None = None) -> Any:
        """One control request; raises the error its status maps to."""
        control = self._control
        if control is None:
            raise ForwarderUnreachableError(f"{self.server_id!r} is not connected to a forwarder")
        if where is None and self.forwarder_address is not None:
            where = f"forwarder {self.forwarder_address[0]}:{self.forwarder_address[1]}"
        async with self._control_lock:
            self._request_id += 1
            control.write(encode_request(self._request_id, name, value))
            try:
                message = await asyncio.wait_for(read_message(control.reader), get_settings().request_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise ForwarderUnreachableError(f"{where}: no answer to {name}") from None
            except ConnectionError as exc:
                raise ForwarderUnreachableError(f"{where}: lost during {name}: {exc}") from exc
        if message is None:
            raise ForwarderUnreachableError(f"{where}: the control stream closed during {name}")
        reply = parse_reply(message)
        if reply.status != Status.OK:
            raise reply_error(reply, f"{name} {self.server_id!r} at {where}")
        return reply.value

    # ----------------------------------------------------------- ports

    async def add_port(self, port: int, handler: StreamHandler) -> None:
        """Register ``port`` (at the forwarder too, when connected)."""
        validate_port(port)
        if port in self.ports:
            raise ValueError(f"{self.server_id!r} already listens on port {port}")
        self.ports[port] = handler
        if self.alive:
            try:
                await self._request("reg_port", {"server": self.server_id, "port": port})
            except BaseException:
                self.ports.pop(port, None)
                raise

    async def remove_port(self, port: int) -> None:
        """Deregister ``port``; with no port left, deregister the id and close."""
        if self.ports.pop(port, None) is None:
            return
        if self.alive:
            try:
                await self._request("dereg_port", {"server": self.server_id, "port": port})
            except (NATLayerError, OSError) as exc:
                log.info("dereg_port %d of %r: %s", port, self.server_id, exc)
        if not self.ports:
            await self.close()

    # ----------------------------------------------------------- streams

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_streams(self, session: MuxSession) -> None:
        try:
            while True:
                transport = await session.accept_transport()
                self._spawn(self._serve_stream(transport))
        except ConnectionError:
            pass

    async def _serve_stream(self, transport: StreamTransport) -> None:
        first = FirstMessage()
        transport.attach(first)
        try:
            message = await asyncio.wait_for(first.message, _OPEN_REQUEST_TIMEOUT)
            request = parse_request(message)
            if request.request != "open" or request.value["server"] != self.server_id:
                raise ControlProtocolError(f"expected an open request for {self.server_id!r}, got {request.request!r}")
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, ControlProtocolError) as exc:
            log.warning("%r: dropping a stream without a valid open request: %s", self.server_id, exc)
            transport.abort()
            return
        port = request.value["port"]
        handler = self.ports.get(port)
        if handler is None:
            transport.write(encode_reply(request.id, Status.REFUSED, f"no listener on port {port}"))
            transport.close()
            return
        transport.write(encode_reply(request.id, Status.ACCEPTED, None))
        client_ip, client_port = request.value["client"]
        transport._extra["peername"] = (client_ip, client_port)
        transport._extra["server_id"] = self.server_id
        transport._extra["server_port"] = port
        try:
            handler(transport, bytes(first.rest))
        except Exception:
            log.exception("%r port %d: the handler failed; closing its stream", self.server_id, port)
            transport.abort()

    # ----------------------------------------------------------- life

    async def _supervise(self) -> None:
        """Wait for the session to end; with ``persist``, reconnect."""
        settings = get_settings()
        while not self._closing:
            session = self.session
            if session is not None:
                await session.wait_closed()
            if self._closing:
                return
            self._alive = False
            error: BaseException = (session._error if session is not None else None) or ConnectionResetError(
                "the forwarder closed the session"
            )
            self._report(session, "forwarder link", error)
            if not self.persist:
                log.warning("%r lost its forwarder and does not persist: %s", self.server_id, error)
                self._forget()
                return
            delay = settings.reconnect_initial_delay
            while not self._closing:
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                if self._closing:
                    return
                try:
                    await self._connect_any()
                    self.reconnects += 1
                    break
                except (NATLayerError, OSError) as exc:
                    log.info("%r: reconnecting failed (next try in about %.1f s): %s", self.server_id, delay, exc)
                    delay = min(delay * 2, settings.reconnect_max_delay)

    def _report(self, session: Any, where: str, error: BaseException) -> None:
        for delegate in list(self.error_delegates):
            try:
                delegate(session, where, error)
            except Exception:
                log.exception("%r: an error delegate failed", self.server_id)

    async def close(self) -> None:
        """Deregister the id and close the session; harmless when repeated."""
        if self._closing:
            return
        self._closing = True
        self._forget()
        if self.alive:
            try:
                await self._request("dereg_serv", {"server": self.server_id})
            except (NATLayerError, OSError) as exc:
                log.info("dereg_serv %r: %s", self.server_id, exc)
        self._alive = False
        session = self.session
        if session is not None:
            session.close()
            await session.wait_closed()
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            self._supervisor.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _forget(self) -> None:
        key = (id(self._loop), self.server_id)
        if _registrations.get(key) is self:
            del _registrations[key]


async def get_registration(
    server_id: str,
    *,
    forwarder: tuple[str, int] | None = None,
    secret: bytes | None = None,
    persist: bool = True,
    config: MuxConfig | None = None,
    connect_timeout: float = 5.0,
) -> Registration:
    """The running registration of ``server_id`` on this loop, started if need be."""
    validate_server_id(server_id)
    key = (id(asyncio.get_running_loop()), server_id)
    registration = _registrations.get(key)
    if registration is not None and not registration._closing:
        return registration
    registration = Registration(
        server_id, forwarder=forwarder, secret=secret, persist=persist, config=config, connect_timeout=connect_timeout
    )
    await registration.start()
    _registrations[key] = registration
    return registration


class NATServer:
    """A port of a server id, reachable through a forwarder; like ``asyncio.Server``."""

    def __init__(self, registration: Registration, port: int) -> None:
        self.registration = registration
        self.port = port
        self._closed = asyncio.get_running_loop().create_future()
        self._close_task: asyncio.Task[None] | None = None

    @property
    def server_id(self) -> str:
        return self.registration.server_id

    def is_serving(self) -> bool:
        return not self._closed.done() and self.port in self.registration.ports

    @property
    def alive(self) -> bool:
        """True while the forwarder link is up and registered."""
        return self.registration.alive

    def close(self) -> None:
        """Stop accepting (deregisters the port; the id too if it was the last)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            await self.registration.remove_port(self.port)
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> NATServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<NATServer {self.server_id!r} port {self.port} alive={self.alive}>"


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    server_id: str,
    port: int,
    *,
    forwarder: str | tuple[str, int] | None = None,
    secret: bytes | str | None = None,
    persist: bool = True,
    error_callback: ErrorDelegate | None = None,
    config: MuxConfig | None = None,
    limit: int = 256 * 1024,
    connect_timeout: float = 5.0,
) -> NATServer:
    """Serve ``port`` of ``server_id`` through a forwarder; shaped like
    :func:`asyncio.start_server`.

    ``client_connected_cb(reader, writer)`` runs for each client (as a task
    if it is a coroutine function); ``writer.get_extra_info("peername")`` is
    the client's real address. With ``persist`` the registration survives
    the loss of its forwarder; ``error_callback(session, where, exc)`` is
    called at each such loss.
    """
    if isinstance(forwarder, str):
        from fastnat.settings import _parse_one

        forwarder = _parse_one(forwarder)
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    registration = await get_registration(
        server_id, forwarder=forwarder, secret=secret_bytes, persist=persist, config=config,
        connect_timeout=connect_timeout,
    )
    if error_callback is not None:
        registration.error_delegates.append(error_callback)
    loop = asyncio.get_running_loop()

    def handle(transport: StreamTransport, initial: bytes) -> None:
        stream = MuxStream(transport, limit=limit, initial_data=initial)
        result = client_connected_cb(stream.reader, stream.writer)
        if asyncio.iscoroutine(result):
            task = loop.create_task(result)
            registration._tasks.add(task)
            task.add_done_callback(_log_task_error)
            task.add_done_callback(registration._tasks.discard)

    try:
        await registration.add_port(port, handle)
    except BaseException:
        if not registration.ports:
            await registration.close()
        raise
    return NATServer(registration, port)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a client handler failed", exc_info=task.exception())

