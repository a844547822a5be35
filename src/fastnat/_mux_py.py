"""Pure-Python yamux engine: the twin of the compiled ``fastnat._mux``.

Sans-IO: bytes go in through :meth:`Session.receive_data`, events come out,
and the bytes to write come from :meth:`Session.data_to_send` (or
:meth:`Session.flush`). No sockets, no timers, no asyncio. The compiled engine
implements the same class with the same behaviour; both are run by one test
suite. Read this file as the reference for what both do.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import index as _index
from typing import Any

from fastnat.errors import (
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamLimitError,
)
from fastnat.events import (
    DataReceived,
    GoAwayReceived,
    PingAcknowledged,
    PingReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from fastnat.frames import HEADER, HEADER_SIZE, INITIAL_STREAM_WINDOW, MAX_UINT32
from fastnat.mux_config import MuxConfig

__all__ = ["Session"]

_DATA, _WINDOW_UPDATE, _PING, _GO_AWAY = 0, 1, 2, 3
_SYN, _ACK, _FIN, _RST = 0x1, 0x2, 0x4, 0x8
_GO_AWAY_PROTOCOL_ERROR = 1

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from



class _Stream:
    """Bookkeeping of one stream. ``window`` is the receive window size this
    side aims to give the peer; ``recv_window`` is the credit the peer holds
    now; ``unacked`` is data delivered and not yet acknowledged by the
    application; ``credit`` is data acknowledged and not yet returned."""

    __slots__ = (
        "stream_id",
        "inbound",
        "accepted",
        "local_closed",
        "remote_closed",
        "send_window",
        "recv_window",
        "window",
        "unacked",
        "credit",
        "epoch",
    )

    def __init__(self, stream_id: int, inbound: bool, window: int, epoch: float) -> None:
        self.stream_id = stream_id
        self.inbound = inbound
        # Outbound: the peer's ACK arrived. Inbound: this side sent its ACK.
        self.accepted = False
        self.local_closed = False
        self.remote_closed = False
        self.send_window = INITIAL_STREAM_WINDOW
        self.recv_window = INITIAL_STREAM_WINDOW
        self.window = window
        self.unacked = 0
        self.credit = 0
        # When the current half window of credit started to be used up, for
        # auto-tuning (only meaningful with a clock).
        self.epoch = epoch


class Session:
    """One yamux session, dialling side (``client=True``, odd stream ids) or
    accepting side (even stream ids).

    ``clock``, when given, is a function returning seconds (such as
    ``time.monotonic``); the engine reads it only to time pings and to
    auto-tune receive windows. Without a clock every stream keeps
    ``config.initial_stream_window``.
    """

    def __init__(
        self,
        client: bool,
        config: MuxConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if config is None:
            config = MuxConfig()
        elif not isinstance(config, MuxConfig):
            raise TypeError(f"config must be a MuxConfig, not {type(config).__name__}")
        self._client = bool(client)
        self._config = config
        self._clock = clock
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if self._client else 2
        self._pending_accept = 0
        self._out = bytearray()
        self._local_go_away = False
        self._remote_go_away = False
        self._error: str | None = None
        self._pings: dict[int, float | None] = {}
        self._next_ping = 0
        self._rtt: float | None = None
        # Receive state between calls: a partial header, or the rest of a
        # Data frame's payload (to reassemble or to discard).
        self._header = bytearray()
        self._payload_left = 0
        self._payload_buf: bytearray | None = None
        self._payload_stream: _Stream | None = None
        self._payload_fin = False

    # ------------------------------------------------------------------ queries

    @property
    def client(self) -> bool:
        """True on the dialling side."""
        return self._client

    @property
    def config(self) -> MuxConfig:
        return self._config

    @property
    def stream_count(self) -> int:
        """Streams this session tracks (open in at least one direction)."""
        return len(self._streams)

    @property
    def pending_accept_count(self) -> int:
        """Streams the peer opened that are neither accepted nor refused yet."""
        return self._pending_accept

    @property
    def rtt(self) -> float | None:
        """The round-trip time of the last answered ping, if a clock was given."""
        return self._rtt

    @property
    def bytes_to_send(self) -> int:
        """How many bytes are queued for the peer."""
        return len(self._out)

    @property
    def go_away_sent(self) -> bool:
        """True once this side queued a Go Away (itself or after a protocol error)."""
        return self._local_go_away

    @property
    def go_away_received(self) -> bool:
        """True once the peer sent a Go Away."""
        return self._remote_go_away

    @property
    def error(self) -> str | None:
        """Why the session failed, if the peer broke the protocol."""
        return self._error

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` may send on the stream now."""
        return self._get(stream_id).send_window

    def receive_window(self, stream_id: int) -> int:
        """Bytes the peer may send on the stream now (the credit it holds)."""
        return self._get(stream_id).recv_window

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Take every queued frame, as one bytes object for one write."""
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        self._clear_output()
        return data

    def flush(self, write: Callable[[memoryview], Any]) -> int:
        """Hand every queued frame to ``write`` as one memoryview, without a copy.

        ``write`` must have finished with the view (copied what it keeps) when
        it returns, as ``asyncio.Transport.write`` and ``socket.sendall`` do.
        If it raises, the frames stay queued. Returns the number of bytes.
        """
        out = self._out
        n = len(out)
        if n == 0:
            return 0
        view = memoryview(out)
        try:
            write(view)
        except BaseException:
            # The frames stay queued. If the writer kept a slice of the view,
            # the buffer cannot grow any more: queue into a copy instead.
            self._out = bytearray(out)
            raise
        finally:
            try:
                view.release()
            except BufferError:
                pass  # the writer holds an export of the view; _clear_output sees it
        self._clear_output()
        return n

    def _clear_output(self) -> None:
        try:
            del self._out[:]
        except BufferError:
            # A caller still holds a view of the buffer: leave it to them.
            self._out = bytearray()

    def _queue(self, frame_type: int, flags: int, stream_id: int, length: int) -> None:
        self._out += _pack(0, frame_type, flags, stream_id, length)

    # --------------------------------------------------------------- commands

    def open_stream(self) -> int:
        """Open a stream and queue its SYN; returns the new stream id."""
        self._check_alive()
        if self._local_go_away or self._remote_go_away:
            side = "this side" if self._local_go_away else "the peer"
            raise SessionClosedError(f"cannot open a stream: {side} sent Go Away")
        if len(self._streams) >= self._config.max_streams:
            raise StreamLimitError(f"cannot open a stream: {self._config.max_streams} streams are open (max_streams)")
        stream_id = self._next_id
        if stream_id > MAX_UINT32:
            raise StreamLimitError("cannot open a stream: stream ids are exhausted")
        self._next_id = stream_id + 2
        window = self._config.initial_stream_window
        stream = _Stream(stream_id, False, window, self._now())
        stream.recv_window = window
        self._streams[stream_id] = stream
        self._queue(_WINDOW_UPDATE, _SYN, stream_id, window - INITIAL_STREAM_WINDOW)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened: queue its ACK (and a larger window)."""
        self._check_alive()
        stream = self._get(stream_id)
        if not stream.inbound:
            raise ValueError(f"stream {stream_id} was opened by this side; only the peer's streams are accepted")
        if not stream.accepted:
            self._accept(stream)

    def _accept(self, stream: _Stream) -> None:
        stream.accepted = True
        self._pending_accept -= 1
        delta = stream.window - INITIAL_STREAM_WINDOW
        stream.recv_window += delta
        stream.epoch = self._now()
        self._queue(_WINDOW_UPDATE, _ACK, stream.stream_id, delta)

    def send_data(self, stream_id: int, data: Any) -> int:
        """Queue as much of ``data`` as the stream's send window allows.

        Returns how many bytes were taken; the rest waits for a
        ``WindowUpdated`` event. Sending on a stream the peer opened and this
        side has not accepted accepts it.
        """
        self._check_alive()
        stream = self._get(stream_id)
        if stream.local_closed:
            raise StreamClosedError(f"stream {stream_id}: this side has already ended it")
        if stream.inbound and not stream.accepted:
            self._accept(stream)
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(f"send_data needs a bytes-like object, not {type(data).__name__}") from None
        with view:
            if not view.c_contiguous:
                raise TypeError("send_data needs a C-contiguous bytes-like object")
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            n = min(view.nbytes, stream.send_window)
            if n <= 0:
                return 0
            frame = self._config.max_frame_size
            out = self._out
            pos = 0
            while pos < n:
                size = min(frame, n - pos)
                out += _pack(0, _DATA, 0, stream.stream_id, size)
                out += view[pos : pos + size]
                pos += size
        stream.send_window -= n
        return n

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """Tell the engine the application consumed ``n`` bytes of the stream.

        Credit goes back to the peer in a Window Update once at least half of
        the stream's window has been acknowledged. Acknowledging on a stream
        that is gone does nothing.
        """
        self._check_alive()
        n = _index(n)
        if n < 0:
            raise ValueError(f"cannot acknowledge a negative amount ({n})")
        stream = self._find(stream_id)
        if stream is None:
            return
        if n > stream.unacked:
            raise ValueError(
                f"stream {stream_id}: acknowledging {n} bytes but only {stream.unacked} were received and not acknowledged"
            )
        stream.unacked -= n
        if stream.remote_closed:
            return  # the peer sends no more: credit would be wasted
        stream.credit += n
        if stream.credit >= stream.window // 2:
            self._send_window_update(stream)

    def _send_window_update(self, stream: _Stream) -> None:
        delta = stream.credit
        stream.credit = 0
        clock = self._clock
        if clock is not None:
            now = clock()
            rtt = self._rtt
            max_window = self._config.max_stream_window
            # Auto-tuning: half a window was used up in less than two round
            # trips, so the window, not the consumer, limits this stream.
            if rtt is not None and stream.window < max_window and now - stream.epoch < 2 * rtt:
                grown = min(stream.window * 2, max_window)
                delta += grown - stream.window
                stream.window = grown
            stream.epoch = now
        stream.recv_window += delta
        self._queue(_WINDOW_UPDATE, 0, stream.stream_id, delta)

    def end_stream(self, stream_id: int) -> None:
        """Half-close the stream (FIN): this side sends no more data on it."""
        self._check_alive()
        stream = self._get(stream_id)
        if stream.local_closed:
            raise StreamClosedError(f"stream {stream_id}: this side has already ended it")
        if stream.inbound and not stream.accepted:
            self._accept(stream)
        stream.local_closed = True
        self._queue(_WINDOW_UPDATE, _FIN, stream.stream_id, 0)
        if stream.remote_closed:
            self._forget(stream)

    def reset_stream(self, stream_id: int) -> None:
        """Reset the stream (RST), or refuse a stream the peer opened.

        Resetting a stream that is already gone does nothing: a reset from
        the peer may cross this one.
        """
        self._check_alive()
        stream = self._find(stream_id)
        if stream is None:
            return
        self._forget(stream)
        self._queue(_WINDOW_UPDATE, _RST, stream.stream_id, 0)

    def ping(self, opaque: int | None = None) -> int:
        """Queue a ping; returns its opaque value, echoed in ``PingAcknowledged``."""
        self._check_alive()
        pings = self._pings
        if len(pings) >= self._config.max_outstanding_pings:
            raise StreamLimitError(
                f"{len(pings)} pings are awaiting an answer (max_outstanding_pings)"
            )
        if opaque is None:
            opaque = self._next_ping
            while opaque in pings:
                opaque = (opaque + 1) & MAX_UINT32
            self._next_ping = (opaque + 1) & MAX_UINT32
        elif not 0 <= _index(opaque) <= MAX_UINT32:
            raise ValueError(f"ping opaque value must fit in 32 bits, got {opaque}")
        elif opaque in pings:
            raise ValueError(f"a ping with opaque value {opaque} is already awaiting an answer")
        pings[opaque] = self._now() if self._clock is not None else None
        self._queue(_PING, _SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = 0) -> None:
        """Queue a Go Away: the peer may open no more streams, nor may this side.

        Streams already open carry on. A second call does nothing.
        """
        self._check_alive()
        code = _index(code)
        if not 0 <= code <= MAX_UINT32:
            raise ValueError(f"go away code must fit in 32 bits, got {code}")
        if self._local_go_away:
            return
        self._local_go_away = True
        self._queue(_GO_AWAY, 0, 0, code)

    # ---------------------------------------------------------------- helpers

    def _now(self) -> float:
        clock = self._clock
        return clock() if clock is not None else 0.0

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"the session failed earlier: {self._error}")

    def _find(self, stream_id: int) -> _Stream | None:
        """The stream with this id, or None; a non-integer id is a TypeError."""
        if type(stream_id) is not int:
            try:
                stream_id = _index(stream_id)
            except TypeError:
                raise TypeError(f"stream ids are ints, not {type(stream_id).__name__}") from None
        return self._streams.get(stream_id)

    def _get(self, stream_id: int) -> _Stream:
        stream = self._find(stream_id)
        if stream is None:
            raise StreamClosedError(self._why_missing(_index(stream_id)))
        return stream

    def _why_missing(self, stream_id: int) -> str:
        ours = (stream_id & 1) == (1 if self._client else 0)
        if stream_id <= 0 or stream_id > MAX_UINT32:
            return f"no stream {stream_id}: stream ids are between 1 and {MAX_UINT32}"
        if ours and stream_id >= self._next_id:
            return f"no stream {stream_id}: this side never opened it"
        return f"stream {stream_id} is closed (ended both ways, reset or refused) or was never opened"

    def _forget(self, stream: _Stream) -> None:
        del self._streams[stream.stream_id]
        if stream.inbound and not stream.accepted:
            self._pending_accept -= 1

    def _fail(self, message: str, events: list[Any]) -> ProtocolError:
        """Record a protocol error, queue Go Away, return the exception to raise."""
        self._error = message
        self._queue(_GO_AWAY, 0, 0, _GO_AWAY_PROTOCOL_ERROR)
        self._local_go_away = True
        self._header.clear()
        self._payload_left = 0
        self._payload_buf = None
        self._payload_stream = None
        return ProtocolError(message, events)

    # ------------------------------------------------------------------ input

    def receive_data(self, data: Any) -> list[Any]:
        """Feed bytes read from the connection; returns the events they complete.

        Any chunking of the same byte stream yields the same events. On a
        protocol violation a Go Away is queued and :class:`ProtocolError` is
        raised, carrying the events decoded before the bad frame.
        """
        self._check_alive()
        events: list[Any] = []
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(f"receive_data needs a bytes-like object, not {type(data).__name__}") from None
        if not view.c_contiguous:
            raise TypeError("receive_data needs a C-contiguous bytes-like object")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        n = view.nbytes
        pos = 0
        header = self._header
        while pos < n:
            if self._payload_left:
                pos = self._continue_payload(view, pos, n, events)
                continue
            if header or n - pos < HEADER_SIZE:
                take = min(HEADER_SIZE - len(header), n - pos)
                header += view[pos : pos + take]
                pos += take
                if len(header) < HEADER_SIZE:
                    break
                version, frame_type, flags, stream_id, length = _unpack_from(header)
                header.clear()
            else:
                version, frame_type, flags, stream_id, length = _unpack_from(view, pos)
                pos += HEADER_SIZE
            if version != 0:
                raise self._fail(f"frame with version {version}; yamux version 0 is the only one", events)
            if frame_type == _DATA or frame_type == _WINDOW_UPDATE:
                stream = self._stream_frame(frame_type, flags, stream_id, length, events)
                if frame_type == _DATA and length:
                    pos = self._begin_payload(stream, flags, length, view, pos, n, events)
                elif stream is not None and flags & _FIN:
                    self._remote_end(stream, events)
            elif frame_type == _PING:
                self._ping_frame(flags, stream_id, length, events)
            elif frame_type == _GO_AWAY:
                if stream_id != 0:
                    raise self._fail(f"Go Away on stream {stream_id}; it belongs on stream 0", events)
                self._remote_go_away = True
                events.append(GoAwayReceived(length))
            else:
                raise self._fail(f"frame of unknown type {frame_type}", events)
        return events

    def _stream_frame(
        self, frame_type: int, flags: int, stream_id: int, length: int, events: list[Any]
    ) -> _Stream | None:
        """Handle a Data or Window Update header up to its payload: SYN, ACK,
        RST, the window delta and the checks. Returns the stream, or None when
        the frame is for a stream that is gone (its payload is discarded)."""
        kind = "Data" if frame_type == _DATA else "Window Update"
        if stream_id == 0:
            raise self._fail(f"{kind} frame on stream 0, which belongs to the session", events)
        if flags & _SYN:
            # A new stream starts with the spec's window both ways: check the
            # frame against it before the stream exists, so that a bad frame
            # does not report StreamOpened.
            if frame_type == _DATA and length > INITIAL_STREAM_WINDOW:
                raise self._fail(
                    f"stream {stream_id}: Data frame of {length} bytes exceeds the receive window of {INITIAL_STREAM_WINDOW}",
                    events,
                )
            if frame_type == _WINDOW_UPDATE and INITIAL_STREAM_WINDOW + length > MAX_UINT32:
                raise self._fail(
                    f"stream {stream_id}: window update of {length} would take the send window past 2^32-1",
                    events,
                )
            stream = self._peer_opened(stream_id, kind, events)
            if stream is None:
                return None
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return None  # a stream that is gone: frames may still be in flight
        if flags & _ACK and not stream.inbound and not stream.accepted:
            stream.accepted = True
            events.append(StreamAccepted(stream_id))
        if flags & _RST:
            self._forget(stream)
            events.append(StreamReset(stream_id))
            return None
        if frame_type == _DATA:
            if stream.remote_closed and (length or flags & _FIN):
                raise self._fail(f"stream {stream_id}: data after the peer's FIN", events)
            if length > stream.recv_window:
                raise self._fail(
                    f"stream {stream_id}: Data frame of {length} bytes exceeds the receive window of {stream.recv_window}",
                    events,
                )
            stream.recv_window -= length
        else:
            if flags & _FIN and stream.remote_closed:
                raise self._fail(f"stream {stream_id}: second FIN from the peer", events)
            if length:
                if stream.send_window + length > MAX_UINT32:
                    raise self._fail(
                        f"stream {stream_id}: window update of {length} would take the send window past 2^32-1",
                        events,
                    )
                stream.send_window += length
                events.append(WindowUpdated(stream_id, length))
        return stream

    def _peer_opened(self, stream_id: int, kind: str, events: list[Any]) -> _Stream | None:
        """A SYN arrived: create the stream, or refuse it with RST."""
        if (stream_id & 1) == (1 if self._client else 0):
            side = "odd" if self._client else "even"
            raise self._fail(f"SYN on stream {stream_id}: {side} ids are this side's to open", events)
        if stream_id in self._streams:
            raise self._fail(f"SYN on stream {stream_id}, which is already open", events)
        config = self._config
        if (
            self._local_go_away
            or self._pending_accept >= config.accept_backlog
            or len(self._streams) >= config.max_streams
        ):
            self._queue(_WINDOW_UPDATE, _RST, stream_id, 0)
            return None
        stream = _Stream(stream_id, True, config.initial_stream_window, 0.0)
        self._streams[stream_id] = stream
        self._pending_accept += 1
        events.append(StreamOpened(stream_id))
        return stream

    def _remote_end(self, stream: _Stream, events: list[Any]) -> None:
        stream.remote_closed = True
        events.append(StreamEnded(stream.stream_id))
        if stream.local_closed:
            self._forget(stream)

    def _begin_payload(
        self,
        stream: _Stream | None,
        flags: int,
        length: int,
        view: memoryview,
        pos: int,
        n: int,
        events: list[Any],
    ) -> int:
        """Deliver a Data payload that lies whole in ``view``, or start
        reassembling (or discarding) one that continues in later chunks."""
        if n - pos >= length:
            if stream is not None:
                stream.unacked += length
                events.append(DataReceived(stream.stream_id, view[pos : pos + length]))
                if flags & _FIN:
                    self._remote_end(stream, events)
            return pos + length
        self._payload_left = length
        self._payload_stream = stream
        self._payload_fin = bool(flags & _FIN)
        # Grown as the payload arrives, not allocated up front: a 12-byte
        # header must not make the engine allocate a whole window's worth.
        self._payload_buf = bytearray() if stream is not None else None
        return self._continue_payload(view, pos, n, events)

    def _continue_payload(self, view: memoryview, pos: int, n: int, events: list[Any]) -> int:
        take = min(self._payload_left, n - pos)
        buf = self._payload_buf
        if buf is not None:
            buf += view[pos : pos + take]
        self._payload_left -= take
        if self._payload_left == 0:
            stream = self._payload_stream
            self._payload_buf = None
            self._payload_stream = None
            # The stream may have been reset locally while its frame arrived.
            if stream is not None and buf is not None and self._streams.get(stream.stream_id) is stream:
                stream.unacked += len(buf)
                events.append(DataReceived(stream.stream_id, memoryview(buf)))
                if self._payload_fin:
                    self._remote_end(stream, events)
        return pos + take

    def _ping_frame(self, flags: int, stream_id: int, opaque: int, events: list[Any]) -> None:
        if stream_id != 0:
            raise self._fail(f"Ping on stream {stream_id}; it belongs on stream 0", events)
        if flags & _SYN:
            self._queue(_PING, _ACK, 0, opaque)
            events.append(PingReceived(opaque))
        elif flags & _ACK:
            if opaque in self._pings:
                sent = self._pings.pop(opaque)
                if sent is not None and self._clock is not None:
                    self._rtt = self._clock() - sent
                events.append(PingAcknowledged(opaque))
            # An answer to no ping of ours (late, or never asked) is ignored.
        else:
            raise self._fail("Ping with neither SYN nor ACK", events)
