"""Backpressure end to end: window credit, drain(), a stalled stream that
does not stall its neighbours, the TCP connection's own high-water mark."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from typing import Any

import pytest

from fastnat.aio import MuxSession, MuxStream

from .payload import DataSource
from .support import KiB, LOOPBACK, MiB, session_pair, wait_until

pytestmark = pytest.mark.timeout(60)

WINDOW = 256 * KiB  # the spec's initial window, the default
STREAM_READ_LIMIT = 256 * KiB  # MuxSession's default StreamReader limit (it buffers up to twice this)
CHUNK = 64 * KiB


class Writer:
    """Writes ``total`` bytes of DataSource(seed, CHUNK) chunk by chunk,
    drain() after each; records how much got through and when it last moved."""

    def __init__(self, stream: MuxStream, total: int, seed: int) -> None:
        self.stream = stream
        self.total = total
        self.source = DataSource(seed, CHUNK)
        self.through = 0
        self.last_progress = time.monotonic()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for chunk in self.source.chunks(self.total):
            self.stream.write(chunk)
            await self.stream.drain()
            self.through += len(chunk)
            self.last_progress = time.monotonic()
        self.stream.write_eof()

    async def stalled(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Wait until drain() has not returned for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_progress < quiet:
            assert not self.task.done(), "the writer finished: nothing held it back"
            assert time.monotonic() < deadline, f"the writer never stalled ({self.through} bytes through)"
            await asyncio.sleep(0.02)

    def expected_sha256(self) -> str:
        return self.source.sha256(self.total)


async def sha_to_eof(stream: MuxStream, h: Any = None) -> tuple[int, str]:
    h = h or hashlib.sha256()
    n = 0
    while data := await stream.read(1 << 20):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def test_drain_blocks_while_the_window_is_exhausted_and_resumes(aio_engine: str, loop_kind: str, arun: Any) -> None:
    total = 16 * MiB

    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            writer = Writer(stream, total, seed=5)
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            await writer.stalled()
            # Nobody reads: what got through is what the receiver buffers. It
            # is bounded by the window and the reader's buffer, not by the
            # 16 MiB the writer wants to send.
            bound = WINDOW + 2 * STREAM_READ_LIMIT + 2 * CHUNK
            assert WINDOW <= writer.through <= bound, writer.through
            assert stream.transport.get_write_buffer_size() <= CHUNK
            assert pair.client.engine.send_window(stream.stream_id) == 0
            through = writer.through
            await asyncio.sleep(0.3)
            assert writer.through == through and not writer.task.done(), "it should stay stalled"
            # reading a little lets it move on
            h = hashlib.sha256()
            h.update(await peer.readexactly(1 * MiB))
            await wait_until(lambda: writer.through > through, 5, "the writer to resume")
            # reading everything lets it finish, and the data is intact
            n, digest = await asyncio.wait_for(sha_to_eof(peer, h), 30)
            await asyncio.wait_for(writer.task, 5)
            assert n + 1 * MiB == total
            assert digest == writer.expected_sha256()
            peer.close()
            stream.close()
            assert pair.errors == []

    arun(main(), timeout=45)


def test_stalled_stream_does_not_stall_another_moving_100_mib(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """Stream A is accepted and never read; stream B, on the same session and
    in the same direction, still carries 100 MiB. Then A is read and is intact."""
    big = 100 * MiB

    async def main() -> None:
        async with session_pair() as pair:
            a = await pair.client.open_stream()
            a_writer = Writer(a, 8 * MiB, seed=11)
            a_peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            await a_writer.stalled()
            a_through = a_writer.through

            b = await pair.client.open_stream()
            b_peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            started = time.monotonic()
            b_writer = Writer(b, big, seed=12)
            n, digest = await asyncio.wait_for(sha_to_eof(b_peer), 40)
            await asyncio.wait_for(b_writer.task, 5)
            elapsed = time.monotonic() - started
            assert n == big and digest == b_writer.expected_sha256()
            # A did not move meanwhile, and was never read
            assert a_writer.through == a_through and not a_writer.task.done()
            assert a_through <= WINDOW + 2 * STREAM_READ_LIMIT + 2 * CHUNK
            print(f"100 MiB beside a stalled stream in {elapsed:.2f} s")

            n, digest = await asyncio.wait_for(sha_to_eof(a_peer), 20)
            await asyncio.wait_for(a_writer.task, 5)
            assert n == 8 * MiB and digest == a_writer.expected_sha256()
            for s in (a, b, a_peer, b_peer):
                s.close()
            assert pair.errors == []

    arun(main(), timeout=55)


def test_a_stream_nobody_accepted_does_not_stall_the_session(aio_engine: str, arun: Any) -> None:
    """A stream the peer opened and nobody accepted holds at most its window;
    the other direction's streams carry on."""

    async def main() -> None:
        async with session_pair() as pair:
            # the server opens A and fills it; the client never accepts it
            a = await pair.server.open_stream()
            a_writer = Writer(a, 4 * MiB, seed=21)
            await a_writer.stalled()
            assert a_writer.through <= WINDOW + CHUNK
            # meanwhile 20 MiB the other way, and a second server->client stream, work
            b = await pair.client.open_stream()
            b_writer = Writer(b, 20 * MiB, seed=22)
            # accept_stream returns A first (it came first): take it without reading
            a_peer = await asyncio.wait_for(pair.client.accept_stream(), 5)
            b_peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            n, digest = await asyncio.wait_for(sha_to_eof(b_peer), 30)
            assert digest == b_writer.expected_sha256()
            await asyncio.wait_for(b_writer.task, 5)
            assert not a_writer.task.done()
            n, digest = await asyncio.wait_for(sha_to_eof(a_peer), 20)
            assert digest == a_writer.expected_sha256()
            await asyncio.wait_for(a_writer.task, 5)
            for s in (a, b, a_peer, b_peer):
                s.close()

    arun(main(), timeout=50)


