"""A multiplexer session driven by the threads that use it (for fastnat.blocking).

No event loop carries its data. The sans-IO engine (:mod:`fastnat.mux`) and
every stream's receive buffer sit under one lock, and whichever application
thread needs progress makes it:

* a thread that waits (``recv`` on an empty stream, ``send`` on an empty
  window, ``accept``, ``ping``) takes the *read role* if nobody holds it:
  it reads the TCP connection into the session's one reused buffer (the lock
  released meanwhile), feeds the engine, copies each stream's data into that
  stream's buffer and wakes only the threads whose stream got something.
  Threads that find the role taken wait on their own condition; when the
  holder leaves, it hands the role to the first of them still waiting;
* a thread that sends encodes frames under the lock and writes them straight
  to the socket: the engine's output buffer goes to a non-blocking ``send``
  without a copy, and only what the kernel did not take is copied and
  written with a blocking ``sendall`` once the lock is released. One thread
  writes at a time (the *write role*), in the engine's order.

A thread never blocks on the socket while holding the lock, and a thread in
the read role never waits for the write role, so reading always goes on while
another thread is stuck in ``sendall`` (no deadlock between two peers whose
connection is full both ways).

Timers stay on fastnat's background loop thread (``fastnat.blocking``), which
never touches data in bulk: a keepalive ping every ``keepalive_interval``
(the session fails if it is not answered within ``keepalive_timeout``), and a
periodic non-blocking read while no application thread reads, so that pings
from the peer are answered and a dead peer noticed on an idle session.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from fastnat import mux
from fastnat.errors import MuxError, ProtocolError, StreamClosedError
from fastnat.mux_config import MuxConfig

__all__ = ["DrivenSession", "DrivenStream", "live_driven_sessions"]

log = logging.getLogger("fastnat.blocking")

_DataReceived = mux.DataReceived
_WindowUpdated = mux.WindowUpdated
_StreamOpened = mux.StreamOpened
_StreamEnded = mux.StreamEnded
_StreamReset = mux.StreamReset
_PingAcknowledged = mux.PingAcknowledged
_GoAwayReceived = mux.GoAwayReceived

# The read buffer, one per session, reused for every read: as large as the
# asyncio session's (most of what loopback delivers at once in one syscall).
READ_BUFFER_SIZE = 256 * 1024
# hashicorp/yamux's keepalive defaults, as fastnat.aio.MuxSession's.
DEFAULT_KEEPALIVE_INTERVAL = 30.0
DEFAULT_KEEPALIVE_TIMEOUT = 10.0
# The loop thread watches the connection and reads what arrives while no
# application thread does (pings answered at once, a dead peer noticed on an
# idle session). When an application thread has read within this time, the
# loop steps aside for as long instead of competing for the data: the
# threads that wait on streams read faster themselves.
LOOP_STANDBY = 0.05
# Reads the loop makes at most per wake-up, so that it never holds the loop
# thread for long while a peer sends in bulk to streams nobody reads.
LOOP_READS_MAX = 16
# A thread waiting in accept() while another holds the read role rechecks the
# role this often (doubling from MIN up to MAX): it is not woken when the
# role is handed on, so that a stream's own thread, not the acceptor, reads
# for that stream during transfers. New streams still wake it at once.
ACCEPT_RECHECK_MIN = 0.001
ACCEPT_RECHECK_MAX = 0.064

_live: weakref.WeakSet[DrivenSession] = weakref.WeakSet()


def live_driven_sessions() -> list[DrivenSession]:
    """The thread-driven sessions of this process that still exist."""
    return list(_live)


class DrivenStream:
    """One stream's state in a :class:`DrivenSession` (guarded by the session's lock)."""

    def __init__(self, session: DrivenSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.readable = threading.Condition(session._lock)
        self.writable = threading.Condition(session._lock)
        # Received, not yet read: the first piece read up to ``roffset``;
        # nothing in here is acknowledged to the peer yet.
        self.rbuf: deque[bytes] = deque()
        self.roffset = 0
        self.rsize = 0
        self.eof = False  # FIN received
        self.error: BaseException | None = None  # reset, or the session lost
        self.fin_sent = False
        self.released = False  # closed by the application: data arriving is dropped
        # The buffer of a recv_into() waiting on an empty stream: the thread
        # that reads the connection copies the stream's data straight into
        # it (``filled`` bytes so far) instead of into ``rbuf``.
        self.target: memoryview | None = None
        self.filled = 0

    # What fastnat.blocking.StreamSocket calls (its _StreamBackend).

    def recv(self, bufsize: int, timeout: float | None) -> bytes:
        return self.session.recv(self, bufsize, timeout)

    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        return self.session.recv_into(self, view, timeout)

    def send(self, view: memoryview, timeout: float | None) -> int:
        return self.session.send(self, view, timeout)

    def write_eof(self) -> None:
        self.session.write_eof(self)

    def shut_read(self) -> None:
        self.session.drop_received(self)

    def close(self) -> None:
        self.session.close_stream(self)


def _stream_ready_to_read(stream: DrivenStream) -> Callable[[], bool]:
    return lambda: bool(stream.rsize or stream.filled) or stream.eof or stream.error is not None


class DrivenSession:
    """A yamux session over a connected blocking socket, driven by its callers.

    ``client`` is True on the dialling side (odd stream ids). ``loop`` is the
    event loop that runs the timers (fastnat's background loop).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        client: bool,
        loop: asyncio.AbstractEventLoop,
        config: MuxConfig | None = None,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        engine: Any = None,
    ) -> None:
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError(f"keepalive_interval must be positive or None, got {keepalive_interval}")
        if keepalive_timeout <= 0:
            raise ValueError(f"keepalive_timeout must be positive, got {keepalive_timeout}")
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._fd = sock.fileno()
        self._extra = {"peername": sock.getpeername(), "sockname": sock.getsockname(), "socket": sock}
        self._client = client
        self._loop = loop
        # ``engine``: a module with a ``Session`` class (fastnat._mux or
        # fastnat._mux_py), as for fastnat.aio.MuxSession; by default fastnat.mux's.
        session_class = mux.Session if engine is None else getattr(engine, "Session", engine)
        self._engine = session_class(client, config, clock=time.monotonic)
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._lock = threading.Lock()
        self._write_role = threading.Lock()
        self._reading = False  # a thread holds the read role
        self._app_read_at = 0.0  # when an application thread last read
        self._waiting: dict[threading.Condition, None] = {}  # waiting for the read role's holder, in order
        self._accept_cond = threading.Condition(self._lock)
        self._closed_cond = threading.Condition(self._lock)
        self._buffer = bytearray(READ_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._read_poller = select.poll()  # used by the read role's holder only
        self._read_poller.register(self._fd, select.POLLIN)
        self._write_poller = select.poll()  # by the write role's
        self._write_poller.register(self._fd, select.POLLOUT)
        self._read_write_poller = select.poll()  # by the read role's, while something is left unsent
        self._read_write_poller.register(self._fd, select.POLLIN | select.POLLOUT)
        self._streams: dict[int, DrivenStream] = {}
        self._accept_queue: deque[DrivenStream] = deque()
        self._unsent: memoryview | None = None  # what a non-blocking write left, goes first
        self._leftover: bytes | None = None  # what the kernel did not take of one engine flush
        self._pings: dict[int, tuple[float, list[float]]] = {}
        self._ping_conds: dict[int, threading.Condition] = {}  # ping() callers waiting for an answer
        self._keepalive_ping: int | None = None
        # Loop-thread timers, by what they do; touched on the loop thread only.
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._io_busy = 0  # threads in a blocking call on the socket
        self._sock_shut = False
        self._closing_sock = False  # the loop is about to close it
        self._sock_closed = False
        self._closing = False  # close() was called, or the peer ended after Go Away
        self._error: BaseException | None = None
        self._error_callback: Callable[[DrivenSession, str, BaseException], Any] | None = None
        self._exiting = False
        _live.add(self)
        # The round trip at once: receive windows auto-tune from it.
        opaque = self._engine.ping()
        self._pings[opaque] = (time.monotonic(), [])
        self._flush(block=False)
        loop.call_soon_threadsafe(self._start_timers)

    # ------------------------------------------------------------ public API

    @property
    def client(self) -> bool:
        return self._client

    @property
    def engine(self) -> Any:
        """The sans-IO engine (``fastnat.mux.Session``) this session drives."""
        return self._engine

    @property
    def closed(self) -> bool:
        """The connection is closed (by either side, or by a failure)."""
        return self._sock_closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "session":
            return self
        return self._extra.get(name, default)

    def set_error_callback(self, callback: Callable[[DrivenSession, str, BaseException], Any] | None) -> None:
        self._error_callback = callback

    def open_stream(self) -> DrivenStream:
        with self._lock:
            self._raise_if_dead()
            try:
                stream_id = self._engine.open_stream()
            except MuxError as exc:
                raise ConnectionResetError(str(exc)) from exc
            stream = DrivenStream(self, stream_id)
            self._streams[stream_id] = stream
        self._flush(block=False)
        return stream

    def accept_stream(self, timeout: float | None) -> DrivenStream:
        deadline = _deadline(timeout)
        with self._lock:
            while True:
                while self._accept_queue:
                    stream = self._accept_queue.popleft()
                    if stream.error is not None:
                        continue  # reset by the peer before it was accepted
                    self._engine.accept_stream(stream.stream_id)
                    break
                else:
                    self._raise_if_dead()
                    if not self._wait(self._accept_cond, self._accept_ready, deadline, background=True):
                        raise TimeoutError(f"timed out after {timeout:g} s")
                    continue
                break
        self._flush(block=False)
        return stream

    def ping(self, timeout: float | None = None) -> float:
        timeout = self._keepalive_timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        cond = threading.Condition(self._lock)
        with self._lock:
            self._raise_if_dead()
            opaque = self._engine.ping()
            answer: list[float] = []
            self._pings[opaque] = (time.monotonic(), answer)
            self._ping_conds[opaque] = cond
        self._flush(block=False)
        with self._lock:
            try:
                if not self._wait(cond, lambda: bool(answer) or self._dead(), deadline):
                    raise TimeoutError(f"no answer to the ping within {timeout:g} s")
                if not answer:
                    self._raise_if_dead()
                return answer[0]
            finally:
                self._pings.pop(opaque, None)
                self._ping_conds.pop(opaque, None)

    def close(self, timeout: float | None) -> None:
        """Send Go Away, close the connection, wait until no thread uses it."""
        with self._lock:
            if not self._closing and self._error is None:
                self._closing = True
                try:
                    self._engine.go_away(0)
                except MuxError:
                    pass
                self._shutdown_streams(ConnectionAbortedError("the session was closed"))
        self._flush(block=False)
        with self._lock:
            self._shutdown_socket()
            if not _on_loop(self._loop):  # the loop closes the socket: it cannot wait for itself
                self._closed_cond.wait_for(lambda: self._sock_closed, timeout)
        self._cancel_timers_soon()

    def close_at_exit(self) -> None:
        """Interpreter exit: Go Away to the peer; threads blocked on streams
        stay blocked (they end with the process, as on a socket)."""
        with self._lock:
            self._exiting = True
            if self._dead():
                return
            try:
                self._engine.go_away(0)
            except MuxError:
                return
        self._flush(block=False)

    def __repr__(self) -> str:
        side = "client" if self._client else "server"
        state = "closed" if self._sock_closed else "closing" if self._closing or self._error else "open"
        return f"<DrivenSession {side} {state} streams={len(self._streams)}>"

    # ------------------------------------------------------- stream operations

    def recv(self, stream: DrivenStream, bufsize: int, timeout: float | None) -> bytes:
        with self._lock:
            self._wait_readable(stream, timeout)
            if not stream.rsize:
                if stream.error is not None:
                    raise _as_connection_error(stream.error)
                return b""
            data = _take(stream, bufsize)
            self._acknowledge(stream, len(data))
        if self._engine.bytes_to_send:
            self._flush(block=False)
        return data

    def recv_into(self, stream: DrivenStream, view: memoryview, timeout: float | None) -> int:
        with self._lock:
            if not stream.rsize:
                stream.target, stream.filled = view, 0
                try:
                    self._wait_readable(stream, timeout)
                finally:
                    n, stream.target, stream.filled = stream.filled, None, 0
            else:
                n = 0
            if stream.rsize and n < len(view):
                n += _take_into(stream, view[n:])
            if not n and stream.error is not None:
                raise _as_connection_error(stream.error)
            self._acknowledge(stream, n)
        if self._engine.bytes_to_send:
            self._flush(block=False)
        return n

    def _wait_readable(self, stream: DrivenStream, timeout: float | None) -> None:
        if stream.rsize or stream.eof or stream.error is not None:
            return
        if not self._wait(stream.readable, _stream_ready_to_read(stream), _deadline(timeout)):
            raise _timed_out(timeout, "no data is ready on the stream")

    def send(self, stream: DrivenStream, view: memoryview, timeout: float | None) -> int:
        """Queue as much of ``view`` as the window allows (waiting for credit
        first if there is none) and write it out; how much was taken."""
        engine = self._engine
        stream_id = stream.stream_id
        with self._lock:

            def ready() -> bool:
                return stream.error is not None or self._dead() or engine.send_window(stream_id) > 0

            deadline = _deadline(timeout)
            if not ready() and not self._wait(stream.writable, ready, deadline):
                raise _timed_out(timeout, "the stream's send window is full")
            if stream.error is not None:
                raise _as_connection_error(stream.error)
            self._raise_if_dead()
        taken: list[int] = []

        def encode() -> BaseException | None:
            # Lock and write role held, the socket writable: frames go
            # straight out (they fit in the kernel's buffer, mostly).
            if stream.error is not None:
                return _as_connection_error(stream.error)
            if self._dead():
                return ConnectionAbortedError("the session is closed") if self._error is None else self._lost_error()
            try:
                taken.append(engine.send_data(stream_id, view))
            except StreamClosedError as exc:
                return BrokenPipeError(errno.EPIPE, str(exc))
            return None

        failure = self._flush(block=True, encode=encode, deadline=deadline, timeout=timeout)
        if failure is not None:
            raise failure
        with self._lock:
            if self._error is not None:
                raise self._lost_error()
        return taken[0] if taken else 0

    def write_eof(self, stream: DrivenStream) -> None:
        with self._lock:
            if stream.fin_sent or stream.error is not None or self._dead():
                return
            self._end_stream(stream)
        self._flush(block=False)

    def drop_received(self, stream: DrivenStream) -> None:
        """Drop what the stream buffered (SHUT_RD), giving the credit back."""
        with self._lock:
            n = stream.rsize
            stream.rbuf.clear()
            stream.roffset = stream.rsize = 0
            self._acknowledge(stream, n)
            stream.readable.notify_all()
        if self._engine.bytes_to_send:
            self._flush(block=False)

    def close_stream(self, stream: DrivenStream) -> None:
        """The application closed the stream: FIN after what was sent; what
        the peer still sends is acknowledged and dropped."""
        with self._lock:
            if stream.released:
                return
            stream.released = True
            n = stream.rsize
            stream.rbuf.clear()
            stream.roffset = stream.rsize = 0
            self._acknowledge(stream, n)
            if not stream.fin_sent and stream.error is None and not self._dead():
                self._end_stream(stream)
            if stream.error is not None or (stream.eof and stream.fin_sent):
                self._streams.pop(stream.stream_id, None)
            stream.readable.notify_all()
            stream.writable.notify_all()
        self._flush(block=False)

    def _end_stream(self, stream: DrivenStream) -> None:
        try:
            self._engine.end_stream(stream.stream_id)
        except StreamClosedError:
            return
        stream.fin_sent = True
        if stream.eof:
            self._streams.pop(stream.stream_id, None)

    def _acknowledge(self, stream: DrivenStream, n: int) -> None:
        if n and not self._dead():
            self._engine.acknowledge_received_data(stream.stream_id, n)

    # ------------------------------------------------------- the read role

    def _wait(
        self,
        cond: threading.Condition,
        ready: Callable[[], bool],
        deadline: float | None,
        *,
        background: bool = False,
    ) -> bool:
        """Wait (lock held) until ``ready()``, reading the connection whenever
        nobody else does; False once ``deadline`` has passed."""
        recheck = ACCEPT_RECHECK_MIN
        try:
            while not ready():
                if self._dead():
                    return True
                if not self._reading:
                    if not (background and self._waiting):
                        if not self._drive(deadline) and not ready():
                            return False
                        continue
                    # An acceptor leaves the reading to the threads waiting
                    # on streams: their data then needs no hand-over.
                    next(iter(self._waiting)).notify()
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return False
                if background:
                    timeout = recheck if timeout is None else min(timeout, recheck)
                    recheck = min(recheck * 2, ACCEPT_RECHECK_MAX)
                    cond.wait(timeout)
                    continue
                self._waiting[cond] = None
                try:
                    cond.wait(timeout)
                finally:
                    self._waiting.pop(cond, None)
            return True
        finally:
            # Leaving: the next waiter takes the read role if nobody holds it.
            if not self._reading and self._waiting:
                next(iter(self._waiting)).notify()

    def _drive(self, deadline: float | None) -> bool:
        """Read once (lock held on entry and exit, released while reading);
        False if the deadline passed with nothing read."""
        self._reading = True
        self._io_busy += 1
        self._app_read_at = time.monotonic()
        self._lock.release()
        n: int | None = 0
        failure: OSError | None = None
        try:
            n = self._recv(deadline)
        except OSError as exc:
            failure = exc
        finally:
            self._lock.acquire()
            self._reading = False
            self._io_busy -= 1
        if failure is not None:
            self._connection_failed(failure)
        elif n is None:
            self._release_socket()
            return False
        elif n == 0:
            self._connection_ended()
        else:
            self._receive(self._view[:n])
        self._release_socket()
        if self._engine.bytes_to_send and not self._dead():
            self._lock.release()
            try:
                self._flush(block=False)
            finally:
                self._lock.acquire()
        return True

    def _recv(self, deadline: float | None) -> int | None:
        """Read into the buffer, waiting until ``deadline``; None if it passed.
        The descriptor may be in non-blocking mode (uvloop's watch sets it),
        so every wait is a poll()."""
        while True:
            try:
                return self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
            # While a timed-out writer's frame is left unsent, the reader
            # also finishes writing it once the socket takes more.
            idle_writer = self._unsent is not None and not self._write_role.locked()
            poller = self._read_write_poller if idle_writer else self._read_poller
            if deadline is None:
                events = poller.poll()
            else:
                wait_ms = math.ceil((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0 or not (events := poller.poll(wait_ms)):
                    return None
            if any(mask & select.POLLOUT for _fd, mask in events):
                self._flush(block=False)

    def _sendall(self, data: memoryview, deadline: float | None) -> memoryview | None:
        """Write all of ``data``, waiting for the socket (write role held);
        what is left if ``deadline`` passes first."""
        while data:
            data = data[self._send_now(data) :]
            if data and not self._socket_writable(deadline):
                return data
        return None

    def _receive(self, data: memoryview) -> None:
        """Feed the engine what was read and dispatch its events (lock held)."""
        try:
            events = self._engine.receive_data(data)
        except ProtocolError as exc:
            self._dispatch(exc.events)
            self._fail("receive", exc)
            return
        self._dispatch(events)

    def _dispatch(self, events: list[Any]) -> None:
        streams = self._streams
        engine = self._engine
        for event in events:
            kind = type(event)
            if kind is _DataReceived:
                stream = streams.get(event.stream_id)
                data = event.data
                if stream is None or stream.released:
                    engine.acknowledge_received_data(event.stream_id, len(data))  # nobody reads it
                    continue
                target = stream.target
                if target is not None and not stream.rsize:
                    start = stream.filled
                    k = min(len(data), len(target) - start)
                    target[start : start + k] = data[:k]  # straight into the waiting recv_into's buffer
                    stream.filled = start + k
                    if k == len(data):
                        stream.readable.notify()
                        continue
                    data = data[k:]
                stream.rbuf.append(bytes(data))
                stream.rsize += len(data)
                stream.readable.notify()
            elif kind is _WindowUpdated:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.writable.notify()
            elif kind is _StreamOpened:
                if self._closing:
                    engine.reset_stream(event.stream_id)
                    continue
                stream = DrivenStream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._accept_queue.append(stream)
                self._accept_cond.notify()
            elif kind is _StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.eof = True
                    if stream.fin_sent:
                        del streams[event.stream_id]
                    stream.readable.notify()
            elif kind is _StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.error = ConnectionResetError(f"stream {event.stream_id} was reset by the peer")
                    stream.readable.notify_all()
                    stream.writable.notify_all()
            elif kind is _PingAcknowledged:
                self._ping_answered(event.opaque)
            elif kind is _GoAwayReceived and event.code != 0:
                name = {1: "protocol error", 2: "internal error"}.get(event.code, f"code {event.code}")
                self._fail("go away", ConnectionResetError(f"the peer sent Go Away ({name})"))
                return

    def _ping_answered(self, opaque: int) -> None:
        entry = self._pings.pop(opaque, None)
        if entry is None:
            return
        sent, answer = entry
        answer.append(time.monotonic() - sent)
        cond = self._ping_conds.get(opaque)
        if cond is not None:
            cond.notify()
        if opaque == self._keepalive_ping:
            self._keepalive_ping = None

    # ------------------------------------------------------- the write role

    def _flush(
        self,
        *,
        block: bool,
        encode: Callable[[], BaseException | None] | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> BaseException | None:
        """Write what the engine queued (lock not held). ``block``: wait for
        the write role and for the socket; otherwise write what the kernel
        takes at once and leave the rest to the next writer. ``encode``
        (blocking only) queues frames once the role is held and the socket
        writable, so that they go out without being copied again; what it
        returns (an error) is returned, as is the timeout error if the socket
        stays full until ``deadline`` (then nothing was queued)."""
        while self._write_role.acquire(block):
            stuck = False
            try:
                if encode is not None:
                    if not self._sock_shut and not self._socket_writable(deadline):
                        return _timed_out(timeout, "the connection's send buffer is full")
                    with self._lock:
                        failure, encode = encode(), None
                    if failure is not None:
                        return failure
                while True:
                    with self._lock:
                        rest = self._write_some()
                        if rest is None:
                            break
                        if not block:
                            self._unsent = rest
                            stuck = True
                            break
                        self._io_busy += 1
                    try:
                        rest = self._sendall(rest, deadline)
                    finally:
                        with self._lock:
                            self._io_busy -= 1
                            self._release_socket()
                            if rest is not None:  # timed out mid-frame: it goes first, later
                                self._unsent = rest
                    if rest is not None:
                        return _timed_out(timeout, "the connection's send buffer is full")
            except OSError as exc:
                with self._lock:
                    self._connection_failed(exc)
                return None
            finally:
                self._write_role.release()
            if stuck or self._sock_shut or not (self._unsent is not None or self._engine.bytes_to_send):
                return None
        return None

    def _socket_writable(self, deadline: float | None) -> bool:
        if deadline is None:
            self._write_poller.poll()
            return True
        wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        return bool(self._write_poller.poll(wait_ms))

    def _write_some(self) -> memoryview | None:
        """With the lock and the write role: write what the kernel takes now;
        what it did not take (None when it took everything)."""
        if self._sock_shut:  # nothing goes out any more
            self._unsent = None
            if self._engine.bytes_to_send:
                self._engine.data_to_send()
            return None
        unsent, self._unsent = self._unsent, None
        if unsent is not None:
            sent = self._send_now(unsent)
            if sent < len(unsent):
                return unsent[sent:]
        if not self._engine.bytes_to_send:
            return None
        self._leftover = None
        self._engine.flush(self._write_now)
        leftover, self._leftover = self._leftover, None
        return None if leftover is None else memoryview(leftover)

    def _write_now(self, view: memoryview) -> None:
        sent = self._send_now(view)
        if sent < len(view):
            self._leftover = bytes(view[sent:])  # copied: the engine reuses its buffer

    def _send_now(self, view: memoryview) -> int:
        try:
            return self._sock.send(view, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    # ------------------------------------------------------------ timers

    def _start_timers(self) -> None:
        """Loop thread: arm the keepalive, watch the connection."""
        if self._keepalive_interval is not None:
            self._arm("keepalive", self._keepalive_interval, self._send_keepalive)
        self._watch()

    def _watch(self) -> None:
        self._timers.pop("watch", None)
        if not self._dead() and not self._closing_sock:
            self._loop.add_reader(self._fd, self._loop_read)

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Loop thread: run ``callback`` in ``delay`` s (replacing the timer of that name)."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if not self._dead():
            self._timers[name] = self._loop.call_later(delay, callback)

    def _send_keepalive(self) -> None:
        with self._lock:
            if self._dead():
                return
            if self._keepalive_ping is not None:  # the last one is still out: its deadline decides
                assert self._keepalive_interval is not None
                self._arm("keepalive", self._keepalive_interval, self._send_keepalive)
                return
            opaque = self._engine.ping()
            self._keepalive_ping = opaque
            self._pings[opaque] = (time.monotonic(), [])
        self._flush(block=False)
        assert self._keepalive_interval is not None
        self._arm("keepalive deadline", self._keepalive_timeout, lambda: self._keepalive_expired(opaque))
        self._arm("keepalive", self._keepalive_interval, self._send_keepalive)

    def _keepalive_expired(self, opaque: int) -> None:
        with self._lock:
            if not self._reading and not self._dead():
                self._read_now()  # the answer may be waiting unread
            if self._keepalive_ping == opaque and not self._dead():
                self._fail(
                    "keepalive", TimeoutError(f"no answer to a keepalive ping within {self._keepalive_timeout:g} s")
                )

    def _loop_read(self) -> None:
        """Loop thread, the connection is readable: read what has arrived,
        unless application threads are reading (then stand by a while)."""
        with self._lock:
            if self._dead() or self._reading or time.monotonic() - self._app_read_at < LOOP_STANDBY:
                self._loop.remove_reader(self._fd)
                if not self._dead():
                    self._arm("watch", LOOP_STANDBY, self._watch)
                return
            self._read_now()
        self._flush(block=False)

    def _read_now(self) -> None:
        """Read without waiting what has arrived (lock held, nobody reading)."""
        for _ in range(LOOP_READS_MAX):
            if self._reading or self._dead():
                break
            try:
                n = self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._connection_failed(exc)
                break
            if n == 0:
                self._connection_ended()
                break
            self._receive(self._view[:n])
        if not self._reading and self._waiting:
            next(iter(self._waiting)).notify()

    def _cancel_timers_soon(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cancel_timers)
        except RuntimeError:
            pass  # the loop is closed (interpreter exit)

    def _cancel_timers(self) -> None:
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            timer.cancel()
        if not self._sock_closed:
            self._loop.remove_reader(self._fd)

    # ------------------------------------------------------------ shutdown

    def _dead(self) -> bool:
        return self._error is not None or self._closing

    def _accept_ready(self) -> bool:
        return bool(self._accept_queue) or self._dead()

    def _lost_error(self) -> BaseException:
        assert self._error is not None
        error = ConnectionResetError(f"the session failed: {self._error}")
        error.__cause__ = self._error
        return error

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise self._lost_error()
        if self._closing:
            raise ConnectionAbortedError("the session is closed")

    def _connection_failed(self, exc: OSError) -> None:
        if self._dead():
            return
        self._fail("connection", ConnectionResetError(f"the connection failed: {exc}"))

    def _connection_ended(self) -> None:
        """The peer closed the connection (lock held)."""
        if self._dead():
            return
        if self._engine.go_away_received:
            self._closing = True
            self._shutdown_streams(ConnectionResetError("the peer closed the session after Go Away"))
            self._shutdown_socket()
            self._cancel_timers_soon()
            return
        self._fail("connection", ConnectionResetError("the peer closed the connection without Go Away"))

    def _fail(self, where: str, exc: BaseException) -> None:
        """The session failed (lock held): every stream and waiter learns it,
        the connection closes, the error callback is called once."""
        if self._dead():
            return
        self._error = exc
        lost = ConnectionResetError(f"the session failed ({where}): {exc}")
        lost.__cause__ = exc
        self._shutdown_streams(lost)
        if isinstance(exc, ProtocolError) and self._write_role.acquire(False):
            try:
                self._write_some()  # the Go Away the engine queued, if it fits now
            finally:
                self._write_role.release()
        # The callback runs on the loop (never under this lock), before the
        # socket is closed there: once ``closed`` is True it has been called.
        callback, self._error_callback = self._error_callback, None
        if callback is not None and not self._exiting:
            try:
                self._loop.call_soon_threadsafe(self._call_error_callback, callback, where, exc)
            except RuntimeError:
                pass  # the loop is closed: interpreter exit
        self._shutdown_socket()
        self._cancel_timers_soon()

    def _call_error_callback(self, callback: Callable[..., Any], where: str, exc: BaseException) -> None:
        try:
            callback(self, where, exc)
        except Exception:
            log.exception("the session's error callback failed")

    def _shutdown_streams(self, exc: BaseException) -> None:
        streams = list(self._streams.values()) + list(self._accept_queue)
        self._streams.clear()
        self._accept_queue.clear()
        for stream in streams:
            if stream.error is None:
                stream.error = exc
            stream.readable.notify_all()
            stream.writable.notify_all()
        self._accept_cond.notify_all()
        for cond in list(self._ping_conds.values()) + list(self._waiting):
            cond.notify_all()

    def _shutdown_socket(self) -> None:
        """Stop the connection both ways (wakes threads blocked on it); the
        descriptor is closed once no thread is inside a call on it."""
        if not self._sock_shut:
            self._sock_shut = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._release_socket()

    def _release_socket(self) -> None:
        if self._sock_shut and not self._closing_sock and self._io_busy == 0:
            # The loop closes it, once it no longer watches the descriptor.
            self._closing_sock = True
            try:
                self._loop.call_soon_threadsafe(self._close_socket)
            except RuntimeError:  # the loop is closed (interpreter exit)
                self._close_socket()

    def _close_socket(self) -> None:
        with self._lock:
            if self._sock_closed:
                return
            if not self._loop.is_closed():
                try:
                    self._loop.remove_reader(self._fd)
                except (RuntimeError, ValueError, OSError):
                    pass
            self._sock_closed = True
            for poller in (self._read_poller, self._write_poller, self._read_write_poller):
                poller.unregister(self._fd)
            self._sock.close()
            self._closed_cond.notify_all()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _timed_out(timeout: float | None, what: str) -> OSError:
    if timeout == 0.0:
        return BlockingIOError(errno.EAGAIN, what)
    return TimeoutError("timed out")


def _as_connection_error(exc: BaseException) -> OSError:
    if isinstance(exc, OSError):
        return exc
    error = ConnectionResetError(str(exc))
    error.__cause__ = exc
    return error


def _take(stream: DrivenStream, n: int) -> bytes:
    """Up to ``n`` buffered bytes (lock held, something buffered)."""
    rbuf = stream.rbuf
    first = rbuf[0]
    if stream.roffset == 0 and len(first) <= n:
        rbuf.popleft()  # a whole piece: handed over without a copy
        stream.rsize -= len(first)
        if len(first) == n or not rbuf:
            return first
        parts = [first]
        n -= len(first)
    else:
        parts = []
    while n and rbuf:
        piece = rbuf[0]
        offset = stream.roffset
        k = min(len(piece) - offset, n)
        parts.append(piece[offset : offset + k])
        _consumed(stream, piece, offset + k)
        n -= k
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _take_into(stream: DrivenStream, view: memoryview) -> int:
    done = 0
    want = len(view)
    rbuf = stream.rbuf
    while done < want and rbuf:
        piece = rbuf[0]
        offset = stream.roffset
        k = min(len(piece) - offset, want - done)
        view[done : done + k] = memoryview(piece)[offset : offset + k]
        _consumed(stream, piece, offset + k)
        done += k
    return done


def _consumed(stream: DrivenStream, piece: bytes, upto: int) -> None:
    stream.rsize -= upto - stream.roffset
    if upto == len(piece):
        stream.rbuf.popleft()
        stream.roffset = 0
    else:
        stream.roffset = upto

