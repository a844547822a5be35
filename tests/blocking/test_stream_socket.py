"""StreamSocket: the socket-like stream of the blocking API, for both
engines, over loopback TCP (two BlockingSessions in this process, on the
background loop thread)."""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
import time
from typing import Any

import pytest

from aio.payload import DataSource, sha256
from aio.support import MiB

pytestmark = pytest.mark.timeout(30)


def recv_all(sock: Any, chunk: int = 1 << 20) -> bytes:
    parts = []
    while data := sock.recv(chunk):
        parts.append(data)
    return b"".join(parts)


class Thread(threading.Thread):
    """A thread whose exception or result is handed back by ``result()``."""

    def __init__(self, target: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self._target_fn, self._args = target, args
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self._target_fn(*self._args)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self._target_fn.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def test_send_recv_and_eof_both_ways(bpair: Any) -> None:
    a, b = bpair.streams()
    request = DataSource(1).data(4 * MiB + 1)
    reply = DataSource(2).data(3 * MiB + 9)

    def send_request() -> None:
        a.sendall(request)
        a.shutdown(socket.SHUT_WR)

    sender = Thread(send_request)
    sender.start()
    assert sha256(recv_all(b)) == sha256(request)
    sender.result(5)
    assert b.recv(10) == b""  # EOF again, not an error
    assert b.recv(10) == b""

    def send_reply() -> None:
        assert b.send(reply[:100]) == 100
        b.sendall(reply[100:])
        b.close()

    sender = Thread(send_reply)
    sender.start()
    assert sha256(recv_all(a)) == sha256(reply)
    sender.result(5)
    assert a.recv(1) == b""
    a.close()


def test_recv_into(bpair: Any) -> None:
    a, b = bpair.streams()
    a.sendall(b"0123456789")
    buf = bytearray(4)
    assert b.recv_into(buf) == 4 and buf == b"0123"
    big = bytearray(100)
    assert b.recv_into(memoryview(big)[10:], 3) == 3 and big[10:13] == b"456"
    n = b.recv_into(big)
    assert big[:n] == b"789"[:n] and n >= 1
    with pytest.raises(ValueError):
        b.recv_into(big, -1)
    with pytest.raises(ValueError):
        b.recv(-1)
    a.close()
    b.close()


def test_reads_of_every_size_across_piece_boundaries(bpair: Any) -> None:
    """Received data is held in pieces of PIECE_SIZE: reads that start and
    end anywhere within and across them, recv and recv_into mixed, give
    back every byte in order."""
    from fastnat.blocking import PIECE_SIZE

    a, b = bpair.streams()
    data = DataSource(3).data(5 * PIECE_SIZE + 12345)
    sender = Thread(lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
    sender.start()
    # Let a window's worth (several pieces) arrive before the first read.
    deadline = time.monotonic() + 5
    while b._bridge.rsize < 3 * PIECE_SIZE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b._bridge.rsize >= 3 * PIECE_SIZE
    sizes = [1, PIECE_SIZE - 1, 2, PIECE_SIZE, PIECE_SIZE + 7, 3 * PIECE_SIZE, 17]
    parts: list[bytes] = []
    buf = bytearray(3 * PIECE_SIZE + 100)
    for i in range(10_000):
        size = sizes[i % len(sizes)]
        if i % 2:
            n = b.recv_into(buf, size)
            chunk = bytes(buf[:n])
        else:
            chunk = b.recv(size)
        assert len(chunk) <= size
        if not chunk:
            break
        parts.append(chunk)
    sender.result(5)
    assert sha256(b"".join(parts)) == sha256(data)
    a.close()
    b.close()


def test_recv_zero_returns_at_once(bpair: Any) -> None:
    """socket.recv(0) returns b"" without waiting for data."""
    a, b = bpair.streams()
    b.settimeout(1)  # TimeoutError instead of a hang if recv(0) waits for data
    started = time.monotonic()
    assert b.recv(0) == b""
    assert time.monotonic() - started < 0.5
    a.close()
    b.close()


def test_timeouts(bpair: Any) -> None:
    a, b = bpair.streams()
    assert b.gettimeout() is None and b.getblocking()
    b.settimeout(0.2)
    assert b.gettimeout() == 0.2
    for call in (lambda: b.recv(10), lambda: b.recv_into(bytearray(10))):
        started = time.monotonic()
        with pytest.raises(socket.timeout) as info:
            call()
        assert isinstance(info.value, TimeoutError)
        assert 0.15 <= time.monotonic() - started < 1.5
    # still usable after a timeout
    a.sendall(b"late")
    assert b.recv(10) == b"late"
    with pytest.raises(ValueError):
        b.settimeout(-1)
    b.settimeout(None)
    assert b.gettimeout() is None
    a.close()
    b.close()


def test_sendall_times_out_when_the_peer_does_not_read(bpair: Any) -> None:
    a, b = bpair.streams()
    a.settimeout(0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        a.sendall(bytes(32 * MiB))
    assert time.monotonic() - started < 5
    a.close()
    b.close()


def test_non_blocking_mode(bpair: Any) -> None:
    a, b = bpair.streams()
    b.setblocking(False)
    assert b.gettimeout() == 0.0 and not b.getblocking()
    with pytest.raises(BlockingIOError):
        b.recv(10)
    with pytest.raises(BlockingIOError):
        b.recv_into(bytearray(10))
    a.sendall(b"now")
    deadline = time.monotonic() + 5
    while True:
        try:
            assert b.recv(10) == b"now"
            break
        except BlockingIOError:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    # a non-blocking sender whose peer does not read: send() takes what fits,
    # then raises BlockingIOError instead of waiting
    a.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sent += a.send(bytes(256 * 1024))
    assert sent > 0
    a.setblocking(True)
    assert a.gettimeout() is None
    a.close()
    b.close()


def test_one_reader_thread_and_one_writer_thread_64_mib_each_way(bpair: Any) -> None:
    """Full duplex on one StreamSocket: a writer thread sends 64 MiB while a
    reader thread receives the echo; the peer echoes from its own thread."""
    total = 64 * MiB
    a, b = bpair.streams()

    def echo() -> int:
        n = 0
        buf = bytearray(1 << 20)
        while k := b.recv_into(buf):
            b.sendall(memoryview(buf)[:k])
            n += k
        b.shutdown(socket.SHUT_WR)
        return n

    def write() -> str:
        h = hashlib.sha256()
        for chunk in DataSource(3).chunks(total):
            a.sendall(chunk)
            h.update(chunk)
        a.shutdown(socket.SHUT_WR)
        return h.hexdigest()

    def read() -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        while k := a.recv_into(buf):
            h.update(view[:k])
            n += k
        return n, h.hexdigest()

    threads = [Thread(echo), Thread(write), Thread(read)]
    for t in threads:
        t.start()
    echoed = threads[0].result(25)
    sent = threads[1].result(5)
    n, received = threads[2].result(5)
    assert echoed == total and n == total
    assert received == sent == DataSource(3).sha256(total)
    a.close()
    b.close()


def test_makefile(bpair: Any) -> None:
    a, b = bpair.streams()
    fa = a.makefile("rwb")
    fb_in = b.makefile("r", encoding="utf-8", newline="")
    fb_out = b.makefile("w", encoding="utf-8")
    fa.write(b"hello\nw\xc3\xb6rld\n")
    fa.flush()
    assert fb_in.readline() == "hello\n"
    assert fb_in.readline() == "w\u00f6rld\n"
    fb_out.write("line one\nline two\n")
    fb_out.flush()
    assert fa.readline() == b"line one\n"
    assert fa.read(9) == b"line two\n"
    fb_out.close()
    fb_in.close()
    b.close()
    assert fa.read() == b""
    fa.close()
    a.close()
    with pytest.raises(ValueError):
        a.makefile("rx")


def test_makefile_unbuffered(bpair: Any) -> None:
    a, b = bpair.streams()
    raw = b.makefile("rwb", buffering=0)
    a.sendall(b"abc")
    assert raw.read(3) == b"abc"
    raw.write(b"xyz")
    assert a.recv(3) == b"xyz"
    with pytest.raises(ValueError):
        b.makefile("r", buffering=0)
    raw.close()
    a.close()
    b.close()


def test_makefile_outlives_close_of_the_socket(bpair: Any) -> None:
    """As with socket.makefile: close() while files are open keeps the stream
    open until the last file closes (http.client relies on it: the connection
    closes its socket while the response body is still read from its file)."""
    a, b = bpair.streams()
    fa = a.makefile("rwb")
    fb_in = b.makefile("rb")
    fb_out = b.makefile("wb")
    b.close()
    fb_out.write(b"after close()\n")
    fb_out.flush()
    assert fa.readline() == b"after close()\n"
    fa.write(b"to the closed socket's file\n")
    fa.flush()
    assert fb_in.readline() == b"to the closed socket's file\n"
    fb_out.close()
    fb_in.close()  # the last file: the stream closes now
    assert fa.read() == b""
    fa.close()
    a.close()


def test_shutdown_write(bpair: Any) -> None:
    a, b = bpair.streams()
    a.sendall(b"last words")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        a.sendall(b"more")
    assert recv_all(b) == b"last words"
    b.sendall(b"still heard")
    b.close()
    assert recv_all(a) == b"still heard"
    with pytest.raises(ValueError):
        a.shutdown(99)
    a.close()


def test_shutdown_read(bpair: Any) -> None:
    """After SHUT_RD recv() returns b"" at once (like a TCP socket on Linux,
    even when data arrives); the write side still works."""
    a, b = bpair.streams()
    b.shutdown(socket.SHUT_RD)
    assert b.recv(10) == b""
    a.sendall(b"ignored" * 1000)
    time.sleep(0.05)
    assert b.recv(10) == b""
    b.sendall(b"the write side still works")
    b.shutdown(socket.SHUT_WR)
    assert recv_all(a) == b"the write side still works"
    a.close()
    b.close()


def test_shutdown_both(bpair: Any) -> None:
    a, b = bpair.streams()
    a.shutdown(socket.SHUT_RDWR)
    assert a.recv(5) == b""
    with pytest.raises(BrokenPipeError):
        a.send(b"x")
    assert b.recv(5) == b""  # the peer saw our FIN
    a.close()
    b.close()


def test_close_twice_and_use_after_close(bpair: Any) -> None:
    a, b = bpair.streams()
    a.close()
    a.close()  # harmless
    for call in (lambda: a.recv(1), lambda: a.send(b"x"), lambda: a.sendall(b"x"), a.getpeername,
                 lambda: a.shutdown(socket.SHUT_WR), lambda: a.recv_into(bytearray(1))):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert a.fileno() == -1
    assert b.recv(1) == b""  # the peer saw the close as EOF
    b.close()


def test_context_manager(bpair: Any) -> None:
    a, b = bpair.streams()
    with a as s:
        assert s is a
        s.sendall(b"in the with block")
    assert recv_all(b) == b"in the with block"
    with pytest.raises(OSError):
        a.recv(1)
    b.close()


def test_addresses(bpair: Any) -> None:
    a, b = bpair.streams()
    client_addr = bpair.client.session.get_extra_info("sockname")
    assert a.getpeername() == bpair.server_addr
    assert a.getsockname() == client_addr
    assert b.getpeername() == client_addr
    assert b.getsockname() == bpair.server_addr
    assert a.family == socket.AF_INET and a.type == socket.SOCK_STREAM
    assert a.stream_id == b.stream_id and a.stream_id % 2 == 1
    a.close()
    b.close()


def test_a_reset_stream_raises_connection_reset(bpair: Any) -> None:
    a, b = bpair.streams()
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    blocked = Thread(b.recv, 10)
    blocked.start()
    time.sleep(0.05)
    # the peer session dies: every stream of it is gone
    bpair.client.close()
    with pytest.raises(ConnectionError):
        blocked.result(5)
    with pytest.raises(ConnectionError):
        b.sendall(b"anyone?")
        b.sendall(bytes(4 * MiB))
    a.close()
    b.close()
