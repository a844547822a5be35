"""Splice two asyncio transports together, both ways, with backpressure.

The relay's core: a client's TCP connection on one side, a multiplexed stream
on the other (or any two transports). Bytes read on one side are written to
the other as they come; when a side's write buffer fills, reading stops on the
other side (for a stream, that withholds window credit from the peer), so a
splice never buffers more than the transports' own limits. A FIN on one side
becomes a FIN on the other (half-close both ways), a reset becomes an abort,
and when both directions are done both transports are closed.

A TLS side cannot half-close (asyncio's TLS transport has no ``write_eof``):
an end of stream toward it closes it once what is buffered for it is sent
(with TLS's close_notify), and its own end of stream closes it too, so its
connection ends with whichever direction ends first.

Reads from a TCP side go into a reusable buffer (``recv_into``), never into a
fresh bytes object per read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fastnat._buffers import ReadBuffer, loop_read_buffer
from fastnat.tls import can_half_close

__all__ = ["Meter", "Relays", "Splice", "SPLICE_READ_BUFFER"]

log = logging.getLogger("fastnat.splice")

# Reads from a TCP side: one recv_into of up to this many bytes, handed to
# the other side in one write (a stream takes it as 64 KiB frames).
SPLICE_READ_BUFFER = 256 * 1024


class Meter(Protocol):
    """What a splice asks before and tells after relaying bytes (the
    forwarder's per-server byte rate limit and byte cap)."""

    def allowance(self, n: int) -> int:
        """How many of ``n`` bytes just read may be relayed (the rest are not)."""
        ...

    def spent(self, end: _End, n: int) -> None:
        """``n`` bytes read on ``end`` were relayed; the meter may ``end.hold(True)``."""
        ...


def _abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Abort; on a TCP connection, with an RST rather than a FIN, so that the
    peer sees a reset (and a cut-off transfer is not mistaken for a whole one)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class _End(asyncio.BufferedProtocol):
    """One side of a splice: what it reads goes to the other side's transport."""

    # Whatever this end receives is written to the other transport at once;
    # the transport copies (or, under uvloop, holds a view, which ReadBuffer
    # and the session's buffers respect), so memoryviews are safe here.
    _fastnat_accepts_views = True

    def __init__(self, splice: Splice, name: str) -> None:
        self.splice: Splice | None = splice  # None once the splice is over (see Splice._release)
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.other: _End | None = None
        self.buffer: ReadBuffer | None = None
        self.eof = False  # this side sent its FIN (read EOF)
        self.lost = False
        self.lost_reported = False
        self.bytes_in = 0
        # Reading this side is paused while the other side's write buffer is
        # full (backpressure) or while a meter holds it (a rate limit).
        self.backpressured = False
        self.held = False
        self.half_close = True  # False on TLS, which cannot half-close

    # reading this side
    def get_buffer(self, sizehint: int) -> memoryview:
        self.buffer = loop_read_buffer(SPLICE_READ_BUFFER)  # shared by the loop's connections
        return self.buffer.get()

    def buffer_updated(self, nbytes: int) -> None:
        assert self.buffer is not None
        self._forward(self.buffer.filled(nbytes))

    def data_received(self, data: Any) -> None:
        self._forward(data)

    def _forward(self, data: Any) -> None:
        other = self.other
        splice = self.splice
        assert other is not None and other.transport is not None and splice is not None
        meter = splice.meter
        if meter is not None:
            allowed = meter.allowance(len(data))
            if allowed < len(data):
                data = data[:allowed]  # a cap: the rest is not relayed
                if not allowed:
                    return
        self.bytes_in += len(data)
        if not other.lost:
            transport = other.transport
            transport.write(data)
            flush = getattr(transport, "flush", None)
            if flush is not None:
                flush()  # a stream: out now, not at the end of the loop iteration
        splice._count(self.name, len(data))
        if meter is not None:
            meter.spent(self, len(data))

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) reading this side for a meter;
        backpressure still applies either way."""
        self.held = held
        self.update_reading()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return
        if self.held or self.backpressured:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        assert other is not None
        if other.transport is not None and not other.lost:
            if other.transport.can_write_eof():
                other.transport.write_eof()
            else:
                other.transport.close()
        assert self.splice is not None
        self.splice._maybe_done()
        # Keep our write direction open (TLS cannot: its transport closes).
        return self.half_close

    # writing this side: backpressure onto the other side's reading
    def pause_writing(self) -> None:
        other = self.other
        if other is not None:
            other.backpressured = True
            other.update_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None:
            other.backpressured = False
            other.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost_reported:
            return  # reported already (see Splice.__init__)
        self.lost_reported = True
        self.lost = True
        other = self.other
        assert other is not None
        if other.transport is not None and not other.lost:
            if exc is not None:
                _abort_with_reset(other.transport)  # a reset becomes a reset
            else:
                other.transport.close()  # after what is buffered for it
        assert self.splice is not None
        self.splice._end_lost(self, exc)


class Splice:
    """Relay between transports ``a`` and ``b`` until both directions end.

    ``initial_a``/``initial_b`` are bytes already read from ``a``/``b`` (by
    a handshake) that go to the other side first; ``eof_a``/``eof_b`` say
    that side already sent its FIN. A transport that is already closing is
    treated as lost, with ``error_a``/``error_b`` (what closed it, as its
    previous protocol saw; None: cleanly) as the cause: a reset stays a reset. ``on_bytes(direction, n)``
    counts traffic (``"a>b"`` / ``"b>a"``); ``meter`` (a :class:`Meter`)
    may hold back reading or cut relaying short; ``done`` resolves when both
    transports are lost, with the first error seen or None.
    """

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        *,
        initial_a: bytes = b"",
        initial_b: bytes = b"",
        eof_a: bool = False,
        eof_b: bool = False,
        error_a: Exception | None = None,
        error_b: Exception | None = None,
        on_bytes: Callable[[str, int], None] | None = None,
        meter: Meter | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self._on_bytes = on_bytes
        self.meter = meter
        self._error: BaseException | None = None
        self.end_a = _End(self, "a>b")
        self.end_b = _End(self, "b>a")
        self.end_a.other, self.end_b.other = self.end_b, self.end_a
        self.end_a.transport, self.end_b.transport = a, b
        self.end_a.half_close, self.end_b.half_close = can_half_close(a), can_half_close(b)
        for end, transport, initial in ((self.end_a, a, initial_a), (self.end_b, b, initial_b)):
            if initial:
                end._forward(memoryview(initial))
        # Take over both transports; everything they deliver from now on
        # follows the initial bytes.
        a.set_protocol(self.end_a)
        b.set_protocol(self.end_b)
        loop = asyncio.get_running_loop()
        for end, transport, eof, error in ((self.end_a, a, eof_a, error_a), (self.end_b, b, eof_b, error_b)):
            if transport.is_closing():
                # Its connection_lost may have gone to the previous protocol.
                loop.call_soon(end.connection_lost, error)
            elif eof:
                end.eof_received()

    @property
    def bytes_a_to_b(self) -> int:
        return self.end_a.bytes_in

    @property
    def bytes_b_to_a(self) -> int:
        return self.end_b.bytes_in

    def resume_reading(self) -> None:
        """Read both sides (unless backpressure or a meter holds one back)."""
        for end in (self.end_a, self.end_b):
            end.update_reading()

    def finish(self) -> None:
        """Close both sides gracefully: what was relayed is delivered, then a FIN."""
        for end in (self.end_a, self.end_b):
            if end.transport is not None and not end.lost:
                end.transport.close()

    def close(self) -> None:
        """Abort both sides."""
        for end in (self.end_a, self.end_b):
            if end.transport is not None and not end.lost:
                end.transport.abort()

    def _count(self, direction: str, n: int) -> None:
        if self._on_bytes is not None:
            self._on_bytes(direction, n)

    def _maybe_done(self) -> None:
        a, b = self.end_a, self.end_b
        if a.eof and b.eof:
            for end in (a, b):
                if end.transport is not None and not end.lost:
                    end.transport.close()

    def _end_lost(self, end: _End, exc: BaseException | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        if self.end_a.lost and self.end_b.lost:
            if not self.done.done():
                self.done.set_result(self._error)
            self._release()

    def _release(self) -> None:
        """Both sides are gone: drop the references that make the ends, their
        transports and this splice a cycle, so that reference counting frees
        the connection (and whatever its transports still buffer) now, not
        the cyclic collector much later (a forwarder churning clients held
        tens of MiB of dead connections between full collections)."""
        for end in (self.end_a, self.end_b):
            end.transport = None
            end.other = None
            end.buffer = None
            end.splice = None


# How long closing a set of relays waits for their tasks to finish.
RELAYS_CLOSE_TIMEOUT = 5.0


class Relays:
    """The relayed connections of one tool (``expose``, a tunnel): a task per
    connection, and its splice once it runs; :meth:`close` ends them all."""

    def __init__(self) -> None:
        self._splices: set[Splice] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` (one connection's relaying) as a task of this set."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, splice: Splice) -> None:
        """Wait for ``splice`` to end; :meth:`close` aborts it meanwhile."""
        self._splices.add(splice)
        try:
            await splice.done
        finally:
            self._splices.discard(splice)

    async def close(self) -> None:
        """Abort every splice and cancel every task (bounded wait)."""
        for splice in list(self._splices):
            splice.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=RELAYS_CLOSE_TIMEOUT)
