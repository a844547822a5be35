"""Nothing leaks after a full stop: threads, tasks and sockets, in this
process (both APIs, stopped while clients are still connected) and in the
forwarder process (descriptors back to where they were after a busy run)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import pytest

import fastnat
from fastnat import aio

from .conftest import _open_fds, background_tasks
from .support import (
    LOOPBACK,
    aio_echo_handler,
    async_wait_until,
    echo_handler,
    echo_through,
    hello,
    message,
    raw_connect,
    raw_stats,
    wait_until,
)

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)


def settle(check, timeout: float, what: str) -> None:
    """Wait (bounded) until ``check()`` returns no problem."""
    deadline = time.monotonic() + timeout
    while (problem := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not problem, f"{what}: {problem}"


def test_no_leaks_after_full_stop_blocking(nat_engine: str, forwarder) -> None:
    threads = set(threading.enumerate())
    fds = _open_fds()
    assert background_tasks() == []

    f = dict(forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    h1 = fastnat.nat_waitforconn("leaky", 80, echo_handler, **f)
    h2 = fastnat.nat_waitforconn("leaky", 81, echo_handler, **f)
    for i in range(10):
        assert echo_through(forwarder.port, "leaky", 80 + i % 2, b"%d" % i) == b"%d" % i
    # clients still connected (their handler threads blocked in recv) at the stop
    idle = [fastnat.nat_openconn("leaky", 80 + i % 2, **f) for i in range(6)]
    for sock in idle:
        sock.settimeout(5)
        sock.sendall(b"!")
        assert sock.recv(1) == b"!"
    assert len(threading.enumerate()) >= len(threads) + 6
    fastnat.nat_stopcomm(h1)
    fastnat.nat_stopcomm(h2)
    # the relayed connections end with the session
    for sock in idle:
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
        sock.close()

    settle(
        lambda: [t for t in threading.enumerate() if t not in threads and t.is_alive()],
        5,
        "threads left after nat_stopcomm",
    )
    settle(lambda: background_tasks(), 5, "tasks left on fastnat's loop")
    settle(lambda: {fd: p for fd, p in _open_fds().items() if fds.get(fd) != p}, 5, "descriptors left open")
    wait_until(lambda: raw_stats(forwarder.port)["sessions"] == 0, 5, "the forwarder to drop the session")


def test_no_leaks_after_full_stop_asyncio(nat_engine: str, forwarder) -> None:
    threads = set(threading.enumerate())
    fds = _open_fds()
    leftover_tasks: list[asyncio.Task] = []

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await aio.start_server(echo, "aio-leaky", 80, forwarder=forwarder.address)
        conns = []
        for i in range(8):
            reader, writer = await aio.open_connection("aio-leaky", 80, forwarder=forwarder.address)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
            conns.append((reader, writer))
        # stop the server while its eight clients are connected and idle
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        for reader, writer in conns:
            try:
                assert await asyncio.wait_for(reader.read(10), 5) == b""
            except ConnectionResetError:
                pass
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        me = asyncio.current_task()
        deadline = time.monotonic() + 5
        while left := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            if time.monotonic() > deadline:
                leftover_tasks.extend(left)
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert leftover_tasks == [], f"tasks left after a full stop: {leftover_tasks}"
    settle(
        lambda: [t for t in threading.enumerate() if t not in threads and t.is_alive()], 5, "threads left"
    )
    settle(lambda: {fd: p for fd, p in _open_fds().items() if fds.get(fd) != p}, 5, "descriptors left open")


def _proc_fds(pid: int) -> dict[int, str]:
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return fds


def test_forwarder_process_leaks_nothing(nat_engine: str, forwarders) -> None:
    fwd = forwarders("--handshake-timeout", "1")
    # warm up (libuv opens one descriptor for good with the loop's first stream)
    raw_stats(fwd.port)
    handle = fastnat.nat_waitforconn("warm", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    assert echo_through(fwd.port, "warm", 80) == b"ping"
    fastnat.nat_stopcomm(handle)
    wait_until(lambda: raw_stats(fwd.port)["sessions"] == 0, 5, "warm-up session gone")
    time.sleep(0.1)
    baseline = _proc_fds(fwd.pid)
    threads = len(os.listdir(f"/proc/{fwd.pid}/task"))

    handle = fastnat.nat_waitforconn("busy", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    for i in range(30):
        assert echo_through(fwd.port, "busy", 80, b"%d" % i) == b"%d" % i
    # clients that vanish with a reset, mid-stream
    for _ in range(5):
        sock = fastnat.nat_openconn("busy", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
        sock.sendall(b"x" * 100_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    # refusals and bad input
    for data in (b"junk!!", hello() + b"\xff\xff\xff\xff", hello() + message({"id": 1}), b""):
        with raw_connect(fwd.port) as sock:
            sock.sendall(data)
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    # connected clients while the server goes away
    held = [fastnat.nat_openconn("busy", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port) for _ in range(5)]
    fastnat.nat_stopcomm(handle)
    for sock in held:
        sock.settimeout(5)
        try:
            sock.recv(10)
        except ConnectionResetError:
            pass
        sock.close()

    def problem() -> object:
        extra = {fd: p for fd, p in _proc_fds(fwd.pid).items() if baseline.get(fd) != p}
        return extra or None

    settle(problem, 5, "descriptors the forwarder process left open")
    assert len(os.listdir(f"/proc/{fwd.pid}/task")) == threads
    stats = raw_stats(fwd.port)
    assert stats["sessions"] == 0 and stats["clients_active"] == 0 and stats["pending_handshakes"] <= 1
    assert fwd.alive()


def test_a_gone_connection_is_freed_without_the_cyclic_collector(nat_engine: str) -> None:
    """A relayed connection that ended (cleanly, or reset) and a server session
    that ended (cleanly, or aborted) are freed by reference counting: a
    forwarder under churn must not hold dead connections and their buffers
    until the next full collection (bench/soak.py saw tens of MiB)."""
    import gc
    import struct
    import weakref

    from fastnat.forwarder import Forwarder

    async def main() -> list[str]:
        alive: list[tuple[str, weakref.ref[Any]]] = []
        async with Forwarder(LOOPBACK, 0, host_registry=False) as fwd:
            address = (LOOPBACK, fwd.port)
            for how in ("clean", "abort"):
                server = await aio.start_server(aio_echo_handler, f"gc-{how}", 80, forwarder=address, persist=False)
                alive.append((f"server session ({how})", weakref.ref(next(iter(fwd._links)).session)))
                for end in ("closed", "reset"):
                    reader, writer = await aio.open_connection(f"gc-{how}", 80, forwarder=address)
                    writer.write(b"x" * 100_000)
                    assert len(await asyncio.wait_for(reader.readexactly(100_000), 5)) == 100_000
                    splice = next(iter(fwd._splices))
                    alive += [(f"{name} ({end}, server {how})", weakref.ref(obj)) for name, obj in
                              (("splice", splice), ("its end", splice.end_a), ("its stream", splice.end_b.transport))]
                    del splice
                    if end == "reset":
                        writer.transport.get_extra_info("socket").setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                    else:
                        writer.close()
                    await async_wait_until(lambda: not fwd._splices, 5, "the forwarder to end the relay")
                if how == "abort":
                    server.registration.session._transport.abort()
                server.close()
                await asyncio.wait_for(server.wait_closed(), 10)
                del server
                await async_wait_until(lambda: not fwd._links, 5, "the forwarder to drop the server")
            await asyncio.sleep(0.1)  # callbacks scheduled by the closes run
            return [name for name, ref in alive if ref() is not None]

    gc.collect()
    gc.disable()
    try:
        left = aio.run(main())
    finally:
        gc.enable()
    assert left == [], f"kept alive by reference cycles: {left}"
