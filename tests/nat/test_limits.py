"""The forwarder's abuse limits, end to end on 127.0.0.1: connections and
handshakes per address, streams per server session, a server's byte rate
limit and byte cap. Each refusal names its limit on the client side and is
counted in ``stats`` under its own reason; per-address counts return to zero
once the connections are gone.

The forwarder runs in the test's event loop (its limits are set directly);
servers and clients are fastnat's asyncio API over real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from fastnat import aio
from fastnat.errors import ForwarderBusyError, ServerBusyError, ServerNotFoundError
from fastnat.forwarder import Forwarder, ForwarderLimits
from fastnat.mux_config import MuxConfig
from fastnat.protocol import HelloReplyReader, HelloStatus, encode_hello

from .support import LOOPBACK, MiB, aio_echo_handler, async_wait_until

pytestmark = pytest.mark.timeout(60)

SERVER_ID = "limited"
PORT = 80


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def with_forwarder(
    body: Callable[[Forwarder], Awaitable[Any]],
    *,
    mux_config: MuxConfig | None = None,
    loop: str = "asyncio",
    **limits: Any,
) -> Any:
    """Run ``body(forwarder)`` with a forwarder on loopback in this loop; after
    it, check that nothing stays counted for any address."""

    async def main() -> Any:
        forwarder = Forwarder(LOOPBACK, 0, limits=ForwarderLimits(**limits), mux_config=mux_config, host_registry=False)
        async with forwarder:
            result = await body(forwarder)
            await no_address_counted(forwarder)
        return result

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(asyncio.wait_for(main(), 40))


async def no_address_counted(forwarder: Forwarder) -> None:
    await async_wait_until(
        lambda: forwarder._ip_connections.total == 0 and forwarder._ip_handshakes.total == 0, 5, "connections to be uncounted"
    )
    assert len(forwarder._ip_connections) == 0 and len(forwarder._ip_handshakes) == 0, "an address left in the table"
    assert forwarder._pending_handshakes == 0
    stats = forwarder.stats()
    assert stats["connections"] == 0 and stats["addresses"] == 0


async def raw_hello_status(port: int) -> int:
    """The status of the forwarder's hello reply to a new client connection."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(encode_hello(b"C"))
        parser = HelloReplyReader()
        head = await asyncio.wait_for(reader.readexactly(HelloReplyReader.max_size() - 255), 5)
        reply = parser.feed(head)
        if reply is None:  # the versions the forwarder speaks follow
            reply = parser.feed(await asyncio.wait_for(reader.readexactly(head[-1]), 5))
        assert reply is not None
        return reply.status
    finally:
        writer.close()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (ConnectionError, OSError):
        pass


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes = b"ping") -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


# ------------------------------------------------------ per-address limits


def test_connections_per_address(nat_engine: str) -> None:
    async def body(fwd: Forwarder) -> None:
        where = (LOOPBACK, fwd.port)
        async with await aio.start_server(aio_echo_handler, SERVER_ID, PORT, forwarder=where):  # connection 1
            clients = [await aio.open_connection(SERVER_ID, PORT, forwarder=where) for _ in range(2)]  # 2 and 3
            assert fwd._ip_connections.count(LOOPBACK) == 3
            with pytest.raises(ForwarderBusyError, match="max_connections_per_ip"):
                await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert await raw_hello_status(fwd.port) == HelloStatus.IP_CONNECTIONS
            assert fwd.stats()["refusals"] == {"ip_connections_full": 2}
            for reader, writer in clients:  # the ones admitted are served as before
                assert await round_trip(reader, writer) == b"ping"
            # a connection that ends gives its place back
            await close(clients[0][1])
            await async_wait_until(lambda: fwd._ip_connections.count(LOOPBACK) == 2, 5, "the client to be uncounted")
            reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert await round_trip(reader, writer) == b"ping"
            for each in (writer, clients[1][1]):
                await close(each)

    with_forwarder(body, max_connections_per_ip=3)


def test_handshakes_per_address() -> None:
    async def body(fwd: Forwarder) -> None:
        where = (LOOPBACK, fwd.port)
        silent = [await asyncio.open_connection(LOOPBACK, fwd.port) for _ in range(2)]
        await async_wait_until(lambda: fwd._ip_handshakes.count(LOOPBACK) == 2, 5, "the silent connections")
        with pytest.raises(ForwarderBusyError, match="max_handshakes_per_ip"):
            await aio.open_connection(SERVER_ID, PORT, forwarder=where)
        assert await raw_hello_status(fwd.port) == HelloStatus.IP_HANDSHAKES
        assert fwd.stats()["refusals"] == {"ip_handshakes_full": 2}
        assert fwd._ip_connections.count(LOOPBACK) == 2, "a refused connection must not stay counted"
        for _, writer in silent:
            await close(writer)
        await async_wait_until(lambda: fwd._ip_handshakes.total == 0, 5, "the handshakes to be uncounted")
        # admitted again: the request reaches the forwarder, which knows no such server
        with pytest.raises(ServerNotFoundError):
            await aio.open_connection(SERVER_ID, PORT, forwarder=where)

    with_forwarder(body, max_handshakes_per_ip=2)


# ------------------------------------------------ streams per server session


