"""The asyncio API: ``fastnat.aio.open_connection`` and ``start_server``,
shaped like asyncio's own, end to end through a forwarder process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import fastnat
from fastnat import aio
from fastnat.errors import ServerNotFoundError, ServerRefusedError

from .support import LOOPBACK, async_wait_until, raw_stats

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def no_other_tasks(timeout: float = 3.0) -> None:
    me = asyncio.current_task()
    deadline = time.monotonic() + timeout
    while left := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks left after a full stop: {left}")
        await asyncio.sleep(0.01)


def run(coro: Coroutine[Any, Any, Any], loop: str = "asyncio", timeout: float = 30) -> Any:
    async def main() -> Any:
        result = await asyncio.wait_for(coro, timeout)
        await no_other_tasks()
        return result

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


@pytest.mark.parametrize("loop", list(LOOPS))
def test_echo_and_peername(nat_engine: str, forwarder, loop: str) -> None:
    async def main() -> None:
        peers: list[Any] = []

        async def reverse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername"))
            data = await reader.read(-1)
            writer.write(data[::-1])
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await aio.start_server(reverse, "aio-echo", 80, forwarder=forwarder.address)
        assert isinstance(server, aio.NATServer)
        async with server:
            assert server.is_serving() and server.alive
            assert server.server_id == "aio-echo" and server.port == 80
            for i in range(3):
                reader, writer = await aio.open_connection("aio-echo", 80, forwarder=forwarder.address)
                assert isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter)
                me = writer.get_extra_info("sockname")
                writer.write(b"abc%d" % i)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 10) == b"%dcba" % i
                writer.close()
                await writer.wait_closed()
                assert peers[-1] == me, "the callback must see the client's real address"
                assert me[0] == LOOPBACK
        assert not server.is_serving()
        await server.wait_closed()
        await async_wait_until(lambda: raw_stats(forwarder.port)["servers"] == 0, 5, "the id to be released")

    run(main(), loop)


def test_serve_forever_close_wait_closed(nat_engine: str, forwarder) -> None:
    async def main() -> None:
        server = await aio.start_server(lambda r, w: w.close(), "forever", 80, forwarder=forwarder.address)
        task = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0.1)
        assert not task.done()
        server.close()
        server.close()  # harmless twice
        await asyncio.wait_for(task, 5)
        await asyncio.wait_for(server.wait_closed(), 5)
        assert not server.is_serving()
        with pytest.raises(ServerNotFoundError):
            await aio.open_connection("forever", 80, forwarder=forwarder.address)

    run(main())


def test_plain_function_callback_and_configured_forwarder(nat_engine: str, forwarder) -> None:
    fastnat.configure(forwarders=[forwarder.address])

    async def main() -> None:
        handlers: set[asyncio.Task[None]] = set()

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def serve() -> None:
                writer.write(await reader.readexactly(5))
                writer.close()

            task = asyncio.get_running_loop().create_task(serve())
            handlers.add(task)
            task.add_done_callback(handlers.discard)

        async with await aio.start_server(on_client, "plain", 80):
            reader, writer = await aio.open_connection("plain", 80)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(-1), 10) == b"hello"
            writer.close()
            await writer.wait_closed()

    run(main())


def test_two_ports_share_one_session(nat_engine: str, forwarder) -> None:
    async def main() -> None:
        def tagger(tag: bytes) -> Callable[..., Any]:
            async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(tag)
                writer.close()

            return cb

        async def ask(port: int) -> bytes:
            reader, writer = await aio.open_connection("ports", port, forwarder=forwarder.address)
            data = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            return data

        s80 = await aio.start_server(tagger(b"80"), "ports", 80, forwarder=forwarder.address)
        s81 = await aio.start_server(tagger(b"81"), "ports", 81, forwarder=forwarder.address)
        assert s80.registration is s81.registration
        assert raw_stats(forwarder.port)["sessions"] == 1
        assert (await ask(80), await ask(81)) == (b"80", b"81")
        s80.close()
        await s80.wait_closed()
        with pytest.raises(ServerRefusedError):
            await ask(80)
        assert await ask(81) == b"81"
        assert s81.alive
        s81.close()
        await s81.wait_closed()
        await async_wait_until(lambda: raw_stats(forwarder.port)["sessions"] == 0, 5, "the session to close")

    run(main())


def test_many_clients_in_one_loop(nat_engine: str, forwarder) -> None:
    """Clients and the server in the same loop, 50 at once, both ways."""

    async def main() -> None:
        async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async with await aio.start_server(cb, "loopy", 80, forwarder=forwarder.address):

            async def one(i: int) -> bool:
                reader, writer = await aio.open_connection("loopy", 80, forwarder=forwarder.address)
                data = bytes([i]) * (200_000 + i)
                writer.write(data)
                writer.write_eof()
                ok = await reader.read(-1) == data
                writer.close()
                return ok

            assert all(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 30))

    run(main())
