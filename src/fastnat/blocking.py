"""Blocking sessions and socket-like streams, for code without an event loop.

Each stream is a :class:`StreamSocket`: an object with the methods a
``socket.socket`` user reaches for (``send``, ``sendall``, ``recv``,
``recv_into``, ``shutdown``, ``settimeout``, ``makefile``...). One reader
thread and one writer thread may use a stream at the same time. Its session
is one of two kinds:

* made by :meth:`BlockingSession.connect` or :meth:`BlockingSession.from_socket`:
  driven by the threads that use it (:mod:`fastnat._driven`). A thread blocked
  on a stream reads the connection itself and a sending thread writes to it;
  no other thread touches the data;
* made from a :class:`fastnat.aio.MuxSession` (``BlockingSession(session)``,
  TLS, the NAT layer's streams): the session lives on the background loop and
  data crosses threads through a bounded buffer on each side (a :class:`_Bridge`).

Either way a thread that stops reading stops the peer (window credit is
withheld) and a thread that writes faster than the stream can carry blocks in
``sendall``. One background thread per process runs an event loop (uvloop
when installed), started on first use and stopped at interpreter exit: the
loop-owned sessions, and the driven sessions' timers (keepalive, and reading
while no application thread does).
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import io
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from fastnat._driven import DrivenSession, DrivenStream, _as_connection_error, _timed_out, live_driven_sessions
from fastnat.aio._loop import new_event_loop
from fastnat.aio.session import MuxSession
from fastnat.aio.stream import StreamTransport
from fastnat.mux_config import MuxConfig

__all__ = ["BlockingSession", "StreamSocket", "run_in_loop", "loop_thread"]

T = TypeVar("T")

# Received data buffered for the reading thread before the stream stops
# reading (and so stops acknowledging to the peer).
RECV_BUFFER_LIMIT = 1024 * 1024
# Data handed to the loop and not yet taken by the stream before sendall()
# blocks: enough to keep the loop busy between two wake-ups of the writer.
SEND_BUFFER_LIMIT = 1024 * 1024
# Data crosses between the threads copied into pieces of this size, taken
# from a pool and given back once read or written: a fresh buffer per read
# or write, once freed, is returned to the system by glibc's malloc (mmap
# above 128 KiB, heap trimming below), so every copy would page-fault.
PIECE_SIZE = 64 * 1024
# Free pieces the pool keeps (4 MiB): enough for a few busy streams both
# ways; pieces beyond it are freed, so idle streams hold no memory.
PIECE_POOL_MAX = 64
# How long interpreter exit waits for the loop thread to finish.
_EXIT_JOIN_TIMEOUT = 5.0


class _LoopThread:
    """The process's background event loop thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The running background loop, started on first use (and again in a forked child)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid() or not self._thread or not self._thread.is_alive():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name="fastnat-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def stop(self, timeout: float = _EXIT_JOIN_TIMEOUT) -> None:
        """Stop the loop (cancelling what runs on it) and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                return
            self._loop = self._thread = None
        if thread.is_alive():
            try:
                # Close the sessions living on the loop (Go Away, then the
                # connection) before stopping it, so peers see a clean end.
                asyncio.run_coroutine_threadsafe(_close_sessions(timeout / 2), loop).result(timeout)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)


# Set at interpreter exit: sessions are closed then, but threads still
# blocked on their streams are daemonic and end with the process, as they
# would on a socket, rather than waking to raise into a dying interpreter.
_exiting = False


async def _close_sessions(timeout: float) -> None:
    from fastnat.aio.session import live_sessions

    global _exiting
    _exiting = True
    loop = asyncio.get_running_loop()
    for driven in live_driven_sessions():
        driven.close_at_exit()
    sessions = [s for s in live_sessions() if s._loop is loop and not s.closed]
    for session in sessions:
        session.close()
    if sessions:
        await asyncio.wait([loop.create_task(s.wait_closed()) for s in sessions], timeout=timeout)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


loop_thread = _LoopThread()
atexit.register(loop_thread.stop)


def run_in_loop(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result.

    On timeout the coroutine is cancelled and :class:`TimeoutError` raised.
    """
    loop = loop_thread.get_loop()
    if threading.current_thread() is loop_thread.thread:
        coro.close()
        raise RuntimeError("blocking fastnat calls cannot be made from the fastnat loop thread")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise TimeoutError(f"timed out after {timeout:g} s") from None


# ----------------------------------------------------------------- the bridge