def test_streams_per_server_session(nat_engine: str) -> None:
    async def body(fwd: Forwarder) -> None:
        where = (LOOPBACK, fwd.port)
        async with await aio.start_server(aio_echo_handler, SERVER_ID, PORT, forwarder=where):  # the control stream
            clients = [await aio.open_connection(SERVER_ID, PORT, forwarder=where) for _ in range(2)]
            with pytest.raises(ServerBusyError, match="max_streams_per_session"):
                await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert fwd.stats()["refusals"] == {"session_streams_full": 1}
            for reader, writer in clients:
                assert await round_trip(reader, writer) == b"ping"
            await close(clients[0][1])
            # once its stream is gone on both sides, a new client fits
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while True:
                try:
                    reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
                    break
                except ServerBusyError:
                    assert loop.time() < deadline, "the closed client's stream was never released"
                    await asyncio.sleep(0.05)
            assert await round_trip(reader, writer) == b"ping"
            for each in (writer, clients[1][1]):
                await close(each)

    with_forwarder(body, mux_config=MuxConfig(max_streams=3))


# ------------------------------------------------- byte rate limit and cap


async def transfer_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, download: bytes) -> None:
    """``U``: read to EOF, answer the sha256; ``D``: send ``download``;
    ``I``: answer ``i``, then wait for EOF."""
    try:
        command = await reader.readexactly(1)
        if command == b"U":
            digest = hashlib.sha256()
            while data := await reader.read(256 * 1024):
                digest.update(data)
            writer.write(digest.hexdigest().encode())
        elif command == b"D":
            writer.write(download)
        else:
            writer.write(b"i")
            await reader.read()
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("loop", list(LOOPS))
def test_byte_rate_limit_is_shared_and_loses_nothing(nat_engine: str, loop: str) -> None:
    rate = 2 * MiB
    upload, download = os.urandom(2 * MiB), os.urandom(2 * MiB)

    async def body(fwd: Forwarder) -> None:
        where = (LOOPBACK, fwd.port)
        loop = asyncio.get_running_loop()

        async def send_up() -> str:
            reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            writer.write(b"U" + upload)
            writer.write_eof()
            digest = await asyncio.wait_for(reader.read(), 30)
            await close(writer)
            return digest.decode()

        async def fetch_down() -> bytes:
            reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            writer.write(b"D")
            data = await asyncio.wait_for(reader.read(), 30)
            await close(writer)
            return data

        async with await aio.start_server(lambda r, w: transfer_server(r, w, download), SERVER_ID, PORT, forwarder=where):
            started = loop.time()
            digest, received = await asyncio.gather(send_up(), fetch_down())
            elapsed = loop.time() - started
        # every byte, both ways, intact
        assert digest == hashlib.sha256(upload).hexdigest()
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(download).hexdigest()
        # one bucket for the server, both directions: 4 MiB at 2 MiB/s
        throughput = (len(upload) + len(download)) / elapsed
        assert 0.5 * MiB < throughput < 3 * MiB, f"{throughput / MiB:.2f} MiB/s through a {rate / MiB:g} MiB/s limit"
        assert fwd.stats()["refusals"] == {}

    with_forwarder(body, server_byte_rate=rate, loop=loop)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_byte_cap_closes_the_servers_connections_and_refuses_new_clients(nat_engine: str, loop: str) -> None:
    cap = 1 * MiB
    download = os.urandom(3 * MiB)

    async def body(fwd: Forwarder) -> None:
        where = (LOOPBACK, fwd.port)

        def serve() -> Awaitable[aio.NATServer]:
            return aio.start_server(lambda r, w: transfer_server(r, w, download), SERVER_ID, PORT, forwarder=where)

        async with await serve():
            idle_reader, idle_writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert await round_trip(idle_reader, idle_writer, b"I") == b"i"  # 2 bytes relayed
            reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            writer.write(b"D")  # 1 byte
            received = await asyncio.wait_for(reader.read(), 10)  # to EOF: closed cleanly, not reset
            # exactly the cap is relayed, the start of the data, intact
            assert len(received) == cap - 3
            assert received == download[: cap - 3]
            # the id's other connection is closed too
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            with pytest.raises(ServerBusyError, match="server_byte_cap"):
                await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert fwd.stats()["refusals"] == {"server_byte_cap": 1}
            for w in (writer, idle_writer):
                await close(w)
        # a new registration starts from zero
        await async_wait_until(lambda: not fwd._servers, 5, "the id to be released")
        async with await serve():
            reader, writer = await aio.open_connection(SERVER_ID, PORT, forwarder=where)
            assert await round_trip(reader, writer, b"I") == b"i"
            await close(writer)

    with_forwarder(body, server_byte_cap=cap, loop=loop)


def test_optional_limits_are_checked() -> None:
    assert ForwarderLimits().server_byte_rate is None and ForwarderLimits().server_byte_cap is None
    for field, value in [
        ("server_byte_rate", 0),
        ("server_byte_rate", 1.5),
        ("server_byte_cap", -1),
        ("max_connections_per_ip", 0),
        ("max_handshakes_per_ip", None),
    ]:
        with pytest.raises(ValueError, match=field):
            ForwarderLimits(**{field: value})
