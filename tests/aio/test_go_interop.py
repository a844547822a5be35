"""MuxSession against Go's hashicorp/yamux (the peer of ``tests/interop``),
with MuxSession dialling and accepting, both engines."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

import pytest

from fastnat.aio import MuxSession

from .payload import DataSource, sha256
from .support import LOOPBACK, MiB, Service, echo_handler, expect_failure, read_all

pytestmark = pytest.mark.timeout(60)

T = 15.0


async def go_wait(peer: Any, predicate: Any, what: str, timeout: float = T) -> dict[str, Any]:
    """Wait for a message of the Go peer without blocking the loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = peer.find(predicate)
        if message is not None:
            return message
        if peer.proc.poll() is not None and not peer._threads[0].is_alive():
            raise AssertionError(f"the Go peer exited while waiting for {what}\n  {peer.describe()}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n  {peer.describe()}")
        await asyncio.sleep(0.005)


async def go_call(peer: Any, command: str, *args: object) -> dict[str, Any]:
    tag = peer.send(command, *args)
    return await go_wait(peer, lambda m: m.get("event") == "reply" and m.get("tag") == tag, f"the reply to {command}")


async def go_report(peer: Any, stream_id: int) -> dict[str, Any]:
    return await go_wait(
        peer, lambda m: m.get("event") == "stream" and m.get("id") == stream_id, f"the report of stream {stream_id}"
    )


async def link(go_peers: Any, fastnat_dials: bool, **options: Any) -> tuple[MuxSession, Any]:
    loop = asyncio.get_running_loop()
    if fastnat_dials:
        peer = go_peers("-mode", "server", "-addr", f"{LOOPBACK}:0")
        listening = await go_wait(peer, lambda m: m.get("event") == "listening", "listening")
        host, port = listening["addr"].rsplit(":", 1)
        assert host == LOOPBACK
        session = await MuxSession.connect(LOOPBACK, int(port), **options)
    else:
        listener = socket.socket()
        try:
            listener.bind((LOOPBACK, 0))
            listener.listen(1)
            listener.setblocking(False)
            peer = go_peers("-mode", "client", "-addr", f"{LOOPBACK}:{listener.getsockname()[1]}")
            sock, _ = await asyncio.wait_for(loop.sock_accept(listener), T)
        finally:
            listener.close()
        session = await MuxSession.from_socket(sock, client=False, **options)
    await go_wait(peer, lambda m: m.get("event") == "ready", "ready")
    return session, peer


