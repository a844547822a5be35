"""Nothing is left behind after close: tasks, threads, sockets.

(Every test of this directory is also checked for threads and file
descriptors by an autouse fixture, and ``arun`` fails a test that leaves a
task pending; these tests make the check explicit for the busiest shapes.)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fastnat.aio import MuxSession, start_session_server

from .support import LOOPBACK, open_fds, other_tasks, read_all

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("who_closes", ["client", "server", "both"])
def test_no_tasks_threads_or_sockets_left_after_close(
    aio_engine: str, loop_kind: str, arun: Any, who_closes: str
) -> None:
    threads_before = set(threading.enumerate())
    fds_before = open_fds()

    async def main() -> None:
        tasks_before = other_tasks()
        sessions: list[MuxSession] = []
        handled: list[int] = []
        abandoned: list[Any] = []

        async def on_session(session: MuxSession) -> None:
            # a coroutine: start_session_server runs it as a task
            sessions.append(session)
            async for stream in session:
                handled.append(stream.stream_id)
                if stream.stream_id % 3 == 0:
                    # accepted and never used or closed by the application (kept
                    # referenced: asyncio's StreamWriter.__del__ would close it)
                    abandoned.append(stream)
                    continue
                asyncio.get_running_loop().create_task(_echo_once(stream))

        async def _echo_once(stream: Any) -> None:
            try:
                data = await stream.readexactly(4)
                stream.write(data)
                await stream.drain()
                await stream.read()  # still reading when the session closes
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        listener = await start_session_server(on_session, LOOPBACK, 0)
        port = listener.sockets[0].getsockname()[1]
        client = await MuxSession.connect(LOOPBACK, port, keepalive_interval=0.05)
        streams = [await client.open_stream() for _ in range(60)]
        for s in streams:
            s.write(b"ping")
        for s in streams:
            if s.stream_id % 3 != 0:
                assert await asyncio.wait_for(s.readexactly(4), 5) == b"ping"
        # some streams are left with a reader waiting, some half-closed, some untouched
        waiting = [asyncio.create_task(s.read()) for s in streams[:10]]
        for s in streams[10:20]:
            s.write_eof()
        server = sessions[0]
        if who_closes in ("client", "both"):
            client.close()
        if who_closes in ("server", "both"):
            server.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(server.wait_closed(), 5)
        for t in waiting:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(t, 5)
        listener.close()
        await listener.wait_closed()
        for _ in range(20):
            await asyncio.sleep(0.01)
        left = other_tasks() - tasks_before
        assert not left, f"tasks left after close: {left}"
        assert len(handled) == 60

    arun(main(), timeout=20)
    assert set(threading.enumerate()) == threads_before
    assert open_fds() == fds_before


def test_no_leak_when_a_session_dies_from_an_error(aio_engine: str, arun: Any) -> None:
    """The peer vanishes (its socket is closed without Go Away); our side
    cleans up by itself: no close() is called on it."""
    fds_before = open_fds()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[Any] = loop.create_future()
        raw = await asyncio.start_server(lambda r, w: accepted.set_result(w), LOOPBACK, 0)
        session = await MuxSession.connect(LOOPBACK, raw.sockets[0].getsockname()[1])
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        stream = await session.open_stream()
        reading = asyncio.create_task(read_all(stream))
        writer = await asyncio.wait_for(accepted, 5)
        writer.transport.abort()  # RST
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reading, 5)
        await asyncio.wait_for(session.wait_closed(), 5)
        assert len(calls) == 1 and calls[0][1] == "connection", calls
        raw.close()
        await raw.wait_closed()

    arun(main(), timeout=10)
    assert open_fds() == fds_before
