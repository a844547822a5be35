"""Sessions driven by the application's threads (fastnat._driven), both
engines: who reads the connection when, with no event loop carrying data."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from aio.payload import DataSource, sha256
from aio.support import LOOPBACK, MiB

from fastnat._driven import DrivenSession
from fastnat.aio.session import MuxSession
from fastnat.blocking import BlockingSession, run_in_loop

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", autouse=True)
def _loop_connection_made_once() -> None:
    """One connection on the background loop before any leak baseline:
    uvloop opens a descriptor per loop on its first connection (its reserve
    for EMFILE), which is not a leak. Driven sessions make none, so the
    loop-backed test below would be the first."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    with BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5, stream_read_limit=65536):
        conn, _ = listener.accept()
        conn.close()
    listener.close()


def recv_exactly(sock: Any, n: int) -> bytes:
    parts = []
    while n:
        data = sock.recv(n)
        assert data, "EOF too early"
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def joined(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread is still blocked"


def test_sessions_from_connect_and_from_socket_are_thread_driven(bpair: Any) -> None:
    assert isinstance(bpair.client.session, DrivenSession)
    assert isinstance(bpair.server.session, DrivenSession)


def test_a_sender_blocked_on_an_empty_window_is_woken_by_another_threads_reads(bpair: Any) -> None:
    """Thread R holds the read role, blocked in recv() on stream B; thread W
    exhausts stream A's window and waits: the window updates R reads must
    wake W (no deadlock), and R still gets B's data at the end."""
    a, a_peer = bpair.streams()
    b, b_peer = bpair.streams()
    data = DataSource(7).data(8 * MiB)  # many windows' worth
    got: dict[str, Any] = {}

    def read_b() -> None:
        got["b"] = b.recv(100)

    def write_a() -> None:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        got["a sent"] = True

    reader = threading.Thread(target=read_b)
    reader.start()
    time.sleep(0.1)  # R is now the one reading the connection
    writer = threading.Thread(target=write_a)
    writer.start()
    received = bytearray()
    while chunk := a_peer.recv(1 << 20):
        received += chunk
    joined([writer], 10)
    assert got.get("a sent") and sha256(received) == sha256(data)
    assert reader.is_alive(), "recv() on B returned without data"
    b_peer.sendall(b"done")
    joined([reader], 5)
    assert got["b"] == b"done"
    for s in (a, a_peer, b, b_peer):
        s.close()


def test_many_threads_reading_many_streams_at_once(bpair: Any) -> None:
    """16 streams, each read by its own thread with recv_into while the peer
    writes all of them from 16 threads: every byte arrives on its stream."""
    pairs = [bpair.streams() for _ in range(16)]
    size = 2 * MiB
    digests: dict[int, str] = {}

    def send(i: int) -> None:
        peer = pairs[i][1]
        peer.sendall(DataSource(i).data(size))
        peer.shutdown(socket.SHUT_WR)

    def receive(i: int) -> None:
        buf = bytearray(100_000)  # not a multiple of any frame size
        out = bytearray()
        while n := pairs[i][0].recv_into(buf):
            out += buf[:n]
        digests[i] = sha256(out)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(16) for f in (send, receive)]
    for t in threads:
        t.start()
    joined(threads, 20)
    assert digests == {i: DataSource(i).sha256(size) for i in range(16)}
    for a, b in pairs:
        a.close()
        b.close()


def test_peer_death_wakes_a_thread_blocked_in_recv_and_one_blocked_in_accept(bpair: Any) -> None:
    """The peer's connection is cut (no Go Away): a recv() and an
    accept_stream() waiting in other threads get ConnectionResetError."""
    a, b = bpair.streams()
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str, fn: Any) -> None:
        try:
            fn()
            outcomes[name] = None
        except OSError as exc:  # what is expected; anything else fails the thread and the test
            outcomes[name] = exc

    threads = [
        threading.Thread(target=call, args=("recv", lambda: a.recv(10))),
        threading.Thread(target=call, args=("accept", lambda: bpair.client.accept_stream())),
    ]
    for t in threads:
        t.start()
    time.sleep(0.1)
    peer_sock = bpair.server.session.get_extra_info("socket")
    peer_sock.shutdown(socket.SHUT_RDWR)  # the connection ends under the peer session
    joined(threads, 3)
    assert isinstance(outcomes["recv"], ConnectionResetError), outcomes
    assert isinstance(outcomes["accept"], ConnectionResetError), outcomes
    deadline = time.monotonic() + 3
    while not bpair.client.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    a.close()
    b.close()


