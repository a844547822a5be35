"""The forwarder killed with SIGKILL mid-transfer.

Clients relayed through it get an error or an end of stream at once (no
hang), the server's handlers are released too, the error delegate is called,
``nat_waitforconn_alive()`` says False while the link is down, and a server
with ``persist=True`` registers again (at a second forwarder, or at the same
one restarted) so that new clients get through within a bounded time.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time

import pytest

import fastnat
from fastnat import aio
from fastnat.errors import ServerNotFoundError

from .support import MiB, Worker, recv_exactly, echo_handler, echo_through, raw_stats, wait_until

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024


def transfer_handler(outcomes: queue.Queue[tuple[str, object]]):
    """A server function: the client's first byte chooses the mode.

    ``D``: send to the client without end; ``U``: read from it without end;
    ``E``: echo. Each handler reports how it ended."""
    block = b"d" * CHUNK

    def handler(ip, port, sock, this, listen) -> None:
        mode = b"?"
        try:
            sock.settimeout(30)
            mode = sock.recv(1)
            if mode == b"D":
                while True:
                    sock.sendall(block)
            elif mode == b"U":
                while sock.recv(CHUNK):
                    pass
                outcomes.put((mode.decode(), "eof"))
                return
            else:
                sock.sendall(mode)
                while data := sock.recv(CHUNK):
                    sock.sendall(data)
                outcomes.put((mode.decode(), "eof"))
                return
        except OSError as exc:
            outcomes.put((mode.decode(), exc))
        finally:
            sock.close()

    return handler


def downloader(sock: socket.socket, moved: list[int]) -> object:
    sock.sendall(b"D")
    try:
        while data := sock.recv(CHUNK):
            moved[0] += len(data)
    except OSError as exc:
        return exc
    return "eof"


def uploader(sock: socket.socket, moved: list[int]) -> object:
    sock.sendall(b"U")
    block = b"u" * CHUNK
    try:
        while True:
            sock.sendall(block)
            moved[0] += len(block)
    except OSError as exc:
        return exc


@pytest.mark.timeout(60)
def test_sigkill_mid_transfer_fails_over_to_second_forwarder(nat_engine: str, forwarders) -> None:
    f1, f2 = forwarders(), forwarders()
    fastnat.configure(forwarders=[f1.address, f2.address], reconnect_initial_delay=1.0)
    errdel_calls: list[tuple[object, str, BaseException]] = []
    errdel_lock = threading.Lock()

    def errdel(session: object, where: str, exc: BaseException) -> None:
        with errdel_lock:
            errdel_calls.append((session, where, exc))

    outcomes: queue.Queue[tuple[str, object]] = queue.Queue()
    handle = fastnat.nat_waitforconn("phoenix", 80, transfer_handler(outcomes), errdel=errdel)
    handle81 = fastnat.nat_waitforconn("phoenix", 81, transfer_handler(outcomes))
    assert fastnat.nat_waitforconn_alive()
    assert "phoenix" in raw_stats(f1.port)["per_server"]  # the first configured forwarder
    assert raw_stats(f2.port)["servers"] == 0

    down_sock = fastnat.nat_openconn("phoenix", 80)
    up_sock = fastnat.nat_openconn("phoenix", 80)
    down_moved, up_moved = [0], [0]
    down = Worker(lambda: downloader(down_sock, down_moved), "downloader")
    up = Worker(lambda: uploader(up_sock, up_moved), "uploader")
    try:
        down.start()
        up.start()
        wait_until(lambda: down_moved[0] > 4 * MiB and up_moved[0] > 4 * MiB, 20, "both transfers to be under way")

        f1.kill()
        killed = time.monotonic()

        # the clients: no hang. The uploader's next writes meet a dead peer.
        down_end = down.outcome(10)
        up_end = up.outcome(10)
        assert isinstance(up_end, OSError), up_end
        assert down_end == "eof" or isinstance(down_end, OSError), down_end
        # the server's handlers are released too
        ends = dict(outcomes.get(timeout=10) for _ in range(2))
        assert isinstance(ends["D"], OSError), ends  # sending into a lost session fails
        assert ends["U"] == "eof" or isinstance(ends["U"], OSError), ends

        # the link is down for a while (the first retry waits 0.5 to 1.5 s) ...
        wait_until(lambda: not fastnat.nat_waitforconn_alive(), 5, "nat_waitforconn_alive() to say False")
        # ... then registered again, at the second forwarder
        wait_until(fastnat.nat_waitforconn_alive, 15, "nat_waitforconn_alive() to say True again")
        assert handle.registration.forwarder_address == f2.tuple
        stats = raw_stats(f2.port)
        assert stats["per_server"]["phoenix"]["ports"] == [80, 81]  # every port registered again

        # new clients get through (f1 first in the list, dead: f2 is tried next)
        sock = fastnat.nat_openconn("phoenix", 80)
        with sock:
            sock.settimeout(5)
            sock.sendall(b"E" + b"after the crash")
            assert recv_exactly(sock, 16) == b"E" + b"after the crash"
        assert time.monotonic() - killed < 15
        assert echo_through(f2.port, "phoenix", 80, b"Ehi") == b"Ehi"
        assert echo_through(f2.port, "phoenix", 81, b"Eho") == b"Eho"

        with errdel_lock:
            assert len(errdel_calls) == 1, errdel_calls
            session, where, exc = errdel_calls[0]
        assert isinstance(where, str) and isinstance(exc, BaseException)
        assert session is not None
    finally:
        for s in (down_sock, up_sock):
            s.close()
        fastnat.nat_stopcomm(handle)
        fastnat.nat_stopcomm(handle81)
    wait_until(lambda: raw_stats(f2.port)["servers"] == 0, 5, "nothing registered at f2")
    assert not fastnat.nat_waitforconn_alive()


@pytest.mark.timeout(30)
def test_without_persist_the_server_stays_down(nat_engine: str, forwarders) -> None:
    f1, f2 = forwarders(), forwarders()
    fastnat.configure(forwarders=[f1.address, f2.address], reconnect_initial_delay=0.1)
    calls: list[tuple[object, str, BaseException]] = []
    handle = fastnat.nat_waitforconn("mayfly", 80, echo_handler, errdel=lambda *a: calls.append(a), persist=False)
    assert fastnat.nat_waitforconn_alive()
    f1.kill()
    wait_until(lambda: calls, 5, "errdel to be called")
    assert not fastnat.nat_waitforconn_alive() and not handle.alive
    time.sleep(1.0)  # well past the backoff: it must not have gone to f2
    assert raw_stats(f2.port)["servers"] == 0
    assert not fastnat.nat_waitforconn_alive()
    assert len(calls) == 1
    fastnat.nat_stopcomm(handle)
    fastnat.nat_stopcomm(handle)
    # the id is free in this process again
    again = fastnat.nat_waitforconn("mayfly", 80, echo_handler)
    try:
        assert echo_through(f2.port, "mayfly", 80, b"new") == b"new"
    finally:
        fastnat.nat_stopcomm(again)


@pytest.mark.timeout(60)
def test_server_process_reconnects_to_restarted_forwarder(nat_engine: str, forwarders, server_procs) -> None:
    """A server process with FASTNAT_FORWARDERS: the forwarder dies, comes
    back on the same port, and the server is reachable again."""
    f1 = forwarders()
    port = f1.port
    server = server_procs("--id", "lazarus", "--port", "80", FASTNAT_FORWARDERS=f1.address)
    assert server.event()["event"] == "ready"
    assert echo_through(port, "lazarus", 80, b"before") == b"before"
    f1.kill()
    event = server.event(timeout=10)
    assert event["event"] == "errdel", event
    time.sleep(1.0)  # down for a while: the server keeps retrying
    f1b = forwarders(port=port)
    wait_until(lambda: "lazarus" in raw_stats(port)["per_server"], 40, "the server to register again")
    assert echo_through(port, "lazarus", 80, b"after") == b"after"
    assert server.stop() == 0
    assert f1b.alive()
    wait_until(lambda: raw_stats(port)["servers"] == 0, 5, "the stopped server to deregister")


@pytest.mark.timeout(60)
def test_asyncio_server_persists_across_forwarders(nat_engine: str, forwarders) -> None:
    f1, f2 = forwarders(), forwarders()
    fastnat.configure(forwarders=[f1.address, f2.address], reconnect_initial_delay=0.2)

    async def main() -> None:
        lost: list[tuple[str, BaseException]] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(-1))
            await writer.drain()
            writer.close()

        async def roundtrip(data: bytes) -> bytes:
            reader, writer = await aio.open_connection("aio-phoenix", 80)
            writer.write(data)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(-1), 10)
            writer.close()
            return got

        server = await aio.start_server(
            echo, "aio-phoenix", 80, persist=True, error_callback=lambda s, where, exc: lost.append((where, exc))
        )
        async with server:
            assert server.alive and server.registration.forwarder_address == f1.tuple
            reader, writer = await aio.open_connection("aio-phoenix", 80)
            writer.write(b"x" * 100_000)
            await writer.drain()
            f1.kill()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError, OSError)):
                await asyncio.wait_for(reader.readexactly(1_000_000), 10)
            writer.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while server.alive:
                assert loop.time() < deadline, "server.alive still True long after its forwarder died"
                await asyncio.sleep(0.01)
            while not server.alive:
                assert loop.time() < deadline + 10, "the server did not register again"
                await asyncio.sleep(0.02)
            assert server.registration.forwarder_address == f2.tuple
            assert await roundtrip(b"back") == b"back"
            assert len(lost) == 1 and isinstance(lost[0][1], BaseException)
        assert not server.is_serving()
        try:
            await roundtrip(b"gone")
        except ServerNotFoundError:
            pass
        else:
            raise AssertionError("a closed server still reachable")

    asyncio.run(main())
