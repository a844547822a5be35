"""A multiplexer session over one TCP connection, for asyncio.

:class:`MuxSession` drives the sans-IO engine (:mod:`fastnat.mux`) from an
asyncio transport: reads land in one preallocated buffer (``recv_into``, no
allocation per read), the engine's events are dispatched to the streams, and
everything the engine queues — from any number of streams — goes out in one
write per event-loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastnat import mux
from fastnat._buffers import loop_read_buffer
from fastnat.aio.stream import MuxStream, StreamTransport
from fastnat.errors import MuxError, ProtocolError, SessionClosedError
from fastnat.mux_config import MuxConfig

__all__ = ["MuxSession", "ErrorCallback", "start_session_server", "live_sessions"]

log = logging.getLogger("fastnat.aio")

ErrorCallback = Callable[["MuxSession", str, BaseException], Any]

_DataReceived = mux.DataReceived
_WindowUpdated = mux.WindowUpdated
_StreamOpened = mux.StreamOpened
_StreamAccepted = mux.StreamAccepted
_StreamEnded = mux.StreamEnded
_StreamReset = mux.StreamReset
_PingReceived = mux.PingReceived
_PingAcknowledged = mux.PingAcknowledged
_GoAwayReceived = mux.GoAwayReceived

# hashicorp/yamux's defaults: a ping every 30 s; no answer within 10 s (its
# connection write timeout) and the session is declared dead.
DEFAULT_KEEPALIVE_INTERVAL = 30.0
DEFAULT_KEEPALIVE_TIMEOUT = 10.0
# The read buffer (one per event loop, shared by its sessions and splices:
# see fastnat._buffers), reused for every read. Large enough that a read
# drains most of what loopback or a fast link delivers at once (fewer
# syscalls), and allocated once, so no read allocates.
READ_BUFFER_SIZE = 256 * 1024
# The TCP transport's write buffer: above HIGH, streams stop handing data to
# the engine (their drain() waits) until it falls below LOW. 1 MiB rides out
# the moments when the kernel's socket buffer is full without stalling
# streams, and bounds what a session buffers for a slow connection.
TCP_WRITE_HIGH_WATER = 1024 * 1024
TCP_WRITE_LOW_WATER = 256 * 1024
# A stream's StreamReader buffers up to twice this before it pauses reading.
DEFAULT_STREAM_READ_LIMIT = 256 * 1024
# Queued output is written at once when it reaches this size; smaller writes
# are coalesced until the end of the loop iteration. Without it a writer that
# has window credit (drain() does not yield then) would fill a whole window
# in memory before the kernel saw a byte, and sender and receiver would take
# turns instead of working at the same time.
EAGER_FLUSH_SIZE = 64 * 1024

_GO_AWAY_NAMES = {0: "normal", 1: "protocol error", 2: "internal error"}

# Every session not yet garbage-collected, so that the blocking API can close
# the ones on its loop at interpreter exit.
_live: weakref.WeakSet[MuxSession] = weakref.WeakSet()


def live_sessions() -> list[MuxSession]:
    """The sessions of this process that still exist (open or not)."""
    return list(_live)


class MuxSession(asyncio.BufferedProtocol):
    """One yamux session over one TCP connection.

    Make one with :meth:`connect` (dial), :meth:`from_socket` (a connected
    socket), :meth:`from_transport` (take over an asyncio transport), or
    :func:`start_session_server` (accept). ``client`` is True on the dialling
    side, which opens odd-numbered streams.
    """

    def __init__(
        self,
        *,
        client: bool,
        config: MuxConfig | None = None,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        stream_read_limit: int = DEFAULT_STREAM_READ_LIMIT,
        loop: asyncio.AbstractEventLoop | None = None,
        engine: Any = None,
    ) -> None:
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError(f"keepalive_interval must be positive or None, got {keepalive_interval}")
        if keepalive_timeout <= 0:
            raise ValueError(f"keepalive_timeout must be positive, got {keepalive_timeout}")
        self._loop = loop or asyncio.get_running_loop()
        # ``engine``: a module with a ``Session`` class (fastnat._mux or
        # fastnat._mux_py), to choose the engine for this session; by default
        # the one fastnat.mux selected.
        session_class = mux.Session if engine is None else getattr(engine, "Session", engine)
        # time.monotonic, not loop.time(): uvloop's clock ticks in milliseconds,
        # too coarse for loopback round trips.
        self._engine = session_class(client, config, clock=time.monotonic)
        self._client = client
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._stream_read_limit = stream_read_limit
        self._transport: asyncio.Transport | None = None
        self._read_buffer = loop_read_buffer(READ_BUFFER_SIZE, self._loop)  # shared by the loop's connections
        self._streams: dict[int, StreamTransport] = {}
        self._accept_queue: deque[StreamTransport] = deque()
        self._accept_waiters: deque[asyncio.Future[None]] = deque()
        self._pings: dict[int, tuple[float, asyncio.Future[float] | None]] = {}
        self._flush_scheduled = False
        self._flushed_recently = False  # a write went out at once during this loop turn
        self._tcp_paused = False
        self._tcp_blocked: set[StreamTransport] = set()
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._keepalive_ping: int | None = None
        self._keepalive_deadline: asyncio.TimerHandle | None = None
        self._closing = False  # close() was called
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: BaseException | None = None
        self._error_callback: ErrorCallback | None = None
        self._connected: asyncio.Future[None] = self._loop.create_future()
        _live.add(self)

    # ------------------------------------------------------------ constructors

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        client: bool = True,
        config: MuxConfig | None = None,
        ssl: Any = None,
        server_hostname: str | None = None,
        local_addr: tuple[str, int] | None = None,
        **options: Any,
    ) -> MuxSession:
        """Dial ``host:port`` and start a session (the dialling side by default)."""
        loop = asyncio.get_running_loop()
        session = cls(client=client, config=config, loop=loop, **options)
        await loop.create_connection(
            lambda: session, host, port, ssl=ssl, server_hostname=server_hostname, local_addr=local_addr
        )
        return session

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, *, client: bool, config: MuxConfig | None = None, ssl: Any = None, **options: Any
    ) -> MuxSession:
        """Start a session on an already connected socket (dialled or accepted)."""
        loop = asyncio.get_running_loop()
        session = cls(client=client, config=config, loop=loop, **options)
        if ssl is not None and not client:
            raise ValueError("from_socket cannot start TLS on the accepting side; wrap it beforehand")
        await loop.create_connection(lambda: session, sock=sock, ssl=ssl)
        return session

    @classmethod
    def from_transport(
        cls,
        transport: asyncio.Transport,
        *,
        client: bool,
        config: MuxConfig | None = None,
        initial_data: bytes = b"",
        **options: Any,
    ) -> MuxSession:
        """Take over a connected asyncio transport (its old protocol is
        dropped); ``initial_data`` is what was already read from it."""
        session = cls(client=client, config=config, **options)
        transport.set_protocol(session)
        session.connection_made(transport)
        if initial_data:
            session._receive(memoryview(initial_data))
        return session

    # ------------------------------------------------------------ public API

    @property
    def client(self) -> bool:
        return self._client

    @property
    def engine(self) -> Any:
        """The sans-IO engine (``fastnat.mux.Session``) this session drives."""
        return self._engine

    @property
    def stream_count(self) -> int:
        """Streams the engine tracks."""
        return int(self._engine.stream_count)

    def is_closing(self) -> bool:
        return self._closing or self._closed.done()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._get_transport_info(name, default)

    def set_error_callback(self, callback: ErrorCallback | None) -> None:
        """Call ``callback(session, where, exception)`` once if the session dies
        from an error (not from :meth:`close`)."""
        self._error_callback = callback

    async def open_stream(self) -> MuxStream:
        """Open a stream to the peer; usable at once (yamux needs no round trip)."""
        return MuxStream(self._open_transport(), limit=self._stream_read_limit)

    async def accept_stream(self) -> MuxStream:
        """Wait for the peer to open a stream, and accept it."""
        return MuxStream(await self.accept_transport(), limit=self._stream_read_limit)

    def open_transport(self, extra: dict[str, Any] | None = None) -> StreamTransport:
        """Open a stream and return its bare transport; call ``attach(protocol)``."""
        return self._open_transport(extra)

    async def accept_transport(self) -> StreamTransport:
        """Like :meth:`accept_stream`, returning the bare transport (attach a protocol to it)."""
        while True:
            while self._accept_queue:
                transport = self._accept_queue.popleft()
                if transport._lost:
                    continue  # reset by the peer before it was accepted
                self._engine.accept_stream(transport.stream_id)
                self._schedule_flush()
                return transport
            self._raise_if_dead()
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._accept_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._accept_waiters:
                    self._accept_waiters.remove(waiter)

    def __aiter__(self) -> AsyncIterator[MuxStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[MuxStream]:
        while True:
            try:
                stream = await self.accept_stream()
            except ConnectionError:
                if self._error is None:
                    return  # closed normally
                raise
            yield stream

    async def ping(self, timeout: float | None = None) -> float:
        """Ping the peer; returns the round-trip time in seconds."""
        self._raise_if_dead()
        timeout = self._keepalive_timeout if timeout is None else timeout
        future: asyncio.Future[float] = self._loop.create_future()
        opaque = self._engine.ping()
        self._pings[opaque] = (time.monotonic(), future)
        self._flush()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(opaque, None)

    def go_away(self) -> None:
        """Refuse new streams from now on (a Go Away goes to the peer, which
        may open no more either); streams already open carry on."""
        if self._error is None and not self._closed.done():
            self._engine.go_away(0)
            self._flush()

    def close(self) -> None:
        """Send Go Away and close the connection (after what is queued)."""
        if self._closing or self._closed.done():
            return
        self._closing = True
        try:
            self._engine.go_away(0)
        except MuxError:
            pass
        self._flush()
        self._stop_keepalive()
        self._shutdown_streams(ConnectionAbortedError("the session was closed"))
        if self._transport is not None:
            self._transport.close()
        else:
            self._set_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> MuxSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        side = "client" if self._client else "server"
        state = "closed" if self._closed.done() else "closing" if self._closing else "open"
        return f"<MuxSession {side} {state} streams={len(self._streams)}>"

    # -------------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        try:
            transport.set_write_buffer_limits(TCP_WRITE_HIGH_WATER, TCP_WRITE_LOW_WATER)  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):
            pass
        if not self._connected.done():
            self._connected.set_result(None)
        # Measure the round trip at once: receive windows auto-tune from it
        # (without an RTT they stay at their initial size until the first
        # keepalive ping, which limits a stream to a window per round trip).
        try:
            opaque = self._engine.ping()
        except MuxError:
            pass
        else:
            self._pings[opaque] = (time.monotonic(), None)
            self._flush()
        self._start_keepalive()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer.get()

    def buffer_updated(self, nbytes: int) -> None:
        self._receive(self._read_buffer.filled(nbytes))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        if not self._closing and self._error is None:
            if exc is None:
                if self._engine.go_away_received:
                    reason: BaseException = ConnectionResetError("the peer closed the session after Go Away")
                    self._shutdown_streams(reason)
                    self._set_closed()
                    return
                exc = ConnectionResetError("the peer closed the connection without Go Away")
            self._die("connection", exc)
        self._set_closed()

    def pause_writing(self) -> None:
        self._tcp_paused = True

    def resume_writing(self) -> None:
        self._tcp_paused = False
        blocked, self._tcp_blocked = self._tcp_blocked, set()
        for transport in blocked:
            transport._flush_pending()
        self._flush()

    # ---------------------------------------------------------------- input

    def _receive(self, data: memoryview) -> None:
        try:
            events = self._engine.receive_data(data)
        except ProtocolError as exc:
            self._dispatch(exc.events)
            self._flush()  # the engine queued Go Away (protocol error)
            self._die("receive", exc)
            return
        self._dispatch(events)
        self._flush()

    def _dispatch(self, events: list[Any]) -> None:
        streams = self._streams
        for event in events:
            kind = type(event)
            if kind is _DataReceived:
                transport = streams.get(event.stream_id)
                if transport is not None:
                    transport._on_data(event.data)
                else:  # nobody will read it: give the credit back
                    self._acknowledge(event.stream_id, len(event.data))
            elif kind is _WindowUpdated:
                transport = streams.get(event.stream_id)
                if transport is not None:
                    transport._on_window()
            elif kind is _StreamOpened:
                self._peer_opened(event.stream_id)
            elif kind is _StreamEnded:
                transport = streams.get(event.stream_id)
                if transport is not None:
                    if transport._eof_sent:
                        del streams[event.stream_id]
                    transport._on_eof()
            elif kind is _StreamReset:
                transport = streams.pop(event.stream_id, None)
                if transport is not None:
                    transport._on_reset()
            elif kind is _PingAcknowledged:
                self._ping_answered(event.opaque)
            elif kind is _GoAwayReceived:
                if event.code != 0:
                    name = _GO_AWAY_NAMES.get(event.code, f"code {event.code}")
                    self._die("go away", ConnectionResetError(f"the peer sent Go Away ({name})"))
                    return
            # StreamAccepted and PingReceived need nothing here (the engine
            # answers pings itself).

    def _peer_opened(self, stream_id: int) -> None:
        if self._closing:
            self._engine.reset_stream(stream_id)
            return
        transport = StreamTransport(self, stream_id)
        self._streams[stream_id] = transport
        self._accept_queue.append(transport)
        if self._accept_waiters:
            waiter = self._accept_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --------------------------------------------------------------- output

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        if transport is not None and self._engine.bytes_to_send and not transport.is_closing():
            self._engine.flush(transport.write)

    # ------------------------------------------ engine calls made by streams

    def _open_transport(self, extra: dict[str, Any] | None = None) -> StreamTransport:
        self._raise_if_dead()
        try:
            stream_id = self._engine.open_stream()
        except SessionClosedError as exc:
            raise ConnectionResetError(str(exc)) from exc
        transport = StreamTransport(self, stream_id, extra)
        self._streams[stream_id] = transport
        self._schedule_flush()
        return transport

    def _send_data(self, stream_id: int, data: Any) -> int:
        engine = self._engine
        taken: int = engine.send_data(stream_id, data)
        if taken:
            if engine.bytes_to_send >= EAGER_FLUSH_SIZE or not (self._flush_scheduled or self._flushed_recently):
                # Out at once: a large write, or the first one since the loop
                # last turned (no round trip waits a loop turn for it) ...
                self._flush()
                if not self._flushed_recently:
                    self._flushed_recently = True
                    self._loop.call_soon(self._end_of_turn)
            else:
                # ... later small writes of the same turn go out together.
                self._schedule_flush()
        return taken

    def _end_of_turn(self) -> None:
        self._flushed_recently = False

    def _acknowledge(self, stream_id: int, n: int) -> None:
        if self._error is None and n:
            self._engine.acknowledge_received_data(stream_id, n)
            if self._engine.bytes_to_send:
                self._schedule_flush()

    def _end_stream(self, transport: StreamTransport) -> None:
        if self._error is not None:
            return
        self._engine.end_stream(transport.stream_id)
        if transport._recv_eof:
            self._streams.pop(transport.stream_id, None)
        self._schedule_flush()

    def _reset_stream(self, transport: StreamTransport) -> None:
        self._streams.pop(transport.stream_id, None)
        if self._error is None and not self._closed.done():
            self._engine.reset_stream(transport.stream_id)
            self._schedule_flush()

    def _forget_transport(self, transport: StreamTransport) -> None:
        """A transport delivered connection_lost; if its stream is still open
        in the engine in a direction nobody will use, leave routing to the
        engine state (data is acknowledged and dropped)."""
        self._tcp_blocked.discard(transport)
        if transport._eof_sent and transport._recv_eof:
            self._streams.pop(transport.stream_id, None)

    def _get_transport_info(self, name: str, default: Any = None) -> Any:
        if name == "session":
            return self
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    # ------------------------------------------------------------ keepalive

    def _start_keepalive(self) -> None:
        if self._keepalive_interval is not None and not self._closing:
            self._keepalive_handle = self._loop.call_later(self._keepalive_interval, self._send_keepalive)

    def _stop_keepalive(self) -> None:
        for handle in (self._keepalive_handle, self._keepalive_deadline):
            if handle is not None:
                handle.cancel()
        self._keepalive_handle = self._keepalive_deadline = None

    def _send_keepalive(self) -> None:
        self._keepalive_handle = None
        if self._closing or self._error is not None:
            return
        try:
            opaque = self._engine.ping()
        except MuxError as exc:
            self._die("keepalive", exc)
            return
        self._keepalive_ping = opaque
        self._pings[opaque] = (time.monotonic(), None)
        self._keepalive_deadline = self._loop.call_later(self._keepalive_timeout, self._keepalive_expired)
        self._flush()

    def _keepalive_expired(self) -> None:
        self._keepalive_deadline = None
        self._die(
            "keepalive",
            TimeoutError(f"no answer to a keepalive ping within {self._keepalive_timeout:g} s"),
        )

    def _ping_answered(self, opaque: int) -> None:
        entry = self._pings.pop(opaque, None)
        if entry is None:
            return
        sent, future = entry
        if future is not None and not future.done():
            future.set_result(time.monotonic() - sent)
        if opaque == self._keepalive_ping:
            self._keepalive_ping = None
            if self._keepalive_deadline is not None:
                self._keepalive_deadline.cancel()
                self._keepalive_deadline = None
            self._start_keepalive()

    # ------------------------------------------------------------ shutdown

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise ConnectionResetError(f"the session failed: {self._error}") from self._error
        if self._closing or self._closed.done():
            raise ConnectionAbortedError("the session is closed")

    def _die(self, where: str, exc: BaseException) -> None:
        """The session failed: tell every stream and waiter, close the
        connection, call the error callback once."""
        if self._error is not None or self._closing:
            return
        self._error = exc
        self._stop_keepalive()
        lost = ConnectionResetError(f"the session failed ({where}): {exc}")
        lost.__cause__ = exc
        self._shutdown_streams(lost)
        for _sent, future in self._pings.values():
            if future is not None and not future.done():
                future.set_exception(ConnectionResetError(f"the session failed ({where}): {exc}"))
        self._pings.clear()
        if self._transport is not None and not self._transport.is_closing():
            if isinstance(exc, ProtocolError):
                self._transport.close()  # let the Go Away go out first
            else:
                self._transport.abort()
        callback, self._error_callback = self._error_callback, None
        if callback is not None:
            try:
                callback(self, where, exc)
            except Exception:
                log.exception("the session's error callback failed")
        else:
            log.debug("session %r died in %s: %s", self, where, exc)

    def _shutdown_streams(self, exc: BaseException) -> None:
        streams = list(self._streams.values()) + list(self._accept_queue)
        self._streams.clear()
        self._accept_queue.clear()
        self._tcp_blocked.clear()
        for transport in streams:
            transport._on_session_lost(exc)
        self._wake_accept_waiters()

    def _wake_accept_waiters(self) -> None:
        waiters, self._accept_waiters = self._accept_waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _set_closed(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._shutdown_streams(
            self._error if isinstance(self._error, ConnectionError) else ConnectionResetError("the session is closed")
        )


async def start_session_server(
    on_session: Callable[[MuxSession], Any],
    host: str | None = None,
    port: int = 0,
    *,
    config: MuxConfig | None = None,
    ssl: Any = None,
    **options: Any,
) -> asyncio.Server:
    """Accept TCP connections and run a session (accepting side) on each.

    ``on_session(session)`` is called for each new session; if it returns a
    coroutine, that runs as a task.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def factory() -> MuxSession:
        session = MuxSession(client=False, config=config, loop=loop, **options)
        session._connected.add_done_callback(lambda _f: _started(session))
        return session

    def _started(session: MuxSession) -> None:
        try:
            result = on_session(session)
        except Exception:
            log.exception("on_session failed; closing the session")
            session.close()
            return
        if asyncio.iscoroutine(result):
            task = loop.create_task(result)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return await loop.create_server(factory, host, port, ssl=ssl)
