"""A small, single-threaded driver that runs a fastnat engine over a real socket.

Test code, not library code: the asyncio session layer will live in ``src/``.
The driver owns one connected TCP socket and one engine ``Session``. Nothing
happens between calls: every method that waits (``run_until``, ``read``,
``call`` ...) pumps the socket itself with a ``selectors`` loop, so a test
decides exactly when bytes are read and written, and every wait has a deadline.

The pump: queued stream data goes into the engine with ``send_data`` as far as
each stream's send window allows (the rest waits for a ``WindowUpdated``), the
engine's frames go to the socket, and whatever the socket has is fed to
``receive_data`` and its events handled at once. ``DataReceived`` data is a view
into the read buffer, so every stream consumes it before the next read:

* ``"buffer"`` mode copies it into the stream's buffer; it is acknowledged only
  when the test reads it (``read``/``read_exactly``/``read_to_eof``) or calls
  ``acknowledge``; so a test that does not read keeps the peer's window closed;
* ``"hash"`` mode counts and hashes it and acknowledges it at once;
* ``"echo"`` mode queues a copy to be sent back on the same stream and
  acknowledges it only once ``send_data`` took it (real backpressure), and ends
  the stream after the peer ended it and everything was sent back.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, Self

from fastnat.errors import ProtocolError
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

READ_SIZE = 1024 * 1024
# Stop moving stream data into the engine while this much output is queued.
OUTPUT_HIGH_WATER = 4 * 1024 * 1024


class DriverTimeout(AssertionError):
    """A wait ran past its deadline."""


class StreamState:
    """What the driver knows about one stream."""

    def __init__(self, stream_id: int, inbound: bool, mode: str) -> None:
        self.stream_id = stream_id
        self.inbound = inbound
        self.mode = mode
        self.accepted = False  # ours: the peer's ACK arrived; theirs: we accepted
        self.remote_ended = False
        self.local_ended = False
        self.reset = False  # reset by the peer (or refused)
        self.local_reset = False
        # sending
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.end_requested = False
        self.sent = 0  # bytes send_data took
        # receiving
        self.received = 0
        self.acked = 0
        self.buffer = bytearray()
        self.hasher = hashlib.sha256()
        self.echo_unacked = 0
        self.windows: list[int] = []  # WindowUpdated deltas

    @property
    def unacked(self) -> int:
        return self.received - self.acked

    def __repr__(self) -> str:
        flags = [
            name
            for name in ("inbound", "accepted", "remote_ended", "local_ended", "reset", "local_reset")
            if getattr(self, name)
        ]
        return (
            f"<stream {self.stream_id} {self.mode} {' '.join(flags)} sent={self.sent} "
            f"pending={self.pending_bytes} received={self.received} acked={self.acked}>"
        )


class MuxDriver:
    """Runs ``engine.Session`` over ``sock``.

    ``on_open`` says what happens to a stream the peer opens: ``"accept"``
    (accept it at once, in ``inbound_mode``), ``"refuse"`` (reset it at once) or
    ``"hold"`` (leave it pending; the test calls ``accept`` or ``refuse``).
    """

    def __init__(
        self,
        engine: ModuleType,
        sock: socket.socket,
        *,
        client: bool,
        config: Any = None,
        clock: Callable[[], float] | None = time.monotonic,
        on_open: str = "accept",
        inbound_mode: str = "buffer",
    ) -> None:
        self.engine = engine
        self.session = engine.Session(client, config, clock=clock)
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self._want_write = False
        self.on_open = on_open
        self.inbound_mode = inbound_mode
        self.streams: dict[int, StreamState] = {}
        self.opened_by_peer: list[int] = []  # in the order their SYNs arrived
        self.pings_received: list[int] = []
        self.pings_acknowledged: list[int] = []
        self.go_away_codes: list[int] = []
        self.eof = False  # the peer closed the TCP connection
        self.hold_output = False  # when True, frames stay in the engine
        self.bytes_in = 0
        self.bytes_out = 0
        self._out = bytearray()
        self._rbuf = bytearray(READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._closed = False

    # ------------------------------------------------------------ commands

    def open_stream(self, mode: str = "buffer") -> int:
        stream_id = self.session.open_stream()
        self.streams[stream_id] = StreamState(stream_id, False, mode)
        return stream_id

    def accept(self, stream_id: int, mode: str | None = None) -> None:
        """Accept a held stream; ``mode`` may change how its data is consumed
        from now on (data already taken in stays where its old mode put it)."""
        st = self.streams[stream_id]
        if mode is not None:
            st.mode = mode
        self.session.accept_stream(stream_id)
        st.accepted = True

    def refuse(self, stream_id: int) -> None:
        self.reset(stream_id)

    def reset(self, stream_id: int) -> None:
        st = self.streams[stream_id]
        self.session.reset_stream(stream_id)
        st.local_reset = True
        st.pending.clear()
        st.pending_bytes = 0

    def write(self, stream_id: int, data: Any, *, end: bool = False) -> None:
        """Queue ``data`` (kept by reference: do not change it) for the stream."""
        st = self.streams[stream_id]
        assert not st.end_requested, f"stream {stream_id} was already ended"
        view = memoryview(data).cast("B")
        if len(view):
            st.pending.append(view)
            st.pending_bytes += len(view)
        if end:
            st.end_requested = True
        self._push()

    def end(self, stream_id: int) -> None:
        """End (FIN) the stream once its queued data is sent."""
        self.write(stream_id, b"", end=True)

    def acknowledge(self, stream_id: int, n: int) -> None:
        st = self.streams[stream_id]
        assert 0 <= n <= st.unacked, (n, st)
        st.acked += n
        self.session.acknowledge_received_data(stream_id, n)

    def ping(self) -> int:
        return self.session.ping()

    def go_away(self, code: int = 0) -> None:
        self.session.go_away(code)

    # ------------------------------------------------------------ reading

    def take(self, stream_id: int, n: int | None = None) -> bytes:
        """Take (and acknowledge) up to ``n`` buffered bytes without pumping."""
        st = self.streams[stream_id]
        n = len(st.buffer) if n is None else min(n, len(st.buffer))
        data = bytes(st.buffer[:n])
        del st.buffer[:n]
        if n:
            self.acknowledge(stream_id, n)
        return data

    def read_exactly(self, stream_id: int, n: int, timeout: float) -> bytes:
        st = self.streams[stream_id]
        self.run_until(
            lambda: len(st.buffer) >= n or st.remote_ended or st.reset,
            timeout,
            f"{n} bytes on stream {stream_id}",
        )
        assert len(st.buffer) >= n, f"stream {stream_id} ended after {len(st.buffer)} of {n} bytes: {st}"
        return self.take(stream_id, n)

    def read_line(self, stream_id: int, timeout: float) -> bytes:
        st = self.streams[stream_id]
        self.run_until(
            lambda: b"\n" in st.buffer or st.remote_ended or st.reset, timeout, f"a line on stream {stream_id}"
        )
        i = st.buffer.find(b"\n")
        assert i >= 0, f"stream {stream_id} ended without a full line: {bytes(st.buffer[:200])!r} {st}"
        return self.take(stream_id, i + 1)

    def read_to_eof(self, stream_id: int, timeout: float) -> bytes:
        """Read (acknowledging as it goes) until the peer ends the stream."""
        st = self.streams[stream_id]
        parts = []

        def done() -> bool:
            if st.buffer:
                parts.append(self.take(stream_id))
            return st.remote_ended or st.reset

        self.run_until(done, timeout, f"the end of stream {stream_id}")
        assert not st.reset, f"stream {stream_id} was reset: {st}"
        parts.append(self.take(stream_id))
        return b"".join(parts)

    # ------------------------------------------------------------ pumping

    def run_until(self, predicate: Callable[[], bool], timeout: float, what: str = "a condition") -> None:
        """Pump until ``predicate()`` is true; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.eof:
                # Nothing more can arrive: fail now rather than at the deadline.
                raise DriverTimeout(f"the peer closed the connection while waiting for {what}; {self.describe()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverTimeout(f"timed out after {timeout} s waiting for {what}; {self.describe()}")
            self.pump(min(left, 0.01))

    def run_for(self, seconds: float) -> None:
        """Pump for ``seconds`` (to let things settle, or to see that nothing more comes)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.pump(min(left, 0.01))

    def pump(self, timeout: float = 0.0) -> None:
        """One round: push stream data, write, wait up to ``timeout`` for the socket, read."""
        self._push()
        self._write()
        if self.eof:
            time.sleep(timeout)  # the peer is gone: nothing to wait for on the socket
            return
        want_write = bool(self._out)
        if want_write != self._want_write:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(self.sock, events)
            self._want_write = want_write
        for _key, mask in self.selector.select(timeout):
            if mask & selectors.EVENT_READ:
                self._read()
            if mask & selectors.EVENT_WRITE and not self.eof:
                self._write()

    def _read(self) -> None:
        # A few reads per round, so that writing is not starved.
        for _ in range(8):
            if self.eof:
                return
            try:
                n = self.sock.recv_into(self._rbuf)
            except BlockingIOError:
                return
            except ConnectionResetError:
                n = 0
            if n == 0:
                self._set_eof()
                return
            self.bytes_in += n
            try:
                events = self.session.receive_data(self._rview[:n])
            except ProtocolError as exc:
                for event in exc.events:
                    self._handle(event)
                self._write()  # best effort: the Go Away (protocol error) the engine queued
                raise
            for event in events:
                self._handle(event)
            self._push()
            self._write()
            if n < len(self._rbuf):
                return

    def _set_eof(self) -> None:
        if not self.eof:
            self.eof = True
            self.selector.unregister(self.sock)

    def _flush_engine(self) -> None:
        """Queue the engine's frames behind what is already waiting (never while held)."""
        if not self.hold_output and self.session.bytes_to_send:
            self._out += self.session.data_to_send()

    def _write(self) -> None:
        out = self._out
        while out:
            n = self._send(out)
            if n is None:
                return
            del out[:n]
        if self.hold_output or self.eof or not self.session.bytes_to_send:
            return
        # Nothing else waits: send straight from the engine's buffer, keeping
        # only what the socket does not take.
        self.session.flush(self._send_view)

    def _send_view(self, view: memoryview) -> None:
        n = self._send(view)
        if n is not None and n < len(view):
            self._out += view[n:]

    def _send(self, data: Any) -> int | None:
        """One non-blocking send; None when the socket is full or the peer is gone."""
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            if data is not self._out:
                self._out += data
            return None
        except (BrokenPipeError, ConnectionResetError):
            # The peer is gone; what is left cannot be delivered.
            self._set_eof()
            self._out.clear()
            return None
        self.bytes_out += n
        return n

    def _push(self) -> None:
        """Move queued stream data into the engine, as the send windows allow."""
        session = self.session
        for st in list(self.streams.values()):
            if st.reset or st.local_reset or st.local_ended:
                continue
            if st.inbound and not st.accepted:
                continue  # send_data would accept it: a held stream waits for accept()
            while st.pending and len(self._out) + session.bytes_to_send < OUTPUT_HIGH_WATER:
                view = st.pending[0]
                n = session.send_data(st.stream_id, view)
                if n == 0:
                    break
                st.sent += n
                st.pending_bytes -= n
                if st.mode == "echo" and st.echo_unacked:
                    k = min(n, st.echo_unacked)
                    st.echo_unacked -= k
                    self.acknowledge(st.stream_id, k)
                if n == len(view):
                    st.pending.popleft()
                else:
                    st.pending[0] = view[n:]
            if st.end_requested and not st.pending and not st.local_ended:
                session.end_stream(st.stream_id)
                st.local_ended = True

    # ------------------------------------------------------------ events

    def _handle(self, event: Any) -> None:
        if isinstance(event, DataReceived):
            st = self.streams[event.stream_id]
            data = event.data
            n = len(data)
            st.received += n
            if st.mode == "buffer":
                st.buffer += data
            elif st.mode == "hash":
                st.hasher.update(data)
                self.acknowledge(st.stream_id, n)
            elif st.mode == "echo":
                st.hasher.update(data)
                st.echo_unacked += n
                if not (st.local_reset or st.local_ended):
                    copy = memoryview(bytes(data))
                    st.pending.append(copy)
                    st.pending_bytes += n
            else:  # pragma: no cover - a bug in a test
                raise AssertionError(f"unknown stream mode {st.mode!r}")
        elif isinstance(event, WindowUpdated):
            self.streams[event.stream_id].windows.append(event.delta)
        elif isinstance(event, StreamOpened):
            st = StreamState(event.stream_id, True, self.inbound_mode)
            self.streams[event.stream_id] = st
            self.opened_by_peer.append(event.stream_id)
            if self.on_open == "accept":
                self.accept(event.stream_id)
            elif self.on_open == "refuse":
                self.refuse(event.stream_id)
        elif isinstance(event, StreamAccepted):
            self.streams[event.stream_id].accepted = True
        elif isinstance(event, StreamEnded):
            st = self.streams[event.stream_id]
            st.remote_ended = True
            if st.mode == "echo":
                st.end_requested = True
        elif isinstance(event, StreamReset):
            st = self.streams[event.stream_id]
            st.reset = True
            st.pending.clear()
            st.pending_bytes = 0
        elif isinstance(event, PingReceived):
            self.pings_received.append(event.opaque)
        elif isinstance(event, PingAcknowledged):
            self.pings_acknowledged.append(event.opaque)
        elif isinstance(event, GoAwayReceived):
            self.go_away_codes.append(event.code)
        else:  # pragma: no cover
            raise TypeError(f"unexpected event {event!r}")

    # ------------------------------------------------------------ misc

    def describe(self) -> str:
        streams = ", ".join(repr(st) for st in self.streams.values() if not self._finished(st))
        return (
            f"session(stream_count={self.session.stream_count}, eof={self.eof}, in={self.bytes_in}, "
            f"out={self.bytes_out}, queued={len(self._out) + self.session.bytes_to_send}, "
            f"go_away={self.go_away_codes}, error={self.session.error!r}); unfinished streams: [{streams}]"
        )

    @staticmethod
    def _finished(st: StreamState) -> bool:
        return st.reset or st.local_reset or (st.local_ended and st.remote_ended)

    def flush_out(self, timeout: float) -> None:
        """Pump until everything queued (stream data and frames) is written."""
        self.run_until(
            lambda: (
                not self._out
                and not self.session.bytes_to_send
                and not any(st.pending for st in self.streams.values() if not self._finished(st))
            ),
            timeout,
            "the output to drain",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.selector.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
