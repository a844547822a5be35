"""Fixtures of the blocking API tests.

* ``aio_engine``: both engines, as in ``tests/aio`` (the sessions made on the
  background loop call ``fastnat.mux.Session`` when they are made).
* ``bpair``: two BlockingSessions joined by loopback TCP, closed at the end.
* an autouse check: after each test no task is left on the background loop,
  no thread but that loop's is left running, no file descriptor is left open.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

import fastnat.mux
from fastnat import _mux_py
from fastnat.blocking import BlockingSession, loop_thread, run_in_loop

from aio.support import LOOPBACK, LeakCheck, PeerProcess


@pytest.fixture(scope="session", autouse=True)
def _background_loop() -> None:
    """Start the process's loop thread before any baseline is taken, and
    make one connection on it: uvloop (libuv) opens a file descriptor per
    loop on first use (its reserve for EMFILE), which is not a leak."""
    loop_thread.get_loop()
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    session = BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5)
    conn, _ = listener.accept()
    peer = BlockingSession.from_socket(conn, client=False)
    session.close()
    peer.close()
    listener.close()


async def _tasks_left() -> list[str]:
    import asyncio

    current = asyncio.current_task()
    return [repr(t) for t in asyncio.all_tasks() if t is not current and not t.done()]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    check = LeakCheck()
    yield
    deadline = time.monotonic() + 3
    while (left := run_in_loop(_tasks_left(), 5)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"tasks left on the fastnat loop: {left}"
    check.check()


@pytest.fixture
def aio_engine(engine: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "python" if engine is _mux_py else "compiled"
    monkeypatch.setattr(fastnat.mux, "Session", engine.Session)
    return name


class BPair:
    def __init__(self, client: BlockingSession, server: BlockingSession, server_addr: Any) -> None:
        self.client = client
        self.server = server
        self.server_addr = server_addr

    def streams(self, timeout: float = 5.0) -> tuple[Any, Any]:
        """A stream opened by the client and its accepted end on the server."""
        a = self.client.open_stream(timeout)
        b = self.server.accept_stream(timeout)
        return a, b


@pytest.fixture
def bpair(aio_engine: str) -> Iterator[BPair]:
    listener = socket.socket()
    sessions: list[BlockingSession] = []
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listener.settimeout(5)
        client = BlockingSession.connect(LOOPBACK, listener.getsockname()[1], timeout=5)
        sessions.append(client)
        conn, _ = listener.accept()
        conn.settimeout(None)
        server = BlockingSession.from_socket(conn, client=False)
        sessions.append(server)
        assert type(client.session.engine).__module__.endswith("_mux_py" if aio_engine == "python" else "_mux")
        yield BPair(client, server, listener.getsockname())
    finally:
        listener.close()
        for s in sessions:
            s.close()


@pytest.fixture
def peers(aio_engine: str) -> Iterator[Callable[..., PeerProcess]]:
    started: list[PeerProcess] = []

    def start(*args: str) -> PeerProcess:
        peer = PeerProcess(list(args), aio_engine)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()
