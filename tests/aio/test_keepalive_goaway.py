"""Keepalive, ping and Go Away, observed on the wire (a frame-logging TCP
proxy, or a raw TCP peer that speaks bare yamux frames)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fastnat.aio import MuxSession
from fastnat.errors import ProtocolError

from .payload import DataSource
from .support import (
    FLAG_ACK,
    FLAG_SYN,
    HEADER,
    LOOPBACK,
    TYPE_GO_AWAY,
    TYPE_PING,
    FrameLog,
    FrameProxy,
    MiB,
    Service,
    echo_handler,
    expect_failure,
    read_all,
    session_pair,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


class RawPeer:
    """A TCP server on 127.0.0.1 that logs the yamux frames it receives and
    answers nothing (unless told to send raw bytes)."""

    def __init__(self) -> None:
        self.log = FrameLog()
        self.server: asyncio.Server | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.eof = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.task = asyncio.current_task()  # type: ignore[assignment]
        self.connected.set()
        try:
            while data := await reader.read(65536):
                self.log.feed(data)
        except ConnectionError:
            pass
        finally:
            self.eof.set()
            writer.close()

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.wait_for(self.eof.wait(), 5) if self.writer is not None else None


# ------------------------------------------------------------ keepalive


def test_keepalive_pings_go_out_and_are_answered(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[MuxSession] = loop.create_future()
        from fastnat.aio import start_session_server

        listener = await start_session_server(got.set_result, LOOPBACK, 0, keepalive_interval=None)
        proxy = FrameProxy(listener.sockets[0].getsockname()[1])
        port = await proxy.start()
        connected = time.monotonic()
        client = await MuxSession.connect(LOOPBACK, port, keepalive_interval=0.1, keepalive_timeout=2)
        server = await asyncio.wait_for(got, 5)
        errors: list[Any] = []
        client.set_error_callback(lambda *a: errors.append(a))
        server.set_error_callback(lambda *a: errors.append(a))
        try:
            await asyncio.sleep(1.05)
            pings = proxy.up.pings(FLAG_SYN)
            answers = proxy.down.pings(FLAG_ACK)
            assert 5 <= len(pings) <= 12, pings
            # each ping answered with its own opaque value
            assert {v for _, v in pings} - {v for _, v in answers} <= {pings[-1][1]}
            # one interval apart (not a burst): the keepalive waits for the answer, then the interval
            gaps = [b[0] - a[0] for a, b in zip(pings[1:], pings[2:])]  # (the first may be an RTT probe)
            assert min(gaps) >= 0.08, gaps
            # the side with keepalive disabled sends none (at most one ping
            # right at the start, measuring the round trip for window tuning)
            server_pings = proxy.down.pings(FLAG_SYN)
            assert len(server_pings) <= 1, server_pings
            assert all(t - connected < 0.1 for t, _ in server_pings), server_pings
            assert errors == []
        finally:
            client.close()
            server.close()
            await asyncio.wait_for(client.wait_closed(), 5)
            await asyncio.wait_for(server.wait_closed(), 5)
            await proxy.aclose()
            listener.close()
            await listener.wait_closed()

    arun(main(), timeout=15)


def test_keepalive_timeout_closes_a_silent_peer(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """A peer that reads everything and answers nothing: after the interval a
    ping goes out, after the timeout the session is declared dead: the error
    callback is called once (where="keepalive"), every stream fails, the TCP
    connection is closed."""
    interval, timeout = 0.3, 0.3

    async def main() -> None:
        raw = RawPeer()
        port = await raw.start()
        calls: list[tuple[Any, str, BaseException]] = []
        session = await MuxSession.connect(LOOPBACK, port, keepalive_interval=interval, keepalive_timeout=timeout)
        session.set_error_callback(lambda s, where, exc: calls.append((s, where, exc)))
        started = time.monotonic()
        try:
            streams = [await session.open_stream() for _ in range(3)]
            reads = [asyncio.create_task(s.read()) for s in streams]
            for t in reads:
                await expect_failure(t, interval + timeout + 2.0, ConnectionResetError)
            elapsed = time.monotonic() - started
            assert interval + timeout - 0.05 <= elapsed <= interval + timeout + 1.5, elapsed
            await asyncio.wait_for(session.wait_closed(), 2)
            assert len(calls) == 1, calls
            s, where, exc = calls[0]
            assert s is session and where == "keepalive" and isinstance(exc, TimeoutError), calls
            # one unanswered keepalive ping, then the end (besides, maybe, an
            # RTT probe right at the start)
            pings = [p for p in raw.log.pings(FLAG_SYN) if p[0] - started > interval / 2]
            assert len(pings) == 1, raw.log.pings(FLAG_SYN)
            await asyncio.wait_for(raw.eof.wait(), 2)  # the connection was closed
            for s_ in streams:
                with pytest.raises(ConnectionError):
                    s_.write(b"x")
                    await s_.drain()
            with pytest.raises(ConnectionError):
                await session.open_stream()
            await asyncio.sleep(interval + timeout)
            assert len(calls) == 1, "the error callback must be called once"
        finally:
            session.close()
            await raw.aclose()

    arun(main(), timeout=15)


def test_keepalive_does_not_kill_a_busy_session(aio_engine: str, arun: Any) -> None:
    """Pings every 50 ms with a 1 s deadline while 100 MiB flow: the answers
    are not held up behind the data for long enough to kill the session."""

    async def main() -> None:
        opts = {"keepalive_interval": 0.05, "keepalive_timeout": 1.0}
        async with session_pair(client_options=opts, server_options=opts) as pair:
            service = Service(pair.server, echo_handler)
            stream = await pair.client.open_stream()
            total = 100 * MiB

            async def send() -> None:
                for chunk in DataSource(7).chunks(total):
                    stream.write(chunk)
                    await stream.drain()
                stream.write_eof()

            received = 0

            async def receive() -> None:
                nonlocal received
                while data := await stream.read(1 << 20):
                    received += len(data)

            await asyncio.gather(send(), receive())
            assert received == total
            assert pair.errors == []
            stream.close()
            await pair.aclose()
            await service.aclose()

    arun(main(), timeout=25)


def test_ping_timeout_and_ping_after_close(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        raw = RawPeer()
        port = await raw.start()
        session = await MuxSession.connect(LOOPBACK, port, keepalive_interval=None)
        try:
            await asyncio.wait_for(raw.connected.wait(), 5)
            await asyncio.sleep(0.1)
            before = len(raw.log.pings(FLAG_SYN))
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await session.ping(timeout=0.2)
            assert 0.15 <= time.monotonic() - started < 1.5
            assert len(raw.log.pings(FLAG_SYN)) == before + 1
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)
        with pytest.raises(ConnectionError):
            await session.ping()
        await raw.aclose()

    arun(main(), timeout=10)


def test_keepalive_arguments_are_checked(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        for bad in ({"keepalive_interval": 0}, {"keepalive_interval": -1}, {"keepalive_timeout": 0}):
            with pytest.raises(ValueError):
                MuxSession(client=True, **bad)

    arun(main(), timeout=5)


# ------------------------------------------------------------ Go Away


def test_close_sends_go_away_and_the_peer_ends_cleanly(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """close() on one side: a Go Away (code 0) goes out on the wire before the
    connection closes; the other side ends without calling its error callback,
    its open fails, its streams fail with ConnectionError. Both directions."""

    async def main() -> None:
        for closer in ("client", "server"):
            loop = asyncio.get_running_loop()
            got: asyncio.Future[MuxSession] = loop.create_future()
            from fastnat.aio import start_session_server

            listener = await start_session_server(got.set_result, LOOPBACK, 0)
            proxy = FrameProxy(listener.sockets[0].getsockname()[1])
            port = await proxy.start()
            client = await MuxSession.connect(LOOPBACK, port)
            server = await asyncio.wait_for(got, 5)
            calls: list[Any] = []
            client.set_error_callback(lambda *a: calls.append(a))
            server.set_error_callback(lambda *a: calls.append(a))
            a, b = (client, server) if closer == "client" else (server, client)
            log = proxy.up if closer == "client" else proxy.down
            stream = await b.open_stream()
            stream.write(b"hello")
            peer_stream = await asyncio.wait_for(a.accept_stream(), 5)
            assert await peer_stream.readexactly(5) == b"hello"
            pending = asyncio.create_task(stream.read())
            a.close()
            await asyncio.wait_for(a.wait_closed(), 5)
            await asyncio.wait_for(b.wait_closed(), 5)
            await wait_until(lambda: log.go_aways() == [0], 5, "the Go Away on the wire")
            await expect_failure(pending, 5, ConnectionError)
            with pytest.raises(ConnectionError):
                await b.open_stream()
            assert calls == [], f"a normal close is not an error: {calls}"
            await proxy.aclose()
            listener.close()
            await listener.wait_closed()

    arun(main(), timeout=15)


def test_go_away_from_the_peer_refuses_new_streams_existing_ones_finish(
    aio_engine: str, peers: Any, arun: Any
) -> None:
    """The peer process sends Go Away and keeps the connection: our
    open_stream() fails, the stream opened before carries on to the end."""
    peer = peers("--listen")
    port = peer.wait_event("listening")["port"]
    first, second = DataSource(8).data(3 * MiB), DataSource(9).data(2 * MiB)

    async def main() -> None:
        session = await MuxSession.connect(LOOPBACK, port)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            await peer.event(lambda m: m.get("event") == "ready", 10, "ready")
            stream = await session.open_stream()
            stream.write(b"echo\n")
            reading = asyncio.create_task(read_all(stream))
            stream.write(first)
            await stream.drain()
            reply = await peer.call("goaway")
            assert "error" not in reply, reply
            await wait_until(lambda: session.engine.go_away_received, 5, "the Go Away")
            with pytest.raises(ConnectionError):
                await session.open_stream()
            # the existing stream is unaffected
            stream.write(second)
            await stream.drain()
            stream.write_eof()
            back = await asyncio.wait_for(reading, 20)
            assert back == first + second
            stream.close()
            await asyncio.wait_for(stream.wait_closed(), 5)
            report = await peer.stream_report(stream.stream_id, 5)
            assert report["error"] == "" and report["read"] == len(first) + len(second), report
            assert calls == []
            assert await session.ping() > 0  # the session still runs
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)
        closed = await peer.event(lambda m: m.get("event") == "session-closed", 5, "the peer's session end")
        assert closed["error"] == "", closed

    arun(main(), timeout=30)


@pytest.mark.parametrize("code", [1, 2])
def test_go_away_with_an_error_code_kills_the_session(aio_engine: str, arun: Any, code: int) -> None:
    async def main() -> None:
        raw = RawPeer()
        port = await raw.start()
        calls: list[Any] = []
        session = await MuxSession.connect(LOOPBACK, port)
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            stream = await session.open_stream()
            await asyncio.wait_for(raw.connected.wait(), 5)
            assert raw.writer is not None
            raw.writer.write(HEADER.pack(0, TYPE_GO_AWAY, 0, 0, code))
            await expect_failure(stream.read(), 5, ConnectionResetError)
            await asyncio.wait_for(session.wait_closed(), 5)
            assert len(calls) == 1 and calls[0][1] == "go away", calls
        finally:
            session.close()
            await raw.aclose()

    arun(main(), timeout=10)


def test_a_protocol_error_sends_go_away_and_calls_back_once(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        raw = RawPeer()
        port = await raw.start()
        calls: list[Any] = []
        session = await MuxSession.connect(LOOPBACK, port)
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            stream = await session.open_stream()
            await asyncio.wait_for(raw.connected.wait(), 5)
            assert raw.writer is not None
            raw.writer.write(HEADER.pack(7, 0, 0, 1, 0))  # yamux version 7: not ours
            await expect_failure(stream.read(), 5, ConnectionResetError)
            await asyncio.wait_for(session.wait_closed(), 5)
            await asyncio.wait_for(raw.eof.wait(), 5)
            assert raw.log.go_aways() == [1], raw.log.frames  # protocol error, told to the peer
            assert len(calls) == 1, calls
            assert calls[0][1] == "receive" and isinstance(calls[0][2], ProtocolError), calls
        finally:
            session.close()
            await raw.aclose()

    arun(main(), timeout=10)
