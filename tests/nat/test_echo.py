"""Bulk transfers and many clients, end to end through a forwarder process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

import fastnat
from fastnat import aio
from fastnat.aio.client import request as aio_request

from .support import MiB, Payload, Worker, raw_stats, wait_until

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

BIG = 256 * MiB


def engine_module_name(nat_engine: str) -> str:
    return {"compiled": "fastnat._mux", "python": "fastnat._mux_py"}[nat_engine]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_echo_256mib_each_way_asyncio(nat_engine: str, forwarder) -> None:
    """256 MiB up and the same 256 MiB back, sha256-checked at both ends,
    through fastnat.aio on both sides."""
    payload = Payload(BIG)

    async def main() -> None:
        server_saw: dict[str, object] = {}

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            digest, n = hashlib.sha256(), 0
            while data := await reader.read(1 * MiB):
                digest.update(data)
                n += len(data)
                writer.write(data)
                await writer.drain()
            server_saw["n"], server_saw["sha256"] = n, digest.hexdigest()
            writer.close()

        async with await aio.start_server(echo, "bulk-aio", 7, forwarder=forwarder.address) as server:
            assert type(server.registration.session.engine).__module__ == engine_module_name(nat_engine)
            reader, writer = await aio.open_connection("bulk-aio", 7, forwarder=forwarder.address)

            async def send() -> None:
                for chunk in payload.chunks():
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            async def receive() -> tuple[int, str]:
                digest, n = hashlib.sha256(), 0
                while data := await reader.read(1 * MiB):
                    digest.update(data)
                    n += len(data)
                return n, digest.hexdigest()

            started = time.monotonic()
            _, (n, sha) = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
            elapsed = time.monotonic() - started
            writer.close()
            await writer.wait_closed()
        assert server_saw == {"n": BIG, "sha256": payload.sha256}, "client -> server"
        assert (n, sha) == (BIG, payload.sha256), "server -> client"
        print(f"256 MiB each way ({nat_engine}, asyncio): {elapsed:.2f} s")

    asyncio.run(main())
    stats = raw_stats(forwarder.port)
    assert stats["bytes_client_to_server"] == BIG
    assert stats["bytes_server_to_client"] == BIG


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_echo_256mib_each_way_blocking(nat_engine: str, forwarder, server_procs) -> None:
    """The seed's functions: a server process (nat_waitforconn, echo) and
    nat_openconn's real socket here; 256 MiB each way, sha256-checked."""
    server = server_procs("--id", "bulk-blocking", "--port", "9", "--forwarder", forwarder.address)
    ready = server.event()
    assert ready == {"event": "ready", "engine": nat_engine}
    payload = Payload(BIG)
    sock = fastnat.nat_openconn("bulk-blocking", 9, forwarderIP="127.0.0.1", forwarderPort=forwarder.port)
    assert type(sock) is socket.socket
    try:

        def send() -> None:
            for chunk in payload.chunks():
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = Worker(send, "bulk-sender")
        sender.start()
        sock.settimeout(30)
        digest, n = hashlib.sha256(), 0
        started = time.monotonic()
        while data := sock.recv(1 * MiB):
            digest.update(data)
            n += len(data)
            assert time.monotonic() - started < 60, "256 MiB echo took over 60 s"
        sender.outcome(10)
    finally:
        sock.close()
    assert (n, digest.hexdigest()) == (BIG, payload.sha256)
    print(f"256 MiB each way ({nat_engine}, blocking): {time.monotonic() - started:.2f} s")


@pytest.mark.timeout(90)
def test_200_concurrent_clients(nat_engine: str, forwarder, server_procs) -> None:
    """200 clients connected to one server at the same time (each waits for
    all the others before it sends), each echoing its own data."""
    clients = 200
    size = 48 * 1024
    server = server_procs("--id", "crowd", "--port", "80", "--forwarder", forwarder.address)
    assert server.event()["event"] == "ready"

    async def main() -> list[bool]:
        all_connected = asyncio.Event()
        connected = 0
        active_seen: list[int] = []

        async def one(i: int) -> bool:
            nonlocal connected
            data = os.urandom(size)
            reader, writer = await aio.open_connection("crowd", 80, forwarder=forwarder.address, timeout=30)
            try:
                connected += 1
                if connected == clients:
                    _, w, reply = await aio_request("127.0.0.1", forwarder.port, "stats")
                    w.close()
                    active_seen.append(reply.value["clients_active"])
                    all_connected.set()
                await asyncio.wait_for(all_connected.wait(), 30)
                writer.write(data)
                writer.write_eof()
                echoed = await asyncio.wait_for(reader.read(-1), 30)
                return hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
            finally:
                writer.close()

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(clients))), 60)
        assert active_seen == [clients], f"the forwarder relayed {active_seen} clients at once, not {clients}"
        return results

    results = asyncio.run(main())
    assert results.count(True) == clients
    stats = wait_until(
        lambda: (s := raw_stats(forwarder.port))["clients_active"] == 0 and s,
        10,
        "the forwarder to count every client gone",
    )
    assert stats["clients_total"] == clients
    assert stats["per_server"]["crowd"]["clients_total"] == clients
    assert server.stop() == 0
