"""One multiplexed stream, as an asyncio transport and as an asyncio-style stream.

:class:`StreamTransport` is an :class:`asyncio.Transport`: any
:class:`asyncio.Protocol` (an h11 server, ``asyncio.StreamReaderProtocol``)
runs over it unchanged. :class:`MuxStream` wraps one in asyncio's own
``StreamReader``/``StreamWriter`` so that ``read``, ``readexactly``,
``readuntil``, ``write``, ``drain`` and the rest behave exactly as they do on
a TCP connection.

Backpressure:

* writing: ``write`` hands data to the engine as far as the stream's send
  window allows; the rest waits in the transport, and the protocol is paused
  (``drain()`` waits) while anything waits — for window credit, or because
  the session's TCP connection is itself above its high-water mark;
* reading: data is acknowledged to the peer only once the protocol has taken
  it. A protocol that pauses reading stops the acknowledgements, the peer's
  window runs out, and that one stream stops while the others carry on.
  :class:`MuxStream` goes further: its reader acknowledges data as the
  application *reads* it, so the window alone bounds what it buffers and the
  transport never has to hold data back for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastnat.aio.session import MuxSession

__all__ = ["StreamTransport", "MuxStream"]

log = logging.getLogger("fastnat.aio")

# Data waiting in a transport (not yet in the engine) above this pauses the
# protocol. 0 means any wait pauses it: drain() then returns only when the
# stream's send window has taken everything written, so a stream never
# buffers more than one write beyond its window.
DEFAULT_WRITE_HIGH_WATER = 0
# asyncio transports warn after this many writes to a lost connection.
_LOST_WRITE_WARNINGS = 5


class StreamTransport(asyncio.Transport):
    """An asyncio transport over one stream of a :class:`MuxSession`."""

    def __init__(self, session: MuxSession, stream_id: int, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self._session = session
        self._loop = session._loop
        self._stream_id = stream_id
        self._protocol: asyncio.BaseProtocol | None = None
        # Protocols of ours that copy what they get at once may be handed
        # memoryviews; any other protocol gets bytes, as from a TCP transport.
        self._views_ok = False
        # A protocol that acknowledges data itself, as it is consumed
        # (MuxStream's reader), instead of on delivery.
        self._self_acking = False
        # An asyncio.BufferedProtocol gets data through get_buffer/buffer_updated.
        self._buffered = False
        # write side
        self._send_pending = bytearray()
        self._high_water = DEFAULT_WRITE_HIGH_WATER
        self._low_water = DEFAULT_WRITE_HIGH_WATER
        self._write_paused = False
        self._eof_requested = False  # write_eof() or close() asked for a FIN
        self._eof_sent = False  # the FIN is queued in the engine
        self._lost_writes = 0
        # read side: data held back while reading is paused (or before a
        # protocol is attached), as chunks: one copy in, none out
        # (made when first needed and dropped when drained: an empty deque
        # costs 760 bytes, half of what an idle stream costs otherwise)
        self._recv_pending: deque[bytes] | None = None
        self._recv_pending_size = 0
        self._recv_eof = False  # the peer's FIN arrived
        self._recv_eof_delivered = False
        self._reading_paused = False
        self._delivery_scheduled = False
        # life
        self._closing = False  # close() or abort() was called
        self._lost = False  # connection_lost was delivered (or is scheduled)
        self._exc: BaseException | None = None

    # ------------------------------------------------------------ properties

    @property
    def stream_id(self) -> int:
        return self._stream_id

    @property
    def session(self) -> MuxSession:
        return self._session

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self._stream_id
        if name == "session":
            return self._session
        if name in self._extra:
            return self._extra[name]
        return self._session._get_transport_info(name, default)

    # -------------------------------------------------------------- protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._views_ok = bool(getattr(protocol, "_fastnat_accepts_views", False))
        self._self_acking = bool(getattr(protocol, "_fastnat_self_acking", False))
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    def attach(self, protocol: asyncio.BaseProtocol, *, replace: bool = False) -> None:
        """Set the protocol and call its ``connection_made``; data that arrived
        before it was attached is delivered next, and reading resumes.

        ``replace=True`` takes the stream over from a protocol that read its
        beginning (a handshake).
        """
        if self._protocol is not None and not replace:
            raise RuntimeError(f"stream {self._stream_id} already has a protocol")
        self.set_protocol(protocol)
        protocol.connection_made(self)
        self._reading_paused = False
        if self._lost:
            self._loop.call_soon(self._call_connection_lost)
        elif self._recv_pending or self._recv_eof:
            self._schedule_delivery()

    # ------------------------------------------------------------- writing

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof() or close()")
        if self._lost:
            self._lost_writes += 1
            if self._lost_writes >= _LOST_WRITE_WARNINGS:
                log.warning("stream %d: write() on a lost stream", self._stream_id)
            return
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data).cast("B")
        if not data:
            return
        session = self._session
        if not self._send_pending and not session._tcp_paused:
            taken = session._send_data(self._stream_id, data)
            if taken == len(data):
                return
            data = memoryview(data)[taken:]
        self._send_pending += data
        if session._tcp_paused:
            session._tcp_blocked.add(self)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what the session has queued now, rather than at the end of
        the loop iteration (relays call it after forwarding a read)."""
        self._session._flush()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: a FIN follows the data already written."""
        if self._eof_requested or self._lost:
            return
        self._eof_requested = True
        self._flush_pending()

    def get_write_buffer_size(self) -> int:
        return len(self._send_pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_WRITE_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()
        self._maybe_resume_protocol()

    def _flush_pending(self) -> None:
        """Move waiting data into the engine as far as the window allows;
        then send the FIN if one was asked for and nothing waits."""
        if self._lost:
            return
        session = self._session
        pending = self._send_pending
        if pending:
            if session._tcp_paused:
                session._tcp_blocked.add(self)
                return
            taken = session._send_data(self._stream_id, pending)
            if taken:
                del pending[:taken]
        if not pending:
            if self._eof_requested and not self._eof_sent:
                self._eof_sent = True
                session._end_stream(self)
                if self._closing:
                    self._schedule_connection_lost(None)
            self._maybe_resume_protocol()

    def _maybe_pause_protocol(self) -> None:
        if not self._write_paused and len(self._send_pending) > self._high_water and self._protocol is not None:
            self._write_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                log.exception("stream %d: protocol.pause_writing() failed", self._stream_id)

    def _maybe_resume_protocol(self) -> None:
        if self._write_paused and len(self._send_pending) <= self._low_water and self._protocol is not None:
            self._write_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.exception("stream %d: protocol.resume_writing() failed", self._stream_id)

    # ------------------------------------------------------------- reading

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def pause_reading(self) -> None:
        if not self._self_acking:  # a self-acknowledging protocol is bounded by the window
            self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._recv_pending or (self._recv_eof and not self._recv_eof_delivered):
                self._schedule_delivery()

    def _on_data(self, data: memoryview) -> None:
        """Called by the session for each DataReceived; ``data`` is valid only
        during the call, so whatever is not handed over now is copied."""
        if self._closing or self._lost:
            self._session._acknowledge(self._stream_id, len(data))  # discarded, but not withheld
            return
        if self._protocol is None or self._reading_paused or self._recv_pending:
            if self._recv_pending is None:
                self._recv_pending = deque()
            self._recv_pending.append(bytes(data))
            self._recv_pending_size += len(data)
            return
        self._deliver(data)

    def _deliver(self, data: Any) -> None:
        n = len(data)
        protocol = self._protocol
        try:
            if self._buffered and not self._views_ok:
                _feed_buffered(protocol, data)  # type: ignore[arg-type]
            else:
                protocol.data_received(data if self._views_ok else bytes(data))  # type: ignore[union-attr]
        except Exception as exc:
            log.exception("stream %d: protocol.data_received() failed; aborting the stream", self._stream_id)
            self._session._acknowledge(self._stream_id, n)
            self._abort_with(exc)
            return
        if not self._self_acking:
            self._session._acknowledge(self._stream_id, n)

    def acknowledge(self, n: int) -> None:
        """For protocols that acknowledge themselves: ``n`` more bytes were consumed."""
        if not self._lost and n > 0:
            self._session._acknowledge(self._stream_id, n)

    def _schedule_delivery(self) -> None:
        if not self._delivery_scheduled:
            self._delivery_scheduled = True
            self._loop.call_soon(self._deliver_pending)

    def _deliver_pending(self) -> None:
        self._delivery_scheduled = False
        if self._lost or self._protocol is None:
            return
        pending = self._recv_pending
        while pending and not self._reading_paused and not self._lost:
            chunk = pending.popleft()
            self._recv_pending_size -= len(chunk)
            self._deliver(chunk)
        if not pending:
            if pending is self._recv_pending:
                self._recv_pending = None
            if self._recv_eof and not self._reading_paused:
                self._deliver_eof()

    def _on_eof(self) -> None:
        """The peer's FIN arrived."""
        self._recv_eof = True
        if self._closing or self._lost:
            return
        if self._protocol is None or self._reading_paused or self._recv_pending:
            return  # delivered after the pending data
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        if self._recv_eof_delivered or self._lost:
            return
        self._recv_eof_delivered = True
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
        except Exception as exc:
            log.exception("stream %d: protocol.eof_received() failed", self._stream_id)
            self._abort_with(exc)
            return
        if not keep_open:
            self.close()

    def at_eof(self) -> bool:
        """True once the peer's FIN has been delivered to the protocol."""
        return self._recv_eof_delivered

    # -------------------------------------------------------------- closing

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Send what is buffered, then a FIN; ``connection_lost(None)`` follows.

        Data the peer still sends is acknowledged and discarded, so the peer
        can finish; the stream is forgotten once the peer ends it too.
        """
        if self._closing or self._lost:
            return
        self._closing = True
        self._reading_paused = True
        if self._recv_pending:
            self._session._acknowledge(self._stream_id, self._recv_pending_size)
            self._clear_recv_pending()
        self._eof_requested = True
        if self._eof_sent:
            self._schedule_connection_lost(None)
        else:
            self._flush_pending()

    def abort(self) -> None:
        """Reset the stream (RST) now, dropping buffered data both ways."""
        self._abort_with(None)

    def _abort_with(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._closing = True
        self._send_pending.clear()
        self._clear_recv_pending()
        self._session._reset_stream(self)
        self._schedule_connection_lost(exc)

    # -------------------------------------------------- session notifications

    def _on_reset(self) -> None:
        """The peer reset the stream (or refused it)."""
        self._send_pending.clear()
        self._clear_recv_pending()
        if not self._lost:
            self._schedule_connection_lost(ConnectionResetError(f"stream {self._stream_id} was reset by the peer"))

    def _clear_recv_pending(self) -> None:
        self._recv_pending = None
        self._recv_pending_size = 0

    def _on_window(self) -> None:
        if self._send_pending or (self._eof_requested and not self._eof_sent):
            self._flush_pending()

    def _on_session_lost(self, exc: BaseException) -> None:
        self._send_pending.clear()
        if not self._lost:
            self._schedule_connection_lost(exc)

    def _schedule_connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._exc = exc
        self._session._forget_transport(self)
        if self._protocol is not None:
            self._loop.call_soon(self._call_connection_lost)

    def _call_connection_lost(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        if self._write_paused:
            self._write_paused = False
        try:
            protocol.connection_lost(self._exc)
        except Exception:
            log.exception("stream %d: protocol.connection_lost() failed", self._stream_id)

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closing" if self._closing else "open"
        return f"<StreamTransport stream={self._stream_id} {state}>"


def _feed_buffered(protocol: asyncio.BufferedProtocol, data: Any) -> None:
    """Copy ``data`` into a BufferedProtocol's buffers, as asyncio's TLS transport does."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view))).cast("B")
        if not buffer:
            raise RuntimeError("get_buffer() returned an empty buffer")
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