@pytest.fixture(params=[True, False], ids=["fastnat-dials", "fastnat-accepts"])
def fastnat_dials(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_echo_with_go(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    payloads = [DataSource(70 + i).data(size) for i, size in enumerate((1, 65536, 3 * MiB + 7))]

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:

            async def one(payload: bytes) -> None:
                stream = await session.open_stream()
                assert stream.stream_id % 2 == (1 if fastnat_dials else 0)

                async def send() -> None:
                    stream.write(b"echo\n")
                    for i in range(0, len(payload), 1 << 20):
                        stream.write(payload[i : i + (1 << 20)])
                        await stream.drain()
                    stream.write_eof()

                _, back = await asyncio.gather(send(), read_all(stream))
                assert sha256(back) == sha256(payload)
                stream.close()
                report = await go_report(peer, stream.stream_id)
                assert report["error"] == "" and report["read"] == len(payload), report

            await asyncio.gather(*(one(p) for p in payloads))
            assert calls == []
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=45)


def test_go_opens_echo_check_streams_to_us(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        service = Service(session, echo_handler)
        try:
            reply = await go_call(peer, "open", 8, "echo-check", 1 << 20, 5)
            assert reply["ok"], reply
            for stream_id in reply["ids"]:
                report = await go_report(peer, stream_id)
                assert report["error"] == "" and report["match"] is True, report
                assert stream_id % 2 == (0 if fastnat_dials else 1)
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)
            await service.aclose()
        assert service.errors == []
        assert sorted(service.results) == [1 << 20] * 8

    arun(main(), timeout=45)


def test_half_close_fastnat_ends_first(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    """We send and write_eof(); Go reads to EOF, then sends 2 MiB back, which we read."""
    request = DataSource(80).data(MiB + 3)

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        try:
            stream = await session.open_stream()
            stream.write(b"sink-send %d 9\n" % (2 * MiB))
            stream.write(request)
            await stream.drain()
            stream.write_eof()
            back = await asyncio.wait_for(read_all(stream), T)
            assert stream.at_eof()
            stream.close()
            report = await go_report(peer, stream.stream_id)
            assert report["error"] == "", report
            assert report["read"] == len(request) and report["read_sha256"] == sha256(request)
            assert len(back) == 2 * MiB and sha256(back) == report["written_sha256"]
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=30)


def test_half_close_go_ends_first(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    """Go opens a stream, sends 2 MiB and closes its side; we read to EOF and
    only then send our reply, which Go reads."""
    reply_data = DataSource(81).data(MiB + 5)

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        try:
            reply = await go_call(peer, "open", 1, "send", 2 * MiB, 11)
            assert reply["ok"], reply
            stream = await asyncio.wait_for(session.accept_stream(), T)
            assert stream.stream_id == reply["ids"][0]
            got = await asyncio.wait_for(read_all(stream), T)
            assert stream.at_eof() and len(got) == 2 * MiB
            stream.write(reply_data)
            await stream.drain()
            stream.close()
            await asyncio.wait_for(stream.wait_closed(), T)
            report = await go_report(peer, stream.stream_id)
            assert report["error"] == "", report
            assert sha256(got) == report["written_sha256"]
            assert report["read"] == len(reply_data) and report["read_sha256"] == sha256(reply_data)
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=30)


def test_ping_both_ways_with_go(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        try:
            rtt = await session.ping()
            assert 0 < rtt < 1
            reply = await go_call(peer, "ping")
            assert reply["ok"] and reply["rtt_ns"] > 0, reply
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=20)


def test_keepalive_against_go(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    """Our keepalive pings are answered by Go: 1.2 s of 0.1 s pings, no death."""

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials, keepalive_interval=0.1, keepalive_timeout=0.5)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            await asyncio.sleep(1.2)
            assert calls == [] and not session.is_closing()
            assert session.engine.rtt is not None  # answers were measured
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=20)


def test_go_away_from_go(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    """After Go's Go Away our open_stream() fails; the stream opened before finishes."""

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            stream = await session.open_stream()
            stream.write(b"echo\nbefore ")
            assert await asyncio.wait_for(stream.readexactly(7), T) == b"before "
            reply = await go_call(peer, "goaway")
            assert reply["ok"], reply
            await expect_failure(_open_until_refused(session), T, ConnectionError)
            stream.write(b"after")
            stream.write_eof()
            assert await asyncio.wait_for(read_all(stream), T) == b"after"
            stream.close()
            report = await go_report(peer, stream.stream_id)
            assert report["error"] == "" and report["read"] == len(b"before after"), report
            assert calls == []
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=30)


async def _open_until_refused(session: MuxSession) -> None:
    """open_stream() until it fails (the Go Away is in flight at first)."""
    while True:
        stream = await session.open_stream()
        stream.abort()
        await asyncio.sleep(0.01)


def test_go_session_dies(aio_engine: str, go_peers: Any, arun: Any, fastnat_dials: bool) -> None:
    """Go closes the TCP connection without Go Away: our streams fail with
    ConnectionResetError and the error callback is called once."""

    async def main() -> None:
        session, peer = await link(go_peers, fastnat_dials)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            streams = []
            for _ in range(3):
                s = await session.open_stream()
                s.write(b"echo\n")
                streams.append(s)
            reads = [asyncio.create_task(s.read()) for s in streams]
            await asyncio.sleep(0.05)
            peer.send("close")
            for t in reads:
                await expect_failure(t, T, ConnectionResetError)
            await asyncio.wait_for(session.wait_closed(), T)
            assert len(calls) == 1 and calls[0][1] == "connection", calls
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=30)
