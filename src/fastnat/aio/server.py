"""The server side of the NAT layer, for asyncio: be reachable by an id.

A server dials a forwarder (it can dial out even from behind a NAT), says
hello as role ``S``, and its TCP connection becomes a multiplexer session.
Over a control stream it registers its id and ports. For each client the
forwarder opens a stream whose first message is the ``open`` request (port
and the client's address); the server accepts it and hands the stream to the
handler registered for that port.

One id has one :class:`Registration` per event loop, whatever the number of
ports, holding one session per forwarder it is registered at (``redundancy``
of them). With ``persist`` each survives the loss of its forwarder by
reconnecting (to the same or another one) with capped, jittered exponential
backoff and registering everything again. With a registry, the id is
announced as ``__NAT_SRV__<id> -> forwarderip*clientport`` for each
forwarder, renewed every ``announce_interval`` and withdrawn at once on stop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from fastnat.aio._control import FirstMessage, HandshakeBuffer, read_message
from fastnat.aio.client import combine_failures, dial
from fastnat.aio.session import MuxSession
from fastnat.aio.stream import MuxStream, StreamTransport
from fastnat.discovery import Registry
from fastnat.errors import (
    AuthenticationError,
    ControlProtocolError,
    ForwarderUnreachableError,
    IdTakenError,
    NATLayerError,
)
from fastnat.locate import ForwarderAddress, forwarders_for_server, server_key, shared_registry
from fastnat.mux_config import MuxConfig
from fastnat.protocol import (
    ROLE_SERVER,
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
from fastnat.settings import get_settings, parse_address, process_secret
from fastnat.tls import client_tls, closed_during_hello, connect_options

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


class _Link:
    """One session to one forwarder, with its control stream."""

    def __init__(self, registration: Registration, forwarder: ForwarderAddress) -> None:
        self.registration = registration
        self.forwarder = forwarder
        self.where = f"forwarder {forwarder.host}:{forwarder.port}"
        self.session: MuxSession | None = None
        self._control: MuxStream | None = None
        self._control_lock = asyncio.Lock()
        self._request_id = 0
        self.registered = False
        self.supervisor: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def alive(self) -> bool:
        return self.registered and self.session is not None and not self.session.is_closing()

    def __repr__(self) -> str:
        return f"<link {self.registration.server_id!r} at {self.where} alive={self.alive}>"

    async def connect(self) -> None:
        """Dial, say hello as a server, register the id and every port."""
        reg = self.registration
        host, port = self.forwarder.host, self.forwarder.port
        where = self.where
        loop = asyncio.get_running_loop()
        settings = get_settings()
        tls = reg._tls
        connecting = loop.create_connection(HandshakeBuffer, host, port, **connect_options(tls, host, reg._connect_timeout))
        transport, hello = await dial(where, connecting, reg._connect_timeout, tls is not None)
        session: MuxSession | None = None
        try:
            transport.write(encode_hello(ROLE_SERVER))
            try:
                reply, rest = await hello.read_hello_reply(reg._connect_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                raise ForwarderUnreachableError(f"{where}: no hello within {reg._connect_timeout:g} s") from None
            except ConnectionError:
                raise ForwarderUnreachableError(f"{where}: {closed_during_hello(tls is not None)}") from None
            except ControlProtocolError as exc:
                raise ControlProtocolError(f"{where}: {exc}") from None
            error = hello_error(reply, where)
            if error is not None:
                raise error
            session = MuxSession.from_transport(
                transport,
                client=True,
                config=reg._config,
                initial_data=rest,
                keepalive_interval=settings.keepalive_interval,
                keepalive_timeout=settings.keepalive_timeout,
            )
            self.session = session
            self._control = await session.open_stream()
            proof = registration_proof(reg._secret, reply.nonce, reg.server_id) if reg._secret else None
            await self.request("reg_serv", {"server": reg.server_id, "proof": proof})
            for registered_port in list(reg.ports):
                await self.request("reg_port", {"server": reg.server_id, "port": registered_port})
        except BaseException:
            if session is not None:
                session.close()
            else:
                transport.abort()
            self.session = None
            self._control = None
            raise
        self.registered = True
        reg._spawn(self._accept_streams(session))
        log.info("%r registered at %s", reg.server_id, where)

    async def request(self, name: str, value: Any) -> Any:
        """One control request; raises the error its status maps to."""
        control = self._control
        where = self.where
        if control is None:
            raise ForwarderUnreachableError(f"{where}: not connected")
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
            raise reply_error(reply, f"{name} {self.registration.server_id!r} at {where}")
        return reply.value

    async def _accept_streams(self, session: MuxSession) -> None:
        reg = self.registration
        try:
            while True:
                transport = await session.accept_transport()
                reg._serve_stream(transport)
        except ConnectionError:
            pass

    async def close(self, deregister: bool) -> None:
        self.closed = True
        if deregister and self.alive:
            try:
                await self.request("dereg_serv", {"server": self.registration.server_id})
            except (NATLayerError, OSError) as exc:
                log.info("dereg_serv %r at %s: %s", self.registration.server_id, self.where, exc)
        self.registered = False
        session = self.session
        if session is not None:
            session.close()
            await session.wait_closed()


class Registration:
    """One server id, held at one or more forwarders (``redundancy``), with
    its ports and their handlers, announced in the registry if there is one."""

    def __init__(
        self,
        server_id: str,
        *,
        forwarder: tuple[str, int] | None = None,
        secret: bytes | None = None,
        persist: bool = True,
        config: MuxConfig | None = None,
        connect_timeout: float = 5.0,
        redundancy: int = 1,
        registry: Registry | None = None,
        ssl: Any = None,
    ) -> None:
        self.server_id = validate_server_id(server_id)
        # TLS to the forwarders (see fastnat.tls.client_tls); None: plain TCP.
        self._tls = client_tls(ssl)
        if type(redundancy) is not int or redundancy < 1:
            raise ValueError(f"redundancy must be a positive integer, got {redundancy!r}")
        if forwarder is not None and redundancy > 1:
            raise ValueError("redundancy above 1 needs several forwarders: name none, configure a registry or a list")
        self._forwarder = forwarder
        settings = get_settings()
        self._secret = secret if secret is not None else process_secret()
        self.persist = persist
        self.redundancy = redundancy
        self._config = config or settings.mux_config
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self._registry = registry if registry is not None else shared_registry(secret=self._secret)
        self.ports: dict[int, StreamHandler] = {}
        self.error_delegates: list[ErrorDelegate] = []
        self.links: list[_Link] = []
        self._closing = False
        self._announcer: asyncio.Task[None] | None = None
        self._announced: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisors: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    # ----------------------------------------------------------- state

    @property
    def alive(self) -> bool:
        """True while registered at at least one forwarder."""
        return any(link.alive for link in self.links)

    @property
    def session(self) -> MuxSession | None:
        """The session of the first live link (of the first link if none is live)."""
        for link in self.links:
            if link.alive:
                return link.session
        return self.links[0].session if self.links else None

    @property
    def forwarder_address(self) -> tuple[str, int] | None:
        for link in self.links:
            if link.alive:
                return (link.forwarder.host, link.forwarder.port)
        return None

    @property
    def forwarder_addresses(self) -> list[tuple[str, int]]:
        """Where the id is registered now."""
        return [(link.forwarder.host, link.forwarder.port) for link in self.links if link.alive]

    def __repr__(self) -> str:
        where = ", ".join(f"{h}:{p}" for h, p in self.forwarder_addresses) or "-"
        return f"<Registration {self.server_id!r} at {where} ports={sorted(self.ports)} alive={self.alive}>"

    # ----------------------------------------------------------- setup

    async def _candidates(self, exclude: set[ForwarderAddress]) -> list[ForwarderAddress]:
        found = await forwarders_for_server(self._forwarder, registry=self._registry)
        return [f for f in found if f not in exclude]

    def _in_use(self) -> set[ForwarderAddress]:
        return {link.forwarder for link in self.links if not link.closed}

    async def start(self) -> None:
        """Register at ``redundancy`` forwarders (at least one, or raise)."""
        failures: list[tuple[str, BaseException]] = []
        for forwarder in await self._candidates(set()):
            if len(self.links) >= self.redundancy:
                break
            link = _Link(self, forwarder)
            try:
                await link.connect()
            except (NATLayerError, OSError) as exc:
                failures.append((link.where, exc))
                if isinstance(exc, (IdTakenError, AuthenticationError)) and self._forwarder is not None:
                    break
                continue
            self.links.append(link)
        if not self.links:
            raise combine_failures(f"registering {self.server_id!r}", failures)
        if len(self.links) < self.redundancy:
            log.warning("%r: registered at %d of %d forwarders", self.server_id, len(self.links), self.redundancy)
        for link in self.links:
            link.supervisor = self._start_supervisor(link)
        # the missing links are made by a supervisor of their own
        for _ in range(self.redundancy - len(self.links)):
            self._start_supervisor(None)
        await self._announce()
        if self._registry is not None:
            self._announcer = self._loop.create_task(self._announce_forever())

    # ----------------------------------------------------------- registry

    async def _announce(self) -> None:
        """Announce every live link under __NAT_SRV__<id>; withdraw the others."""
        registry = self._registry
        if registry is None:
            return
        settings = get_settings()
        key = server_key(self.server_id)
        now = {link.forwarder.server_value() for link in self.links if link.alive}
        for value in now:
            try:
                await registry.announce(key, value, settings.announce_ttl)
            except (OSError, ValueError) as exc:
                log.warning("announcing %r in %s failed: %s", self.server_id, registry.url, exc)
        for value in self._announced - now:
            await self._withdraw(key, value)
        self._announced = now

    async def _withdraw(self, key: str, value: str) -> None:
        registry = self._registry
        if registry is None:
            return
        try:
            await registry.withdraw(key, value)
        except (OSError, ValueError) as exc:
            log.info("withdrawing %r from %s failed: %s", self.server_id, registry.url, exc)

    async def _announce_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(get_settings().announce_interval)
            await self._announce()

    # ----------------------------------------------------------- ports

    async def add_port(self, port: int, handler: StreamHandler) -> None:
        """Register ``port`` (at every forwarder the id is held at)."""
        validate_port(port)
        if port in self.ports:
            raise ValueError(f"{self.server_id!r} already listens on port {port}")
        self.ports[port] = handler
        try:
            for link in list(self.links):
                if link.alive:
                    await link.request("reg_port", {"server": self.server_id, "port": port})
        except BaseException:
            self.ports.pop(port, None)
            raise

    async def remove_port(self, port: int) -> None:
        """Deregister ``port``; with no port left, deregister the id and close."""
        if self.ports.pop(port, None) is None:
            return
        for link in list(self.links):
            if link.alive:
                try:
                    await link.request("dereg_port", {"server": self.server_id, "port": port})
                except (NATLayerError, OSError) as exc:
                    log.info("dereg_port %d of %r at %s: %s", port, self.server_id, link.where, exc)
        if not self.ports:
            await self.close()

    # ----------------------------------------------------------- streams

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _serve_stream(self, transport: StreamTransport) -> None:
        """Read the forwarder's open request on a new stream, then hand the
        stream to its port's handler (callbacks and a timer: no task per stream)."""
        first = FirstMessage()
        transport.attach(first)
        loop = self._loop

        def drop(reason: object) -> None:
            log.warning("%r: dropping a stream without a valid open request: %s", self.server_id, reason)
            transport.abort()

        def timed_out() -> None:
            if not first.message.done():
                first.message.cancel()
                drop(f"none within {_OPEN_REQUEST_TIMEOUT:g} s")

        timer = loop.call_later(_OPEN_REQUEST_TIMEOUT, timed_out)

        def received(future: asyncio.Future[Any]) -> None:
            timer.cancel()
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                drop(error)
                return
            try:
                request = parse_request(future.result())
                if request.request != "open" or request.value["server"] != self.server_id:
                    raise ControlProtocolError(f"expected an open request for {self.server_id!r}, got {request.request!r}")
            except ControlProtocolError as exc:
                drop(exc)
                return
            self._open(transport, request, bytes(first.rest))

        first.message.add_done_callback(received)

    def _open(self, transport: StreamTransport, request: Any, initial: bytes) -> None:
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
            handler(transport, initial)
        except Exception:
            log.exception("%r port %d: the handler failed; closing its stream", self.server_id, port)
            transport.abort()

    # ----------------------------------------------------------- life

    def _start_supervisor(self, link: _Link | None) -> asyncio.Task[None]:
        task = self._loop.create_task(self._supervise(link))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        return task

    async def _supervise(self, link: _Link | None) -> None:
        """Keep one link up: wait for it to die; with ``persist``, make it
        again (at the same or another forwarder no other link uses)."""
        settings = get_settings()
        while not self._closing:
            if link is not None:
                session = link.session
                if session is not None:
                    await session.wait_closed()
                if self._closing or link.closed:
                    return
                link.registered = False
                error: BaseException = (session._error if session is not None else None) or ConnectionResetError(
                    "the forwarder closed the session"
                )
                self._report(session, f"forwarder link {link.where}", error)
                if link in self.links:
                    self.links.remove(link)
                await self._announce()
                if not self.persist:
                    log.warning("%r lost %s and does not persist: %s", self.server_id, link.where, error)
                    if not self.links:
                        self._forget()
                    return
            failed = link.forwarder if link is not None else None
            link = await self._relink(settings.reconnect_initial_delay, settings.reconnect_max_delay, failed)
            if link is None:
                return

    async def _relink(self, delay: float, max_delay: float, failed: ForwarderAddress | None = None) -> _Link | None:
        """Make a new link, with capped, jittered exponential backoff; the
        forwarder that just failed is tried last (it may be hung, and stays
        advertised until its TTL runs out)."""
        while not self._closing:
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            if self._closing:
                return None
            failures: list[str] = []
            try:
                candidates = await self._candidates(self._in_use())
            except (NATLayerError, OSError) as exc:
                candidates = []
                failures.append(str(exc))
            if failed in candidates:
                candidates.remove(failed)
                candidates.append(failed)
            for forwarder in candidates:
                link = _Link(self, forwarder)
                try:
                    await link.connect()
                except (NATLayerError, OSError) as exc:
                    failures.append(str(exc))
                    continue
                if self._closing:
                    await link.close(deregister=True)
                    return None
                self.links.append(link)
                self.reconnects += 1
                await self._announce()
                return link
            log.info("%r: no forwarder took the registration (next try in about %.1f s): %s",
                     self.server_id, delay, "; ".join(failures) or "none found")
            delay = min(delay * 2, max_delay)
        return None

    def _report(self, session: Any, where: str, error: BaseException) -> None:
        for delegate in list(self.error_delegates):
            try:
                delegate(session, where, error)
            except Exception:
                log.exception("%r: an error delegate failed", self.server_id)

    async def close(self) -> None:
        """Withdraw the announcements, deregister the id everywhere and close
        the sessions; harmless when repeated."""
        if self._closing:
            return
        self._closing = True
        self._forget()
        if self._announcer is not None and self._announcer is not asyncio.current_task():
            self._announcer.cancel()
        key = server_key(self.server_id)
        for value in list(self._announced):
            await self._withdraw(key, value)
        self._announced.clear()
        for task in list(self._supervisors):
            if task is not asyncio.current_task():
                task.cancel()
        for link in list(self.links):
            await link.close(deregister=True)
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
    redundancy: int = 1,
    ssl: Any = None,
) -> Registration:
    """The running registration of ``server_id`` on this loop, started if need
    be (``ssl``: TLS to the forwarders, see :func:`fastnat.tls.client_tls`;
    it applies when the registration starts)."""
    validate_server_id(server_id)
    key = (id(asyncio.get_running_loop()), server_id)
    registration = _registrations.get(key)
    if registration is not None and not registration._closing:
        return registration
    registration = Registration(
        server_id,
        forwarder=forwarder,
        secret=secret,
        persist=persist,
        config=config,
        connect_timeout=connect_timeout,
        redundancy=redundancy,
        ssl=ssl,
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
    redundancy: int = 1,
    ssl: Any = None,
) -> NATServer:
    """Serve ``port`` of ``server_id`` through a forwarder; shaped like
    :func:`asyncio.start_server`.

    ``client_connected_cb(reader, writer)`` runs for each client (as a task
    if it is a coroutine function); ``writer.get_extra_info("peername")`` is
    the client's real address. With ``persist`` the registration survives
    the loss of its forwarder; ``error_callback(session, where, exc)`` is
    called at each such loss. ``redundancy=N`` holds the id at N forwarders
    at once (found in the registry or the configured list), so that clients
    reach it through the others when one dies. ``ssl``: TLS to the
    forwarders, an ``ssl.SSLContext``, a CA file path, True (the system's
    CAs) or False; None takes the configured default (:mod:`fastnat.tls`).
    """
    if isinstance(forwarder, str):
        forwarder = parse_address(forwarder)
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    registration = await get_registration(
        server_id, forwarder=forwarder, secret=secret_bytes, persist=persist, config=config,
        connect_timeout=connect_timeout, redundancy=redundancy, ssl=ssl,
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

