"""The peer process dies (SIGKILL) or hangs (SIGSTOP) in the middle of
transfers on several streams: every reader and writer fails promptly, the
error callback is called exactly once, nothing hangs or leaks."""

from __future__ import annotations

import asyncio
import signal
import time
import zlib
from typing import Any

import pytest

from fastnat.aio import MuxSession, MuxStream

from .payload import DataSource
from .support import LOOPBACK, MiB, wait_until

pytestmark = pytest.mark.timeout(40)

KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_TIMEOUT = 2.0


class Transfers:
    """Several streams to the peer process, all moving data:

    * ``echo``: a writer and a reader on one stream, both endless;
    * ``sink``: a writer only (the peer reads and discards);
    * ``send``: a reader only (the peer sends ~forever);
    * ``exact``: a ``readexactly`` for more than will ever come.
    """

    def __init__(self, session: MuxSession) -> None:
        self.session = session
        self.streams: dict[str, MuxStream] = {}
        self.moved: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.failed_at: dict[str, float] = {}

    async def start(self) -> None:
        for name, action in (
            ("echo1", b"echo\n"),
            ("echo2", b"echo\n"),
            ("sink", b"sink\n"),
            ("send", b"send 100000000000 3\n"),
            ("exact", b"send 100000000000 4\n"),
        ):
            stream = await self.session.open_stream()
            stream.write(action)
            self.streams[name] = stream
            self.moved[name + ".w"] = self.moved[name + ".r"] = 0
        for name in ("echo1", "echo2", "sink"):
            self._spawn(name + ".w", self._write(name))
        for name in ("echo1", "echo2", "send"):
            self._spawn(name + ".r", self._read(name))
        self._spawn("exact.r", self._read_exactly("exact"))

    def _spawn(self, key: str, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            self.failed_at[key] = time.monotonic()

        task.add_done_callback(done)

    async def _write(self, name: str) -> None:
        stream = self.streams[name]
        for chunk in DataSource(zlib.crc32(name.encode()), 64 * 1024).chunks(1 << 40):
            stream.write(chunk)
            await stream.drain()
            self.moved[name + ".w"] += len(chunk)

    async def _read(self, name: str) -> None:
        stream = self.streams[name]
        while True:
            data = await stream.read(1 << 16)
            if not data:
                raise AssertionError(f"{name}: a clean EOF from a killed peer")
            self.moved[name + ".r"] += len(data)

    async def _read_exactly(self, name: str) -> None:
        stream = self.streams[name]
        while True:
            data = await stream.readexactly(1 << 16)
            self.moved[name + ".r"] += len(data)

    async def wait_moving(self) -> None:
        keys = [k for k in self.tasks]
        await wait_until(lambda: all(self.moved[k] > 256 * 1024 for k in keys), 15, f"data moving on {keys}")

    async def outcomes(self, timeout: float) -> dict[str, BaseException | None]:
        done, pending = await asyncio.wait(self.tasks.values(), timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert not pending, f"still running {timeout} s after the peer died: " + ", ".join(
            k for k, t in self.tasks.items() if t in pending
        )
        return {k: t.exception() for k, t in self.tasks.items()}


@pytest.mark.parametrize("peer_dials", [False, True], ids=["we-dial", "peer-dials"])
def test_peer_killed_mid_transfer(aio_engine: str, loop_kind: str, peers: Any, arun: Any, peer_dials: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        options = {"keepalive_interval": KEEPALIVE_INTERVAL, "keepalive_timeout": KEEPALIVE_TIMEOUT}
        listener = None
        if peer_dials:
            got: asyncio.Future[MuxSession] = loop.create_future()
            from fastnat.aio import start_session_server

            listener = await start_session_server(got.set_result, LOOPBACK, 0, **options)
            peer = peers("--dial", str(listener.sockets[0].getsockname()[1]))
            session = await asyncio.wait_for(got, 10)
        else:
            peer = peers("--listen")
            port = (await peer.event(lambda m: m.get("event") == "listening", 10, "listening"))["port"]
            session = await MuxSession.connect(LOOPBACK, port, **options)
        calls: list[tuple[Any, str, BaseException]] = []
        session.set_error_callback(lambda s, where, exc: calls.append((s, where, exc)))
        try:
            await peer.event(lambda m: m.get("event") == "ready", 10, "ready")
            transfers = Transfers(session)
            await transfers.start()
            await transfers.wait_moving()
            killed = time.monotonic()
            peer.signal(signal.SIGKILL)
            outcomes = await transfers.outcomes(KEEPALIVE_TIMEOUT)
            slowest = max(transfers.failed_at.values()) - killed
            for key, exc in outcomes.items():
                allowed: tuple[type[BaseException], ...] = (ConnectionResetError,)
                if key == "exact.r":
                    allowed += (asyncio.IncompleteReadError,)
                assert isinstance(exc, allowed), f"{key}: {exc!r}"
            assert slowest < KEEPALIVE_TIMEOUT, slowest
            await asyncio.wait_for(session.wait_closed(), 2)
            assert session.closed
            assert len(calls) == 1, calls
            assert calls[0][0] is session and isinstance(calls[0][2], ConnectionError), calls
            # everything after the death fails at once too
            with pytest.raises(ConnectionError):
                await session.open_stream()
            with pytest.raises(ConnectionError):
                await session.accept_stream()
            with pytest.raises(ConnectionError):
                await session.ping()
            for stream in transfers.streams.values():
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(stream.read(), 1)
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(stream.wait_closed(), 1)
                stream.close()
            await asyncio.sleep(0.1)
            assert len(calls) == 1, "the error callback must be called exactly once"
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)
            if listener is not None:
                listener.close()
                await listener.wait_closed()

    arun(main(), timeout=35)


def test_hung_peer_is_detected_by_keepalive(aio_engine: str, loop_kind: str, peers: Any, arun: Any) -> None:
    """SIGSTOP: the TCP connection stays up, the peer answers nothing. With a
    0.5 s interval and 0.5 s timeout the session dies within about a second:
    streams fail, the callback is called once (keepalive, TimeoutError)."""
    interval = timeout = 0.5
    peer = peers("--listen")
    port = peer.wait_event("listening")["port"]

    async def main() -> None:
        session = await MuxSession.connect(LOOPBACK, port, keepalive_interval=interval, keepalive_timeout=timeout)
        calls: list[tuple[Any, str, BaseException]] = []
        session.set_error_callback(lambda s, where, exc: calls.append((s, where, exc)))
        try:
            await peer.event(lambda m: m.get("event") == "ready", 10, "ready")
            transfers = Transfers(session)
            await transfers.start()
            await transfers.wait_moving()
            stopped = time.monotonic()
            peer.signal(signal.SIGSTOP)
            outcomes = await transfers.outcomes(interval + timeout + 2.0)
            slowest = max(transfers.failed_at.values()) - stopped
            fastest = min(transfers.failed_at.values()) - stopped
            for key, exc in outcomes.items():
                assert isinstance(exc, ConnectionResetError), f"{key}: {exc!r}"
            # not before an unanswered ping has had its timeout; well before forever
            assert timeout * 0.9 <= fastest and slowest <= interval + timeout + 1.0, (fastest, slowest)
            await asyncio.wait_for(session.wait_closed(), 2)
            assert len(calls) == 1, calls
            assert calls[0][1] == "keepalive" and isinstance(calls[0][2], TimeoutError), calls
        finally:
            peer.signal(signal.SIGCONT)
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)
        # woken up, the peer finds its connection reset and ends by itself
        end = await peer.event(lambda m: m.get("event") == "session-closed", 10, "the peer's session end")
        assert end["error"], end
        assert len(calls) == 1

    arun(main(), timeout=30)
