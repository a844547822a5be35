"""Half-close through the relay, both ways: a client's ``shutdown(SHUT_WR)``
reaches the server as end of stream while the server can still send, and
the reverse. The payloads are larger than a stream's window, so the open
direction keeps being flow-controlled after the other one closed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import socket

import pytest

import fastnat
from fastnat import aio

from .support import LOOPBACK, MiB, Worker, recv_until_eof

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

SIZE = 3 * MiB


def recv_all(sock, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    parts = []
    while data := sock.recv(1 * MiB):
        parts.append(data)
    return b"".join(parts)


def test_client_half_close_blocking(nat_engine: str, forwarder) -> None:
    """Client sends, then SHUT_WR; the server reads to EOF and only then
    answers, a lot; the client reads it all."""
    outcome: queue.Queue[object] = queue.Queue()

    def handler(ip, port, sock, this, listen) -> None:
        try:
            got = recv_all(sock)
            sock.sendall(hashlib.sha256(got).digest() + os.urandom(16) * (SIZE // 16))
            outcome.put(len(got))
        except BaseException as exc:  # noqa: BLE001
            outcome.put(exc)
        finally:
            sock.close()

    handle = fastnat.nat_waitforconn("hc1", 80, handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        data = os.urandom(SIZE)
        sock = fastnat.nat_openconn("hc1", 80, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
        with sock:
            sender = Worker(lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            answer = recv_all(sock)
            sender.outcome(10)
        assert outcome.get(timeout=10) == SIZE
        assert answer[:32] == hashlib.sha256(data).digest()
        assert len(answer) == 32 + SIZE
    finally:
        fastnat.nat_stopcomm(handle)


def test_server_half_close_blocking(nat_engine: str, forwarder) -> None:
    """The server sends, then SHUT_WR; the client reads to EOF and only
    then sends, a lot; the server reads it all."""
    outcome: queue.Queue[object] = queue.Queue()
    greeting = os.urandom(SIZE)

    def handler(ip, port, sock, this, listen) -> None:
        try:
            sock.sendall(greeting)
            sock.shutdown(socket.SHUT_WR)
            outcome.put(recv_all(sock))
        except BaseException as exc:  # noqa: BLE001
            outcome.put(exc)
        finally:
            sock.close()

    handle = fastnat.nat_waitforconn("hc2", 80, handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        reply = os.urandom(SIZE)
        sock = fastnat.nat_openconn("hc2", 80, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
        with sock:
            got = recv_all(sock)
            assert got == greeting
            sock.sendall(reply)  # after the server's EOF: still carried
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        received = outcome.get(timeout=10)
        assert not isinstance(received, BaseException), received
        assert received == reply
    finally:
        fastnat.nat_stopcomm(handle)


def test_half_close_both_ways_asyncio(nat_engine: str, forwarder) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            mode = await reader.readexactly(1)
            if mode == b"C":  # the client half-closes first
                got = await reader.read(-1)
                writer.write(hashlib.sha256(got).digest() + got)
                await writer.drain()
                writer.close()
            else:  # the server half-closes first
                writer.write(b"S" * SIZE)
                writer.write_eof()
                got = await reader.read(-1)
                assert reader.at_eof()
                writer.close()
                results.put_nowait(got)

        results: asyncio.Queue[bytes] = asyncio.Queue()
        async with await aio.start_server(handler, "hc3", 80, forwarder=forwarder.address):
            data = os.urandom(SIZE)
            reader, writer = await aio.open_connection("hc3", 80, forwarder=forwarder.address)
            writer.write(b"C" + data)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(-1), 20)
            assert answer[:32] == hashlib.sha256(data).digest() and answer[32:] == data
            writer.close()

            reader, writer = await aio.open_connection("hc3", 80, forwarder=forwarder.address)
            writer.write(b"S")
            assert await asyncio.wait_for(reader.read(-1), 20) == b"S" * SIZE
            writer.write(data)  # after the server's EOF
            writer.write_eof()
            assert await asyncio.wait_for(results.get(), 20) == data
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


async def _reset_server(forwarder, body) -> None:
    """Run ``body(server_saw)`` against a server that aborts its stream after
    7 bytes when a client sends ``A``, and otherwise reports how its stream
    ended (``"eof"`` or the error)."""

    server_saw: asyncio.Queue[object] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = await reader.readexactly(1)
        if mode == b"A":
            writer.write(b"partial")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.transport.abort()  # a reset, mid-response
            return
        try:
            while await reader.read(65536):
                pass
            server_saw.put_nowait("eof")
        except ConnectionError as exc:
            server_saw.put_nowait(exc)
        writer.close()

    async with await aio.start_server(handler, "rst", 80, forwarder=forwarder.address):
        await body(server_saw)


def test_server_reset_reaches_the_client_as_a_reset(nat_engine: str, forwarder) -> None:
    """A server that resets its stream mid-response: the client must be able
    to tell that from a complete response, so it gets a TCP reset
    (ECONNRESET), not a clean end of stream."""

    async def body(server_saw) -> None:
        reader, writer = await aio.open_connection("rst", 80, forwarder=forwarder.address)
        try:
            writer.write(b"A")
            assert await asyncio.wait_for(reader.readexactly(7), 5) == b"partial"
            try:
                rest = await asyncio.wait_for(reader.read(100), 5)
            except ConnectionResetError:
                return
            raise AssertionError(f"the client saw a clean end of stream ({rest!r}) where the server reset its stream")
        finally:
            writer.close()

    asyncio.run(_reset_server(forwarder, body))


def test_client_reset_reaches_the_server(nat_engine: str, forwarder) -> None:
    import struct

    async def body(server_saw) -> None:
        reader, writer = await aio.open_connection("rst", 80, forwarder=forwarder.address)
        writer.write(b"R" + b"x" * 100_000)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST
        outcome = await asyncio.wait_for(server_saw.get(), 5)
        assert outcome == "eof" or isinstance(outcome, ConnectionError), outcome

    asyncio.run(_reset_server(forwarder, body))
