"""The relay's behaviour under load and at its edges: backpressure both
ways, data a client sends ahead of CONFIRMED, a server that never accepts,
the ids the seed used, ``stats`` with many servers, the secrets file."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastnat
from fastnat import aio
from fastnat.errors import ForwarderUnreachableError

from .support import (
    LOOPBACK,
    MiB,
    RawServer,
    echo_handler,
    echo_through,
    engine_env,
    hello,
    message,
    raw_connect,
    raw_stats,
    read_hello_reply,
    read_message,
    recv_exactly,
    wait_until,
)

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

TOTAL = 96 * MiB
# What may sit between a writer and a reader that does not read: windows,
# socket buffers on loopback (auto-tuned up to several MiB each), transport
# buffers. Far below the 96 MiB sent.
STALL_BOUND = 32 * MiB


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(90)
def test_backpressure_both_ways(nat_engine: str, forwarder) -> None:
    """A reader that stops reading stops the writer at the far end, through
    the forwarder, which buffers no more than its windows allow."""

    async def main() -> None:
        progress = {"server": 0, "client": 0}
        gate = asyncio.Event()
        chunk = bytes(range(256)) * 4096  # 1 MiB

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await reader.readexactly(1) == b"D":  # the server writes, the client stalls
                while progress["server"] < TOTAL:
                    writer.write(chunk)
                    await writer.drain()
                    progress["server"] += len(chunk)
            else:  # the client writes, the server stalls
                await gate.wait()
                digest = hashlib.sha256()
                while data := await reader.read(MiB):
                    digest.update(data)
                writer.write(digest.hexdigest().encode())
            writer.close()

        expected = hashlib.sha256(chunk * (TOTAL // len(chunk))).hexdigest()
        async with await aio.start_server(handler, "bp", 1, forwarder=forwarder.address):
            base = rss_mib(forwarder.pid)
            reader, writer = await aio.open_connection("bp", 1, forwarder=forwarder.address)
            writer.write(b"D")
            await asyncio.sleep(1.5)
            stalled, grown = progress["server"], rss_mib(forwarder.pid) - base
            assert stalled < STALL_BOUND, f"the server wrote {stalled / MiB:.0f} MiB to a client that reads nothing"
            assert grown < STALL_BOUND // MiB, f"the forwarder grew by {grown} MiB"
            digest, n = hashlib.sha256(), 0
            while data := await asyncio.wait_for(reader.read(MiB), 20):
                digest.update(data)
                n += len(data)
            assert (n, digest.hexdigest()) == (TOTAL, expected)
            writer.close()

            reader, writer = await aio.open_connection("bp", 1, forwarder=forwarder.address)
            writer.write(b"U")

            async def upload() -> None:
                for _ in range(TOTAL // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                    progress["client"] += len(chunk)
                writer.write_eof()

            task = asyncio.create_task(upload())
            await asyncio.sleep(1.5)
            stalled, grown = progress["client"], rss_mib(forwarder.pid) - base
            gate.set()
            await asyncio.wait_for(task, 30)
            assert await asyncio.wait_for(reader.read(), 20) == expected.encode()
            writer.close()
            assert stalled < STALL_BOUND, f"the client wrote {stalled / MiB:.0f} MiB to a server that reads nothing"
            assert grown < STALL_BOUND // MiB, f"the forwarder grew by {grown} MiB"

    asyncio.run(main())


def test_client_data_sent_ahead_of_confirmed(nat_engine: str, forwarder) -> None:
    """Bytes that follow client_init in the same write are the server's first bytes."""
    handle = fastnat.nat_waitforconn("ahead", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        request = message({"id": 3, "request": "client_init", "value": {"server": "ahead", "port": 80}})
        with raw_connect(forwarder.port) as sock:
            sock.sendall(hello() + request + b"early bird")
            assert read_hello_reply(sock)["status"] == 0
            assert read_message(sock) == {"id": 3, "status": "CONFIRMED", "value": None}
            assert recv_exactly(sock, 10) == b"early bird"
    finally:
        fastnat.nat_stopcomm(handle)


def test_server_that_never_accepts_is_bounded_by_the_client_timeout(nat_engine: str, forwarder) -> None:
    async def main() -> None:
        server = await RawServer.connect(forwarder.port)
        try:
            assert (await server.request("reg_serv", {"server": "mute"}))["status"] == "OK"
            assert (await server.request("reg_port", {"server": "mute", "port": 80}))["status"] == "OK"
            # the raw session never accepts the forwarder's streams
            started = time.monotonic()
            with pytest.raises(ForwarderUnreachableError):
                await aio.open_connection("mute", 80, forwarder=forwarder.address, timeout=1)
            assert time.monotonic() - started < 3
            started = time.monotonic()
            with pytest.raises(ForwarderUnreachableError):
                await asyncio.to_thread(
                    fastnat.nat_openconn, "mute", 80, forwarderIP=LOOPBACK, forwarderPort=forwarder.port, timeout=1
                )
            assert time.monotonic() - started < 3
        finally:
            await server.close()

    asyncio.run(main())


def test_seed_style_and_unicode_ids(nat_engine: str, forwarder) -> None:
    fastnat.configure(forwarders=[forwarder.address])
    for server_id in (fastnat.nat_getmyid(), "café-雪-Ω", "a" * 255):
        handle = fastnat.nat_waitforconn(server_id, 63000, echo_handler)
        try:
            assert server_id in raw_stats(forwarder.port)["per_server"]
            assert echo_through(forwarder.port, server_id, 63000, server_id.encode()) == server_id.encode()
        finally:
            fastnat.nat_stopcomm(handle)


def test_stats_with_many_servers(forwarder) -> None:
    """``stats`` keeps working with a few hundred servers registered (the
    default limit is 10,000): no error, no traceback in the log."""
    count = 600

    async def main() -> dict:
        server = await RawServer.connect(forwarder.port)
        try:
            for i in range(count):
                reply = await server.request("reg_serv", {"server": f"tenant-{i:05d}.example.org"})
                assert reply["status"] == "OK", reply
            try:
                return raw_stats(forwarder.port)
            except (EOFError, ConnectionError) as exc:
                raise AssertionError(f"the stats request failed with {count} servers registered: {exc}") from None
        finally:
            await server.close()

    stats = asyncio.run(main())
    assert stats["servers"] == count
    log = forwarder.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


def test_stats_on_a_server_control_stream_with_many_servers(forwarder) -> None:
    """A server may ask ``stats`` on its control stream; with many servers
    registered that must not cost it its session."""
    count = 600

    async def main() -> None:
        server = await RawServer.connect(forwarder.port)
        try:
            for i in range(count):
                await server.request("reg_serv", {"server": f"tenant-{i:05d}.example.org"})
            try:
                reply = await server.request("stats")
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                raise AssertionError(f"asking stats cost the server its session: {exc!r}") from None
            assert reply["status"] == "OK"
            assert not server.session.is_closing()
        finally:
            await server.close()

    asyncio.run(main())


# -------------------------------------------------------------- secrets file


def run_forwarder(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fastnat", "forwarder", "--host", LOOPBACK, "--port", "0", *args],
        capture_output=True,
        timeout=20,
        env=engine_env("compiled"),
        stdin=subprocess.DEVNULL,
    )


def test_bad_secrets_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "secrets"
    bad.write_text("alice alice-secret\nbob\n")
    proc = run_forwarder("--secrets-file", str(bad))
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    assert f"{bad}:2".encode() in proc.stderr, proc.stderr
    proc = run_forwarder("--secrets-file", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr and b"missing" in proc.stderr, proc.stderr


def test_registration_proof_is_bound_to_the_connection(forwarders) -> None:
    """A proof made for one connection's nonce does not register the id on another."""
    from fastnat.protocol import registration_proof

    fwd = forwarders("--secret", "s3cret")

    async def main() -> None:
        first = await RawServer.connect(fwd.port)
        second = await RawServer.connect(fwd.port)
        try:
            assert first.nonce != second.nonce
            proof = registration_proof(b"s3cret", first.nonce, "owned")
            replay = await second.request("reg_serv", {"server": "owned", "proof": proof})
            assert replay["status"] == "AUTH_FAILED", replay
            ok = await first.request("reg_serv", {"server": "owned", "proof": proof})
            assert ok["status"] == "OK", ok
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())
    wait_until(lambda: raw_stats(fwd.port)["sessions"] == 0, 5, "sessions closed")


def test_registration_proof_check_refuses_any_non_hex_proof() -> None:
    """check_registration_proof answers False, never raises, whatever the proof
    (a lone surrogate used to raise UnicodeEncodeError; found by fuzz/fuzz_control.py)."""
    from fastnat.protocol import check_registration_proof, registration_proof

    nonce = bytes(16)
    proof = registration_proof(b"s3cret", nonce, "owned")
    assert check_registration_proof(b"s3cret", nonce, "owned", proof) is True
    for bad in ["\ud800", proof[:-1] + "\udfff", proof[:-1] + "\u00e9", proof.upper(), "", None, 5, [proof]]:
        assert check_registration_proof(b"s3cret", nonce, "owned", bad) is False, bad


# ------------------------------------------------------- clients that vanish


@pytest.mark.parametrize("server_id", ["vanish", "nobody"], ids=["registered", "unknown"])
def test_clients_that_vanish_before_the_reply(nat_engine: str, forwarders, server_id: str) -> None:
    """Clients that send client_init and reset (or close) their connection at
    once: each costs nothing afterwards. No stream is left open on the
    server's session, no client slot stays taken, no traceback in the log."""
    import socket
    import struct

    fwd = forwarders("--max-clients-per-server", "2")
    handle = fastnat.nat_waitforconn("vanish", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    try:
        request = message({"id": 1, "request": "client_init", "value": {"server": server_id, "port": 80}})
        for i in range(20):
            sock = raw_connect(fwd.port)
            sock.sendall(hello() + request)
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.close()
        session = handle.registration.session
        wait_until(
            lambda: raw_stats(fwd.port)["clients_active"] == 0 and session.stream_count == 1,
            3,
            f"the vanished clients' streams to close (server session holds {session.stream_count} streams, "
            "the control stream being one)",
        )
        # The forwarder may still be serving the last vanished clients (the
        # check above can pass before it has read them all): a slot they hold
        # is freed within moments, a leaked one never.
        deadline = time.monotonic() + 3
        while True:
            try:
                assert echo_through(fwd.port, "vanish", 80, b"still fine") == b"still fine"
                break
            except fastnat.errors.ServerBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        time.sleep(0.2)
        log = fwd.log()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    finally:
        fastnat.nat_stopcomm(handle)
    time.sleep(0.2)
    log = fwd.log()
    assert "never retrieved" not in log, log[-3000:]
