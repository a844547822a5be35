"""1,000 concurrent streams on one session, each echoing its own data."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest

from fastnat.mux_config import MuxConfig

from .support import Service, echo_handler, session_pair, wait_until

pytestmark = pytest.mark.timeout(60)

STREAMS = 1000


async def echo_client(session: Any, index: int) -> tuple[int, str, str]:
    rng = random.Random(index)
    size = rng.randrange(1, 48 * 1024)
    data = rng.randbytes(size)
    stream = await session.open_stream()

    async def send() -> None:
        # several writes, so frames of all the streams interleave
        for i in range(0, size, 4096):
            stream.write(data[i : i + 4096])
            await stream.drain()
            await asyncio.sleep(0)
        stream.write_eof()

    h = hashlib.sha256()
    n = 0

    async def receive() -> None:
        nonlocal n
        while chunk := await stream.read(65536):
            h.update(chunk)
            n += len(chunk)

    await asyncio.gather(send(), receive())
    stream.close()
    await stream.wait_closed()
    return n, h.hexdigest(), hashlib.sha256(data).hexdigest()


def test_1000_concurrent_echo_streams(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        # 1,000 SYNs can arrive in one read, before the acceptor runs: the
        # backlog must hold them (the default 256 would refuse the rest, as yamux does).
        async with session_pair(server_config=MuxConfig(accept_backlog=STREAMS)) as pair:
            service = Service(pair.server, echo_handler)
            results = await asyncio.gather(*(echo_client(pair.client, i) for i in range(STREAMS)))
            for i, (n, got, sent) in enumerate(results):
                assert got == sent, f"stream {i}: {n} bytes came back, checksum differs"
            assert service.accepted == STREAMS
            # every stream finished cleanly on both sides; the engines forget them
            for _ in range(200):
                if pair.client.stream_count == 0 and pair.server.stream_count == 0:
                    break
                await asyncio.sleep(0.01)
            assert (pair.client.stream_count, pair.server.stream_count) == (0, 0)
            await pair.aclose()
            await service.aclose()
            assert service.errors == []
            assert sorted(service.results) == sorted(n for n, _, _ in results)
            assert pair.errors == []

    arun(main(), timeout=50)


def test_streams_beyond_the_accept_backlog_are_refused_not_hung(aio_engine: str, arun: Any) -> None:
    """With a small backlog and nobody accepting, the extra streams are reset:
    their readers fail with ConnectionResetError instead of waiting forever."""

    async def main() -> None:
        async with session_pair(server_config=MuxConfig(accept_backlog=4)) as pair:
            streams = [await pair.client.open_stream() for _ in range(10)]
            reads = [asyncio.create_task(s.read()) for s in streams]
            await wait_until(lambda: sum(t.done() for t in reads) >= 6, 5, "six refusals")
            await asyncio.sleep(0.05)
            done = [t for t in reads if t.done()]
            assert len(done) == 6
            for t in done:
                assert isinstance(t.exception(), ConnectionResetError), t
            # the four in the backlog are accepted and work
            for _ in range(4):
                peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
                peer.write(b"ok")
                peer.close()
            for s, t in zip(streams, reads):
                if t not in done:
                    assert await asyncio.wait_for(t, 5) == b"ok"
                s.close()
            assert pair.errors == []

    arun(main(), timeout=20)
