"""BlockingSession: open, accept, ping, close, errors, and a peer process
that dies under a blocked reader."""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from fastnat.blocking import BlockingSession, StreamSocket, loop_thread, run_in_loop

from aio.support import LOOPBACK, MiB

pytestmark = pytest.mark.timeout(30)


def recv_all(sock: Any) -> bytes:
    parts = []
    while data := sock.recv(1 << 20):
        parts.append(data)
    return b"".join(parts)


def test_open_accept_ping_close(bpair: Any) -> None:
    a = bpair.client.open_stream()
    assert isinstance(a, StreamSocket)
    a.sendall(b"hi")
    b = bpair.server.accept_stream(timeout=5)
    assert b.recv(2) == b"hi"
    for session in (bpair.client, bpair.server):
        rtt = session.ping()
        assert isinstance(rtt, float) and 0 < rtt < 1
    a.close()
    b.close()
    bpair.client.close()
    assert bpair.client.closed
    bpair.client.close()  # harmless
    with pytest.raises(ConnectionError):
        bpair.client.open_stream()
    with pytest.raises(ConnectionError):
        bpair.client.ping()
    # the peer ends too, normally
    deadline = time.monotonic() + 5
    while not bpair.server.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ConnectionError):
        bpair.server.accept_stream(timeout=5)


def test_accept_timeout(bpair: Any) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        bpair.server.accept_stream(timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 1.5
    # a stream opened afterwards is still accepted (the timed-out wait left nothing behind)
    a = bpair.client.open_stream()
    a.sendall(b"x")
    b = bpair.server.accept_stream(timeout=5)
    assert b.recv(1) == b"x"
    a.close()
    b.close()


def test_context_manager_closes_the_session(aio_engine: str) -> None:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    try:
        with BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5) as session:
            conn, _ = listener.accept()
            with BlockingSession.from_socket(conn, client=False) as peer:
                s = session.open_stream()
                s.sendall(b"ok")
                assert peer.accept_stream(5).recv(2) == b"ok"
        assert session.closed and peer.closed
    finally:
        listener.close()


def test_many_streams_from_many_threads(bpair: Any) -> None:
    """64 threads each open a stream and echo 256 KiB through the peer's
    accept loop (itself a pool of threads)."""
    n = 64

    def serve_one() -> int:
        s = bpair.server.accept_stream(timeout=10)
        with s:
            total = 0
            while data := s.recv(65536):
                s.sendall(data)
                total += len(data)
            s.shutdown(socket.SHUT_WR)
            return total

    def client_one(i: int) -> bool:
        data = random.Random(i).randbytes(256 * 1024)
        with bpair.client.open_stream() as s:
            received = hashlib.sha256()

            def reader() -> None:
                while chunk := s.recv(65536):
                    received.update(chunk)

            t = threading.Thread(target=reader)
            t.start()
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            t.join(20)
            assert not t.is_alive()
            return received.hexdigest() == hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(n) as servers, ThreadPoolExecutor(16) as clients:
        served = [servers.submit(serve_one) for _ in range(n)]
        results = list(clients.map(client_one, range(n), timeout=25))
        assert all(results)
        assert [f.result(5) for f in served] == [256 * 1024] * n


def test_blocking_calls_from_the_loop_thread_are_refused(bpair: Any) -> None:
    async def inside() -> str:
        try:
            bpair.client.open_stream()
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "loop thread" in run_in_loop(inside(), 5)


def test_connect_refused(aio_engine: str) -> None:
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionRefusedError):
        BlockingSession.connect(LOOPBACK, port, timeout=5)


def test_sessions_share_the_one_loop_thread(bpair: Any) -> None:
    loop = loop_thread.get_loop()
    assert bpair.client.session._loop is loop and bpair.server.session._loop is loop
    names = [t.name for t in threading.enumerate() if t.name == "fastnat-loop"]
    assert names == ["fastnat-loop"]
    assert loop_thread.thread is not None and loop_thread.thread.daemon


def test_peer_process_killed_under_blocked_threads(aio_engine: str, peers: Any) -> None:
    """A reader thread blocked in recv() and a writer thread in sendall()
    both get ConnectionResetError promptly when the peer process is killed;
    the error callback is called once."""
    peer = peers("--listen")
    port = peer.wait_event("listening")["port"]
    session = BlockingSession.connect(LOOPBACK, port, timeout=5, keepalive_interval=1, keepalive_timeout=2)
    calls: list[Any] = []
    session.set_error_callback(lambda *a: calls.append(a))
    try:
        peer.wait_event("ready")
        quiet = session.open_stream()
        quiet.sendall(b"hold\n")
        busy = session.open_stream()
        busy.sendall(b"sink\n")
        outcomes: dict[str, BaseException | None] = {}
        started = threading.Event()

        def read_quiet() -> None:
            try:
                quiet.recv(10)
                outcomes["recv"] = None
            except BaseException as exc:
                outcomes["recv"] = exc

        def write_busy() -> None:
            try:
                chunk = bytes(1 << 20)
                started.set()
                while True:
                    busy.sendall(chunk)
            except BaseException as exc:
                outcomes["sendall"] = exc

        threads = [threading.Thread(target=read_quiet), threading.Thread(target=write_busy)]
        for t in threads:
            t.start()
        assert started.wait(5)
        time.sleep(0.2)
        killed = time.monotonic()
        peer.signal(signal.SIGKILL)
        for t in threads:
            t.join(2)
        assert not any(t.is_alive() for t in threads), "a blocked thread did not wake up"
        assert time.monotonic() - killed < 2
        assert isinstance(outcomes["recv"], ConnectionResetError), outcomes
        assert isinstance(outcomes["sendall"], ConnectionResetError), outcomes
        deadline = time.monotonic() + 2
        while not session.closed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(calls) == 1, calls
        with pytest.raises(ConnectionError):
            quiet.recv(1)
        quiet.close()
        busy.close()
    finally:
        session.close()


def test_blocking_session_with_a_peer_process(aio_engine: str, peers: Any) -> None:
    """Across processes: 16 MiB to the peer's sink, checked by its SHA-256."""
    peer = peers("--listen")
    port = peer.wait_event("listening")["port"]
    with BlockingSession.connect(LOOPBACK, port, timeout=5) as session:
        peer.wait_event("ready")
        with session.open_stream() as s:
            s.sendall(b"sink\n")
            h = hashlib.sha256()
            for i in range(16):
                chunk = random.Random(i).randbytes(MiB)
                s.sendall(chunk)
                h.update(chunk)
            s.shutdown(socket.SHUT_WR)
            f = s.makefile("rb")
            n, digest = f.readline().decode().split()
            f.close()
            assert int(n) == 16 * MiB and digest == h.hexdigest()


def test_close_wakes_a_thread_blocked_in_accept(bpair: Any) -> None:
    outcome: list[BaseException | None] = []

    def accept() -> None:
        try:
            bpair.server.accept_stream()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    time.sleep(0.1)
    bpair.server.close()
    t.join(3)
    assert not t.is_alive(), "accept_stream() still blocked after close()"
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionError), outcome
