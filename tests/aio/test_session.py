"""MuxSession and MuxStream between two sessions in this process, over
loopback TCP: the core subset runs for both engines and both event loops."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from fastnat.aio import MuxSession, MuxStream, StreamTransport

from .payload import DataSource, sha256
from .support import (
    LOOPBACK,
    MiB,
    Service,
    echo_handler,
    engine_name_of,
    read_all,
    session_pair,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


def test_both_sessions_run_the_engine_under_test(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            assert engine_name_of(pair.client) == aio_engine
            assert engine_name_of(pair.server) == aio_engine
            assert pair.client.client and not pair.server.client

    arun(main(), timeout=10)


def test_echo_one_stream(aio_engine: str, loop_kind: str, arun: Any) -> None:
    payload = DataSource(1).data(3 * MiB + 17)

    async def main() -> None:
        async with session_pair() as pair:
            service = Service(pair.server, echo_handler)
            stream = await pair.client.open_stream()
            assert isinstance(stream, MuxStream)
            assert stream.stream_id % 2 == 1  # the dialling side opens odd ids

            async def send() -> None:
                stream.write(payload)
                await stream.drain()
                stream.write_eof()

            _, back = await asyncio.gather(send(), read_all(stream))
            assert len(back) == len(payload)
            assert sha256(back) == sha256(payload)
            assert stream.at_eof()
            stream.close()
            await stream.wait_closed()
            assert stream.is_closing()
            await pair.aclose()
            await service.aclose()
            assert service.errors == []
            assert service.results == [len(payload)]
            assert pair.errors == []

    arun(main(), timeout=20)


def test_streams_both_ways_get_odd_and_even_ids(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            services = [Service(pair.server, echo_handler), Service(pair.client, echo_handler)]
            for opener, parity in ((pair.client, 1), (pair.server, 0)):
                for i in range(3):
                    stream = await opener.open_stream()
                    assert stream.stream_id % 2 == parity
                    stream.write(b"x%d" % i)
                    stream.write_eof()
                    assert await read_all(stream) == b"x%d" % i
                    stream.close()
            await pair.aclose()
            for s in services:
                await s.aclose()
                assert s.errors == [] and s.results == [2, 2, 2]

    arun(main(), timeout=10)


@pytest.mark.parametrize("first", ["opener", "acceptor"])
def test_half_close(aio_engine: str, loop_kind: str, arun: Any, first: str) -> None:
    """One side sends its data and write_eof(); the other reads to EOF and
    then still sends (several chunks, drained) to the side that half-closed,
    which reads it all. Both directions of who ends first."""
    request = DataSource(2).data(2 * MiB + 5)
    response = DataSource(3).data(3 * MiB + 11)

    async def ender(stream: MuxStream) -> bytes:
        stream.write(request)
        await stream.drain()
        stream.write_eof()
        with pytest.raises(RuntimeError):  # like a TCP transport after write_eof()
            stream.write(b"more")
        got = await read_all(stream)
        assert stream.at_eof()
        stream.close()
        await stream.wait_closed()
        return got

    async def continuer(stream: MuxStream) -> bytes:
        got = await read_all(stream)
        assert stream.at_eof()
        assert not stream.is_closing()  # our side is still open for writing
        for i in range(0, len(response), 256 * 1024):
            stream.write(response[i : i + 256 * 1024])
            await stream.drain()
        stream.close()
        await stream.wait_closed()
        return got

    async def main() -> None:
        async with session_pair() as pair:
            accepted = asyncio.create_task(pair.server.accept_stream())
            opened = await pair.client.open_stream()
            opened.write(b"")  # nothing sent yet: the SYN alone opens it
            acceptor = await asyncio.wait_for(accepted, 5)
            if first == "opener":
                got_by_ender, got_by_continuer = await asyncio.gather(ender(opened), continuer(acceptor))
            else:
                got_by_ender, got_by_continuer = await asyncio.gather(ender(acceptor), continuer(opened))
            assert sha256(got_by_continuer) == sha256(request)
            assert sha256(got_by_ender) == sha256(response)
            assert pair.errors == []
            # both ends closed: the engines forget the stream
            await wait_until(lambda: pair.client.stream_count == 0 and pair.server.stream_count == 0, 5,
                             "both engines to forget the stream")

    arun(main(), timeout=20)


def test_peer_sees_eof_at_once_when_nothing_was_written(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            stream.write_eof()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            assert await asyncio.wait_for(peer.read(), 5) == b""
            assert peer.at_eof()
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await peer.readexactly(1)
            assert info.value.partial == b""
            peer.write(b"late reply")
            peer.close()
            assert await asyncio.wait_for(read_all(stream), 5) == b"late reply"
            stream.close()

    arun(main(), timeout=10)


def test_reader_methods(aio_engine: str, arun: Any) -> None:
    """readline/readuntil/readexactly behave as on asyncio's TCP streams,
    whatever the frame boundaries."""

    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            stream.writelines([b"hel", b"lo\nwor", b"ld\r\n", b"12345", b"678"])
            stream.write(memoryview(b"--tail"))
            stream.write_eof()
            assert await peer.readline() == b"hello\n"
            assert await peer.readuntil(b"\r\n") == b"world\r\n"
            assert await peer.readexactly(4) == b"1234"
            assert await peer.read(2) == b"56"
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await peer.readexactly(100)
            assert info.value.partial == b"78--tail"
            assert peer.at_eof()
            peer.close()
            stream.close()

    arun(main(), timeout=10)


def test_ping_returns_a_positive_rtt(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            for session in (pair.client, pair.server):
                rtts = [await session.ping() for _ in range(5)]
                assert all(isinstance(r, float) and 0 < r < 1.0 for r in rtts), rtts
            # many at once, answered independently
            rtts = await asyncio.gather(*(pair.client.ping() for _ in range(20)))
            assert all(0 < r < 2.0 for r in rtts)
            assert pair.errors == []

    arun(main(), timeout=10)


def test_extra_info(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            server_addr = pair.listener.sockets[0].getsockname()
            client_addr = pair.client.get_extra_info("sockname")
            assert client_addr[0] == LOOPBACK
            assert stream.get_extra_info("peername") == server_addr
            assert stream.get_extra_info("sockname") == client_addr
            assert peer.get_extra_info("peername") == client_addr
            assert peer.get_extra_info("sockname") == server_addr
            assert stream.get_extra_info("stream_id") == stream.stream_id == peer.get_extra_info("stream_id")
            assert stream.get_extra_info("session") is pair.client
            assert peer.get_extra_info("session") is pair.server
            assert stream.get_extra_info("no such thing", "dflt") == "dflt"
            assert stream.get_extra_info("no such thing") is None
            # the writer's and the transport's views agree
            assert stream.writer.get_extra_info("peername") == server_addr
            assert isinstance(stream.transport, StreamTransport)
            assert stream.transport.get_extra_info("stream_id") == stream.stream_id
            stream.close()
            peer.close()

    arun(main(), timeout=10)


def test_async_context_manager_closes_the_stream(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            async with await pair.client.open_stream() as stream:
                stream.write(b"bye")
            assert stream.is_closing()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            assert await asyncio.wait_for(read_all(peer), 5) == b"bye"
            peer.close()
            await peer.wait_closed()
            await wait_until(lambda: pair.client.stream_count == 0 == pair.server.stream_count, 5, "streams forgotten")

    arun(main(), timeout=10)


def test_abort_resets_the_peer(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            stream.write(b"partial")
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            assert await peer.readexactly(7) == b"partial"
            stream.abort()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(peer.read(), 5)
            with pytest.raises(ConnectionResetError):
                peer.write(b"x")
                await asyncio.wait_for(peer.drain(), 5)
            # the session itself is fine
            assert not pair.client.is_closing() and not pair.server.is_closing()
            assert pair.errors == []
            await pair.client.ping()

    arun(main(), timeout=10)


def test_async_for_ends_when_the_session_closes(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            seen: list[int] = []

            async def accept_all() -> None:
                async for stream in pair.server:
                    seen.append(stream.stream_id)
                    stream.close()

            task = asyncio.create_task(accept_all())
            for _ in range(3):
                s = await pair.client.open_stream()
                s.close()
            await wait_until(lambda: len(seen) == 3, 5, "three accepted streams")
            pair.server.close()
            await asyncio.wait_for(task, 5)  # ends without an exception
            assert seen == [1, 3, 5]
            with pytest.raises(ConnectionError):
                await pair.server.open_stream()
            with pytest.raises(ConnectionError):
                await pair.server.accept_stream()
            with pytest.raises(ConnectionError):
                await pair.server.ping()
            await asyncio.wait_for(pair.client.wait_closed(), 5)  # the peer went too
            assert pair.errors == []

    arun(main(), timeout=10)


def test_connect_refused_raises_and_leaks_nothing(aio_engine: str, arun: Any) -> None:
    import socket

    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await MuxSession.connect(LOOPBACK, port)

    arun(main(), timeout=10)


def test_from_socket_both_sides(aio_engine: str, arun: Any) -> None:
    import socket

    async def main() -> None:
        a, b = socket.socketpair()
        client = await MuxSession.from_socket(a, client=True)
        server = await MuxSession.from_socket(b, client=False)
        service = Service(server, echo_handler)
        stream = await client.open_stream()
        stream.write(b"over a socketpair")
        stream.write_eof()
        assert await asyncio.wait_for(read_all(stream), 5) == b"over a socketpair"
        stream.close()
        client.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(server.wait_closed(), 5)
        await service.aclose()
        assert service.errors == []

    arun(main(), timeout=10)


def test_from_transport_with_initial_data(aio_engine: str, arun: Any) -> None:
    """A connection that began with a hello of its own is taken over by a
    session; bytes already read are passed on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        taken: asyncio.Future[MuxSession] = loop.create_future()

        class Hello(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = b""

            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if b"\n" in self.buf and not taken.done():
                    line, rest = self.buf.split(b"\n", 1)
                    assert line == b"HELLO"
                    taken.set_result(MuxSession.from_transport(self.transport, client=False, initial_data=rest))

        server = await loop.create_server(Hello, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"HELLO\n")
        # the client session's first frames ride in the same segment as the hello
        client = MuxSession.from_transport(writer.transport, client=True)  # type: ignore[arg-type]
        stream = await client.open_stream()
        stream.write(b"payload right behind the hello")
        stream.write_eof()
        session = await asyncio.wait_for(taken, 5)
        peer = await asyncio.wait_for(session.accept_stream(), 5)
        assert await asyncio.wait_for(read_all(peer), 5) == b"payload right behind the hello"
        peer.write(b"ok")
        peer.close()
        assert await asyncio.wait_for(read_all(stream), 5) == b"ok"
        stream.close()
        client.close()
        session.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        await asyncio.wait_for(session.wait_closed(), 5)
        server.close()
        await server.wait_closed()

    arun(main(), timeout=10)


def test_closing_the_session_fails_open_streams(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """close() ends every stream: local readers and the peer's readers fail
    with a ConnectionError; no callback (it was a close, not an error)."""

    async def main() -> None:
        async with session_pair() as pair:
            streams = [await pair.client.open_stream() for _ in range(4)]
            for s in streams:
                s.write(b"hi")
            peers = [await asyncio.wait_for(pair.server.accept_stream(), 5) for _ in range(4)]
            for p in peers:
                assert await p.readexactly(2) == b"hi"
            pending_reads = [asyncio.create_task(s.read()) for s in streams]
            peer_reads = [asyncio.create_task(p.read()) for p in peers]
            await asyncio.sleep(0.01)
            pair.client.close()
            for t in pending_reads + peer_reads:
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(t, 5)
            await asyncio.wait_for(pair.client.wait_closed(), 5)
            await asyncio.wait_for(pair.server.wait_closed(), 5)
            for s in streams + peers:
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(s.wait_closed(), 5)
            assert pair.errors == []  # close() is not an error; nor is the peer's Go Away + close

    arun(main(), timeout=10)


def test_reads_larger_than_the_window(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """readexactly() of far more than the stream's window, and a readuntil()
    whose separator lies beyond it, complete (the reader must grant credit
    while it waits), as on a TCP connection."""
    big = DataSource(90).data(8 * MiB)

    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)

            async def send() -> None:
                stream.write(big)
                await stream.drain()
                stream.write(b"|tail")
                stream.write_eof()

            sender = asyncio.create_task(send())
            got = await asyncio.wait_for(peer.readexactly(len(big)), 20)
            assert sha256(got) == sha256(big)
            assert await asyncio.wait_for(peer.read(), 5) == b"|tail"
            await asyncio.wait_for(sender, 5)
            # a separator 1 MiB away, beyond the reader's limit: LimitOverrunError, as asyncio's
            second = await pair.client.open_stream()
            second.write(bytes(1 * MiB) + b"\n")
            peer2 = await asyncio.wait_for(pair.server.accept_stream(), 5)
            with pytest.raises((asyncio.LimitOverrunError, ValueError)):
                await asyncio.wait_for(peer2.readuntil(b"\n"), 10)
            for s in (stream, peer, second, peer2):
                s.close()

    arun(main(), timeout=30)


def test_close_wakes_a_writer_blocked_in_drain(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            stream.write(bytes(8 * MiB))  # far beyond the window: drain() waits
            draining = asyncio.create_task(stream.drain())
            await asyncio.sleep(0.1)
            assert not draining.done()
            pair.client.close()
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(draining, 2)
            await asyncio.wait_for(pair.client.wait_closed(), 5)

    arun(main(), timeout=10)


def test_a_stream_whose_task_was_dropped_is_not_garbage_collected(aio_engine: str, arun: Any) -> None:
    """A task blocked in read() on a stream, with no reference kept to either,
    must not be collected: the open stream is reachable from the loop."""
    import gc

    async def main() -> None:
        async with session_pair() as pair:
            results: list[bytes] = []

            async def echo_once(stream: MuxStream) -> None:
                data = await stream.read(100)
                results.append(data)
                stream.write(data)
                stream.close()

            client = await pair.client.open_stream()
            server_stream = await asyncio.wait_for(pair.server.accept_stream(), 5)
            asyncio.get_running_loop().create_task(echo_once(server_stream))  # no reference kept, on purpose
            del server_stream
            for _ in range(3):
                await asyncio.sleep(0.05)
                gc.collect()
            client.write(b"still here")
            assert await asyncio.wait_for(client.read(100), 5) == b"still here"
            assert results == [b"still here"]

    arun(main(), timeout=20)


def test_go_away_refuses_new_streams_and_lets_open_ones_finish(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            pair.server.go_away()
            await wait_until(lambda: pair.client.engine.go_away_received, 5, "the Go Away")
            with pytest.raises(ConnectionError):
                await pair.client.open_stream()
            stream.write(b"after go away")
            stream.write_eof()
            assert await asyncio.wait_for(peer.read(), 5) == b"after go away"
            peer.write(b"reply")
            peer.close()
            assert await asyncio.wait_for(stream.read(), 5) == b"reply"

    arun(main(), timeout=20)