class _Bridge(asyncio.Protocol):
    """The loop-side protocol of a StreamSocket: moves data between the
    stream transport (loop thread) and the socket's caller threads."""

    _fastnat_accepts_views = True  # data_received copies at once

    def __init__(self, transport: StreamTransport) -> None:
        self.transport = transport
        self.loop = transport._loop
        self.lock = threading.Lock()
        self.readable = threading.Condition(self.lock)
        self.writable = threading.Condition(self.lock)
        # Received, not yet read: pieces (at most PIECE_SIZE each), the
        # first one read up to ``roffset``; ``rsize`` bytes in all.
        self.rbuf: deque[memoryview] = deque()
        self.roffset = 0
        self.rsize = 0
        self.eof = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self.write_paused = False
        # Written by a caller, not yet handed to the stream: pieces, and
        # whether a flush on the loop is already on its way (one wake-up
        # of the loop carries every piece written meanwhile).
        self.outbox: list[memoryview] = []
        self.flush_scheduled = False
        self.queued = 0  # bytes in the outbox and in a flush under way
        self.lost = False

    # loop thread -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: Any) -> None:
        pieces = _copy_to_pieces(data)
        n = len(data)
        with self.lock:
            self.rbuf.extend(pieces)
            self.rsize += n
            self.readable.notify()
            if self.rsize >= RECV_BUFFER_LIMIT and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()

    def take(self, n: int) -> bytes:
        """Up to ``n`` received bytes (lock held, something received)."""
        parts = []
        while n and self.rbuf:
            piece = self.rbuf[0]
            offset = self.roffset
            k = min(len(piece) - offset, n)
            parts.append(bytes(piece[offset : offset + k]))  # copied before the piece goes back
            self._consumed(piece, offset + k)
            n -= k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_into(self, view: memoryview) -> int:
        """Copy received bytes into ``view`` (lock held); how many."""
        done = 0
        want = len(view)
        while done < want and self.rbuf:
            piece = self.rbuf[0]
            offset = self.roffset
            k = min(len(piece) - offset, want - done)
            view[done : done + k] = piece[offset : offset + k]
            self._consumed(piece, offset + k)
            done += k
        return done

    def _consumed(self, piece: memoryview, upto: int) -> None:
        self.rsize -= upto - self.roffset
        if upto == len(piece):
            self.rbuf.popleft()
            self.roffset = 0
            _release_pieces((piece,))
        else:
            self.roffset = upto

    def drop_received(self) -> None:
        _release_pieces(self.rbuf)
        self.rbuf.clear()
        self.roffset = self.rsize = 0

    def eof_received(self) -> bool:
        with self.lock:
            self.eof = True
            self.readable.notify_all()
        return True  # keep the write side open: half-close

    def pause_writing(self) -> None:
        with self.lock:
            self.write_paused = True

    def resume_writing(self) -> None:
        with self.lock:
            self.write_paused = False
            self.writable.notify_all()

    def connection_lost(self, exc: Exception | None) -> None:
        if _exiting:
            return
        with self.lock:
            self.lost = True
            if exc is not None and self.error is None:
                self.error = exc
            self.eof = True
            self.readable.notify_all()
            self.writable.notify_all()

    def do_flush(self) -> None:
        """Hand every piece in the outbox to the stream (loop thread)."""
        with self.lock:
            pieces, self.outbox = self.outbox, []
            self.flush_scheduled = False
        n = sum(len(piece) for piece in pieces)
        try:
            transport = self.transport
            for piece in pieces:
                if not self.lost and not transport.is_closing():
                    transport.write(piece)  # it copies (into the engine or its pending buffer)
        except Exception as exc:  # the stream or session failed under us
            with self.lock:
                if self.error is None:
                    self.error = exc
        finally:
            _release_pieces(pieces)
            with self.lock:
                self.queued -= n
                self.writable.notify_all()

    def do_resume_reading(self) -> None:
        with self.lock:
            if not self.reading_paused or self.rsize >= RECV_BUFFER_LIMIT // 2:
                return
            self.reading_paused = False
        self.transport.resume_reading()

    # caller threads ----------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (interpreter exit)
            raise ConnectionAbortedError("the fastnat loop has stopped") from None

    def recv(self, bufsize: int, timeout: float | None) -> bytes:
        with self.lock:
            self._wait_readable(timeout)
            if not self.rsize:
                if self.error is not None:
                    raise _as_connection_error(self.error)
                return b""
            data = self.take(bufsize)
            resume = self.reading_paused and self.rsize < RECV_BUFFER_LIMIT // 2
        if resume:
            self.call(self.do_resume_reading)
        return data

    def recv_into(self, view: memoryview, timeout: float | None) -> int:
        with self.lock:
            self._wait_readable(timeout)
            if not self.rsize:
                if self.error is not None:
                    raise _as_connection_error(self.error)
                return 0
            n = self.take_into(view)
            resume = self.reading_paused and self.rsize < RECV_BUFFER_LIMIT // 2
        if resume:
            self.call(self.do_resume_reading)
        return n

    def _wait_readable(self, timeout: float | None) -> None:
        """Wait (lock held) until data, EOF or an error is there."""
        if not _deadline_wait(self.readable, timeout, lambda: self.rsize > 0 or self.eof):
            raise _timed_out(timeout, "no data is ready on the stream")

    def send(self, view: memoryview, timeout: float | None) -> int:
        limit = SEND_BUFFER_LIMIT
        with self.lock:

            def ready() -> bool:
                return self.lost or self.error is not None or (self.queued < limit and not self.write_paused)

            if not _deadline_wait(self.writable, timeout, ready):
                raise _timed_out(timeout, "the stream's buffer is full")
            if self.error is not None:
                raise _as_connection_error(self.error)
            if self.lost:
                raise BrokenPipeError(errno.EPIPE, "the stream is closed")
            n = min(len(view), limit - self.queued)
            self.queued += n  # reserved: the copy below happens without the lock
        pieces = _copy_to_pieces(view[:n])
        with self.lock:
            self.outbox.extend(pieces)
            schedule = not self.flush_scheduled
            self.flush_scheduled = True
        if schedule:
            self.call(self.do_flush)
        return n

    def write_eof(self) -> None:
        self.call(self.transport.write_eof)

    def shut_read(self) -> None:
        """SHUT_RD: drop what is buffered, and read on (what arrives is dropped)."""
        with self.lock:
            self.drop_received()
            self.readable.notify_all()
            paused = self.reading_paused
            self.reading_paused = False
        if paused:
            self.call(self.transport.resume_reading)

    def close(self) -> None:
        with self.lock:
            self.readable.notify_all()
            self.writable.notify_all()
        try:
            self.call(self.transport.close)
        except ConnectionAbortedError:
            pass