def test_write_buffer_limits_of_a_stream(aio_engine: str, arun: Any) -> None:
    """set_write_buffer_limits(high) lets a stream buffer up to ``high``
    beyond its window before drain() waits; the default (0) buffers nothing."""

    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            transport = stream.transport
            assert transport.get_write_buffer_limits() == (0, 0)
            transport.set_write_buffer_limits(high=1 * MiB)
            assert transport.get_write_buffer_limits() == (256 * KiB, 1 * MiB)
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=10, low=20)
            # fill the receiver (window + its reader's buffer), then the send buffer
            writer = Writer(stream, 8 * MiB, seed=31)
            await writer.stalled()
            pending = transport.get_write_buffer_size()
            assert 0 < pending <= 1 * MiB + CHUNK, pending
            n, digest = await asyncio.wait_for(sha_to_eof(peer), 20)
            assert digest == writer.expected_sha256()
            await asyncio.wait_for(writer.task, 5)
            stream.close()
            peer.close()

    arun(main(), timeout=30)


def test_tcp_backpressure_bounds_what_a_session_buffers(aio_engine: str, peers: Any, arun: Any) -> None:
    """The peer process advertises 32 MiB windows, so flow control would let
    16 streams queue 512 MiB; the peer is frozen (SIGSTOP), so only the TCP
    connection's buffers hold data back. drain() must block once the TCP
    transport is above its high-water mark: what the writers got through is
    bounded by kernel buffers plus that mark, not by the windows."""
    streams_n = 16
    per_stream = 24 * MiB
    peer = peers("--listen", "--window", str(32 * MiB))
    port = peer.wait_event("listening")["port"]

    async def main() -> None:
        session = await MuxSession.connect(LOOPBACK, port)
        try:
            await frozen_peer_scenario(session)
        finally:
            peer.signal(signal.SIGCONT)
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    async def frozen_peer_scenario(session: MuxSession) -> None:
        errors: list[Any] = []
        session.set_error_callback(lambda *a: errors.append(a))
        await peer.event(lambda m: m.get("event") == "ready", 10, "ready")
        streams = []
        for _ in range(streams_n):
            s = await session.open_stream()
            s.write(b"sink\n")
            streams.append(s)
        # let the SYNs and the peer's window updates through before freezing it
        await wait_until(lambda: all(session.engine.send_window(s.stream_id) > 16 * MiB for s in streams), 10,
                         "the peer's large windows")
        peer.signal(signal.SIGSTOP)
        writers = [Writer(s, per_stream, seed=40 + i) for i, s in enumerate(streams)]
        try:
            deadline = time.monotonic() + 10
            while any(time.monotonic() - w.last_progress < 0.5 for w in writers):
                assert time.monotonic() < deadline, "writers kept going against a frozen peer"
                await asyncio.sleep(0.05)
            through = sum(w.through for w in writers)
            # Kernel send+receive buffers on loopback are a few MiB; the
            # session's own high-water mark is 1 MiB; each writer holds a chunk.
            assert through <= 48 * MiB, f"{through / MiB:.1f} MiB queued against a frozen peer"
            assert all(not w.task.done() for w in writers)
            peer.signal(signal.SIGCONT)
            # everything then arrives intact
            for i, (s, w) in enumerate(zip(streams, writers)):
                line = await asyncio.wait_for(s.readline(), 60)
                n, digest = line.decode().split()
                assert int(n) == per_stream and digest == w.expected_sha256(), f"stream {i}"
            for w in writers:
                await asyncio.wait_for(w.task, 5)
            for s in streams:
                s.close()
            assert errors == []
        finally:
            peer.signal(signal.SIGCONT)
            for w in writers:
                if not w.task.done():
                    w.task.cancel()
            await asyncio.gather(*(w.task for w in writers), return_exceptions=True)

    arun(main(), timeout=90)