class _StreamReader(asyncio.StreamReader):
    """asyncio's StreamReader, acknowledging window credit as data is read.

    Every consuming method of StreamReader (read, readexactly, readuntil,
    readline) calls ``_maybe_resume_transport`` after taking bytes out of the
    buffer; that is where the consumed amount is acknowledged, so the peer may
    send more exactly as the application reads, and the buffer never holds
    more than the stream's window. A reader that waits for more than is
    buffered (``readexactly(n)`` with n above the window, ``readuntil`` with a
    far separator) acknowledges what it holds when it starts waiting, as
    asyncio's reader resumes a paused transport then: otherwise it would wait
    for data the window does not let the peer send.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self._fed = 0  # bytes fed by the transport (acknowledgeable)
        self._acknowledged = 0
        self._mux_transport: StreamTransport | None = None

    def feed_initial(self, data: bytes) -> None:
        """Bytes read before the stream was handed over: already acknowledged."""
        super().feed_data(data)

    def feed_data(self, data: Any) -> None:
        self._fed += len(data)
        super().feed_data(data)

    def _maybe_resume_transport(self) -> None:
        self._acknowledge_up_to(self._fed - len(self._buffer))
        super()._maybe_resume_transport()

    async def _wait_for_data(self, func_name: str) -> None:
        self._acknowledge_up_to(self._fed)  # the application wants more than it holds
        await super()._wait_for_data(func_name)

    def _acknowledge_up_to(self, position: int) -> None:
        delta = position - self._acknowledged
        if delta > 0 and self._mux_transport is not None:
            self._acknowledged = position
            self._mux_transport.acknowledge(delta)


class _StreamReaderProtocol(asyncio.StreamReaderProtocol):
    """asyncio's protocol for streams; it copies what it receives into the
    reader's buffer at once (so the transport may hand it memoryviews), and
    its reader acknowledges data as the application reads it."""

    _fastnat_accepts_views = True
    _fastnat_self_acking = True

    def __init__(self, stream_reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(stream_reader, loop=loop)
        # asyncio keeps drain() waiters in a deque (760 bytes, even empty);
        # it only appends, removes and iterates, which a list (56 bytes)
        # does as well. Half the asyncio layer's cost of an idle stream.
        if isinstance(getattr(self, "_drain_waiters", None), deque):
            self._drain_waiters = []  # type: ignore[assignment]
        # asyncio's protocol holds its reader weakly. An open stream is
        # reachable from the loop (loop -> TCP transport -> session -> stream
        # transport -> this protocol); holding the reader strongly until the
        # stream is lost keeps a task blocked in read() alive with it, even if
        # the application kept no reference to the task.
        self._reader_while_open: asyncio.StreamReader | None = stream_reader

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._reader_while_open = None

    def eof_received(self) -> bool:
        super().eof_received()
        # asyncio closes a TLS connection at EOF because TLS cannot half-close;
        # a stream can, whatever protects the session underneath.
        return True


class MuxStream:
    """A stream used like an asyncio ``(reader, writer)`` pair.

    ``stream.reader`` and ``stream.writer`` are asyncio's own
    ``StreamReader``/``StreamWriter``; the common methods are also available on
    the stream itself. ``async with stream:`` closes it on exit.
    """

    def __init__(self, transport: StreamTransport, *, limit: int, initial_data: bytes = b"") -> None:
        loop = transport._loop
        self._transport = transport
        reader = _StreamReader(limit, loop)
        reader._mux_transport = transport
        if initial_data:
            reader.feed_initial(initial_data)  # read before a handshake handed the stream over
        self.reader: asyncio.StreamReader = reader
        self._protocol = _StreamReaderProtocol(reader, loop)
        transport.attach(self._protocol, replace=True)
        self.writer = asyncio.StreamWriter(transport, self._protocol, self.reader, loop)

    @property
    def transport(self) -> StreamTransport:
        return self._transport

    @property
    def stream_id(self) -> int:
        return self._transport.stream_id

    # reading
    async def read(self, n: int = -1) -> bytes:
        return await self.reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return await self.reader.readuntil(separator)

    async def readline(self) -> bytes:
        return await self.reader.readline()

    def at_eof(self) -> bool:
        return self.reader.at_eof()

    # writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    def writelines(self, data: Any) -> None:
        self.writer.writelines(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        self.writer.write_eof()

    def can_write_eof(self) -> bool:
        return True

    # closing
    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Reset the stream (RST)."""
        self._transport.abort()

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    async def wait_closed(self) -> None:
        """Wait until the stream is closed; raises the error that ended it, if any."""
        await self.writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    async def __aenter__(self) -> MuxStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        try:
            await self.wait_closed()
        except ConnectionError:
            pass  # ended by a reset or a lost session: closed all the same

    def __repr__(self) -> str:
        return f"<MuxStream {self._transport!r}>"