class _StreamBackend(Protocol):
    """What a StreamSocket drives: a stream of a loop-owned session
    (:class:`_Bridge`) or of a thread-driven one (:class:`DrivenStream`)."""

    def recv(self, bufsize: int, timeout: float | None) -> bytes: ...
    def recv_into(self, view: memoryview, timeout: float | None) -> int: ...
    def send(self, view: memoryview, timeout: float | None) -> int: ...
    def write_eof(self) -> None: ...
    def shut_read(self) -> None: ...
    def close(self) -> None: ...


def _deadline_wait(cond: threading.Condition, timeout: float | None, ready: Callable[[], bool]) -> bool:
    """Wait on ``cond`` (held) until ``ready()``; False on timeout."""
    if timeout is None:
        while not ready():
            cond.wait()
        return True
    return cond.wait_for(ready, timeout)


class StreamSocket:
    """A socket-like object for one multiplexed stream.

    Blocking by default; ``settimeout`` bounds ``recv``/``send`` waits and a
    timeout raises :class:`TimeoutError` (``socket.timeout``). ``recv`` returns
    ``b""`` at the end of the stream. ``fileno()`` is -1: there is no file
    descriptor to select on.
    """

    def __init__(self, backend: _StreamBackend, extra: dict[str, Any]) -> None:
        # The stream underneath: a _Bridge to a loop-owned session's stream,
        # or a DrivenStream (the name is older than the second kind).
        self._bridge = backend
        self._timeout: float | None = None
        self._closed = False  # close() was called
        self._released = False  # the stream is closed: close() with no file objects left open
        self._shut_wr = False
        self._shut_rd = False
        self._io_refs = 0
        self._peername = extra.get("peername")
        self._sockname = extra.get("sockname")
        self._stream_id = extra.get("stream_id")
        self.family = socket.AF_INET
        self.type = socket.SOCK_STREAM
        self.proto = 0

    # ------------------------------------------------------------ settings

    @property
    def stream_id(self) -> int | None:
        return self._stream_id

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def getpeername(self) -> Any:
        self._check_open()
        return self._peername

    def getsockname(self) -> Any:
        self._check_open()
        return self._sockname

    def fileno(self) -> int:
        return -1

    def setsockopt(self, *args: Any) -> None:
        """Accepted and ignored: options belong to the session's TCP connection."""

    # -------------------------------------------------------------- reading

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        self._check_open()
        if flags:
            raise OSError(errno.EOPNOTSUPP, "recv flags are not supported on a fastnat stream")
        if bufsize == 0:
            return b""  # as a socket does: nothing asked, nothing waited for
        if self._shut_rd:
            self._bridge.shut_read()
            return b""
        return self._bridge.recv(bufsize, self._timeout)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes == 0 or nbytes > len(view):
            nbytes = len(view)  # as socket.recv_into: 0 means the whole buffer
        self._check_open()
        if flags:
            raise OSError(errno.EOPNOTSUPP, "recv flags are not supported on a fastnat stream")
        if nbytes == 0:
            return 0
        if self._shut_rd:
            self._bridge.shut_read()
            return 0
        return self._bridge.recv_into(view[:nbytes], self._timeout)

    # -------------------------------------------------------------- writing

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        offset = 0
        while offset < len(view):
            offset += self._send_some(view[offset:])

    def send(self, data: Any, flags: int = 0) -> int:
        return self._send_some(memoryview(data).cast("B"))

    def _send_some(self, view: memoryview) -> int:
        self._check_open()
        if self._shut_wr:
            raise BrokenPipeError(errno.EPIPE, "the stream was shut down for writing")
        if not view:
            return 0
        return self._bridge.send(view, self._timeout)

    # ------------------------------------------------------------- closing

    def shutdown(self, how: int) -> None:
        """``SHUT_WR`` half-closes (FIN after the data sent). ``SHUT_RD`` makes
        ``recv`` return ``b""`` and drops buffered data; as with TCP, data
        the peer still sends keeps occupying the window, so a peer that goes
        on sending eventually blocks."""
        self._check_open()
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError(f"invalid shutdown mode {how}")
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._shut_wr:
            self._shut_wr = True
            self._bridge.write_eof()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._shut_rd = True
            self._bridge.shut_read()

    def close(self) -> None:
        """Close the stream: what was sent goes out, then a FIN (once the
        file objects from ``makefile`` are closed too, as with a socket)."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        if self._released:
            return
        self._released = True
        self._bridge.close()

    def detach(self) -> int:
        raise OSError(errno.EOPNOTSUPP, "a fastnat stream has no file descriptor to detach")

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object over the stream, as ``socket.makefile`` gives."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffer
        text = io.TextIOWrapper(buffer, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _check_open(self) -> None:
        # As with a socket, file objects from makefile() keep the stream
        # usable after close() until the last of them is closed.
        if self._released:
            raise OSError(errno.EBADF, "Bad file descriptor")

    def __enter__(self) -> StreamSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<StreamSocket stream={self._stream_id} {state} peer={self._peername}>"


_piece_pool: list[bytearray] = []


def _copy_to_pieces(data: Any) -> list[memoryview]:
    """``data`` copied into pooled pieces: views of their filled part."""
    view = memoryview(data).cast("B")
    pieces = []
    for start in range(0, len(view), PIECE_SIZE):
        part = view[start : start + PIECE_SIZE]
        try:
            buffer = _piece_pool.pop()  # atomic under the GIL, as append is
        except IndexError:
            buffer = bytearray(PIECE_SIZE)
        k = len(part)
        buffer[:k] = part  # same length: copies in place, never resizes
        pieces.append(memoryview(buffer)[:k])
    return pieces


def _release_pieces(pieces: Any) -> None:
    """Give pieces back to the pool (their data is no longer needed)."""
    for piece in pieces:
        if len(_piece_pool) < PIECE_POOL_MAX:
            _piece_pool.append(piece.obj)


def _make_socket(transport: StreamTransport, initial: bytes = b"") -> StreamSocket:
    """Attach a bridge to ``transport`` (taking it over from a handshake's
    protocol, with the bytes it read ahead); must run on the loop thread."""
    bridge = _Bridge(transport)
    if initial:
        bridge.rbuf.extend(_copy_to_pieces(initial))
        bridge.rsize = len(initial)
    transport.attach(bridge, replace=True)
    extra = {
        "peername": transport.get_extra_info("peername"),
        "sockname": transport.get_extra_info("sockname"),
        "stream_id": transport.stream_id,
    }
    return StreamSocket(bridge, extra)


# --------------------------------------------------------------- the session


# Session options a thread-driven session takes; with any other (ssl,
# server_hostname, stream_read_limit...) the session runs on the loop.
_DRIVEN_OPTIONS = frozenset({"keepalive_interval", "keepalive_timeout", "engine"})


def _refuse_on_loop_thread() -> None:
    if threading.current_thread() is loop_thread.thread:
        raise RuntimeError("blocking fastnat calls cannot be made from the fastnat loop thread")


class BlockingSession:
    """A multiplexer session used from ordinary threads.

    Sessions made by :meth:`connect` and :meth:`from_socket` are driven by
    the threads that use them (:class:`fastnat._driven.DrivenSession`): a
    thread blocked on a stream reads the connection itself, and a thread
    that sends writes to it, with only timers on the background loop. One
    made from a :class:`fastnat.aio.MuxSession` (``BlockingSession(session)``,
    or with TLS) lives on the background loop and its streams cross threads.
    Both give the same :class:`StreamSocket`.
    """

    def __init__(self, session: MuxSession | DrivenSession) -> None:
        self._session = session

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        client: bool = True,
        config: MuxConfig | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> BlockingSession:
        """Dial ``host:port`` and start a session."""
        if not set(options) <= _DRIVEN_OPTIONS:

            async def go() -> MuxSession:
                return await MuxSession.connect(host, port, client=client, config=config, **options)

            return cls(run_in_loop(go(), timeout))
        _refuse_on_loop_thread()
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls._driven(sock, client, config, options)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, client: bool, config: MuxConfig | None = None, **options: Any
    ) -> BlockingSession:
        """Start a session on a connected socket (ownership passes to the session)."""
        if not set(options) <= _DRIVEN_OPTIONS:

            async def go() -> MuxSession:
                return await MuxSession.from_socket(sock, client=client, config=config, **options)

            return cls(run_in_loop(go()))
        _refuse_on_loop_thread()
        return cls._driven(sock, client, config, options)

    @classmethod
    def _driven(cls, sock: socket.socket, client: bool, config: MuxConfig | None, options: dict[str, Any]) -> BlockingSession:
        try:
            return cls(DrivenSession(sock, client=client, config=config, loop=loop_thread.get_loop(), **options))
        except BaseException:
            sock.close()
            raise

    @property
    def session(self) -> MuxSession | DrivenSession:
        """The session underneath: a DrivenSession, or the MuxSession it was made from."""
        return self._session

    @property
    def closed(self) -> bool:
        return self._session.closed

    def open_stream(self, timeout: float | None = None) -> StreamSocket:
        session = self._session
        if isinstance(session, DrivenSession):
            _refuse_on_loop_thread()
            return _driven_socket(session, session.open_stream())

        async def go() -> StreamSocket:
            return _make_socket(session.open_transport())

        return run_in_loop(go(), timeout)

    def accept_stream(self, timeout: float | None = None) -> StreamSocket:
        """Wait for the peer to open a stream; TimeoutError after ``timeout``."""
        session = self._session
        if isinstance(session, DrivenSession):
            _refuse_on_loop_thread()
            return _driven_socket(session, session.accept_stream(timeout))

        async def go() -> StreamSocket:
            return _make_socket(await session.accept_transport())

        return run_in_loop(go(), timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Ping the peer; the round-trip time in seconds (TimeoutError after
        ``timeout``, by default the session's keepalive timeout)."""
        session = self._session
        if isinstance(session, DrivenSession):
            _refuse_on_loop_thread()
            return session.ping(timeout)
        return run_in_loop(session.ping(timeout))

    def set_error_callback(self, callback: Callable[[Any, str, BaseException], Any] | None) -> None:
        """Call ``callback(session, where, exception)`` once if the session
        dies from an error (on the background loop thread for a driven one)."""
        self._session.set_error_callback(callback)

    def close(self, timeout: float | None = 10.0) -> None:
        """Send Go Away, close the connection and wait until it is closed."""
        session = self._session
        if isinstance(session, DrivenSession):
            session.close(timeout)
            return

        async def go() -> None:
            session.close()
            await session.wait_closed()

        if loop_thread.running:
            run_in_loop(go(), timeout)

    def __enter__(self) -> BlockingSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockingSession {self._session!r}>"


def _driven_socket(session: DrivenSession, stream: DrivenStream) -> StreamSocket:
    extra = {
        "peername": session.get_extra_info("peername"),
        "sockname": session.get_extra_info("sockname"),
        "stream_id": stream.stream_id,
    }
    return StreamSocket(stream, extra)