def test_keepalive_timeout_closes_an_idle_session(aio_engine: str) -> None:
    """No application I/O at all, and a peer that accepts the connection but
    never reads or answers: the keepalive fails the session by itself (error
    callback once, with TimeoutError; streams get ConnectionResetError)."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    try:
        session = BlockingSession.connect(
            LOOPBACK, listener.getsockname()[1], timeout=5, keepalive_interval=0.2, keepalive_timeout=0.3
        )
        silent, _ = listener.accept()
        with silent:
            calls: list[tuple[str, BaseException]] = []
            session.set_error_callback(lambda _s, where, exc: calls.append((where, exc)))
            stream = session.open_stream()
            started = time.monotonic()
            while not session.closed:
                assert time.monotonic() - started < 3, "the keepalive did not close the session"
                time.sleep(0.02)
            deadline = time.monotonic() + 2
            while not calls:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert len(calls) == 1 and calls[0][0] == "keepalive", calls
            assert isinstance(calls[0][1], TimeoutError), calls
            with pytest.raises(ConnectionResetError):
                stream.recv(1)
            stream.close()
            session.close()
    finally:
        listener.close()


def test_idle_sessions_answer_keepalives_without_application_threads(aio_engine: str) -> None:
    """Both sides ping every 0.1 s and give up after 0.3 s; no thread reads
    for 1.5 s, yet both stay open: the loop answers pings on idle sessions."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    options = {"keepalive_interval": 0.1, "keepalive_timeout": 0.3}
    try:
        with BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5, **options) as client:
            conn, _ = listener.accept()
            with BlockingSession.from_socket(conn, client=False, **options) as server:
                time.sleep(1.5)
                assert not client.closed and not server.closed
                s = client.open_stream()
                s.sendall(b"still here")
                t = server.accept_stream(5)
                assert recv_exactly(t, 10) == b"still here"
                s.close()
                t.close()
    finally:
        listener.close()


def test_a_loop_backed_session_and_a_driven_one_talk(aio_engine: str) -> None:
    """BlockingSession(MuxSession) keeps the loop-backed streams; the same
    StreamSocket API on both ends, 4 MiB each way."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    try:
        with BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5) as driven:
            conn, _ = listener.accept()

            async def start() -> MuxSession:
                return await MuxSession.from_socket(conn, client=False)

            with BlockingSession(run_in_loop(start(), 5)) as looped:
                assert isinstance(looped.session, MuxSession)
                s = driven.open_stream()
                t = looped.accept_stream(5)
                up, down = DataSource(1).data(4 * MiB), DataSource(2).data(4 * MiB)
                sender = threading.Thread(target=lambda: (s.sendall(up), s.shutdown(socket.SHUT_WR)))
                sender.start()
                assert sha256(recv_exactly(t, len(up))) == sha256(up)
                assert t.recv(1) == b""
                replier = threading.Thread(target=lambda: (t.sendall(down), t.close()))
                replier.start()
                assert sha256(recv_exactly(s, len(down))) == sha256(down)
                assert s.recv(1) == b""
                joined([sender, replier], 5)
                s.close()
    finally:
        listener.close()


def test_sendall_times_out_when_the_connection_is_full(aio_engine: str) -> None:
    """The peer never reads its socket and the kernel's buffers are smaller
    than a window: sendall() waits for the socket, not for credit, and
    still raises TimeoutError after the stream's timeout."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted socket
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        sock.connect(listener.getsockname())
        silent, _ = listener.accept()
        with silent, BlockingSession.from_socket(sock, client=True) as session:
            stream = session.open_stream()
            stream.settimeout(0.3)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                stream.sendall(bytes(200 * 1024))  # within the first window (256 KiB)
            assert time.monotonic() - started < 3
            stream.close()
    finally:
        listener.close()
